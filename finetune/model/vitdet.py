"""ViTDet adaptation of the pretrained (tensor-parallel) MAE encoder: a plain ViT turned into a
4-level feature pyramid for dense prediction (Li et al. 2022, "Exploring Plain Vision Transformer
Backbones for Object Detection").

What changes from pretraining, and why:
- no cls token and no masking: every patch token is kept, on its (H, W) grid;
- window attention (non-overlapping `window_size` windows, zero-padded as ViTDet does) in most
  blocks, global attention in a few evenly spaced ones (`global_blocks`, default the last block
  of each quarter): attention cost stays linear in image area while information still crosses
  windows. The blocks are `scaling.vit.ParallelBlock`s, so TP still works;
- the position table is resized from the pretraining grid to the fine-tuning grid (bicubic, cls
  dropped) and becomes learnable; inputs of other sizes resize it again on the fly;
- decomposed relative position bias (ViTDet's `use_rel_pos`, MViTv2): attention logits get
  q . R_h[dy] + q . R_w[dx] with learned tables per block (and branch) of 2S-1 offsets per axis,
  S the block's attention grid (the window, or the whole grid in global blocks); a table is
  linearly interpolated when the grid it meets differs (another input size, or tables trained on
  another grid). Zero-initialised, as ViTDet's default. `rel_pos=False` turns it off;
- drop path (stochastic depth) per sublayer, as ViTDet: with probability p(i) (linear in depth,
  up to `drop_path`) a sample skips block i's attention update, and independently its MLP
  update (`drop_path_per_sublayer=False`: both together). The masks come from the torch RNG,
  which equally seeded TP ranks draw identically;
- scale blocks (the "simple feature pyramid") turn the single stride-p map (p = patch size) into
  4 levels at strides p/4, p/2, p, 2p: two 2x2 transposed convs with LayerNorm + GELU between,
  one transposed conv, identity, 2x2 max-pool; each followed by 1x1 and 3x3 convs to
  `out_channels`, each with a channel LayerNorm. With the paper's patch 16 these are the usual
  strides 4/8/16/32; the CPU presets use patch 8, giving 2/4/8/16.

Also here: weight loading from an MAE checkpoint (`load_pretrained`) and layer-wise learning-rate
decay (`param_groups_lrd`, BEiT/MAE fine-tuning: block i's lr is scaled by decay^(depth + 1 - i')).
"""

from __future__ import annotations

import logging
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from rsscale.scaling.model.vit import ParallelBlock, PatchEmbed, sincos_pos_embed_2d
from rsscale.scaling.parallel import mappings, state
from rsscale.scaling.spec.config import ViTConfig
from rsscale.scaling.train.checkpoint import CheckpointError, shard_for

log = logging.getLogger(__name__)

PRETRAIN_ONLY = ("cls_token", "mask_token", "decoder_")  # MAE keys fine-tuning drops on purpose


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (ViTDet's norm in the scale blocks)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_norm_act(cin: int, cout: int, k: int, act: bool = True, norm: str = "gn") -> nn.Sequential:
    """k x k conv (no bias) + GroupNorm / channel LayerNorm (+ ReLU): the heads' building block.
    GroupNorm, not BatchNorm, so tiny CPU batches train and evaluate the same way; >= 4 channels
    per group, so a 1x1 map (the PPM's global pool) still has something to normalise."""
    norm_layer = nn.GroupNorm(math.gcd(32, max(cout // 4, 1)), cout) if norm == "gn" else LayerNorm2d(cout)
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), norm_layer]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if act else nn.Sequential(*layers)


def resize_pos_embed(pos: torch.Tensor, old_hw, new_hw, has_cls: bool) -> torch.Tensor:
    """Position table [1, (1+) h*w, D] on grid old_hw -> [1, H*W, D] on new_hw (bicubic, cls dropped)."""
    h, w = old_hw
    if has_cls:
        pos = pos[:, 1:]
    if pos.shape[1] != h * w:
        raise ValueError(f"position table has {pos.shape[1]} patch entries, not {h}x{w} = {h * w}")
    grid = pos.reshape(1, h, w, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_hw), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], -1).to(pos.dtype)


def even_global_blocks(depth: int, n: int | None = None) -> tuple[int, ...]:
    """Indices of n evenly spaced global-attention blocks: the last of each of n equal stages.
    Default n = ceil(depth / 3), ViTDet's ratio: (2, 5, 8, 11) for depth 12, (1, 3) for depth 4."""
    n = min(n or -(-depth // 3), depth)
    return tuple(sorted({(k + 1) * depth // n - 1 for k in range(n)}))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's residual update with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """ViTDet's table lookup: rel_pos [L, C] -> [q_size, k_size, C] for every (query, key) offset
    along one axis, linearly interpolated to 2*max(q_size, k_size) - 1 entries when L differs."""
    n = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != n:
        rel_pos = F.interpolate(rel_pos.t()[None].float(), size=n, mode="linear")[0].t().to(rel_pos.dtype)
    q = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    return rel_pos[((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


class ViTDetBlock(ParallelBlock):
    """`scaling.vit.ParallelBlock` (same parameters, same TP) plus ViTDet's decomposed relative
    position bias (tables `rel_pos_h`, `rel_pos_w` [K, 2S-1, head_dim] for an S x S attention
    grid, replicated over TP: each rank's heads add their part of the gradient, summed by the
    copy-to-TP-region) and drop path per sublayer or per block."""

    def __init__(self, *args, rel_pos_grid: int | None = None, drop_path: float = 0.0, per_sublayer: bool = True, **kw):
        super().__init__(*args, **kw)
        self.drop_path, self.per_sublayer = drop_path, per_sublayer
        self.rel_pos_h = self.rel_pos_w = None
        if rel_pos_grid:
            shape = (self.branches, 2 * rel_pos_grid - 1, self.head_dim)
            self.rel_pos_h, self.rel_pos_w = nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.zeros(shape))

    def _forward(self, x, n_tokens, hw):
        p, training = self.drop_path, self.training
        if not self.per_sublayer:
            return x + drop_path(super()._forward(x, n_tokens, hw) - x, p, training)
        x = x + drop_path(self._sublayer(x, self.attn, n_tokens, lambda a: self._attention(a, hw)), p, training)
        return x + drop_path(self._sublayer(x, self.mlp, n_tokens, self._mlp), p, training)

    def _attend(self, q, k, v, grid):
        if self.rel_pos_h is None:
            return super()._attend(q, k, v, grid)
        (gh, gw), K = grid, self.branches
        rh = mappings.copy_to_tensor_model_parallel_region(self.rel_pos_h)
        rw = mappings.copy_to_tensor_model_parallel_region(self.rel_pos_w)
        Rh = torch.stack([get_rel_pos(gh, gh, rh[j]) for j in range(K)])  # [K, gh, gh, d]
        Rw = torch.stack([get_rel_pos(gw, gw, rw[j]) for j in range(K)])
        n, heads, L, d = q.shape
        r_q = q.reshape(K, n // K, heads, gh, gw, d)
        rel_h = torch.einsum("kbnhwc,khqc->kbnhwq", r_q, Rh.to(q.dtype))
        rel_w = torch.einsum("kbnhwc,kwqc->kbnhwq", r_q, Rw.to(q.dtype))
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(n, heads, L, L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class SimpleFeaturePyramid(nn.Module):
    """Stride-p map [B, D, H, W] -> 4 maps at strides p/4, p/2, p, 2p with `out_channels` each."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        d = width
        up2 = lambda cin, cout: nn.ConvTranspose2d(cin, cout, 2, stride=2)  # noqa: E731
        self.scales = nn.ModuleList([
            nn.Sequential(up2(d, d // 2), LayerNorm2d(d // 2), nn.GELU(), up2(d // 2, d // 4)),
            up2(d, d // 2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])
        dims = (d // 4, d // 2, d, d)
        self.outputs = nn.ModuleList(
            nn.Sequential(conv_norm_act(c, out_channels, 1, act=False, norm="ln"),
                          conv_norm_act(out_channels, out_channels, 3, act=False, norm="ln"))
            for c in dims
        )

    def forward(self, x):
        return [out(scale(x)) for scale, out in zip(self.scales, self.outputs)]


class ViTDetBackbone(nn.Module):
    """Pretrained parallel-branch ViT -> list of 4 feature maps [B, out_channels, H/s, W/s],
    s = patch/4, patch/2, patch, 2*patch (`self.strides`).

    img_size: the fine-tuning crop (the stored position table's grid); window_size: tokens per
    window side; global_blocks: indices with global attention (default: even_global_blocks);
    rel_pos / drop_path_per_sublayer: see the module doc (defaults: ViTDet's); sequence_parallel:
    the blocks run on this TP rank's token chunk (gathered again before the pyramid).
    Images must be multiples of 2*patch so every level has an integer size.
    """

    def __init__(self, cfg: ViTConfig, img_size: int | None = None, window_size: int = 4,
                 global_blocks=None, drop_path: float = 0.1, out_channels: int | None = None,
                 activation_checkpointing: bool = False, config=None, rel_pos: bool = True,
                 drop_path_per_sublayer: bool = True, sequence_parallel: bool = False):
        super().__init__()
        img_size = img_size or cfg.img_size
        problems = []
        if img_size % (2 * cfg.patch_size):
            problems.append(f"fine-tuning size {img_size} is not a multiple of 2 x patch size {cfg.patch_size}")
        global_blocks = even_global_blocks(cfg.depth) if global_blocks is None else tuple(global_blocks)
        if any(not 0 <= i < cfg.depth for i in global_blocks):
            problems.append(f"global_blocks {global_blocks} must index the {cfg.depth} blocks")
        if cfg.patch_size % 4:
            problems.append(f"the pyramid needs a patch size divisible by 4, got {cfg.patch_size}")
        if window_size < 1:
            problems.append(f"window_size must be >= 1, got {window_size}")
        if not 0.0 <= drop_path < 1.0:
            problems.append(f"drop_path must be in [0, 1), got {drop_path}")
        if problems:
            raise ValueError("; ".join(problems))
        config = config or state.model_parallel_config()
        self.cfg, self.window_size, self.global_blocks = cfg, window_size, global_blocks
        self.grid = (img_size // cfg.patch_size,) * 2
        self.strides = (cfg.patch_size // 4, cfg.patch_size // 2, cfg.patch_size, 2 * cfg.patch_size)
        d = cfg.width
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(d, *self.grid)[None])  # learnable in fine-tuning
        self.sequence_parallel = sequence_parallel
        self.blocks = nn.ModuleList(
            ViTDetBlock(d, cfg.heads, cfg.mlp, cfg.branches, cfg.qkv_bias, cfg.ln_eps, config, sequence_parallel,
                        window_size=None if i in global_blocks else window_size,
                        recompute="full" if activation_checkpointing else "none",
                        rel_pos_grid=(self.grid[0] if i in global_blocks else window_size) if rel_pos else None,
                        drop_path=drop_path * i / max(cfg.depth - 1, 1), per_sublayer=drop_path_per_sublayer)
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.out_channels = out_channels or d
        self.pyramid = SimpleFeaturePyramid(d, self.out_channels)

    def forward(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        B, _, H, W = imgs.shape
        if H % (2 * self.cfg.patch_size) or W % (2 * self.cfg.patch_size):
            raise ValueError(f"input {H}x{W} is not a multiple of 2 x patch size {self.cfg.patch_size}")
        hw = (H // self.cfg.patch_size, W // self.cfg.patch_size)
        pos = self.pos_embed if hw == self.grid else resize_pos_embed(self.pos_embed, self.grid, hw, has_cls=False)
        x = self.patch_embed(imgs) + pos
        n = x.shape[1]
        if self.sequence_parallel:
            x = mappings.scatter_to_sequence_parallel_region(mappings.pad_tokens(x, state.tp_size()))
        for blk in self.blocks:
            x = blk(x, n_tokens=n, hw=hw)
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, tp_grad=False)[:, :n]
        x = self.norm(x).transpose(1, 2).reshape(B, -1, *hw)
        return self.pyramid(x)


def load_pretrained(backbone: ViTDetBackbone, weights, pretrain_cfg: ViTConfig) -> dict:
    """Copy MAE encoder weights (TP=1 names) into the backbone: from a checkpoint's
    `scaling.train.checkpoint.ModelTensors`, each sharded parameter as only this TP rank's slice (no
    rank reads the whole encoder), or from a mapping of full tensors (cut here). The position table
    is resized to the fine-tuning grid. Returns {"loaded", "missing", "unexpected", "ignored"} key
    lists (missing: new fine-tuning parameters; ignored: pretraining-only keys such as the decoder)."""
    own = dict(backbone.named_parameters())
    loaded, unexpected, ignored, problems = [], [], [], []
    for name in weights:
        if name.endswith("_extra_state"):  # megatron's (empty) extra state
            continue
        if name.startswith(PRETRAIN_ONLY):
            ignored.append(name)
            continue
        if name not in own:
            unexpected.append(name)
            continue
        param = own[name]
        if name == "pos_embed":  # replicated; resized to the fine-tuning grid
            g, full = pretrain_cfg.grid, weights[name]
            full = resize_pos_embed(full, (g, g), backbone.grid, has_cls=full.shape[1] == g * g + 1)
        elif hasattr(weights, "local"):
            try:
                full = weights.local(name, param)  # this TP rank's slice, read alone
            except CheckpointError as e:
                problems.append(str(e))
                continue
        else:
            full = shard_for(weights[name], param)  # this TP rank's slice of a sharded parameter
        if full.shape != param.shape:
            problems.append(f"{name}: checkpoint shape {tuple(full.shape)} != model shape {tuple(param.shape)}")
            continue
        with torch.no_grad():
            param.copy_(full)
        loaded.append(name)
    if problems:
        raise ValueError("checkpoint does not fit the backbone: " + "; ".join(problems))
    missing = [n for n in own if n not in loaded]
    log.debug("loaded %d pretrained tensors; %d new (random init, e.g. %s); %d pretraining-only ignored; %d unexpected %s",
             len(loaded), len(missing), missing[:2], len(ignored), len(unexpected), unexpected[:5])
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected, "ignored": ignored}


# ------------------------------------------------------------------------- layer-wise lr decay
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)(patch_embed|pos_embed|cls_token)(?:\.|$)")


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i+1 for block i, depth+1 for everything after (norm, pyramid, heads)."""
    if _EMBED.search(name):
        return 0
    m = _BLOCK.search(name)
    return int(m.group(1)) + 1 if m else depth + 1


def param_groups_lrd(model: nn.Module, depth: int, weight_decay: float = 0.05, layer_decay: float = 0.75) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay: lr_scale = layer_decay^(depth + 1 - layer_id).
    Biases, norm weights and position tables (1-D or named pos_embed) get no weight decay."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.dim() == 1 or name.endswith("pos_embed")
        lid = layer_id(name, depth)
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (depth + 1 - lid), "layer_id": lid}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())
