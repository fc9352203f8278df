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
    assert [A.in_flight(lay, s) for s in range(4)] == [2, 2, 2, 1]
    assert [A.in_flight(Layout(pp=3, micro_batch=1, global_batch=8), s) for s in range(3)] == [3, 2, 1]
    assert A._tokens(50, 4, True) == 52 and A._tokens(52, 4, True) == 52 and A._tokens(50, 4, False) == 50


def test_bytes_per_param_by_scheme():
    assert A.bytes_per_param("bf16", "rsscale", 2) == {"params": 4, "grads": 8, "optimizer": 4, "masks": 6}
    assert A.bytes_per_param("fp32", "megatron", 4) == {"params": 4, "grads": 4, "optimizer": 2, "masks": 0}
    assert A.bytes_per_param("bf16", "megatron", 3) == {"params": 2, "grads": 4, "optimizer": 4, "masks": 0}


def test_plan_rejects_unknown_precision_and_scheme():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, not 'fp8'"):
        A.Plan(Layout(), precision="fp8")
    with pytest.raises(ValueError, match="scheme must be one of rsscale, megatron, not 'deepspeed'"):
        A.Plan(Layout(), scheme="deepspeed")
    assert A.block_param_split(4, 8, 2, qkv_bias=False) == (2 * (64 + 64 + 8), 2 * 24)
    assert A.block_param_split(4, 8, 1) == (64 + 64 + 12 + 8, 24)
