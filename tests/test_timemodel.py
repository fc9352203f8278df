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
    dp = T.predict(cfg, A.Plan(Layout(dp=2, micro_batch=4, global_batch=8), precision="fp32", distributed_optimizer=True, overlap_grad_reduce=False), calib)
    assert dp["dp_comm_s"] == pytest.approx(2e-3)  # gradient reduce-scatter + ZeRO-1 all-gather


def test_overlapped_dp_reduction_exposes_only_what_backward_cannot_hide():
    # by hand: 10 s of reduction, 8 s of backward, a quarter of the gradient per bucket
    assert A.exposed_reduce_s(10.0, 8.0, 0.25) == pytest.approx(10 - 8 * 0.75)  # outlasts backward
    assert A.exposed_reduce_s(4.0, 8.0, 0.25) == pytest.approx(1.0)  # hidden but for the last bucket
    assert A.exposed_reduce_s(4.0, 8.0, 1.0) == pytest.approx(4.0)  # one bucket: nothing hidden
    cfg = get_preset("small")
    layout = Layout(dp=2, micro_batch=4, global_batch=8)
    trainable = A.stage_params(cfg, 1, 1, 0)["trainable"]
    calib = _uniform(flops=1e10, net=trainable * 4 / 1e-3)  # the all-reduce takes 1 ms, far less than a backward (~90 ms)
    off = T.predict(cfg, A.Plan(layout, precision="fp32", overlap_grad_reduce=False), calib)
    on = T.predict(cfg, A.Plan(layout, precision="fp32", bucket_mb=trainable * 4 / 2**20 / 4), calib)  # 4 buckets
    assert off["dp_comm_s"] == pytest.approx(1e-3) and on["dp_comm_s"] == pytest.approx(1e-3 / 4)
    assert off["step_s"] - on["step_s"] == pytest.approx(0.75e-3)
    est_off, est_on = (A.estimate(cfg, A.Plan(layout, precision="fp32", overlap_grad_reduce=o, bucket_mb=1.0)) for o in (False, True))
    assert est_on.comm_s < est_off.comm_s and est_on.compute_s == est_off.compute_s


def test_overhead_fit_recovers_known_terms_from_one_process_steps():
    """Steps 'measured' as 1.3 x the operator sum + 0.4 ms per block pass + 5 ms per step: the fit
    finds those terms, and a TP=2 PP=2 layout (not in the fit) gets them per stage and micro-batch."""
    cfg, calib = get_preset("small"), _uniform(flops=1e11, bw=1e10, lat=1e-4, net=1e9)
    runs = []
    for mb in (2, 8):
        for recompute in (False, True):
            plan = A.Plan(Layout(micro_batch=mb, global_batch=16), precision="fp32", recompute=recompute)
            t = T.predict(cfg, plan, calib)
            passes = (16 // mb) * (cfg.depth + cfg.dec_depth) * (3 if recompute else 2)
            measured = t["step_s"] + 0.3 * t["compute_s"] + 4e-4 * passes + 5e-3
            runs.append(dict(model="small", micro_batch=mb, global_batch=16, recompute=recompute, precision="fp32", measured_s=measured))
    fit = T.fit_overhead(calib, runs)
    assert fit["compute_factor"] == pytest.approx(1.3, rel=1e-6) and fit["per_block_pass_s"] == pytest.approx(4e-4, rel=1e-6)
    assert fit["per_step_s"] == pytest.approx(5e-3, rel=1e-5) and fit["residual_rel"] < 1e-9
    plan = A.Plan(Layout(tp=2, pp=2, micro_batch=2, global_batch=8), precision="fp32")
    bare, fitted = T.predict(cfg, plan, calib), T.predict(cfg, plan, {**calib, "overhead": fit})
    assert fitted["compute_s"] == pytest.approx(1.3 * bare["compute_s"] + 4 * 4e-4 * T.block_passes(cfg, plan, 1), rel=1e-6)
    assert T.block_passes(cfg, plan, 1) == 2 * (cfg.depth // 2 + cfg.dec_depth)  # the last stage holds the decoder
    assert fitted["tp_comm_s"] == bare["tp_comm_s"] and fitted["overhead_s"] == pytest.approx(5e-3)


def test_overhead_fit_never_goes_negative():
    """Steps faster than the operator sum cannot make a negative per-pass cost: the term is dropped."""
    cfg, calib = get_preset("small"), _uniform(flops=1e11, bw=1e10)
    runs = []
    for mb in (2, 8):
        plan = A.Plan(Layout(micro_batch=mb, global_batch=16), precision="fp32")
        t = T.predict(cfg, plan, calib)
        runs.append(dict(model="small", micro_batch=mb, global_batch=16, recompute=False, precision="fp32",
                         measured_s=t["step_s"] - 1e-5 * (16 // mb) * 12))
    fit = T.fit_overhead(calib, runs)
    assert fit["per_block_pass_s"] >= 0 and fit["per_step_s"] >= 0 and fit["compute_factor"] > 0


def test_calibrate_stores_and_profile_uses_it(tmp_path, capsys):
    import argparse

    from rsscale.benchmarks import profile

    db = str(tmp_path / "results.db")
    result = C.calibrate(["tiny"], [1], [1, 2], [2], "fp32")
    assert all(g["flops_per_s"] > 0 for g in result["gemm"]) and result["collectives"]["all_reduce"]["2"]["bandwidth_bytes_per_s"] > 0
    assert [(r["micro_batch"], r["recompute"]) for r in result["steps"]] == [(1, False), (1, True)]
    assert all(r["measured_s"] > 0 for r in result["steps"]) and result["overhead"]["compute_factor"] > 0
    C.store_calibration(result, db)
    assert C.latest(result["device"], "fp32", db) == result
    assert C.latest("no such device", "fp32", db) is None
    parser = argparse.ArgumentParser()
    profile.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny", "--gpus", "2", "--global-batch", "4", "--precision", "fp32", "--results", db, "--top", "3"])
    assert profile.main(args) == 0
    assert "time model calibrated" in capsys.readouterr().out


def test_more_processes_than_cores_share_the_cores():
    """4 single-thread processes on 2 cores: data parallel computes at half speed; a pipeline
    is bound by all stages' work over the cores (its idle ranks lend their cores), not by 2x its
    critical path; with enough cores nothing changes."""
    cfg, calib = get_preset("small"), {**_uniform(flops=1e11, bw=1e10), "threads_per_process": 1}
    dp = A.Plan(Layout(dp=4, micro_batch=2, global_batch=16), precision="fp32")
    assert T.predict(cfg, dp, calib, 2)["compute_s"] == pytest.approx(2 * T.predict(cfg, dp, calib, 4)["compute_s"], rel=1e-12)
    pp = A.Plan(Layout(pp=2, dp=2, micro_batch=1, global_batch=64), precision="fp32")
    stage = [T.stage_micro_s(cfg, pp, calib, s)["compute"] for s in range(2)]
    shared, alone = T.predict(cfg, pp, calib, 2), T.predict(cfg, pp, calib, 4)
    assert shared["compute_s"] == pytest.approx(2 * 32 * sum(stage) / 2, rel=1e-12) and shared["bubble_s"] == 0
    assert alone["compute_s"] == pytest.approx(32 * max(stage), rel=1e-12) and alone["bubble_s"] > 0
    assert shared["step_s"] < 2 * alone["step_s"]
