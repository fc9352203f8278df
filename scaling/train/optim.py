"""AdamW on flat buffers, optionally sharded over data-parallel ranks (ZeRO-1), with gradients
reduced in buckets while backward runs; plus the LR schedule, gradient clipping across
model-parallel ranks and a world-wide loss scaler.

Why our own and not megatron-core's DistributedOptimizer: megatron's optimizer runs on the
gradient buffers of its DistributedDataParallel wrapper, which creates CUDA streams
(`torch.cuda.Stream(device=torch.cuda.current_device())`) and so does not run on CPU/gloo. This
is the same design, small enough to read:

Buffers (per rank; P trainable parameters of this rank, d = DP size, d' = d under ZeRO-1 else 1):
  weights  one flat buffer in `param_dtype` (fp32, or bf16/fp16 under `--precision bf16|fp16`);
           every parameter is a view into it, so the model trains the buffer itself   2 or 4 B/param
  grads    one flat fp32 buffer; each parameter's `main_grad` is a view into it. fp32 parameters
           get `p.grad` = that view (autograd accumulates in place, no copy); a 16-bit parameter's
           grad is added into its `main_grad` by a post-accumulate-grad hook and freed   4 B/param
  state    AdamW moments (fp32) and, with 16-bit weights, the fp32 master weights, for this rank's
           shard only                                                             (8 or 12) / d'
  metadata per parameter (weight decay, lr scale, counted in the grad norm), not per element.
So bf16 costs 6 + 12/d bytes per parameter with ZeRO-1 (Megatron's mixed precision), fp32 8 + 8/d.

Buckets. The buffers are laid out in reverse registration order (about the order backward
produces gradients) and cut into buckets of `bucket_mb` MiB of fp32 gradient (element ranges:
a parameter larger than a bucket spans several). Each bucket's length is a multiple of d; under
ZeRO-1, DP rank r owns chunk r of every bucket (Megatron's layout). After a parameter's last
micro-batch gradient (`zero_grad(micro_batches)` says how many), the hook counts it; when every
parameter touching a bucket is done, the bucket is pre-divided by d and its collective starts
asynchronously on the DP group (`overlap=True`): an all-reduce, or under ZeRO-1 a reduce-scatter
into this rank's chunk (half the traffic). `finish_grad_sync()` starts the buckets not started
yet and waits for all (with overlap off, all of them start there, after backward). `step` updates
this rank's chunk of each bucket and all-gathers the bucket's updated weights (16-bit under
bf16: half the traffic) while the next bucket is updated.
Weight decay is decoupled (AdamW): none on biases, norms, the cls/mask tokens and positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from rsscale.scaling.parallel.mappings import reduce_scatter_tensor

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed")
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.10 name first


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


@dataclass
class _Segment:
    """The part of parameter `index` that lies in this rank's chunk of a bucket: elements a..b of
    the flattened parameter, at `lo` in the flat buffers and `state` in the shard state."""

    index: int
    a: int
    b: int
    lo: int
    state: int


@dataclass
class _Bucket:
    lo: int  # flat range [lo, hi); (hi - lo) % shards == 0
    hi: int
    own_lo: int  # this rank's chunk of it
    own_hi: int
    state: int  # where that chunk starts in the shard state tensors
    params: list = field(default_factory=list)  # indices of the parameters touching the bucket
    segments: list = field(default_factory=list)
    pending: int = 0
    work: object = None


class FlatAdamW:
    """AdamW over `named_params` in flat buffers (module doc): `shards`/`shard_rank` shard its state
    over the DP `group` of `dp_size` ranks (ZeRO-1; shards is 1 or dp_size)."""

    def __init__(self, named_params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, shards: int = 1, shard_rank: int = 0, group=None,
                 lr_scales: dict[str, float] | None = None, param_dtype: torch.dtype = torch.float32, dp_size: int | None = None,
                 bucket_mb: float = 0.0, overlap: bool = False, counted=None):
        """lr_scales: {name: multiplier} of the step's lr per parameter (layer-wise lr decay);
        bucket_mb: MiB of fp32 gradient per bucket (0: one bucket); overlap: reduce buckets during
        backward; counted(name, param) -> bool: whether the grad norm counts it on this rank
        (TP-replicated parameters on TP rank 0 only); default every parameter."""
        named = [(n, p) for n, p in named_params if p.requires_grad][::-1]  # about the order backward reaches them
        if not named:
            raise ValueError("FlatAdamW got no trainable parameters")
        if dp_size is None:
            dp_size = shards
        if shards not in (1, dp_size):
            raise ValueError(f"FlatAdamW shards must be 1 or the DP size {dp_size}, got {shards}")
        self.named, self.betas, self.eps, self.weight_decay = named, betas, eps, weight_decay
        self.shards, self.shard_rank, self.group, self.dp_size, self.overlap = shards, shard_rank, group, dp_size, overlap
        device = named[0][1].device
        self.numel = sum(p.numel() for _, p in named)
        self.offsets, o = {}, 0
        for name, p in named:
            self.offsets[name] = (o, p.numel())
            o += p.numel()
        self.buckets = self._cut(bucket_mb)
        total = self.buckets[-1].hi
        self.flat = torch.zeros(total, dtype=param_dtype, device=device)
        self.grad = torch.zeros(total, dtype=torch.float32, device=device)
        self.master = None  # fp32 weights of this rank's chunks when the model's are 16-bit (from the fp32 originals)
        if param_dtype != torch.float32:
            self.master = torch.zeros(sum(b.own_hi - b.own_lo for b in self.buckets), dtype=torch.float32, device=device)
            for b in self.buckets:
                for s in b.segments:
                    self.master[s.state : s.state + s.b - s.a].copy_(named[s.index][1].detach().reshape(-1)[s.a : s.b])
        self._step_groups = None  # step()'s views, made on first use (a build on the meta device has none)
        self.main_grads = []
        for name, p in named:
            o, n = self.offsets[name]
            self.flat[o : o + n].copy_(p.detach().reshape(-1))
            p.data = self.flat[o : o + n].view_as(p)  # the model now trains the flat buffer
            self.main_grads.append(self.grad[o : o + n].view_as(p))
            p.main_grad = self.main_grads[-1]
        self.decay = [decays(n, p) for n, p in named]
        self.lr_scale = [1.0 if lr_scales is None else float(lr_scales[n]) for n, _ in named]
        self.counted = [True if counted is None else bool(counted(n, p)) for n, p in named]
        shard = sum(b.own_hi - b.own_lo for b in self.buckets)
        self.exp_avg = torch.zeros(shard, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.step_count = 0
        self._seen, self._expected, self._next = [0] * len(named), 1, 0
        self._hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: self._on_grad(i, p)) for i, (_, p) in enumerate(named)]
        self.zero_grad()

    def _cut(self, bucket_mb: float) -> list[_Bucket]:
        """Buckets of about `bucket_mb` MiB (multiples of `shards` elements) and their segments."""
        d = self.shards
        size = int(bucket_mb * 2**20 / 4) if bucket_mb and bucket_mb > 0 else self.numel
        size = max(d, -(-size // d) * d)
        buckets, lo = [], 0
        while lo < self.numel:  # bucket k is [k * size, (k + 1) * size), the last one shorter
            hi = min(lo + size, -(-self.numel // d) * d)
            c = (hi - lo) // d
            own = lo + self.shard_rank * c
            buckets.append(_Bucket(lo, hi, own, own + c, lo // d))  # every earlier chunk is size / d long
            lo = hi
        self._buckets_of = []  # per parameter: the buckets it touches
        for i, (name, _) in enumerate(self.named):
            o, n = self.offsets[name]
            self._buckets_of.append(list(range(o // size, (o + n - 1) // size + 1)))
            for b in (buckets[k] for k in self._buckets_of[-1]):
                b.params.append(i)
                lo, hi = max(o, b.own_lo), min(o + n, b.own_hi)
                if lo < hi:
                    b.segments.append(_Segment(i, lo - o, hi - o, lo, b.state + lo - b.own_lo))
        return buckets

    # --- gradients -----------------------------------------------------------------------------
    def zero_grad(self, micro_batches: int = 1) -> None:
        """Zero the gradient buffer and expect `micro_batches` backward passes before the reduction."""
        if any(b.work is not None for b in self.buckets):
            self.finish_grad_sync()  # never leave a collective in flight over a buffer being zeroed
        self._next = 0
        self.grad.zero_()
        for (_, p), main in zip(self.named, self.main_grads):
            p.grad = main if p.dtype == main.dtype else None
        self._seen, self._expected = [0] * len(self.named), micro_batches
        for b in self.buckets:
            b.pending, b.work = len(b.params), None

    def _on_grad(self, i: int, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: fold p.grad into its main_grad; start ready buckets."""
        main = self.main_grads[i]
        if p.grad is not None and p.grad.data_ptr() != main.data_ptr():  # 16-bit weights, or a grad autograd made anew
            main.add_(p.grad)
            p.grad = main if p.dtype == main.dtype else None
        self._seen[i] += 1
        if self._seen[i] > self._expected:
            raise RuntimeError(f"parameter {self.named[i][0]} got more gradients than the {self._expected} micro-batches announced "
                               "to zero_grad(); its bucket may already be reduced (run with --no-overlap-grad-reduce)")
        if self.overlap and self._seen[i] == self._expected:
            for k in self._buckets_of[i]:
                self.buckets[k].pending -= 1
            while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:  # in bucket order on every rank
                self._launch(self.buckets[self._next])

    def _launch(self, b: _Bucket) -> None:
        self._next += 1
        g = self.grad[b.lo : b.hi]
        if self.dp_size == 1:
            b.work = True
            return
        g.div_(self.dp_size)  # pre-divided: the sum is the DP mean
        if self.shards > 1 and dist.get_backend(self.group) != "gloo":
            b.work = reduce_scatter_tensor(self.grad[b.own_lo : b.own_hi], g, self.group, async_op=True)
        else:  # (gloo's reduce-scatter is slower than its all-reduce: 12.6 vs 6.9 ms for 8 MB on 2 CPU processes)
            b.work = dist.all_reduce(g, group=self.group, async_op=True)

    def before_backward(self, chunk: int, micro: int) -> None:
        """(The pipeline's hook before each backward: the buckets count their micro-batches themselves.)"""

    def finish_grad_sync(self) -> None:
        """Start the buckets not started during backward, then wait for every bucket: afterwards this
        rank's chunks (all of the buffer without ZeRO-1) hold the DP-mean gradient."""
        self.started_in_backward = self._next  # buckets whose reduction overlapped backward (for tests and bench)
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        for b in self.buckets:
            if b.work is not True:
                b.work.wait()
            b.work = None

    def grad_pieces(self) -> list[torch.Tensor]:
        """This rank's reduced gradient: its chunk of every bucket."""
        return [self.grad[b.own_lo : b.own_hi] for b in self.buckets]

    def clip_grad_norm_(self, max_norm: float, group=None) -> float:
        """Global L2 norm of the gradient, each parameter counted once: its ZeRO-1 chunks summed over
        DP, TP-sharded slices on every TP rank and TP-replicated ones where `counted`, summed over
        the model-parallel `group`; then clip in place. Returns the norm before clipping."""
        # one fp32 norm per parameter (one norm over a whole multi-million-element chunk is off by
        # about 1e-5 of the float64 norm)
        pieces = [self.grad[s.lo : s.lo + s.b - s.a] for b in self.buckets for s in b.segments if self.counted[s.index]]
        sq = torch.stack(torch._foreach_norm(pieces)).double().square().sum() if pieces else torch.zeros((), dtype=torch.float64)
        sq = sq.to(self.grad.device)
        if self.shards > 1:
            dist.all_reduce(sq, group=self.group)
        return clip_grad_norm_(self.grad_pieces(), sq, max_norm, group)

    # --- the step ------------------------------------------------------------------------------
    def _weights(self, b: _Bucket) -> torch.Tensor:
        """The fp32 weights of this rank's chunk of `b` that AdamW updates (the master copy, or the
        model's own fp32 weights)."""
        n = b.own_hi - b.own_lo
        return self.flat[b.own_lo : b.own_hi] if self.master is None else self.master[b.state : b.state + n]

    def _groups(self) -> list[list[tuple[float, float, list[list[torch.Tensor]]]]]:
        """Per bucket: (lr scale, weight decay, [weights, grads, exp_avg, exp_avg_sq] views of its
        segments) for each (lr scale, decay) pair present; built once (the buffers never move)."""
        if self._step_groups is None:
            self._step_groups = []
            for b in self.buckets:
                w, g = self._weights(b), self.grad[b.own_lo : b.own_hi]
                n = b.own_hi - b.own_lo
                m, v = self.exp_avg[b.state : b.state + n], self.exp_avg_sq[b.state : b.state + n]
                groups: dict[tuple[float, float], list[list[torch.Tensor]]] = {}
                for s in b.segments:
                    sl = slice(s.lo - b.own_lo, s.lo - b.own_lo + s.b - s.a)
                    key = (self.lr_scale[s.index], self.weight_decay if self.decay[s.index] else 0.0)
                    for views, t in zip(groups.setdefault(key, [[], [], [], []]), (w, g, m, v)):
                        views.append(t[sl])
                self._step_groups.append([(scale, wd, views) for (scale, wd), views in groups.items()])
        return self._step_groups

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One AdamW step on this rank's chunks, each bucket's weights all-gathered as it is done.
        The arithmetic is torch's fused AdamW kernel (one call per bucket and (lr scale, decay)
        group, on views of the flat buffers); our step count drives its bias correction."""
        b1, b2 = self.betas
        self.step_count += 1
        gathers = []
        step = torch.tensor(float(self.step_count))  # read by the kernel for every tensor (torch.optim increments it before)
        for b, groups in zip(self.buckets, self._groups()):
            for scale, wd, (ws, gs, ms, vs) in groups:
                torch._fused_adamw_(ws, gs, ms, vs, [], [step] * len(ws), lr=lr * scale, beta1=b1, beta2=b2, weight_decay=wd,
                                    eps=self.eps, amsgrad=False, maximize=False)
            if self.master is not None:
                self.flat[b.own_lo : b.own_hi].copy_(self._weights(b))
            if self.shards > 1:
                gathers.append(_ALL_GATHER(self.flat[b.lo : b.hi], self.flat[b.own_lo : b.own_hi], group=self.group, async_op=True))
        for work in gathers:
            work.wait()

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (moments, and the fp32 master weights if any)."""
        return sum(t.numel() * t.element_size() for t in (self.exp_avg, self.exp_avg_sq, self.master) if t is not None)

    # --- layout-independent state: per-parameter pieces, no communication ----------------------
    def _states(self):
        out = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        if self.master is not None:
            out["model"] = self.master  # checkpoints keep the fp32 weights, not the 16-bit copy
        return out

    def state_pieces(self) -> dict[str, dict[str, list[tuple[torch.Tensor, int, int]]]]:
        """{"exp_avg" | "exp_avg_sq" | "model": {name: [(values, a, b), ...]}}: this rank's values of
        elements a..b of each flattened parameter ("model": the fp32 master weights, only with 16-bit
        weights); one whole piece per parameter unless ZeRO-1 cuts it. Views, no copies."""
        out = {key: {} for key in self._states()}
        for b in self.buckets:
            for s in b.segments:
                name = self.named[s.index][0]
                for key, t in self._states().items():
                    out[key].setdefault(name, []).append((t[s.state : s.state + s.b - s.a], s.a, s.b))
        return out

    def load_state(self, read, step_count: int) -> None:
        """Fill this rank's state from `read(key, name)` -> that tensor of parameter `name`, shaped
        like it (keys as in `state_pieces`); only parameters touching this rank's chunks are read."""
        for key, t in self._states().items():
            t.zero_()
            cache = {}
            for b in self.buckets:
                for s in b.segments:
                    name = self.named[s.index][0]
                    if name not in cache:
                        cache = {name: read(key, name).reshape(-1)}
                    t[s.state : s.state + s.b - s.a].copy_(cache[name][s.a : s.b])
        self.step_count = int(step_count)


def clip_grad_norm_(grads: list[torch.Tensor], sq: torch.Tensor, max_norm: float, group=None) -> float:
    """Global L2 norm from this rank's counted sum of squares `sq`, summed over `group` (the ranks
    holding different parts of one model replica); clips `grads` in place. Returns the norm."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    norm = float(sq.sqrt())
    if max_norm and max_norm > 0 and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
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
