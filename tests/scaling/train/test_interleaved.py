"""Interleaved 1F1B (--vpp) trains exactly like one process; checkpoints cross V; bad V fails up front.

The model is `tiny` with 12 encoder blocks (so P*V = 4 and 6 divide it). The reference is one
process in this process; PP=2 with V=2 and V=3 run in a spawned group of 2, PP=2 x TP=2 with V=2
in a group of 4. Per layout: the losses of 3 optimizer steps and the full weights after them equal
the reference to 1e-5 (float32). Checkpoints: V=2's (saved at step 3) continues under one process
and under PP=2 V=1, and the reference's continues under PP=2 V=3, each with the reference's losses."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from builders import tiny_run
from distributed import run_distributed
from test_layouts import _merge, _run_layouts
from test_layouts import test_layout_matches_single_process as _matches_single_process

from rsscale.scaling.parallel.pipeline import bubble_fraction, check_schedule, compute_order, in_flight_chunks, timetable
from rsscale.scaling.spec.layout import Layout, stage_chunk_ranges, validate_layout

TICK = 0.1  # seconds a toy chunk's forward sleeps (backward: 2 ticks)

STEPS, TOTAL = 3, 5
MB, GB = 2, 8  # 4 micro-batches per step: a multiple of PP=2
TOL, EPS = 1e-5, 1e-6  # as test_layouts.py (eps: Adam on exactly-zero gradients)
MODEL = "tiny12"


def _register_model():
    """`tiny` with 12 encoder blocks, registered as a preset in this process (and each worker)."""
    from rsscale.scaling.spec.config import PRESETS, get_preset

    PRESETS.setdefault(MODEL, get_preset("tiny").replace(name=MODEL, depth=12))
    return PRESETS[MODEL]


def _config(out, tp=1, pp=1, vpp=1):
    _register_model()  # also in the spawned workers, which build their trainers through here
    return tiny_run(out, model=MODEL, layout=dict(tp=tp, pp=pp, micro_batch=MB, global_batch=GB, vpp=vpp), optim={"eps": EPS}, steps=TOTAL)


# ---------------------------------------------------------------------------------------------
# The schedule and the layout rules (no processes)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("P, V, M", [(2, 1, 4), (4, 1, 3), (2, 2, 4), (2, 3, 2), (4, 2, 8), (3, 4, 6), (8, 3, 16)])
def test_timetable_reaches_the_theoretical_bubble(P, V, M):
    """With a backward = 2 forwards, every rank is busy 3*V*M ticks of a step lasting
    3*V*M*(1 + (P-1)/(V*M)) ticks: the (P-1)/(V*M) bubble of Narayanan et al. 2021."""
    table = timetable(P, V, M)
    span = 1 + max(end for t in table for end in t)
    assert span == 3 * V * M + 3 * (P - 1)
    assert (span - 3 * V * M) / (3 * V * M) == pytest.approx(bubble_fraction(P, V, M))
    for r in range(P):  # every forward and backward of every chunk and micro-batch, once, in the rank's order
        order = compute_order(P, V, M, r)
        assert sorted(order) == sorted((k, c, m) for k in "FB" for c in range(V) for m in range(M))
        assert [a for _, (_, a) in sorted(table[r].items())] == order


def test_megatron_order_and_in_flight_by_hand():
    """P=2, V=2, M=4, rank 0 (Megatron's interleaved order): warmup 2(P-1) + (V-1)P = 4 forwards,
    chunk 0 for micro-batches 0,1, then chunk 1 for 0,1; backwards from the last chunk down."""
    order = [f"{k}{c}.{m}" for k, c, m in compute_order(2, 2, 4, 0)]
    assert order == ["F0.0", "F0.1", "F1.0", "F1.1", "F0.2", "B1.0", "F0.3", "B1.1", "F1.2", "B0.0", "F1.3", "B0.1",
                     "B1.2", "B1.3", "B0.2", "B0.3"]
    assert in_flight_chunks(2, 2, 4, 0) == [0, 0, 0, 1, 1]  # 2(P-1) + (V-1)P + 1 = 5 chunk activations
    assert len(in_flight_chunks(4, 1, 8, 0)) == 4 and len(in_flight_chunks(4, 1, 2, 1)) == 2  # 1F1B: min(P - r, M)
    assert in_flight_chunks(2, 2, 4, 1, weight=lambda c: 10.0 if c == 1 else 1.0) == [0, 0, 1]  # the decoder chunk: one at a time


def test_chunks_are_interleaved_over_ranks():
    assert stage_chunk_ranges(12, 2, 2, 0) == [(0, 3), (6, 9)] and stage_chunk_ranges(12, 2, 2, 1) == [(3, 6), (9, 12)]
    assert stage_chunk_ranges(12, 2, 3, 1) == [(2, 4), (6, 8), (10, 12)]
    assert stage_chunk_ranges(12, 5, 1, 0) == [(0, 3)]  # V=1: the plain split (earlier stages take the remainder)


@pytest.mark.parametrize("layout, message", [
    (Layout(pp=2, vpp=2, micro_batch=2, global_batch=6), "--vpp 2: the micro-batches per step (global_batch / (micro_batch*dp) = 3) must be a multiple of --pp 2"),
    (Layout(pp=2, vpp=4, micro_batch=2, global_batch=8), "--vpp 4: the encoder depth 12 must be a multiple of pp*vpp = 2*4 = 8"),
    (Layout(pp=1, vpp=2), "--vpp 2 (interleaved 1F1B) needs --pp >= 2"),
])
def test_bad_interleaving_is_explained(layout, message):
    cfg = _register_model()
    assert any(message in p for p in validate_layout(layout, cfg, layout.world_size))


def test_the_schedule_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="--vpp 2 .* needs --pp >= 2 and micro-batches per step a multiple of --pp"):
        check_schedule(2, 2, 3)


def test_bad_micro_batch_count_fails_before_launching(tmp_path):
    """`rsscale pretrain --nproc 2 --pp 2 --vpp 2` with 3 micro-batches exits 2 naming --vpp, before torchrun."""
    cmd = [sys.executable, "-m", "rsscale.scaling.runtime.cli", "pretrain", "--nproc", "2", "--pp", "2", "--vpp", "2", "--micro-batch", "2",
           "--global-batch", "6", "--data", "random", "--no-record", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--vpp 2: the micro-batches per step" in proc.stderr and "torchrun" not in proc.stderr.lower()


# ---------------------------------------------------------------------------------------------
# Training equal to one process
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from rsscale.scaling.train.pretrain import Trainer

    _register_model()
    root = tmp_path_factory.mktemp("interleaved")
    ref = Trainer.build(_config(root / "ref"))
    losses = [ref.train_step()["loss"] for _ in range(STEPS)]
    weights = ref.full_state_dict()
    ref_ckpt = ref.save()
    losses += [ref.train_step()["loss"] for _ in range(TOTAL - STEPS)]
    v2 = str(root / "pp2v2")
    two = [dict(name="pp2v2", layout=dict(pp=2, vpp=2), save=True), dict(name="pp2v3", layout=dict(pp=2, vpp=3)),
           dict(name="pp2v1_from_v2", layout=dict(pp=2), load=v2, steps=TOTAL - STEPS),
           dict(name="pp2v3_from_ref", layout=dict(pp=2, vpp=3), load=ref_ckpt, steps=TOTAL - STEPS)]
    merged = _merge(run_distributed(_run_layouts, 2, two, str(root), _config, timeout=300))
    return {"losses": losses, "weights": weights}, merged, root


@pytest.mark.parametrize("name", ["pp2v2", "pp2v3"])
def test_interleaved_matches_single_process(runs, name):
    _matches_single_process(runs, name)  # losses of 3 steps and weights after them, to 1e-5


@pytest.mark.slow  # a 4-process group of its own; its parts run fast: TP2 x PP2 (test_layouts.py), PP2 x V2 above
def test_tp2_with_interleaved_pp2_matches_single_process(runs):
    reference, merged, root = runs
    four = [dict(name="tp2pp2v2", layout=dict(tp=2, pp=2, vpp=2))]
    merged = {**merged, **_merge(run_distributed(_run_layouts, 4, four, str(root), _config, timeout=300))}
    _matches_single_process((reference, merged, root), "tp2pp2v2")


def test_checkpoints_cross_virtual_stages(runs):
    """V=2 -> one process and -> PP=2 V=1; one process -> PP=2 V=3: continued losses equal the reference's."""
    from rsscale.scaling.train.pretrain import Trainer

    reference, merged, root = runs
    assert merged["pp2v1_from_v2"]["losses"] == pytest.approx(reference["losses"][STEPS:], abs=TOL)
    assert merged["pp2v3_from_ref"]["losses"] == pytest.approx(reference["losses"][STEPS:], abs=TOL)
    trainer = Trainer.build(_config(root / "back"))
    trainer.load(str(root / "pp2v2"))
    assert trainer.step == STEPS
    assert [trainer.train_step()["loss"] for _ in range(TOTAL - STEPS)] == pytest.approx(reference["losses"][STEPS:], abs=TOL)


def test_analytic_models_the_interleaved_bubble_traffic_and_memory():
    """g12x4 on PP=4 with 8 micro-batches: V=3 keeps each rank's blocks but runs the other stages'
    fill and drain in chunks a third as long (bubble / 3), sends 3x the pipeline bytes, and holds
    more activations on rank 0 (2(P-1) + (V-1)P + 1 = 15 chunks of 1 block vs P = 4 micro-batches
    of 3 blocks)."""
    from rsscale.benchmarks.prediction import analytic as A
    from rsscale.benchmarks.prediction import timemodel as T
    from rsscale.scaling.spec.config import get_preset

    cfg, hw = get_preset("g12x4"), A.Hardware()
    plans = {v: A.Plan(Layout(tp=1, pp=4, micro_batch=1, global_batch=8, vpp=v), precision="bf16") for v in (1, 3)}
    est = {v: A.estimate(cfg, p, hw).time for v, p in plans.items()}
    stages = {v: [T.stage_micro_s(cfg, p, T.datasheet_calibration(hw), s) for s in range(4)] for v, p in plans.items()}
    assert [s["compute"] for s in stages[3]] == pytest.approx([s["compute"] for s in stages[1]], rel=1e-12)
    assert est[3]["pp_comm_s"] == pytest.approx(3 * est[1]["pp_comm_s"]) and est[1]["tp_comm_s"] == 0  # TP=DP=1: only p2p, V per micro-batch
    for v in (1, 3):  # M x the slowest stage (the last: the decoder) + the others' one micro-batch each, / V
        per = [s["compute"] + s["pp_comm"] for s in stages[v]]
        assert max(per) == per[3] and est[v]["compute_s"] == pytest.approx(8 * stages[v][3]["compute"], rel=1e-12)
        assert est[v]["bubble_s"] == pytest.approx(sum(per[:3]) / v, rel=1e-12)
    assert len(A.in_flight(plans[3].layout, 0)) == 15 and len(A.in_flight(plans[1].layout, 0)) == 4
    mid = [A.stage_activation_bytes(cfg, plans[3], v) for v in (1, 5, 9)]  # rank 1's chunks: blocks only, same size
    assert mid[0] == mid[1] == mid[2]
    rank1 = {v: A.memory_per_stage(cfg, p)[1]["activations"] for v, p in plans.items()}
    assert rank1[3] == pytest.approx(len(A.in_flight(plans[3].layout, 1)) * mid[0])  # 13 chunks of 1 block
    assert rank1[1] == pytest.approx(3 * A.stage_activation_bytes(cfg, plans[1], 1))  # vs 3 micro-batches of 3 blocks
    assert 1 < rank1[3] / rank1[1] < 13 / 9 * 1.1  # about 13 / 9: each chunk also keeps its output


class _Busy(torch.autograd.Function):
    """A balanced toy chunk: sleeps one tick in forward and two in backward (no CPU needed, so the
    timing holds on a loaded machine)."""

    @staticmethod
    def forward(ctx, x):
        time.sleep(TICK)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        time.sleep(2 * TICK)
        return g * 2


def _bubble_worker(rank, world, cases):
    from rsscale.scaling.parallel.pipeline import StageLinks, perf_clock, run_schedule

    links, out = StageLinks(list(range(world)), rank), []
    for V, M in [cases[0]] + cases:  # the first run (untimed) also connects the pair
        def step(chunk, i, x):
            y = _Busy.apply(torch.ones(4, requires_grad=True) if x is None else x)
            return y.sum() / M if rank == world - 1 and chunk == V - 1 else y

        t0 = time.perf_counter()
        _, busy = run_schedule(step, M, links, (4,), chunks=V, clock=perf_clock())
        out.append((time.perf_counter() - t0 - busy) / busy)
    return out[1:]


@pytest.mark.slow  # a timing test: it needs idle cores (each p2p message's latency adds to the bubble)
def test_measured_bubble_of_balanced_stages_follows_the_theory():
    """bench's measured bubble ((wall - own compute) / own compute) on 2 balanced sleeping stages
    is the theory (P-1)/(V*M) plus the messages' latency: 25 % for V=1 and 12.5 % for V=2 at M=4.
    (On this 2-core machine at load 30-60 it measured 30 % and 31 %: V=2's fill and drain cross
    3 chunk boundaries each way where V=1's cross 1, and each crossing cost ~0.1 s there.)"""
    cases = [(1, 4), (2, 4)]
    per_rank = run_distributed(_bubble_worker, 2, cases)
    measured = [sum(r[k] for r in per_rank) / len(per_rank) for k in range(len(cases))]
    for (V, M), got in zip(cases, measured):
        assert bubble_fraction(2, V, M) - 0.02 < got < bubble_fraction(2, V, M) + 0.1, (V, measured)
    assert measured[1] < measured[0]
