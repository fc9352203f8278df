"""`rsscale evaluate RUN`: score a fine-tuning run's saved model again, on its validation data or
other data of the same classes, under the run's evaluation options (or others given), and set the
numbers beside the ones its training printed (RUN/metrics.json).

    rsscale evaluate runs/ft-seg                              # the run's own data and options
    rsscale evaluate runs/ft-det --data data/other --protocol dota-ms --nproc 2

Options left out (None), layout ones included, keep the run's own; RUN and the options may also come
from a --config file (as --print-config writes it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path

import torch.distributed as dist

from rsscale.finetune.evaluation.metrics import TIE_ORDERS
from rsscale.finetune.finetune import DATASETS, PROTOCOL_CHOICES, build_datasets, restore, run_layout, val_subset
from rsscale.scaling.runtime.launch import add_launch_arguments, wants_launch
from rsscale.scaling.runtime.options import add_options, as_config, check, option, resolve, section
from rsscale.scaling.spec.layout import Layout, relaunch_checked
from rsscale.scaling.spec.run import PRECISIONS
from rsscale.scaling.train.pretrain import log, run_rank

RUN_HELP = "fine-tuning run folder (its --out), its checkpoints/ folder or one step_* folder"


def runs_own(cls, name: str):
    """`cls` (a section: Layout) with every field `X | None`, None by default: the same flags, help
    and ranges, where an absent one (None) keeps the run's own value."""
    hints = typing.get_type_hints(cls)
    return dataclasses.make_dataclass(name, [(f.name, hints[f.name] | None, dataclasses.field(default=None, metadata=f.metadata))
                                            for f in dataclasses.fields(cls)])


RunLayout = runs_own(Layout, "RunLayout")  # --tp --pp --dp --sp --micro-batch --global-batch --vpp, each the run's own unless given


@dataclasses.dataclass
class EvaluateConfig:
    """Every option of `rsscale evaluate`; None (an evaluation option or a layout one): the run's own."""
    run: str | None = option(None, RUN_HELP, positional=True, required=True)
    data: str | None = option(None, "dataset root (default: the run's)")
    dataset: str | None = option(None, "dataset layout of --data (default: the run's)", choices=DATASETS)
    max_eval_images: int | None = option(None, "evaluate at most this many val images (0: all)", ge=0)
    score_thr: float | None = option(None, "detection: score threshold", ge=0)
    max_per_image: int | None = option(None, "detection: boxes kept per patch and image", ge=1)
    tie_order: str | None = option(None, "DOTA AP: order of equal scores", choices=TIE_ORDERS)
    protocol: str | None = option(None, "detection: crop-sized patches as trained, or DOTA's single/multi-scale split with flip TTA (ms); "
                                  "default: the run's", choices=PROTOCOL_CHOICES)
    precision: str | None = option(None, "autocast dtype (default: the run's)", choices=PRECISIONS)
    parallel: RunLayout = section(RunLayout)
    timeout: float | None = option(None, "process-group timeout in seconds", gt=0)
    json: str | None = option(None, "also write the metrics to this JSON file")

    def __post_init__(self):
        check(self)


# evaluation options a command line may change (None: the run's own)
OVERRIDES = tuple(f.name for f in dataclasses.fields(EvaluateConfig) if f.name not in ("run", "parallel", "json"))


def add_arguments(parser) -> None:
    add_options(parser, EvaluateConfig)
    add_launch_arguments(parser)  # --nproc ...: relaunch under torchrun


def config_from_args(args) -> EvaluateConfig:
    return resolve(EvaluateConfig, args)


def overrides_from(config, names=OVERRIDES) -> dict:
    """The options `names` that the flags or the --config file gave (not None), and the layout ones
    given (always: they describe this launch)."""
    given = {k: getattr(config, k) for k in names if getattr(config, k) is not None}
    return {**given, **{k: v for k, v in as_config(config.parallel).items() if v is not None}}


def compare(now: dict, trained: dict) -> list[str]:
    """Lines setting each headline metric beside the value the run's training printed."""
    lines = []
    for key, value in now.items():
        if key in trained and key not in ("eval_seconds",) and isinstance(trained[key], (int, float)):
            diff = value - trained[key]
            lines.append(f"  {key:<24} {value:9.4f}   at training {trained[key]:9.4f}   "
                         + ("same" if math.isclose(value, trained[key], rel_tol=1e-6, abs_tol=1e-6) or (math.isnan(value) and math.isnan(trained[key]))
                            else f"diff {diff:+.4f}"))
    return lines


def evaluate_run(config: EvaluateConfig, started=lambda trainer: trainer) -> dict:
    world = int(os.environ.get("WORLD_SIZE", 1))
    tuner = started(restore(config.run, world, **overrides_from(config))[0])
    a = tuner.options
    _, val_set, classes = build_datasets(tuner.task, a.dataset, a.data, (a.synthetic_count,) * 2)
    if list(classes) != tuner.classes:
        raise ValueError(f"{a.data} ({a.dataset}) has classes {list(classes)}; the model was trained on {tuner.classes}")
    val_set = val_subset(val_set, a.max_eval_images)
    results, per_class = tuner.scores(val_set, classes)
    if dist.get_rank() == 0:
        metrics_file = Path(config.run) / "metrics.json"
        trained = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        lines = compare({**results, **per_class}, trained)
        log(f"{tuner.task} model at step {tuner.step} on {len(val_set)} {a.dataset} images ({a.data}):\n" + "\n".join(
            lines or [f"  {k:<24} {v:9.4f}" for k, v in {**results, **per_class}.items()]))
        if config.json:
            Path(config.json).write_text(json.dumps({**results, **per_class}, indent=1))
            log(f"wrote {config.json}")
    return {**results, **per_class}


def main(args) -> int:
    config = config_from_args(args)
    if wants_launch(args):
        return relaunch_checked("evaluate", args, lambda world: run_layout(config.run, world, **overrides_from(config)))
    return run_rank("evaluate", lambda started: evaluate_run(config, started))
