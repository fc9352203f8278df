"""Masked autoencoder (He et al. 2022) on the tensor-parallel parallel-branch ViT.

Reads in the order it runs: patchify -> random_masking -> forward_encoder (patch embed + sin-cos
positions, keep a random 25 %, cls token, blocks, norm) -> forward_decoder (mask tokens, decoder
positions, light blocks, pixel prediction) -> forward_loss (MSE on masked patches, per-patch
normalized pixels). Parallelism lives in the blocks (scaling.vit.ParallelBlock).

Determinism. The full (TP=1) weights depend only on `seed`: every part is built under its own
seed derived from (seed, part), so a TP=T model's shards are slices of the TP=1 weights and a
pipeline stage builds the same blocks as the full model. The mask comes from `noise` [B, N]
(`masking_noise(batch, cfg, generator)`): every TP rank and pipeline stage that draws it from
an equally seeded generator gets the same mask.

Pipeline stages (the rule): `pre_process=True` puts patch embed, positions, masking and the cls
token on this stage; `post_process=True` puts the encoder norm, the whole decoder and the loss on
it; `layer_range=(start, end)` picks the encoder blocks [start, end), or a list of such ranges
picks one chunk of blocks per virtual stage (interleaved 1F1B: pre_process then applies to the
first chunk, post_process to the last). Parameter names are those of the full model
(`blocks.<global index>...`), so checkpoints are layout independent.
`forward_stage(hidden, imgs, noise, chunk=0)` runs one stage (chunk): the first stage reads `imgs` and `noise`,
the others read `hidden` [B, 1+V, D] (V = cfg.num_visible); the last stage also needs `imgs`
and `noise` (loss target, mask) and returns (loss, pred, mask), the others return hidden
states of shape `hidden_shape(batch)`.

Supervised (`cfg.supervised`: dec_depth 0, mask ratio 0): no masking and no decoder; the last
stage puts a classification head on the cls token after the encoder norm, and the loss is the
cross-entropy against `image_labels(imgs)`, a stand-in label computed from the pixels (no
labelled pretraining set is bundled): the work per step is a supervised ViT's, its loss value
means nothing. Returns (loss, logits [B, classes], mask of zeros [B, N]).

Sequence parallelism: between blocks each TP rank holds a chunk of the tokens. 1+V (and the
decoder's 1+N) need not divide T: the token dimension is zero-padded to a multiple of T, the
blocks never attend to padding, and it is cut off before the norms, so results equal TP=1.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from rsscale import kernels
from rsscale.scaling.model.vit import ParallelBlock, PatchEmbed, check_tp_divides, init_fixed_, sincos_pos_embed_2d
from rsscale.scaling.parallel import mappings, state
from rsscale.scaling.spec.config import ViTConfig, get_preset


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] (row-major patches, pixels in (p, p, C) order)."""
    B, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, hw: tuple[int, int] | None = None, chans: int = 3) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, H, W]; the patch grid is square unless hw=(h, w) is given."""
    B, L, _ = x.shape
    h, w = hw or (int(L**0.5),) * 2
    if h * w != L:
        raise ValueError(f"{L} patches do not form a {h}x{w} grid")
    x = x.reshape(B, h, w, p, p, chans)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, chans, h * p, w * p)


def masking_noise(batch: int, cfg: ViTConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform noise [B, N] whose argsort defines the mask; draw it from a seeded generator."""
    return torch.rand(batch, cfg.num_patches, generator=generator)


def mask_from_noise(noise: torch.Tensor, len_keep: int):
    """Per-sample shuffle by argsort of noise: keep the `len_keep` smallest.
    Returns ids_keep [B, len_keep], mask [B, N] (0 keep, 1 remove), ids_restore [B, N]."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones_like(noise)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore), ids_restore


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """Keep round(N * (1 - mask_ratio)) tokens of x [B, N, D] per sample, chosen by `noise`."""
    B, N, D = x.shape
    if noise.shape != (B, N):
        raise ValueError(f"masking noise has shape {tuple(noise.shape)}, expected {(B, N)}")
    ids_keep, mask, ids_restore = mask_from_noise(noise.to(x.device), int(round(N * (1 - mask_ratio))))
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    return x_masked, mask, ids_restore


@contextlib.contextmanager
def _seeded(seed: int, part: int):
    """Build one part of the model from its own RNG stream (independent of layout and order)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + part)
        yield


class MaskedAutoencoder(nn.Module):
    """MAE with a parallel-branch ViT encoder; see the module docstring for the stage rule."""

    def __init__(self, cfg: ViTConfig, sequence_parallel=False, recompute="none", pre_process=True, post_process=True, layer_range=None, seed=0, config=None):
        super().__init__()
        config = config or state.model_parallel_config()
        self.tp = config.tensor_model_parallel_size
        problems = check_tp_divides(self.tp, "the encoder's", heads=cfg.heads, width=cfg.width, mlp=cfg.mlp)
        if not cfg.supervised:
            problems += check_tp_divides(self.tp, "the decoder's", heads=cfg.dec_heads, width=cfg.dec_width, mlp=cfg.dec_mlp)
        ranges = [tuple(r) for r in layer_range] if isinstance(layer_range, list) else [tuple(layer_range or (0, cfg.depth))]
        problems += [f"layer_range {r} is not within the {cfg.depth} encoder blocks" for r in ranges if not 0 <= r[0] <= r[1] <= cfg.depth]
        if problems:
            raise ValueError(f"model {cfg.name!r} cannot be built with TP={self.tp}: " + "; ".join(problems))
        self.cfg, self.sequence_parallel = cfg, sequence_parallel
        self.pre_process, self.post_process, self.chunk_ranges = pre_process, post_process, ranges
        D, Dd = cfg.width, cfg.dec_width

        def block(width, heads, mlp, branches):
            return ParallelBlock(width, heads, mlp, branches, cfg.qkv_bias, cfg.ln_eps, config, sequence_parallel, recompute=recompute)

        if pre_process:
            with _seeded(seed, 0):
                self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
                self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
                nn.init.normal_(self.cls_token, std=0.02)
                self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D), requires_grad=False)
                init_fixed_(self.pos_embed, sincos_pos_embed_2d(D, cfg.grid, cfg.grid, cls_token=True))
        self.blocks = nn.ModuleDict()  # keyed by global block index: names match the full model
        for i in (i for start, end in ranges for i in range(start, end)):
            with _seeded(seed, 1000 + i):
                self.blocks[str(i)] = block(D, cfg.heads, cfg.mlp, cfg.branches)
        if post_process and cfg.supervised:
            with _seeded(seed, 2000):
                self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
                self.head = nn.Linear(D, cfg.num_classes)  # small, like timm's ViT head: the first loss is about ln(classes)
                nn.init.normal_(self.head.weight, std=0.02)
                nn.init.zeros_(self.head.bias)
            self.decoder_blocks = nn.ModuleList()
        elif post_process:
            with _seeded(seed, 2000):
                self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
                self.decoder_embed = _xavier_linear(D, Dd)
                self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
                nn.init.normal_(self.mask_token, std=0.02)
                self.decoder_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, Dd), requires_grad=False)
                init_fixed_(self.decoder_pos_embed, sincos_pos_embed_2d(Dd, cfg.grid, cfg.grid, cls_token=True))
            self.decoder_blocks = nn.ModuleList()
            for j in range(cfg.dec_depth):
                with _seeded(seed, 3000 + j):
                    self.decoder_blocks.append(block(Dd, cfg.dec_heads, cfg.dec_mlp, 1))
            with _seeded(seed, 4000):
                self.decoder_norm = nn.LayerNorm(Dd, eps=cfg.ln_eps)
                self.decoder_pred = _xavier_linear(Dd, cfg.patch_dim)

    # --- sequence-parallel region entry/exit (identity without SP) -----------------------------
    def _scatter_tokens(self, x):
        if not self.sequence_parallel:
            return x
        return mappings.scatter_to_sequence_parallel_region(mappings.pad_tokens(x, self.tp))

    def _gather_tokens(self, x, n_tokens):
        if not self.sequence_parallel:
            return x
        return mappings.gather_from_sequence_parallel_region(x, tp_grad=False)[:, :n_tokens]

    def transformer_blocks(self) -> list[nn.Module]:
        """This stage's encoder blocks, then (on the last stage) the decoder blocks."""
        return list(self.blocks.values()) + (list(self.decoder_blocks) if self.post_process else [])

    def hidden_shape(self, batch: int) -> tuple[int, int, int]:
        """Shape of this rank's hidden states passed between pipeline stages."""
        n = self.cfg.num_visible + 1
        if self.sequence_parallel:
            n = -(-n // self.tp)
        return (batch, n, self.cfg.width)

    # --- the algorithm -------------------------------------------------------------------------
    def embed(self, imgs, noise):
        """Patch embed + positions, keep the visible patches, prepend cls -> [B, 1+V, D]."""
        expected = (self.cfg.in_chans, self.cfg.img_size, self.cfg.img_size)
        if tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"model {self.cfg.name!r} takes images [B, {expected[0]}, {expected[1]}, {expected[2]}], got {list(imgs.shape)}")
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        if self.cfg.supervised:  # every patch, in order
            mask, ids_restore = None, None
        else:
            x, mask, ids_restore = random_masking(x, self.cfg.mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return self._scatter_tokens(torch.cat([cls, x], dim=1)), mask, ids_restore

    def run_blocks(self, x, chunk: int | None = None):
        """The encoder blocks of one chunk (all of this stage's when chunk is None)."""
        n = self.cfg.num_visible + 1
        ids = range(*self.chunk_ranges[chunk]) if chunk is not None else map(int, self.blocks)
        for i in ids:
            x = self.blocks[str(i)](x, n_tokens=n)
        return x

    def encoder_output(self, x):
        x = self._gather_tokens(x, self.cfg.num_visible + 1)
        return kernels.layer_norm(x, self.norm.weight, self.norm.bias, self.cfg.ln_eps)

    def forward_encoder(self, imgs, noise):
        x, mask, ids_restore = self.embed(imgs, noise)
        return self.encoder_output(self.run_blocks(x)), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        """Latent [B, 1+V, D] -> pixel predictions [B, N, p*p*C] for every patch."""
        x = self.decoder_embed(latent)
        B, n_vis, Dd = x.shape
        mask_tokens = self.mask_token.expand(B, ids_restore.shape[1] + 1 - n_vis, -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        n = x.shape[1]
        x = self._scatter_tokens(x)
        for blk in self.decoder_blocks:
            x = blk(x, n_tokens=n)
        x = self._gather_tokens(x, n)
        x = kernels.layer_norm(x, self.decoder_norm.weight, self.decoder_norm.bias, self.cfg.ln_eps)
        return self.decoder_pred(x)[:, 1:]  # drop cls

    def forward_loss(self, imgs, pred, mask):
        """Mean over masked patches of the per-patch MSE (targets normalized per patch)."""
        target = patchify(imgs, self.cfg.patch_size)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
        """Whole model on one stage: -> (loss, pred [B, N, p*p*C], mask [B, N])."""
        if not (self.pre_process and self.post_process and self.chunk_ranges == [(0, self.cfg.depth)]):
            raise RuntimeError("this model is one pipeline stage; call forward_stage()")
        return self.forward_stage(None, imgs, noise if noise is not None else masking_noise(imgs.shape[0], self.cfg, generator))

    def forward_stage(self, hidden=None, imgs=None, noise=None, chunk: int = 0):
        """One pipeline stage's chunk (see the module docstring): hidden states or (loss, pred, mask)."""
        pre, post = self.pre_process and chunk == 0, self.post_process and chunk == len(self.chunk_ranges) - 1
        if (pre or post) and (imgs is None or noise is None):
            raise ValueError("the first and last pipeline stages need imgs and noise")
        if pre:
            hidden, _, _ = self.embed(imgs, noise)
        elif hidden is None:
            raise ValueError("a pipeline stage without pre_process needs the previous stage's hidden states")
        hidden = self.run_blocks(hidden, chunk)
        if not post:
            return hidden
        if self.cfg.supervised:
            logits = self.head(self.encoder_output(hidden)[:, 0])
            loss = nn.functional.cross_entropy(logits.float(), image_labels(imgs, self.cfg.num_classes))
            return loss, logits, torch.zeros(imgs.shape[0], self.cfg.num_patches, device=hidden.device)
        _, mask, ids_restore = mask_from_noise(noise.to(hidden.device), self.cfg.num_visible)
        pred = self.forward_decoder(self.encoder_output(hidden), ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def image_labels(imgs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A class per image computed from its pixels (the supervised stand-in label, module doc):
    the same on every TP rank and pipeline stage that holds the same images."""
    return (imgs.detach().float().mean(dim=(1, 2, 3)) * 1000).floor().long().remainder(num_classes)


def _xavier_linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def build_mae(preset_or_cfg: str | ViTConfig, **kw) -> MaskedAutoencoder:
    """MaskedAutoencoder from a preset name or config (starts a 1-process world if needed)."""
    cfg = get_preset(preset_or_cfg) if isinstance(preset_or_cfg, str) else preset_or_cfg
    state.ensure_initialized()
    return MaskedAutoencoder(cfg, **kw)
