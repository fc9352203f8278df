"""Fully sharded data parallelism (ZeRO-3) with torch's FSDP2 `fully_shard`, composed with our TP and PP.

    optimizer = shard_model(model, betas=..., eps=..., weight_decay=...)   # `--fsdp`: model sharded in place
    ... forward / backward (FSDP2 all-gathers each block's weights before it runs, frees them after,
        and reduce-scatters its gradients in backward) ...
    grad_norm = optimizer.clip_grad_norm_(max_norm); optimizer.step(lr)

Layout. The data-parallel ranks of one (TP rank, PP stage) form a 1-D DeviceMesh; every transformer
block is its own FSDP unit (parameters gathered just for that block, next block's gather prefetched
forward and backward), the rest of the stage (patch embedding, tokens, norms, decoder embedding,
head) is the root unit. Our TP layers are megatron-core linears whose parameters are this TP rank's
slices: FSDP shards those slices again, on dim 0, over DP (the 2-D TP x DP layout torchtitan builds,
with TP done by megatron instead of DTensor). Each stage of a pipeline shards only its own blocks.

Memory per trainable parameter on one rank: fp32 weights, gradients and both AdamW moments, each
divided by DP (16/d bytes), plus one block's (and the prefetched next block's) gathered weights
and gradients at a time.

Micro-batches. By default each micro-batch's backward reduce-scatters its gradients and reshards
the weights, so M micro-batches cost M reduce-scatters and 2M all-gathers per block.
`--defer-fsdp-sync` does what torch's PipelineStage does: the earlier backwards accumulate
unsharded gradients and leave the weights gathered, and only the last micro-batch's backward
reduce-scatters (one per block per step, and about M + 1 all-gathers). The price is the stage's
unsharded fp32 weights and gradients, held from the first backward to the last (analytic.py and
count.py count them).

Optimizer: torch.optim.AdamW, fused, on the DTensor shards (parameter groups apply the repo's
weight-decay rule, `scaling.optim.decays`; torch's default on CPU, one DTensor op per parameter and
moment, made the one-process optimizer step of `small` 36 ms where fused takes 11), the trainer's
learning-rate schedule set per step, and the global gradient norm summed over every rank (DP shards
are disjoint; a TP-replicated parameter counts on TP rank 0 only). Its update is FlatAdamW's
(decoupled decay, bias-corrected moments; equal to float32 rounding, tests/scaling/train/test_fsdp.py).

Checkpoints stay layout-free: each rank writes its DP shard of each TP-local weight and moment as
a flat piece (rows [r*c, (r+1)*c) of the TP-local tensor are a contiguous range of its elements),
keyed by the TP=1 name, so any layout (FSDP or not, any TP/PP/DP) reads it back; loading reads the
TP-local tensor of one parameter at a time and keeps this rank's rows (no rank holds the full model).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from rsscale.scaling.parallel import state
from rsscale.scaling.train import checkpoint
from rsscale.scaling.train.optim import decays

_TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride")


def shard_model(model, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, defer_sync: bool = False) -> "ShardedAdamW":
    """Shard this rank's model stage over its data-parallel group in place (one FSDP unit per
    transformer block plus the root) and return the optimizer over the shards (`defer_sync`:
    --defer-fsdp-sync, the module doc)."""
    tp_attrs = {n: {a: getattr(p, a) for a in _TP_ATTRS if hasattr(p, a)} for n, p in model.named_parameters()}
    device = next(model.parameters()).device.type
    mesh = DeviceMesh.from_group(state.dp_group(), "cpu" if device == "meta" else device)  # meta: memory counting
    blocks = model.transformer_blocks()
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "forward_stage")  # the pipeline calls forward_stage, not forward
    for before, after in zip(blocks, blocks[1:]):
        before.set_modules_to_forward_prefetch([after])
        after.set_modules_to_backward_prefetch([before])
    for name, p in model.named_parameters():  # megatron's TP attributes, for checkpoints and the grad norm
        for attr, value in tp_attrs[name].items():
            setattr(p, attr, value)
    return ShardedAdamW(model, mesh, betas, eps, weight_decay, defer_sync)


def _rows(p) -> tuple[int, int]:
    """Rows [lo, hi) of the (TP-local) parameter `p` that this DP rank's shard holds (torch.chunk's split)."""
    n0 = p.shape[0]
    chunk = -(-n0 // p.device_mesh.size())
    lo = min(p.device_mesh.get_local_rank() * chunk, n0)
    return lo, min(lo + chunk, n0)


class ShardedAdamW:
    """AdamW over FSDP2's DTensor shards with the trainer's schedule, clipping and checkpoint pieces."""

    def __init__(self, model, mesh, betas, eps, weight_decay, defer_sync: bool = False):
        self.model, self.defer_sync, self.last_micro = model, defer_sync, 0
        self.named = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda np_: np_[0])
        if not self.named:
            raise ValueError("--fsdp: the model stage has no trainable parameters")
        self.mesh = mesh
        groups = [{"params": [p for n, p in self.named if decays(n, p)], "weight_decay": weight_decay},
                  {"params": [p for n, p in self.named if not decays(n, p)], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0, betas=betas, eps=eps, fused=True)
        self.step_count = 0
        for _, p in self.named:  # moments exist from the start, so a checkpoint before step 1 holds them
            self.opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def zero_grad(self, micro_batches: int = 1) -> None:
        """Drop the gradients; FSDP reduce-scatters each micro-batch's gradients itself, or with
        `defer_sync` only the last one's (its earlier backwards accumulate unsharded gradients and
        leave the weights gathered)."""
        self.opt.zero_grad(set_to_none=True)
        self.last_micro = micro_batches - 1
        if self.defer_sync:  # (FSDP2's switches are on unless a deferred sync turned them off)
            self._sync(micro_batches == 1)

    def before_backward(self, chunk: int, micro: int) -> None:
        """The pipeline's hook before each backward: the last micro-batch's reduce-scatters and reshards
        (its backwards run in micro-batch order; the trainer refuses --defer-fsdp-sync with --vpp > 1)."""
        if self.defer_sync and micro == self.last_micro:
            self._sync(True)

    def _sync(self, on: bool) -> None:
        """FSDP2's three switches, set as torch's PipelineStage sets them around its last backward."""
        self.model.set_is_last_backward(on)
        self.model.set_reshard_after_backward(on)
        self.model.set_requires_gradient_sync(on)

    def finish_grad_sync(self) -> None:
        """Nothing to wait for: FSDP's reduce-scatters finished with backward."""

    def _counted(self, p) -> bool:
        """Each element once in the global norm: TP slices on every TP rank, TP-replicated ones on TP rank 0."""
        return state.is_tp_sharded(p) or state.tp_rank() == 0

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global L2 norm of the gradient over every rank (DP shards, TP slices, PP stages), then clip."""
        grads = [(p.grad.to_local(), self._counted(p)) for _, p in self.named if p.grad is not None]
        sq = sum((g.float().square().sum() for g, counted in grads if counted), torch.zeros((), device=self.named[0][1].device))
        if dist.get_world_size() > 1:
            dist.all_reduce(sq)
        norm = float(sq.sqrt())
        if max_norm and max_norm > 0 and math.isfinite(norm):
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:
                for g, _ in grads:
                    g.mul_(coef)
        return norm

    def step(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.step_count += 1

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (its shards of exp_avg and exp_avg_sq)."""
        return sum(s[k].to_local().numel() * s[k].element_size() for s in self.opt.state.values() for k in ("exp_avg", "exp_avg_sq"))

    # --- layout-free checkpoints: this rank's DP shard of each TP-local tensor as a flat piece --
    def checkpoint_tensors(self, model) -> dict:
        """{key: (local shard, info)} that this rank writes (`checkpoint.save_checkpoint`): weights and
        moments of every parameter it holds rows of (TP-replicated ones from TP rank 0 only)."""
        out = {}
        moments = {p: self.opt.state[p] for _, p in self.named}
        for name, p in model.named_parameters():
            lo, hi = _rows(p)
            if hi == lo or not self._counted(p):
                continue
            row = math.prod(p.shape[1:])
            info = dict(checkpoint.tensor_meta(p), flat=[lo * row, hi * row], local_shape=list(p.shape))
            out[f"model/{name}"] = (p.to_local(), info)
            for key in ("exp_avg", "exp_avg_sq") if p in moments else ():
                out[f"{key}/{name}"] = (moments[p][key].to_local(), info)
        return out

    @torch.no_grad()
    def load(self, model, folder: str, index: dict, step_count: int) -> None:
        """Weights and moments from a checkpoint of any layout, one TP-local tensor at a time."""
        moments = {p: self.opt.state[p] for _, p in self.named}
        for name, p in model.named_parameters():
            lo, hi = _rows(p)
            targets = [("model", p)] + ([("exp_avg", moments[p]["exp_avg"]), ("exp_avg_sq", moments[p]["exp_avg_sq"])] if p in moments else [])
            for key, t in targets:
                t.to_local().copy_(checkpoint.read_for(folder, index, f"{key}/{name}", p)[lo:hi])
        for s in moments.values():
            s["step"].fill_(step_count)
        self.step_count = int(step_count)
