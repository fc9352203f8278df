"""--fsdp (FSDP2, ZeRO-3 over DP) trains exactly like one process, alone and with TP and PP, and its
checkpoints cross layouts both ways. Same protocol as tests/scaling/train/test_layouts.py: 3 optimizer steps on the
same global batches and seed; losses and full (TP=1-named) weights equal the single-process run to
1e-5 (float32); a checkpoint saved under FSDP resumes under TP=2 and under one process."""

from __future__ import annotations

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
    """4 processes: FSDP=2 x PP=2, and FSDP=2 x TP=2 resumed from the single-process checkpoint."""
    return _four(reference, [dict(name="fsdp2_pp2", layout=dict(pp=2, dp=2, fsdp=True)),
                             dict(name="fsdp2_tp2_from_ref", layout=dict(tp=2, dp=2, fsdp=True), load=reference[0]["ckpt"], steps=TOTAL - STEPS)])


def test_fsdp2_tp2_matches_single_process(reference, four):
    ref, _ = reference
    assert four["fsdp2_tp2"]["losses"] == pytest.approx(ref["losses"][:STEPS], abs=TOL)
    _assert_same_weights(four["fsdp2_tp2"]["weights"], ref["weights"])


@pytest.mark.slow
def test_fsdp2_pp2_matches_and_fsdp_tp2_resumes_a_single_process_checkpoint(reference, four_more):
    ref, _ = reference
    assert four_more["fsdp2_pp2"]["losses"] == pytest.approx(ref["losses"][:STEPS], abs=TOL)
    _assert_same_weights(four_more["fsdp2_pp2"]["weights"], ref["weights"])
    assert four_more["fsdp2_tp2_from_ref"]["losses"] == pytest.approx(ref["losses"][STEPS:], abs=TOL)


@pytest.mark.slow
def test_fsdp_with_compile_and_selective_recompute_matches_single_process(reference):
    """DP=2 --fsdp --compile (aot_eager) --recompute selective: the features compose (about 2.5 min)."""
    ref, root = reference
    spec = dict(name="fsdp_compiled", layout=dict(dp=2, fsdp=True, compile=True, compile_backend="aot_eager", recompute="selective"))
    got = _merge(run_distributed(_run_layouts, 2, [spec], str(root), timeout=900))["fsdp_compiled"]
    assert got["losses"] == pytest.approx(ref["losses"][:STEPS], abs=TOL)
    _assert_same_weights(got["weights"], ref["weights"])


def test_fsdp_refuses_zero1_and_fp16():
    from rsscale.scaling.spec.run import Compute, DataParallel
    from rsscale.scaling.train.pretrain import TrainConfig

    with pytest.raises(ValueError, match="--fsdp already shards the optimizer state"):
        TrainConfig(data_parallel=DataParallel(fsdp=True, distributed_optimizer=True))
    with pytest.raises(ValueError, match="--fsdp runs fp32 or bf16"):
        TrainConfig(data_parallel=DataParallel(fsdp=True), compute=Compute(precision="fp16"))
