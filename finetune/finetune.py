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
from rsscale.scaling.runtime.launch import add_launch_arguments, wants_launch
from rsscale.scaling.runtime.log import reset_peak_memory
from rsscale.scaling.runtime.options import add_options, as_config, build, check, leaves, option, resolve, section
from rsscale.scaling.spec.config import ViTConfig, get_preset, param_count
from rsscale.scaling.spec.layout import Layout, check_layout, derive_dp, relaunch_checked
from rsscale.scaling.spec.run import PRECISIONS, Checkpointing, Compute, DataParallel, OptimConfig, Recording
from rsscale.scaling.train import checkpoint
from rsscale.scaling.train.pretrain import TrainConfig, Trainer, check_precision, log, rank_device, run_rank

TASKS = {"seg": ("loveda", "potsdam", "synthetic"), "det": ("dota", "diorr", "synthetic")}
DATASETS = ("loveda", "potsdam", "dota", "diorr", "synthetic")
PROTOCOL_CHOICES = ("crop", "dota-ss", "dota-ms")


# ------------------------------------------------------------------------------------ options
@dataclasses.dataclass
class FinetuneConfig:
    """Every option of `rsscale finetune`; its flags, --config file and --print-config come from these fields."""
    task: str | None = option(None, "seg (UperNet) or det (see --detector)", required=True, choices=sorted(TASKS))
    detector: str = option("orcnn", "det: Oriented R-CNN (two-stage, as published RS tables) or rotated FCOS (one-stage)",
                           choices=("orcnn", "fcos"))
    dataset: str | None = option(None, "the benchmark: its layout under --data (see the module doc)", required=True, choices=DATASETS)
    data: str = option("data/synthetic", "dataset root in its native layout (see module doc)")
    checkpoint: str | None = option(None, "pretraining checkpoint (run folder or step folder); random init if absent")
    model: str = option("tiny", "preset when no --checkpoint is given (rsscale models)")
    steps: int | None = option(None, "optimizer steps (default: from --epochs)", ge=1)
    epochs: int = option(10, "passes over the training images (one crop each)", ge=1)
    parallel: Layout = section(Layout, dp=None, micro_batch=None)  # TP x DP (--pp, --vpp refused); None: from the world (fill_layout)
    precision: str = option("fp32", "autocast dtype (fp16 with dynamic loss scaling, CUDA only); weights and optimizer stay fp32",
                            choices=PRECISIONS)  # not the shared Compute's precision (16-bit weights there)
    activation_checkpointing: bool = option(False, "recompute each block in the backward pass")
    data_parallel: DataParallel = section(DataParallel)  # ZeRO-1, buckets, overlap; --fsdp refused (the Finetuner does not shard)
    crop: int = option(128, "training crop / eval window (multiple of 2 x patch)", ge=1)
    optim: OptimConfig = section(OptimConfig, lr=1e-3, warmup=50, beta2=0.999)  # the run's warmup is capped at a fifth of it
    layer_decay: float = option(0.75, "layer-wise lr decay (1 = none)", gt=0, le=1)
    drop_path: float = option(0.1, ge=0, lt=1)
    drop_path_mode: str = option("sublayer", "stochastic depth per sublayer (ViTDet) or per whole block", choices=("sublayer", "block"))
    rel_pos: bool = option(True, "drop ViTDet's decomposed relative position bias from attention")
    global_blocks: str | None = option(None, "comma list of global-attention block indices (default: ViTDet's, 2,5,8,11 for 12 blocks)")
    window: int = option(4, "window attention size in tokens", ge=1)
    channels: int = option(32, "pyramid and head channels", ge=1)
    train_fraction: float = option(1.0, "train on this fraction of the training images (nested seeded subsets; recorded in the store)",
                                   gt=0, le=1)
    subset_seed: int = option(0, "seed of the --train-fraction subsets (fixed across fractions)")
    max_eval_images: int = option(0, "evaluate on at most this many val images (0: all)", ge=0)
    score_thr: float = option(0.05, "detection: drop boxes scoring below this before merging")
    max_per_image: int = option(2000, "detection: keep at most this many boxes per patch and per image")
    protocol: str = option("crop", "detection evaluation: crop-sized patches as trained (crop), or DOTA's split at rate 1 (dota-ss) or "
                           "rates 0.5/1.0/1.5 with h+v flip TTA (dota-ms); patches of --crop px, DOTA's overlap ratio",
                           choices=sorted(PROTOCOL_CHOICES))
    tie_order: str = option("devkit", "DOTA AP: order of equal scores (the official devkit's np.argsort, or stable)", choices=TIE_ORDERS)
    synthetic_count: int = option(64, "seg/det tiles when writing the synthetic set", ge=1)
    seed: int = option(0, ge=0)
    checkpointing: Checkpointing = section(Checkpointing)  # out None: a fine-tune without --out saves nothing
    timeout: float = option(300.0, "process-group timeout in seconds (a dead peer fails the step)", gt=0)
    recording: Recording = section(Recording)

    def __post_init__(self):
        check(self)
        p = self.parallel
        if p.pp != 1 or p.vpp != 1:
            raise ValueError(f"--pp {p.pp} --vpp {p.vpp}: fine-tuning runs tensor and data parallel only (use --pp 1, no --vpp)")
        if self.data_parallel.fsdp:
            raise ValueError("--fsdp: fine-tuning shards the optimizer state only (--distributed-optimizer), not the model")
        if self.checkpointing.resume and not self.checkpointing.out:
            raise ValueError("--resume continues the run in --out: give its --out")


LEAF_PATHS = {leaf.field.name: leaf.path for leaf in leaves(FinetuneConfig)}  # "tp" -> "parallel.tp": every leaf's name is unique
SECTIONS = {path.split(".")[0] for path in LEAF_PATHS.values() if "." in path}


def add_arguments(parser) -> None:
    add_options(parser, FinetuneConfig)
    add_launch_arguments(parser)  # --nproc ...: relaunch under torchrun


def fill_layout(parallel: dict, world: int | None = None) -> None:
    """Fine-tuning's layout defaults in a config tree's `parallel` section, where unset (None): --dp
    is world / tp (world: $WORLD_SIZE under torchrun, or the size about to be launched), the
    micro-batch global / dp."""
    if parallel["dp"] is None:
        parallel["dp"] = derive_dp(parallel["tp"], 1, None, world or int(os.environ.get("WORLD_SIZE", 1)))
    if parallel["micro_batch"] is None:
        parallel["micro_batch"] = max(parallel["global_batch"] // parallel["dp"], 1)


def config_from_args(args, world: int | None = None) -> FinetuneConfig:
    """Defaults <- --config file (nested like the tree) <- flags; the layout filled in for `world` (fill_layout)."""
    return resolve(FinetuneConfig, args, adjust=lambda tree, given: fill_layout(tree["parallel"], world))


def option_paths(options: dict, strict: bool = True) -> dict:
    """{dotted config key: value} of options named by their leaves' names (flat: {"tp": 2, "lr": 0.1},
    as checkpoints written before the options were a tree hold them) or nested like the tree
    ({"parallel": {"tp": 2}}; a section also as its object: parallel=Layout(...)). A name that is
    no option is a one-line ValueError (`strict`) or dropped."""
    paths = {}
    for key, value in options.items():
        if key in SECTIONS:
            paths.update({f"{key}.{k}": v for k, v in (as_config(value) if dataclasses.is_dataclass(value) else value).items()})
        else:
            paths[LEAF_PATHS.get(key, key)] = value
    unknown = sorted(set(paths) - set(LEAF_PATHS.values()))
    if unknown and strict:
        raise ValueError(f"not options of rsscale finetune: {', '.join(unknown)}")
    return {k: v for k, v in paths.items() if k not in unknown}


def options_with(paths: dict, world: int | None = None) -> FinetuneConfig:
    """The defaults with `paths` ({dotted config key: value}) set, the layout filled in for `world`."""
    tree = as_config(FinetuneConfig())
    for path, value in paths.items():
        *section_, key = path.split(".")
        (tree[section_[0]] if section_ else tree)[key] = value
    fill_layout(tree["parallel"], world)
    return build(FinetuneConfig, tree)


def finetune_options(task: str, world: int | None = None, **overrides) -> FinetuneConfig:
    """The `rsscale finetune --task TASK --dataset synthetic` options with `overrides` (option names:
    lr=..., tp=..., or a whole section: parallel=Layout(...)) on `world` processes, e.g. for building
    a run's model and optimizer outside the command (benchmarks/prediction/count.py)."""
    return options_with({"task": task, "dataset": "synthetic", **option_paths(overrides)}, world)


# ------------------------------------------------------------------------------------ data
def build_datasets(task: str, dataset: str, data: str, synthetic_counts=(64, 64)):
    """(train, val, class names) for a task and a benchmark in its native layout (module doc)."""
    if dataset not in TASKS[task]:
        raise ValueError(f"dataset {dataset!r} is not a {task} benchmark; choose one of {', '.join(TASKS[task])}")
    root = Path(data)
    if dataset == "synthetic":
        from rsscale.scaling.data.data import dataset_for
        from rsscale.scaling.data.scenes import DET_CLASSES

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
def build_model(task: str, options: FinetuneConfig, num_classes: int, sequence_parallel: bool = False, config=None, encoder: ViTConfig | None = None):
    """(model, ViTConfig, init description) of `options`. The preset comes from the checkpoint if given.
    Every rank builds it from the same seed (TP ranks keep their slices). `config`: the megatron
    ModelParallelConfig of the blocks (default: the initialized world's). `encoder`: this encoder,
    left as initialised (a fine-tuned checkpoint is loaded into it afterwards)."""
    state.ensure_initialized()
    if encoder is not None:
        cfg, weights = encoder, None
    elif options.checkpoint:
        from rsscale.scaling.train.checkpoint import ModelTensors

        weights = ModelTensors(options.checkpoint)  # read tensor by tensor, each rank its TP slices only
        cfg = weights.cfg
        log(f"pretrained encoder {cfg.name} from {options.checkpoint}")
    else:
        cfg, weights = get_preset(options.model), None
        log(f"no --checkpoint: the {cfg.name} encoder is RANDOMLY initialised (not a pretrained result)")
    torch.manual_seed(options.seed)
    backbone = ViTDetBackbone(cfg, img_size=options.crop, window_size=options.window, drop_path=options.drop_path,
                              out_channels=options.channels, activation_checkpointing=options.activation_checkpointing,
                              sequence_parallel=sequence_parallel, config=config, **vitdet_options(options))
    init = "random"
    if weights is not None:
        report = load_pretrained(backbone, weights, cfg)
        log(f"loaded {len(report['loaded'])} tensors; new (random) {len(report['missing'])}: "
            f"{', '.join(report['missing'][:4])}{' ...' if len(report['missing']) > 4 else ''}; "
            f"ignored pretraining-only {len(report['ignored'])}; unexpected {len(report['unexpected'])} {report['unexpected'][:5]}")
        init = "mae"
    if task == "seg":
        model = Segmenter(backbone, num_classes, channels=options.channels)
    elif options.detector == "orcnn":  # --detector: Oriented R-CNN or rotated FCOS
        model = OrientedRCNN.scaled_to(backbone, num_classes, options.crop)
    else:
        model = RotatedFCOS(backbone, num_classes, channels=options.channels)
    return model, cfg, init


# ------------------------------------------------------------------------------------ one rank
def trainer_config(options: FinetuneConfig, cfg: ViTConfig, steps: int) -> TrainConfig:
    """The shared run description of a fine-tuning run: what the trainer's loop, checkpoints,
    resume and store read (the task's own options stay in `options`)."""
    return TrainConfig(model=cfg.name, in_chans=cfg.in_chans, parallel=options.parallel, steps=steps, seed=options.seed,
                       compute=Compute(precision=options.precision),
                       optim=dataclasses.replace(options.optim, warmup=min(options.optim.warmup, max(steps // 5, 1))),
                       data_parallel=options.data_parallel,
                       data=options.data, num_workers=0, checkpointing=options.checkpointing, recording=options.recording, timeout=options.timeout)


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

    def __init__(self, options: FinetuneConfig, model, train_set, device, steps: int | None = None, classes=(), init: str = "random"):
        self.options, self.layout, self.model, self.train_set, self.device = options, options.parallel, model, train_set, device
        self.cfg, self.classes, self.init = model.backbone.cfg, list(classes), init
        self.pretraining = pretraining_identity(options.checkpoint)  # read once: tags, store config
        self.task = "seg" if isinstance(model, Segmenter) else "det"
        self.config = trainer_config(options, self.cfg, steps or options.steps or 1)
        self.state, self.memory_at_start = state, reset_peak_memory(device)
        self.normalize = Normalize(self.cfg.in_chans)
        groups = param_groups_lrd(model, self.cfg.depth, options.optim.weight_decay, options.layer_decay)
        self.optimizer = self._flat_adamw(lr_scales={n: g["lr_scale"] for g in groups for n in g["names"]})  # layer-wise lr decay
        torch.manual_seed(options.seed + 1 + state.dp_rank())  # drop-path masks: equal within a TP group
        self.results = {}
        self._ready()  # (--resume restores the weights, optimizer, step and RNG)

    # --- data ----------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list:
        """This rank's (images on the device, targets) per micro-batch of `step`."""
        L, crop, chans = self.layout, self.options.crop, self.cfg.in_chans
        per_rank = L.global_batch // L.dp
        first = state.dp_rank() * per_rank
        out = []
        for m in range(per_rank // L.micro_batch):
            lo = first + m * L.micro_batch
            if state.tp_rank() == 0:
                imgs, targets = zip(*[draw_sample(self.task, self.train_set, crop, self.normalize, self.options.seed, step, g)
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
        options, L = self.options, self.layout
        self.model.eval()
        indices = range(state.dp_rank(), len(val_set), L.dp)
        with self._autocast():
            if self.task == "seg":
                metric = evaluate_seg(self.model, val_set, options.crop, classes, self.normalize, indices=indices)
                if L.dp > 1:
                    cm = metric.confusion.to(self.device)
                    dist.all_reduce(cm, group=state.dp_group())
                    metric.confusion = cm.cpu()
                return {"metric": metric}
            dets, gts = detect_images(self.model, val_set, options.crop, classes, self.normalize, indices=indices,
                                      score_thr=options.score_thr, max_per_image=options.max_per_image, **protocol_options(options))
        if L.dp > 1:
            gathered = [None] * L.dp
            dist.all_gather_object(gathered, (dets, gts), group=state.dp_group())
            dets = {c: [row for d, _ in gathered for row in d[c]] for c in classes}
            gts = {k: v for _, g in gathered for k, v in g.items()}
        return {"ap": evaluate_dota(dets, gts, classes=list(classes), tie_order=options.tie_order)}

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
        if self.config.checkpointing.out and dist.get_rank() == 0:
            path = Path(self.config.checkpointing.out) / "metrics.json"
            path.write_text(json.dumps({**self.results, "init": self.init, "preset": self.cfg.name, "steps": self.step,
                                        "train_fraction": self.options.train_fraction, "layout": self.layout.as_dict()}, indent=1))
            log(f"wrote {path}")

    def tb_prefix(self) -> str:
        return f"finetune_{self.task}"

    def tags(self) -> dict:
        """The metrics' tags: the benchmark, the data fraction, and the pretraining they start from."""
        return dict(dataset=self.options.dataset, task=self.task, init=self.init, train_fraction=self.options.train_fraction,
                    **self.pretraining)

    def run_fields(self) -> dict:
        return dict(preset=self.cfg.name, params=param_count(self.cfg, "encoder"), config={**as_config(self.options), "pretrain": self.pretraining})

    def checkpoint_meta(self) -> dict:
        """What rebuilds this model from its checkpoint alone (`rsscale evaluate`, `rsscale predict`)."""
        return {"finetune": {"task": self.task, "classes": self.classes, "init": self.init, "options": as_config(self.options)}}

    def _claim(self) -> None:
        if self.config.checkpointing.out:
            super()._claim()
        else:  # no --out: nothing is saved, nothing to lock
            self._lock = False

    def save(self):
        return super().save() if self.config.checkpointing.out else None


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


def load_config(options: FinetuneConfig) -> ViTConfig:
    """The encoder's ViTConfig (from the checkpoint's index, without loading its tensors)."""
    if options.checkpoint:
        from rsscale.scaling.train.checkpoint import read_index

        return ViTConfig(**read_index(options.checkpoint)[1]["model"])
    return get_preset(options.model)


def vitdet_options(options: FinetuneConfig) -> dict:
    """The ViTDet backbone options (each defaults to ViTDet's choice)."""
    return dict(rel_pos=options.rel_pos, drop_path_per_sublayer=options.drop_path_mode == "sublayer",
                global_blocks=None if options.global_blocks is None else tuple(int(i) for i in options.global_blocks.split(",") if i))


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


def run_finetune(options: FinetuneConfig, started=lambda trainer: trainer) -> dict:
    """The whole command on one rank: checks, groups, data check, model, then the trainer's loop
    (checkpoints, --resume, store, evaluation at the end). Returns the metrics ({} when a resumed
    run had nothing left to do). `started` receives the trainer (run_rank's interrupt line)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = load_config(options)
    layout, device = start_groups(options, cfg, world)
    if dist.get_rank() == 0:  # the synthetic set is written once, before anyone reads it
        build_datasets(options.task, options.dataset, options.data, (options.synthetic_count,) * 2)
    dist.barrier()
    train_set, val_set, classes = build_datasets(options.task, options.dataset, options.data, (options.synthetic_count,) * 2)
    val_set = val_subset(val_set, options.max_eval_images)
    counts = check_data({"train": train_set, "val": val_set}, options.task, classes, cfg.in_chans)
    train_set = train_subset(train_set, options.train_fraction, options.subset_seed)
    model, cfg, init = build_model(options.task, options, len(classes), sequence_parallel=layout.sp)
    model = model.to(device)
    steps = options.steps or options.epochs * math.ceil(len(train_set) / layout.global_batch)
    log(f"task {options.task} on {options.dataset}: {len(train_set)} train ({100 * options.train_fraction:g} %) / {len(val_set)} val images, "
        f"{len(classes)} classes; {cfg.name} encoder {param_count(cfg, 'encoder'):,} params, model {sum(p.numel() for p in model.parameters()):,} "
        f"(this rank); layout {layout}, {options.precision}, {device}; {steps} steps" + ("" if options.checkpointing.out else "; no --out: nothing is saved"))
    tuner = started(Finetuner(options, model, train_set, device, steps=steps, classes=classes, init=init))
    tuner.val_set, tuner.counts = val_set, counts
    tuner.fit()
    return tuner.results


def start_groups(options: FinetuneConfig, cfg: ViTConfig, world: int) -> tuple[Layout, torch.device]:
    """The TP x DP layout of `options` checked, and the precision, before any process group exists
    (no hangs), then the groups and this rank's device (fine-tuning, evaluate, predict)."""
    layout = options.parallel
    check_layout(layout, cfg, world)
    check_precision(options.precision)
    state.init_parallel(layout.tp, 1, layout.dp, seed=options.seed, timeout_s=options.timeout)
    return layout, rank_device()


def protocol_options(options: FinetuneConfig) -> dict:
    """detect_images' split of `--protocol`: DOTA's rates, overlap ratio and flips on --crop-sized
    patches (the model's input size); {} for the training crops' split."""
    if options.protocol == "crop":
        return {}
    p = PROTOCOLS[options.protocol]
    return dict(rates=p["rates"], overlap=options.crop * p["overlap"] // p["patch"], flips=("h", "v") if options.protocol == "dota-ms" else ())


def run_options(run: str, world: int | None = None, **overrides) -> tuple[FinetuneConfig, ViTConfig, str, dict]:
    """(options, encoder ViTConfig, checkpoint folder, index) of a fine-tuning run's newest complete
    checkpoint (or the step folder given): the options the run recorded there, with `overrides`
    (option names), on `world` processes: --dp and the micro-batch are this launch's (fill_layout)
    unless given."""
    folder, index = checkpoint.read_index(run)
    saved = index.get("finetune")
    if not saved:
        raise ValueError(f"{os.path.join(folder, 'index.json')}: not a fine-tuning checkpoint (no 'finetune' entry: a pretraining "
                         "checkpoint, or a run written before fine-tuning runs kept what rebuilds their model); fine-tune it again")
    recorded = option_paths(saved.get("options") or saved["args"], strict=False)  # "args": older runs' flat dict; dropped options are ignored
    recorded = {k: v for k, v in recorded.items() if k not in ("parallel.dp", "parallel.micro_batch")}
    options = options_with({**recorded, **option_paths(overrides), "checkpoint": None, "checkpointing.resume": False, "checkpointing.out": None, "checkpointing.save_every": 0}, world)
    return options, ViTConfig(**index["model"]), folder, index


def run_layout(run: str, world: int, **overrides) -> tuple[Layout, ViTConfig]:
    """The layout a command on `world` processes gives a run's model (checked before launching)."""
    options, cfg, _, _ = run_options(run, world, **overrides)
    return options.parallel, cfg


def restore(run: str, world: int, **overrides) -> tuple[Finetuner, dict]:
    """A Finetuner holding the weights of a fine-tuning run's checkpoint (`run_options`), in any
    TP x DP layout, each rank reading only its slices. Creates the process groups. Returns it and
    the checkpoint's index."""
    options, cfg, folder, index = run_options(run, world, **overrides)
    saved = index["finetune"]
    layout, device = start_groups(options, cfg, world)
    model, _, _ = build_model(saved["task"], options, len(saved["classes"]), sequence_parallel=layout.sp, encoder=cfg)
    tuner = Finetuner(options, model.to(device), None, device, steps=index["trainer"]["step"], classes=saved["classes"], init=saved["init"])
    tuner.load(folder, weights_only=True)
    tuner.step = int(index["trainer"]["step"])
    log(f"{saved['task']} model of {folder} (step {tuner.step}, {cfg.name} encoder, {len(saved['classes'])} classes); layout {layout}")
    return tuner, index


def main(args) -> int:
    config = config_from_args(args)
    if wants_launch(args):
        check_precision(config.precision)
        return relaunch_checked("finetune", args, lambda world: (config_from_args(args, world).parallel, load_config(config)))
    return run_rank("finetune", lambda started: run_finetune(config, started))
