"""--fsdp (FSDP2, ZeRO-3 over DP) trains exactly like one process, alone and with TP and PP, and its
checkpoints cross layouts both ways. Same protocol as tests/scaling/train/test_layouts.py: 3 optimizer steps on the
same global batches and seed; losses and full (TP=1-named) weights equal the single-process run to
1e-5 (float32); a checkpoint saved under FSDP resumes under TP=2 and under one process."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from distributed import run_distributed
from test_layouts import STEPS, TOL, TOTAL, _assert_same_weights, _config, _merge, _run_layouts


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from rsscale.scaling.train.pretrain import Trainer

    root = tmp_path_factory.mktemp("fsdp")
    ref = Trainer.build(_config(root / "ref"))
    losses = [ref.train_step()["loss"] for _ in range(STEPS)]
    weights, ckpt = ref.full_state_dict(), ref.save()
    losses += [ref.train_step()["loss"] for _ in range(TOTAL - STEPS)]
    return {"losses": losses, "weights": weights, "ckpt": ckpt, "state_bytes": ref.optimizer.state_bytes()}, root


@pytest.fixture(scope="module")
def two(reference):
    """2 processes: FSDP over DP=2 (saves at step 3), then a TP=2 run resumed from that checkpoint."""
    ref, root = reference
    specs = [dict(name="fsdp_dp2", layout=dict(dp=2, fsdp=True), save=True),
             dict(name="tp2_from_fsdp", layout=dict(tp=2), load=str(root / "fsdp_dp2"), steps=TOTAL - STEPS)]
    return _merge(run_distributed(_run_layouts, 2, specs, str(root), timeout=600))


def test_fsdp_dp2_matches_single_process(reference, two):
    ref, _ = reference
    got = two["fsdp_dp2"]
    assert got["losses"] == pytest.approx(ref["losses"][:STEPS], abs=TOL)
    _assert_same_weights(got["weights"], ref["weights"])
    for shard_bytes in got["state_bytes"]:  # each rank holds half of the AdamW moments
        assert shard_bytes == pytest.approx(ref["state_bytes"] / 2, rel=0.01)
    # the memory counter (benchmarks/prediction/count.py, meta device, fake world) counts what the real rank 0 holds
    from rsscale.benchmarks.prediction.analytic import Plan
    from rsscale.benchmarks.prediction.count import count_stage
    from rsscale.scaling.spec.config import get_preset
    from rsscale.scaling.spec.layout import Layout

    assert count_stage(get_preset("tiny"), Plan(Layout(dp=2, micro_batch=2, global_batch=8), fsdp=True), 0).optimizer == got["state_bytes"][0]


def test_fsdp_checkpoint_resumes_under_tp2_and_one_process(reference, two):
    """The FSDP checkpoint holds the trained weights exactly; TP=2 and one process continue from it
    like the reference run continues from its own step 3."""
    from rsscale.scaling.train.checkpoint import load_full_state_dict
    from rsscale.scaling.train.pretrain import Trainer

    ref, root = reference
    _, full = load_full_state_dict(str(root / "fsdp_dp2"))
    trained = two["fsdp_dp2"]["weights"]
    assert all(torch.equal(full[k], trained[k]) for k in trained)
    assert two["tp2_from_fsdp"]["losses"] == pytest.approx(ref["losses"][STEPS:], abs=TOL)
    one = Trainer.build(_config(root / "one_from_fsdp"))
    one.load(str(root / "fsdp_dp2"))
    assert one.step == STEPS
    assert [one.train_step()["loss"] for _ in range(TOTAL - STEPS)] == pytest.approx(ref["losses"][STEPS:], abs=TOL)


def _four(reference, specs):
    ref, root = reference
    return _merge(run_distributed(_run_layouts, 4, specs, str(root), timeout=900))


@pytest.fixture(scope="module")
def four(reference):
    """4 processes: FSDP=2 x TP=2."""
    return _four(reference, [dict(name="fsdp2_tp2", layout=dict(tp=2, dp=2, fsdp=True))])


@pytest.fixture(scope="module")
def four_more(reference):
    """4 processes: FSDP=2 x PP=2 (and with its sync deferred to the last micro-batch), and FSDP=2 x
    TP=2 resumed from the single-process checkpoint."""
    return _four(reference, [dict(name="fsdp2_pp2", layout=dict(pp=2, dp=2, fsdp=True)),
                             dict(name="fsdp2_pp2_deferred", layout=dict(pp=2, dp=2, fsdp=True, defer_fsdp_sync=True)),
                             dict(name="fsdp2_tp2_from_ref", layout=dict(tp=2, dp=2, fsdp=True), load=reference[0]["ckpt"], steps=TOTAL - STEPS)])


def test_fsdp2_tp2_matches_single_process(reference, four):
    ref, _ = reference
    assert four["fsdp2_tp2"]["losses"] == pytest.approx(ref["losses"][:STEPS], abs=TOL)
    _assert_same_weights(four["fsdp2_tp2"]["weights"], ref["weights"])


@pytest.mark.slow
def test_fsdp2_pp2_matches_and_fsdp_tp2_resumes_a_single_process_checkpoint(reference, four_more):
    ref, _ = reference
    for name in ("fsdp2_pp2", "fsdp2_pp2_deferred"):
        assert four_more[name]["losses"] == pytest.approx(ref["losses"][:STEPS], abs=TOL), name
        _assert_same_weights(four_more[name]["weights"], ref["weights"])
    assert four_more["fsdp2_tp2_from_ref"]["losses"] == pytest.approx(ref["losses"][STEPS:], abs=TOL)


@pytest.mark.slow
def test_fsdp_with_compile_and_selective_recompute_matches_single_process(reference):
    """DP=2 --fsdp --compile (aot_eager) --recompute selective: the features compose (about 2.5 min)."""
    ref, root = reference
    spec = dict(name="fsdp_compiled", layout=dict(dp=2, fsdp=True, compile=True, compile_backend="aot_eager", recompute="selective"))
    got = _merge(run_distributed(_run_layouts, 2, [spec], str(root), timeout=900))["fsdp_compiled"]
    assert got["losses"] == pytest.approx(ref["losses"][:STEPS], abs=TOL)
    _assert_same_weights(got["weights"], ref["weights"])


def _reduce_scatters_per_step(rank, world, root):
    """Worker: DP=2 --fsdp over 2 micro-batches, without and with --defer-fsdp-sync: FSDP2's
    reduce-scatter calls per step (counted where it calls torch.distributed), losses, weights."""
    import torch.distributed as dist

    from rsscale.scaling.train.pretrain import Trainer

    calls = []
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        def counted(*args, _call=getattr(dist, name), **kwargs):
            calls.append(1)
            return _call(*args, **kwargs)
        setattr(dist, name, counted)
    out = {}
    for defer in (False, True):
        trainer = Trainer.build(_config(f"{root}/defer_{defer}", dp=2, fsdp=True, defer_fsdp_sync=defer))
        before = len(calls)
        losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
        out[defer] = {"per_step": (len(calls) - before) / STEPS, "losses": losses,
                      "weights": {k: v.numpy() for k, v in trainer.full_state_dict().items()}}
    return out


def test_a_deferred_fsdp_sync_reduce_scatters_once_per_step_and_trains_the_same(reference):
    """--defer-fsdp-sync: the 2 micro-batches' gradients are reduce-scattered once per block per step
    instead of once per micro-batch, and the run still equals one process."""
    ref, root = reference
    ranks = run_distributed(_reduce_scatters_per_step, 2, str(root), timeout=600)
    for out in ranks:
        assert out[False]["per_step"] > 0 and out[True]["per_step"] == out[False]["per_step"] / 2  # M = GB / (MB * DP) = 2
        for defer in (False, True):
            assert out[defer]["losses"] == pytest.approx(ref["losses"][:STEPS], abs=TOL)
    weights = {k: torch.from_numpy(v) for out in ranks for k, v in out[True]["weights"].items()}
    _assert_same_weights(weights, ref["weights"])


def test_a_deferred_sync_is_counted_as_the_whole_stage_unsharded():
    """count.py (FSDP2 on the meta device) and analytic agree exactly on what FSDP holds unsharded:
    with a deferred sync every fp32 weight and gradient of the stage, without it the root's and three
    blocks' worth; with one micro-batch nothing is deferred."""
    from rsscale.benchmarks.prediction.analytic import Plan, fsdp_gathered_bytes, stage_params
    from rsscale.benchmarks.prediction.count import count_stage
    from rsscale.scaling.spec.config import get_preset
    from rsscale.scaling.spec.layout import Layout

    cfg = get_preset("tiny")
    for pp, stage in ((1, 0), (2, 1)):
        layout = Layout(pp=pp, dp=2, micro_batch=2, global_batch=8)
        deferred, plain = (Plan(layout, precision="fp32", fsdp=True, defer_fsdp_sync=d) for d in (True, False))
        n = stage_params(cfg, 1, pp, stage)
        assert count_stage(cfg, deferred, stage).gathered == fsdp_gathered_bytes(cfg, deferred, stage) == 4 * (2 * n["trainable"] + n["frozen"])
        assert count_stage(cfg, plain, stage).gathered == fsdp_gathered_bytes(cfg, plain, stage) < fsdp_gathered_bytes(cfg, deferred, stage)
    one = Plan(Layout(dp=2, micro_batch=4, global_batch=8), precision="fp32", fsdp=True, defer_fsdp_sync=True)
    assert count_stage(cfg, one, 0).gathered == fsdp_gathered_bytes(cfg, dataclasses.replace(one, defer_fsdp_sync=False), 0)


def test_a_deferred_sync_needs_fsdp_and_one_chunk_per_stage():
    from rsscale.scaling.spec.layout import Layout
    from rsscale.scaling.spec.run import DataParallel
    from rsscale.scaling.train.pretrain import TrainConfig

    with pytest.raises(ValueError, match="--defer-fsdp-sync defers FSDP's reduce-scatters: add --fsdp"):
        DataParallel(defer_fsdp_sync=True)
    with pytest.raises(ValueError, match="--defer-fsdp-sync runs with --vpp 1"):
        TrainConfig(parallel=Layout(pp=2, vpp=2), data_parallel=DataParallel(fsdp=True, defer_fsdp_sync=True))


def test_fsdp_refuses_zero1_and_fp16():
    from rsscale.scaling.spec.run import Compute, DataParallel
    from rsscale.scaling.train.pretrain import TrainConfig

    with pytest.raises(ValueError, match="--fsdp already shards the optimizer state"):
        TrainConfig(data_parallel=DataParallel(fsdp=True, distributed_optimizer=True))
    with pytest.raises(ValueError, match="--fsdp runs fp32 or bf16"):
        TrainConfig(data_parallel=DataParallel(fsdp=True), compute=Compute(precision="fp16"))
