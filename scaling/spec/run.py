"""The sections of a run's description that several commands share: how a step computes
(`Compute`), how its data-parallel replicas share gradients and state (`DataParallel`), how it
updates the weights (`OptimConfig`), where it keeps its checkpoints (`Checkpointing`) and what it
reports (`Recording`); the parallel layout is `Layout` (scaling/spec/layout.py). pretrain, bench
and finetune hold the same section objects (and analytic.Plan is built from them), so a benchmark
trains exactly what it was given and a fine-tune hands its sections to the shared trainer whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from rsscale.scaling.runtime.options import option
from rsscale.scaling.spec.config import RECOMPUTE

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Compute:
    precision: str = option("fp32", "fp32 | bf16 | fp16: bf16/fp16 keep 16-bit weights, fp32 grads and fp32 master weights "
                            "(fp16: CUDA only)", choices=PRECISIONS)
    recompute: str = option("none", "none | selective (attention core) | full (whole blocks): recomputed in backward", choices=RECOMPUTE)
    kernels: str = option("torch", "torch | triton", choices=("torch", "triton"))
    compile: bool = option(False, "torch.compile each transformer block (inductor; on CPU it needs a C++ compiler)")
    compile_backend: str = option("inductor", "torch.compile backend with --compile: inductor | aot_eager | eager",
                                  choices=("inductor", "aot_eager", "eager"))


@dataclass
class OptimConfig:
    lr: float = option(1e-3, "peak learning rate", gt=0)
    min_lr: float = option(0.0, "final learning rate of the cosine", ge=0)
    warmup: int = option(5, "linear warmup steps, then cosine to --min-lr at the last step", ge=0, flag="--warmup")
    weight_decay: float = option(0.05, "AdamW weight decay (matrices only)", ge=0)
    beta1: float = option(0.9, "AdamW beta1", ge=0, lt=1, cli=False)
    beta2: float = option(0.95, "AdamW beta2 (MAE's)", ge=0, lt=1, cli=False)
    eps: float = option(1e-8, "AdamW epsilon", gt=0, cli=False)
    clip_grad: float = option(1.0, "clip the global gradient norm (0: off)", ge=0)


@dataclass
class DataParallel:
    """How the DP replicas share gradients and state (the layout's dp says how many there are)."""
    distributed_optimizer: bool = option(False, "shard optimizer state over DP ranks (ZeRO-1: reduce-scatter grads, all-gather weights)")
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state over DP ranks (FSDP2, ZeRO-3)")
    bucket_mb: float = option(25.0, "MiB of fp32 gradient per data-parallel reduction bucket (0: one bucket)", ge=0)
    overlap_grad_reduce: bool = option(True, "reduce the DP gradient after backward instead of bucket by bucket during it")
    defer_fsdp_sync: bool = option(False, "with --fsdp and several micro-batches: reduce-scatter the gradients and reshard the weights "
                                   "after the last micro-batch's backward only (torch pipelining's way: one reduce-scatter per step, "
                                   "holding the stage's unsharded fp32 weights and gradients meanwhile; profile counts that memory)")

    def __post_init__(self):
        if self.fsdp and self.distributed_optimizer:
            raise ValueError("--fsdp already shards the optimizer state: drop --distributed-optimizer")
        if self.defer_fsdp_sync and not self.fsdp:
            raise ValueError("--defer-fsdp-sync defers FSDP's reduce-scatters: add --fsdp")


@dataclass
class Checkpointing:
    """Where a training run keeps its checkpoints, how often it writes them, and what a rerun does with them."""
    out: str | None = option(None, "run folder: checkpoints under <out>/checkpoints (fine-tuning: also metrics.json; "
                             "without it a fine-tune saves nothing)")
    save_every: int = option(0, "also checkpoint every N steps (0: only at the end)", ge=0)
    keep: int = option(0, "keep only the N newest checkpoints (0: all); the newest complete one is never deleted", ge=0)
    resume: bool = option(False, "continue from the newest complete checkpoint under <out>/checkpoints")
    async_save: bool = option(False, "write checkpoints in a background thread from a host copy of this rank's shard (training goes on; "
                              "the same atomic, verified checkpoint)")
    allow_schedule_change: bool = option(False, "with --resume: accept --steps/--lr/--warmup/--min-lr other than the checkpoint's run had "
                                         "(they change its learning-rate schedule)")
    overwrite: bool = option(False, "start over in an --out folder that holds checkpoints (deletes them)")


@dataclass
class Recording:
    """What a training run reports: log lines, the results store, TensorBoard."""
    log_every: int = option(10, "log line every N steps", ge=1)
    results: str | None = option(None, "results store path (default: $RSSCALE_RESULTS or reports/results.db)")
    record: bool = option(True, "do not write to the results store")
    tensorboard: str | None = option(None, "write TensorBoard scalars (loss and its parts, lr, grad norm, img/s, memory; "
                                     "fine-tuning: metrics) to this folder")
