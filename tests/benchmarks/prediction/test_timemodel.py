"""Calibration fits and the step-time model (benchmarks/measurement/calibrate.py, timemodel.py): one model, at
measured or datasheet rates."""

import os

import pytest

from rsscale.benchmarks.measurement import calibrate as C
from rsscale.benchmarks.prediction import analytic as A
from rsscale.benchmarks.prediction import cpu_sharing as S
from rsscale.benchmarks.prediction import timemodel as T
from rsscale.scaling.spec.config import get_preset, mae_forward_flops, mae_step_flops
from rsscale.scaling.spec.layout import Layout


def test_latency_bandwidth_fit_recovers_a_known_line():
    sizes = [2**k for k in range(10, 20)]
    fit = C.fit_latency_bandwidth(sizes, [25e-6 + n / 3e9 for n in sizes])
    assert fit["latency_s"] == pytest.approx(25e-6, rel=1e-6) and fit["bandwidth_bytes_per_s"] == pytest.approx(3e9, rel=1e-6)


def _uniform(flops=1e12, bw=1e30, lat=0.0, net=1e30):
    """A calibration where every GEMM / attention runs at `flops`, elementwise at `bw` bytes/s."""
    coll = {op: {"2": {"latency_s": lat, "bandwidth_bytes_per_s": net}} for op in C.COLLECTIVES}
    return {"gemm": [{"shape": [1, 1, 1], "flops_per_s": flops}], "attention": [{"shape": [1, 1, 1, 1], "flops_per_s": flops}],
            "layernorm": [{"shape": [1, 1], "bytes_per_s": bw}], "collectives": coll}


SUPERVISED = get_preset("small").replace(name="small-supervised", dec_depth=0, mask_ratio=0.0, num_classes=10)


@pytest.mark.parametrize("cfg", [get_preset("small"), SUPERVISED], ids=["mae", "supervised"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_compute_time_adds_up_to_the_step_flops(cfg, recompute):
    """With one FLOP rate and free elementwise work, one process's step time is exactly the
    model's matmul FLOPs (scaling.config, an independent count) over that rate, for a measured
    table and for a datasheet calibration at that rate (no matmul roll-off, free memory), split
    over two pipeline stages or not."""
    plan = A.Plan(Layout(micro_batch=4, global_batch=8), precision="fp32", recompute=recompute)
    t = T.predict(cfg, plan, _uniform())
    assert t["step_s"] == pytest.approx(8 * mae_step_flops(cfg, recompute) / 1e12, rel=1e-9)
    assert t["bubble_s"] == 0 and t["dp_comm_s"] == 0 and t["tp_comm_s"] == 0
    sheet = T.datasheet_calibration(A.Hardware(peak_flops=2e12, efficiency=0.5, half_rows=0, hbm_bytes_per_s=1e30))
    assert T.predict(cfg, plan, sheet)["step_s"] == pytest.approx(t["step_s"], rel=1e-9)
    pp = A.Plan(Layout(pp=2, micro_batch=4, global_batch=8), precision="fp32", recompute=recompute)
    stages = [T.stage_micro_s(cfg, pp, sheet, s)["compute"] for s in range(2)]
    assert 2 * sum(stages) == pytest.approx(t["step_s"], rel=1e-9)  # the stages' FLOPs add up to the model's


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


def _pipeline_s(times: list[float], M: int, V: int = 1) -> float:
    """compute + bubble of the time model's step for stages taking `times` per micro-batch."""
    plan = A.Plan(Layout(pp=len(times), vpp=V, micro_batch=1, global_batch=M), precision="fp32")
    out = T.step_from_stages(plan, _uniform(), [{"compute": t, "tp_comm": 0.0, "pp_comm": 0.0} for t in times], trainable=1, width=1)
    return out["compute_s"] + out["bubble_s"]


@pytest.mark.parametrize("times,M", [([1.0, 1.0, 1.0, 1.0], 4), ([1.0, 1.0, 1.0, 3.0], 4), ([1.0, 2.0], 2), ([1.0, 2.0, 1.5, 2.5], 8)])
def test_one_f_one_b_step_matches_a_schedule_simulation(times, M):
    """The time model's 1F1B step, M x t_slow + (sum t - t_slow), finishes when a simulated 1F1B
    timeline does: (M + P - 1) t when balanced, less when the last stage is the slowest (small's
    holds the decoder); an upper bound when an earlier stage is the slowest (it then waits less
    than the others' sum)."""
    assert _pipeline_s(times, M) == pytest.approx(_one_f_one_b_makespan(times, M), rel=1e-12)
    early = times[::-1]
    assert _pipeline_s(early, M) >= _one_f_one_b_makespan(early, M) - 1e-12


@pytest.mark.parametrize("V", [1, 2, 3])
def test_balanced_stages_take_m_plus_p_minus_one_over_v_rounds(V):
    """Four balanced stages of 0.5 s per micro-batch, 6 micro-batches, V interleaved chunks:
    (M + (P - 1) / V) x t."""
    assert _pipeline_s([0.5] * 4, 6, V) == pytest.approx((6 + 3 / V) * 0.5, rel=1e-12)


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

    from rsscale.scaling.spec.run import Compute, Recording
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    out = []
    for layout, recompute in specs:
        trainer = Trainer.build(TrainConfig(model="small", parallel=Layout(**layout), compute=Compute(recompute=recompute), data="random",
                                             recording=Recording(record=False)))
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
            per_block = S.tp_collectives_per_block(layout.get("sp", False), recompute)
            assert sum(calls.values()) - sp_boundaries - round(t["sync_s"]) == per_block * (cfg.depth + cfg.dec_depth), (layout, recompute)


def test_overlapped_dp_reduction_exposes_only_what_backward_cannot_hide():
    # by hand: 10 s of reduction, 8 s of backward, a quarter of the gradient per bucket
    assert T.exposed_reduce_s(10.0, 8.0, 0.25) == pytest.approx(10 - 8 * 0.75)  # outlasts backward
    assert T.exposed_reduce_s(4.0, 8.0, 0.25) == pytest.approx(1.0)  # hidden but for the last bucket
    assert T.exposed_reduce_s(4.0, 8.0, 1.0) == pytest.approx(4.0)  # one bucket: nothing hidden
    cfg = get_preset("small")
    layout = Layout(dp=2, micro_batch=4, global_batch=8)
    trainable = A.stage_params(cfg, 1, 1, 0)["trainable"]
    calib = _uniform(flops=1e10, net=trainable * 4 / 1e-3)  # the all-reduce takes 1 ms, far less than a backward (~90 ms)
    off = T.predict(cfg, A.Plan(layout, precision="fp32", overlap_grad_reduce=False), calib)
    on = T.predict(cfg, A.Plan(layout, precision="fp32", bucket_mb=trainable * 4 / 2**20 / 4), calib)  # 4 buckets
    assert off["dp_comm_s"] == pytest.approx(1e-3) and on["dp_comm_s"] == pytest.approx(1e-3 / 4)
    assert off["step_s"] - on["step_s"] == pytest.approx(0.75e-3)
    est_off, est_on = (A.estimate(cfg, A.Plan(layout, precision="fp32", overlap_grad_reduce=o, bucket_mb=1.0)) for o in (False, True))
    assert est_on.time["dp_comm_s"] < est_off.time["dp_comm_s"] and est_on.time["compute_s"] == est_off.time["compute_s"]


def test_datasheet_collectives_are_ring_costs_by_hand():
    """At B bytes/s with everything else free: a ring over 2 ranks sends an all-reduced tensor
    once, and a shard once per all-gather or reduce-scatter. TP2 all-reduces each sublayer's
    output forward (s h 4 bytes per image, fp32) and its K stacked input gradients backward; under
    SP (tokens padded to even, each rank's shard) the all-gathers and reduce-scatters of the same
    tensors, LayerNorm and bias gradient all-reduces and the region's entries and exits. DP4
    all-reduces the fp32 gradients (2 x 3/4 of them), ZeRO-1 reduce-scatters them (3/4) and
    all-gathers the weights (3/4); a pipeline sends each micro-batch's hidden states each way."""
    cfg, B, mb = get_preset("small"), 1e9, 2
    K, h, s_e, s_d = cfg.branches, cfg.width, cfg.num_visible + 1, cfg.num_patches + 1
    sheet = T.datasheet_calibration(A.Hardware(peak_flops=1e30, bandwidth=B, hbm_bytes_per_s=1e30))

    def run(zero=False, **layout):
        return T.predict(cfg, A.Plan(Layout(**layout), precision="fp32", overlap_grad_reduce=False, distributed_optimizer=zero), sheet)

    tp = run(tp=2, micro_batch=mb, global_batch=mb)["tp_comm_s"]
    assert tp == pytest.approx(mb * 2 * 4 * (cfg.depth * (1 + K) * s_e * h + cfg.dec_depth * 2 * s_d * h) / B, rel=1e-12)
    sp = run(tp=2, sp=True, micro_batch=mb, global_batch=mb)["tp_comm_s"]
    e_shard, d_shard = mb * (s_e + 1) // 2 * h * 4, mb * (s_d + 1) // 2 * h * 4  # 17 and 65 tokens padded to 18 and 66
    sublayer = [(shard * (3 * k + 2) + (2 * k + 1) * h * 4) for shard, k in ((e_shard, K), (d_shard, 1))]
    assert sp == pytest.approx((2 * cfg.depth * sublayer[0] + 2 * cfg.dec_depth * sublayer[1] + 2 * e_shard + 2 * d_shard) / B, rel=1e-12)
    trainable = A.stage_params(cfg, 1, 1, 0)["trainable"]
    assert run(dp=4, micro_batch=mb, global_batch=4 * mb)["dp_comm_s"] == pytest.approx(2 * 3 / 4 * trainable * 4 / B, rel=1e-12)
    assert run(dp=4, micro_batch=mb, global_batch=4 * mb, zero=True)["dp_comm_s"] == pytest.approx(2 * 3 / 4 * trainable * 4 / B, rel=1e-12)
    assert run(pp=2, micro_batch=mb, global_batch=2 * mb)["pp_comm_s"] == pytest.approx(2 * 2 * mb * s_e * h * 4 / B, rel=1e-12)


def test_a_measured_calibration_takes_what_it_did_not_measure_from_the_datasheet():
    """A one-GPU calibration has no collectives: alone it cannot predict TP2; with the datasheet's
    ring for them (timemodel.calibration) it predicts its measured compute and the datasheet's
    communication."""
    cfg, hw = get_preset("small"), A.Hardware(bandwidth=1e9)
    measured = {k: v for k, v in _uniform(flops=1e11, bw=1e10).items() if k != "collectives"}
    plan = A.Plan(Layout(tp=2, micro_batch=4, global_batch=8), precision="fp32")
    with pytest.raises(ValueError, match="no all_reduce fit"):
        T.predict(cfg, plan, measured)
    both = T.predict(cfg, plan, T.calibration(hw, measured))
    assert both["compute_s"] == T.predict(cfg, plan, _uniform(flops=1e11, bw=1e10))["compute_s"]
    assert both["tp_comm_s"] == T.predict(cfg, plan, T.datasheet_calibration(hw))["tp_comm_s"] > 0


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_counted_work_is_timed_by_the_same_terms(recompute):
    """Fine-tuning's prediction from counted work (predict_counted) is `predict` when the counted
    work is a model predict can walk: a supervised ViT's forward FLOPs on one TP rank (blocks / t,
    patch embedding and head whole) give the same step, part by part."""
    cfg = SUPERVISED
    plan = A.Plan(Layout(tp=2, dp=2, micro_batch=2, global_batch=8), precision="fp32", recompute=recompute)
    calib = _uniform(flops=1e11, bw=1e10, lat=1e-4, net=1e9)
    f = mae_forward_flops(cfg)
    work = {"flops": 2 * (f["encoder"] / 2 + f["patch_embed"] + f["pred"]), "block_flops": 2 * f["encoder"] / 2,
            "trainable": A.stage_params(cfg, 2, 1, 0)["trainable"]}
    assert T.predict_counted(cfg, plan, calib, work, cfg.num_patches + 1) == pytest.approx(T.predict(cfg, plan, calib), rel=1e-9)


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
    from rsscale.scaling.runtime.store import environment

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


def test_profile_measure_rounds_are_round_robin_and_the_table_uses_their_median(tmp_path, monkeypatch, capsys):
    """`profile --measure --rounds 3`: each layout is run once per round, layouts in turn (so a slow
    spell of the machine hits all of them), the table's measurement is the median of the rounds
    with their range, and a layout that fails is not run again and counts as failed."""
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

    monkeypatch.setattr(P, "bench_command", lambda opts, n: [opts.measure.summary_json])
    monkeypatch.setattr(P.subprocess, "call", fake_call)
    args = P.ProfileConfig(model="tiny", gpus=2, max_measure=3, rounds=3, warmup=0, steps=1, peak_tflops=1.0, results=str(tmp_path / "r.db"))
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


def test_rounds_below_one_is_a_one_line_error_in_calibrate_and_profile():
    import argparse

    from rsscale.benchmarks import profile as P

    for module, argv in ((C, ["--rounds", "0"]), (P, ["--model", "small", "--gpus", "2", "--rounds", "0"])):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        with pytest.raises(ValueError, match="--rounds"):
            module.main(parser.parse_args(argv))
