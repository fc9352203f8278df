"""Analytic per-device memory and FLOPs of an MAE pretraining step for any layout (`estimate`
also gives the step time of benchmarks/prediction/timemodel.py).

    est = estimate(get_preset("g12x4"), Plan(Layout(tp=4, pp=2, dp=1, micro_batch=8, global_batch=64),
                                             precision="bf16", recompute="full"))
    est.memory["total"], est.step_flops, est.step_time_s, est.mfu, est.time["bubble_s"]

Every formula is written out in benchmarks/reporting/METHODS.md; the short version:

Parameters per device (elements). A block branch has 4D^2 + 2DM + 3D + M elements split over TP
(qkv, proj and fc1, fc2 weights; qkv and fc1 biases) and 6D replicated (two LayerNorms, the
RowParallel biases of proj and fc2). The decoder blocks are TP-split in the same way. The
patch embedding, cls token and positions live on the first pipeline stage; the encoder norm,
decoder embedding, mask token, decoder positions, decoder blocks, decoder norm and pixel head on
the last (scaling/spec/layout.py: `stage_layer_range` splits the encoder blocks). Position tables
are frozen: they take parameter memory but no gradient or optimizer state.

Bytes per trainable parameter, both schemes (our trainer, scaling/train/optim.py, keeps Megatron-LM's
mixed-precision buffers): 16-bit weights (bf16/fp16 runs), one fp32 gradient buffer, fp32 master
copy + 2 fp32 moments divided by d = DP with the distributed optimizer (ZeRO-1): 2 + 4 + 12/d;
fp32 training: 4 + 4 + 8/d (the weights are the master copy). Per-parameter metadata only.
The schemes differ in activations: "rsscale" runs under autocast with an fp32 residual stream
(r = 4) and 16-bit weights (w = e), "megatron" keeps the residual stream 16-bit too (r = w = e).
FSDP (`Plan.fsdp`, ZeRO-3 with FSDP2, scaling/train/fsdp.py): fp32 weights, gradients and 2 moments all
sharded: 16/d; plus `gathered`: what is unsharded at the backward peak (root unit's weights +
gradients, 2 blocks' weights + 1 block's gradients; `fsdp_gathered_bytes`).

Activations: the bytes autograd saves for backward in our trainer, term by term as
benchmarks/prediction/count.py counts them (Korthikanti et al. 2022's accounting, redone for this code;
tests/benchmarks/prediction/test_count.py holds every term within 3 % of the count at full scale). Per block on s real
tokens, width h, MLP m, a heads, K branches, TP t, autocast bytes e (2 under bf16/fp16, 4 in fp32),
residual-stream bytes r (4: our residual stream is fp32), weight bytes w (2 with 16-bit weights,
4 in fp32), and s' = the tokens this rank's LayerNorms see (the padded count / t under SP, s
without):
  per image, each of the two sublayers' K-way LayerNorm:
    s' h r input + 2 s' 4 mean/rstd + K s' h w outputs (LayerNorm runs in fp32; its output is
    cast to the weights' dtype, which megatron's Column linear, or our SP gather-linear, saves)
    + s' h r normalized input (the K > 1 path scales one normalization K ways)
  per image, attention: K s 4h e / t (q, k, v cast for attention, its output) + K a s 4 / t (LSE),
    + K a s^2 e / t only without a flash kernel
  per image, MLP: K s m / t fc1 output (max(e, w) without SP: megatron adds the bias in the
    weights' dtype after the autocast matmul; e under SP) + K s m e / t GELU output
  per micro-batch, whatever its size: the stacked LayerNorm weights 2 K h w (K = 1: 2 h r x2,
    fp32 copies of weight and bias), and with fp32 weights under autocast the 16-bit copies of
    the proj and fc2 weights that F.linear saves, K (h^2 + m h) / t e: every micro-batch in
    flight holds its own copy (none with 16-bit weights).
Encoder: s = 1 + V (V visible patches), h = D, m = M, K = branches. Decoder: s = 1 + N, h = Dd,
m = 4 Dd, K = 1. Outside the blocks (`stage_extra_bytes`): the first stage saves the image
(C H W e), the masking index and the embedded patches (N D r) and, under autocast, the patch
conv's weight copy (fp32 weights only); a stage that is not the last keeps its output (s' D r) for the schedule; the
last stage saves the encoder norm's (gathered) input, the decoder embedding, unshuffle, decoder
norm and head inputs, the loss terms (N P 4 + N 4), and the weight copies of decoder embed and
head. Full activation checkpointing keeps only each block's input (s' h r) per micro-batch, plus
once the largest block's activations while it is recomputed (`recompute_bytes`). Selective
recompute (the attention core only) keeps q, k, v (their 16-bit copies under autocast) and the
output, but not the log-sum-exp (nor, without a flash kernel, the probabilities), plus once the
largest core's output and log-sum-exp while it runs again: with a flash kernel it saves little.
With 1F1B, stage i keeps min(P - i, micro-batches) micro-batches in flight; with interleaved 1F1B (V
chunks per rank, each a virtual stage v = chunk * P + i of P*V with its own blocks, extras and
kept output) the heaviest set of (chunk, micro-batch) activations its order holds at once
(scaling/parallel/pipeline.py `in_flight_chunks`: on rank 0 2(P-1) + (V-1)P + 1 chunks); the reported
memory is the worst stage. Transient buffers (activation gradients in backward, workspaces, collectives) are
not counted: `rsscale profile --reserve-gb` is for those and the CUDA context.

FLOPs per step: global_batch x scaling.config.mae_step_flops(cfg, recompute) (matmul FLOPs,
encoder on 1+V tokens, decoder on 1+N, x3 for forward + backward, + the block forwards again
with full recompute, or their attention cores with selective). MFU counts the model's FLOPs
(without recompute) over time x peak x devices.

Step time is not modelled here: `estimate` takes it from benchmarks/prediction/timemodel.py `predict`, at a
measured calibration's rates where one is given, else at `hw`'s datasheet rates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from rsscale.scaling.parallel.pipeline import in_flight_chunks
from rsscale.scaling.spec.config import ViTConfig, mae_step_flops, recompute_mode
from rsscale.scaling.spec.layout import Layout, stage_chunk_ranges, stage_layer_range
from rsscale.scaling.spec.run import PRECISIONS, Compute, DataParallel

GIB = 2**30
SCHEMES = ("rsscale", "megatron")


@dataclass(frozen=True)
class Plan:
    """A layout plus the switches that change memory or time but not the process grid."""

    layout: Layout
    precision: str = "bf16"
    recompute: str = "none"  # none | selective (attention core) | full (whole blocks); True/False mean full/none
    distributed_optimizer: bool = False  # ZeRO-1 over DP
    fsdp: bool = False  # ZeRO-3 over DP (FSDP2, scaling/train/fsdp.py)
    defer_fsdp_sync: bool = False  # FSDP reduce-scatters after the last micro-batch only, holding unsharded weights and grads
    flash: bool = True  # attention without materialized probabilities
    scheme: str = "rsscale"
    overlap_grad_reduce: bool = True  # DP buckets reduced during backward (scaling/train/optim.py)
    bucket_mb: float = 25.0

    @classmethod
    def of(cls, run, layout: Layout | None = None) -> "Plan":
        """The plan of a run description (a tree with parallel, compute and data_parallel sections:
        pretrain's, bench's); `layout` replaces its parallel section (a derived --dp)."""
        c, d = run.compute, run.data_parallel
        return cls(layout or run.parallel, precision=c.precision, recompute=c.recompute, distributed_optimizer=d.distributed_optimizer,
                   fsdp=d.fsdp, defer_fsdp_sync=d.defer_fsdp_sync, bucket_mb=d.bucket_mb, overlap_grad_reduce=d.overlap_grad_reduce)

    def run_sections(self) -> dict:
        """The plan as run-description sections (parallel, compute, data_parallel): what `bench` runs."""
        return dict(parallel=self.layout, compute=Compute(precision=self.precision, recompute=self.recompute),
                    data_parallel=DataParallel(distributed_optimizer=self.distributed_optimizer, fsdp=self.fsdp,
                                               defer_fsdp_sync=self.defer_fsdp_sync, bucket_mb=self.bucket_mb,
                                               overlap_grad_reduce=self.overlap_grad_reduce))

    def __post_init__(self):
        object.__setattr__(self, "recompute", recompute_mode(self.recompute))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.fsdp and self.distributed_optimizer:
            raise ValueError("a plan shards over DP with either FSDP or ZeRO-1, not both")
        if self.defer_fsdp_sync and not self.fsdp:
            raise ValueError("a plan defers FSDP's sync only with fsdp")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, not {self.scheme!r}")


    @property
    def flags(self) -> str:
        """Two letters for tables: recompute (S selective, R full, - none) and DP sharding (Z ZeRO-1, F FSDP,
        D FSDP with its sync deferred to the last micro-batch, -)."""
        shard = "Z" if self.distributed_optimizer else "D" if self.defer_fsdp_sync else "F" if self.fsdp else "-"
        return {"none": "-", "selective": "S", "full": "R"}[self.recompute] + shard


DEFAULT_DEVICE = "H100"  # what Hardware's defaults describe; `rsscale profile` names it when it assumes them


@dataclass(frozen=True)
class Hardware:
    """A device's datasheet numbers and the stated constants that turn them into rates
    (timemodel.datasheet_calibration)."""

    peak_flops: float = 989e12  # dense bf16 FLOP/s per device (H100 SXM datasheet)
    efficiency: float = 0.5  # fraction of peak the matmuls reach
    bandwidth: float = 300e9  # effective collective bandwidth per device, bytes/s
    half_rows: int = 1024  # matmul rows (micro-batch x tokens) at which half the efficiency is reached
    gpus_per_node: int = 0  # devices per node (0: every device in one node)
    inter_bandwidth: float = 0.0  # effective bandwidth per device of a collective that crosses nodes (0: `bandwidth`)
    hbm_bytes_per_s: float = 3.35e12  # memory bandwidth, for the elementwise passes (H100 SXM datasheet)

    def bandwidth_over(self, span: int) -> float:
        """A group's collective bandwidth: within a node, or between nodes when its ranks span more
        than a node (megatron's rank order: TP innermost, then DP, then PP; so the TP group spans tp
        ranks, the DP group tp*dp, a pipeline send 2*tp*dp)."""
        if self.gpus_per_node and self.inter_bandwidth and span > self.gpus_per_node:
            return self.inter_bandwidth
        return self.bandwidth


@dataclass
class Estimate:
    plan: Plan
    memory: dict  # bytes on the worst stage: params, grads, optimizer, activations, total
    stage_memory: list = field(default_factory=list)  # total bytes per pipeline stage
    step_flops: float = 0.0  # whole step, all devices
    step_time_s: float = 0.0  # timemodel.predict's step_s
    images_per_s: float = 0.0
    mfu: float = 0.0
    time: dict = field(default_factory=dict)  # timemodel.predict's parts


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def block_param_split(width: int, mlp: int, branches: int, qkv_bias: bool = True) -> tuple[int, int]:
    """(TP-split elements, replicated elements) of one K-branch block (full, before / t)."""
    split = 4 * width * width + 2 * width * mlp + (3 * width if qkv_bias else 0) + mlp
    return branches * split, branches * 6 * width


def stage_blocks(cfg: ViTConfig, pp: int, stage: int, vpp: int = 1) -> int:
    """Encoder blocks one device of pipeline stage `stage` holds (all its chunks)."""
    return sum(end - start for start, end in stage_chunk_ranges(cfg.depth, pp, vpp, stage))


def stage_params(cfg: ViTConfig, tp: int, pp: int, stage: int, vpp: int = 1) -> dict[str, int]:
    """Parameter elements held by one device of `stage`: trainable and frozen (positions)."""
    D, Dd, N, P = cfg.width, cfg.dec_width, cfg.num_patches, cfg.patch_dim
    split, rep = block_param_split(D, cfg.mlp, cfg.branches, cfg.qkv_bias)
    trainable = stage_blocks(cfg, pp, stage, vpp) * (split // tp + rep)
    frozen = 0
    if stage == 0:
        trainable += P * D + D + D  # patch projection, its bias, cls token
        frozen += (N + 1) * D
    if stage == pp - 1 and cfg.supervised:
        trainable += 2 * D + D * cfg.num_classes + cfg.num_classes  # encoder norm, classification head
    elif stage == pp - 1:
        dsplit, drep = block_param_split(Dd, cfg.dec_mlp, 1, True)
        trainable += 2 * D + D * Dd + Dd + Dd  # encoder norm, decoder embed, mask token
        trainable += cfg.dec_depth * (dsplit // tp + drep) + 2 * Dd + Dd * P + P  # blocks, norm, head
        frozen += (N + 1) * Dd
    return {"trainable": trainable, "frozen": frozen}


def bytes_per_param(precision: str, zero_shards: int) -> dict[str, float]:
    """Weight, gradient and optimizer-state bytes per trainable parameter (see module doc)."""
    if precision == "fp32":
        return {"params": 4, "grads": 4, "optimizer": 8 / zero_shards}
    return {"params": 2, "grads": 4, "optimizer": 12 / zero_shards}


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


def _tokens(n: int, tp: int, sp: bool) -> int:
    """Tokens per block input under SP are padded to a multiple of t (scaling/model/mae.py)."""
    return -(-n // tp) * tp if sp else n


def _local_tokens(n: int, tp: int, sp: bool) -> int:
    """Tokens of the residual stream on one TP rank: its chunk under SP, all of them without."""
    return _tokens(n, tp, sp) // tp if sp else n


def attention_core_bytes(s: int, heads: int, branches: int, tp: int, e: int, flash: bool = True) -> float:
    """Bytes the attention core saves per image beyond q, k, v and its output: the log-sum-exp
    (+ the probabilities without a flash kernel); what selective recompute does not keep."""
    return branches * heads * s * (4 + (0 if flash else s * e)) / tp


def block_activation_bytes(s: int, h: int, m: int, heads: int, branches: int, tp: int, sp: bool,
                           e: int, r: int = 4, flash: bool = True, w: int | None = None, recompute: str = "none") -> float:
    """Bytes one block saves for backward per image on s real tokens (module doc, "per image");
    w: weight bytes (default r)."""
    K, t, w = branches, tp, r if w is None else w
    s_ln = _local_tokens(s, t, sp)  # tokens this rank's LayerNorms see
    ln = s_ln * h * r + 2 * s_ln * 4 + K * s_ln * h * w + (s_ln * h * r if K > 1 else 0)
    attn = K * s * 4 * h * e / t  # q, k, v (kept by the checkpoint under selective recompute) and the output
    if recompute != "selective":
        attn += attention_core_bytes(s, heads, K, t, e, flash)
    mlp = K * s * m * (e if sp else max(e, w)) / t + K * s * m * e / t
    return 2 * ln + attn + mlp


def block_micro_bytes(h: int, m: int, branches: int, tp: int, e: int, r: int = 4, w: int | None = None) -> float:
    """Bytes one block saves per micro-batch whatever its size (module doc, "per micro-batch")."""
    w = r if w is None else w
    stacks = 2 * branches * h * r * 2 if branches == 1 else 2 * branches * h * w
    copies = branches * (h * h + m * h) / tp * e if e < w else 0
    return stacks + copies


def _precision_bytes(plan: Plan) -> tuple[int, int, int]:
    """(autocast activation bytes e, residual-stream bytes r, weight bytes w)."""
    e = 4 if plan.precision == "fp32" else 2
    return e, (4 if plan.scheme == "rsscale" else e), e


def _virtual_stages(layout: Layout) -> int:
    """Virtual pipeline stages: P*V (chunk j of pipeline stage i is virtual stage j*P + i)."""
    return layout.pp * layout.vpp


def _stage_blocks(cfg: ViTConfig, plan: Plan, stage: int) -> list[tuple[int, float, float, float, float]]:
    """(count, bytes per image, bytes per micro-batch, input bytes per image, bytes per image the
    attention core holds while selective recompute reruns it) per block kind of virtual stage
    `stage` (the pipeline stage when V = 1)."""
    L = plan.layout
    t, sp = L.tp, L.sp
    e, r, w = _precision_bytes(plan)
    start, end = stage_layer_range(cfg.depth, _virtual_stages(L), stage)
    kinds = [(end - start, cfg.num_visible + 1, cfg.width, cfg.mlp, cfg.heads, cfg.branches)]
    if stage == _virtual_stages(L) - 1:
        kinds.append((cfg.dec_depth, cfg.num_patches + 1, cfg.dec_width, cfg.dec_mlp, cfg.dec_heads, 1))
    return [(n, block_activation_bytes(s, h, m, a, K, t, sp, e, r, plan.flash, w, plan.recompute), block_micro_bytes(h, m, K, t, e, r, w),
             _local_tokens(s, t, sp) * h * r, K * s * h * e / t + attention_core_bytes(s, a, K, t, e, plan.flash)) for n, s, h, m, a, K in kinds]


def stage_extra_bytes(cfg: ViTConfig, plan: Plan, stage: int) -> tuple[float, float]:
    """(per image, per micro-batch) bytes saved outside the transformer blocks on virtual stage `stage`."""
    L = plan.layout
    t, sp = L.tp, L.sp
    e, r, w = _precision_bytes(plan)
    copy = e if e < w else 0  # autocast's 16-bit copy of an fp32 weight, saved per micro-batch
    N, P, D, Dd = cfg.num_patches, cfg.patch_dim, cfg.width, cfg.dec_width
    s_e, s_d = cfg.num_visible + 1, N + 1
    img, micro = 0.0, 0.0
    if stage == 0:  # the conv's input, the masking gather's index and input
        img += cfg.in_chans * cfg.img_size**2 * e + (0 if cfg.supervised else cfg.num_visible * 8 + N * D * r)
        micro += D * P * copy
    if stage < _virtual_stages(L) - 1:  # the stage output, kept by the 1F1B schedule
        img += _local_tokens(s_e, t, sp) * D * r
    elif cfg.supervised:  # encoder norm (+ its gathered input), the head's input, the log-softmax, the labels
        C = cfg.num_classes
        head_input = D * e if plan.precision != "fp32" else s_e * D * r  # autocast's copy of the cls row, or the norm output it views
        img += _tokens(s_e, t, sp) * D * r + 2 * s_e * 4 + head_input + C * 4 + 8
        micro += D * C * copy
    else:  # encoder norm (+ its gathered input), decoder embed, unshuffle, decoder norm, head, loss
        img += _tokens(s_e, t, sp) * D * r + 2 * s_e * 4 + s_e * D * e
        img += N * 8 + N * Dd * r
        img += _tokens(s_d, t, sp) * Dd * r + 2 * s_d * 4 + s_d * Dd * e
        img += N * P * 4 + N * 4
        micro += (D * Dd + Dd * P) * copy
    return img, micro


def stage_activation_bytes(cfg: ViTConfig, plan: Plan, stage: int) -> float:
    """Activation bytes one micro-batch leaves saved on virtual stage `stage` after its forward
    (with activation checkpointing: the block inputs only; see `recompute_bytes`)."""
    mb = plan.layout.micro_batch
    img, micro = stage_extra_bytes(cfg, plan, stage)
    for n, per_img, per_micro, inp, _ in _stage_blocks(cfg, plan, stage):
        if plan.recompute == "full":
            img += n * inp
        else:
            img, micro = img + n * per_img, micro + n * per_micro
    return mb * img + micro


def recompute_bytes(cfg: ViTConfig, plan: Plan, stage: int) -> float:
    """While recomputing in backward: one block's activations (full) or one attention core's
    output and log-sum-exp / probabilities (selective), alive while it runs again."""
    mb = plan.layout.micro_batch
    if plan.recompute == "full":
        return max((mb * (per_img - inp) + per_micro for n, per_img, per_micro, inp, _ in _stage_blocks(cfg, plan, stage) if n), default=0.0)
    if plan.recompute == "selective":
        return max((mb * core for n, *_, core in _stage_blocks(cfg, plan, stage) if n), default=0.0)
    return 0.0


def in_flight(layout: Layout, stage: int, weight=lambda chunk: 1.0) -> list[int]:
    """The chunks (one entry per micro-batch; all 0 when V = 1) whose activations stage `stage`
    holds at once at the heaviest point of its (interleaved) 1F1B order, by `weight(chunk)`."""
    return in_flight_chunks(layout.pp, layout.vpp, layout.num_micro, stage, weight)


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------


def fsdp_block_params(cfg: ViTConfig, tp: int, pp: int, stage: int) -> list[int]:
    """Parameter elements of each transformer block on one device of `stage` (FSDP's units; the
    rest of the stage is the root unit)."""
    start, end = stage_layer_range(cfg.depth, pp, stage)
    split, rep = block_param_split(cfg.width, cfg.mlp, cfg.branches, cfg.qkv_bias)
    out = [split // tp + rep] * (end - start)
    if stage == pp - 1:
        dsplit, drep = block_param_split(cfg.dec_width, cfg.dec_mlp, 1, True)
        out += [dsplit // tp + drep] * cfg.dec_depth
    return out


def fsdp_units(cfg: ViTConfig, tp: int, pp: int, stage: int) -> list[int]:
    """Parameter elements of each FSDP unit on one device of `stage`: its blocks, then the root."""
    n, blocks = stage_params(cfg, tp, pp, stage), fsdp_block_params(cfg, tp, pp, stage)
    return blocks + [n["trainable"] + n["frozen"] - sum(blocks)]


def fsdp_gathered_bytes(cfg: ViTConfig, plan: Plan, stage: int) -> float:
    """What FSDP holds unsharded (fp32) at its backward peak: the root unit's weights and
    gradients (the root is not resharded between forward and backward), the running block's
    weights and gradients and the prefetched next block's weights; with a deferred sync over
    several micro-batches, every weight and gradient of the stage (an earlier backward's end)."""
    if not plan.fsdp:
        return 0.0
    L = plan.layout
    *blocks, root = fsdp_units(cfg, L.tp, L.pp, stage)
    trainable = stage_params(cfg, L.tp, L.pp, stage)["trainable"]
    if plan.defer_fsdp_sync and L.num_micro > 1:
        return 4 * (sum(blocks) + root + trainable)
    return 4 * (root + trainable - sum(blocks) + 3 * max(blocks, default=0))


def memory_per_stage(cfg: ViTConfig, plan: Plan) -> list[dict]:
    L = plan.layout
    zero = L.dp if plan.distributed_optimizer and L.dp > 1 else 1
    per = bytes_per_param(plan.precision, zero)
    if plan.fsdp:  # fp32 weights, gradients and moments all sharded over DP; no flat buffers
        per = {"params": 4 / L.dp, "grads": 4 / L.dp, "optimizer": 8 / L.dp}
    out = []
    for stage in range(L.pp):
        n = stage_params(cfg, L.tp, L.pp, stage, L.vpp)
        virtual = [chunk * L.pp + stage for chunk in range(L.vpp)]
        chunk_bytes = [stage_activation_bytes(cfg, plan, v) for v in virtual]
        mem = {
            "params": (n["trainable"] + n["frozen"]) * per["params"],
            "grads": n["trainable"] * per["grads"],
            "optimizer": n["trainable"] * per["optimizer"],
            "activations": sum(chunk_bytes[c] for c in in_flight(L, stage, chunk_bytes.__getitem__))
            + max(recompute_bytes(cfg, plan, v) for v in virtual),
            "gathered": fsdp_gathered_bytes(cfg, plan, stage),
        }
        mem["total"] = sum(mem.values())
        out.append(mem)
    return out


def estimate(cfg: ViTConfig, plan: Plan, hw: Hardware = Hardware(), calib: dict | None = None) -> Estimate:
    """Memory (worst stage), FLOPs and the time model's step time at `calib`'s measured rates,
    `hw`'s datasheet ones for what it did not measure (timemodel.calibration)."""
    from rsscale.benchmarks.prediction import timemodel  # the time model builds on this module's counts

    L = plan.layout
    stages = memory_per_stage(cfg, plan)
    worst = max(range(L.pp), key=lambda i: stages[i]["total"])
    t = timemodel.predict(cfg, plan, timemodel.calibration(hw, calib), os.cpu_count())
    step_s = t["step_s"]
    return Estimate(plan=plan, memory=stages[worst], stage_memory=[m["total"] for m in stages],
                    step_flops=L.global_batch * mae_step_flops(cfg, plan.recompute), step_time_s=step_s,
                    images_per_s=L.global_batch / step_s, mfu=L.global_batch * mae_step_flops(cfg, False) / (step_s * hw.peak_flops * L.world_size),
                    time=t)
