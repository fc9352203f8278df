"""Analytic model: hand-computed cases, counted parameters, FLOPs counted by torch's
FlopCounterMode and activation bytes counted by autograd's saved-tensor hooks on the CPU MAE."""

import pytest
import torch
from torch.utils import flop_counter

from rsscale.benchmarks.prediction import analytic as A
from rsscale.scaling.model.mae import build_mae, masking_noise
from rsscale.scaling.spec.config import ViTConfig, get_preset, mae_step_flops, param_count
from rsscale.scaling.spec.layout import Layout

# Hand-checkable shape: 16x16 px, patch 8 -> N=4 patches, V=1 visible, widths 8 / 8.
HAND = ViTConfig("hand", width=8, heads=2, mlp=16, depth=2, branches=2, img_size=16, patch_size=8,
                 dec_width=8, dec_depth=1, dec_heads=2)


def test_block_activation_bytes_by_hand():
    # s=5, h=8, m=16, 2 heads, K=1, t=1, fp32. Per sublayer LN: input 5*8*4=160, mean+rstd 40,
    # output 160 -> 2*360=720; q/k/v/o 5*32*4=640, LSE 2*5*4=40; fc1 out + GELU out 2*5*16*4=640
    # -> 2040; without flash + 2*25*4=200 probabilities.
    assert A.block_activation_bytes(5, 8, 16, 2, 1, 1, False, 4, 4) == 2040
    assert A.block_activation_bytes(5, 8, 16, 2, 1, 1, False, 4, 4, flash=False) == 2240
    # selective recompute keeps q/k/v/o but neither the LSE nor the probabilities
    assert A.block_activation_bytes(5, 8, 16, 2, 1, 1, False, 4, 4, flash=False, recompute="selective") == 2000
    # K=2, t=2, SP (5 tokens padded to 6, 3 per rank), bf16 autocast, fp32 residual. Per sublayer
    # LN: input 3*8*4=96, stats 24, fp32 outputs 2*96, the K>1 path's normed 96 -> 2*408=816;
    # q/k/v/o 2*5*32*2/2=320, LSE 2*2*5*4/2=40; fc1 out (bf16 under SP) + GELU out 2*160 -> 1496.
    assert A.block_activation_bytes(5, 8, 16, 2, 2, 2, True, 2, 4) == 1496
    # per micro-batch: stacked LN weights 2*K*h*4 (x2 for K=1: weight and bias), and under
    # autocast the bf16 copies of proj and fc2 weights K*(h*h + m*h)/t*2.
    assert A.block_micro_bytes(8, 16, 2, 2, 2, 4) == 2 * 2 * 8 * 4 + 2 * (64 + 128) / 2 * 2
    assert A.block_micro_bytes(8, 16, 1, 1, 4, 4) == 2 * 8 * 4 * 2
    # The same K=2 SP block with bf16 weights (w=2): the LN outputs the Column linears save are
    # bf16 (2*3*8*2=96 instead of 192) -> 2*312=624 + 360 + 320 = 1304; per micro-batch only the
    # stacked bf16 LN weights 2*2*8*2 = 64 (no autocast weight copies).
    assert A.block_activation_bytes(5, 8, 16, 2, 2, 2, True, 2, 4, w=2) == 1304
    assert A.block_micro_bytes(8, 16, 2, 2, 2, 4, w=2) == 64


def test_bytes_per_param_and_zero_sharding():
    assert A.bytes_per_param("bf16", 1) == {"params": 2, "grads": 4, "optimizer": 12}
    assert A.bytes_per_param("fp32", 2) == {"params": 4, "grads": 4, "optimizer": 4}
    assert A.bytes_per_param("bf16", 4) == {"params": 2, "grads": 4, "optimizer": 3}


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_stage_params_sum_to_the_model(tp, pp):
    """Over all stages and TP ranks, split parts add up once and replicated parts t times."""
    cfg = get_preset("mini")
    total = sum(sum(A.stage_params(cfg, tp, pp, s).values()) for s in range(pp)) * tp
    split, rep = A.block_param_split(cfg.width, cfg.mlp, cfg.branches)
    dsplit, drep = A.block_param_split(cfg.dec_width, cfg.dec_mlp, 1)
    replicated = cfg.depth * rep + cfg.dec_depth * drep + param_count(cfg, "mae") - cfg.depth * (split + rep) - cfg.dec_depth * (dsplit + drep)
    assert total == param_count(cfg, "mae") + (tp - 1) * replicated


def test_stage_params_match_built_stages():
    cfg = get_preset("mini")
    for stage, (first, last, rng) in enumerate([(True, False, (0, 2)), (False, True, (2, 4))]):
        m = build_mae(cfg, pre_process=first, post_process=last, layer_range=rng)
        counted = {"trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
                   "frozen": sum(p.numel() for p in m.parameters() if not p.requires_grad)}
        assert A.stage_params(cfg, 1, 2, stage) == counted


def test_hand_config_memory_and_in_flight():
    plan = A.Plan(Layout(tp=1, pp=2, dp=2, micro_batch=1, global_batch=8), precision="fp32", distributed_optimizer=True)
    assert [A.in_flight(plan.layout, s) for s in (0, 1)] == [[0, 0], [0]]
    mem = A.memory_per_stage(HAND, plan)
    n0 = A.stage_params(HAND, 1, 2, 0)
    assert mem[0]["params"] == 4 * (n0["trainable"] + n0["frozen"])
    assert mem[0]["optimizer"] == 8 * n0["trainable"] / 2
    # stage 0: one encoder block on s=2 tokens (cls + 1 visible), K=2, fp32, two micro-batches in
    # flight. Block per image: LN 2*(64 + 16 + 128 + 64) = 544, attention 2*2*32*4 + 2*2*2*4 = 544,
    # MLP 2*(2*2*16*4) = 512; per micro-batch the stacked LN weights 2*2*8*4 = 128. Stage extras:
    # the image 3*16*16*4, the masking index 8, the embedded patches 4*8*4, the stage output 2*8*4.
    blk = 544 + 544 + 512
    assert mem[0]["activations"] == 2 * (blk + 128 + 3 * 256 * 4 + 8 + 128 + 64)
    est = A.estimate(HAND, plan)
    assert est.step_flops == 8 * mae_step_flops(HAND) and 0 < est.mfu < 1


def _sdpa(query, key, value, *args, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def test_step_flops_match_counted_reference():
    """FlopCounterMode (with CPU flash attention counted by torch's own SDPA formulas) within 2%.
    The analytic count includes the patch embedding's input gradient, which autograd skips."""
    cfg, B = get_preset("mini"), 2
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward}
    model = build_mae(cfg)
    imgs, noise = torch.randn(B, 3, cfg.img_size, cfg.img_size), masking_noise(B, cfg, torch.Generator().manual_seed(0))
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(imgs, noise=noise)[0].backward()
    counted = counter.get_total_flops() / B
    assert counted == pytest.approx(mae_step_flops(cfg), rel=0.02)


def test_activation_bytes_match_saved_tensors():
    """Bytes autograd saves for backward (parameters and the input excluded) vs the prediction."""
    cfg, B = get_preset("mini"), 2
    model = build_mae(cfg)
    imgs, noise = torch.randn(B, 3, cfg.img_size, cfg.img_size), masking_noise(B, cfg, torch.Generator().manual_seed(1))
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {imgs.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(imgs, noise=noise)
    measured = sum(n for ptr, n in saved.items() if ptr not in skip)
    predicted = A.stage_activation_bytes(cfg, A.Plan(Layout(micro_batch=B, global_batch=B), precision="fp32"), 0)
    assert predicted == pytest.approx(measured, rel=0.10)


def test_bad_plan_is_rejected():
    with pytest.raises(ValueError, match="precision"):
        A.Plan(Layout(), precision="int8")
    with pytest.raises(ValueError, match="either FSDP or ZeRO-1"):
        A.Plan(Layout(dp=2), fsdp=True, distributed_optimizer=True)


def test_fsdp_memory_and_traffic_by_hand():
    """FSDP over d=4: weights, gradients and moments are 4, 4 and 8 bytes per parameter over d; the
    DP traffic per micro-batch is (d-1)/d of (all weights + block weights again + trainable grads) x 4."""
    cfg = get_preset("tiny")
    plan = A.Plan(Layout(dp=4, micro_batch=1, global_batch=8), fsdp=True, precision="fp32")
    n = A.stage_params(cfg, 1, 1, 0)
    mem = A.memory_per_stage(cfg, plan)[0]
    assert mem["params"] == (n["trainable"] + n["frozen"]) * 4 / 4 and mem["grads"] == n["trainable"] * 4 / 4
    assert mem["optimizer"] == n["trainable"] * 8 / 4
    blocks = A.fsdp_block_params(cfg, 1, 1, 0)
    assert len(blocks) == cfg.depth + cfg.dec_depth and sum(blocks) < n["trainable"]
    hw = A.Hardware(peak_flops=1e30, bandwidth=1e9, hbm_bytes_per_s=1e30)  # only the traffic takes time, at 1 GB/s
    traffic = A.estimate(cfg, plan, hw).time["dp_comm_s"] / plan.layout.num_micro * 1e9
    assert traffic == pytest.approx(4 * 3 / 4 * (n["trainable"] + n["frozen"] + sum(blocks) + n["trainable"]), rel=1e-12)
    ddp = A.estimate(cfg, A.Plan(Layout(dp=4, micro_batch=1, global_batch=8), precision="fp32"))
    assert A.estimate(cfg, plan).memory["total"] < ddp.memory["total"]


def test_profile_enumerates_valid_plans_and_ranks_fits_first():
    from rsscale.benchmarks.autolayout import enumerate_plans, rank_plans
    from rsscale.scaling.spec.layout import validate_layout

    cfg = get_preset("mini")
    plans = enumerate_plans(cfg, 4, 16, "fp32")
    assert plans and all(not validate_layout(p.layout, cfg, 4) for p in plans)
    layouts = {(p.layout.tp, p.layout.pp, p.layout.dp, p.layout.sp) for p in plans}
    assert {(1, 1, 4, False), (2, 2, 1, True), (4, 1, 1, True), (1, 4, 1, False)} <= layouts
    assert not any((p.distributed_optimizer or p.fsdp) and p.layout.dp == 1 for p in plans)
    assert {p.recompute for p in plans} == {"none", "selective", "full"} and any(p.fsdp for p in plans)
    budget = sorted(A.estimate(cfg, p).memory["total"] for p in plans)[len(plans) // 2]
    rows = rank_plans(cfg, plans, A.Hardware(), budget)
    fits = [r["fits"] for r in rows]
    assert fits == sorted(fits, reverse=True) and 0 < sum(fits) < len(rows)
    speeds = [r["img_s"] for r in rows if r["fits"]]
    assert speeds == sorted(speeds, reverse=True)


def test_a_deferred_fsdp_sync_is_a_plan_of_its_own_faster_and_larger():
    """profile offers FSDP with its sync deferred (flag D) only where it does something (several
    micro-batches, one chunk per stage); it is predicted faster (fewer collectives) and larger (the
    unsharded stage) than the same FSDP plan synced per micro-batch, and --layout auto runs it."""
    import dataclasses

    from rsscale.benchmarks.autolayout import enumerate_plans, layout_flags

    cfg = get_preset("mini")
    plans = enumerate_plans(cfg, 4, 16, "fp32")
    deferred = [p for p in plans if p.defer_fsdp_sync]
    assert deferred and all(p.fsdp and p.flags[1] == "D" and p.layout.num_micro > 1 and p.layout.vpp == 1 for p in deferred)
    assert {p.layout for p in plans if p.fsdp and not p.defer_fsdp_sync and p.layout.num_micro > 1 and p.layout.vpp == 1} == {
        p.layout for p in deferred}
    for p in deferred[:4]:
        plain = A.estimate(cfg, dataclasses.replace(p, defer_fsdp_sync=False))
        est = A.estimate(cfg, p)
        assert est.step_time_s < plain.step_time_s and est.memory["total"] > plain.memory["total"]
    assert layout_flags(deferred[0])[-2:] == ["--fsdp", "--defer-fsdp-sync"]




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


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_what_sp_and_selective_recompute_save_is_what_the_counted_model_saves(precision):
    """Switching sequence parallelism or selective recompute on changes each pipeline stage's
    activation bytes by exactly what the rank built on fake tensors changes by (count.py): the
    analytic terms that depend on them (the blocks, the encoder norm and loss of the last stage)
    are the counted ones, not just within the few percent of the totals."""
    from rsscale.benchmarks.prediction import analytic as A
    from rsscale.benchmarks.prediction.count import count_plan
    from rsscale.scaling.spec.config import get_preset
    from rsscale.scaling.spec.layout import Layout

    cfg = get_preset("small")

    def activations(**plan):
        p = A.Plan(Layout(tp=2, pp=2, micro_batch=2, global_batch=4, sp=plan.pop("sp", False)), precision=precision, **plan)
        return [c.activations for c in count_plan(cfg, p)], [a["activations"] for a in A.memory_per_stage(cfg, p)]

    (c0, a0), (c1, a1), (c2, a2) = activations(), activations(sp=True), activations(sp=True, recompute="selective")
    assert [x - y for x, y in zip(a1, a0)] == [x - y for x, y in zip(c1, c0)]  # SP, both stages
    assert [x - y for x, y in zip(a2, a1)] == [x - y for x, y in zip(c2, c1)]  # selective recompute
    assert all(d != 0 for d in (a1[0] - a0[0], a1[1] - a0[1], a2[0] - a1[0], a2[1] - a1[1]))


@pytest.mark.parametrize("switches", [dict(precision="fp32", recompute="selective", distributed_optimizer=True, bucket_mb=2.5, overlap_grad_reduce=False),
                                      dict(precision="bf16", recompute="full", fsdp=True)])
def test_a_plan_and_its_run_sections_are_one_description(switches):
    """What `profile --measure` hands `bench` (Plan.run_sections) is read back into the same plan
    (Plan.of, as bench predicts it): every switch crosses, none falls back to its default."""
    from rsscale.benchmarks.measurement.bench import BenchConfig
    from rsscale.benchmarks.prediction import analytic as A
    from rsscale.scaling.spec.layout import Layout

    plan = A.Plan(Layout(tp=2, dp=2, sp=True, micro_batch=2, global_batch=8), **switches)
    assert A.Plan.of(BenchConfig(**plan.run_sections())) == plan
    assert A.Plan.of(BenchConfig(**plan.run_sections()), Layout(dp=4)).layout == Layout(dp=4)
