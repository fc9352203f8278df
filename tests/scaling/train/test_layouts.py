"""Every parallel layout trains exactly like one process; checkpoints cross layouts; bad layouts
fail up front. The reference is a single-process (TP=PP=DP=1) run in this process; the layouts
run in two spawned gloo groups (2 and 4 processes), several layouts per group to save start-up.

Per layout: the losses of 3 optimizer steps on the same global batches and seed, and the full
(TP=1-named) weights after them, must equal the reference to 1e-5 (float32)."""

from __future__ import annotations

import time

import pytest
import torch
from builders import tiny_run
from distributed import run_distributed

from rsscale.scaling.spec.config import get_preset

STEPS, TOTAL = 3, 5  # steps compared; the LR schedule runs over TOTAL (resumes continue to it)
MB, GB = 2, 8
TOL = 1e-5


# Adam turns pure rounding noise into lr-sized steps where the true gradient is exactly zero
# (the attention key bias: softmax ignores it); eps 1e-6 keeps such steps far below TOL while
# real gradient differences (>= 1e-6 relative) would still show.
EPS = 1e-6


def _config(out, tp=1, pp=1, dp=1, sp=False, zero=False, bucket_mb=25.0, fsdp=False, defer_fsdp_sync=False, **train):
    """The test run's TrainConfig; `train` may hold Compute's fields (precision, recompute, compile...) and TrainConfig's."""
    import dataclasses

    from rsscale.scaling.spec.run import Compute

    compute = {f.name: train.pop(f.name) for f in dataclasses.fields(Compute) if f.name in train}
    return tiny_run(out, layout=dict(tp=tp, pp=pp, dp=dp, sp=sp, micro_batch=MB, global_batch=GB), optim={"eps": EPS}, compute=compute,
                    data_parallel=dict(distributed_optimizer=zero, bucket_mb=bucket_mb, fsdp=fsdp, defer_fsdp_sync=defer_fsdp_sync),
                    steps=TOTAL, **train)


def test_invalid_layout_fails_before_any_process_group():
    """The trainer rejects a layout that does not fit the world before touching torch.distributed
    (in a fresh process: this one may already hold a group from other tests)."""
    import os
    import subprocess
    import sys

    code = """
import torch.distributed as dist
from rsscale.scaling.spec.layout import Layout
from rsscale.scaling.spec.run import Compute, DataParallel, OptimConfig, Recording
from rsscale.scaling.train.pretrain import Trainer, TrainConfig
try:
    Trainer.build(TrainConfig(model="tiny", parallel=Layout(tp=2, pp=2), data="random", recording=Recording(record=False)))
except ValueError as e:
    print("ValueError:", e)
print("group created:", dist.is_initialized())
"""
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "world size 2 must equal" in out and "group created: False" in out, out


# ---------------------------------------------------------------------------------------------
# Layouts vs the single-process reference
# ---------------------------------------------------------------------------------------------
def _run_layouts(rank, world, specs, root, make_config=None):
    """Worker: for each layout spec, train (optionally from a checkpoint), return metrics + weights.
    `make_config(out, **layout)` builds each TrainConfig (default: this module's `_config`)."""
    from rsscale.scaling.train.pretrain import Trainer

    results = []
    for spec in specs:
        t0 = time.perf_counter()
        trainer = Trainer.build((make_config or _config)(f"{root}/{spec['name']}", **spec["layout"]))
        if "load" in spec:
            trainer.load(spec["load"])
        losses = [trainer.train_step()["loss"] for _ in range(spec.get("steps", STEPS))]
        if spec.get("save"):
            trainer.save()
        results.append({"name": spec["name"], "losses": losses, "weights": {k: v.numpy() for k, v in trainer.full_state_dict().items()},  # numpy: pickled by value
                        "state_bytes": trainer.optimizer.state_bytes(), "wall_s": time.perf_counter() - t0})
    return results


def _merge(per_rank):
    """Per layout: losses (same on all ranks), weights of all stages merged, per-rank state bytes."""
    merged = {}
    for rank_results in per_rank:
        for r in rank_results:
            m = merged.setdefault(r["name"], {"losses": r["losses"], "weights": {}, "state_bytes": [], "wall_s": r["wall_s"]})
            assert r["losses"] == pytest.approx(m["losses"], abs=1e-12), f"{r['name']}: ranks disagree on the loss"
            m["weights"].update({k: torch.from_numpy(v) for k, v in r["weights"].items()})
            m["state_bytes"].append(r["state_bytes"])
    return merged


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from rsscale.scaling.train.pretrain import Trainer

    root = tmp_path_factory.mktemp("layouts")
    t0 = time.perf_counter()
    ref = Trainer.build(_config(root / "ref"))
    losses = [ref.train_step()["loss"] for _ in range(STEPS)]
    weights = ref.full_state_dict()
    ref_ckpt = ref.save()
    losses += [ref.train_step()["loss"] for _ in range(TOTAL - STEPS)]
    reference = {"losses": losses, "weights": weights, "ckpt": ref_ckpt, "state_bytes": ref.optimizer.state_bytes(), "wall_s": time.perf_counter() - t0}

    two = [dict(name="tp2", layout=dict(tp=2)), dict(name="tp2sp", layout=dict(tp=2, sp=True)), dict(name="pp2", layout=dict(pp=2)),
           dict(name="dp2", layout=dict(dp=2)), dict(name="dp2zero", layout=dict(dp=2, zero=True))]
    four = [dict(name="tp2pp2", layout=dict(tp=2, pp=2), save=True), dict(name="tp2sp_pp2", layout=dict(tp=2, pp=2, sp=True)),
            dict(name="pp2dp2", layout=dict(pp=2, dp=2)), dict(name="pp2dp2zero", layout=dict(pp=2, dp=2, zero=True, bucket_mb=0.004), save=True),  # buckets of ~1000 elements
            dict(name="tp2pp2_from_ref", layout=dict(tp=2, pp=2), load=ref_ckpt, steps=TOTAL - STEPS)]
    merged = {}
    for world, specs in ((2, two), (4, four)):
        t = time.perf_counter()
        merged.update(_merge(run_distributed(_run_layouts, world, specs, str(root), timeout=300)))
        print(f"\n[layouts] group of {world} processes: {time.perf_counter() - t:.1f} s wall")
    for name, m in merged.items():
        print(f"[layouts] {name}: {m['wall_s']:.1f} s, losses {['%.6f' % v for v in m['losses']]}")
    return reference, merged, root


def _continued_from(checkpoints, out) -> list[float]:
    """The remaining steps' losses of a one-process trainer loaded from another layout's checkpoints
    (which must hold step STEPS)."""
    from rsscale.scaling.train.pretrain import Trainer

    trainer = Trainer.build(_config(out))
    trainer.load(str(checkpoints))
    assert trainer.step == STEPS
    return [trainer.train_step()["loss"] for _ in range(TOTAL - STEPS)]


def _assert_same_weights(got, want):
    assert set(got) == set(want)
    worst, key = max(((got[k] - want[k]).abs().max().item(), k) for k in want)
    assert worst < TOL, f"max weight difference {worst:.2e} (in {key})"


@pytest.mark.parametrize("name", ["tp2", "tp2sp", "pp2", "dp2", "tp2pp2", "tp2sp_pp2", "pp2dp2"])
def test_layout_matches_single_process(runs, name):
    reference, merged, _ = runs
    got = merged[name]
    assert got["losses"] == pytest.approx(reference["losses"][:STEPS], abs=TOL)
    assert reference["losses"][STEPS - 1] < reference["losses"][0]  # it trains at all
    _assert_same_weights(got["weights"], reference["weights"])


@pytest.mark.parametrize("name, dp", [("dp2zero", 2), ("pp2dp2zero", 2)])
def test_distributed_optimizer_same_weights_and_sharded_state(runs, name, dp):
    reference, merged, _ = runs
    got, replicated = merged[name], merged[name.replace("zero", "")]
    assert got["losses"] == pytest.approx(reference["losses"][:STEPS], abs=TOL)
    _assert_same_weights(got["weights"], reference["weights"])
    for zero_bytes, full_bytes in zip(got["state_bytes"], replicated["state_bytes"]):
        assert zero_bytes / full_bytes == pytest.approx(1 / dp, rel=0.01)


def test_checkpoint_from_tp2pp2_loads_into_single_process(runs):
    """TP=2,PP=2 -> TP=1,PP=1: full weights equal, and training continues like the reference."""
    from rsscale.scaling.train.checkpoint import load_full_state_dict

    reference, merged, root = runs
    cfg, full = load_full_state_dict(str(root / "tp2pp2"))
    assert cfg == get_preset("tiny")
    trainable = {k: v for k, v in full.items() if k in reference["weights"]}
    _assert_same_weights(trainable, reference["weights"])
    assert _continued_from(root / "tp2pp2", root / "back") == pytest.approx(reference["losses"][STEPS:], abs=TOL)


def test_checkpoint_from_zero1_small_buckets_loads_into_single_process(runs):
    """PP=2 x DP=2 ZeRO-1 with buckets smaller than a parameter (moments saved as flat pieces) ->
    one process: the continued losses equal the reference's."""

    reference, _, root = runs
    assert _continued_from(root / "pp2dp2zero", root / "back_from_zero") == pytest.approx(reference["losses"][STEPS:], abs=TOL)


def test_checkpoint_from_single_process_loads_into_tp2pp2(runs):
    """TP=1 -> TP=2,PP=2 with optimizer moments: the continued losses equal the reference's."""
    reference, merged, _ = runs
    assert merged["tp2pp2_from_ref"]["losses"] == pytest.approx(reference["losses"][STEPS:], abs=TOL)
