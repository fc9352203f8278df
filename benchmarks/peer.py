"""The PyTorch-native peer of a bench run (`rsscale bench --peer torch`): the same MAE (shape,
weights, images, masking noise, precision, global batch and micro-batches) written with plain
torch modules (nn.Linear, nn.LayerNorm, F.scaled_dot_product_attention) and made parallel the
way PyTorch offers out of the box, so each of our layouts is timed against what one would get
for free:

    ours                      native peer
    one process               the same model, torch.optim.AdamW (fused where torch has it)
    DP (all-reduce)           DistributedDataParallel (gradient accumulation under no_sync)
    DP with ZeRO-1            the same, with torch's ZeroRedundancyOptimizer over fused AdamW
    TP (dp 1, no SP)          DTensor: parallelize_module, ColwiseParallel qkv/fc1, RowwiseParallel proj/fc2
    FSDP                      FSDP2 fully_shard on every block and the root
    PP, TP x DP, SP           no native peer here: said in one line, nothing measured

The peer's parameter names equal ours at TP=1, so it loads our full weights (gathered once at
start: the bench models fit one process). Under TP the qkv rows are reordered so that each
rank's contiguous ColwiseParallel shard holds its heads' q, k and v (ours keeps [q; k; v] and
cuts with stride 3). Steps alternate with ours on the same batch; each side's time excludes
drawing the batch. Peak memory on CPU is the process's (both models are resident).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from rsscale.scaling.mae import patchify, random_masking
from rsscale.scaling.optim import decays, lr_at
from rsscale.scaling.vit import PatchEmbed


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.head_dim = width // heads

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, N, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)  # -1: this rank's heads
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))


class _Mlp(nn.Module):
    def __init__(self, width: int, mlp: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp)
        self.fc2 = nn.Linear(mlp, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class NativeBlock(nn.Module):
    """K parallel attention branches, then K parallel MLP branches, each pre-norm and residual."""

    def __init__(self, width: int, heads: int, mlp: int, branches: int, qkv_bias: bool, eps: float):
        super().__init__()
        self.attn = nn.ModuleList(_Attention(width, heads, qkv_bias, eps) for _ in range(branches))
        self.mlp = nn.ModuleList(_Mlp(width, mlp, eps) for _ in range(branches))

    def forward(self, x):
        x = x + sum(a(x) for a in self.attn)
        return x + sum(m(x) for m in self.mlp)


class NativeMAE(nn.Module):
    """MAE (models_mae.py's algorithm) of a ViTConfig, with our parameter names."""

    def __init__(self, cfg):
        super().__init__()
        D, Dd = cfg.width, cfg.dec_width
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D), requires_grad=False)
        self.blocks = nn.ModuleDict({str(i): NativeBlock(D, cfg.heads, cfg.mlp, cfg.branches, cfg.qkv_bias, cfg.ln_eps) for i in range(cfg.depth)})
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, Dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(NativeBlock(Dd, cfg.dec_heads, cfg.dec_mlp, 1, cfg.qkv_bias, cfg.ln_eps) for _ in range(cfg.dec_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=cfg.ln_eps)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_dim)

    def forward(self, imgs, noise):
        """-> the loss: mean over masked patches of the per-patch MSE (normalized targets)."""
        cfg = self.cfg
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, cfg.mask_ratio, noise)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks.values():
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        B, n_vis, Dd = x.shape
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, ids_restore.shape[1] + 1 - n_vis, -1)], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        target = patchify(imgs, cfg.patch_size)
        if cfg.norm_pix_loss:
            target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


def native_kind(layout, fsdp: bool) -> str | None:
    """The native peer of a layout, or None where this module has none (module doc)."""
    if layout.pp > 1 or layout.sp or (layout.tp > 1 and layout.dp > 1):
        return None
    if fsdp:
        return "fsdp2"
    if layout.tp > 1:
        return "dtensor-tp"
    return "ddp" if layout.dp > 1 else "single"


def _clip_grad_norm(params: list, max_norm: float) -> None:
    """torch's clip_grad_norm_ where DTensor (TP-sharded) and plain (replicated) gradients mix: the
    two kinds' norms apart (a DTensor norm is reduced over its mesh), then one scale for all."""
    from torch.distributed.tensor import DTensor

    kinds = [[p for p in params if isinstance(p.grad, DTensor) == d] for d in (True, False)]
    norms = []
    for group in filter(None, kinds):
        n = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in filter(None, kinds):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)


def _qkv_rank_major(w: torch.Tensor, tp: int) -> torch.Tensor:
    """[q; k; v] rows (heads contiguous) -> per TP rank [q_r; k_r; v_r], so that a contiguous
    ColwiseParallel shard holds whole heads' q, k and v."""
    q, k, v = w.chunk(3, dim=0)
    return torch.cat([torch.cat([t.chunk(tp, dim=0)[r] for t in (q, k, v)]) for r in range(tp)])


class NativePeer:
    """One rank's share of the native peer of `trainer` (built after it, in the same processes)."""

    def __init__(self, trainer):
        self.trainer, L, cfg = trainer, trainer.layout, trainer.cfg
        self.kind = native_kind(L, trainer.config.fsdp)
        if self.kind is None:
            raise ValueError(f"no PyTorch-native peer for {L} (pipeline, sequence parallel and TP x DP have none here)")
        if cfg.supervised:
            raise ValueError(f"no PyTorch-native peer for the supervised model {cfg.name!r} yet (the peer is an MAE)")
        full = trainer.full_state_dict()  # TP=1 names and shapes
        torch.manual_seed(0)
        model = NativeMAE(cfg).to(trainer.device)
        if self.kind == "dtensor-tp":
            full = {n: _qkv_rank_major(t, L.tp) if n.endswith("qkv.weight") or n.endswith("qkv.bias") else t for n, t in full.items()}
        model.load_state_dict(full, strict=True)
        self.model = self._parallelize(model, L)
        from torch.distributed.tensor import DTensor

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        opt = trainer.config.optim
        kw = dict(lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay)
        kinds = [[(n, p) for n, p in named if isinstance(p, DTensor) == d] for d in (True, False)]  # a fused step takes one kind
        groups = [[g for g in ({"params": [p for n, p in kind if decays(n, p)]},  # decay where ours does (matrices only)
                               {"params": [p for n, p in kind if not decays(n, p)], "weight_decay": 0.0}) if g["params"]]
                  for kind in kinds if kind]
        if self.kind == "ddp" and opt.distributed_optimizer:  # ZeRO-1 the native way: AdamW state sharded over the DP group
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.optimizers = [ZeroRedundancyOptimizer(g, optimizer_class=torch.optim.AdamW, process_group=trainer.state.dp_group(),
                                                       fused=True, **kw) for g in groups]
            self.optimizer_impl = "ZeroRedundancyOptimizer(fused)"
            return
        try:
            self.optimizers = [torch.optim.AdamW(g, fused=True, **kw) for g in groups]
            self.optimizer_impl = "fused"
        except (RuntimeError, TypeError, ValueError):  # a device without the fused kernel
            self.optimizers = [torch.optim.AdamW(g, foreach=True, **kw) for g in groups]
            self.optimizer_impl = "foreach"

    def _parallelize(self, model, L):
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, process_group=self.trainer.state.dp_group(), bucket_cap_mb=self.trainer.config.optim.bucket_mb or 25)
        if self.kind in ("dtensor-tp", "fsdp2"):
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.trainer.device.type, (dist.get_world_size(),))
            if self.kind == "fsdp2":
                from torch.distributed.fsdp import fully_shard

                for blk in list(model.blocks.values()) + list(model.decoder_blocks):
                    fully_shard(blk, mesh=mesh)
                return fully_shard(model, mesh=mesh)
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            for blk in list(model.blocks.values()) + list(model.decoder_blocks):
                plan = {}
                for k in range(len(blk.attn)):
                    plan |= {f"attn.{k}.qkv": ColwiseParallel(), f"attn.{k}.proj": RowwiseParallel(),
                             f"mlp.{k}.fc1": ColwiseParallel(), f"mlp.{k}.fc2": RowwiseParallel()}
                parallelize_module(blk, mesh, plan)
        return model

    def train_step(self, micro: list) -> dict:
        """One optimizer step on `micro` (ours's (images, noise) per micro-batch of this rank for the
        same step): {"loss" (global batch mean), "t_step" (s, without drawing the batch)}."""
        tr, L = self.trainer, self.trainer.layout
        tr._sync()
        t0 = time.perf_counter()
        self.model.train()
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=tr.device)
        for i, (imgs, noise) in enumerate(micro):
            last = i == len(micro) - 1
            quiet = self.model.no_sync() if self.kind == "ddp" and not last else contextlib.nullcontext()
            if self.kind == "fsdp2":
                self.model.set_requires_gradient_sync(last)
            with quiet, tr._autocast():
                loss = self.model(imgs, noise) / len(micro)
            loss.backward()
            total += loss.detach().double()
        lr = lr_at(tr.step, tr.config.optim.lr, tr.config.optim.warmup, tr.config.steps, tr.config.optim.min_lr)
        for group in (g for o in self.optimizers for g in o.param_groups):
            group["lr"] = lr
        if tr.config.optim.clip_grad:
            _clip_grad_norm([p for p in self.model.parameters() if p.grad is not None], tr.config.optim.clip_grad)
        for o in self.optimizers:
            o.step()
        tr._sync()
        t = time.perf_counter() - t0
        if L.dp > 1:
            dist.all_reduce(total, group=tr.state.dp_group())
            total /= L.dp
        return {"loss": float(total), "t_step": t}
