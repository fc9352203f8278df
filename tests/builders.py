"""What many tests build: a small pretraining run's config and a folder of images. Plain
functions, so that spawned worker processes (tests/distributed.py) can build the same thing;
conftest.py also offers them as fixtures."""

from __future__ import annotations

from pathlib import Path


def tiny_run(out="unused", *, model="tiny", layout=None, compute=None, data_parallel=None, optim=None, **train):
    """A TrainConfig of the `tiny` model on in-memory random images, recording nothing: micro-batch
    2, global batch 4, AdamW lr 2e-3 with one warm-up step, unless given. `layout` (a Layout, or
    overrides of its fields), `compute`, `data_parallel` and `optim` are field overrides of those
    sections; `train` of TrainConfig's."""
    from rsscale.scaling.spec.layout import Layout
    from rsscale.scaling.spec.run import Compute, DataParallel, OptimConfig
    from rsscale.scaling.train.pretrain import TrainConfig

    fields = {**dict(steps=3, data="random", num_workers=0, record=False, log_every=100), **train}
    return TrainConfig(model=model, out=str(out), parallel=layout if isinstance(layout, Layout) else Layout(**{"micro_batch": 2, "global_batch": 4, **(layout or {})}),
                       compute=Compute(**(compute or {})), data_parallel=DataParallel(**(data_parallel or {})),
                       optim=OptimConfig(**{"lr": 2e-3, "warmup": 1, **(optim or {})}), **fields)


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
