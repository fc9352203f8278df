"""`rsscale finetune`: fine-tune a (MAE-pretrained) encoder, ViTDet-adapted, for semantic
segmentation (UperNet) or rotated detection (Oriented R-CNN, or rotated FCOS with --detector fcos),
evaluate, and record the metrics in the results store (kind="finetune", params = encoder
parameters) so the scaling report can set downstream accuracy against model size. `Finetuner` runs
on the pretraining Trainer: checkpoints in --out/checkpoints (--save-every, --keep, --resume,
--overwrite), from which `rsscale evaluate` and `rsscale predict` rebuild the model.

    rsscale finetune --task seg --dataset synthetic --data data/synthetic --checkpoint runs/tiny \
        --steps 300 --crop 128 --lr 1e-3 --layer-decay 0.75 --out runs/ft-seg --results reports/results.db

Data layouts (--data DIR):
  synthetic  a dataset `rsscale data` wrote: seg/{Train,Val}/{Urban,Rural}, det/{train,val}/{images,labelTxt};
             the bundled one is written only into a missing or empty DIR (never beside other files)
  loveda     DIR/{Train,Val}/{Urban,Rural}/{images_png,masks_png}
  potsdam    DIR/{train,val}/{images,labels} (tiles *_RGB.* with *_label.*; colour or index labels)
  dota       DIR/{train,val}/{images,labelTxt}; split big images first (python -m rsscale.finetune.data.datasets)
  diorr      DIR/{train,val}/{images,annotations} (JPEG + oriented-box XML)
Training samples are random crop x crop windows (random flips); evaluation slides crop-sized
windows over whole tiles (segmentation) or cuts DOTA-style overlapping patches (detection).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rsscale.finetune.data import datasets as D
from rsscale.finetune.data.checks import check_data
from rsscale.finetune.evaluation.dota_protocol import PROTOCOLS
from rsscale.finetune.evaluation.metrics import TIE_ORDERS, SegMetric, evaluate_dota, format_ap_table
from rsscale.finetune.model.fcos import RotatedFCOS, detect_images
from rsscale.finetune.model.orcnn import OrientedRCNN
from rsscale.finetune.model.seg import Segmenter, evaluate_seg
from rsscale.finetune.model.vitdet import ViTDetBackbone, load_pretrained, param_groups_lrd
from rsscale.finetune.rotated import norm_obb
from rsscale.scaling.data.loader import default_stats
from rsscale.scaling.parallel import state
from rsscale.scaling.runtime.config_file import check_numbers
from rsscale.scaling.runtime.launch import add_launch_arguments, wants_launch
from rsscale.scaling.runtime.log import reset_peak_memory
from rsscale.scaling.spec.config import ViTConfig, get_preset, param_count
from rsscale.scaling.spec.layout import Layout, add_layout_arguments, check_layout, derive_dp, relaunch_checked
from rsscale.scaling.train import checkpoint
from rsscale.scaling.spec.run import Compute, DataParallel, OptimConfig
from rsscale.scaling.train.pretrain import TrainConfig, Trainer, check_precision, log, rank_device, run_rank

TASKS = {"seg": ("loveda", "potsdam", "synthetic"), "det": ("dota", "diorr", "synthetic")}
DATASETS = ("loveda", "potsdam", "dota", "diorr", "synthetic")
PROTOCOL_CHOICES = ("crop", "dota-ss", "dota-ms")


# ------------------------------------------------------------------------------------ data
def build_datasets(task: str, dataset: str, data: str, synthetic_counts=(64, 64)):
    """(train, val, class names) for a task and a benchmark in its native layout (module doc)."""
    if dataset not in TASKS[task]:
        raise ValueError(f"dataset {dataset!r} is not a {task} benchmark; choose one of {', '.join(TASKS[task])}")
    root = Path(data)
    if dataset == "synthetic":
        from rsscale.scaling.data.synthetic import DET_CLASSES, dataset_for

        paths = dataset_for(root, task, num_seg=synthetic_counts[0], num_det=synthetic_counts[1])
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


def draw_sample(task: str, dataset, crop: int, normalize, seed: int, step: int, index: int):
    """Sample `index` of the global batch of optimizer step `step`, from its own generator (so any
    rank can draw any sample): (normalized image, mask or detection target)."""
    rng = random.Random(f"{seed}/{step}/{index}")
    return (random_seg_sample if task == "seg" else random_det_sample)(dataset, crop, normalize, rng)


# ------------------------------------------------------------------------------------ model
def build_model(task: str, args, num_classes: int, sequence_parallel: bool = False, config=None, encoder: ViTConfig | None = None):
    """(model, ViTConfig, init description). The preset comes from the checkpoint if given.
    Every rank builds it from the same seed (TP ranks keep their slices). `config`: the megatron
    ModelParallelConfig of the blocks (default: the initialized world's). `encoder`: this encoder,
    left as initialised (a fine-tuned checkpoint is loaded into it afterwards)."""
    state.ensure_initialized()
    if encoder is not None:
        cfg, full = encoder, None
    elif args.checkpoint:
        from rsscale.scaling.train.checkpoint import load_full_state_dict

        cfg, full = load_full_state_dict(args.checkpoint)
        log(f"pretrained encoder {cfg.name} from {args.checkpoint}")
    else:
        cfg, full = get_preset(args.model), None
        log(f"no --checkpoint: the {cfg.name} encoder is RANDOMLY initialised (not a pretrained result)")
    torch.manual_seed(args.seed)
    backbone = ViTDetBackbone(cfg, img_size=args.crop, window_size=args.window, drop_path=args.drop_path,
                              out_channels=args.channels, activation_checkpointing=args.activation_checkpointing,
                              sequence_parallel=sequence_parallel, config=config, **vitdet_options(args))
    init = "random"
    if full is not None:
        report = load_pretrained(backbone, full, cfg)
        log(f"loaded {len(report['loaded'])} tensors; new (random) {len(report['missing'])}: "
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


# ------------------------------------------------------------------------------------ layout
def layout_from_args(args, world: int) -> Layout:
    """The fine-tuning layout: TP x DP (no pipeline); the micro-batch defaults to global / dp."""
    tp, pp, vpp = getattr(args, "tp", 1), getattr(args, "pp", 1), getattr(args, "vpp", 1)
    if pp != 1 or vpp != 1:
        raise ValueError(f"--pp {pp} --vpp {vpp}: fine-tuning runs tensor and data parallel only (use --pp 1, no --vpp)")
    dp = derive_dp(tp, 1, getattr(args, "dp", None), world)
    gb = getattr(args, "global_batch", 8)
    mb = getattr(args, "micro_batch", None) or max(gb // dp, 1)
    return Layout(tp=tp, pp=1, dp=dp, sp=getattr(args, "sp", False), micro_batch=mb, global_batch=gb)


# ------------------------------------------------------------------------------------ one rank
def finetune_config(args, layout: Layout, cfg: ViTConfig, steps: int) -> TrainConfig:
    """The shared run description of a fine-tuning run: what the trainer's loop, checkpoints,
    resume and store read (the task's own options stay in `args`)."""
    return TrainConfig(model=cfg.name, in_chans=cfg.in_chans, parallel=layout, steps=steps, seed=args.seed, compute=Compute(precision=args.precision),
                       optim=OptimConfig(lr=args.lr, warmup=min(args.warmup, max(steps // 5, 1)), weight_decay=args.weight_decay, beta2=0.999,
                                         clip_grad=args.clip_grad),
                       data_parallel=DataParallel(distributed_optimizer=args.distributed_optimizer),
                       data=args.data, num_workers=0, out=args.out or "", save_every=args.save_every, keep=args.keep, resume=args.resume,
                       allow_schedule_change=args.allow_schedule_change, overwrite=args.overwrite, log_every=args.log_every,
                       results=args.results, tensorboard=args.tensorboard, timeout=args.timeout)


class Finetuner(Trainer):
    """One rank's share of a fine-tuning run under a TP x DP layout: the pretraining Trainer's loop,
    checkpoints, --resume, signals and store, with this task's model, batches, loss and evaluation.

    Every optimizer step takes the global batch of samples 0..G-1 (sample g of step s is drawn from
    its own generator seeded by (seed, s, g)); DP rank d trains samples [d*G/D, (d+1)*G/D) in
    micro-batches. Only the first rank of a TP group reads them; it broadcasts each micro-batch to
    its TP peers, so a TP group always computes on identical data. Losses are sums divided by
    normalizers counted over the whole global batch (valid pixels; positives), so the summed
    data-parallel gradient equals the one-process gradient of the same global batch. A resumed run
    draws the same samples and drop-path masks (the RNG state is in the checkpoint).
    """

    KIND = "finetune"

    def __init__(self, args, layout: Layout, model, train_set, device, steps: int | None = None, classes=(), init: str = "random"):
        self.args, self.layout, self.model, self.train_set, self.device = args, layout, model, train_set, device
        self.cfg, self.classes, self.init = model.backbone.cfg, list(classes), init
        self.pretraining = pretraining_identity(args.checkpoint)  # read once: tags, store config
        self.task = "seg" if isinstance(model, Segmenter) else "det"
        self.config = finetune_config(args, layout, self.cfg, steps or args.steps or 1)
        self.state, self.memory_at_start = state, reset_peak_memory(device)
        self.normalize = Normalize(self.cfg.in_chans)
        groups = param_groups_lrd(model, self.cfg.depth, args.weight_decay, args.layer_decay)
        self.optimizer = self._flat_adamw(lr_scales={n: g["lr_scale"] for g in groups for n in g["names"]})  # layer-wise lr decay
        torch.manual_seed(args.seed + 1 + state.dp_rank())  # drop-path masks: equal within a TP group
        self.results = {}
        self._ready()  # (--resume restores the weights, optimizer, step and RNG)

    # --- data ----------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list:
        """This rank's (images on the device, targets) per micro-batch of `step`."""
        L, crop, chans = self.layout, self.args.crop, self.cfg.in_chans
        per_rank = L.global_batch // L.dp
        first = state.dp_rank() * per_rank
        out = []
        for m in range(per_rank // L.micro_batch):
            lo = first + m * L.micro_batch
            if state.tp_rank() == 0:
                imgs, targets = zip(*[draw_sample(self.task, self.train_set, crop, self.normalize, self.args.seed, step, g)
                                      for g in range(lo, lo + L.micro_batch)])
                imgs = torch.stack(imgs).to(self.device)
                targets = torch.stack(targets).to(self.device) if self.task == "seg" else list(targets)
            else:  # filled by the broadcast
                imgs = torch.empty(L.micro_batch, chans, crop, crop, device=self.device)
                targets = torch.empty(L.micro_batch, crop, crop, dtype=torch.int64, device=self.device) if self.task == "seg" else None
            out.append(tuple(self._broadcast_batch(imgs, targets)))
        return out

    # --- one optimizer step --------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step over the global batch; the step record carries the loss of the whole
        global batch and its parts, equal on every rank."""
        L, model = self.layout, self.model
        model.train()
        t0 = time.perf_counter()
        micro = self.micro_batches(self.step)
        prepared = [model.prepare(t, imgs.shape[-2:]) for imgs, t in micro]
        norms = sum(model.normalizers(p) for p in prepared).to(self.device)
        if L.dp > 1:
            dist.all_reduce(norms, group=state.dp_group())  # normalizers of the whole global batch
        self._sync()
        t1 = time.perf_counter()
        self.optimizer.zero_grad(len(micro))  # DP buckets are reduced during the last micro-batch's backward
        parts = None
        for (imgs, _), prep in zip(micro, prepared):
            with self._autocast():
                losses = model.loss_from(model(imgs), prep, norms)
            (losses["total"] * (L.dp * self.scaler.scale)).backward()  # x dp: the DP all-reduce averages
            values = torch.stack([v.detach().float() for v in losses.values()])
            parts = values if parts is None else parts + values
        self._sync()
        t2 = time.perf_counter()
        self.optimizer.finish_grad_sync()  # before any other DP collective: bucket order is the same on every rank
        if L.dp > 1:
            dist.all_reduce(parts, group=state.dp_group())
        t_comm = time.perf_counter() - t2
        out = dict(zip(losses, parts.tolist()))
        loss = out.pop("total")
        lr, grad_norm, finite = self._apply_gradients(loss)
        return self._record(loss, lr, grad_norm, finite, (t0, t1, t2, time.perf_counter()), t_comm, parts=out)

    # --- evaluation: each DP replica takes every D-th image; metric state is reduced over DP ------
    def evaluate(self, val_set, classes) -> dict:
        args, L = self.args, self.layout
        self.model.eval()
        indices = range(state.dp_rank(), len(val_set), L.dp)
        with self._autocast():
            if self.task == "seg":
                metric = evaluate_seg(self.model, val_set, args.crop, classes, self.normalize, indices=indices)
                if L.dp > 1:
                    cm = metric.confusion.to(self.device)
                    dist.all_reduce(cm, group=state.dp_group())
                    metric.confusion = cm.cpu()
                return {"metric": metric}
            dets, gts = detect_images(self.model, val_set, args.crop, classes, self.normalize, indices=indices,
                                      score_thr=args.score_thr, max_per_image=args.max_per_image, **protocol_options(args))
        if L.dp > 1:
            gathered = [None] * L.dp
            dist.all_gather_object(gathered, (dets, gts), group=state.dp_group())
            dets = {c: [row for d, _ in gathered for row in d[c]] for c in classes}
            gts = {k: v for _, g in gathered for k, v in g.items()}
        return {"ap": evaluate_dota(dets, gts, classes=list(classes), tie_order=args.tie_order)}

    def scores(self, val_set, classes, counts=None) -> tuple[dict, dict]:
        """(headline metrics, per-class metrics) of the model now on `val_set`, printed as tables.
        `counts` (the data check's class pixel counts) adds the majority-class baseline (seg)."""
        t0 = time.time()
        r = self.evaluate(val_set, classes)
        if self.task == "seg":
            metric = r["metric"]
            m = metric.compute()
            log("\n" + metric.table())
            results = {"mIoU": 100 * m["mIoU"], "OA": 100 * m["OA"], "mF1": 100 * m["mF1"], "mAcc": 100 * m["mAcc"]}
            if counts is not None:
                base = majority_baseline(counts["train"], counts["val"], classes)
                results.update(mIoU_majority_baseline=100 * base["mIoU"], OA_majority_baseline=100 * base["OA"])
            per_class = {f"IoU/{c}": 100 * v for c, v in zip(classes, m["IoU"].tolist()) if not math.isnan(v)}
        else:
            log("\n" + format_ap_table(r["ap"]))
            results = {"mAP": 100 * r["ap"]["mAP"], "mAP_with_gt": 100 * r["ap"]["mAP_with_gt"]}
            per_class = {f"AP/{c}": 100 * v["ap"] for c, v in r["ap"]["classes"].items() if not math.isnan(v["ap"])}
        results["eval_seconds"] = time.time() - t0
        return results, per_class

    # --- the trainer's hooks -------------------------------------------------------------------
    def after_training(self, run, tb, records) -> None:
        """Evaluate the trained model (its checkpoint is on disk already) and record the metrics."""
        results, per_class = self.scores(self.val_set, self.classes, self.counts)
        results = {"final_loss": sum(self.recent_losses) / max(len(self.recent_losses), 1), **results}  # the run's, across resumes
        log(" ".join(f"{k} {v:.2f}" for k, v in results.items()))
        tb.add(self.step, **results)
        run.log_many([(k, v, None, self.tags()) for k, v in {**results, **per_class}.items()])
        self.results = {**results, **per_class}
        if self.config.out and dist.get_rank() == 0:
            path = Path(self.config.out) / "metrics.json"
            path.write_text(json.dumps({**self.results, "init": self.init, "preset": self.cfg.name, "steps": self.step,
                                        "train_fraction": self.args.train_fraction, "layout": self.layout.as_dict()}, indent=1))
            log(f"wrote {path}")

    def tb_prefix(self) -> str:
        return f"finetune_{self.task}"

    def tags(self) -> dict:
        """The metrics' tags: the benchmark, the data fraction, and the pretraining they start from."""
        return dict(dataset=self.args.dataset, task=self.task, init=self.init, train_fraction=self.args.train_fraction,
                    **self.pretraining)

    def options(self) -> dict:
        """The command's options as given (what the store's config and the checkpoint keep)."""
        return {k: v for k, v in vars(self.args).items() if k not in ("func", "command_argv")}

    def run_fields(self) -> dict:
        return dict(preset=self.cfg.name, params=param_count(self.cfg, "encoder"), config={**self.options(), "pretrain": self.pretraining})

    def checkpoint_meta(self) -> dict:
        """What rebuilds this model from its checkpoint alone (`rsscale evaluate`, `rsscale predict`)."""
        return {"finetune": {"task": self.task, "classes": self.classes, "init": self.init, "args": self.options()}}

    def _claim(self) -> None:
        if self.config.out:
            super()._claim()
        else:  # no --out: nothing is saved, nothing to lock
            self._lock = False

    def save(self):
        return super().save() if self.config.out else None


def majority_baseline(train_counts: torch.Tensor, val_counts: torch.Tensor, class_names) -> dict:
    """mIoU/OA of predicting the most frequent training class everywhere: what 'learned' must beat.
    From the class pixel counts of the data check: every val pixel of class t is predicted argmax."""
    metric = SegMetric(len(class_names), D.IGNORE_INDEX, class_names)
    metric.confusion[:, int(train_counts.argmax())] = val_counts
    return metric.compute()


def pretraining_identity(path: str | None) -> dict:
    """What names the pretraining a fine-tune starts from (nothing without --checkpoint): its
    checkpoint, steps, images seen and training compute (the MAE step FLOPs the report uses), so
    downstream accuracy joins pretraining compute in the store without hand joining."""
    if not path:
        return {}
    from rsscale.scaling.spec.config import mae_step_flops

    folder, index = checkpoint.read_index(path)
    steps, batch = int(index["trainer"]["step"]), int(index["layout"]["global_batch"])
    return {"pretrain_checkpoint": os.path.abspath(folder), "pretrain_steps": steps, "pretrain_images": steps * batch,
            "pretrain_flops": float(steps * batch * mae_step_flops(ViTConfig(**index["model"])))}


def load_config(args) -> ViTConfig:
    """The encoder's ViTConfig (from the checkpoint's index, without loading its tensors)."""
    if args.checkpoint:
        from rsscale.scaling.train.checkpoint import read_index

        return ViTConfig(**read_index(args.checkpoint)[1]["model"])
    return get_preset(args.model)


def vitdet_options(args) -> dict:
    """The ViTDet backbone options of the command line (each defaults to ViTDet's choice)."""
    return dict(rel_pos=args.rel_pos, drop_path_per_sublayer=args.drop_path_mode == "sublayer",
                global_blocks=None if args.global_blocks is None else tuple(int(i) for i in args.global_blocks.split(",") if i))


def val_subset(val_set, limit: int | None):
    """The first `limit` validation images (--max-eval-images; 0 or None: all)."""
    return torch.utils.data.Subset(val_set, range(min(limit, len(val_set)))) if limit else val_set


def train_subset(train_set, fraction: float, seed: int):
    """The first ceil(fraction * N) images of a fixed seeded permutation: nested (the 5 % subset
    is part of the 10 % one), the same on every rank and run."""
    if fraction >= 1.0:
        return train_set
    order = list(range(len(train_set)))
    random.Random(seed).shuffle(order)
    return torch.utils.data.Subset(train_set, sorted(order[:max(1, math.ceil(fraction * len(order)))]))


def run_finetune(args, started=lambda trainer: trainer) -> dict:
    """The whole command on one rank: checks, groups, data check, model, then the trainer's loop
    (checkpoints, --resume, store, evaluation at the end). Returns the metrics ({} when a resumed
    run had nothing left to do). `started` receives the trainer (run_rank's interrupt line)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if not 0.0 < args.train_fraction <= 1.0:
        raise ValueError(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    if args.resume and not args.out:
        raise ValueError("--resume continues the run in --out: give its --out")
    cfg = load_config(args)
    layout, device = start_groups(args, cfg, world)
    if dist.get_rank() == 0:  # the synthetic set is written once, before anyone reads it
        build_datasets(args.task, args.dataset, args.data, (args.synthetic_count,) * 2)
    dist.barrier()
    train_set, val_set, classes = build_datasets(args.task, args.dataset, args.data, (args.synthetic_count,) * 2)
    val_set = val_subset(val_set, args.max_eval_images)
    counts = check_data({"train": train_set, "val": val_set}, args.task, classes, cfg.in_chans)
    train_set = train_subset(train_set, args.train_fraction, args.subset_seed)
    model, cfg, init = build_model(args.task, args, len(classes), sequence_parallel=layout.sp)
    model = model.to(device)
    steps = args.steps or args.epochs * math.ceil(len(train_set) / layout.global_batch)
    log(f"task {args.task} on {args.dataset}: {len(train_set)} train ({100 * args.train_fraction:g} %) / {len(val_set)} val images, "
        f"{len(classes)} classes; {cfg.name} encoder {param_count(cfg, 'encoder'):,} params, model {sum(p.numel() for p in model.parameters()):,} "
        f"(this rank); layout {layout}, {args.precision}, {device}; {steps} steps" + ("" if args.out else "; no --out: nothing is saved"))
    tuner = started(Finetuner(args, layout, model, train_set, device, steps=steps, classes=classes, init=init))
    tuner.val_set, tuner.counts = val_set, counts
    tuner.fit()
    return tuner.results


def start_groups(args, cfg: ViTConfig, world: int) -> tuple[Layout, torch.device]:
    """The TP x DP layout of `args` checked, and the precision, before any process group exists
    (no hangs), then the groups and this rank's device (fine-tuning, evaluate, predict)."""
    layout = layout_from_args(args, world)
    check_layout(layout, cfg, world)
    check_precision(args.precision)
    state.init_parallel(layout.tp, 1, layout.dp, seed=args.seed, timeout_s=args.timeout)
    return layout, rank_device()


def protocol_options(args) -> dict:
    """detect_images' split of `--protocol`: DOTA's rates, overlap ratio and flips on --crop-sized
    patches (the model's input size); {} for the training crops' split."""
    if args.protocol == "crop":
        return {}
    p = PROTOCOLS[args.protocol]
    return dict(rates=p["rates"], overlap=args.crop * p["overlap"] // p["patch"], flips=("h", "v") if args.protocol == "dota-ms" else ())


def run_options(run: str, **overrides):
    """(args, encoder ViTConfig, checkpoint folder, index) of a fine-tuning run's newest complete
    checkpoint (or the step folder given): the options the run recorded there, with `overrides`."""
    folder, index = checkpoint.read_index(run)
    saved = index.get("finetune")
    if not saved:
        raise ValueError(f"{os.path.join(folder, 'index.json')}: not a fine-tuning checkpoint (no 'finetune' entry: a pretraining "
                         "checkpoint, or a run written before fine-tuning runs kept what rebuilds their model); fine-tune it again")
    known = vars(finetune_args(saved["task"]))
    options = {k: v for k, v in saved["args"].items() if k in known and k != "task"}  # options a later version dropped are ignored
    args = finetune_args(saved["task"], **{**options, **overrides, "checkpoint": None, "resume": False, "out": None, "save_every": 0})
    return args, ViTConfig(**index["model"]), folder, index


def run_layout(run: str, world: int, **overrides) -> tuple[Layout, ViTConfig]:
    """The layout a command on `world` processes gives a run's model (checked before launching)."""
    args, cfg, _, _ = run_options(run, **overrides)
    return layout_from_args(args, world), cfg


def restore(run: str, world: int, **overrides) -> tuple[Finetuner, dict]:
    """A Finetuner holding the weights of a fine-tuning run's checkpoint (`run_options`), in any
    TP x DP layout, each rank reading only its slices. Creates the process groups. Returns it and
    the checkpoint's index."""
    args, cfg, folder, index = run_options(run, **overrides)
    saved = index["finetune"]
    layout, device = start_groups(args, cfg, world)
    model, _, _ = build_model(saved["task"], args, len(saved["classes"]), sequence_parallel=layout.sp, encoder=cfg)
    tuner = Finetuner(args, layout, model.to(device), None, device, steps=index["trainer"]["step"], classes=saved["classes"], init=saved["init"])
    tuner.load(folder, weights_only=True)
    tuner.step = int(index["trainer"]["step"])
    log(f"{saved['task']} model of {folder} (step {tuner.step}, {cfg.name} encoder, {len(saved['classes'])} classes); layout {layout}")
    return tuner, index


def add_arguments(parser) -> None:
    parser.add_argument("--task", choices=sorted(TASKS), required=True, help="seg (UperNet) or det (see --detector)")
    parser.add_argument("--detector", choices=["orcnn", "fcos"], default="orcnn",
                        help="det: Oriented R-CNN (two-stage, as published RS tables) or rotated FCOS (one-stage)")
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--data", default="data/synthetic", help="dataset root in its native layout (see module doc)")
    parser.add_argument("--checkpoint", help="pretraining checkpoint (run folder or step folder); random init if absent")
    parser.add_argument("--model", default="tiny", help="preset when no --checkpoint is given (rsscale models)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training images (one crop each)")
    add_layout_arguments(parser)  # --tp --dp --sp --micro-batch --global-batch (default 8; micro = global / dp)
    add_launch_arguments(parser)  # --nproc ...: relaunch under torchrun
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="autocast dtype (fp16 with dynamic loss scaling, CUDA only); weights and optimizer stay fp32")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward pass")
    parser.add_argument("--distributed-optimizer", action="store_true", help="shard the AdamW state over DP ranks (ZeRO-1)")
    parser.add_argument("--crop", type=int, default=128, help="training crop / eval window (multiple of 2 x patch)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay (1 = none)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=50, help="warmup steps (at most a fifth of the run)")
    parser.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip over all model-parallel ranks (0: off)")
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--drop-path-mode", choices=["sublayer", "block"], default="sublayer",
                        help="stochastic depth per sublayer (ViTDet) or per whole block")
    parser.add_argument("--rel-pos", action=argparse.BooleanOptionalAction, default=True,
                        help="ViTDet's decomposed relative position bias in attention (--no-rel-pos: none)")
    parser.add_argument("--global-blocks", help="comma list of global-attention block indices (default: ViTDet's, 2,5,8,11 for 12 blocks)")
    parser.add_argument("--window", type=int, default=4, help="window attention size in tokens")
    parser.add_argument("--channels", type=int, default=32, help="pyramid and head channels")
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="train on this fraction of the training images (nested seeded subsets; recorded in the store)")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the --train-fraction subsets (fixed across fractions)")
    parser.add_argument("--max-eval-images", type=int, default=0, help="evaluate on at most this many val images (0: all)")
    parser.add_argument("--score-thr", type=float, default=0.05, help="detection: drop boxes scoring below this before merging")
    parser.add_argument("--max-per-image", type=int, default=2000, help="detection: keep at most this many boxes per patch and per image")
    parser.add_argument("--protocol", choices=sorted(PROTOCOL_CHOICES), default="crop",
                        help="detection evaluation: crop-sized patches as trained (crop), or DOTA's split at rate 1 (dota-ss) or "
                        "rates 0.5/1.0/1.5 with h+v flip TTA (dota-ms); patches of --crop px, DOTA's overlap ratio")
    parser.add_argument("--tie-order", choices=TIE_ORDERS, default="devkit",
                        help="DOTA AP: order of equal scores (the official devkit's np.argsort, or stable)")
    parser.add_argument("--synthetic-count", type=int, default=64, help="seg/det tiles when writing the synthetic set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--tensorboard", default=None, help="write TensorBoard scalars (loss and its parts, lr, grad norm, img/s, memory, metrics) here")
    parser.add_argument("--out", help="run folder: checkpoints/ (model, optimizer, data position; the model of evaluate/predict) "
                        "and metrics.json; without it nothing is saved")
    parser.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    parser.add_argument("--keep", type=int, default=0, help="keep only the N newest checkpoints (0: all)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest complete checkpoint")
    parser.add_argument("--allow-schedule-change", action="store_true",
                        help="with --resume: accept --steps/--lr/--warmup other than the checkpoint's run had")
    parser.add_argument("--overwrite", action="store_true", help="start over in an --out folder that holds checkpoints (deletes them)")
    parser.add_argument("--timeout", type=float, default=300.0, help="process-group timeout in seconds (a dead peer fails the step)")
    parser.add_argument("--results", help="results store (default $RSSCALE_RESULTS or reports/results.db)")


def finetune_args(task: str, **overrides) -> argparse.Namespace:
    """The `rsscale finetune --task TASK --dataset synthetic` defaults with `overrides` (attribute
    names), e.g. for building a run's model and optimizer outside the command (benchmarks/prediction/count.py)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--task", task, "--dataset", "synthetic"])
    layout_flags = {f.name for f in dataclasses.fields(Layout)}  # absent unless given (layout_from_args's defaults)
    unknown = set(overrides) - set(vars(args)) - layout_flags
    if unknown:
        raise ValueError(f"not options of rsscale finetune: {', '.join(sorted(unknown))}")
    vars(args).update(overrides)
    return args


NUMBER_RULES = {"--steps": dict(ge=1), "--epochs": dict(ge=1), "--global-batch": dict(ge=1), "--micro-batch": dict(ge=1), "--crop": dict(ge=1), "--lr": dict(gt=0),
                "--layer-decay": dict(gt=0, le=1), "--weight-decay": dict(ge=0), "--warmup": dict(ge=0), "--clip-grad": dict(gt=0),
                "--drop-path": dict(ge=0, lt=1), "--window": dict(ge=1), "--channels": dict(ge=1), "--max-eval-images": dict(ge=0),
                "--synthetic-count": dict(ge=1), "--seed": dict(ge=0), "--log-every": dict(ge=1),
                "--save-every": dict(ge=0), "--keep": dict(ge=0), "--timeout": dict(gt=0)}


def check_args(args) -> None:
    """One-line ValueError naming the first flag whose value makes no sense."""
    check_numbers(NUMBER_RULES, lambda flag: getattr(args, flag[2:].replace("-", "_"), None))


def main(args) -> int:
    check_args(args)
    if wants_launch(args):
        check_precision(args.precision)
        return relaunch_checked("finetune", args, lambda world: (layout_from_args(args, world), load_config(args)))
    return run_rank("finetune", lambda started: run_finetune(args, started))
