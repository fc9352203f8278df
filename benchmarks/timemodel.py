"""Step time of a layout from a calibration of this machine (benchmarks/calibrate.py): the sum of
the per-operation times of one training step as our trainer runs it.

    t = predict(cfg, plan, calib, world_cpus=os.cpu_count())
    t["step_s"], t["compute_s"], t["tp_comm_s"], t["pp_comm_s"], t["bubble_s"], t["dp_comm_s"], t["sync_s"], t["optimizer_s"]

Per micro-batch on each pipeline stage (one TP rank):
  matmuls     every GEMM of the stage (qkv, proj, fc1, fc2 per branch and block; patch embedding,
              decoder embedding, head) at the calibrated FLOP/s of the nearest calibrated shape
              (log distance over rows, in, out); backward = 2x forward; + 1x forward of the
              blocks with full recompute (of the attention cores with selective)
  attention   4 B H N^2 Dh FLOPs at the nearest calibrated attention shape's FLOP/s; backward 2.5x;
              + 1x forward with selective or full recompute
  elementwise LayerNorms, GELU, residual adds and casts, as bytes over the calibrated LayerNorm
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
Every collective costs the calibrated latency + bytes / bandwidth of its group size inside a run of
this many processes (calibrate.py measures each right after a chunk of compute, as the ranks reach
it in training, so the ranks' arrival skew and wake-up are in it). DP, PP and FSDP collectives
follow a whole pass, stage or block: the fits after a sublayer-sized chunk. A TP collective
follows only its share of the block's compute (the block's forward, backward and recompute over
its TP collectives), often one sharded GEMM or nothing: interpolated in log(that compute) between
those fits and the ones timed after a chunk an eighth that size.
The step (1F1B): the slowest stage runs all M micro-batches, and the other stages' times for one
micro-batch fill and drain the pipeline: M x t_slow + (sum of all stages' t - t_slow) / V with V
interleaved chunks per rank ((M + (P - 1)/V) x t when the stages are balanced; an unbalanced
pipeline, e.g. a last stage holding the decoder, has a shorter bubble than (P - 1) x t_slow),
+ the exposed part of the DP gradient reduction (an all-reduce of the fp32 gradient buffer, or
under ZeRO-1 a reduce-scatter of it) + the ZeRO-1 all-gather of the updated weights (fp32, or
16-bit with bf16/fp16 weights), + the step's small synchronizing all-reduces (loss, gradient norm;
`sync_comm_s`), + the optimizer's elementwise passes (clip, AdamW: about 16 fp32 values per
parameter of the shard) at the LayerNorm bandwidth. With `overlap_grad_reduce` the buckets are
reduced during the last micro-batch's backward (2/3 of its compute): only the last bucket, or
whatever outlasts that backward, is exposed (analytic.exposed_reduce_s); without it the whole
reduction follows backward. Under FSDP the DP term is instead, per micro-batch, its all-gathers
and reduce-scatters (`fsdp_micro_s`, not overlapped), and each stage's compute also carries
FSDP's own work per unit and micro-batch (`fsdp_overhead_s`: copying weights into the gather
buffer and out to unsharded parameters, gradients into the reduce-scatter buffer, its hooks),
calibrated as one-process steps with and without FSDP (calibrate.measure_fsdp, `fit_fsdp`).
On CPU (one thread per process) compute is slower when several processes compute at once: the
calibration times a chunk of work with N processes at once and alone (`slowdown`: shared caches
and memory bandwidth below the cores, time-sharing above them). Each rank computes at the
slowdown of min(N, cores) processes; when more processes run than there are cores, the cores
also bound the step: it is the larger of the pipeline's critical path and all ranks' compute at
the slowdown of N processes, over N, plus the slowest stage's communication (a rank waiting in
the pipeline bubble lends its core to the others).

What the operator sum misses (framework dispatch and autograd bookkeeping per block, the many
small elementwise ops of masking, loss and branch stacking, the per-step work of the loop) is
fitted, not guessed: `rsscale calibrate` also times real one-process training steps at several
micro-batch sizes with and without recompute, and `fit_overhead` solves
    measured = compute_factor x (operator compute) + per_block_pass_s x (block passes) + per_step_s + (the rest)
by non-negative least squares. The multi-process layouts the profiler ranks are never part of
this fit, so validating on them (`profile --measure`) tests the model, not the fit.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from rsscale.benchmarks.analytic import Plan, _local_tokens, bucket_fraction, exposed_reduce_s, fsdp_units, stage_blocks, stage_params
from rsscale.scaling.config import ViTConfig
from rsscale.scaling.layout import Layout


def _nearest(table: list[dict], shape, key: str) -> float:
    """The calibrated rate of the entry whose shape is closest in log space."""
    if not table:
        raise ValueError("the calibration has no entries for this operation; run `rsscale calibrate` with these models")
    logs = [math.log(max(x, 1)) for x in shape]
    best = min(table, key=lambda e: sum((math.log(max(a, 1)) - b) ** 2 for a, b in zip(e["shape"], logs)))
    return best[key]


def collective_s(calib: dict, op: str, nbytes: float, group: int, world: int | None = None, active: float | None = None,
                 after_s: float | None = None) -> float:
    """Calibrated latency + bytes / bandwidth of `op` over `group` processes of a run of `world`
    processes: the fit measured for a group of that size inside such a world ("2@4", every group
    at once) when the calibration has one, else the nearest calibrated group size. `active`: the
    processes busy at once on average (fewer than `world` in a pipeline's fill and drain); the
    time is interpolated linearly between the group alone (active = group) and every group at once.
    `after_s`: the one-process compute before this collective on each rank, where it is short (TP
    collectives); the ranks' arrival skew grows with it, so the time is interpolated in
    log(after_s) between the fits timed after the small and the large chunk (`tp_collectives`,
    `collectives`, chunks of `collective_chunk_s`). None: after a whole pass, the large chunk's."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    large = _fitted_s(calib.get("collectives", {}).get(op), op, nbytes, group, world, active)
    small, chunk = calib.get("tp_collectives", {}).get(op), calib.get("collective_chunk_s")
    if after_s is None or not small or not chunk:
        return large
    lo, hi = chunk["tp_collectives"], chunk["collectives"]
    w = min(max(math.log(max(after_s, 1e-12) / lo) / math.log(hi / lo), 0.0), 1.0)
    return w * large + (1 - w) * _fitted_s(small, op, nbytes, group, world, active)


def _fitted_s(fits: dict | None, op, nbytes, group, world, active) -> float:
    if not fits:
        raise ValueError(f"the calibration has no {op} fit; run `rsscale calibrate --nproc N`")

    def time(key):
        return fits[key]["latency_s"] + nbytes / fits[key]["bandwidth_bytes_per_s"]

    alone = time(min((k for k in fits if "@" not in k), key=lambda g: abs(int(g) - group)))
    key = f"{group}@{world}"
    if key not in fits:
        return alone
    if active is None or world <= group:
        return time(key)
    share = min(max((active - group) / (world - group), 0.0), 1.0)
    return alone + share * (time(key) - alone)


def busy_stages(L: Layout) -> float:
    """Pipeline stages computing at once, on average over a 1F1B step: each of the P stages works
    M micro-batches (in V chunks) within M + (P - 1) / V micro-batch times. P when M >> P; 1 with
    a single micro-batch, where the stages take turns."""
    return L.pp * L.num_micro / (L.num_micro + (L.pp - 1) / L.vpp)


def slowdown(calib: dict, n: int, cores: int | None) -> float:
    """Factor on one process's compute time when `n` single-thread processes compute at once on
    `cores` CPU cores: calibrated (`concurrency`, measured at each --nproc) when it has n, else
    time-sharing, max(1, n / cores). 1 on GPUs (a device per process) and for one process."""
    if n <= 1 or calib.get("threads_per_process") != 1 or not cores:
        return 1.0
    return calib.get("concurrency", {}).get(str(n), max(1.0, n / cores))


def _gemm_s(calib, rows, k, n):
    return 2 * rows * k * n / _nearest(calib["gemm"], (rows, k, n), "flops_per_s")


def _sublayer_comm(calib, mb, s, h, K, t, sp, e, world, active, gap_s) -> tuple[float, float, float]:
    """(forward input gather, forward output reduction, backward) TP collectives of one block
    sublayer on one micro-batch (parallel/mappings.py). Without SP: forward all-reduce of the
    output, backward all-reduce of the K stacked input gradients. With SP: forward all-gather of the
    K stacked LayerNorm outputs and reduce-scatter of the output; backward all-gather of the output
    gradient, the all-gather of the inputs again, reduce-scatter of the K stacked input gradients,
    and all-reduces of the LayerNorm weight and bias gradients (K x h each) and of the summed Row
    bias gradient (h). `gap_s`: the compute before each (collective_s's after_s)."""
    if t == 1:
        return 0.0, 0.0, 0.0
    full = mb * _local_tokens(s, t, sp) * t * h  # all tokens (padded under SP) of one sublayer's output

    def c(op, nbytes):
        return collective_s(calib, op, nbytes, t, world, active, after_s=gap_s)

    if not sp:
        return 0.0, c("all_reduce", full * e), c("all_reduce", K * full * 4)
    backward = c("all_gather", full * 4) + c("all_gather", K * full * 4) + c("reduce_scatter", K * full * 4)
    return c("all_gather", K * full * 4), c("reduce_scatter", full * e), backward + 2 * c("all_reduce", K * h * 4) + c("all_reduce", h * 4)


def _blocks_forward_s(calib, n_blocks, mb, s, h, m, heads, K, t, sp, recompute="none") -> tuple[float, float]:
    """(compute, compute run again in backward by `recompute`) of n_blocks forward on one micro-batch."""
    if not n_blocks:
        return 0.0, 0.0
    rows = mb * s
    gemm = K * (_gemm_s(calib, rows, h, 3 * h // t) + _gemm_s(calib, rows, h // t, h) + _gemm_s(calib, rows, h, m // t) + _gemm_s(calib, rows, m // t, h))
    dh = h // heads
    attn_flops = 4 * mb * K * (heads // t) * s * s * dh
    attn = attn_flops / _nearest(calib["attention"], (mb * K, heads // t, s, dh), "flops_per_s")
    s_ln = _local_tokens(s, t, sp)
    elem_bytes = 4 * mb * (12 * s_ln * h * K + 6 * K * s * m / t)
    elem = elem_bytes / _nearest(calib["layernorm"], (mb * s, h), "bytes_per_s")
    comp = gemm + attn + elem
    again = {"none": 0.0, "selective": attn, "full": comp}[recompute]
    return n_blocks * comp, n_blocks * again


def tp_collectives_per_block(sp: bool, recompute: str) -> int:
    """TP collectives one block launches per micro-batch (_sublayer_comm, _tp_comm): per sublayer
    1 forward + 1 backward, under SP 2 + 6; full recompute runs the forward ones again but one."""
    forward, backward = (2, 6) if sp else (1, 1)
    return 2 * (forward + backward) + (2 * forward - 1 if recompute == "full" else 0)


def _tp_comm(calib, n_blocks, mb, s, h, K, t, sp, e, world, active, recompute, block_compute_s) -> float:
    """TP collectives of n_blocks on one micro-batch, forward and backward. Full recompute
    (torch's non-reentrant checkpoint, which stops once backward has what it needs) runs the
    forward ones again but for the block's last one, the MLP output's reduction. Each follows the
    block's compute (forward, backward and recompute: `block_compute_s`) shared evenly among them."""
    if not n_blocks:
        return 0.0
    gap = block_compute_s / tp_collectives_per_block(sp, recompute)
    gather, reduce, backward = _sublayer_comm(calib, mb, s, h, K, t, sp, e, world, active, gap)
    again = 2 * gather + reduce if recompute == "full" else 0.0
    return n_blocks * (2 * (gather + reduce + backward) + again)


def _sp_boundary_comm(cfg: ViTConfig, L: Layout, calib: dict, stage: int, active: float) -> float:
    """SP region entries and exits on `stage` per micro-batch (mae.py): entering keeps this rank's
    tokens (its backward all-gathers the gradient), leaving all-gathers the tokens (fp32). The
    encoder enters on the first stage and leaves on the last, where the decoder enters and leaves.
    Each follows an embedding or a whole block: the large chunk's fits."""
    if not L.sp or L.tp == 1:
        return 0.0

    def gather(s, h):
        return collective_s(calib, "all_gather", L.micro_batch * _local_tokens(s, L.tp, True) * L.tp * h * 4, L.tp, L.world_size, active)

    enc, dec = gather(cfg.num_visible + 1, cfg.width), gather(cfg.num_patches + 1, cfg.dec_width)
    return (enc if stage == 0 else 0.0) + (enc + 2 * dec if stage == L.pp - 1 else 0.0)


def block_passes(cfg: ViTConfig, plan: Plan, stage: int) -> int:
    """Block passes (forward, backward, and the recompute forward) one micro-batch makes on `stage`."""
    blocks = stage_blocks(cfg, plan.layout.pp, stage, plan.layout.vpp) + (cfg.dec_depth if stage == plan.layout.pp - 1 else 0)
    return blocks * (3 if plan.recompute == "full" else 2)


def stage_micro_s(cfg: ViTConfig, plan: Plan, calib: dict, stage: int) -> dict:
    """Forward + backward time of one micro-batch on `stage`, split by kind (module doc)."""
    L = plan.layout
    t, sp, mb = L.tp, L.sp, L.micro_batch
    e = 4 if plan.precision == "fp32" else 2
    active = L.tp * L.dp * busy_stages(L)  # TP groups of the other stages communicate at once only while those stages are busy
    kinds = [(stage_blocks(cfg, L.pp, stage, L.vpp), cfg.num_visible + 1, cfg.width, cfg.mlp, cfg.heads, cfg.branches)]
    extra = 0.0
    if stage == 0:
        extra += _gemm_s(calib, mb * cfg.num_patches, cfg.patch_dim, cfg.width)
    if stage == L.pp - 1:
        kinds.append((cfg.dec_depth, cfg.num_patches + 1, cfg.dec_width, cfg.dec_mlp, cfg.dec_heads, 1))
        extra += _gemm_s(calib, mb * (cfg.num_visible + 1), cfg.width, cfg.dec_width) + _gemm_s(calib, mb * (cfg.num_patches + 1), cfg.dec_width, cfg.patch_dim)
    comp, recomp, comm = 3 * extra, 0.0, _sp_boundary_comm(cfg, L, calib, stage, active)
    for n, s, h, m, heads, K in kinds:
        c, rc = _blocks_forward_s(calib, n, mb, s, h, m, heads, K, t, sp, plan.recompute)
        comp += 3 * c
        recomp += rc
        comm += _tp_comm(calib, n, mb, s, h, K, t, sp, e, L.world_size, active, plan.recompute, (3 * c + rc) / max(n, 1))
    hidden = mb * _local_tokens(cfg.num_visible + 1, t, sp) * cfg.width * 4
    pp = 2 * L.vpp * collective_s(calib, "send_recv", hidden, 2, L.world_size) if L.pp > 1 else 0.0
    over = calib.get("overhead", {})
    compute = over.get("compute_factor", 1.0) * (comp + recomp) + over.get("per_block_pass_s", 0.0) * block_passes(cfg, plan, stage)
    compute += fsdp_overhead_s(cfg, plan, calib, stage)
    return {"compute": compute, "tp_comm": comm, "pp_comm": pp}


def fsdp_overhead_s(cfg: ViTConfig, plan: Plan, calib: dict, stage: int) -> float:
    """FSDP's own work per micro-batch on `stage` beyond its collectives: per unit, the calibrated
    per_unit_s + s_per_byte x its fp32 bytes on this TP rank (0 without a calibration of it)."""
    f = calib.get("fsdp")
    if not plan.fsdp or not f:
        return 0.0
    return sum(f["per_unit_s"] + f["s_per_byte"] * 4 * u for u in fsdp_units(cfg, plan.layout.tp, plan.layout.pp, stage))


def fit_fsdp(points: list[dict]) -> dict:
    """Non-negative least-squares fit of FSDP's per-unit and per-byte cost to one-process runs.

    `points`: [{"model", "micro_batch", "global_batch", "extra_s"}], extra_s the forward+backward
    time per step with FSDP minus without. Returns {"per_unit_s", "s_per_byte", "residual_rel"}.
    """
    from rsscale.scaling.config import get_preset

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


def fsdp_micro_s(cfg: ViTConfig, plan: Plan, calib: dict, stage: int) -> float:
    """FSDP's collectives per micro-batch on `stage`: per block an all-gather of its fp32 weights in
    forward and again in backward and a reduce-scatter of its gradients; the root unit's once each."""
    L = plan.layout
    *blocks, root = fsdp_units(cfg, L.tp, L.pp, stage)
    root_trainable = stage_params(cfg, L.tp, L.pp, stage)["trainable"] - sum(blocks)
    W = L.world_size
    gather = sum(2 * collective_s(calib, "all_gather", 4 * b, L.dp, W) for b in blocks) + collective_s(calib, "all_gather", 4 * root, L.dp, W)
    return gather + sum(collective_s(calib, "reduce_scatter", 4 * b, L.dp, W) for b in blocks + [root_trainable])


def sync_comm_s(plan: Plan, calib: dict) -> float:
    """The step's small synchronizing all-reduces (scaling/train.py, optim.py): the loss over PP and
    over DP, the gradient norm over ZeRO-1 / FSDP shards and over the model-parallel (TP x PP) group,
    and with fp16 the loss scaler's overflow flag over the world. Latency-bound: 8 bytes each."""
    L = plan.layout

    def ar(group):
        return collective_s(calib, "all_reduce", 8, group, L.world_size)

    shards = L.dp if plan.distributed_optimizer or plan.fsdp else 1
    return ar(L.pp) + ar(L.dp) + ar(shards) + ar(L.tp * L.pp) + (ar(L.world_size) if plan.precision == "fp16" else 0.0)


def predict(cfg: ViTConfig, plan: Plan, calib: dict, world_cpus: int | None = None) -> dict:
    """Predicted step time of `plan` and its parts, in seconds (module doc)."""
    L = plan.layout
    W = L.world_size
    busy = slowdown(calib, min(W, world_cpus or W), world_cpus)  # every core computing
    shared = slowdown(calib, W, world_cpus)  # every rank computing (beyond the cores: time-sharing them)
    stages = [stage_micro_s(cfg, plan, calib, s) for s in range(L.pp)]
    per = [busy * st["compute"] + st["tp_comm"] + st["pp_comm"] for st in stages]
    slow = max(range(L.pp), key=lambda i: per[i])
    st, M = stages[slow], L.num_micro
    trainable = max(stage_params(cfg, L.tp, L.pp, s, L.vpp)["trainable"] for s in range(L.pp))
    zero = plan.distributed_optimizer and L.dp > 1
    if zero:  # calibrated sizes are per-rank chunks
        w = 4 if plan.precision == "fp32" else 2
        reduce = collective_s(calib, "reduce_scatter", trainable * 4 / L.dp, L.dp, W)
        gather = collective_s(calib, "all_gather", trainable * w / L.dp, L.dp, W)
    else:
        reduce, gather = collective_s(calib, "all_reduce", trainable * 4, L.dp, W), 0.0
    if plan.overlap_grad_reduce:
        reduce = exposed_reduce_s(reduce, busy * st["compute"] * 2 / 3, bucket_fraction(plan, trainable))
    dp = reduce + gather
    if plan.fsdp:  # per micro-batch gathers and reduce-scatters instead, not overlapped
        dp = M * max(fsdp_micro_s(cfg, plan, calib, s) for s in range(L.pp))
    shard = trainable / (L.dp if zero or plan.fsdp else 1)
    optim = shared * 4 * 16 * shard / _nearest(calib["layernorm"], (trainable // max(cfg.width, 1), cfg.width), "bytes_per_s")
    # 1F1B: the slowest stage runs every micro-batch; the others' share of one micro-batch fills and
    # drains the pipeline (V times less with V interleaved chunks): (P - 1) / V rounds when balanced
    out = {"compute_s": M * busy * st["compute"], "tp_comm_s": M * st["tp_comm"], "pp_comm_s": M * st["pp_comm"],
           "bubble_s": (sum(per) - per[slow]) / L.vpp, "dp_comm_s": dp, "sync_s": sync_comm_s(plan, calib), "optimizer_s": optim}
    if world_cpus and W > world_cpus:  # the cores bound the step when every rank's compute cannot run at once; a rank idle in the bubble lends its core
        work = L.tp * L.dp * M * sum(s["compute"] for s in stages) * shared / W
        if work > out["compute_s"] + out["bubble_s"]:  # (communication is on both sides)
            out["compute_s"], out["bubble_s"] = work, 0.0
    out["overhead_s"] = calib.get("overhead", {}).get("per_step_s", 0.0)
    out["step_s"] = sum(out.values())
    return out


def fit_overhead(calib: dict, runs: list[dict]) -> dict:
    """Non-negative least-squares fit of the overhead terms (module doc) to measured one-process steps.

    `runs`: [{"model", "micro_batch", "global_batch", "recompute", "precision", "measured_s"}].
    Returns {"compute_factor", "per_block_pass_s", "per_step_s", "residual_rel"}.
    """
    from rsscale.scaling.config import get_preset

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
