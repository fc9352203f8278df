"""CPU time-sharing compensation of the time model (benchmarks/prediction/cpu_sharing.py): N single-thread
processes on a few cores, collectives timed inside such a run, probes of the machine as it is now;
and that a GPU or datasheet prediction never loads it."""

import dataclasses
import math
import os
import subprocess
import sys

import pytest
from test_timemodel import _uniform

from rsscale.benchmarks.measurement import calibrate as C
from rsscale.benchmarks.prediction import analytic as A
from rsscale.benchmarks.prediction import cpu_sharing as S
from rsscale.benchmarks.prediction import timemodel as T
from rsscale.scaling.spec.config import get_preset
from rsscale.scaling.spec.layout import Layout

NOT_LOADED = """
import sys
from rsscale.benchmarks import autolayout
from rsscale.benchmarks.prediction import analytic, devices, timemodel
from rsscale.scaling.spec.config import get_preset
from rsscale.scaling.spec.layout import Layout

hw = devices.hardware(devices.get_device("h100-sxm"), "bf16", 8)
plan = analytic.Plan(Layout(tp=2, pp=2, dp=4, micro_batch=4, global_batch=64), precision="bf16")
assert timemodel.predict(get_preset("l12x4"), plan, timemodel.datasheet_calibration(hw))["step_s"] > 0
from rsscale.scaling.runtime.cli import main
assert main(["profile", "--model", "l12x4", "--device", "h100-sxm", "--nodes", "2", "--gpus-per-node", "8", "--top", "2"]) == 0
assert main(["profile", "--model", "tiny", "--device", "a100-80", "--gpus", "2", "--global-batch", "8"]) == 0
assert "rsscale.benchmarks.profile" in sys.modules and "rsscale.benchmarks.prediction.cpu_sharing" not in sys.modules, sorted(sys.modules)
"""


def test_a_datasheet_prediction_and_a_named_device_profile_never_load_cpu_sharing(tmp_path):
    """In a fresh interpreter: a datasheet prediction and `rsscale profile --device` rankings
    (one and two nodes) run without importing cpu_sharing; a CPU calibration's prediction does."""
    env = {**os.environ, "RSSCALE_RESULTS": str(tmp_path / "r.db")}
    run = subprocess.run([sys.executable, "-c", NOT_LOADED], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    cpu = NOT_LOADED.split("from rsscale.scaling.runtime.cli")[0] + (
        "timemodel.predict(get_preset('tiny'), analytic.Plan(Layout(micro_batch=2, global_batch=4)), "
        "{**timemodel.datasheet_calibration(hw), 'threads_per_process': 1}, 2)\n"
        "assert 'rsscale.benchmarks.prediction.cpu_sharing' in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", cpu], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


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


def test_collective_fit_of_a_group_inside_a_larger_world():
    """A pair inside a world of 4 uses the fit measured for pairs there ("2@4"); without one, the
    nearest group size measured on its own."""
    fits = {"2": {"latency_s": 1e-3, "bandwidth_bytes_per_s": 1e9}, "4": {"latency_s": 5e-3, "bandwidth_bytes_per_s": 1e9},
            "2@4": {"latency_s": 3e-3, "bandwidth_bytes_per_s": 1e9}}
    calib = {"collectives": {"all_reduce": fits}}
    assert S.collective_s(calib, "all_reduce", 1e6, 2, 4) == pytest.approx(3e-3 + 1e-3)
    assert S.collective_s(calib, "all_reduce", 1e6, 2, 2) == pytest.approx(1e-3 + 1e-3)
    assert S.collective_s(calib, "all_reduce", 1e6, 4, 4) == pytest.approx(5e-3 + 1e-3)
    assert S.collective_s(calib, "all_reduce", 1e6, 2, 8) == pytest.approx(1e-3 + 1e-3)  # no "2@8": the pair alone
    assert S.collective_s(calib, "all_reduce", 1e6, 1, 4) == 0.0
    # through the time model: a CPU calibration's TP2 group in a TP2 x DP2 run takes "2@4"; a GPU one, the pair's fit
    plan = Layout(tp=2, dp=2, micro_batch=1, global_batch=2)
    assert T.collective_s({**calib, "threads_per_process": 1}, "all_reduce", 1e6, 2, layout=plan) == pytest.approx(3e-3 + 1e-3)
    assert T.collective_s(calib, "all_reduce", 1e6, 2, layout=plan) == pytest.approx(1e-3 + 1e-3)


def test_tp_collectives_interpolate_by_the_compute_before_them():
    """A collective after `after_s` of compute: the small chunk's fit at or below that chunk, the
    large one's at or above it, in between linearly in log(after_s); None (DP, PP, the step's)
    and calibrations without the small fits: the large chunk's fit."""
    large = {op: {"2": {"latency_s": 1e-3, "bandwidth_bytes_per_s": 1e30}} for op in C.COLLECTIVES}
    small = {op: {"2": {"latency_s": 1e-4, "bandwidth_bytes_per_s": 1e30}} for op in C.TP_COLLECTIVES}
    calib = {"collectives": large, "tp_collectives": small, "collective_chunk_s": {"collectives": 4e-3, "tp_collectives": 5e-4}}
    at = lambda after, op="all_gather", c=calib: S.collective_s(c, op, 1e3, 2, after_s=after)  # noqa: E731
    assert at(1e-5) == at(5e-4) == pytest.approx(1e-4) and at(4e-3) == at(1.0) == pytest.approx(1e-3)
    assert at(None) == pytest.approx(1e-3) and at(1e-5, "send_recv") == pytest.approx(1e-3)  # send/recv is never a TP collective
    assert at(math.sqrt(5e-4 * 4e-3)) == pytest.approx(5.5e-4)  # halfway in log
    assert at(1e-5, c={"collectives": large, "tp_collectives": small}) == pytest.approx(1e-3)  # no chunk times: the large fits


def test_a_tp_collective_follows_its_share_of_the_blocks_compute():
    """In a layout the TP collectives sit between the two fits by the compute per collective:
    a larger micro-batch puts more compute before each, so its collectives move toward the large
    chunk's fit; PP, DP and the step's collectives always take the large chunk's fit."""
    cfg = get_preset("small")
    base = {**_uniform(flops=3e10, bw=1e10), "threads_per_process": 1,
            "collectives": {op: {"2": {"latency_s": 1e-3, "bandwidth_bytes_per_s": 1e30}} for op in C.COLLECTIVES}}
    both = {**base, "tp_collectives": {op: {"2": {"latency_s": 1e-4, "bandwidth_bytes_per_s": 1e30}} for op in C.TP_COLLECTIVES},
            "collective_chunk_s": {"collectives": 4e-3, "tp_collectives": 5e-5}}

    def per_collective(calib, mb):
        plan = A.Plan(Layout(tp=2, pp=2, dp=2, sp=True, micro_batch=mb, global_batch=16), precision="fp32")
        stage0 = T.stage_micro_s(cfg, plan, calib, 0)["tp_comm"]  # per micro-batch: depth / 2 blocks and the SP entry
        sp_entry = 1e-3  # follows the patch embedding: the large chunk's fit
        return T.predict(cfg, plan, calib), (stage0 - sp_entry) / (S.tp_collectives_per_block(True, "none") * cfg.depth // 2)

    (small_mb, a), (_, b) = per_collective(both, 1), per_collective(both, 8)
    assert 1e-4 < a < b < 1e-3
    assert per_collective(base, 1)[1] == pytest.approx(1e-3)
    for kind in ("pp_comm_s", "dp_comm_s", "sync_s"):
        assert small_mb[kind] == per_collective(base, 1)[0][kind] and small_mb[kind] > 0, kind


def test_pairs_of_a_pipeline_contend_only_while_the_other_stages_are_busy():
    """"2@4" is measured with both pairs communicating at once. In TP2 x PP2 the other stage's pair
    is busy only for part of the step: with one micro-batch the stages take turns (the pair alone),
    with many the overlap approaches every pair at once. Interpolated linearly between the two."""
    fits = {"2": {"latency_s": 1e-3, "bandwidth_bytes_per_s": 1e9}, "2@4": {"latency_s": 3e-3, "bandwidth_bytes_per_s": 1e9}}
    calib = {"collectives": {"all_reduce": fits}}
    assert S.collective_s(calib, "all_reduce", 1e6, 2, 4, active=2) == pytest.approx(2e-3)
    assert S.collective_s(calib, "all_reduce", 1e6, 2, 4, active=3) == pytest.approx(3e-3)
    assert S.collective_s(calib, "all_reduce", 1e6, 2, 4, active=4) == pytest.approx(4e-3)
    # 1F1B: P stages each busy M of the M + (P - 1) / V micro-batch times
    assert S.busy_stages(Layout(pp=2, micro_batch=16, global_batch=16)) == pytest.approx(1.0)
    assert S.busy_stages(Layout(pp=2, micro_batch=1, global_batch=7)) == pytest.approx(2 * 7 / 8)
    assert S.busy_stages(Layout(pp=4, vpp=2, micro_batch=1, global_batch=8)) == pytest.approx(4 * 8 / 9.5)
    assert S.busy_stages(Layout(dp=4, micro_batch=1, global_batch=8)) == 1.0
    cfg = get_preset("small")
    base = {**_uniform(flops=1e11, bw=1e10, lat=1e-4, net=1e9), "threads_per_process": 1}  # the pair alone only
    both = {**_uniform(flops=1e11, bw=1e10, lat=1e-4, net=1e9), "threads_per_process": 1}
    for op in both["collectives"]:  # pairs 4x slower when both communicate at once
        both["collectives"][op]["2@4"] = {"latency_s": 4e-4, "bandwidth_bytes_per_s": 2.5e8}

    def tp_comm(calib, M):  # per micro-batch
        plan = A.Plan(Layout(tp=2, pp=2, sp=True, micro_batch=16 // M, global_batch=16), precision="fp32")
        return T.predict(cfg, plan, calib)["tp_comm_s"] / M

    assert tp_comm(both, 1) == pytest.approx(tp_comm(base, 1), rel=1e-12)  # one micro-batch: the pairs never overlap
    share = (S.busy_stages(Layout(pp=2, micro_batch=1, global_batch=16)) * 2 - 2) / 2  # 15/17 of the way to both at once
    assert tp_comm(both, 16) == pytest.approx((1 + 3 * share) * tp_comm(base, 16), rel=1e-9)  # mostly both at once


def test_calibrated_concurrency_slowdown_scales_compute():
    """With 2 cores and a calibrated slowdown of 1.25 for 2 processes computing at once and 3.0 for
    4: DP=2 computes 1.25x slower than alone; DP=4 is bound by all ranks' compute x 3.0 / 4 ranks
    (3x one rank alone), not by one rank at 1.25x; the optimizer runs at the 4-process slowdown."""
    cfg = get_preset("small")
    calib = {**_uniform(flops=1e11, bw=1e10), "threads_per_process": 1, "concurrency": {"2": 1.25, "4": 3.0}}
    dp2 = A.Plan(Layout(dp=2, micro_batch=2, global_batch=16), precision="fp32")
    alone = T.predict(cfg, dp2, calib)  # no core count: no slowdown
    assert T.predict(cfg, dp2, calib, 2)["compute_s"] == pytest.approx(1.25 * alone["compute_s"], rel=1e-12)
    dp4 = A.Plan(Layout(dp=4, micro_batch=2, global_batch=16), precision="fp32")
    alone4, shared4 = T.predict(cfg, dp4, calib), T.predict(cfg, dp4, calib, 2)
    assert shared4["compute_s"] == pytest.approx(3.0 * alone4["compute_s"], rel=1e-12) and shared4["bubble_s"] == 0
    assert shared4["optimizer_s"] == pytest.approx(3.0 * alone4["optimizer_s"], rel=1e-12)
    assert S.slowdown(calib, 3, 2) == 1.5  # not calibrated: time-sharing the cores
    gpu = {**calib, "threads_per_process": None}  # GPUs: a device each, whatever the cores
    assert T.predict(cfg, dp4, gpu, 2) == T.predict(cfg, dp4, gpu) == alone4


@pytest.mark.slow
def test_four_process_calibration_also_measures_pairs_inside_it():
    fits, slowdown = C.measure_collectives([4], reps=2)
    assert set(fits["collectives"]["all_gather"]) == set(fits["tp_collectives"]["all_gather"]) == {"4", "2@4"} and slowdown["4"] >= 1.0
    assert all(f["bandwidth_bytes_per_s"] > 0 and f["latency_s"] >= 0 for kind in C.CHUNK_ROWS for op in fits[kind].values() for f in op.values())
    assert 0 < fits["collective_chunk_s"]["tp_collectives"] < fits["collective_chunk_s"]["collectives"]


@pytest.mark.slow
def test_step_concurrency_sees_time_sharing_beyond_the_cores():
    """Twice as many single-thread training processes as cores: each step takes well over its time alone."""
    cores = os.cpu_count() or 1
    slowdown = C.measure_step_concurrency("tiny", 4, "fp32", [2 * cores], reps=15)
    assert slowdown[str(2 * cores)] > 1.4


def _fits(times: list[float]) -> dict:
    return {**C.fit_latency_bandwidth(C.SIZES, times), "sizes": C.SIZES, "times": times}


def test_probes_rescale_each_collective_group_by_its_median_drift():
    """Probes that time the 4-process collectives at 2x, 2x and 10x the calibration (per size, the
    median over probes: 2x), the pairs inside them and the small-chunk kind unchanged: the
    4-process fits (both terms) take 2x, the others 1x, a group no probe timed is kept, and the
    stored calibration is not modified."""
    base = [1e-3 * (1 + i) for i in range(len(C.SIZES))]
    calib = {kind: {op: {"4": _fits(base), "2@4": _fits(base), "2": _fits(base)} for op in C.TP_COLLECTIVES} for kind in C.CHUNK_ROWS}

    def probe(x4):
        return {kind: {op: {"4": _fits([x4 * t for t in base]) if kind == "collectives" else _fits(base), "2@4": _fits(base)}
                       for op in C.TP_COLLECTIVES} for kind in C.CHUNK_ROWS}

    factors = S.drift(calib, [probe(2), probe(10), probe(2)])
    assert factors == pytest.approx({"collectives 4": 2.0, "collectives 2@4": 1.0, "tp_collectives 4": 1.0, "tp_collectives 2@4": 1.0})
    now = S.rescaled(calib, factors)
    for nbytes in (4096, 2**22):
        assert S.collective_s(now, "all_reduce", nbytes, 4, 4) == pytest.approx(2 * S.collective_s(calib, "all_reduce", nbytes, 4, 4))
        assert S.collective_s(now, "all_gather", nbytes, 2, 4) == pytest.approx(S.collective_s(calib, "all_gather", nbytes, 2, 4))
        assert S.collective_s(now, "all_gather", nbytes, 2, 2) == pytest.approx(S.collective_s(calib, "all_gather", nbytes, 2, 2))
    assert calib["collectives"]["all_reduce"]["4"]["times"] == base and now["collectives"]["all_reduce"]["4"]["times"] == base


def test_a_compute_drift_scales_compute_optimizer_and_fsdp_work_but_not_communication():
    """Probes that time the calibrated one-process step (the first model's largest micro-batch
    without recompute) at 1.4x, 1.5x and 9x its calibrated time give a compute factor of 1.5 (the
    median); rescaled by it, a TP2 PP2 DP2 FSDP layout predicts compute, optimizer, step and
    FSDP work 1.5x and every communication term unchanged."""
    cfg = get_preset("small")
    calib = {**_uniform(flops=1e10, bw=1e9, lat=1e-3, net=1e9), "threads_per_process": 1,
             "overhead": {"compute_factor": 1.1, "per_block_pass_s": 1e-3, "per_step_s": 2e-3},
             "fsdp": {"per_unit_s": 1e-3, "s_per_byte": 1e-9},
             "steps": [dict(model="small", micro_batch=mb, recompute=rc, measured_s=0.1 * mb) for mb in (2, 8) for rc in (False, True)]}
    assert S.probe_step(calib)["micro_batch"] == 8 and not S.probe_step(calib)["recompute"]
    factors = S.drift(calib, [{"step_s": 0.8 * x} for x in (1.4, 1.5, 9.0)])
    assert factors == pytest.approx({"compute": 1.5})
    plan = A.Plan(Layout(tp=2, pp=2, dp=2, micro_batch=2, global_batch=16), precision="fp32", fsdp=True)
    before, after = T.predict(cfg, plan, calib, 8), T.predict(cfg, plan, S.rescaled(calib, factors), 8)
    for part in ("compute_s", "optimizer_s", "overhead_s"):
        assert after[part] == pytest.approx(1.5 * before[part], rel=1e-9)
    for part in ("tp_comm_s", "pp_comm_s", "dp_comm_s", "sync_s"):
        assert after[part] == pytest.approx(before[part], rel=1e-12)
    fsdp_work = T.fsdp_overhead_s(cfg, plan, calib, 0)
    assert fsdp_work > 0 and T.fsdp_overhead_s(cfg, plan, S.rescaled(calib, factors), 0) == pytest.approx(1.5 * fsdp_work)


def test_a_real_probe_has_the_calibrations_shape():
    """calibrate.probe times the same kinds, ops, groups and sizes a calibration stores, so that
    drift can divide them: a calibration built from the probe itself drifts by exactly 1."""
    p = C.probe(2, dict(model="tiny", micro_batch=1, global_batch=2, precision="fp32", recompute=False), reps=2)
    assert p.pop("step_s") > 0
    assert set(p) == set(C.CHUNK_ROWS) and set(p["collectives"]) == set(C.COLLECTIVES) and set(p["tp_collectives"]) == set(C.TP_COLLECTIVES)
    assert all(len(f["2"]["times"]) == len(C.SIZES) for kind in C.CHUNK_ROWS for f in p[kind].values())
    factors = S.drift(p, [p])
    assert factors and set(factors) <= {"collectives 2", "tp_collectives 2"} and all(f == pytest.approx(1.0) for f in factors.values())


def test_profile_measure_probes_each_round_and_predicts_with_the_probed_calibration(tmp_path, monkeypatch, capsys):
    """On CPU with a calibration, `profile --measure` probes before each round, predicts each
    layout with the calibration rescaled by the probes, shows the calibration's own prediction
    beside it and computes the error from the probed one; --no-probe leaves the table as before."""
    import json

    from rsscale.benchmarks import profile as P

    cfg = get_preset("small")
    calib = {**_uniform(flops=1e9, bw=1e9, lat=1e-3, net=1e9), "threads_per_process": 1}
    for fits in calib["collectives"].values():
        fits["2"]["times"] = [1e-3] * len(C.SIZES)
    rows = P.rank_plans(cfg, P.enumerate_plans(cfg, 2, 16, "fp32", [16], [1]), A.Hardware(peak_flops=1e12), 1e12, calib)
    tp = [r for r in rows if r["plan"].layout.tp == 2 and r["plan"].recompute == "none"][:1]
    events = []

    def fake_probe(n, step):
        events.append("probe")
        return {"collectives": {op: {"2": {"times": [3e-3] * len(C.SIZES)}} for op in C.COLLECTIVES}, "tp_collectives": {}}

    def fake_call(cmd):
        events.append("bench")
        with open(cmd[-1], "w") as f:
            json.dump({"step_time_median_s": 1.0}, f)
        return 0

    from rsscale.benchmarks.measurement import calibrate

    monkeypatch.setattr(calibrate, "probe", fake_probe)
    monkeypatch.setattr(P, "bench_command", lambda opts, n: [opts.measure.summary_json])
    monkeypatch.setattr(P.subprocess, "call", fake_call)
    args = P.ProfileConfig(model="tiny", gpus=2, max_measure=1, rounds=2, warmup=0, steps=1, peak_tflops=1.0, results=str(tmp_path / "r.db"))
    assert P.measure(cfg, tp, args, calib) == 0
    assert events == ["probe", "bench", "probe", "bench"]
    out = capsys.readouterr().out
    assert "collectives 2 x3.00" in out and "calibration only s" in out
    cells = [c.strip() for c in [line for line in out.splitlines() if line.startswith("| TP2")][0].strip("|").split("|")]
    expected = T.predict(cfg, tp[0]["plan"], S.rescaled(calib, {"collectives 2": 3.0}), os.cpu_count())["step_s"]
    assert float(cells[2]) == pytest.approx(expected, abs=1e-4) and float(cells[3]) == pytest.approx(tp[0]["step_s"], abs=1e-4)
    assert float(cells[2]) > float(cells[3]) and float(cells[6].rstrip(" %")) == pytest.approx(100 * (expected - 1), abs=0.06)
    events.clear()
    assert P.measure(cfg, tp, dataclasses.replace(args, probe=False), calib) == 0
    assert events == ["bench", "bench"] and "calibration only" not in capsys.readouterr().out
