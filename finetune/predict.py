"""`rsscale predict RUN --images DIR --out DIR`: apply a fine-tuning run's saved model to new
images of any size.

Segmentation: sliding --crop windows (the evaluation's), one class-index PNG per image
(<name>.png, pixel = class index into RUN's classes) and a colour preview (<name>_color.png).
Detection: the image cut into --crop patches (or the DOTA split of --protocol), detections merged
with rotated NMS, written as a DOTA Task1 submission: Task1_<class>.txt, one line per box
"<image> <score> x1 y1 x2 y2 x3 y3 x4 y4". Images are shared over the data-parallel ranks.

    rsscale predict runs/ft-seg --images data/synthetic/seg/Val/Urban/images_png --out preds/seg
    rsscale predict runs/ft-det --images scenes/ --out preds/det --protocol dota-ms
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from rsscale.finetune.data.datasets import read_rgb_image
from rsscale.finetune.data.dota_io import write_dota_submission
from rsscale.finetune.evaluate import RUN_HELP, RunLayout, overrides_from
from rsscale.finetune.evaluation.dota_protocol import detect_image
from rsscale.finetune.model.seg import slide_inference
from rsscale.finetune.rotated import obb_to_poly
from rsscale.finetune.finetune import PROTOCOL_CHOICES, protocol_options, restore, run_layout
from rsscale.scaling.parallel import state
from rsscale.scaling.runtime.launch import add_launch_arguments, wants_launch
from rsscale.scaling.runtime.log import progress
from rsscale.scaling.runtime.options import add_options, check, option, resolve, section
from rsscale.scaling.spec.layout import relaunch_checked
from rsscale.scaling.spec.run import PRECISIONS
from rsscale.scaling.train.pretrain import log, run_rank

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclasses.dataclass
class PredictConfig:
    """Every option of `rsscale predict`; None (a model option or a layout one): the run's own."""
    run: str | None = option(None, RUN_HELP, positional=True, required=True)
    images: str | None = option(None, "folder of images (PNG/JPEG/TIFF, any size) or one image file", required=True)
    out: str | None = option(None, "folder for the masks (seg) or the Task1_<class>.txt files (det)", required=True)
    protocol: str | None = option(None, "detection split: as trained (crop), or DOTA's single/multi-scale split with flip TTA; "
                                  "default: the run's", choices=PROTOCOL_CHOICES)
    score_thr: float | None = option(None, "detection: drop boxes scoring below this (default: the run's)", ge=0)
    precision: str | None = option(None, "autocast dtype (default: the run's)", choices=PRECISIONS)
    parallel: RunLayout = section(RunLayout)

    def __post_init__(self):
        check(self)


def add_arguments(parser) -> None:
    add_options(parser, PredictConfig)
    add_launch_arguments(parser)  # --nproc ...: relaunch under torchrun


def config_from_args(args) -> PredictConfig:
    return resolve(PredictConfig, args)


def image_files(where: str) -> list[Path]:
    path = Path(where)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--images {where}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"--images {where}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in it")
    return files


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours (matplotlib's tab20, repeated past 20 classes) for the previews."""
    from matplotlib import colormaps

    return (np.array([colormaps["tab20"](i % 20)[:3] for i in range(n)]) * 255).astype(np.uint8)


def predict_run(config: PredictConfig, started=lambda trainer: trainer) -> dict:
    files = image_files(config.images)
    world = int(os.environ.get("WORLD_SIZE", 1))
    tuner = started(restore(config.run, world, **overrides_from(config, ("protocol", "score_thr", "precision")))[0])
    if tuner.cfg.in_chans != 3:
        raise ValueError(f"the model takes {tuner.cfg.in_chans}-band images; predict reads 3-band (RGB) images")
    a, model, classes = tuner.options, tuner.model, tuner.classes
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    mine = files[state.dp_rank()::tuner.layout.dp]  # every TP rank of a replica takes the same images
    model.eval()
    dets, t0, colours = {c: [] for c in classes}, time.time(), palette(len(classes))
    with torch.no_grad(), tuner._autocast():
        for path in progress(mine, desc="[predict] images", unit="image"):
            image = read_rgb_image(path)
            if tuner.task == "seg":
                logits = slide_inference(model, tuner.normalize(image)[None].to(tuner.device), a.crop, a.crop * 2 // 3, len(classes))
                mask = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
                if state.tp_rank() == 0:
                    Image.fromarray(mask).save(out / f"{path.stem}.png")
                    Image.fromarray(colours[mask]).save(out / f"{path.stem}_color.png")
            else:
                opts = protocol_options(a) or dict(rates=(1.0,), overlap=a.crop // 4, flips=())
                found = detect_image(model, image, tuner.normalize, patch=a.crop, score_thr=a.score_thr, max_dets=a.max_per_image, **opts)
                for poly, score, label in zip(obb_to_poly(found["boxes"]).tolist(), found["scores"].tolist(), found["labels"].tolist()):
                    dets[classes[label]].append((path.stem, score, poly))
    seconds = time.time() - t0
    if tuner.task == "det" and tuner.layout.dp > 1:
        gathered = [None] * tuner.layout.dp
        dist.all_gather_object(gathered, dets, group=state.dp_group())
        dets = {c: sorted((row for d in gathered for row in d[c]), key=lambda r: -r[1]) for c in classes}
    summary = {"images": len(files), "task": tuner.task, "seconds": seconds, "seconds_per_image": seconds / max(len(mine), 1)}
    if dist.get_rank() == 0:
        if tuner.task == "det":
            write_dota_submission(dets, out)
            summary["boxes"] = {c: len(rows) for c, rows in dets.items() if rows}
            what = f"{sum(summary['boxes'].values())} boxes in Task1_<class>.txt ({len(summary['boxes'])} classes)"
        else:
            what = f"{len(files)} class-index masks (<name>.png) and colour previews (<name>_color.png)"
        (out / "predict.json").write_text(json.dumps({**summary, "run": str(config.run), "classes": classes, "step": tuner.step}, indent=1))
        log(f"predicted {len(files)} image(s) with the {tuner.task} model of {config.run} (step {tuner.step}) in {seconds:.1f} s "
            f"({summary['seconds_per_image']:.2f} s/image per replica): {what} in {out}")
    return summary


def main(args) -> int:
    config = config_from_args(args)
    if wants_launch(args):
        return relaunch_checked("predict", args, lambda world: run_layout(config.run, world, **overrides_from(config, ())))
    return run_rank("predict", lambda started: predict_run(config, started))
