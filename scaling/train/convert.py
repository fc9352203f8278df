"""`rsscale convert`: public ViT weights (official MAE, timm) <-> our layout-independent checkpoint.

    rsscale convert --from mae mae_pretrain_vit_base.pth --out runs/mae-b16     # -> b12x1 checkpoint
    rsscale convert --from timm vit_large.safetensors --out runs/vit-l16 --heads 16
    rsscale convert --to timm runs/mae-b16 --out vit_b16.pth                    # encoder, timm names
    rsscale convert --to mae runs/mae-b16 --out mae_b16.pth                     # + decoder, {'model': ...}

Key names. MAE's models_mae.py / models_vit.py build their encoder from timm's ViT blocks, so both
name the encoder alike: `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.<i>.norm1`,
`attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`, `norm`. Ours is the K=1 case of the
parallel-branch block: `blocks.<i>.attn.0.{norm,qkv,proj}`, `blocks.<i>.mlp.0.{norm,fc1,fc2}`.
MAE's decoder (`decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.<j>...`,
`decoder_norm`, `decoder_pred`) maps the same way. The qkv weight needs no permutation: our full
(TP=1) qkv weight is [q; k; v] with heads contiguous inside each, which is timm's layout; the
megatron stride=3 only decides how TP cuts it (rank r gets its heads' q, k and v rows).
A fine-tuned checkpoint with global pooling has `fc_norm` instead of `norm` (MAE deletes `norm`
then); it is loaded as our `norm`, which normalises every token instead of the pooled feature
(a warning says so). The classifier `head.*` is dropped (logged). Any other key, a missing key
or a shape mismatch is a ValueError naming the key.

The target shape is `--model PRESET` (checked against the file) or read off the weights: width,
depth, MLP size, patch, bands, image size from the position table, decoder width and depth;
heads cannot be read off and default to the standard ViT value for the width (ViT-S 6, B 12,
L/H 16; `--heads` otherwise) and to MAE's 16 for the decoder (`--dec-heads`). A shape equal to a preset takes its name (ViT-B/16 is b12x1).
Expected names and shapes come from our model built on the meta device, never from a table here.
The checkpoint holds weights only (`model/<name>`, written as replicated tensors, so any TP/PP
layout and fine-tuning load it); it has no optimizer state, so `pretrain --resume` cannot continue it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import re

import torch

from rsscale.scaling.runtime.options import add_options, check, option, resolve
from rsscale.scaling.spec.config import PRESETS, ViTConfig, get_preset

log = logging.getLogger(__name__)

# their block suffix -> ours (K=1: branch 0)
_BLOCK = {"norm1": "attn.0.norm", "attn.qkv": "attn.0.qkv", "attn.proj": "attn.0.proj",
          "norm2": "mlp.0.norm", "mlp.fc1": "mlp.0.fc1", "mlp.fc2": "mlp.0.fc2"}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
_BLOCK_RE = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$")
_DECODER = ("decoder_", "mask_token")  # MAE pretraining-only parts
_DROPPED = ("head.weight", "head.bias")  # an ImageNet classifier: no counterpart in our encoder
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-Ti/S/B/L/H (width -> heads)
DEC_HEADS = 16  # MAE's decoder: 512 wide, 16 heads


def ours_from_theirs(name: str) -> str | None:
    """Our parameter name for an MAE/timm key; None for a dropped key; ValueError if unknown."""
    if name in _DROPPED:
        return None
    m = _BLOCK_RE.match(name)
    if m and m.group(3) in _BLOCK:
        return f"{m.group(1)}.{m.group(2)}.{_BLOCK[m.group(3)]}.{m.group(4)}"
    if name in ("fc_norm.weight", "fc_norm.bias"):
        return name[3:]
    if m is None and not name.startswith("blocks."):
        return name  # patch_embed.proj.*, cls_token, pos_embed, norm.*, decoder_* outside blocks
    raise ValueError(f"unknown key {name!r}: not part of an MAE/timm ViT with one branch per block")


def theirs_from_ours(name: str) -> str:
    m = _BLOCK_RE.match(name)
    if m is None:
        return name
    if m.group(3) not in _BLOCK_BACK:
        raise ValueError(f"{name!r} has no MAE/timm name: only one-branch (K=1) models convert")
    return f"{m.group(1)}.{m.group(2)}.{_BLOCK_BACK[m.group(3)]}.{m.group(4)}"


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt (torch.load with weights_only=True; an MAE {'model': ...} wrapper is
    unwrapped) or a .safetensors file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:  # MAE's training checkpoints also pickle their argparse.Namespace of arguments
        with torch.serialization.safe_globals([argparse.Namespace]):
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise ValueError(f"{path} holds objects other than tensors ({what.group(1) if what else 'unknown'}), which "
                         "weights-only loading refuses; save its state dict alone") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return sd


def infer_config(sd: dict[str, torch.Tensor], heads: int | None = None, dec_heads: int = DEC_HEADS) -> ViTConfig:
    """The ViTConfig of an MAE/timm state dict (see the module docstring for what is read off)."""
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise ValueError(f"missing key {key!r}: cannot read the model shape off this state dict")
    width, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1] - 1
    grid = round(tokens**0.5)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens + 1} positions: not a cls token plus a square grid")
    heads = heads or STANDARD_HEADS.get(width)
    if heads is None:
        raise ValueError(f"width {width} has no standard head count; give --heads")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    shape = dict(width=width, heads=heads, mlp=sd["blocks.0.mlp.fc1.weight"].shape[0], depth=depth, branches=1,
                 img_size=grid * patch, patch_size=patch, in_chans=in_chans, qkv_bias="blocks.0.attn.qkv.bias" in sd)
    if "decoder_embed.weight" in sd:
        dec_width = sd["decoder_embed.weight"].shape[0]
        dec_depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks.")), default=-1)
        shape.update(dec_width=dec_width, dec_depth=dec_depth, dec_heads=dec_heads)
    base = ViTConfig(name="converted", **shape)
    for preset in PRESETS.values():
        if dataclasses.replace(preset, name=base.name, note="") == base:
            return preset  # e.g. ViT-B/16 (+ MAE's decoder) is b12x1
    return base


def expected_shapes(cfg: ViTConfig, decoder: bool = True) -> dict[str, tuple]:
    """{our TP=1 name: shape} of the MAE model for cfg (without the decoder unless `decoder`),
    built on the meta device in this single-process world (no memory, no table to keep in sync)."""
    from rsscale.scaling.model.mae import MaskedAutoencoder

    with torch.device("meta"):
        model = MaskedAutoencoder(cfg)
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {n: tuple(t.shape) for n, t in named if decoder or not n.startswith(_DECODER)}


def import_state_dict(sd: dict[str, torch.Tensor], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """MAE/timm state dict -> {our name: tensor} for cfg; every key and shape checked."""
    if cfg.branches != 1:
        raise ValueError(f"model {cfg.name!r} has {cfg.branches} branches per block; MAE/timm ViTs have one")
    has_decoder = any(k.startswith(_DECODER) for k in sd)
    expected = expected_shapes(cfg, decoder=has_decoder)
    if "fc_norm.weight" in sd and "norm.weight" in sd:
        raise ValueError("the state dict has both 'norm' and 'fc_norm'; keep the one the encoder should end with")
    if "fc_norm.weight" in sd:
        log.warning("fc_norm (applied after global pooling) becomes the encoder's final norm, applied to every token")
    out = {}
    for key, tensor in sd.items():
        ours = ours_from_theirs(key)
        if ours is None:
            log.info("dropped %s (no counterpart in the encoder)", key)
            continue
        if ours not in expected:
            raise ValueError(f"unexpected key {key!r}: model {cfg.name!r} has no parameter {ours!r}")
        if tuple(tensor.shape) != expected[ours]:
            raise ValueError(f"shape mismatch for {key!r}: file {tuple(tensor.shape)}, model {cfg.name!r} {expected[ours]}")
        out[ours] = tensor
    missing = [theirs_from_ours(n) for n in expected if n not in out]
    if missing:
        raise ValueError(f"missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + f" for model {cfg.name!r}")
    return out


def export_state_dict(full: dict[str, torch.Tensor], cfg: ViTConfig, fmt: str) -> dict:
    """Our full state dict -> timm (encoder only) or MAE ({'model': encoder + decoder}) naming."""
    if cfg.branches != 1:
        raise ValueError(f"model {cfg.name!r} has {cfg.branches} branches per block; MAE/timm ViTs have one")
    keep = {n: t for n, t in full.items() if fmt == "mae" or not n.startswith(_DECODER)}
    if len(keep) < len(full):
        log.info("timm format: %d MAE decoder tensors left out", len(full) - len(keep))
    sd = {theirs_from_ours(n): t.contiguous() for n, t in keep.items()}
    return {"model": sd} if fmt == "mae" else sd


def write_checkpoint(out: str, cfg: ViTConfig, tensors: dict[str, torch.Tensor], source: dict) -> str:
    """Write `tensors` as step 0 of an rsscale checkpoint under <out>/checkpoints (single process)."""
    from rsscale.scaling.train import checkpoint

    meta = {"model": dataclasses.asdict(cfg), "converted_from": source}
    entries = {f"model/{n}": (t, checkpoint.tensor_meta(t)) for n, t in tensors.items()}
    return checkpoint.save_checkpoint(os.path.join(out, "checkpoints"), 0, entries, rank_state={}, meta=meta)


def convert_to_rsscale(path: str, fmt: str, out: str, model: str | ViTConfig | None = None, heads: int | None = None,
                       dec_heads: int = DEC_HEADS) -> str:
    sd = read_state_dict(path)
    if model is None:
        cfg = infer_config(sd, heads, dec_heads)
    else:
        cfg = get_preset(model) if isinstance(model, str) else model
    tensors = import_state_dict(sd, cfg)
    folder = write_checkpoint(out, cfg, tensors, {"format": fmt, "file": os.path.abspath(path)})
    log.info("converted %d tensors of %s (%s) into model %r at %s", len(tensors), path, fmt, cfg.name, folder)
    return folder


def convert_from_rsscale(path: str, fmt: str, out: str) -> str:
    from rsscale.scaling.train.checkpoint import load_full_state_dict

    cfg, full = load_full_state_dict(path)
    sd = export_state_dict(full, cfg, fmt)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd["model"] if fmt == "mae" else sd, out)
    else:
        torch.save(sd, out)
    log.info("wrote model %r in %s naming to %s", cfg.name, fmt, out)
    return out


@dataclasses.dataclass
class ConvertConfig:
    """Every option of `rsscale convert`: the direction (exactly one of --from/--to), the source and
    where the result goes, and the shape where the weights leave it open."""
    src: str | None = option(None, "import SOURCE, a .pth/.safetensors file in MAE or timm naming", flag="--from", choices=("mae", "timm"))
    dst: str | None = option(None, "export SOURCE, an rsscale checkpoint/run folder, in timm or MAE naming", flag="--to", choices=("timm", "mae"))
    source: str | None = option(None, "weights file (--from) or rsscale checkpoint / run folder (--to)", positional=True, required=True)
    out: str | None = option(None, "run folder to write (--from) or weights file (--to; .safetensors or .pth)", required=True)
    model: str | None = option(None, "target preset (--from; default: read the shape off the weights)")
    heads: int | None = option(None, "encoder attention heads, when the width is not a standard ViT's", ge=1)
    dec_heads: int = option(DEC_HEADS, f"MAE decoder attention heads (default {DEC_HEADS}, MAE's)", ge=1)

    def __post_init__(self):
        check(self)


def add_arguments(parser) -> None:
    add_options(parser, ConvertConfig)


def config_from_args(args) -> ConvertConfig:
    config = resolve(ConvertConfig, args)
    if (config.src is None) == (config.dst is None):  # argparse's old mutually exclusive, required pair
        raise ValueError("exactly one of --from (import) and --to (export) is required" + (", not both" if config.src else ""))
    return config


def main(args) -> int:
    config = config_from_args(args)
    if config.src:
        convert_to_rsscale(config.source, config.src, config.out, config.model, config.heads, config.dec_heads)
    else:
        convert_from_rsscale(config.source, config.dst, config.out)
    return 0
