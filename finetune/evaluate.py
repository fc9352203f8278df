"""`rsscale evaluate RUN`: score a fine-tuning run's saved model again, on its validation data or
other data of the same classes, under the run's evaluation options (or others given), and set the
numbers beside the ones its training printed (RUN/metrics.json).

    rsscale evaluate runs/ft-seg                              # the run's own data and options
    rsscale evaluate runs/ft-det --data data/other --protocol dota-ms --nproc 2
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch.distributed as dist

from rsscale.finetune.evaluation.metrics import TIE_ORDERS
from rsscale.finetune.finetune import DATASETS, PROTOCOL_CHOICES, build_datasets, restore, run_layout, val_subset
from rsscale.scaling.runtime.launch import add_launch_arguments, wants_launch
from rsscale.scaling.spec.layout import add_layout_arguments, relaunch_checked
from rsscale.scaling.train.pretrain import log, run_rank

# evaluation options a command line may change (None: the run's own)
OVERRIDES = ("data", "dataset", "max_eval_images", "score_thr", "max_per_image", "tie_order", "protocol", "precision", "timeout")


def add_arguments(parser) -> None:
    parser.add_argument("run", help="fine-tuning run folder (its --out), its checkpoints/ folder or one step_* folder")
    parser.add_argument("--data", default=None, help="dataset root (default: the run's)")
    parser.add_argument("--dataset", default=None, choices=DATASETS,
                        help="dataset layout of --data (default: the run's)")
    parser.add_argument("--max-eval-images", type=int, default=None, help="evaluate at most this many val images (0: all)")
    parser.add_argument("--score-thr", type=float, default=None, help="detection: score threshold")
    parser.add_argument("--max-per-image", type=int, default=None, help="detection: boxes kept per patch and image")
    parser.add_argument("--tie-order", choices=TIE_ORDERS, default=None, help="DOTA AP: order of equal scores")
    parser.add_argument("--protocol", choices=PROTOCOL_CHOICES, default=None,
                        help="detection: crop-sized patches as trained, or DOTA's single/multi-scale split with flip TTA (ms); default: the run's")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="autocast dtype (default: the run's)")
    add_layout_arguments(parser)
    add_launch_arguments(parser)
    parser.add_argument("--timeout", type=float, default=None, help="process-group timeout in seconds")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")


def overrides_from(args, names=OVERRIDES) -> dict:
    """The options given on the command line (layout flags always: they describe this launch)."""
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    layout = {k: getattr(args, k) for k in ("tp", "dp", "sp", "micro_batch", "global_batch") if hasattr(args, k)}
    return {**given, **{k: v for k, v in layout.items() if v is not None}}


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


def evaluate_run(args, started=lambda trainer: trainer) -> dict:
    world = int(os.environ.get("WORLD_SIZE", 1))
    tuner = started(restore(args.run, world, **overrides_from(args))[0])
    a = tuner.options
    _, val_set, classes = build_datasets(tuner.task, a.dataset, a.data, (a.synthetic_count,) * 2)
    if list(classes) != tuner.classes:
        raise ValueError(f"{a.data} ({a.dataset}) has classes {list(classes)}; the model was trained on {tuner.classes}")
    val_set = val_subset(val_set, a.max_eval_images)
    results, per_class = tuner.scores(val_set, classes)
    if dist.get_rank() == 0:
        metrics_file = Path(args.run) / "metrics.json"
        trained = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        lines = compare({**results, **per_class}, trained)
        log(f"{tuner.task} model at step {tuner.step} on {len(val_set)} {a.dataset} images ({a.data}):\n" + "\n".join(
            lines or [f"  {k:<24} {v:9.4f}" for k, v in {**results, **per_class}.items()]))
        if args.json:
            Path(args.json).write_text(json.dumps({**results, **per_class}, indent=1))
            log(f"wrote {args.json}")
    return {**results, **per_class}


def main(args) -> int:
    if wants_launch(args):
        return relaunch_checked("evaluate", args, lambda world: run_layout(args.run, world, **overrides_from(args)))
    return run_rank("evaluate", lambda started: evaluate_run(args, started))
