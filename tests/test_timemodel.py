"""Calibration fits and the calibrated step-time model (benchmarks/calibrate.py, timemodel.py)."""

import math
import os

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


def test_fsdp_own_work_fit_recovers_known_terms_and_adds_per_unit_and_micro_batch():
    """One-process FSDP steps 'measured' as 2 ms per unit + 1 ms per MB of its fp32 weights, per
    micro-batch: fit_fsdp finds both (two presets of different unit sizes); a DP=2 FSDP layout's
    compute then carries them for each of its 4 micro-batches, a plan without FSDP nothing."""
    a, b = 2e-3, 1e-3 / 2**20
    points = []
    for model in ("tiny", "small"):
        units = A.fsdp_units(get_preset(model), 1, 1, 0)
        points.append(dict(model=model, micro_batch=4, global_batch=8, extra_s=2 * sum(a + b * 4 * u for u in units)))
    fit = T.fit_fsdp(points)
    assert fit["per_unit_s"] == pytest.approx(a, rel=1e-6) and fit["s_per_byte"] == pytest.approx(b, rel=1e-6) and fit["residual_rel"] < 1e-9
    cfg = get_preset("small")
    assert len(A.fsdp_units(cfg, 1, 1, 0)) == cfg.depth + cfg.dec_depth + 1
    assert sum(A.fsdp_units(cfg, 1, 1, 0)) == sum(A.stage_params(cfg, 1, 1, 0).values())
    calib = _uniform(flops=1e11, bw=1e10)
    plan = A.Plan(Layout(dp=2, micro_batch=2, global_batch=16), precision="fp32", fsdp=True)
    bare, fitted = T.predict(cfg, plan, calib), T.predict(cfg, plan, {**calib, "fsdp": fit})
    by_hand = 4 * sum(a + b * 4 * u for u in A.fsdp_units(cfg, 1, 1, 0))
    assert fitted["compute_s"] - bare["compute_s"] == pytest.approx(by_hand, rel=1e-6)
    plain = A.Plan(Layout(dp=2, micro_batch=2, global_batch=16), precision="fp32")
    assert T.predict(cfg, plain, {**calib, "fsdp": fit}) == T.predict(cfg, plain, calib)


def _one_f_one_b_makespan(t: list[float], M: int) -> float:
    """Independent reference: simulate non-interleaved 1F1B on stages with per-micro-batch times t
    (forward t/3, backward 2t/3, free communication): each stage runs min(P-1-s, M) warm-up
    forwards, then one forward / one backward, then the remaining backwards; an op starts when
    its stage is free and its input (previous stage's forward, next stage's backward) is done."""
    P = len(t)
    orders = []
    for s in range(P):
        w = min(P - 1 - s, M)
        order = [("F", i) for i in range(w)]
        for i in range(M - w):
            order += [("F", w + i), ("B", i)]
        orders.append(order + [("B", i) for i in range(M - w, M)])
    done, free, pos = {}, [0.0] * P, [0] * P
    while any(pos[s] < len(orders[s]) for s in range(P)):
        for s in range(P):
            while pos[s] < len(orders[s]):
                kind, i = orders[s][pos[s]]
                dep = (("F", s - 1, i) if s > 0 else None) if kind == "F" else (("B", s + 1, i) if s < P - 1 else ("F", s, i))
                if dep is not None and dep not in done:
                    break
                start = max(free[s], done.get(dep, 0.0))
                free[s] = done[(kind, s, i)] = start + t[s] * (1 / 3 if kind == "F" else 2 / 3)
                pos[s] += 1
    return max(free)


@pytest.mark.parametrize("times,M", [([1.0, 1.0, 1.0, 1.0], 4), ([1.0, 1.0, 1.0, 3.0], 4), ([1.0, 2.0], 2), ([1.0, 2.0, 1.5, 2.5], 8)])
def test_one_f_one_b_step_formula_matches_a_schedule_simulation(times, M):
    """M x t_slow + (sum t - t_slow): (M + P - 1) t when balanced, less when the last stage is the
    slowest (small's holds the decoder), exactly as a simulated 1F1B timeline finishes; an upper
    bound when an earlier stage is the slowest (it then waits less than the others' sum)."""
    assert M * max(times) + sum(times) - max(times) == pytest.approx(_one_f_one_b_makespan(times, M), rel=1e-12)
    early = times[::-1]
    assert M * max(early) + sum(early) - max(early) >= _one_f_one_b_makespan(early, M) - 1e-12


def test_pipeline_bubble_and_communication_terms():
    cfg = get_preset("small")
    calib = _uniform(lat=1e-3)
    for vpp in (1, 2):
        plan = A.Plan(Layout(pp=2, vpp=vpp, micro_batch=2, global_batch=8), precision="fp32")
        pp = T.predict(cfg, plan, calib)
        st = [T.stage_micro_s(cfg, plan, calib, s) for s in range(2)]
        per = [x["compute"] + x["tp_comm"] + x["pp_comm"] for x in st]
        assert per[1] > per[0]  # the last stage holds the decoder
        assert pp["compute_s"] == pytest.approx(4 * st[1]["compute"]) and pp["bubble_s"] == pytest.approx(per[0] / vpp, rel=1e-12)
        assert pp["pp_comm_s"] == pytest.approx(4 * vpp * 2 * 1e-3)  # one send/recv each way per micro-batch and chunk
        assert pp["sync_s"] == pytest.approx(2e-3)  # the loss over PP, the gradient norm over the model-parallel group
    tp = T.predict(cfg, A.Plan(Layout(tp=2, micro_batch=8, global_batch=8), precision="fp32"), calib)
    blocks = cfg.depth + cfg.dec_depth
    assert tp["tp_comm_s"] == pytest.approx(blocks * 4 * 1e-3)  # 2 sublayers x (fwd + bwd all-reduce)
    dp = T.predict(cfg, A.Plan(Layout(dp=2, micro_batch=4, global_batch=8), precision="fp32", distributed_optimizer=True, overlap_grad_reduce=False), calib)
    assert dp["dp_comm_s"] == pytest.approx(2e-3)  # gradient reduce-scatter + ZeRO-1 all-gather
    assert dp["sync_s"] == pytest.approx(2e-3)  # the loss over DP, the gradient norm over the ZeRO-1 shards


def _by_op(ar=1.0, ag=1e3, rs=1e6):
    """A calibration in which each collective's count can be read off the time: every all-reduce
    takes `ar` s, all-gather `ag`, reduce-scatter `rs`, whatever its size."""
    coll = {op: {"2": {"latency_s": lat, "bandwidth_bytes_per_s": 1e300}} for op, lat in
            (("all_reduce", ar), ("all_gather", ag), ("reduce_scatter", rs), ("send_recv", 0.0))}
    return {**_uniform(), "collectives": coll}


def _count_collectives(rank, world, specs):
    """Collectives one rank's second training step launches, by c10d op (torch.profiler)."""
    import torch

    from rsscale.scaling.train import TrainConfig, Trainer

    out = []
    for layout, recompute in specs:
        trainer = Trainer.build(TrainConfig(model="small", parallel=Layout(**layout), recompute=recompute, precision="fp32", data="random",
                                             record=False))
        trainer.train_step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.train_step()
        calls = {e.key: e.count for e in prof.key_averages()}
        out.append({op: calls.get(f"c10d::{name}", 0) for op, name in
                    (("all_reduce", "allreduce_"), ("all_gather", "allgather_"), ("reduce_scatter", "_reduce_scatter_base_"))})
    return out


LAYOUTS = [(dict(tp=2, micro_batch=2, global_batch=2), "none"), (dict(tp=2, sp=True, micro_batch=2, global_batch=2), "none"),
           (dict(tp=2, sp=True, micro_batch=2, global_batch=2), "full"), (dict(pp=2, micro_batch=2, global_batch=4), "none")]


def test_tp_and_step_collectives_are_the_ones_the_trainer_launches():
    """The model's count of TP collectives (per sublayer, SP's small all-reduces, the SP region's
    entries and exits, full recompute's forward ones again) and of the step's synchronizing
    all-reduces equals what a real 2-process step of each layout launches."""
    from tests.distributed import run_distributed

    cfg = get_preset("small")
    counted = run_distributed(_count_collectives, 2, LAYOUTS, timeout=300)[0]
    for (layout, recompute), calls in zip(LAYOUTS, counted):
        t = T.predict(cfg, A.Plan(Layout(**layout), precision="fp32", recompute=recompute), _by_op())
        total = t["tp_comm_s"] + t["sync_s"]
        predicted = {"reduce_scatter": int(total // 1e6), "all_gather": int(total % 1e6 // 1e3), "all_reduce": round(total % 1e3)}
        assert predicted == calls, (layout, recompute, predicted, calls)
        if layout.get("tp", 1) > 1:  # the per-block count that spaces TP collectives (tp_collectives_per_block)
            sp_boundaries = 4 if layout.get("sp") else 0
            per_block = T.tp_collectives_per_block(layout.get("sp", False), recompute)
            assert sum(calls.values()) - sp_boundaries - round(t["sync_s"]) == per_block * (cfg.depth + cfg.dec_depth), (layout, recompute)


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


def _store_and_profile(result: dict, db: str, capsys) -> None:
    """store_calibration -> latest(device, precision) returns it (and nothing for another device);
    `profile` of tiny on 2 processes ranks with it and says so."""
    import argparse

    from rsscale.benchmarks import profile

    C.store_calibration(result, db)
    assert C.latest(result["device"], "fp32", db) == result
    assert C.latest("no such device", "fp32", db) is None
    parser = argparse.ArgumentParser()
    profile.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny", "--gpus", "2", "--global-batch", "4", "--precision", "fp32", "--results", db, "--top", "3"])
    assert profile.main(args) == 0
    out = capsys.readouterr().out
    assert "time model calibrated" in out and "when calibrated" in out


def test_a_stored_calibration_is_the_one_profile_uses(tmp_path, capsys):
    """store_calibration -> latest(device, precision) returns it; profile ranks with it and says so."""
    from rsscale.scaling.store import environment

    db = str(tmp_path / "results.db")
    result = {**_uniform(flops=1e10, bw=1e9, lat=1e-4, net=1e9), "device": environment()["device"], "precision": "fp32",
              "threads_per_process": 1, "load_average": 0.5}
    _store_and_profile(result, db, capsys)
    assert C.latest(result["device"], "bf16", db) is None


@pytest.mark.slow
def test_calibrate_stores_and_profile_uses_it(tmp_path, capsys):
    db = str(tmp_path / "results.db")
    result = C.calibrate(["tiny"], [1], [1, 2], [2], "fp32", rounds=1)
    assert all(g["flops_per_s"] > 0 for g in result["gemm"]) and result["collectives"]["all_reduce"]["2"]["bandwidth_bytes_per_s"] > 0
    assert result["concurrency"]["2"] >= 1.0 and set(result["collectives"]["send_recv"]) == {"2"}
    assert set(result["tp_collectives"]) == set(C.TP_COLLECTIVES) and result["tp_collectives"]["all_gather"]["2"]["bandwidth_bytes_per_s"] > 0
    assert [(r["micro_batch"], r["recompute"]) for r in result["steps"]] == [(1, False), (1, True)]
    assert all(r["measured_s"] > 0 for r in result["steps"]) and result["overhead"]["compute_factor"] > 0
    assert [p["model"] for p in result["fsdp"]["points"]] == ["tiny", "medium", "small"] and result["fsdp"]["per_unit_s"] >= 0
    _store_and_profile(result, db, capsys)


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
    assert T.collective_s(calib, "all_reduce", 1e6, 2, 4) == pytest.approx(3e-3 + 1e-3)
    assert T.collective_s(calib, "all_reduce", 1e6, 2, 2) == pytest.approx(1e-3 + 1e-3)
    assert T.collective_s(calib, "all_reduce", 1e6, 4, 4) == pytest.approx(5e-3 + 1e-3)
    assert T.collective_s(calib, "all_reduce", 1e6, 2, 8) == pytest.approx(1e-3 + 1e-3)  # no "2@8": the pair alone
    assert T.collective_s(calib, "all_reduce", 1e6, 1, 4) == 0.0


def test_tp_collectives_interpolate_by_the_compute_before_them():
    """A collective after `after_s` of compute: the small chunk's fit at or below that chunk, the
    large one's at or above it, in between linearly in log(after_s); None (DP, PP, the step's)
    and calibrations without the small fits: the large chunk's fit."""
    large = {op: {"2": {"latency_s": 1e-3, "bandwidth_bytes_per_s": 1e30}} for op in C.COLLECTIVES}
    small = {op: {"2": {"latency_s": 1e-4, "bandwidth_bytes_per_s": 1e30}} for op in C.TP_COLLECTIVES}
    calib = {"collectives": large, "tp_collectives": small, "collective_chunk_s": {"collectives": 4e-3, "tp_collectives": 5e-4}}
    at = lambda after, op="all_gather", c=calib: T.collective_s(c, op, 1e3, 2, after_s=after)  # noqa: E731
    assert at(1e-5) == at(5e-4) == pytest.approx(1e-4) and at(4e-3) == at(1.0) == pytest.approx(1e-3)
    assert at(None) == pytest.approx(1e-3) and at(1e-5, "send_recv") == pytest.approx(1e-3)  # send/recv is never a TP collective
    assert at(math.sqrt(5e-4 * 4e-3)) == pytest.approx(5.5e-4)  # halfway in log
    assert at(1e-5, c={"collectives": large, "tp_collectives": small}) == pytest.approx(1e-3)  # no chunk times: the large fits


def test_a_tp_collective_follows_its_share_of_the_blocks_compute():
    """In a layout the TP collectives sit between the two fits by the compute per collective:
    a larger micro-batch puts more compute before each, so its collectives move toward the large
    chunk's fit; PP, DP and the step's collectives always take the large chunk's fit."""
    cfg = get_preset("small")
    base = {**_uniform(flops=3e10, bw=1e10), "collectives": {op: {"2": {"latency_s": 1e-3, "bandwidth_bytes_per_s": 1e30}} for op in C.COLLECTIVES}}
    both = {**base, "tp_collectives": {op: {"2": {"latency_s": 1e-4, "bandwidth_bytes_per_s": 1e30}} for op in C.TP_COLLECTIVES},
            "collective_chunk_s": {"collectives": 4e-3, "tp_collectives": 5e-5}}

    def per_collective(calib, mb):
        plan = A.Plan(Layout(tp=2, pp=2, dp=2, sp=True, micro_batch=mb, global_batch=16), precision="fp32")
        stage0 = T.stage_micro_s(cfg, plan, calib, 0)["tp_comm"]  # per micro-batch: depth / 2 blocks and the SP entry
        sp_entry = 1e-3  # follows the patch embedding: the large chunk's fit
        return T.predict(cfg, plan, calib), (stage0 - sp_entry) / (T.tp_collectives_per_block(True, "none") * cfg.depth // 2)

    (small_mb, a), (large_mb, b) = per_collective(both, 1), per_collective(both, 8)
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
    assert T.collective_s(calib, "all_reduce", 1e6, 2, 4, active=2) == pytest.approx(2e-3)
    assert T.collective_s(calib, "all_reduce", 1e6, 2, 4, active=3) == pytest.approx(3e-3)
    assert T.collective_s(calib, "all_reduce", 1e6, 2, 4, active=4) == pytest.approx(4e-3)
    # 1F1B: P stages each busy M of the M + (P - 1) / V micro-batch times
    assert T.busy_stages(Layout(pp=2, micro_batch=16, global_batch=16)) == pytest.approx(1.0)
    assert T.busy_stages(Layout(pp=2, micro_batch=1, global_batch=7)) == pytest.approx(2 * 7 / 8)
    assert T.busy_stages(Layout(pp=4, vpp=2, micro_batch=1, global_batch=8)) == pytest.approx(4 * 8 / 9.5)
    assert T.busy_stages(Layout(dp=4, micro_batch=1, global_batch=8)) == 1.0
    cfg = get_preset("small")
    base = _uniform(flops=1e11, bw=1e10, lat=1e-4, net=1e9)  # the pair alone only
    both = _uniform(flops=1e11, bw=1e10, lat=1e-4, net=1e9)
    for op in both["collectives"]:  # pairs 4x slower when both communicate at once
        both["collectives"][op]["2@4"] = {"latency_s": 4e-4, "bandwidth_bytes_per_s": 2.5e8}

    def tp_comm(calib, M):  # per micro-batch
        plan = A.Plan(Layout(tp=2, pp=2, sp=True, micro_batch=16 // M, global_batch=16), precision="fp32")
        return T.predict(cfg, plan, calib)["tp_comm_s"] / M

    assert tp_comm(both, 1) == pytest.approx(tp_comm(base, 1), rel=1e-12)  # one micro-batch: the pairs never overlap
    share = (T.busy_stages(Layout(pp=2, micro_batch=1, global_batch=16)) * 2 - 2) / 2  # 15/17 of the way to both at once
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
    assert T.slowdown(calib, 3, 2) == 1.5  # not calibrated: time-sharing the cores
    assert T.slowdown({**calib, "threads_per_process": None}, 4, 2) == 1.0  # GPUs: a device each


@pytest.mark.slow
def test_four_process_calibration_also_measures_pairs_inside_it():
    fits, slowdown = C.measure_collectives([4], reps=2)
    assert set(fits["collectives"]["all_gather"]) == set(fits["tp_collectives"]["all_gather"]) == {"4", "2@4"} and slowdown["4"] >= 1.0
    assert all(f["bandwidth_bytes_per_s"] > 0 and f["latency_s"] >= 0 for kind in C.CHUNK_ROWS for op in fits[kind].values() for f in op.values())
    assert 0 < fits["collective_chunk_s"]["tp_collectives"] < fits["collective_chunk_s"]["collectives"]


def test_latency_bandwidth_fit_weighs_small_sizes_and_never_goes_negative():
    """Relative residuals: one large size measured 2x too slow barely moves the latency of the
    small ones (plain least squares would make it negative); times that fall with size (noise)
    give a latency-only fit, not a negative bandwidth."""
    sizes = [2**k for k in range(12, 23, 2)]
    times = [1e-3 + n / 1e9 for n in sizes]
    times[-1] *= 2
    assert C.fit_latency_bandwidth(sizes, times)["latency_s"] == pytest.approx(1e-3, rel=0.1)  # plain: 0.70 ms
    falling = C.fit_latency_bandwidth(sizes, [2e-3 - i * 1e-4 for i in range(len(sizes))])
    assert falling["latency_s"] > 0 and falling["bandwidth_bytes_per_s"] == pytest.approx(1e15)


@pytest.mark.slow
def test_step_concurrency_sees_time_sharing_beyond_the_cores():
    """Twice as many single-thread training processes as cores: each step takes well over its time alone."""
    cores = os.cpu_count() or 1
    slowdown = C.measure_step_concurrency("tiny", 4, "fp32", [2 * cores], reps=15)
    assert slowdown[str(2 * cores)] > 1.4


def test_profile_measure_rounds_are_round_robin_and_the_table_uses_their_median(tmp_path, monkeypatch, capsys):
    """`profile --measure --rounds 3`: each layout is run once per round, layouts in turn (so a slow
    spell of the machine hits all of them), the table's measurement is the median of the rounds
    with their range, and a layout that fails is not run again and counts as failed."""
    import argparse
    import json

    from rsscale.benchmarks import profile as P

    cfg = get_preset("small")
    plans = P.enumerate_plans(cfg, 2, 16, "fp32", [8, 16], [1])
    rows = P.rank_plans(cfg, plans, A.Hardware(peak_flops=1e12), 1e12, _uniform(flops=1e9, bw=1e9, lat=1e-4, net=1e9))
    order, times = [], {0: [0.30, 0.10, 0.20], 1: [0.50, 0.40, 0.90]}  # per layout index, per round

    def fake_call(cmd):
        k, i = map(int, os.path.basename(cmd[-1]).split(".")[0].split("-"))
        order.append(i)
        if i == 2:
            return 1
        with open(cmd[-1], "w") as f:
            json.dump({"step_time_median_s": times[i][k]}, f)
        return 0

    monkeypatch.setattr(P, "bench_command", lambda opts, n: [opts.summary_json])
    monkeypatch.setattr(P.subprocess, "call", fake_call)
    args = argparse.Namespace(gpus=2, max_measure=3, measure_spread=False, rounds=3, warmup=0, steps=1, peak_tflops=1.0,
                              peak_tflops_given=True, results=str(tmp_path / "r.db"), validation_out=None)
    assert P.measure(cfg, rows, args) == 1
    assert order == [0, 1, 2, 0, 1, 0, 1]
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(lines) == 2
    for line, i in zip(lines, (0, 1)):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[3]) == pytest.approx(sorted(times[i])[1])
        assert cells[4] == f"{min(times[i]):.4f}-{max(times[i]):.4f} (3)"
        assert float(cells[5].rstrip(" %")) == pytest.approx(100 * (rows[i]["step_s"] / sorted(times[i])[1] - 1), abs=0.06)


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

    factors = C.drift(calib, [probe(2), probe(10), probe(2)])
    assert factors == pytest.approx({"collectives 4": 2.0, "collectives 2@4": 1.0, "tp_collectives 4": 1.0, "tp_collectives 2@4": 1.0})
    now = C.rescaled(calib, factors)
    for nbytes in (4096, 2**22):
        assert T.collective_s(now, "all_reduce", nbytes, 4, 4) == pytest.approx(2 * T.collective_s(calib, "all_reduce", nbytes, 4, 4))
        assert T.collective_s(now, "all_gather", nbytes, 2, 4) == pytest.approx(T.collective_s(calib, "all_gather", nbytes, 2, 4))
        assert T.collective_s(now, "all_gather", nbytes, 2, 2) == pytest.approx(T.collective_s(calib, "all_gather", nbytes, 2, 2))
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
    assert C.probe_step(calib)["micro_batch"] == 8 and not C.probe_step(calib)["recompute"]
    factors = C.drift(calib, [{"step_s": 0.8 * x} for x in (1.4, 1.5, 9.0)])
    assert factors == pytest.approx({"compute": 1.5})
    plan = A.Plan(Layout(tp=2, pp=2, dp=2, micro_batch=2, global_batch=16), precision="fp32", fsdp=True)
    before, after = T.predict(cfg, plan, calib, 8), T.predict(cfg, plan, C.rescaled(calib, factors), 8)
    for part in ("compute_s", "optimizer_s", "overhead_s"):
        assert after[part] == pytest.approx(1.5 * before[part], rel=1e-9)
    for part in ("tp_comm_s", "pp_comm_s", "dp_comm_s", "sync_s"):
        assert after[part] == pytest.approx(before[part], rel=1e-12)
    fsdp_work = T.fsdp_overhead_s(cfg, plan, calib, 0)
    assert fsdp_work > 0 and T.fsdp_overhead_s(cfg, plan, C.rescaled(calib, factors), 0) == pytest.approx(1.5 * fsdp_work)


def test_a_real_probe_has_the_calibrations_shape():
    """calibrate.probe times the same kinds, ops, groups and sizes a calibration stores, so that
    drift can divide them: a calibration built from the probe itself drifts by exactly 1."""
    p = C.probe(2, dict(model="tiny", micro_batch=1, global_batch=2, precision="fp32", recompute=False), reps=2)
    assert p.pop("step_s") > 0
    assert set(p) == set(C.CHUNK_ROWS) and set(p["collectives"]) == set(C.COLLECTIVES) and set(p["tp_collectives"]) == set(C.TP_COLLECTIVES)
    assert all(len(f["2"]["times"]) == len(C.SIZES) for kind in C.CHUNK_ROWS for f in p[kind].values())
    factors = C.drift(p, [p])
    assert factors and set(factors) <= {"collectives 2", "tp_collectives 2"} and all(f == pytest.approx(1.0) for f in factors.values())


def test_profile_measure_probes_each_round_and_predicts_with_the_probed_calibration(tmp_path, monkeypatch, capsys):
    """On CPU with a calibration, `profile --measure` probes before each round, predicts each
    layout with the calibration rescaled by the probes, shows the calibration's own prediction
    beside it and computes the error from the probed one; --no-probe leaves the table as before."""
    import argparse
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

    from rsscale.benchmarks import calibrate

    monkeypatch.setattr(calibrate, "probe", fake_probe)
    monkeypatch.setattr(P, "bench_command", lambda opts, n: [opts.summary_json])
    monkeypatch.setattr(P.subprocess, "call", fake_call)
    args = argparse.Namespace(gpus=2, max_measure=1, measure_spread=False, rounds=2, warmup=0, steps=1, peak_tflops=1.0, no_probe=False,
                              peak_tflops_given=True, results=str(tmp_path / "r.db"), validation_out=None)
    assert P.measure(cfg, tp, args, calib) == 0
    assert events == ["probe", "bench", "probe", "bench"]
    out = capsys.readouterr().out
    assert "collectives 2 x3.00" in out and "calibration only s" in out
    cells = [c.strip() for c in [line for line in out.splitlines() if line.startswith("| TP2")][0].strip("|").split("|")]
    expected = T.predict(cfg, tp[0]["plan"], C.rescaled(calib, {"collectives 2": 3.0}), os.cpu_count())["step_s"]
    assert float(cells[2]) == pytest.approx(expected, abs=1e-4) and float(cells[3]) == pytest.approx(tp[0]["step_s"], abs=1e-4)
    assert float(cells[2]) > float(cells[3]) and float(cells[6].rstrip(" %")) == pytest.approx(100 * (expected - 1), abs=0.06)
    events.clear()
    assert P.measure(cfg, tp, argparse.Namespace(**{**vars(args), "no_probe": True}), calib) == 0
    assert events == ["bench", "bench"] and "calibration only" not in capsys.readouterr().out


def test_rounds_below_one_is_a_one_line_error_in_calibrate_and_profile():
    import argparse

    from rsscale.benchmarks import profile as P

    for module, argv in ((C, ["--rounds", "0"]), (P, ["--model", "small", "--gpus", "2", "--rounds", "0"])):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        with pytest.raises(ValueError, match="--rounds"):
            module.main(parser.parse_args(argv))
