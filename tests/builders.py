"""What many tests build: a small pretraining run's config and a folder of images. Plain
functions, so that spawned worker processes (tests/distributed.py) can build the same thing;
conftest.py also offers the first two as fixtures. tiny_backbone and fit serve the fine-tuning model tests."""

from __future__ import annotations

from pathlib import Path


def tiny_run(out="unused", *, model="tiny", layout=None, compute=None, data_parallel=None, optim=None, **train):
    """A TrainConfig of the `tiny` model on in-memory random images, recording nothing: micro-batch
    2, global batch 4, AdamW lr 2e-3 with one warm-up step, unless given. `layout` (a Layout, or
    overrides of its fields), `compute`, `data_parallel` and `optim` are field overrides of those
    sections; `train` of TrainConfig's, where the names of the checkpointing and recording
    sections' fields (resume=True, log_every=1) go to those sections."""
    import dataclasses

    from rsscale.scaling.spec.layout import Layout
    from rsscale.scaling.spec.run import Checkpointing, Compute, DataParallel, OptimConfig, Recording
    from rsscale.scaling.train.pretrain import TrainConfig

    def pick(cls, given):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: train.pop(k) for k in list(train) if k in names}, **given)

    checkpointing = pick(Checkpointing, {} if "out" in train else {"out": str(out)})
    recording = pick(Recording, {k: v for k, v in dict(record=False, log_every=100).items() if k not in train})
    fields = {**dict(steps=3, data="random", num_workers=0), **train}
    return TrainConfig(model=model, parallel=layout if isinstance(layout, Layout) else Layout(**{"micro_batch": 2, "global_batch": 4, **(layout or {})}),
                       compute=Compute(**(compute or {})), data_parallel=DataParallel(**(data_parallel or {})),
                       optim=OptimConfig(**{"lr": 2e-3, "warmup": 1, **(optim or {})}), checkpointing=checkpointing, recording=recording,
                       **fields)


def image_folder(root, count: int = 10, size=(72, 80), seed: int = 0) -> str:
    """`count` random RGB PNGs of `size` (h, w) in `root`; returns its path."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return str(root)


def tiny_backbone(size=32):
    """A 2-block `tiny` ViTDet backbone (seed 0) with 16 output channels, for the fine-tuning model tests."""
    import torch

    from rsscale.finetune.model.vitdet import ViTDetBackbone
    from rsscale.scaling.spec.config import get_preset

    torch.manual_seed(0)
    return ViTDetBackbone(get_preset("tiny").replace(depth=2), img_size=size, window_size=2, drop_path=0.0, out_channels=16)


def fit(model, loss_fn, steps=8, lr=2e-3):
    """`steps` AdamW steps (layer-wise lr decay 0.9 over 2 blocks) on loss_fn(); returns the losses."""
    import torch

    from rsscale.finetune.model.vitdet import param_groups_lrd

    opt = torch.optim.AdamW(param_groups_lrd(model, 2, layer_decay=0.9), lr=lr)
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def tiny_trainer(out, zero: bool = False, parallel=None, **train):
    """A Trainer of `tiny_run(out, ...)` (`zero`: ZeRO-1; `parallel`: its Layout)."""
    from rsscale.scaling.train.pretrain import Trainer

    return Trainer.build(tiny_run(out, layout=parallel, data_parallel={"distributed_optimizer": zero}, **train))


def checkpoints_dir(out) -> str:
    """A run folder's checkpoints folder."""
    import os

    return os.path.join(str(out), "checkpoints")


def steps_on_disk(out) -> list[str]:
    """The step folders under a run folder's checkpoints, oldest first."""
    import os

    return sorted(d for d in os.listdir(checkpoints_dir(out)) if d.startswith("step_"))
