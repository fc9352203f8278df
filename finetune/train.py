"""`rsscale finetune`: fine-tune a (MAE-pretrained) encoder, ViTDet-adapted, for semantic
segmentation (UperNet) or rotated detection (rotated FCOS), evaluate, and record the metrics in
the results store (kind="finetune", params = encoder parameters) so the scaling report can set
downstream accuracy against model size.

    rsscale finetune --task seg --dataset synthetic --data data/synthetic --checkpoint runs/tiny \
        --steps 300 --crop 128 --lr 1e-3 --layer-decay 0.75 --out runs/ft-seg --results reports/results.db

Data layouts (--data DIR):
  synthetic  a dataset `rsscale data` wrote: seg/{Train,Val}/{Urban,Rural}, det/{train,val}/{images,labelTxt};
             the bundled one is written only into a missing or empty DIR (never beside other files)
  loveda     DIR/{Train,Val}/{Urban,Rural}/{images_png,masks_png}
  potsdam    DIR/{train,val}/{images,labels} (tiles *_RGB.* with *_label.*; colour or index labels)
  dota       DIR/{train,val}/{images,labelTxt}; split big images first (python -m rsscale.finetune.datasets)
  diorr      DIR/{train,val}/{images,annotations} (JPEG + oriented-box XML)
Training samples are random crop x crop windows (random flips); evaluation slides crop-sized
windows over whole tiles (segmentation) or cuts DOTA-style overlapping patches (detection).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rsscale import kernels
from rsscale.scaling.store import ResultsStore
from rsscale.finetune import datasets as D
from rsscale.finetune.checks import check_data
from rsscale.finetune.det import RotatedFCOS, detect_images
from rsscale.finetune.orcnn import OrientedRCNN
from rsscale.finetune.metrics import TIE_ORDERS, SegMetric, evaluate_dota, format_ap_table
from rsscale.finetune.rotated import norm_obb
from rsscale.finetune.seg import Segmenter, evaluate_seg
from rsscale.finetune.vitdet import ViTDetBackbone, load_pretrained, param_groups_lrd
from rsscale.scaling.config import ViTConfig, get_preset, param_count
from rsscale.scaling.config_file import check_numbers
from rsscale.scaling.log import ScalarWriter, peak_memory_bytes
from rsscale.scaling.data import default_stats
from rsscale.scaling.launch import add_launch_arguments, wants_launch
from rsscale.scaling.layout import Layout, add_layout_arguments, check_layout, derive_dp, relaunch_checked
from rsscale.scaling.optim import FlatAdamW, LossScaler, lr_at
from rsscale.scaling.parallel import state
from rsscale.scaling.store import NullRun

TASKS = {"seg": ("loveda", "potsdam", "synthetic"), "det": ("dota", "diorr", "synthetic")}


log = logging.getLogger(__name__)


def say(msg: str) -> None:
    """Progress, from global rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info("[finetune] %s", msg)


# ------------------------------------------------------------------------------------ data
def build_datasets(task: str, dataset: str, data: str, synthetic_counts=(64, 64)):
    """(train, val, class names) for a task and a benchmark in its native layout (module doc)."""
    if dataset not in TASKS[task]:
        raise ValueError(f"dataset {dataset!r} is not a {task} benchmark; choose one of {', '.join(TASKS[task])}")
    root = Path(data)
    if dataset == "synthetic":
        from rsscale.scaling.synthetic import DET_CLASSES, dataset_for

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
def build_model(task: str, args, num_classes: int, sequence_parallel: bool = False, config=None):
    """(model, ViTConfig, init description). The preset comes from the checkpoint if given.
    Every rank builds it from the same seed (TP ranks keep their slices). `config`: the megatron
    ModelParallelConfig of the blocks (default: the initialized world's)."""
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
                              out_channels=args.channels, activation_checkpointing=args.activation_checkpointing,
                              sequence_parallel=sequence_parallel, config=config, **vitdet_options(args))
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


def check_precision(precision: str) -> None:
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--precision fp16 (autocast + loss scaling) needs CUDA; on CPU only fp32 and bf16 run")


# ------------------------------------------------------------------------------------ one rank
class Finetuner:
    """One rank's share of a fine-tuning run under a TP x DP layout.

    Every optimizer step takes the global batch of samples 0..G-1 (sample g of step s is drawn from
    its own generator seeded by (seed, s, g)); DP rank d trains samples [d*G/D, (d+1)*G/D) in
    micro-batches. Only the first rank of a TP group reads them; it broadcasts each micro-batch to
    its TP peers, so a TP group always computes on identical data. Losses are sums divided by
    normalizers counted over the whole global batch (valid pixels; positives), so the summed
    data-parallel gradient equals the one-process gradient of the same global batch.
    """

    def __init__(self, args, layout: Layout, model, train_set, device):
        self.args, self.layout, self.model, self.train_set, self.device = args, layout, model, train_set, device
        self.task = "seg" if isinstance(model, Segmenter) else "det"
        self.normalize = Normalize(model.backbone.cfg.in_chans)
        groups = param_groups_lrd(model, model.backbone.cfg.depth, args.weight_decay, args.layer_decay)
        zero = args.distributed_optimizer and layout.dp > 1
        self.optimizer = FlatAdamW(model.named_parameters(), betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                   shards=layout.dp if zero else 1, shard_rank=state.dp_rank() if zero else 0,
                                   group=state.dp_group(), dp_size=layout.dp, lr_scales={n: g["lr_scale"] for g in groups for n in g["names"]},
                                   bucket_mb=25.0, overlap=True, counted=lambda n, p: state.is_tp_sharded(p) or state.tp_rank() == 0)
        self.scaler = LossScaler(enabled=args.precision == "fp16")
        self.step = 0
        torch.manual_seed(args.seed + 1 + state.dp_rank())  # drop-path masks: equal within a TP group

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.args.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    # --- data ----------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list:
        L = self.layout
        per_rank = L.global_batch // L.dp
        first = state.dp_rank() * per_rank
        out = []
        for m in range(per_rank // L.micro_batch):
            lo = first + m * L.micro_batch
            batch = ([draw_sample(self.task, self.train_set, self.args.crop, self.normalize, self.args.seed, step, g)
                      for g in range(lo, lo + L.micro_batch)] if state.tp_rank() == 0 else None)
            out.append(self._broadcast_in_tp_group(batch))
        return out

    def _broadcast_in_tp_group(self, batch):
        """(images on the device, targets) of TP rank 0, on every rank of the TP group."""
        L, crop, chans = self.layout, self.args.crop, self.model.backbone.cfg.in_chans
        if batch is not None:
            imgs, targets = zip(*batch)
            imgs = torch.stack(imgs).to(self.device)
            targets = torch.stack(targets).to(self.device) if self.task == "seg" else list(targets)
        if L.tp == 1:
            return imgs, targets
        src, group = dist.get_global_rank(state.tp_group(), 0), state.tp_group()
        if batch is None:
            imgs = torch.empty(L.micro_batch, chans, crop, crop, device=self.device)
            targets = torch.empty(L.micro_batch, crop, crop, dtype=torch.int64, device=self.device) if self.task == "seg" else None
        dist.broadcast(imgs, src, group=group)
        if self.task == "seg":
            dist.broadcast(targets, src, group=group)
        else:
            box = [targets]
            dist.broadcast_object_list(box, src, group=group)
            targets = box[0]
        return imgs, targets

    # --- one optimizer step --------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns loss (whole global batch), loss parts,
        lr and the global gradient norm (before clipping), equal on every rank."""
        L, args, model = self.layout, self.args, self.model
        model.train()
        micro = self.micro_batches(self.step)
        prepared = [model.prepare(t, imgs.shape[-2:]) for imgs, t in micro]
        norms = sum(model.normalizers(p) for p in prepared).to(self.device)
        if L.dp > 1:
            dist.all_reduce(norms, group=state.dp_group())  # normalizers of the whole global batch
        self.optimizer.zero_grad(len(micro))  # DP buckets are reduced during the last micro-batch's backward
        parts = None
        for (imgs, _), prep in zip(micro, prepared):
            with self.autocast():
                losses = model.loss_from(model(imgs), prep, norms)
            (losses["total"] * (L.dp * self.scaler.scale)).backward()  # x dp: the DP all-reduce averages
            values = torch.stack([v.detach().float() for v in losses.values()])
            parts = values if parts is None else parts + values
        self.optimizer.finish_grad_sync()  # before any other DP collective: bucket order is the same on every rank
        if L.dp > 1:
            dist.all_reduce(parts, group=state.dp_group())
        finite = self.scaler.unscale_and_check(self.optimizer.grad)
        grad_norm = self.optimizer.clip_grad_norm_(args.clip_grad, group=state.tp_group())
        lr = lr_at(self.step, args.lr, self.warmup, self.steps)
        if finite:
            self.optimizer.step(lr)
        self.step += 1
        out = dict(zip(losses, parts.tolist()))
        return {"loss": out.pop("total"), "parts": out, "lr": lr, "grad_norm": grad_norm, "skipped": not finite}

    def fit(self, steps: int, log_metric=None, tb: ScalarWriter | None = None) -> list[float]:
        """`steps` optimizer steps (linear warmup + cosine); progress every --log-every steps;
        per-step scalars into the TensorBoard writer `tb` when given."""
        self.steps, self.warmup = steps, min(self.args.warmup, max(steps // 5, 1))
        t0, history, every = time.time(), [], self.args.log_every
        for step in range(steps):
            r = self.train_step()
            history.append(r["loss"])
            if log_metric:
                log_metric("loss", r["loss"], step=step)
            if tb is not None:
                tb.add(step + 1, loss=r["loss"], lr=r["lr"], grad_norm=r["grad_norm"], **r["parts"],
                       images_per_s=(step + 1) * self.layout.global_batch / max(time.time() - t0, 1e-9),
                       peak_memory_bytes=peak_memory_bytes(self.device))
            if (step + 1) % every == 0 or step + 1 == steps:
                dt = time.time() - t0
                extra = " ".join(f"{k} {v:.3f}" for k, v in r["parts"].items())
                say(f"step {step + 1}/{steps} loss {sum(history[-every:]) / len(history[-every:]):.4f} {extra} "
                    f"lr {r['lr']:.2e} grad norm {r['grad_norm']:.3f}{' (skipped: overflow)' if r['skipped'] else ''} | "
                    f"{(step + 1) * self.layout.global_batch / dt:.1f} img/s, {dt:.0f} s")
        return history

    # --- evaluation: each DP replica takes every D-th image; metric state is reduced over DP ------
    def evaluate(self, val_set, classes) -> dict:
        args, L = self.args, self.layout
        indices = range(state.dp_rank(), len(val_set), L.dp)
        with self.autocast():
            if self.task == "seg":
                metric = evaluate_seg(self.model, val_set, args.crop, classes, self.normalize, indices=indices)
                if L.dp > 1:
                    cm = metric.confusion.to(self.device)
                    dist.all_reduce(cm, group=state.dp_group())
                    metric.confusion = cm.cpu()
                return {"metric": metric}
            dets, gts = detect_images(self.model, val_set, args.crop, classes, self.normalize, indices=indices,
                                      score_thr=args.score_thr, max_per_image=args.max_per_image)
        if L.dp > 1:
            gathered = [None] * L.dp
            dist.all_gather_object(gathered, (dets, gts), group=state.dp_group())
            dets = {c: [row for d, _ in gathered for row in d[c]] for c in classes}
            gts = {k: v for _, g in gathered for k, v in g.items()}
        return {"ap": evaluate_dota(dets, gts, classes=list(classes), tie_order=args.tie_order)}

    def save(self, out: Path, cfg, classes) -> list[Path]:
        """Each TP rank of DP replica 0 writes its own slice (safetensors); rank 0 the description."""
        from safetensors.torch import save_file

        if state.dp_rank() != 0:
            return []
        out.mkdir(parents=True, exist_ok=True)
        T = self.layout.tp
        path = out / ("model.safetensors" if T == 1 else f"model-tp{state.tp_rank()}-of-{T}.safetensors")
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items() if v is not None}
        save_file(tensors, str(path))
        if state.tp_rank() == 0:
            (out / "model.json").write_text(json.dumps({"vit_config": vars(cfg), "task": self.task, "classes": list(classes),
                                                         "tp": T, "files": [f"model-tp{r}-of-{T}.safetensors" for r in range(T)]
                                                         if T > 1 else ["model.safetensors"]}, indent=1))
        return [path]


def majority_baseline(train_counts: torch.Tensor, val_counts: torch.Tensor, class_names) -> dict:
    """mIoU/OA of predicting the most frequent training class everywhere: what 'learned' must beat.
    From the class pixel counts of the data check: every val pixel of class t is predicted argmax."""
    metric = SegMetric(len(class_names), D.IGNORE_INDEX, class_names)
    metric.confusion[:, int(train_counts.argmax())] = val_counts
    return metric.compute()


@contextlib.contextmanager
def _no_store_run(**_):
    """What ranks other than 0 record: nothing (only rank 0 opens the store)."""
    yield NullRun()


def load_config(args) -> ViTConfig:
    """The encoder's ViTConfig (from the checkpoint's index, without loading its tensors)."""
    if args.checkpoint:
        from rsscale.scaling.checkpoint import read_index

        return ViTConfig(**read_index(args.checkpoint)[1]["model"])
    return get_preset(args.model)


def vitdet_options(args) -> dict:
    """The ViTDet backbone options of the command line (each defaults to ViTDet's choice)."""
    return dict(rel_pos=args.rel_pos, drop_path_per_sublayer=args.drop_path_mode == "sublayer",
                global_blocks=None if args.global_blocks is None else tuple(int(i) for i in args.global_blocks.split(",") if i))


def train_subset(train_set, fraction: float, seed: int):
    """The first ceil(fraction * N) images of a fixed seeded permutation: nested (the 5 % subset
    is part of the 10 % one), the same on every rank and run."""
    if fraction >= 1.0:
        return train_set
    order = list(range(len(train_set)))
    random.Random(seed).shuffle(order)
    return torch.utils.data.Subset(train_set, sorted(order[:max(1, math.ceil(fraction * len(order)))]))


def run_finetune(args) -> dict:
    """The whole command on one rank: layout check, groups, data check, model, training, model
    file, distributed evaluation, store records (rank 0). Returns the metrics."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_precision(args.precision)
    for flag in ("steps", "log_every", "global_batch", "crop"):
        if getattr(args, flag, 1) is not None and getattr(args, flag, 1) < (0 if flag == "steps" else 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'steps' else 1}, got {getattr(args, flag)}")
    if not 0.0 < args.train_fraction <= 1.0:
        raise ValueError(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    cfg = load_config(args)
    layout = layout_from_args(args, world)
    check_layout(layout, cfg, world)  # before any process group exists: no hangs
    state.init_parallel(layout.tp, 1, layout.dp, seed=args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if dist.get_rank() == 0:  # the synthetic set is written once, before anyone reads it
        build_datasets(args.task, args.dataset, args.data, (args.synthetic_count,) * 2)
    dist.barrier()
    train_set, val_set, classes = build_datasets(args.task, args.dataset, args.data, (args.synthetic_count,) * 2)
    if args.max_eval_images:
        val_set = torch.utils.data.Subset(val_set, range(min(args.max_eval_images, len(val_set))))
    counts = check_data({"train": train_set, "val": val_set}, args.task, classes, cfg.in_chans)
    train_set = train_subset(train_set, args.train_fraction, args.subset_seed)
    model, cfg, init = build_model(args.task, args, len(classes), sequence_parallel=layout.sp)
    model = model.to(device)
    steps = args.steps or args.epochs * math.ceil(len(train_set) / layout.global_batch)
    n_params = param_count(cfg, "encoder")
    say(f"task {args.task} on {args.dataset}: {len(train_set)} train ({100 * args.train_fraction:g} %) / {len(val_set)} val images, "
        f"{len(classes)} classes; {cfg.name} encoder {n_params:,} params, model {sum(p.numel() for p in model.parameters()):,} "
        f"(this rank); layout {layout}, {args.precision}, {device}; {steps} steps")
    tuner = Finetuner(args, layout, model, train_set, device)
    record = dist.get_rank() == 0
    tags = dict(dataset=args.dataset, task=args.task, init=init, train_fraction=args.train_fraction)
    out = Path(args.out) if args.out else None
    with (ResultsStore(args.results).run if record else _no_store_run)(
            kind="finetune", enabled=record, preset=cfg.name, params=n_params,
            layout=dict(tp=layout.tp, pp=1, dp=layout.dp, sp=layout.sp), micro_batch=layout.micro_batch,
            global_batch=layout.global_batch, precision=args.precision, kernels=kernels.get_backend(),
            config={k: v for k, v in vars(args).items() if k not in ("func", "command_argv")}) as run, \
            ScalarWriter(args.tensorboard, prefix=f"finetune_{args.task}") as tb:
        curve = []
        history = tuner.fit(steps, log_metric=lambda n, v, step: curve.append((n, v, step, tags)), tb=tb)
        run.log_many(curve)
        if out:  # the model is on disk before evaluation starts
            for path in tuner.save(out, cfg, classes):
                say(f"wrote {path}")
        t0 = time.time()
        r = tuner.evaluate(val_set, classes)
        eval_s = time.time() - t0
        if args.task == "seg":
            metric = r["metric"]
            m = metric.compute()
            base = majority_baseline(counts["train"], counts["val"], classes)
            say("\n" + metric.table())
            results = {"mIoU": 100 * m["mIoU"], "OA": 100 * m["OA"], "mF1": 100 * m["mF1"], "mAcc": 100 * m["mAcc"],
                       "mIoU_majority_baseline": 100 * base["mIoU"], "OA_majority_baseline": 100 * base["OA"]}
            per_class = {f"IoU/{c}": 100 * v for c, v in zip(classes, m["IoU"].tolist()) if not math.isnan(v)}
        else:
            say("\n" + format_ap_table(r["ap"]))
            results = {"mAP": 100 * r["ap"]["mAP"], "mAP_with_gt": 100 * r["ap"]["mAP_with_gt"]}
            per_class = {f"AP/{c}": 100 * v["ap"] for c, v in r["ap"]["classes"].items() if not math.isnan(v["ap"])}
        results["final_loss"] = sum(history[-10:]) / max(len(history[-10:]), 1)
        results["eval_seconds"] = eval_s
        say(" ".join(f"{k} {v:.2f}" for k, v in results.items()))
        tb.add(steps, **results)
        run.log_many([(k, v, None, tags) for k, v in {**results, **per_class}.items()])
    if out and dist.get_rank() == 0:
        (out / "metrics.json").write_text(json.dumps({**results, **per_class, "init": init, "preset": cfg.name, "steps": steps,
                                                      "train_fraction": args.train_fraction, "layout": layout.as_dict()}, indent=1))
        say(f"wrote {out / 'metrics.json'}")
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
    parser.add_argument("--tie-order", choices=TIE_ORDERS, default="devkit",
                        help="DOTA AP: order of equal scores (the official devkit's np.argsort, or stable)")
    parser.add_argument("--synthetic-count", type=int, default=64, help="seg/det tiles when writing the synthetic set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--tensorboard", default=None, help="write TensorBoard scalars (loss and its parts, lr, grad norm, img/s, memory, metrics) here")
    parser.add_argument("--out", help="folder for the model (safetensors, one file per TP rank), model.json and metrics.json")
    parser.add_argument("--results", help="results store (default $RSSCALE_RESULTS or reports/results.db)")


def finetune_args(task: str, **overrides) -> argparse.Namespace:
    """The `rsscale finetune --task TASK --dataset synthetic` defaults with `overrides` (attribute
    names), e.g. for building a run's model and optimizer outside the command (benchmarks/count.py)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--task", task, "--dataset", "synthetic"])
    unknown = set(overrides) - set(vars(args))
    if unknown:
        raise ValueError(f"not options of rsscale finetune: {', '.join(sorted(unknown))}")
    vars(args).update(overrides)
    return args


NUMBER_RULES = {"--steps": dict(ge=1), "--epochs": dict(ge=1), "--global-batch": dict(ge=1), "--micro-batch": dict(ge=1), "--crop": dict(ge=1), "--lr": dict(gt=0),
                "--layer-decay": dict(gt=0, le=1), "--weight-decay": dict(ge=0), "--warmup": dict(ge=0), "--clip-grad": dict(gt=0),
                "--drop-path": dict(ge=0, lt=1), "--window": dict(ge=1), "--channels": dict(ge=1), "--max-eval-images": dict(ge=0),
                "--synthetic-count": dict(ge=1), "--seed": dict(ge=0), "--log-every": dict(ge=1)}


def check_args(args) -> None:
    """One-line ValueError naming the first flag whose value makes no sense."""
    check_numbers(NUMBER_RULES, lambda flag: getattr(args, flag[2:].replace("-", "_"), None))


def main(args) -> int:
    check_args(args)
    if wants_launch(args):
        check_precision(args.precision)
        return relaunch_checked("finetune", args, lambda world: (layout_from_args(args, world), load_config(args)))
    try:
        run_finetune(args)
    finally:
        state.destroy_parallel()
    return 0
