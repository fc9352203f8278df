"""`rsscale finetune`: fine-tune a (MAE-pretrained) encoder, ViTDet-adapted, for semantic
segmentation (UperNet) or rotated detection (rotated FCOS), evaluate, and record the metrics in
the results store (kind="finetune", params = encoder parameters) so the scaling report can set
downstream accuracy against model size.

    rsscale finetune --task seg --dataset synthetic --data data/synthetic --checkpoint runs/tiny \
        --steps 300 --crop 128 --lr 1e-3 --layer-decay 0.75 --out runs/ft-seg --results reports/results.db

Data layouts (--data DIR):
  synthetic  the `rsscale data` layout (written here when missing): seg/{Train,Val}/{Urban,Rural},
             det/{train,val}/{images,labelTxt}
  loveda     DIR/{Train,Val}/{Urban,Rural}/{images_png,masks_png}
  potsdam    DIR/{train,val}/{images,labels} (tiles *_RGB.* with *_label.*; colour or index labels)
  dota       DIR/{train,val}/{images,labelTxt}; split big images first (python -m rsscale.finetune.datasets)
  diorr      DIR/{train,val}/{images,annotations} (JPEG + oriented-box XML)
Training samples are random crop x crop windows (random flips); evaluation slides crop-sized
windows over whole tiles (segmentation) or cuts DOTA-style overlapping patches (detection).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rsscale import kernels
from rsscale.scaling.store import ResultsStore
from rsscale.finetune import datasets as D
from rsscale.finetune.det import RotatedFCOS, evaluate_det
from rsscale.finetune.orcnn import OrientedRCNN
from rsscale.finetune.rotated import norm_obb
from rsscale.finetune.seg import Segmenter, evaluate_seg
from rsscale.finetune.vitdet import ViTDetBackbone, load_pretrained, param_groups_lrd
from rsscale.scaling.config import get_preset, param_count
from rsscale.scaling.config_file import check_numbers
from rsscale.scaling.data import default_stats
from rsscale.scaling.optim import lr_at
from rsscale.scaling.parallel import state

TASKS = {"seg": ("loveda", "potsdam", "synthetic"), "det": ("dota", "diorr", "synthetic")}


def say(msg: str) -> None:
    print(f"[finetune] {msg}", flush=True)


# ------------------------------------------------------------------------------------ data
def build_datasets(task: str, dataset: str, data: str, synthetic_counts=(64, 64)):
    """(train, val, class names) for a task and a benchmark in its native layout (module doc)."""
    if dataset not in TASKS[task]:
        raise ValueError(f"dataset {dataset!r} is not a {task} benchmark; choose one of {', '.join(TASKS[task])}")
    root = Path(data)
    if dataset == "synthetic":
        from rsscale.scaling.synthetic import DET_CLASSES, dataset_paths, ensure_dataset

        paths = dataset_paths(root)
        if not (Path(paths["seg_train"]).is_dir() and Path(paths["det_train"]).is_dir()):
            say(f"no synthetic dataset at {root}: writing one")
            paths = ensure_dataset(root, num_pretrain=0, num_seg=synthetic_counts[0], num_det=synthetic_counts[1])
        if task == "seg":
            split = lambda key: torch.utils.data.ConcatDataset([D.LoveDADataset(d) for d in paths[key]])  # noqa: E731
            return split("seg_train_dirs"), split("seg_val_dirs"), D.LOVEDA_CLASSES
        split = lambda key: D.DotaDataset(Path(paths[key]) / "images", Path(paths[key]) / "labelTxt", DET_CLASSES)  # noqa: E731
        return split("det_train"), split("det_val"), DET_CLASSES
    if dataset == "loveda":
        def split(name):
            domains = [root / name / d for d in ("Urban", "Rural") if (root / name / d).is_dir()]
            if not domains:
                raise FileNotFoundError(f"no LoveDA domain folders (Urban/, Rural/) under {root / name}")
            return torch.utils.data.ConcatDataset([D.LoveDADataset(d) for d in domains])
        return split("Train"), split("Val"), D.LOVEDA_CLASSES
    if dataset == "potsdam":
        split = lambda name: D.PotsdamDataset(root / name / "images", root / name / "labels")  # noqa: E731
        return split("train"), split("val"), D.POTSDAM_CLASSES
    if dataset == "dota":
        split = lambda name: D.DotaDataset(root / name / "images", root / name / "labelTxt")  # noqa: E731
        return split("train"), split("val"), D.DOTA_V1_CLASSES
    split = lambda name: D.DiorRDataset(root / name / "images", root / name / "annotations")  # noqa: E731
    return split("train"), split("val"), D.DIOR_CLASSES


class Normalize:
    """uint8 [C, H, W] -> float, ImageNet statistics: the pretraining loader's normalisation."""

    def __init__(self, chans: int = 3):
        mean, std = default_stats(chans)
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __call__(self, img):
        if img.shape[0] != self.mean.shape[0]:
            raise ValueError(f"the encoder takes {self.mean.shape[0]}-band images but the dataset's have {img.shape[0]} bands; "
                             "fine-tune on data with the pretraining bands (or pretrain with --in-chans to match)")
        return (img.float() / 255.0 - self.mean) / self.std


def random_seg_sample(dataset, crop: int, normalize, rng: random.Random):
    """A random crop x crop window (padded with ignore where the tile is smaller) + random flips."""
    img, target = dataset[rng.randrange(len(dataset))]
    mask = target["mask"]
    _, h, w = img.shape
    y0, x0 = rng.randint(0, max(h - crop, 0)), rng.randint(0, max(w - crop, 0))
    img, mask = normalize(img[:, y0:y0 + crop, x0:x0 + crop]), mask[y0:y0 + crop, x0:x0 + crop]
    ph, pw = crop - img.shape[1], crop - img.shape[2]
    img, mask = F.pad(img, (0, pw, 0, ph)), F.pad(mask, (0, pw, 0, ph), value=D.IGNORE_INDEX)
    for dim in (-1, -2):
        if rng.random() < 0.5:
            img, mask = img.flip(dim), mask.flip(dim)
    return img, mask


def random_det_sample(dataset, crop: int, normalize, rng: random.Random):
    """A random DOTA-style patch (split_image's rule for cut objects), preferring patches with
    objects, + random flips (a flip mirrors the centre and negates the angle)."""
    img, target = dataset[rng.randrange(len(dataset))]
    patches = D.split_image(img, target, patch=crop, overlap=crop // 4)
    with_objects = [p for p in patches if len(p.target["labels"])]
    patch = rng.choice(with_objects or patches)
    img, boxes = normalize(patch.image), patch.target["boxes"].clone()
    for dim, coord in ((-1, 0), (-2, 1)):
        if rng.random() < 0.5:
            img = img.flip(dim)
            boxes[:, coord] = crop - boxes[:, coord]
            boxes[:, 4] = -boxes[:, 4]
    return img, {"boxes": norm_obb(boxes), "labels": patch.target["labels"]}


# ------------------------------------------------------------------------------------ model
def build_model(task: str, args, num_classes: int):
    """(model, ViTConfig, init description). The preset comes from the checkpoint if given."""
    state.ensure_initialized()
    if args.checkpoint:
        from rsscale.scaling.checkpoint import load_full_state_dict

        cfg, full = load_full_state_dict(args.checkpoint)
        say(f"pretrained encoder {cfg.name} from {args.checkpoint}")
    else:
        cfg, full = get_preset(args.model), None
        say(f"no --checkpoint: the {cfg.name} encoder is RANDOMLY initialised (not a pretrained result)")
    torch.manual_seed(args.seed)
    backbone = ViTDetBackbone(cfg, img_size=args.crop, window_size=args.window, drop_path=args.drop_path,
                              out_channels=args.channels)
    init = "random"
    if full is not None:
        report = load_pretrained(backbone, full, cfg)
        say(f"loaded {len(report['loaded'])} tensors; new (random) {len(report['missing'])}: "
            f"{', '.join(report['missing'][:4])}{' ...' if len(report['missing']) > 4 else ''}; "
            f"ignored pretraining-only {len(report['ignored'])}; unexpected {len(report['unexpected'])} {report['unexpected'][:5]}")
        init = "mae"
    if task == "seg":
        model = Segmenter(backbone, num_classes, channels=args.channels)
    elif args.detector == "orcnn":  # --detector: Oriented R-CNN or rotated FCOS
        model = OrientedRCNN.scaled_to(backbone, num_classes, args.crop)
    else:
        model = RotatedFCOS(backbone, num_classes, channels=args.channels)
    return model, cfg, init


# ------------------------------------------------------------------------------------ loop
def train(model, task, train_set, args, steps: int, log_metric=None):
    """AdamW with layer-wise lr decay, linear warmup + cosine; progress every --log-every steps."""
    groups = param_groups_lrd(model, model.backbone.cfg.depth, args.weight_decay, args.layer_decay)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    normalize, rng = Normalize(model.backbone.cfg.in_chans), random.Random(args.seed)
    sample = random_seg_sample if task == "seg" else random_det_sample
    warmup = min(args.warmup, max(steps // 5, 1))
    model.train()
    t0, history = time.time(), []
    for step in range(steps):
        lr = lr_at(step, args.lr, warmup, steps)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        imgs, targets = zip(*(sample(train_set, args.crop, normalize, rng) for _ in range(args.batch)))
        imgs = torch.stack(imgs)
        if task == "seg":
            loss = model.loss(model(imgs), torch.stack(targets))
            parts = {}
        else:
            parts = model.loss(model(imgs), list(targets))
            loss = parts.pop("total")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        history.append(loss.item())
        if log_metric:
            log_metric("loss", history[-1], step=step)
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            dt = time.time() - t0
            extra = " ".join(f"{k} {v.item():.3f}" for k, v in parts.items())
            say(f"step {step + 1}/{steps} loss {sum(history[-args.log_every:]) / len(history[-args.log_every:]):.4f} "
                f"{extra} lr {lr:.2e} | {(step + 1) * args.batch / dt:.1f} img/s, {dt:.0f} s")
    return history


def majority_baseline(train_set, val_set, class_names) -> dict:
    """mIoU/OA of predicting the most frequent training class everywhere: what 'learned' must beat."""
    from rsscale.finetune.metrics import SegMetric

    counts = torch.zeros(len(class_names), dtype=torch.int64)
    for i in range(len(train_set)):
        m = train_set[i][1]["mask"]
        counts += torch.bincount(m[m != D.IGNORE_INDEX].flatten(), minlength=len(class_names))
    metric = SegMetric(len(class_names), D.IGNORE_INDEX, class_names)
    for i in range(len(val_set)):
        m = val_set[i][1]["mask"]
        metric.update(torch.full_like(m, int(counts.argmax())), m)
    return metric.compute()


def run_finetune(args) -> dict:
    """The whole command: data, model, training, evaluation, store records. Returns the metrics."""
    train_set, val_set, classes = build_datasets(args.task, args.dataset, args.data, (args.synthetic_count,) * 2)
    if args.max_eval_images:
        val_set = torch.utils.data.Subset(val_set, range(min(args.max_eval_images, len(val_set))))
    model, cfg, init = build_model(args.task, args, len(classes))
    steps = args.steps or args.epochs * math.ceil(len(train_set) / args.batch)
    n_params = param_count(cfg, "encoder")
    say(f"task {args.task} on {args.dataset}: {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes; "
        f"{cfg.name} encoder {n_params:,} params, model {sum(p.numel() for p in model.parameters()):,}; "
        f"{steps} steps x batch {args.batch}, crop {args.crop}")
    store = ResultsStore(args.results)
    tags = dict(dataset=args.dataset, task=args.task, init=init)
    with store.run(kind="finetune", preset=cfg.name, params=n_params, layout=dict(tp=state.tp_size(), pp=1, dp=1, sp=False),
                   micro_batch=args.batch, global_batch=args.batch, precision="fp32", kernels=kernels.get_backend(),
                   config={k: v for k, v in vars(args).items() if k != "func"}) as run:
        curve = []
        history = train(model, args.task, train_set, args, steps, log_metric=lambda n, v, step: curve.append((n, v, step, tags)))
        run.log_many(curve)
        normalize = Normalize(cfg.in_chans)
        t0 = time.time()
        if args.task == "seg":
            metric = evaluate_seg(model, val_set, args.crop, classes, normalize)
            r = metric.compute()
            base = majority_baseline(train_set, val_set, classes)
            print(metric.table())
            results = {"mIoU": 100 * r["mIoU"], "OA": 100 * r["OA"], "mF1": 100 * r["mF1"], "mAcc": 100 * r["mAcc"],
                       "mIoU_majority_baseline": 100 * base["mIoU"], "OA_majority_baseline": 100 * base["OA"]}
            per_class = {f"IoU/{c}": 100 * v for c, v in zip(classes, r["IoU"].tolist()) if not math.isnan(v)}
        else:
            from rsscale.finetune.metrics import format_ap_table

            r = evaluate_det(model, val_set, args.crop, classes, normalize)
            print(format_ap_table(r))
            results = {"mAP": 100 * r["mAP"]}
            per_class = {f"AP/{c}": 100 * v["ap"] for c, v in r["classes"].items() if not math.isnan(v["ap"])}
        results["final_loss"] = sum(history[-10:]) / len(history[-10:])
        say(" ".join(f"{k} {v:.2f}" for k, v in results.items()) + f" (eval {time.time() - t0:.0f} s)")
        run.log_many([(k, v, None, tags) for k, v in {**results, **per_class}.items()])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "vit_config": vars(cfg), "task": args.task, "classes": list(classes)}, out / "model.pt")
        (out / "metrics.json").write_text(json.dumps({**results, **per_class, "init": init, "preset": cfg.name, "steps": steps}, indent=1))
        say(f"wrote {out / 'model.pt'} and {out / 'metrics.json'}")
    return {**results, **per_class}


def add_arguments(parser) -> None:
    parser.add_argument("--task", choices=sorted(TASKS), required=True, help="seg (UperNet) or det (see --detector)")
    parser.add_argument("--detector", choices=["orcnn", "fcos"], default="orcnn",
                        help="det: Oriented R-CNN (two-stage, as published RS tables) or rotated FCOS (one-stage)")
    parser.add_argument("--dataset", choices=["loveda", "potsdam", "dota", "diorr", "synthetic"], required=True)
    parser.add_argument("--data", default="data/synthetic", help="dataset root in its native layout (see module doc)")
    parser.add_argument("--checkpoint", help="pretraining checkpoint (run folder or step folder); random init if absent")
    parser.add_argument("--model", default="tiny", help="preset when no --checkpoint is given (rsscale models)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training images (one crop each)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128, help="training crop / eval window (multiple of 2 x patch)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay (1 = none)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=50, help="warmup steps (at most a fifth of the run)")
    parser.add_argument("--clip-grad", type=float, default=1.0)
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--window", type=int, default=4, help="window attention size in tokens")
    parser.add_argument("--channels", type=int, default=32, help="pyramid and head channels")
    parser.add_argument("--max-eval-images", type=int, default=0, help="evaluate on at most this many val images (0: all)")
    parser.add_argument("--synthetic-count", type=int, default=64, help="seg/det tiles when writing the synthetic set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--out", help="folder for model.pt and metrics.json")
    parser.add_argument("--results", help="results store (default $RSSCALE_RESULTS or reports/results.db)")


NUMBER_RULES = {"--steps": dict(ge=1), "--epochs": dict(ge=1), "--batch": dict(ge=1), "--crop": dict(ge=1), "--lr": dict(gt=0),
                "--layer-decay": dict(gt=0, le=1), "--weight-decay": dict(ge=0), "--warmup": dict(ge=0), "--clip-grad": dict(gt=0),
                "--drop-path": dict(ge=0, lt=1), "--window": dict(ge=1), "--channels": dict(ge=1), "--max-eval-images": dict(ge=0),
                "--synthetic-count": dict(ge=1), "--seed": dict(ge=0), "--log-every": dict(ge=1)}


def check_args(args) -> None:
    """One-line ValueError naming the first flag whose value makes no sense."""
    check_numbers(NUMBER_RULES, lambda flag: getattr(args, flag[2:].replace("-", "_")))


def main(args) -> int:
    check_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    run_finetune(args)
    return 0
