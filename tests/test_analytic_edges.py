"""Analytic-model helpers at their edges, by hand: ring collective volume, 1F1B in-flight
micro-batches, SP token padding, matmul saturation, bytes per parameter, plan validation."""

import pytest

from rsscale.benchmarks.prediction import analytic as A
from rsscale.scaling.spec.layout import Layout


def test_ring_volume_and_saturation():
    """Bytes each rank sends at 1 B/s: all-reduce 2 (n-1)/n of the tensor, all-gather and
    reduce-scatter n-1 shards, a send its message; nothing in a group of one."""
    from rsscale.benchmarks.prediction import timemodel as T

    hw = A.Hardware(bandwidth=1.0)
    assert T.collective_s(T.datasheet_calibration(hw), "all_reduce", 100.0, 1) == 0.0
    assert T.ring_s(hw, "all_reduce", 100.0, 2, 2) == 100.0  # 2 * (n - 1) / n = 1
    assert T.ring_s(hw, "all_reduce", 100.0, 4, 4) == 150.0
    assert T.ring_s(hw, "all_gather", 100.0, 4, 4) == T.ring_s(hw, "reduce_scatter", 100.0, 4, 4) == 300.0
    assert T.ring_s(hw, "send_recv", 100.0, 2, 2) == 100.0
    assert T.saturation(100, 100) == 0.5 and T.saturation(300, 100) == 0.75 and T.saturation(0, 100) == 0.0


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
    """The step time is the time model's at the datasheet rates of `hw` (or a calibration's);
    images/s = global batch / step time; MFU = model FLOPs (no recompute) / (step time x peak x
    devices); a single device sends nothing."""
    from rsscale.benchmarks.prediction import timemodel as T
    from rsscale.scaling.spec.config import get_preset, mae_step_flops

    cfg, hw = get_preset("tiny"), A.Hardware()
    for lay, recompute in ((Layout(pp=2, micro_batch=2, global_batch=8), "full"), (Layout(micro_batch=4, global_batch=8), "none"),
                           (Layout(tp=2, micro_batch=4, global_batch=8), "selective")):
        plan = A.Plan(lay, recompute=recompute)
        est = A.estimate(cfg, plan, hw)
        assert est.time == T.predict(cfg, plan, T.datasheet_calibration(hw)) and est.step_time_s == est.time["step_s"]
        assert est.images_per_s == pytest.approx(8 / est.step_time_s, rel=1e-12)
        assert est.mfu == pytest.approx(8 * mae_step_flops(cfg, False) / (est.step_time_s * hw.peak_flops * lay.world_size), rel=1e-12)
        assert est.step_flops == pytest.approx(8 * mae_step_flops(cfg, recompute), rel=1e-12)
    slow = A.estimate(cfg, A.Plan(Layout(micro_batch=4, global_batch=8)), hw, {**T.datasheet_calibration(hw), "layernorm": {"bytes_per_s": 1e6}})
    alone = A.estimate(cfg, A.Plan(Layout(micro_batch=4, global_batch=8)), hw)
    assert slow.step_time_s > alone.step_time_s  # a calibration given is the one used
    assert all(alone.time[k] == 0.0 for k in ("tp_comm_s", "pp_comm_s", "dp_comm_s", "sync_s", "bubble_s"))  # one device: no traffic
