"""Step time of a layout from a calibration of this machine (benchmarks/calibrate.py): the sum of
the per-operation times of one training step as our trainer runs it.

    t = predict(cfg, plan, calib, world_cpus=os.cpu_count())
    t["step_s"], t["compute_s"], t["tp_comm_s"], t["pp_comm_s"], t["bubble_s"], t["dp_comm_s"], t["optimizer_s"]

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
              stacked input gradients (SP: all-gather + reduce-scatter of the K stacked, and the
              all-gather of the output gradient); every collective latency + bytes / bandwidth of
              its calibrated group size. Never overlapped: our blocks wait on each collective.
  PP comm     one send/recv of the stage's fp32 hidden states each way
The step: (micro-batches + P - 1) x the slowest stage's per-micro-batch time (1F1B: the bubble is the
P - 1 extra rounds), + the DP all-reduce of the fp32 flat gradient (+ the ZeRO-1 all-gather of the
weights), which our trainer runs after the whole backward (one bucket, no overlap), or under FSDP
per micro-batch its all-gathers and reduce-scatters (`fsdp_micro_s`, not overlapped), + the
optimizer's elementwise passes (grad copy, clip, AdamW: about 16 fp32 values per parameter of the
shard and 6 per parameter of the stage) at the LayerNorm bandwidth.
On CPU, when more processes run than there are cores, every compute time is scaled by
processes / cores (the calibration measured one thread per process on an otherwise idle core).
"""

from __future__ import annotations

import math

from rsscale.benchmarks.analytic import Plan, _local_tokens, fsdp_block_params, stage_params
from rsscale.scaling.config import ViTConfig
from rsscale.scaling.layout import stage_layer_range


def _nearest(table: list[dict], shape, key: str) -> float:
    """The calibrated rate of the entry whose shape is closest in log space."""
    if not table:
        raise ValueError("the calibration has no entries for this operation; run `rsscale calibrate` with these models")
    logs = [math.log(max(x, 1)) for x in shape]
    best = min(table, key=lambda e: sum((math.log(max(a, 1)) - b) ** 2 for a, b in zip(e["shape"], logs)))
    return best[key]


def collective_s(calib: dict, op: str, nbytes: float, group: int) -> float:
    """Calibrated latency + bytes / bandwidth of `op` over `group` processes (nearest calibrated size)."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    fits = calib.get("collectives", {}).get(op)
    if not fits:
        raise ValueError(f"the calibration has no {op} fit; run `rsscale calibrate --nproc N`")
    n = min(fits, key=lambda g: abs(int(g) - group))
    f = fits[n]
    return f["latency_s"] + nbytes / f["bandwidth_bytes_per_s"]


def _gemm_s(calib, rows, k, n):
    return 2 * rows * k * n / _nearest(calib["gemm"], (rows, k, n), "flops_per_s")


def _blocks_forward_s(calib, n_blocks, mb, s, h, m, heads, K, t, sp, e, recompute="none") -> tuple[float, float, float]:
    """(compute, TP comm, compute run again in backward by `recompute`) of n_blocks forward on one micro-batch."""
    if not n_blocks:
        return 0.0, 0.0, 0.0
    rows = mb * s
    gemm = K * (_gemm_s(calib, rows, h, 3 * h // t) + _gemm_s(calib, rows, h // t, h) + _gemm_s(calib, rows, h, m // t) + _gemm_s(calib, rows, m // t, h))
    dh = h // heads
    attn_flops = 4 * mb * K * (heads // t) * s * s * dh
    attn = attn_flops / _nearest(calib["attention"], (mb * K, heads // t, s, dh), "flops_per_s")
    s_ln = _local_tokens(s, t, sp)
    elem_bytes = 4 * mb * (12 * s_ln * h * K + 6 * K * s * m / t)
    elem = elem_bytes / _nearest(calib["layernorm"], (mb * s, h), "bytes_per_s")
    comp = gemm + attn + elem
    full = mb * _local_tokens(s, t, sp) * t * h  # all tokens (padded under SP) of one sublayer's output
    if t == 1:
        comm = 0.0
    elif sp:
        comm = 2 * (collective_s(calib, "all_gather", K * full * 4, t) + collective_s(calib, "reduce_scatter", full * e, t))
    else:
        comm = 2 * collective_s(calib, "all_reduce", full * e, t)
    again = {"none": 0.0, "selective": attn, "full": comp}[recompute]
    return n_blocks * comp, n_blocks * comm, n_blocks * again


def _tp_backward_comm(calib, n_blocks, mb, s, h, K, t, sp) -> float:
    if t == 1 or not n_blocks:
        return 0.0
    full = mb * _local_tokens(s, t, sp) * t * h
    if sp:
        per = collective_s(calib, "all_gather", K * full * 4, t) + collective_s(calib, "reduce_scatter", K * full * 4, t) + collective_s(calib, "all_gather", full * 4, t)
    else:
        per = collective_s(calib, "all_reduce", K * full * 4, t)
    return n_blocks * 2 * per


def stage_micro_s(cfg: ViTConfig, plan: Plan, calib: dict, stage: int) -> dict:
    """Forward + backward time of one micro-batch on `stage`, split by kind (module doc)."""
    L = plan.layout
    t, sp, mb = L.tp, L.sp, L.micro_batch
    e = 4 if plan.precision == "fp32" else 2
    start, end = stage_layer_range(cfg.depth, L.pp, stage)
    kinds = [(end - start, cfg.num_visible + 1, cfg.width, cfg.mlp, cfg.heads, cfg.branches)]
    extra = 0.0
    if stage == 0:
        extra += _gemm_s(calib, mb * cfg.num_patches, cfg.patch_dim, cfg.width)
    if stage == L.pp - 1:
        kinds.append((cfg.dec_depth, cfg.num_patches + 1, cfg.dec_width, cfg.dec_mlp, cfg.dec_heads, 1))
        extra += _gemm_s(calib, mb * (cfg.num_visible + 1), cfg.width, cfg.dec_width) + _gemm_s(calib, mb * (cfg.num_patches + 1), cfg.dec_width, cfg.patch_dim)
    comp, comm, recomp = 3 * extra, 0.0, 0.0
    for n, s, h, m, heads, K in kinds:
        c, tc, rc = _blocks_forward_s(calib, n, mb, s, h, m, heads, K, t, sp, e, plan.recompute)
        comp += 3 * c
        comm += tc * (2 if plan.recompute == "full" else 1) + _tp_backward_comm(calib, n, mb, s, h, K, t, sp)
        recomp += rc
    hidden = mb * _local_tokens(cfg.num_visible + 1, t, sp) * cfg.width * 4
    pp = 2 * collective_s(calib, "send_recv", hidden, 2) if L.pp > 1 else 0.0
    return {"compute": comp + recomp, "tp_comm": comm, "pp_comm": pp}


def fsdp_micro_s(cfg: ViTConfig, plan: Plan, calib: dict, stage: int) -> float:
    """FSDP's collectives per micro-batch on `stage`: per block an all-gather of its fp32 weights in
    forward and again in backward and a reduce-scatter of its gradients; the root unit's once each."""
    L = plan.layout
    n, blocks = stage_params(cfg, L.tp, L.pp, stage), fsdp_block_params(cfg, L.tp, L.pp, stage)
    root, root_trainable = n["trainable"] + n["frozen"] - sum(blocks), n["trainable"] - sum(blocks)
    gather = sum(2 * collective_s(calib, "all_gather", 4 * b, L.dp) for b in blocks) + collective_s(calib, "all_gather", 4 * root, L.dp)
    return gather + sum(collective_s(calib, "reduce_scatter", 4 * b, L.dp) for b in blocks + [root_trainable])


def predict(cfg: ViTConfig, plan: Plan, calib: dict, world_cpus: int | None = None) -> dict:
    """Predicted step time of `plan` and its parts, in seconds (module doc)."""
    L = plan.layout
    scale = 1.0
    if calib.get("threads_per_process") == 1 and world_cpus:  # CPU: processes beyond the cores share them
        scale = max(1.0, L.world_size / world_cpus)
    stages = [stage_micro_s(cfg, plan, calib, s) for s in range(L.pp)]
    per = [scale * st["compute"] + st["tp_comm"] + st["pp_comm"] for st in stages]
    slow = max(range(L.pp), key=lambda i: per[i])
    rounds = L.num_micro + L.pp - 1
    trainable = max(stage_params(cfg, L.tp, L.pp, s)["trainable"] for s in range(L.pp))
    zero = plan.distributed_optimizer and L.dp > 1
    dp = collective_s(calib, "all_reduce", trainable * 4, L.dp) + (collective_s(calib, "all_gather", trainable * 4 / L.dp, L.dp) if zero else 0.0)
    if plan.fsdp:
        dp = L.num_micro * max(fsdp_micro_s(cfg, plan, calib, s) for s in range(L.pp))
    shard = trainable / (L.dp if zero or plan.fsdp else 1)
    optim = scale * 4 * (16 * shard + 6 * trainable) / _nearest(calib["layernorm"], (trainable // max(cfg.width, 1), cfg.width), "bytes_per_s")
    st = stages[slow]
    out = {"compute_s": L.num_micro * scale * st["compute"], "tp_comm_s": L.num_micro * st["tp_comm"], "pp_comm_s": L.num_micro * st["pp_comm"],
           "bubble_s": (rounds - L.num_micro) * per[slow], "dp_comm_s": dp, "optimizer_s": optim}
    out["step_s"] = rounds * per[slow] + dp + optim
    return out
