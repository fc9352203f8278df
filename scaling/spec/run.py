"""The sections of a run's description that several commands share: how a step computes
(`Compute`), how its data-parallel replicas share gradients and state (`DataParallel`) and how it
updates the weights (`OptimConfig`); the parallel layout is `Layout` (scaling/spec/layout.py). pretrain, bench and finetune hold the same section objects (and analytic.Plan is built from them), so a
benchmark trains exactly what it was given, with nothing copied field by field.
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

    def __post_init__(self):
        if self.fsdp and self.distributed_optimizer:
            raise ValueError("--fsdp already shards the optimizer state: drop --distributed-optimizer")
