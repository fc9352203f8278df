"""AdamW on one flat fp32 buffer, optionally sharded over data-parallel ranks (ZeRO-1), plus the
LR schedule, gradient clipping across model-parallel ranks and a world-wide loss scaler.

Why our own and not megatron-core's DistributedOptimizer: megatron's optimizer runs on the
gradient buffers of its DistributedDataParallel wrapper, which creates CUDA streams
(`torch.cuda.Stream(device=torch.cuda.current_device())`) and so does not run on CPU/gloo.

How it works. The trainable parameters of this rank are packed (sorted by name) into one flat
fp32 buffer and every parameter becomes a view into it, so the model trains the buffer itself.
Gradients are copied into a flat buffer of the same layout and all-reduced (averaged) over the DP
group in one call - our "DDP": one bucket, no overlap, deliberately simple. Then:
  - shards=1 (default): every rank steps AdamW on the whole buffer;
  - shards=DP (`--distributed-optimizer`): DP rank d owns the slice [d*S, (d+1)*S) of the
    buffer: it keeps exp_avg/exp_avg_sq only for that slice (1/DP of the optimizer memory), steps
    AdamW on it and all-gathers the slices back into the buffer. The all-reduce of full gradients
    stays (a reduce-scatter would save half the gradient traffic, but the global grad norm over
    TP-replicated parameters is then harder to count once); the state memory is what ZeRO-1 saves.
Weight decay is decoupled (AdamW) with a 0/1 mask per element: none on biases, norms and the
cls/mask tokens and position tables (1-d or token parameters).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed")


def decays(name: str, param: torch.Tensor) -> bool:
    """AdamW weight decay applies to matrices only (not biases, norms, tokens, positions)."""
    return param.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)


def lr_at(step: int, lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 over `warmup` steps, then cosine decay to `min_lr` at `total` steps.
    `step` counts optimizer steps already taken (the first step uses lr_at(0, ...))."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class FlatAdamW:
    """AdamW over `named_params` packed into one buffer; `shards`/`group` shard its state (ZeRO-1)."""

    def __init__(self, named_params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, shards: int = 1, shard_rank: int = 0, group=None,
                 lr_scales: dict[str, float] | None = None):
        """lr_scales: optional {name: multiplier} of the step's lr per parameter (layer-wise lr decay)."""
        self.named = sorted(((n, p) for n, p in named_params if p.requires_grad), key=lambda np_: np_[0])
        if not self.named:
            raise ValueError("FlatAdamW got no trainable parameters")
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.shards, self.shard_rank, self.group = shards, shard_rank, group
        numel = sum(p.numel() for _, p in self.named)
        self.shard_size = -(-numel // shards)
        self.numel = numel
        self.flat = torch.zeros(self.shard_size * shards, dtype=torch.float32, device=self.named[0][1].device)
        self.grad = torch.zeros_like(self.flat)
        decay_mask = torch.zeros_like(self.flat)
        lr_scale = torch.ones_like(self.flat) if lr_scales is not None else None
        self.offsets = {}
        o = 0
        for name, p in self.named:
            n = p.numel()
            self.flat[o : o + n].copy_(p.detach().reshape(-1))
            p.data = self.flat[o : o + n].view_as(p)  # the model now trains the flat buffer
            decay_mask[o : o + n] = float(decays(name, p))
            if lr_scale is not None:
                lr_scale[o : o + n] = float(lr_scales[name])
            self.offsets[name] = (o, n)
            o += n
        lo = shard_rank * self.shard_size
        self.lo, self.hi = lo, lo + self.shard_size
        self.decay_mask = decay_mask[self.lo : self.hi].clone()
        self.lr_scale = None if lr_scale is None else lr_scale[self.lo : self.hi].clone()
        self.exp_avg = torch.zeros(self.shard_size, dtype=torch.float32, device=self.flat.device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.step_count = 0

    # --- gradients -----------------------------------------------------------------------------
    def collect_grads(self) -> torch.Tensor:
        """Copy every parameter's .grad into the flat grad buffer (zeros where a grad is None)."""
        for name, p in self.named:
            o, n = self.offsets[name]
            if p.grad is None:
                self.grad[o : o + n].zero_()
            else:
                self.grad[o : o + n].copy_(p.grad.reshape(-1))
        return self.grad

    def zero_grad(self) -> None:
        for _, p in self.named:
            p.grad = None

    def allreduce_grads(self, group, size: int) -> None:
        """Average the flat gradient over a data-parallel group (our one-bucket DDP)."""
        if size > 1:
            dist.all_reduce(self.grad, group=group)
            self.grad.div_(size)

    # --- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One AdamW step on this rank's shard of the buffer, then rebuild the full buffer."""
        b1, b2 = self.betas
        self.step_count += 1
        p, g = self.flat[self.lo : self.hi], self.grad[self.lo : self.hi]
        lr_t = lr if self.lr_scale is None else lr * self.lr_scale
        p.mul_(1.0 - lr_t * self.weight_decay * self.decay_mask)
        self.exp_avg.lerp_(g, 1.0 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        bc1, bc2 = 1.0 - b1**self.step_count, 1.0 - b2**self.step_count
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(self.eps)
        if self.lr_scale is None:
            p.addcdiv_(self.exp_avg, denom, value=-lr / bc1)
        else:
            p.add_(self.exp_avg / denom * lr_t, alpha=-1.0 / bc1)
        if self.shards > 1:
            mine = p.clone()
            dist.all_gather(list(self.flat.split(self.shard_size)), mine, group=self.group)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (exp_avg + exp_avg_sq)."""
        return (self.exp_avg.numel() + self.exp_avg_sq.numel()) * self.exp_avg.element_size()

    # --- layout-independent state: per-parameter moments, no communication ---------------------
    def _overlaps(self):
        """(name, param, a, b): elements a..b of each parameter that lie in this rank's shard."""
        for name, p in self.named:
            o, n = self.offsets[name]
            lo, hi = max(o, self.lo), min(o + n, self.hi)
            if lo < hi:
                yield name, p, lo - o, hi - o

    def moment_pieces(self) -> dict[str, dict[str, tuple[torch.Tensor, int, int]]]:
        """{"exp_avg": {name: (values, a, b)}, "exp_avg_sq": {...}}: this rank's moments of elements
        a..b of each flattened parameter (the whole parameter unless it straddles ZeRO shards); views, no copies."""
        out = {"exp_avg": {}, "exp_avg_sq": {}}
        for name, p, a, b in self._overlaps():
            o = self.offsets[name][0] - self.lo
            for key, shard in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                out[key][name] = (shard[o + a : o + b], a, b)
        return out

    def load_moments(self, read, step_count: int) -> None:
        """Fill this rank's shard from `read(key, name)` -> that moment of parameter `name`, shaped
        like it; only parameters overlapping the shard are read."""
        for shard in (self.exp_avg, self.exp_avg_sq):
            shard.zero_()
        for name, p, a, b in self._overlaps():
            o = self.offsets[name][0] - self.lo
            for key, shard in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                shard[o + a : o + b].copy_(read(key, name).reshape(-1)[a:b])
        self.step_count = int(step_count)


def clip_grad_norm_(flat_grad: torch.Tensor, count_mask: torch.Tensor | None, max_norm: float, group=None) -> float:
    """Global L2 norm of the gradient over all model-parallel ranks, then clip in place.

    `count_mask` (1 or 0 per element) counts each parameter once: TP-sharded slices on every TP
    rank, TP-replicated parameters on TP rank 0 only. `group` spans the TP and PP ranks holding
    one model replica (DP replicas hold equal grads after the all-reduce and are not summed).
    """
    sq = (flat_grad.float() ** 2 * count_mask).sum() if count_mask is not None else (flat_grad.float() ** 2).sum()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    norm = float(sq.sqrt())
    if max_norm and max_norm > 0 and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            flat_grad.mul_(coef)
    return norm


class LossScaler:
    """Dynamic loss scaling for fp16, decided over the whole world.

    torch.amp.GradScaler checks for inf/NaN on its own rank only; with pipeline stages a skip on
    one stage and a step on another would desynchronize the model, so the found-inf flag is
    all-reduced over every rank here. Halve on overflow (the step is skipped), double after
    `growth_interval` clean steps.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled, self.scale, self.growth_interval, self.good_steps = enabled, init_scale if enabled else 1.0, growth_interval, 0

    def unscale_and_check(self, flat_grad: torch.Tensor) -> bool:
        """Unscale the gradient in place; True when the step may be taken (finite everywhere)."""
        if not self.enabled:
            return True
        flat_grad.div_(self.scale)
        bad = torch.tensor([0.0 if torch.isfinite(flat_grad).all() else 1.0], device=flat_grad.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            self.scale, self.good_steps = self.scale / 2.0, 0
            return False
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2.0
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
