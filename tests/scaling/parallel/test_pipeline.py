"""The 1F1B schedule on a toy 3-stage model: gradients equal a plain single-process loop, and each
stage runs the 1F1B order (warmup forwards, then one-forward-one-backward, then cooldown)."""

from __future__ import annotations

import numpy as np
import pytest
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




WIDTH, MB = 4, 3


# (stages, micro-batches, loss scale); powers of two: scaling is exact in fp32. M=1 on 3 stages:
# the middle stage has only warmup (no steady round) and must not wait for a second activation
CASES = [(3, 4, 8.0), (3, 2, 0.25), (3, 1, 2.0), (1, 3, 8.0)]


def _layer(case, stage):
    torch.manual_seed(1000 * case + stage)
    return torch.nn.Linear(WIDTH, WIDTH)


def _micro_input_fp32(i):
    return torch.randn(MB, WIDTH, generator=torch.Generator().manual_seed(7 + i))


def _worker(rank, world):
    from rsscale.scaling.parallel.pipeline import StageLinks, forward_backward_1f1b

    out = []
    for c, (stages, micro, scale) in enumerate(CASES):
        ranks = list(range(stages)) if stages == world else [rank]  # one-stage case: every rank alone
        layer = _layer(c, ranks.index(rank))
        links = StageLinks(ranks, rank)

        def forward_step(i, x):
            h = torch.tanh(layer(_micro_input_fp32(i) if x is None else x))
            return (h**2).mean() / micro if links.is_last else h

        losses = forward_backward_1f1b(forward_step, micro, links, (MB, WIDTH), loss_scale=scale)
        out.append({"grad": layer.weight.grad.numpy(), "bias": layer.bias.grad.numpy(),
                    "losses": [float(x) for x in losses]})
    return out


def _reference(c, stages, micro):
    layers = [_layer(c, s).double() for s in range(stages)]
    losses = []
    for i in range(micro):
        h = _micro_input_fp32(i).double()
        for layer in layers:
            h = torch.tanh(layer(h))
        loss = (h**2).mean() / micro
        loss.backward()
        losses.append(loss.item())
    return layers, losses


def test_1f1b_with_loss_scale_clamped_warmup_and_one_stage():
    results = run_distributed(_worker, 3)
    for c, (stages, micro, scale) in enumerate(CASES):
        layers, losses = _reference(c, stages, micro)
        for rank, res in enumerate(results):
            r = res[c]
            stage = rank if stages > 1 else 0
            ref = layers[stage]
            torch.testing.assert_close(torch.from_numpy(r["grad"]).double(), scale * ref.weight.grad, rtol=1e-5, atol=1e-7,
                                       msg=f"case {c} stage {stage}: weight grad is not scale x reference")
            torch.testing.assert_close(torch.from_numpy(r["bias"]).double(), scale * ref.bias.grad, rtol=1e-5, atol=1e-7)
            last = stage == stages - 1
            assert len(r["losses"]) == (micro if last else 0)
            if last:  # the returned losses are the unscaled micro-batch losses
                assert r["losses"] == pytest.approx(losses, rel=1e-5)


def test_stage_links_on_a_non_contiguous_rank_list():
    from rsscale.scaling.parallel.pipeline import StageLinks

    ranks = [4, 6, 9]
    first, mid, last = (StageLinks(ranks, r) for r in ranks)
    assert (first.stage, first.num_stages, first.prev, first.next) == (0, 3, None, 6)
    assert (mid.stage, mid.prev, mid.next, mid.is_first, mid.is_last) == (1, 4, 9, False, False)
    assert (last.stage, last.prev, last.next, last.is_first, last.is_last) == (2, 6, None, False, True)
    assert first.is_first and not first.is_last
    alone = StageLinks([3], 3)
    assert alone.is_first and alone.is_last and alone.num_stages == 1


# interleaved: P ranks, V chunks each (virtual stage v = chunk * P + rank), the ring wrapping from
# the last rank to the first; (P, V, micro-batches, loss scale); P=2 runs on ranks 0 and 1 while
# rank 2 idles. P=3 with M=6 (V=2 and 3) has a tick where a rank receives from both neighbours
# (test below): waiting twice on one gloo receive once hung there (reports/mutation.md).
INTERLEAVED = [(3, 2, 3, 4.0), (2, 2, 4, 2.0), (3, 2, 6, 0.5), (3, 3, 6, 1.0)]


def _receives_per_tick(P, V, M):
    """Per (rank, tick): how many messages the timetable sends that rank at that tick."""
    from collections import Counter

    from rsscale.scaling.parallel.pipeline import timetable

    table, last, got = timetable(P, V, M), P * V - 1, Counter()
    for q in range(P):
        for tick, (_, a) in table[q].items():
            v = a.chunk * P + q + (1 if a.kind == "F" else -1)  # the virtual stage it feeds
            if 0 <= v <= last:
                got[v % P, tick] += 1
    return got


def test_three_stage_interleaved_cases_receive_twice_in_one_tick():
    """The P=3, M=6 cases above are the ones where a rank posts two receives in one tick."""
    assert max(_receives_per_tick(3, 2, 6).values()) == 2 and max(_receives_per_tick(3, 3, 6).values()) == 2
    assert max(_receives_per_tick(3, 2, 3).values()) == 1 and max(_receives_per_tick(2, 2, 4).values()) == 1


def _interleaved_worker(rank, world):
    from rsscale.scaling.parallel.pipeline import StageLinks, perf_clock, run_schedule

    out = []
    for c, (stages, chunks, micro, scale) in enumerate(INTERLEAVED):
        if rank >= stages:
            out.append(None)
            continue
        links = StageLinks(list(range(stages)), rank)
        layers = [_layer(10 + c, j * stages + rank) for j in range(chunks)]
        calls = []

        def forward_step(chunk, i, x):
            calls.append((chunk, i, x is None))
            h = torch.tanh(layers[chunk](_micro_input_fp32(i) if x is None else x))
            return (h**2).mean() / micro if chunk * stages + rank == chunks * stages - 1 else h

        losses, busy = run_schedule(forward_step, micro, links, (MB, WIDTH), loss_scale=scale, chunks=chunks, clock=perf_clock())
        out.append({"grads": [(l.weight.grad.numpy(), l.bias.grad.numpy()) for l in layers], "losses": [float(x) for x in losses],
                    "busy": busy, "calls": calls})
    return out


def test_interleaved_schedule_with_loss_scale_matches_a_plain_loop():
    from rsscale.scaling.parallel.pipeline import compute_order

    results = run_distributed(_interleaved_worker, 3)
    for c, (stages, chunks, micro, scale) in enumerate(INTERLEAVED):
        layers, losses = _reference(10 + c, stages * chunks, micro)
        for rank, res in enumerate(results[:stages]):
            r = res[c]
            order = compute_order(stages, chunks, micro, rank)
            assert r["calls"] == [(a.chunk, a.micro, a.chunk * stages + rank == 0) for a in order if a.kind == "F"]
            assert r["busy"] > 0.0
            for j, (w, b) in enumerate(r["grads"]):
                ref = layers[j * stages + rank]
                torch.testing.assert_close(torch.from_numpy(w).double(), scale * ref.weight.grad, rtol=1e-5, atol=1e-7,
                                           msg=f"case {c} rank {rank} chunk {j}")
                torch.testing.assert_close(torch.from_numpy(b).double(), scale * ref.bias.grad, rtol=1e-5, atol=1e-7)
            assert r["losses"] == (pytest.approx(losses, rel=1e-5) if rank == stages - 1 else [])
        assert all(res[c] is None for res in results[stages:])


def test_check_schedule_refuses_no_micro_batches():
    from rsscale.scaling.parallel.pipeline import check_schedule

    check_schedule(2, 2, 2)  # the smallest interleaved schedule is fine
    for P, V, M in ((2, 1, 0), (2, 2, 0), (0, 1, 1), (2, 0, 2)):
        with pytest.raises(ValueError, match=rf"^pipeline size, --vpp and the micro-batch count must be >= 1, got {P}, {V}, {M}$"):
            check_schedule(P, V, M)


def test_single_stage_schedule_times_only_its_compute():
    """One stage, no p2p: V=1 and M=3 runs 3 forwards and 3 backwards; with a clock that advances
    by 1 per call, the compute time is exactly one unit per action (0.0 without a clock)."""
    from rsscale.scaling.parallel.pipeline import StageLinks, run_schedule

    layer = _layer(20, 0)
    links = StageLinks([0], 0)

    def forward_step(chunk, i, x):
        assert chunk == 0 and x is None
        return (torch.tanh(layer(_micro_input_fp32(i))) ** 2).mean() / 3

    ticks = iter(range(100))
    losses, busy = run_schedule(forward_step, 3, links, (MB, WIDTH), clock=lambda: float(next(ticks)))
    assert busy == 6.0 and next(ticks) == 12
    layers, ref = _reference(20, 1, 3)
    assert [float(x) for x in losses] == pytest.approx(ref, rel=1e-6)
    torch.testing.assert_close(layer.weight.grad.double(), layers[0].weight.grad, rtol=1e-5, atol=1e-7)
    layer.zero_grad()
    assert run_schedule(forward_step, 3, links, (MB, WIDTH))[1] == 0.0




# --- grouped pipeline p2p ------------------------------------------------------------------------
def _p2p_worker(rank, world):
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    seen = {"grouped": 0, "loose": 0, "inside": False}
    real_batch = dist.batch_isend_irecv

    def batch(ops):
        seen["grouped"] += 1
        seen["inside"] = True
        try:
            return real_batch(ops)
        finally:
            seen["inside"] = False

    def spy(op):
        def call(*a, **k):
            seen["loose"] += not seen["inside"]
            return op(*a, **k)
        return call

    dist.batch_isend_irecv = batch
    for name in ("isend", "irecv"):
        wrapped = spy(getattr(c10d, name))
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)
    result = _stage_worker(rank, world)
    return {"grouped": seen["grouped"], "loose": seen["loose"], "loss": result["loss"]}


def test_pipeline_exchanges_are_grouped_batch_isend_irecv():
    results = run_distributed(_p2p_worker, 3)
    assert all(r["loose"] == 0 and r["grouped"] > 0 for r in results), results
    assert np.isfinite(results[-1]["loss"])
