"""Calibration fits and the calibrated step-time model (benchmarks/calibrate.py, timemodel.py)."""

import pytest

from rsscale.benchmarks import analytic as A
from rsscale.benchmarks import calibrate as C
from rsscale.benchmarks import timemodel as T
from rsscale.scaling.config import get_preset, mae_step_flops
from rsscale.scaling.layout import Layout


def test_latency_bandwidth_fit_recovers_a_known_line():
    sizes = [2**k for k in range(10, 20)]
    fit = C.fit_latency_bandwidth(sizes, [25e-6 + n / 3e9 for n in sizes])
    assert fit["latency_s"] == pytest.approx(25e-6, rel=1e-6) and fit["bandwidth_bytes_per_s"] == pytest.approx(3e9, rel=1e-6)


def _uniform(flops=1e12, bw=1e30, lat=0.0, net=1e30):
    """A calibration where every GEMM / attention runs at `flops`, elementwise at `bw` bytes/s."""
    coll = {op: {"2": {"latency_s": lat, "bandwidth_bytes_per_s": net}} for op in C.COLLECTIVES}
    return {"gemm": [{"shape": [1, 1, 1], "flops_per_s": flops}], "attention": [{"shape": [1, 1, 1, 1], "flops_per_s": flops}],
            "layernorm": [{"shape": [1, 1], "bytes_per_s": bw}], "collectives": coll}


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_compute_time_adds_up_to_the_step_flops(recompute):
    """With one FLOP rate and free elementwise work, one process's step time is exactly the
    model's matmul FLOPs (scaling.config, an independent count) over that rate."""
    cfg = get_preset("small")
    plan = A.Plan(Layout(micro_batch=4, global_batch=8), precision="fp32", recompute=recompute)
    t = T.predict(cfg, plan, _uniform())
    assert t["step_s"] == pytest.approx(8 * mae_step_flops(cfg, recompute) / 1e12, rel=1e-9)
    assert t["bubble_s"] == 0 and t["dp_comm_s"] == 0 and t["tp_comm_s"] == 0


def test_fsdp_collectives_per_micro_batch():
    """FSDP with one latency and free bandwidth: per micro-batch 2 all-gathers per block, 1 for the
    root unit, and a reduce-scatter per block and for the root: (3 blocks + 2) x micro-batches x latency."""
    cfg = get_preset("small")
    t = T.predict(cfg, A.Plan(Layout(dp=2, micro_batch=2, global_batch=8), precision="fp32", fsdp=True), _uniform(lat=1e-3))
    blocks = cfg.depth + cfg.dec_depth
    assert t["dp_comm_s"] == pytest.approx(2 * (3 * blocks + 2) * 1e-3, rel=1e-9)


def test_pipeline_bubble_and_communication_terms():
    cfg = get_preset("small")
    calib = _uniform(lat=1e-3)
    pp = T.predict(cfg, A.Plan(Layout(pp=2, micro_batch=2, global_batch=8), precision="fp32"), calib)
    rounds, micro = 4 + 1, 4
    assert pp["bubble_s"] == pytest.approx((rounds - micro) / micro * (pp["compute_s"] + pp["pp_comm_s"] + pp["tp_comm_s"]), rel=1e-9)
    assert pp["pp_comm_s"] == pytest.approx(micro * 2 * 1e-3)  # one send/recv each way per micro-batch
    tp = T.predict(cfg, A.Plan(Layout(tp=2, micro_batch=8, global_batch=8), precision="fp32"), calib)
    blocks = cfg.depth + cfg.dec_depth
    assert tp["tp_comm_s"] == pytest.approx(blocks * 4 * 1e-3)  # 2 sublayers x (fwd + bwd all-reduce)
    dp = T.predict(cfg, A.Plan(Layout(dp=2, micro_batch=4, global_batch=8), precision="fp32", distributed_optimizer=True), calib)
    assert dp["dp_comm_s"] == pytest.approx(2e-3)  # gradient all-reduce + ZeRO-1 all-gather


def test_calibrate_stores_and_profile_uses_it(tmp_path, capsys):
    import argparse

    from rsscale.benchmarks import profile

    db = str(tmp_path / "results.db")
    result = C.calibrate(["tiny"], [1], [1, 2], [2], "fp32")
    assert all(g["flops_per_s"] > 0 for g in result["gemm"]) and result["collectives"]["all_reduce"]["2"]["bandwidth_bytes_per_s"] > 0
    C.store_calibration(result, db)
    assert C.latest(result["device"], "fp32", db) == result
    assert C.latest("no such device", "fp32", db) is None
    parser = argparse.ArgumentParser()
    profile.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny", "--gpus", "2", "--global-batch", "4", "--precision", "fp32", "--results", db, "--top", "3"])
    assert profile.main(args) == 0
    assert "time model calibrated" in capsys.readouterr().out
