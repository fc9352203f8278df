"""The PyTorch-native peer of a bench run (`rsscale bench --peer torch`): the same MAE (shape,
weights, images, masking noise, precision, global batch and micro-batches) written with plain
torch modules (nn.Linear, nn.LayerNorm, F.scaled_dot_product_attention) and made parallel the
way PyTorch offers out of the box, so each of our layouts is timed against what one would get
for free:

    ours                      native peer
    one process               the same model, torch.optim.AdamW (fused where torch has it)
    DP (all-reduce)           DistributedDataParallel (gradient accumulation under no_sync)
    DP with ZeRO-1            the same, with torch's ZeroRedundancyOptimizer over fused AdamW
    TP (dp 1)                 DTensor: parallelize_module, ColwiseParallel qkv/fc1, RowwiseParallel proj/fc2
    TP + SP (dp 1)            the same with SequenceParallel LayerNorms, the residual stream sharded
                              over tokens between the blocks (PrepareModuleInput/Output at the ends)
    FSDP                      FSDP2 fully_shard on every block and the root
    PP (tp 1)                 torch.distributed.pipelining: PipelineStage per chunk (the same blocks
                              as ours), Schedule1F1B, or ScheduleInterleaved1F1B with --vpp; with DP
                              each chunk under FSDP2's replicate over its DP group, with --fsdp
                              under fully_shard
    TP x DP                   DTensor TP (and SP) over the mesh's tp dimension, replicated over its dp
                              dimension by FSDP2's `replicate` (DDP takes no DTensor parameters), or
                              sharded over it by `fully_shard` with --fsdp: torch's 2-D recipe
    PP x TP (x DP)            each stage's chunk made TP-parallel as above over its TP group, then
                              over DP as under PP x DP, and staged (torchtitan's PP x TP and 3-D:
                              TP and DP meshes cut from one (pp, dp, tp) mesh)
    PP x ZeRO-1, TP x DP x ZeRO-1   no native peer here: refused in one line before anything runs

The peer's parameter names equal ours at TP=1, so it loads our full weights (gathered once at
start: the bench models fit one process; under PP each stage loads its own). Under TP the qkv
rows are reordered so that each rank's contiguous ColwiseParallel shard holds its heads' q, k and
v (ours keeps [q; k; v] and cuts with stride 3). Under SP both sides pad the tokens to a multiple
of TP and attend to the real ones only. Steps alternate with ours on the same batch; each side's
time excludes drawing the batch. Peak memory on CPU is the process's (both models are resident).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from rsscale.scaling.model.mae import mask_from_noise, patchify, random_masking
from rsscale.scaling.model.vit import PatchEmbed
from rsscale.scaling.train.optim import decays, lr_at


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool, eps: float, tokens: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.head_dim, self.tokens = width // heads, tokens

    def forward(self, x):
        qkv = self.qkv(self.norm(x))  # under sequence parallelism: every rank's tokens, padding included
        B, N, _ = qkv.shape
        n = self.tokens  # the real tokens: padding is never attended (as ours)
        q, k, v = qkv[:, :n].reshape(B, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)  # -1: this rank's heads
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, n, -1)
        return self.proj(F.pad(o, (0, 0, 0, N - n)) if N > n else o)


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

    def __init__(self, width: int, heads: int, mlp: int, branches: int, qkv_bias: bool, eps: float, tokens: int):
        super().__init__()
        self.attn = nn.ModuleList(_Attention(width, heads, qkv_bias, eps, tokens) for _ in range(branches))
        self.mlp = nn.ModuleList(_Mlp(width, mlp, eps) for _ in range(branches))

    def forward(self, x):
        x = x + sum(a(x) for a in self.attn)
        return x + sum(m(x) for m in self.mlp)


class NativeMAE(nn.Module):
    """MAE (models_mae.py's algorithm) of a ViTConfig, with our parameter names.

    `forward(imgs, noise)` -> (pred, mask), and `mae_loss` of that and the images is the loss. A
    pipeline chunk is this model pruned (`pipeline_chunk`): without the patch embedding it takes
    the previous chunk's hidden states instead of images; without the decoder it returns
    (hidden states, noise), the noise travelling with the tokens so that the last chunk can undo
    the masking (the native way of passing side inputs between `torch.distributed.pipelining`
    stages; it needs no gradient)."""

    def __init__(self, cfg):
        super().__init__()
        D, Dd = cfg.width, cfg.dec_width
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D), requires_grad=False)
        self.blocks = nn.ModuleDict({str(i): NativeBlock(D, cfg.heads, cfg.mlp, cfg.branches, cfg.qkv_bias, cfg.ln_eps, cfg.num_visible + 1)
                                     for i in range(cfg.depth)})
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, Dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(NativeBlock(Dd, cfg.dec_heads, cfg.dec_mlp, 1, cfg.qkv_bias, cfg.ln_eps, cfg.num_patches + 1)
                                            for _ in range(cfg.dec_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=cfg.ln_eps)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_dim)
        self.pad_to = 1  # sequence parallelism: tokens zero-padded to a multiple of TP around the blocks

    def _run(self, blocks, x):
        n = x.shape[1]
        x = F.pad(x, (0, 0, 0, -n % self.pad_to))
        for blk in blocks:
            x = blk(x)
        return x[:, :n].contiguous() if x.shape[1] > n else x  # contiguous: what a pipeline stage sends on

    def forward(self, x, noise):
        cfg = self.cfg
        masked = None
        if self.patch_embed is not None:  # x: images
            x = self.patch_embed(x) + self.pos_embed[:, 1:]
            x, *masked = random_masking(x, cfg.mask_ratio, noise)
            x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        x = self._run(self.blocks.values(), x)
        if self.decoder_pred is None:
            return x, noise
        if masked is None:  # a later pipeline chunk: the same masking again, from the noise
            _, *masked = mask_from_noise(noise, x.shape[1] - 1)
        mask, ids_restore = masked
        x = self.decoder_embed(self.norm(x))
        B, n_vis, Dd = x.shape
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, ids_restore.shape[1] + 1 - n_vis, -1)], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        x = self._run(self.decoder_blocks, x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:], mask


def mae_loss(out, imgs, cfg) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE against the (normalized) pixels."""
    pred, mask = out
    target = patchify(imgs, cfg.patch_size)
    if cfg.norm_pix_loss:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def pipeline_chunk(cfg, blocks: range, first: bool, last: bool, weights: dict, device) -> NativeMAE:
    """NativeMAE holding only encoder `blocks` (+ the input side if `first`, the decoder if `last`),
    built on the meta device and given `weights` (this chunk's, by our names) in place."""
    with torch.device("meta"):
        m = NativeMAE(cfg)
    for i in [i for i in m.blocks if int(i) not in blocks]:
        del m.blocks[i]
    if not first:
        m.patch_embed = m.cls_token = m.pos_embed = None
    if not last:
        m.norm = m.decoder_embed = m.mask_token = m.decoder_pos_embed = m.decoder_blocks = m.decoder_norm = m.decoder_pred = None
    m.load_state_dict({n: weights[n].to(device) for n in m.state_dict()}, strict=True, assign=True)
    return m


def why_no_peer(layout, data_parallel) -> str | None:
    """Why this module has no native peer for a layout and its DP sharing (scaling/spec/run.py
    DataParallel), in one line, or None (module doc)."""
    L, fsdp = layout, data_parallel.fsdp
    if L.tp > 1 and L.dp > 1 and data_parallel.distributed_optimizer:
        return "TP x DP with ZeRO-1 has none here (torch's ZeroRedundancyOptimizer takes no DTensor parameters)"
    if L.pp > 1 and data_parallel.distributed_optimizer:
        return "a pipeline with ZeRO-1 has none here (it is compared with DDP or FSDP over its DP groups)"
    if L.pp > 1 and L.num_micro < L.pp:
        return f"torch.distributed.pipelining's 1F1B needs at least as many micro-batches as stages ({L.num_micro} < {L.pp}); lower --micro-batch"
    return None


def native_kind(layout, data_parallel) -> str:
    """The native peer of a layout (module doc); ValueError saying why where this module has none."""
    L, why = layout, why_no_peer(layout, data_parallel)
    if why:
        raise ValueError(f"no PyTorch-native peer for {L}: {why}")
    if L.pp > 1:
        over_dp = "+fsdp2" if data_parallel.fsdp else "+replicate" if L.dp > 1 else ""
        tp = ("+dtensor-tp-sp" if L.sp else "+dtensor-tp") if L.tp > 1 else ""
        return ("pipelining-1f1b" if L.vpp == 1 else "pipelining-interleaved-1f1b") + tp + over_dp
    if L.tp > 1 and L.dp > 1:
        return ("dtensor-tp-sp" if L.sp else "dtensor-tp") + ("+fsdp2" if data_parallel.fsdp else "+replicate")
    if data_parallel.fsdp:
        return "fsdp2"
    if L.tp > 1:
        return "dtensor-tp-sp" if L.sp else "dtensor-tp"
    return "ddp" if L.dp > 1 else "single"


def _by_mesh(items: list, tensor_of) -> list[list]:
    """`items` grouped by the device mesh of their tensor (plain tensors: one group): torch's
    foreach and fused kernels take DTensors of one mesh at a time (a 2-D TP x DP model holds 1-D
    replicated and 2-D sharded ones)."""
    from torch.distributed.tensor import DTensor

    groups = {}
    for item in items:
        t = tensor_of(item)
        groups.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(item)
    return list(groups.values())


def _clip_grad_norm(params: list, max_norm: float, stages_group=None) -> None:
    """torch's clip_grad_norm_ where DTensor (TP-sharded) and plain gradients mix: each mesh's
    norm apart (a DTensor norm is reduced over its mesh), then one scale for all. With
    `stages_group` (pipeline stages, each holding different parameters) the squares are summed
    over it first."""
    from torch.distributed.tensor import DTensor

    kinds = _by_mesh(params, lambda p: p.grad)
    squares = torch.zeros((), device=params[0].device if params else None)
    for group in filter(None, kinds):
        n = torch.nn.utils.get_total_norm([p.grad for p in group])
        squares = squares + (n.full_tensor() if isinstance(n, DTensor) else n) ** 2
    if stages_group is not None:
        dist.all_reduce(squares, group=stages_group)
    for group in filter(None, kinds):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, squares.sqrt())


def _tensor_parallel(model, mesh, tp: int, sp: bool):
    """`model` (a NativeMAE or a pipeline chunk of it) made TP-parallel over the 1-D `mesh` with
    DTensor: ColwiseParallel qkv/fc1, RowwiseParallel proj/fc2; with `sp` the LayerNorms are
    SequenceParallel and the residual stream is sharded over tokens between the blocks
    (torchtitan's way), gathered at the ends of each run of blocks."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    col = ColwiseParallel(input_layouts=Shard(1)) if sp else ColwiseParallel()
    row = RowwiseParallel(output_layouts=Shard(1)) if sp else RowwiseParallel()
    for blocks in (list(model.blocks.values()), list(model.decoder_blocks or [])):
        for blk in blocks:
            plan = {}
            for k in range(len(blk.attn)):
                plan |= {f"attn.{k}.qkv": col, f"attn.{k}.proj": row, f"mlp.{k}.fc1": col, f"mlp.{k}.fc2": row}
                plan |= {f"{part}.{k}.norm": SequenceParallel() for part in ("attn", "mlp")} if sp else {}
            parallelize_module(blk, mesh, plan)
        if sp and blocks:
            model.pad_to = tp
            parallelize_module(blocks[0], mesh, PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                                   use_local_output=True))
            parallelize_module(blocks[-1], mesh, PrepareModuleOutput(output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),),
                                                                     use_local_output=True))
    return model


def _fully_shard(model, mesh):
    """FSDP2 `fully_shard` on every block (encoder and decoder) and then the root, over `mesh`."""
    from torch.distributed.fsdp import fully_shard

    for block in list(model.blocks.values()) + list(model.decoder_blocks or []):
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _native_mesh(trainer, shape: tuple[int, ...], names: tuple[str, ...]):
    """torch's DeviceMesh over the whole world with dimensions `names` (the slowest first), checked
    against our groups: its tp and pp dimensions must hold the ranks of ours (megatron's order puts
    TP fastest and PP slowest), or the two sides would not compute the same thing."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(trainer.device.type, shape, mesh_dim_names=names)
    for dim, group in (("tp", trainer.state.tp_group), ("pp", trainer.state.pp_group)):
        if dim in names and dist.get_process_group_ranks(group()) != mesh[dim].mesh.tolist():
            raise RuntimeError(f"the native {len(names)}-D mesh's {dim} groups differ from ours (megatron's order: TP fastest, PP slowest)")
    return mesh


def _qkv_rank_major(w: torch.Tensor, tp: int) -> torch.Tensor:
    """[q; k; v] rows (heads contiguous) -> per TP rank [q_r; k_r; v_r], so that a contiguous
    ColwiseParallel shard holds whole heads' q, k and v."""
    q, k, v = w.chunk(3, dim=0)
    return torch.cat([torch.cat([t.chunk(tp, dim=0)[r] for t in (q, k, v)]) for r in range(tp)])


class NativePeer:
    """One rank's share of the native peer of `trainer` (built after it, in the same processes)."""

    def __init__(self, trainer):
        self.trainer, L, cfg = trainer, trainer.layout, trainer.cfg
        self.kind = native_kind(L, trainer.config.data_parallel)
        if cfg.supervised:
            raise ValueError(f"no PyTorch-native peer for the supervised model {cfg.name!r} yet (the peer is an MAE)")
        full = trainer.full_state_dict()  # TP=1 names and shapes (this pipeline stage's parameters)
        if "dtensor-tp" in self.kind:
            full = {n: _qkv_rank_major(t, L.tp) if n.endswith("qkv.weight") or n.endswith("qkv.bias") else t for n, t in full.items()}
        self.schedule = None
        if self.kind.startswith("pipelining"):
            self.chunks = self._pipeline(full, L)
        else:
            self.chunks = [self._parallelize(pipeline_chunk(cfg, range(cfg.depth), True, True, full, trainer.device), L)]
        self.model = self.chunks[0]

        named = [(n, p) for c in self.chunks for n, p in c.named_parameters() if p.requires_grad]
        opt = trainer.config.optim
        kw = dict(lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay)
        kinds = _by_mesh(named, lambda item: item[1])  # a fused step takes one mesh
        groups = [[g for g in ({"params": [p for n, p in kind if decays(n, p)]},  # decay where ours does (matrices only)
                               {"params": [p for n, p in kind if not decays(n, p)], "weight_decay": 0.0}) if g["params"]]
                  for kind in kinds if kind]
        if self.kind == "ddp" and trainer.config.data_parallel.distributed_optimizer:  # ZeRO-1 the native way: AdamW state sharded over the DP group
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

    def _pipeline(self, full: dict, L) -> list:
        """This rank's chunks (ours: virtual stage j*P + rank holds `stage_layer_range` of P*V) as
        `PipelineStage`s under torch's 1F1B or interleaved 1F1B schedule."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        from rsscale.scaling.spec.layout import stage_layer_range

        cfg, tr, n = self.trainer.cfg, self.trainer, L.pp * L.vpp
        rank = tr.state.pp_rank()
        chunks, stages = [], []
        tp_mesh = dp_mesh = None
        if L.tp > 1 and L.dp > 1:  # torchtitan's 3-D: TP and DP meshes cut from one (pp, dp, tp) mesh (FSDP2 needs one parent)
            mesh = _native_mesh(tr, (L.pp, L.dp, L.tp), ("pp", "dp", "tp"))
            tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
        elif L.tp > 1:
            from torch.distributed.device_mesh import DeviceMesh

            tp_mesh = DeviceMesh.from_group(tr.state.tp_group(), tr.device.type)
        for j in range(L.vpp):
            v = j * L.pp + rank
            chunk = pipeline_chunk(cfg, range(*stage_layer_range(cfg.depth, n, v)), v == 0, v == n - 1, full, tr.device)
            if tp_mesh is not None:  # torchtitan's PP x TP: each stage's chunk TP-parallel over its TP group
                chunk = _tensor_parallel(chunk, tp_mesh, L.tp, L.sp)
            chunk = self._over_dp(chunk, dp_mesh)
            chunks.append(chunk)
            stages.append(PipelineStage(chunk, v, n, tr.device, group=tr.state.pp_group()))
        loss = lambda out, imgs: mae_loss(out, imgs, cfg)  # noqa: E731 (the schedule's loss_fn; it averages over micro-batches)
        self.schedule = (Schedule1F1B(stages[0], L.num_micro, loss_fn=loss) if L.vpp == 1
                         else ScheduleInterleaved1F1B(stages, L.num_micro, loss_fn=loss))
        return chunks

    def _over_dp(self, chunk, mesh=None):
        """A pipeline chunk (or the whole TP model of TP x DP) replicated over its DP group by FSDP2's
        `replicate`, or sharded over it by `fully_shard` (torchtitan's PP x DP and 2-D): PipelineStage
        syncs their gradients on the last micro-batch only. (DDP fails in a pipeline, an internal
        assert of its reducer: rebuilt bucket indices twice the parameters after the first
        accumulated step, and takes no DTensor parameters under TP.) `mesh`: the DP mesh (under TP,
        one cut from the same mesh as the TP one); by default, one over our DP group."""
        if not self.kind.endswith(("+replicate", "+fsdp2")):
            return chunk
        from torch.distributed.device_mesh import DeviceMesh

        mesh = mesh or DeviceMesh.from_group(self.trainer.state.dp_group(), self.trainer.device.type)
        if self.kind.endswith("+replicate"):
            from torch.distributed._composable.replicate_with_fsdp import replicate

            return replicate(chunk, mesh=mesh)
        return _fully_shard(chunk, mesh)

    def _parallelize(self, model, L):
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, process_group=self.trainer.state.dp_group(), bucket_cap_mb=self.trainer.config.data_parallel.bucket_mb or 25)
        if self.kind.startswith("dtensor-tp") or self.kind == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.trainer.device.type, (dist.get_world_size(),))
            if self.kind == "fsdp2":
                return _fully_shard(model, mesh)
            if L.tp > 1 and L.dp > 1:  # 2-D: TP over the tp dimension, then DP over the dp one (replicate: FSDP2's DDP, takes DTensors)
                mesh2 = _native_mesh(self.trainer, (L.dp, L.tp), ("dp", "tp"))
                return self._over_dp(_tensor_parallel(model, mesh2["tp"], L.tp, self.kind.startswith("dtensor-tp-sp")), mesh2["dp"])
            return _tensor_parallel(model, mesh, L.tp, self.kind.startswith("dtensor-tp-sp"))
        return model

    def train_step(self, micro: list) -> dict:
        """One optimizer step on `micro` (ours's (images, noise) per micro-batch of this rank for the
        same step): {"loss" (global batch mean), "t_step" (s, without drawing the batch)}."""
        tr, L = self.trainer, self.trainer.layout
        batch = [torch.cat(t) for t in zip(*micro)] if self.schedule is not None else None  # the schedule splits the whole batch
        tr._sync()
        t0 = time.perf_counter()
        for c in self.chunks:
            c.train()
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=tr.device)
        if self.schedule is not None:
            total += self._pipeline_step(*batch)
        else:
            for i, (imgs, noise) in enumerate(micro):
                last = i == len(micro) - 1
                quiet = self.model.no_sync() if self.kind == "ddp" and not last else contextlib.nullcontext()
                if self.kind == "fsdp2" or "+" in self.kind:  # FSDP2 and its replicate: accumulate, reduce on the last
                    self.model.set_requires_gradient_sync(last)
                with quiet, tr._autocast():
                    loss = mae_loss(self.model(imgs, noise), imgs, tr.cfg) / len(micro)
                loss.backward()
                total += loss.detach().double()
        lr = lr_at(tr.step, tr.config.optim.lr, tr.config.optim.warmup, tr.config.steps, tr.config.optim.min_lr)
        for group in (g for o in self.optimizers for g in o.param_groups):
            group["lr"] = lr
        if tr.config.optim.clip_grad:
            _clip_grad_norm([p for c in self.chunks for p in c.parameters() if p.grad is not None], tr.config.optim.clip_grad,
                            tr.state.pp_group() if self.schedule is not None else None)
        for o in self.optimizers:
            o.step()
        tr._sync()
        t = time.perf_counter() - t0
        if L.dp > 1:
            dist.all_reduce(total, group=tr.state.dp_group())
            total /= L.dp
        if self.schedule is not None:  # the loss lives on the last stage
            dist.all_reduce(total, group=tr.state.pp_group())
        return {"loss": float(total), "t_step": t}

    def _pipeline_step(self, imgs, noise) -> torch.Tensor:
        """The schedule's step on the whole batch (it splits it into the same micro-batches): the
        first stage feeds images and noise, the last gets the images as its loss target."""
        links, losses = self.trainer.links, []
        with self.trainer._autocast():
            self.schedule.step(*((imgs, noise) if links.is_first else ()), target=imgs if links.is_last else None, losses=losses)
        return torch.stack(losses).detach().double().mean() if losses else torch.zeros((), dtype=torch.float64, device=imgs.device)
