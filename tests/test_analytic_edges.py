"""Analytic-model helpers at their edges, by hand: ring all-reduce volume, 1F1B in-flight
micro-batches, SP token padding, matmul saturation, bytes per parameter, plan validation."""

import pytest

from rsscale.benchmarks import analytic as A
from rsscale.scaling.layout import Layout


def test_ring_volume_and_saturation():
    assert A._ring(100.0, 1) == 0.0
    assert A._ring(100.0, 2) == 100.0  # 2 * (n - 1) / n = 1
    assert A._ring(100.0, 4) == 150.0
    hw = A.Hardware(half_rows=100)
    assert A.saturation(100, hw) == 0.5 and A.saturation(300, hw) == 0.75 and A.saturation(0, hw) == 0.0


def test_in_flight_and_sp_tokens():
    lay = Layout(pp=4, micro_batch=1, global_batch=2)  # 2 micro-batches
    assert [len(A.in_flight(lay, s)) for s in range(4)] == [2, 2, 2, 1]
    assert [len(A.in_flight(Layout(pp=3, micro_batch=1, global_batch=8), s)) for s in range(3)] == [3, 2, 1]
    assert A._tokens(50, 4, True) == 52 and A._tokens(52, 4, True) == 52 and A._tokens(50, 4, False) == 50


def test_bytes_per_param_by_precision():
    assert A.bytes_per_param("bf16", 2) == {"params": 2, "grads": 4, "optimizer": 6}
    assert A.bytes_per_param("fp32", 4) == {"params": 4, "grads": 4, "optimizer": 2}
    assert A.bytes_per_param("bf16", 3) == {"params": 2, "grads": 4, "optimizer": 4}


def test_plan_rejects_unknown_precision_and_scheme():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, not 'fp8'"):
        A.Plan(Layout(), precision="fp8")
    with pytest.raises(ValueError, match="scheme must be one of rsscale, megatron, not 'deepspeed'"):
        A.Plan(Layout(), scheme="deepspeed")
    assert A.block_param_split(4, 8, 2, qkv_bias=False) == (2 * (64 + 64 + 8), 2 * 24)
    assert A.block_param_split(4, 8, 1) == (64 + 64 + 12 + 8, 24)


def test_estimate_derived_rates_by_definition():
    """images/s = global batch / step time; MFU = model FLOPs (no recompute) / (step time x peak x
    devices); a single stage sends nothing between stages."""
    from rsscale.scaling.config import get_preset, mae_step_flops

    cfg, hw = get_preset("tiny"), A.Hardware()
    for lay, recompute in ((Layout(pp=2, micro_batch=2, global_batch=8), "full"), (Layout(micro_batch=4, global_batch=8), "none"),
                           (Layout(tp=2, micro_batch=4, global_batch=8), "selective")):
        est = A.estimate(cfg, A.Plan(lay, recompute=recompute), hw)
        assert est.step_time_s == pytest.approx(est.compute_s + est.comm_s, rel=1e-12)
        assert est.images_per_s == pytest.approx(8 / est.step_time_s, rel=1e-12)
        assert est.mfu == pytest.approx(8 * mae_step_flops(cfg, False) / (est.step_time_s * hw.peak_flops * lay.world_size), rel=1e-12)
        assert est.step_flops == pytest.approx(8 * mae_step_flops(cfg, recompute), rel=1e-12)
    assert A.estimate(cfg, A.Plan(Layout(micro_batch=4, global_batch=8))).comm_s == 0.0  # one device: no traffic
    parts = A.stage_forward_flops(cfg, A.Plan(Layout(pp=2, micro_batch=1, global_batch=2)), 1)
    assert set(parts) == {"encoder", "decoder"} and set(A.stage_forward_flops(
        cfg, A.Plan(Layout(pp=2, micro_batch=1, global_batch=2)), 0)) == {"encoder"}


def test_stage_forward_flops_add_up_to_the_model():
    from rsscale.scaling.config import get_preset, mae_forward_flops

    cfg = get_preset("tiny")
    plan = A.Plan(Layout(pp=2, micro_batch=1, global_batch=2))
    total = sum(f for s in range(2) for f, _ in A.stage_forward_flops(cfg, plan, s).values())
    assert total == pytest.approx(sum(mae_forward_flops(cfg).values()), rel=1e-12)
