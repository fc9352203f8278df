"""Model shapes, named presets, and the analytic counts derived from them.

One ViT family: depth is kept fixed and width, MLP size, heads and the number of parallel
branches grow (Touvron et al. 2022 "parallel ViT": each block is
x += sum_k attn_k(LN_k x); x += sum_k mlp_k(LN'_k x)).

The parameter count and FLOP formulas here are the single source for every table, the
profiler and the benchmark harness; tests check them against the built model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ViTConfig:
    """Shape of an MAE-pretrainable parallel-branch ViT (encoder + light decoder)."""

    name: str
    width: int  # encoder hidden size D
    heads: int  # attention heads per branch
    mlp: int  # encoder MLP hidden size M
    depth: int = 12
    branches: int = 1  # parallel attention/MLP branches per block ("X4" in ViT-G12X4)
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    qkv_bias: bool = True
    dec_width: int = 512
    dec_depth: int = 8
    dec_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # MAE: loss on per-patch normalized pixels
    ln_eps: float = 1e-6
    num_classes: int = 1000  # supervised (dec_depth 0): the classification head's outputs
    note: str = ""  # provenance of the shape, shown in tables and reports

    def __post_init__(self):
        problems = []
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        if self.dec_width % self.dec_heads:
            problems.append(f"dec_width {self.dec_width} is not divisible by dec_heads {self.dec_heads}")
        if not 0.0 <= self.mask_ratio < 1.0:
            problems.append(f"mask_ratio {self.mask_ratio} must be in [0, 1)")
        if min(self.width, self.heads, self.mlp, self.depth, self.branches, self.num_classes) < 1 or self.dec_depth < 0:
            problems.append("width, heads, mlp, depth, branches and num_classes must be positive, dec_depth not negative")
        if self.dec_depth == 0 and self.mask_ratio != 0:
            problems.append(f"dec_depth 0 (no decoder) trains supervised and needs mask_ratio 0, got {self.mask_ratio}")
        if problems:
            raise ValueError(f"invalid ViTConfig {self.name!r}: " + "; ".join(problems))

    @property
    def supervised(self) -> bool:
        """No decoder: the encoder trains with a classification head on all patches (mask ratio 0)."""
        return self.dec_depth == 0

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    @property
    def num_visible(self) -> int:
        """Tokens the encoder sees per image (cls excluded): round(N * (1 - mask_ratio))."""
        return int(round(self.num_patches * (1.0 - self.mask_ratio)))

    @property
    def dec_mlp(self) -> int:
        return 4 * self.dec_width

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Presets. The paper's four sizes (Cha et al. 2023: 86M, 605.26M, 1.3B, 2.4B) counted timm-style
# (patch 16, 224 px, cls token, pos-embed, qkv bias). Only ViT-B and the "G12X4" naming are
# published; the widths of the 605M / 1.3B / 2.4B models are our choice matching those counts.
# The CPU ladder keeps the family's rule (fixed depth, growing width and branches) at a size that
# trains in seconds on two cores: 64 px images, patch 8, depth 4. Its decoder is as wide as the
# encoder (MAE's decoder is a fixed fraction of a large encoder, 512 for ViT-L's 1024): with one
# 64-wide decoder shared by every size, the decoder bottlenecked the larger encoders and
# `medium` pretrained to a worse held-out loss than `tiny` (0.620 vs 0.568 at 600 steps); with a
# 192-wide decoder it beat `tiny` (0.552). See docs/STUDY.md.
# ---------------------------------------------------------------------------------------------

_CPU = dict(img_size=64, patch_size=8, depth=4, dec_depth=2, dec_heads=4)
# The scaling study's ladder (benchmarks/reporting/plans/cpu-ladder.yaml): one branch, widths around `tiny`
# (w64). On two cores the compute-optimal size at a 30-minute budget is about w32-w48, far below
# medium, so the IsoFLOP ladder starts there; w16 and w24 are for probes below it (docs/STUDY.md).
STUDY_WIDTHS = (12, 16, 24, 32, 48, 96)
_PAPER_NOTE = "paper size; width/branches are rsscale's choice matching the published count"

PRESETS: dict[str, ViTConfig] = {
    c.name: c
    for c in [
        ViTConfig("tiny", width=64, heads=4, mlp=256, dec_width=64, branches=1, **_CPU, note="CPU ladder"),
        ViTConfig("mini", width=96, heads=4, mlp=384, dec_width=96, branches=2, **_CPU, note="CPU ladder"),
        ViTConfig("small", width=128, heads=4, mlp=512, dec_width=128, branches=2, **_CPU, note="CPU ladder"),
        ViTConfig("medium", width=192, heads=4, mlp=768, dec_width=192, branches=4, **_CPU, note="CPU ladder"),
        *[ViTConfig(f"w{w}", width=w, heads=4, mlp=4 * w, dec_width=w, **_CPU, note="CPU study ladder (with tiny = w64)")
          for w in STUDY_WIDTHS],
        ViTConfig("b12x1", width=768, heads=12, mlp=3072, branches=1, note="ViT-B/16, paper's 86M"),
        ViTConfig("l12x4", width=1024, heads=16, mlp=4096, branches=4, note=_PAPER_NOTE + " (605.26M)"),
        ViTConfig("h12x4", width=1536, heads=24, mlp=6144, branches=4, note=_PAPER_NOTE + " (1.3B)"),
        ViTConfig("g12x4", width=2048, heads=16, mlp=8192, branches=4, note="ViT-G12X4, " + _PAPER_NOTE + " (2.4B)"),
    ]
}
CPU_LADDER = ("tiny", "mini", "small", "medium")
PAPER_PRESETS = ("b12x1", "l12x4", "h12x4", "g12x4")


MODEL_FILE_SUFFIXES = (".yaml", ".yml", ".toml")
REQUIRED_SHAPE = ("width", "heads", "mlp")


def is_model_file(name: str) -> bool:
    return str(name).lower().endswith(MODEL_FILE_SUFFIXES)


def load_model_file(path: str) -> ViTConfig:
    """Any ViT of the family from a YAML/TOML file whose keys are ViTConfig's fields (width, heads
    and mlp required; depth, branches, img_size, patch_size, in_chans, qkv_bias, dec_width,
    dec_depth, dec_heads, mask_ratio, norm_pix_loss, ln_eps optional; name defaults to the file's
    stem). Unknown keys, mistyped values and impossible shapes are one-line errors naming the file."""
    from pathlib import Path

    from rsscale.scaling.runtime.config_file import check_tree, load_config_file

    data = check_tree(path, load_config_file(path), ViTConfig)
    missing = [k for k in REQUIRED_SHAPE if k not in data]
    if missing:
        raise ValueError(f"model file {path}: missing {', '.join(missing)} (a shape needs {', '.join(REQUIRED_SHAPE)})")
    data.setdefault("name", Path(path).stem)
    data.setdefault("note", f"model file {path}")
    try:
        return ViTConfig(**data)
    except ValueError as e:
        raise ValueError(f"model file {path}: {e}") from None


def get_preset(name: str, **overrides) -> ViTConfig:
    """A preset by name, or the shape in a model file (`load_model_file`; any name ending in
    .yaml/.yml/.toml), optionally with field overrides; a helpful error otherwise."""
    if name in PRESETS:
        cfg = PRESETS[name]
    elif is_model_file(name):
        cfg = load_model_file(name)
    else:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}, or give a model file (.yaml/.toml)")
    return cfg.replace(**overrides) if overrides else cfg


# ---------------------------------------------------------------------------------------------
# Parameter counts. "encoder" is the backbone the paper's sizes refer to (patch embed, cls token,
# position embedding, blocks, final norm); "mae" adds the decoder used only for pretraining.
# Position embeddings are fixed sin-cos tables stored as parameters (requires_grad=False), as in
# MAE, so they are counted like timm counts its learned ones.
# ---------------------------------------------------------------------------------------------


def branch_params(width: int, mlp: int, qkv_bias: bool = True) -> int:
    """One attention + MLP branch: LN, qkv, proj, LN, fc1, fc2 (weights and biases)."""
    attn = 2 * width + 3 * width * width + (3 * width if qkv_bias else 0) + width * width + width
    ffn = 2 * width + width * mlp + mlp + mlp * width + width
    return attn + ffn


def encoder_params(cfg: ViTConfig) -> int:
    d = cfg.width
    embed = cfg.patch_dim * d + d + d + (cfg.num_patches + 1) * d  # patch proj, cls, pos
    blocks = cfg.depth * cfg.branches * branch_params(d, cfg.mlp, cfg.qkv_bias)
    return embed + blocks + 2 * d  # + final norm


def decoder_params(cfg: ViTConfig) -> int:
    """MAE's decoder; a supervised model's classification head instead."""
    if cfg.supervised:
        return cfg.width * cfg.num_classes + cfg.num_classes
    dd = cfg.dec_width
    embed = cfg.width * dd + dd + dd + (cfg.num_patches + 1) * dd  # decoder_embed, mask token, pos
    blocks = cfg.dec_depth * branch_params(dd, cfg.dec_mlp, qkv_bias=True)
    head = 2 * dd + dd * cfg.patch_dim + cfg.patch_dim  # norm + pixel prediction
    return embed + blocks + head


def param_count(cfg: ViTConfig, part: str = "encoder") -> int:
    """Exact number of parameter elements; part is 'encoder', 'decoder' or 'mae' (both)."""
    if part == "encoder":
        return encoder_params(cfg)
    if part == "decoder":
        return decoder_params(cfg)
    if part == "mae":
        return encoder_params(cfg) + decoder_params(cfg)
    raise ValueError(f"part must be 'encoder', 'decoder' or 'mae', not {part!r}")


# ---------------------------------------------------------------------------------------------
# FLOPs. Matmul FLOPs only (2 per multiply-add), the convention of Megatron/PaLM MFU accounting;
# LayerNorm, softmax, GELU and the loss are O(tokens*width) and left out.
# ---------------------------------------------------------------------------------------------


def attention_core_flops(tokens: int, width: int, branches: int = 1) -> int:
    """Forward FLOPs of the attention core softmax(Q K^T) V of one block (one image): what
    selective recompute runs again in backward."""
    return branches * 2 * (2 * tokens * tokens * width)  # Q K^T and softmax(.) V


def block_flops(tokens: int, width: int, mlp: int, branches: int = 1) -> int:
    """Forward FLOPs of one parallel-branch block on `tokens` tokens (one image)."""
    n, d = tokens, width
    qkv, proj = 2 * n * d * 3 * d, 2 * n * d * d
    ffn = 2 * (2 * n * d * mlp)
    return branches * (qkv + proj + ffn) + attention_core_flops(n, d, branches)


def mae_forward_flops(cfg: ViTConfig) -> dict[str, int]:
    """Forward FLOPs per image of the MAE step, split by part.

    The encoder runs on the visible tokens + cls, the decoder on all tokens + cls (MAE); a
    supervised model's "pred" is its classification head on the cls token.
    """
    n_all, n_enc = cfg.num_patches + 1, cfg.num_visible + 1
    if cfg.supervised:  # all tokens through the encoder, the head on the cls token
        return {"patch_embed": 2 * cfg.num_patches * cfg.patch_dim * cfg.width,
                "encoder": cfg.depth * block_flops(n_enc, cfg.width, cfg.mlp, cfg.branches),
                "decoder_embed": 0, "decoder": 0, "pred": 2 * cfg.width * cfg.num_classes}
    return {
        "patch_embed": 2 * cfg.num_patches * cfg.patch_dim * cfg.width,
        "encoder": cfg.depth * block_flops(n_enc, cfg.width, cfg.mlp, cfg.branches),
        "decoder_embed": 2 * n_enc * cfg.width * cfg.dec_width,
        "decoder": cfg.dec_depth * block_flops(n_all, cfg.dec_width, cfg.dec_mlp, 1),
        "pred": 2 * n_all * cfg.dec_width * cfg.patch_dim,
    }


RECOMPUTE = ("none", "selective", "full")


def recompute_mode(recompute: str | bool) -> str:
    """'none' | 'selective' | 'full' (the attention core only, or whole blocks, run again in
    backward); the old boolean spelling means 'full' (True) or 'none' (False)."""
    if isinstance(recompute, bool):
        return "full" if recompute else "none"
    if recompute not in RECOMPUTE:
        raise ValueError(f"--recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    return recompute


def mae_step_flops(cfg: ViTConfig, recompute: str | bool = "none") -> int:
    """Training FLOPs per image: forward + backward (2x forward); recomputing runs the block
    forwards ('full') or their attention cores ('selective') once more during backward."""
    f = mae_forward_flops(cfg)
    total = 3 * sum(f.values())
    mode = recompute_mode(recompute)
    if mode == "full":
        total += f["encoder"] + f["decoder"]
    elif mode == "selective":
        total += cfg.depth * attention_core_flops(cfg.num_visible + 1, cfg.width, cfg.branches)
        total += cfg.dec_depth * attention_core_flops(cfg.num_patches + 1, cfg.dec_width, 1)
    return total


# ---------------------------------------------------------------------------------------------
# `rsscale models`
# ---------------------------------------------------------------------------------------------
