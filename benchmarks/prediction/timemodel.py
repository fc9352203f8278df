"""Step time of a layout: the sum of the per-operation times of one training step as our trainer
runs it, at the rates of a calibration.

    t = predict(cfg, plan, calib)   # calib: calibrate.latest(...), or datasheet_calibration(hw)
    t["step_s"], t["compute_s"], t["tp_comm_s"], t["pp_comm_s"], t["bubble_s"], t["dp_comm_s"], t["sync_s"], t["optimizer_s"], t["overhead_s"]

One model, two sources of rates (docs/PROFILER.md):
  measured   `rsscale calibrate` (benchmarks/measurement/calibrate.py): GEMM and attention FLOP/s per shape
             (the nearest measured shape in log space serves), LayerNorm bytes/s, a latency +
             bandwidth fit per collective and group size, and fitted overheads
  datasheet  `datasheet_calibration(hw)`: GEMM and attention at peak x efficiency x rows / (rows +
             half_rows), elementwise passes at the memory (HBM) bandwidth, collectives by the ring
             algorithm at the link bandwidth (the network's for a group spanning nodes), no
             latency, no overhead
A calibration measured on CPU (one thread per process) also describes N processes sharing a few
cores; benchmarks/prediction/cpu_sharing.py applies that, and is loaded only for such a calibration.

Per micro-batch on each pipeline stage (one TP rank):
  matmuls     every GEMM of the stage (qkv, proj, fc1, fc2 per branch and block; patch embedding,
              decoder embedding and head, or a supervised model's classification head); backward
              = 2x forward; + 1x forward of the blocks with full recompute
  attention   4 B H N^2 Dh FLOPs; backward 2x; + 1x forward with selective or full recompute
  elementwise LayerNorms, GELU, residual adds and casts, as bytes over the LayerNorm (memory)
              bandwidth (per block: 12 s' h + 6 K s m / t values of 4 bytes; backward 2x)
  TP comm     per sublayer, forward: an all-reduce of the output (or under SP the all-gather of the
              K stacked LayerNorm outputs and a reduce-scatter); backward: an all-reduce of the K
              stacked input gradients (SP: all-gather of the output gradient, all-gather of the
              inputs again, reduce-scatter of the K stacked input gradients, and three small
              all-reduces: the LayerNorm weight and bias gradients and the Row bias gradient);
              full recompute runs the forward ones again (but the block's last output reduction:
              the checkpoint stops once backward has its inputs); under SP also the region's
              entries and exits (mae.py: an all-gather each). Never overlapped: blocks wait on each.
  PP comm     one send/recv of the stage's fp32 hidden states each way, per chunk (V x interleaved)
A collective's size is an all-reduce's tensor, an all-gather's or reduce-scatter's shard on one
rank (what calibrate times), a send's message. Its group spans `span` consecutive ranks (megatron's
order: TP innermost, then DP, then PP: a TP group spans tp, a DP group tp x dp, a pipeline send
2 x tp x dp), which picks the link or the network in a datasheet calibration.
The step (1F1B): the slowest stage runs all M micro-batches, and the other stages' times for one
micro-batch fill and drain the pipeline: M x t_slow + (sum of all stages' t - t_slow) / V with V
interleaved chunks per rank ((M + (P - 1)/V) x t when the stages are balanced), + the exposed part
of the DP gradient reduction (an all-reduce of the fp32 gradient buffer, or under ZeRO-1 a
reduce-scatter of it; with `overlap_grad_reduce` only the last bucket or what outlasts the last
micro-batch's backward, `exposed_reduce_s`) + the ZeRO-1 all-gather of the updated weights, + the
step's small synchronizing all-reduces (`sync_comm_s`), + the optimizer's elementwise passes
(about 16 fp32 values per parameter of the shard) at the LayerNorm bandwidth. Under FSDP the DP
term is instead its all-gathers and reduce-scatters over the step (`fsdp_step_s`), and each
stage's compute carries FSDP's own work per unit (`fsdp_overhead_s`, calibrated only).

What the operator sum misses on a measured device (framework dispatch and autograd bookkeeping
per block, the many small ops of masking, loss and branch stacking, the loop's per-step work) is
fitted, not guessed: `fit_overhead` solves
    measured = compute_factor x (operator compute) + per_block_pass_s x (block passes) + per_step_s + (the rest)
by non-negative least squares over calibrate's one-process steps; the multi-process layouts the
profiler ranks are never part of the fit. A datasheet calibration has no such terms.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from rsscale.benchmarks.prediction.analytic import Hardware, Plan, _local_tokens, _tokens, fsdp_units, stage_blocks, stage_params
from rsscale.scaling.spec.config import ViTConfig
from rsscale.scaling.spec.layout import Layout


# ------------------------------------------------------------------------------- rates
def datasheet_calibration(hw: Hardware) -> dict:
    """The calibration a device's datasheet gives (module doc): what `predict` uses where no
    measured calibration applies."""
    rate = {"flops_per_s": hw.peak_flops * hw.efficiency, "half_rows": hw.half_rows}
    return {"gemm": rate, "attention": rate, "layernorm": {"bytes_per_s": hw.hbm_bytes_per_s}, "ring": hw}


def calibration(hw: Hardware, measured: dict | None = None) -> dict:
    """The rates `predict` runs on: `measured`'s (calibrate.latest) where it has them, `hw`'s
    datasheet ones for the rest (a one-GPU calibration has no collectives)."""
    return {**datasheet_calibration(hw), **(measured or {})}


def saturation(rows: int, half_rows: int) -> float:
    """Heuristic fraction of the efficiency a matmul with `rows` rows reaches: rows / (rows + half_rows)."""
    return rows / (rows + half_rows)


def _nearest(table: list[dict], shape, key: str) -> float:
    """The calibrated rate of the entry whose shape is closest in log space."""
    if not table:
        raise ValueError("the calibration has no entries for this operation; run `rsscale calibrate` with these models")
    logs = [math.log(max(x, 1)) for x in shape]
    best = min(table, key=lambda e: sum((math.log(max(a, 1)) - b) ** 2 for a, b in zip(e["shape"], logs)))
    return best[key]


def _rate(table, shape, key: str, rows: int = 0) -> float:
    """An operation's rate: a measured table's nearest shape, or a datasheet rate (x the
    saturation of `rows` where it has half_rows)."""
    if isinstance(table, dict):
        return table[key] * (saturation(rows, table["half_rows"]) if "half_rows" in table else 1.0)
    return _nearest(table, shape, key)


def _gemm_s(calib, rows, k, n):
    return 2 * rows * k * n / _rate(calib["gemm"], (rows, k, n), "flops_per_s", rows)


def _elementwise_s(calib, mb, s, h, m, K, t, sp) -> float:
    """One block's forward elementwise passes on one micro-batch (module doc)."""
    nbytes = 4 * mb * (12 * _local_tokens(s, t, sp) * h * K + 6 * K * s * m / t)
    return nbytes / _rate(calib["layernorm"], (mb * s, h), "bytes_per_s")


# ------------------------------------------------------------------------------- collectives
def ring_s(hw: Hardware, op: str, nbytes: float, group: int, span: int) -> float:
    """The ring algorithm's time (no latency) at the bandwidth of a group spanning `span` ranks:
    each rank sends 2 (n-1)/n of an all-reduce's tensor, (n-1) shards of an all-gather or
    reduce-scatter, and a send's message once."""
    sent = {"all_reduce": 2 * (group - 1) / group * nbytes, "send_recv": nbytes}.get(op, (group - 1) * nbytes)
    return sent / hw.bandwidth_over(span)


def _cpu(calib: dict):
    """benchmarks.cpu_sharing for a calibration measured on CPU (one thread per process), else None."""
    if calib.get("threads_per_process") != 1:
        return None
    from rsscale.benchmarks.prediction import cpu_sharing

    return cpu_sharing


def collective_s(calib: dict, op: str, nbytes: float, group: int, span: int | None = None, layout: Layout | None = None,
                 tp: bool = False, after_s: float | None = None) -> float:
    """Seconds of one `op` of `nbytes` (module doc) over `group` ranks spanning `span` (default
    `group`): the calibration's latency + bytes / bandwidth fit of the nearest group size, or,
    for an op it has no fit of, `ring_s` over its datasheet links. A CPU calibration's fits are
    read by cpu_sharing.collective_s with the run's `layout`, whether it is a TP group's (`tp`)
    and the compute `after_s` before it; other calibrations ignore those three."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    fits = calib.get("collectives", {}).get(op)
    if not fits:
        if "ring" not in calib:
            raise ValueError(f"the calibration has no {op} fit; run `rsscale calibrate --nproc N`")
        return ring_s(calib["ring"], op, nbytes, group, span or group)
    cpu = _cpu(calib)
    if cpu:
        active = layout.tp * layout.dp * cpu.busy_stages(layout) if tp and layout else None
        return cpu.collective_s(calib, op, nbytes, group, layout.world_size if layout else None, active, after_s)
    fit = fits[min((k for k in fits if "@" not in k), key=lambda g: abs(int(g) - group))]
    return fit["latency_s"] + nbytes / fit["bandwidth_bytes_per_s"]


def _sublayer_comm(calib, mb, s, h, K, t, sp, e, layout, gap_s) -> tuple[float, float, float]:
    """(forward input gather, forward output reduction, backward) TP collectives of one block
    sublayer on one micro-batch (parallel/mappings.py). Without SP: forward all-reduce of the
    output, backward all-reduce of the K stacked input gradients. With SP: forward all-gather of the
    K stacked LayerNorm outputs and reduce-scatter of the output; backward all-gather of the output
    gradient, the all-gather of the inputs again, reduce-scatter of the K stacked input gradients,
    and all-reduces of the LayerNorm weight and bias gradients (K x h each) and of the summed Row
    bias gradient (h). `gap_s`: the compute before each (CPU calibrations only)."""
    if t == 1:
        return 0.0, 0.0, 0.0
    full = mb * _tokens(s, t, sp) * h  # all tokens (padded under SP) of one sublayer's output
    shard = full // t

    def c(op, nbytes):
        return collective_s(calib, op, nbytes, t, t, layout, tp=True, after_s=gap_s)

    if not sp:
        return 0.0, c("all_reduce", full * e), c("all_reduce", K * full * 4)
    backward = c("all_gather", shard * 4) + c("all_gather", K * shard * 4) + c("reduce_scatter", K * shard * 4)
    return c("all_gather", K * shard * 4), c("reduce_scatter", shard * e), backward + 2 * c("all_reduce", K * h * 4) + c("all_reduce", h * 4)


def _tp_comm(calib, n_blocks, mb, s, h, K, t, sp, e, layout, recompute, block_compute_s) -> float:
    """TP collectives of n_blocks on one micro-batch, forward and backward. Full recompute
    (torch's non-reentrant checkpoint, which stops once backward has what it needs) runs the
    forward ones again but for the block's last one, the MLP output's reduction."""
    if not n_blocks:
        return 0.0
    cpu = _cpu(calib)
    gap = cpu.tp_gap_s(block_compute_s, sp, recompute) if cpu else None
    gather, reduce, backward = _sublayer_comm(calib, mb, s, h, K, t, sp, e, layout, gap)
    again = 2 * gather + reduce if recompute == "full" else 0.0
    return n_blocks * (2 * (gather + reduce + backward) + again)


def _sp_boundary_comm(cfg: ViTConfig, L: Layout, calib: dict, stage: int) -> float:
    """SP region entries and exits on `stage` per micro-batch (mae.py): entering keeps this rank's
    tokens (its backward all-gathers the gradient), leaving all-gathers the tokens (fp32). The
    encoder enters on the first stage and leaves on the last, where the decoder enters and leaves."""
    if not L.sp or L.tp == 1:
        return 0.0

    def gather(s, h):
        return collective_s(calib, "all_gather", L.micro_batch * _local_tokens(s, L.tp, True) * h * 4, L.tp, L.tp, L, tp=True)

    enc = gather(cfg.num_visible + 1, cfg.width)
    dec = 0.0 if cfg.supervised else gather(cfg.num_patches + 1, cfg.dec_width)
    return (enc if stage == 0 else 0.0) + (enc + 2 * dec if stage == L.pp - 1 else 0.0)


def sync_comm_s(plan: Plan, calib: dict) -> float:
    """The step's small synchronizing all-reduces (scaling/train/pretrain.py, optim.py): the loss over PP and
    over DP, the gradient norm over ZeRO-1 / FSDP shards and over the model-parallel (TP x PP) group,
    and with fp16 the loss scaler's overflow flag over the world. Latency-bound: 8 bytes each."""
    L = plan.layout
    W, tdp = L.world_size, L.tp * L.dp

    def ar(group, span):
        return collective_s(calib, "all_reduce", 8, group, span, L)

    shards = L.dp if plan.distributed_optimizer or plan.fsdp else 1
    return ar(L.pp, W) + ar(L.dp, tdp) + ar(shards, tdp) + ar(L.tp * L.pp, W) + (ar(W, W) if plan.precision == "fp16" else 0.0)


def bucket_fraction(plan: Plan, trainable: float) -> float:
    """Share of a stage's gradient in one DP bucket (1: one bucket)."""
    return 1.0 if plan.bucket_mb <= 0 else min(1.0, plan.bucket_mb * 2**20 / 4 / max(trainable, 1))


def exposed_reduce_s(reduce_s: float, backward_s: float, fraction: float) -> float:
    """Gradient-reduction time left after the backward it overlaps: buckets start as backward
    produces them, so the last bucket always runs after it; if the reduction outlasts the
    backward (minus the last bucket), the rest is exposed too."""
    return max(reduce_s * fraction, reduce_s - backward_s * (1.0 - fraction))


def dp_comm_s(plan: Plan, calib: dict, trainable: float, backward_s: float) -> float:
    """The DP gradient reduction left exposed after `backward_s` of the last micro-batch's backward
    (all-reduce of the fp32 gradients, or ZeRO-1's reduce-scatter) + ZeRO-1's weight all-gather."""
    L = plan.layout
    span = L.tp * L.dp
    if plan.distributed_optimizer and L.dp > 1:  # shards of the flat buffers
        w = 4 if plan.precision == "fp32" else 2
        reduce = collective_s(calib, "reduce_scatter", trainable * 4 / L.dp, L.dp, span, L)
        gather = collective_s(calib, "all_gather", trainable * w / L.dp, L.dp, span, L)
    else:
        reduce, gather = collective_s(calib, "all_reduce", trainable * 4, L.dp, span, L), 0.0
    if plan.overlap_grad_reduce:
        reduce = exposed_reduce_s(reduce, backward_s, bucket_fraction(plan, trainable))
    return reduce + gather


def fsdp_step_s(cfg: ViTConfig, plan: Plan, calib: dict, stage: int) -> float:
    """FSDP's collectives per step on `stage`: per micro-batch and block an all-gather of its fp32
    weights in forward and again in backward and a reduce-scatter of its gradients, the root unit's
    once each; with a deferred sync, per block M + 1 all-gathers (backward leaves the weights
    gathered for the next forward) and one reduce-scatter, the root's one of each."""
    L = plan.layout
    *blocks, root = fsdp_units(cfg, L.tp, L.pp, stage)
    root_trainable = stage_params(cfg, L.tp, L.pp, stage)["trainable"] - sum(blocks)
    span = L.tp * L.dp

    def c(op, elements):
        return collective_s(calib, op, 4 * elements / L.dp, L.dp, span, L)

    reduce = sum(c("reduce_scatter", b) for b in blocks + [root_trainable])
    M = L.num_micro
    if plan.defer_fsdp_sync and M > 1:
        return (M + 1) * sum(c("all_gather", b) for b in blocks) + c("all_gather", root) + reduce
    return M * (sum(2 * c("all_gather", b) for b in blocks) + c("all_gather", root) + reduce)


# ------------------------------------------------------------------------------- one stage
def _blocks_forward_s(calib, n_blocks, mb, s, h, m, heads, K, t, sp, recompute="none") -> tuple[float, float]:
    """(compute, compute run again in backward by `recompute`) of n_blocks forward on one micro-batch."""
    if not n_blocks:
        return 0.0, 0.0
    rows = mb * s
    gemm = K * (_gemm_s(calib, rows, h, 3 * h // t) + _gemm_s(calib, rows, h // t, h) + _gemm_s(calib, rows, h, m // t) + _gemm_s(calib, rows, m // t, h))
    dh = h // heads
    attn_flops = 4 * mb * K * (heads // t) * s * s * dh
    attn = attn_flops / _rate(calib["attention"], (mb * K, heads // t, s, dh), "flops_per_s", rows)
    comp = gemm + attn + _elementwise_s(calib, mb, s, h, m, K, t, sp)
    again = {"none": 0.0, "selective": attn, "full": comp}[recompute]
    return n_blocks * comp, n_blocks * again


def block_passes(cfg: ViTConfig, plan: Plan, stage: int) -> int:
    """Block passes (forward, backward, and the recompute forward) one micro-batch makes on `stage`."""
    blocks = stage_blocks(cfg, plan.layout.pp, stage, plan.layout.vpp) + (cfg.dec_depth if stage == plan.layout.pp - 1 else 0)
    return blocks * (3 if plan.recompute == "full" else 2)


def _with_overhead(calib: dict, compute: float, passes: int) -> float:
    over = calib.get("overhead", {})
    return over.get("compute_factor", 1.0) * compute + over.get("per_block_pass_s", 0.0) * passes


def stage_micro_s(cfg: ViTConfig, plan: Plan, calib: dict, stage: int) -> dict:
    """Forward + backward time of one micro-batch on `stage`, split by kind (module doc)."""
    L = plan.layout
    t, sp, mb = L.tp, L.sp, L.micro_batch
    e = 4 if plan.precision == "fp32" else 2
    kinds = [(stage_blocks(cfg, L.pp, stage, L.vpp), cfg.num_visible + 1, cfg.width, cfg.mlp, cfg.heads, cfg.branches)]
    extra = 0.0
    if stage == 0:
        extra += _gemm_s(calib, mb * cfg.num_patches, cfg.patch_dim, cfg.width)
    if stage == L.pp - 1 and cfg.supervised:
        extra += _gemm_s(calib, mb, cfg.width, cfg.num_classes)
    elif stage == L.pp - 1:
        kinds.append((cfg.dec_depth, cfg.num_patches + 1, cfg.dec_width, cfg.dec_mlp, cfg.dec_heads, 1))
        extra += _gemm_s(calib, mb * (cfg.num_visible + 1), cfg.width, cfg.dec_width) + _gemm_s(calib, mb * (cfg.num_patches + 1), cfg.dec_width, cfg.patch_dim)
    comp, recomp, comm = 3 * extra, 0.0, _sp_boundary_comm(cfg, L, calib, stage)
    for n, s, h, m, heads, K in kinds:
        c, rc = _blocks_forward_s(calib, n, mb, s, h, m, heads, K, t, sp, plan.recompute)
        comp += 3 * c
        recomp += rc
        comm += _tp_comm(calib, n, mb, s, h, K, t, sp, e, L, plan.recompute, (3 * c + rc) / max(n, 1))
    hidden = mb * _local_tokens(cfg.num_visible + 1, t, sp) * cfg.width * 4
    pp = 2 * L.vpp * collective_s(calib, "send_recv", hidden, 2, 2 * t * L.dp, L) if L.pp > 1 else 0.0
    compute = _with_overhead(calib, comp + recomp, block_passes(cfg, plan, stage)) + fsdp_overhead_s(cfg, plan, calib, stage)
    return {"compute": compute, "tp_comm": comm, "pp_comm": pp}


def fsdp_overhead_s(cfg: ViTConfig, plan: Plan, calib: dict, stage: int) -> float:
    """FSDP's own work per micro-batch on `stage` beyond its collectives: per unit, the calibrated
    per_unit_s + s_per_byte x its fp32 bytes on this TP rank (0 without a calibration of it)."""
    f = calib.get("fsdp")
    if not plan.fsdp or not f:
        return 0.0
    return sum(f["per_unit_s"] + f["s_per_byte"] * 4 * u for u in fsdp_units(cfg, plan.layout.tp, plan.layout.pp, stage))


# ------------------------------------------------------------------------------- the step
def step_from_stages(plan: Plan, calib: dict, stages: list[dict], trainable: float, width: int, fsdp_s: float = 0.0,
                     world_cpus: int | None = None) -> dict:
    """The step (module doc, "The step") from each pipeline stage's times for one micro-batch
    (`stage_micro_s`: compute, tp_comm, pp_comm), the largest stage's trainable parameters, the
    model width (the optimizer's rows) and FSDP's collectives per micro-batch."""
    L = plan.layout
    M = L.num_micro
    cpu = _cpu(calib)
    busy, shared = cpu.slowdowns(calib, L.world_size, world_cpus) if cpu else (1.0, 1.0)
    per = [busy * st["compute"] + st["tp_comm"] + st["pp_comm"] for st in stages]
    slow = max(range(len(stages)), key=per.__getitem__)
    st = stages[slow]
    dp = fsdp_s if plan.fsdp else dp_comm_s(plan, calib, trainable, busy * st["compute"] * 2 / 3)
    shard = trainable / (L.dp if plan.distributed_optimizer or plan.fsdp else 1)
    optim = shared * 4 * 16 * shard / _rate(calib["layernorm"], (trainable // max(width, 1), width), "bytes_per_s")
    # 1F1B: the slowest stage runs every micro-batch; the others' share of one micro-batch fills and
    # drains the pipeline (V times less with V interleaved chunks): (P - 1) / V rounds when balanced
    out = {"compute_s": M * busy * st["compute"], "tp_comm_s": M * st["tp_comm"], "pp_comm_s": M * st["pp_comm"],
           "bubble_s": (sum(per) - per[slow]) / L.vpp, "dp_comm_s": dp, "sync_s": sync_comm_s(plan, calib), "optimizer_s": optim}
    if cpu:
        cpu.bound_by_cores(out, L, [s["compute"] for s in stages], shared, world_cpus)
    out["overhead_s"] = calib.get("overhead", {}).get("per_step_s", 0.0)
    out["step_s"] = sum(out.values())
    return out


def predict(cfg: ViTConfig, plan: Plan, calib: dict, world_cpus: int | None = None) -> dict:
    """Predicted step time of `plan` and its parts, in seconds (module doc). `world_cpus`: the
    cores a CPU calibration's processes share (ignored by other calibrations)."""
    L = plan.layout
    stages = [stage_micro_s(cfg, plan, calib, s) for s in range(L.pp)]
    trainable = max(stage_params(cfg, L.tp, L.pp, s, L.vpp)["trainable"] for s in range(L.pp))
    fsdp = max(fsdp_step_s(cfg, plan, calib, s) for s in range(L.pp)) if plan.fsdp else 0.0
    return step_from_stages(plan, calib, stages, trainable, cfg.width, fsdp, world_cpus)


def predict_counted(cfg: ViTConfig, plan: Plan, calib: dict, work: dict, tokens: int, world_cpus: int | None = None) -> dict:
    """`predict` for a model this module cannot walk (fine-tuning: windowed attention, a dense
    head) from its counted work (count.count_finetune: "flops", the forward FLOPs of one
    micro-batch on this rank, "block_flops" their share in the blocks, "trainable"): the FLOPs at
    the GEMM rate of a block's matmul on micro-batch x `tokens` rows, the blocks' elementwise
    passes, TP collectives, DP, synchronizing and optimizer terms as `predict` counts them. One
    stage (no pipeline)."""
    L = plan.layout
    if L.pp != 1:
        raise ValueError(f"predict_counted describes one pipeline stage, got pp={L.pp}")
    t, mb, full = L.tp, L.micro_batch, plan.recompute == "full"
    rows = mb * tokens
    flops = 3 * work["flops"] + (work["block_flops"] if full else 0)
    comp = flops / _rate(calib["gemm"], (rows, cfg.width, cfg.width // t), "flops_per_s", rows)
    comp += (3 + full) * cfg.depth * _elementwise_s(calib, mb, tokens, cfg.width, cfg.mlp, cfg.branches, t, L.sp)
    e = 4 if plan.precision == "fp32" else 2
    tp = _tp_comm(calib, cfg.depth, mb, tokens, cfg.width, cfg.branches, t, L.sp, e, L, plan.recompute, comp / cfg.depth)
    stage = {"compute": _with_overhead(calib, comp, cfg.depth * (3 if full else 2)), "tp_comm": tp, "pp_comm": 0.0}
    return step_from_stages(plan, calib, [stage], work["trainable"], cfg.width, 0.0, world_cpus)


# ------------------------------------------------------------------------------- fits
def fit_fsdp(points: list[dict]) -> dict:
    """Non-negative least-squares fit of FSDP's per-unit and per-byte cost to one-process runs.

    `points`: [{"model", "micro_batch", "global_batch", "extra_s"}], extra_s the forward+backward
    time per step with FSDP minus without. Returns {"per_unit_s", "s_per_byte", "residual_rel"}.
    """
    from rsscale.scaling.spec.config import get_preset

    rows = []
    for p in points:
        units, M = fsdp_units(get_preset(p["model"]), 1, 1, 0), p["global_batch"] // p["micro_batch"]
        rows.append([M * len(units), M * 4 * sum(units)])
    y = np.asarray([p["extra_s"] for p in points])
    coef = nonnegative_lstsq(np.asarray(rows, dtype=float), y)
    if coef is None:  # FSDP measured no slower than without it: no term
        coef = np.zeros(2)
    resid = np.abs(np.asarray(rows) @ coef - y) / np.maximum(np.abs(y), 1e-12)
    return {"per_unit_s": float(coef[0]), "s_per_byte": float(coef[1]), "residual_rel": float(resid.max())}


def nonnegative_lstsq(A: np.ndarray, y: np.ndarray, keep_first: bool = False) -> np.ndarray:
    """Least squares with every coefficient >= 0: the best of the fits over each subset of columns
    (a handful of columns here; no scipy dependency for it). `keep_first`: column 0 is always in.
    None when no subset fits without a negative coefficient."""
    n = A.shape[1]
    best, best_err = None, None
    for keep in itertools.product((True, False), repeat=n):
        cols = [i for i in range(n) if keep[i]]
        if not cols or (keep_first and 0 not in cols):
            continue
        coef = np.zeros(n)
        coef[cols] = np.linalg.lstsq(A[:, cols], y, rcond=None)[0]
        err = float(np.sum((A @ coef - y) ** 2))
        if coef.min() >= 0 and (best_err is None or err < best_err):
            best, best_err = coef, err
    return best


def fit_overhead(calib: dict, runs: list[dict]) -> dict:
    """Non-negative least-squares fit of the overhead terms (module doc) to measured one-process steps.

    `runs`: [{"model", "micro_batch", "global_batch", "recompute", "precision", "measured_s"}].
    Returns {"compute_factor", "per_block_pass_s", "per_step_s", "residual_rel"}.
    """
    from rsscale.scaling.spec.config import get_preset

    bare = {k: v for k, v in calib.items() if k != "overhead"}
    rows, target = [], []
    for r in runs:
        cfg = get_preset(r["model"])
        plan = Plan(Layout(micro_batch=r["micro_batch"], global_batch=r["global_batch"]), precision=r["precision"], recompute=r["recompute"])
        t = predict(cfg, plan, bare)
        rows.append([t["compute_s"], plan.layout.num_micro * block_passes(cfg, plan, 0), 1.0])
        target.append(r["measured_s"] - (t["step_s"] - t["compute_s"]))
    A, y = np.asarray(rows), np.asarray(target)
    coef = nonnegative_lstsq(A, y, keep_first=True)
    if coef is None:  # nothing fits without a negative term: keep the bare operator sum
        return {"compute_factor": 1.0, "per_block_pass_s": 0.0, "per_step_s": 0.0, "residual_rel": float("nan")}
    measured = np.asarray([r["measured_s"] for r in runs])
    resid = np.abs(A @ coef - y) / measured
    return {"compute_factor": float(coef[0]), "per_block_pass_s": float(coef[1]), "per_step_s": float(coef[2]), "residual_rel": float(resid.max())}
