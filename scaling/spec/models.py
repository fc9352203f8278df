"""`rsscale models`: the presets (or model files) with their exact parameter counts and FLOPs,
all from scaling/spec/config.py."""

from __future__ import annotations

from dataclasses import dataclass

from rsscale.scaling.runtime.options import add_options, check, option, resolve
from rsscale.scaling.spec.config import PRESETS, get_preset, mae_step_flops, param_count


@dataclass
class ModelsConfig:
    """Every option of `rsscale models`: which shapes the table lists, and its format."""
    format: str = option("text", "table format", choices=("text", "csv"))
    model: list[str] | None = option(None, "list these presets or model files (.yaml/.toml) only (repeatable; default: every preset)", metavar="NAME_OR_FILE")

    def __post_init__(self):
        check(self)


def add_arguments(parser) -> None:
    add_options(parser, ModelsConfig)


def config_from_args(args) -> ModelsConfig:
    return resolve(ModelsConfig, args)


def models_table(names=None) -> list[dict]:
    rows = []
    for c in (get_preset(n) for n in names) if names else PRESETS.values():
        rows.append(
            {
                "name": c.name,
                "shape": f"{c.depth}x{c.branches} w{c.width} h{c.heads} mlp{c.mlp} {c.img_size}px/p{c.patch_size}" + (f" sup{c.num_classes}" if c.supervised else ""),
                "encoder_params": param_count(c, "encoder"),
                "mae_params": param_count(c, "mae"),
                "mae_gflops_per_img": mae_step_flops(c) / 1e9,
                "note": c.note,
            }
        )
    return rows


def main(args) -> int:
    args = config_from_args(args)
    rows = models_table(args.model)
    if args.format == "csv":
        print(",".join(rows[0]))
        for r in rows:
            print(",".join(str(v) for v in r.values()))
        return 0
    w = max(8, *(len(r["name"]) for r in rows))
    print(f"{'name':<{w}} {'shape':<38} {'encoder params':>15} {'train params':>15} {'train GFLOP/img':>16}  note")
    for r in rows:
        print(
            f"{r['name']:<{w}} {r['shape']:<38} {r['encoder_params']:>15,} {r['mae_params']:>15,} "
            f"{r['mae_gflops_per_img']:>16.2f}  {r['note']}"
        )
    print("train: the MAE (encoder + decoder), or for a supervised shape (dec_depth 0) the encoder + classification head; "
          "GFLOP/img: matmul FLOPs of one training step (forward + backward) per image.")
    return 0
