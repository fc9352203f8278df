"""The 1F1B schedule on a toy 3-stage model: gradients equal a plain single-process loop, and each
stage runs the 1F1B order (warmup forwards, then one-forward-one-backward, then cooldown)."""

from __future__ import annotations

import torch
from distributed import run_distributed

STAGES, MICRO, WIDTH, MB = 3, 5, 6, 2


def _toy_stage(stage):
    torch.manual_seed(100 + stage)
    return torch.nn.Linear(WIDTH, WIDTH, dtype=torch.float64)


def _micro_input(i):
    return torch.randn(MB, WIDTH, generator=torch.Generator().manual_seed(i), dtype=torch.float64)


def _stage_worker(rank, world):
    from rsscale.scaling.parallel.pipeline import StageLinks, forward_backward_1f1b

    layer, events = _toy_stage(rank), []
    links = StageLinks(list(range(world)), rank)

    def forward_step(i, x):
        events.append(("F", i))
        h = torch.tanh(layer(_micro_input(i) if x is None else x.double()))
        out = (h**2).mean() / MICRO if links.is_last else h
        out.register_hook(lambda g: events.append(("B", i)))
        return out

    losses = forward_backward_1f1b(forward_step, MICRO, links, (MB, WIDTH))
    return {"grad": layer.weight.grad.numpy(), "events": events, "loss": float(sum(losses)) if losses else None}


def test_1f1b_gradients_and_order_match_a_plain_loop():
    results = run_distributed(_stage_worker, STAGES)
    layers = [_toy_stage(s) for s in range(STAGES)]
    total = 0.0
    for i in range(MICRO):  # reference: the whole model, one micro-batch after another, float64
        h = _micro_input(i)
        for layer in layers:
            h = torch.tanh(layer(h))
        loss = (h**2).mean() / MICRO
        loss.backward()
        total += loss.item()
    assert abs(results[-1]["loss"] - total) < 1e-6  # the schedule sends activations in float32
    for s, (layer, r) in enumerate(zip(layers, results)):
        assert torch.allclose(torch.from_numpy(r["grad"]), layer.weight.grad, atol=1e-6), f"stage {s} gradient differs"
        events = r["events"]
        warmup = min(STAGES - s - 1, MICRO)
        first_backward = next(k for k, e in enumerate(events) if e[0] == "B")
        assert first_backward == warmup + 1, f"stage {s}: {events}"
        assert [e for e in events if e[0] == "F"] == [("F", i) for i in range(MICRO)]
        assert [e for e in events if e[0] == "B"] == [("B", i) for i in range(MICRO)]
        in_flight = max(sum(1 if e[0] == "F" else -1 for e in events[: k + 1]) for k in range(len(events)))
        assert in_flight == min(STAGES - s, MICRO)  # 1F1B's memory bound (GPipe would keep all MICRO)
