"""Image-folder pipeline for MAE pretraining: DALI where it runs, a torch DataLoader otherwise.

    loader = build_pretrain_loader("data/synthetic/pretrain", img_size=224, batch_size=64,
                                   dp_rank=rank, dp_size=world, seed=0)
    imgs = next(loader)                  # float32 [B, in_chans, img_size, img_size], normalized
    loader.step, loader.samples, loader.epoch, loader.skipped   # counters
    state = loader.state_dict(); ...; loader.load_state_dict(state)   # resume

Contract for the trainer (both backends):
- The loader is infinite: it re-shuffles every epoch and never raises StopIteration, so a trainer
  just calls `next(loader)` N times. `batch_size` is the per-rank (micro) batch.
- Augmentation is MAE's: random resized crop (area 0.2-1, aspect 3/4-4/3, bicubic), random
  horizontal flip, then (x - mean) / std on [0, 1] pixels (ImageNet statistics by default; pass
  `mean`/`std`, e.g. from `measure_stats(folder, in_chans)`, for other sensors or bands).
- Data-parallel ranks read disjoint shards. Torch backend: each epoch is one permutation of all
  files from (seed, epoch); rank r takes positions r, r + dp_size, ... and the last
  `num_files % dp_size` files of the permutation are dropped for that epoch (every rank sees the
  same number of samples; a different permutation next epoch means no file is left out for good).
  DALI backend: fn.readers.file with shard_id/num_shards = dp rank/size over a seeded
  permutation of the files, re-shuffled after every epoch with one seed shared by all ranks.
- Resume (exact on both backends). `state = loader.state_dict()` is plain JSON-ready values; a
  loader built with `build_pretrain_loader(..., state=state)` continues the identical stream.
  Torch backend: sample order and every crop/flip are pure functions of (seed, epoch, file
  index), so `state` (or just `start_step=k`) gives bit-identical batches with any
  `num_workers`. DALI backend: the pipeline runs with DALI's checkpointing (reader positions and
  random operators' states; external_source by iteration) and `state` carries its serialized
  checkpoint (base64 text); without it, a start at step k is a fresh stream reseeded from
  (seed, k), reproducible but not identical. The trainer stores each rank's state in its
  checkpoint (the rank state of scaling/train/checkpoint.py, key `loader`).
- Corrupt files never crash a run: all files are checked up front (cheap: header + PIL verify +
  the JPEG/PNG end marker, which catches truncation) and bad ones are skipped and counted in
  `skipped`; the torch backend also survives a decode failure at run time (it substitutes the
  next good file deterministically and counts it in `decode_failures`); a DALI failure at run
  time switches that loader to the torch backend for the rest of the run (one warning line).
- Multi-band TIFFs (e.g. RGB+NIR) are read with tifffile; `in_chans` selects the first bands.
  Pixel values (docs/DATA.md): unsigned integers are divided by their stored bit depth's maximum
  (8-bit / 255, 16-bit PNG or TIFF / 65535, a 12-bit TIFF / 4095); float and signed-integer
  imagery is used as stored and normalized with stated per-band statistics (`mean`/`std`, or,
  when not given, measured on the dataset and logged). The up-front check also refuses (skips and
  counts, naming the files) images with fewer bands than `in_chans` and images of more than
  `max_pixels` pixels (default MAX_PIXELS), before any is decoded.
"""

from __future__ import annotations

import base64
import importlib.util
import itertools
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
TIFF_EXTS = (".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_AREA = (0.2, 1.0)  # MAE's RandomResizedCrop(scale=(0.2, 1.0))
CROP_RATIO = (3 / 4, 4 / 3)
MAX_PIXELS = 2**26  # 8192 x 8192: a bigger scene costs gigabytes per decoded crop; tile it first


def log(msg: str, every_rank: bool = False) -> None:
    """Print on global rank 0 only (every rank scans the same file list, so their lines agree),
    unless every_rank: for what can differ between ranks (a DALI failure)."""
    if every_rank or int(os.environ.get("RANK", "0")) == 0:
        print(f"[data] {msg}", flush=True)


def _short(e: Exception) -> str:
    """An exception on one line, short enough for a log (DALI's messages span many lines)."""
    msg = str(e).split("encountered:", 1)[-1]  # DALI: the cause follows the operator's traceback
    return f"{type(e).__name__}: {' '.join(msg.split())[:240]}"


# ----------------------------------------------------------------------------- files


def pretrain_folder(root: str) -> str:
    """root, or its pretraining split when root holds a dataset `rsscale data` wrote (its
    manifest.json says so): the segmentation masks and detection tiles beside it are no
    pretraining images."""
    from rsscale.scaling.data.data import dataset_for, finished_manifest

    if finished_manifest(root) is None:
        return root
    folder = dataset_for(root, "pretrain")["pretrain"]
    log(f"{root} is a dataset written by `rsscale data`: reading its pretraining images, {folder}")
    return folder


def scan_images(root_or_files) -> list[str]:
    """Sorted image paths under a folder (recursive; a dataset of `rsscale data`: its pretraining
    images, see pretrain_folder), or the given list of paths as is."""
    if isinstance(root_or_files, (list, tuple)):
        return [os.fspath(p) for p in root_or_files]
    root = pretrain_folder(os.fspath(root_or_files))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTS)]
    return found


def _has_end_marker(path: str, fmt: str) -> bool:
    """A JPEG ends with EOI (FFD9), a PNG with its IEND chunk: a cheap test for truncated files."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 16))
        tail = f.read()
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt)
    return marker is None or marker in tail  # 16 bytes: some writers pad after the marker


@dataclass(frozen=True)
class ImageInfo:
    """What the header of an image says: bands, size, and the bit depth its pixels are scaled by
    (0: float or signed imagery, used as stored and normalized with stated statistics)."""

    bands: int
    height: int
    width: int
    bits: int

    @property
    def pixels(self) -> int:
        return self.height * self.width


_PIL_BITS = {"1": 8, "L": 8, "LA": 8, "P": 8, "PA": 8, "RGB": 8, "RGBA": 8, "RGBX": 8, "CMYK": 8, "YCbCr": 8,
             "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 0, "F": 0}
_PIL_GREY = ("1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def image_info(path: str) -> ImageInfo:
    """Header-only description of a readable image (raises on anything unreadable)."""
    if path.lower().endswith(TIFF_EXTS):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes, dtype, bits = series.shape, series.axes, series.dtype, tif.pages[0].bitspersample
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        return ImageInfo(_band_count(shape, axes), height, width, int(bits) if dtype.kind == "u" else 0)
    from PIL import Image

    with Image.open(path) as im:
        fmt, mode, (width, height) = im.format, im.mode, im.size
        im.verify()
    if not _has_end_marker(path, fmt):
        raise OSError(f"{fmt} file is truncated")
    if mode not in _PIL_BITS:
        raise ValueError(f"unsupported {fmt} pixel mode {mode!r}")
    return ImageInfo(1 if mode in _PIL_GREY else 3, height, width, _PIL_BITS[mode])


def _problem(path: str, in_chans: int, max_pixels: int) -> tuple[ImageInfo | None, str | None]:
    """(header info, None) if the file can feed an in_chans-band model, else (None, why not)."""
    try:
        info = image_info(path)
    except Exception as e:  # noqa: BLE001 - any failure to read means "skip this file"
        return None, f"{type(e).__name__}: {e}"
    if info.bands < in_chans and not (info.bands == 1 and in_chans == 3):  # grey is repeated to RGB
        return None, f"has {info.bands} band(s), in_chans={in_chans} needs more"
    if info.pixels > max_pixels:
        return None, f"has {info.width} x {info.height} = {info.pixels:,} pixels, more than max_pixels={max_pixels:,} (tile it first)"
    return info, None


def validate_images(files: list[str], in_chans: int = 3, threads: int = 8, chunk: int = 20000,
                    max_pixels: int = MAX_PIXELS) -> tuple[list[str], list[tuple[str, str]], dict[str, ImageInfo]]:
    """Split files into (good, [(bad path, why)], {good path: ImageInfo}); threads because the
    checks mostly wait on I/O."""
    good, bad, infos = [], [], {}
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(files), chunk):
            part = files[start:start + chunk]
            for path, (info, why) in zip(part, pool.map(_problem, part, itertools.repeat(in_chans), itertools.repeat(max_pixels))):
                if why is None:
                    good.append(path)
                    infos[path] = info
                else:
                    bad.append((path, why))
            if len(files) > chunk:
                log(f"checked {start + len(part)}/{len(files)} files ({len(bad)} bad so far)")
    return good, bad, infos


def _band_count(shape, axes: str) -> int:
    if len(shape) == 2:
        return 1
    return shape[-1] if axes.endswith("S") else shape[0]


def read_image(path: str, in_chans: int = 3) -> tuple[np.ndarray, int]:
    """(HxWxC array in its stored dtype with the first in_chans bands, bit depth to scale it by;
    0 for float or signed imagery). TIFFs via tifffile, the rest via PIL (grey stays one band)."""
    if path.lower().endswith(TIFF_EXTS):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr, axes, bits = series.asarray(), series.axes, tif.pages[0].bitspersample
        if arr.ndim == 3 and not axes.endswith("S"):
            arr = np.moveaxis(arr, 0, -1)  # band-first (planar or one page per band) -> HWC
    else:
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in _PIL_BITS:
                raise ValueError(f"{path}: unsupported pixel mode {im.mode!r}")
            bits = _PIL_BITS[im.mode]
            arr = np.asarray(im if bits != 8 else im.convert("L" if im.mode in _PIL_GREY else "RGB"))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[-1] == 1 and in_chans == 3:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] < in_chans:
        raise ValueError(f"{path} has {arr.shape[-1]} band(s), in_chans={in_chans} needs more")
    return arr[:, :, :in_chans], (int(bits) if arr.dtype.kind == "u" else 0)


def to_unit_float(arr: np.ndarray, bits: int) -> torch.Tensor:
    """HWC array -> float32 CHW tensor: unsigned integers / (2**bits - 1) into [0, 1]; with bits 0
    (float or signed imagery) the values as stored."""
    t = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float()  # copy: PIL arrays are read-only
    return t / float(2**bits - 1) if bits else t


def default_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet mean/std for RGB; extra bands (NIR, ...) get the RGB average until measured."""
    mean = IMAGENET_MEAN[:in_chans] + (sum(IMAGENET_MEAN) / 3,) * max(0, in_chans - 3)
    std = IMAGENET_STD[:in_chans] + (sum(IMAGENET_STD) / 3,) * max(0, in_chans - 3)
    return mean, std


def measure_stats(root_or_files, in_chans: int = 3, num_files: int = 256, seed: int = 0):
    """Per-band (mean, std) of the pixels (integers scaled to [0, 1], floats as stored) over up to
    num_files random readable files: the normalization for data whose statistics are not
    ImageNet's (NIR bands, float reflectance or radiance, SAR)."""
    files, _, _ = validate_images(scan_images(root_or_files), in_chans)
    if not files:
        raise ValueError("no readable image to measure statistics on")
    picked = np.random.default_rng(seed).choice(len(files), min(num_files, len(files)), replace=False)
    total, total_sq, count = np.zeros(in_chans), np.zeros(in_chans), 0
    for i in picked:
        x = to_unit_float(*read_image(files[i], in_chans)).double().flatten(1)
        total, total_sq, count = total + x.sum(1).numpy(), total_sq + (x * x).sum(1).numpy(), count + x.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(mean.tolist()), tuple(std.tolist())


# ----------------------------------------------------------------------------- sharding + augmentation


class ShardPlan:
    """Which file a rank reads at stream position `pos` (one permutation per epoch)."""

    def __init__(self, num_files: int, dp_rank: int, dp_size: int, seed: int):
        self.num_files, self.dp_rank, self.dp_size, self.seed = num_files, dp_rank, dp_size, seed
        self.per_rank = num_files // dp_size
        self._perm_epoch, self._perm = -1, None

    def locate(self, pos: int) -> tuple[int, int]:
        """(epoch, file index) of this rank's pos-th sample."""
        epoch, offset = divmod(pos, self.per_rank)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_files)
            self._perm_epoch = epoch
        return epoch, int(self._perm[offset * self.dp_size + self.dp_rank])


def crop_params(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: torchvision's RandomResizedCrop rule."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_AREA)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height  # fallback: the largest centred crop inside the ratio range
    if ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment(arr: np.ndarray, bits: int, rng: np.random.Generator, img_size: int,
            mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Random resized crop + horizontal flip + normalize: HWC array (scaled by `bits`, see
    to_unit_float) -> [C, img_size, img_size]. Bicubic overshoot is clamped to [0, 1] for integer
    imagery only (float imagery has no known range)."""
    top, left, h, w = crop_params(rng, arr.shape[0], arr.shape[1])
    x = to_unit_float(arr[top:top + h, left:left + w], bits)[None]
    x = F.interpolate(x, size=(img_size, img_size), mode="bicubic", align_corners=False, antialias=True)[0]
    if bits:
        x = x.clamp_(0, 1)
    if rng.random() < 0.5:
        x = x.flip(-1)
    return (x - mean[:, None, None]) / std[:, None, None]


# ----------------------------------------------------------------------------- torch backend


class _StreamDataset(torch.utils.data.Dataset):
    """Sample at a rank's stream position; pure function of (seed, epoch, file index)."""

    def __init__(self, files, plan: ShardPlan, img_size, in_chans, mean, std):
        self.files, self.plan, self.img_size, self.in_chans = files, plan, img_size, in_chans
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __getitem__(self, pos: int):
        epoch, index = self.plan.locate(pos)
        for failures in range(len(self.files)):
            path = self.files[(index + failures) % len(self.files)]
            try:
                arr, bits = read_image(path, self.in_chans)
            except Exception as e:  # noqa: BLE001 - a bad file must not stop training
                warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
                continue
            rng = np.random.default_rng([self.plan.seed, epoch, index])
            return augment(arr, bits, rng, self.img_size, self.mean, self.std), failures
        raise RuntimeError("no image in the dataset can be decoded")


class _Positions(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


class PretrainLoader:
    """Infinite batch iterator of one data-parallel rank (see the module docstring)."""

    backend = "torch"

    def __init__(self, files, img_size, batch_size, dp_rank, dp_size, seed, in_chans, mean, std,
                 num_workers, device, start_step, skipped, external=True):
        self.files, self.img_size, self.batch_size = files, img_size, batch_size
        self.plan = ShardPlan(len(files), dp_rank, dp_size, seed)
        self.in_chans, self.mean, self.std = in_chans, mean, std
        self.num_workers, self.device = num_workers, torch.device(device)
        self.skipped, self.decode_failures = skipped, 0
        self.step = start_step
        self.external = external  # DALI: read with read_image through external_source
        self._it = None

    @property
    def samples(self) -> int:
        """Samples this rank has returned since step 0."""
        return self.step * self.batch_size

    @property
    def epoch(self) -> float:
        """Fractional epoch over this rank's shard."""
        return self.samples / self.plan.per_rank

    def state_dict(self) -> dict:
        """Plain values (JSON-ready): where this rank's stream is and what it was built from."""
        return {"backend": self.backend, "step": self.step, "seed": self.plan.seed, "dp_rank": self.plan.dp_rank,
                "dp_size": self.plan.dp_size, "num_files": len(self.files), "batch_size": self.batch_size}

    def _changed(self, state: dict) -> list[str]:
        """What differs between `state` and this loader's dataset, sharding and batch."""
        mine = PretrainLoader.state_dict(self)
        return [k for k in ("seed", "dp_rank", "dp_size", "num_files", "batch_size") if state.get(k, mine[k]) != mine[k]]

    def load_state_dict(self, state: dict) -> None:
        changed = self._changed(state)
        if changed:
            warnings.warn(f"resuming data loader with changed {changed}: the batch stream will differ")
        self.step, self._it = int(state["step"]), None

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = self._start(self.step * self.batch_size)
        batch = next(self._it)
        self.step += 1
        return batch

    def _start(self, pos: int, mp_context: str | None = None):
        dataset = _StreamDataset(self.files, self.plan, self.img_size, self.in_chans, self.mean, self.std)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, sampler=_Positions(pos), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            multiprocessing_context=mp_context if self.num_workers else None)
        for imgs, failures in loader:
            self.decode_failures += int(failures.sum())
            yield imgs.to(self.device, non_blocking=True)


# ----------------------------------------------------------------------------- DALI backend


class _ArraySource:
    """DALI external_source callback: the rank's pos-th image as float32 HWC (read_image + to_unit_float)."""

    def __init__(self, files, plan: ShardPlan, in_chans: int, batch_size: int, start: int):
        self.files, self.plan, self.in_chans, self.batch_size, self.start = files, plan, in_chans, batch_size, start

    def __call__(self, info):
        _, index = self.plan.locate(self.start + info.iteration * self.batch_size + info.idx_in_batch)
        return to_unit_float(*read_image(self.files[index], self.in_chans)).permute(1, 2, 0).contiguous().numpy()


class DaliPretrainLoader(PretrainLoader):
    """The same contract on a DALI pipeline: readers.file + decoders.image_random_crop (GPU
    "mixed" decode when device is cuda) for 8-bit JPEG/PNG; read_image through external_source
    for the rest (TIFFs, 16-bit or float pixels, other band counts). Resume is exact: the pipeline
    runs with DALI checkpointing (reader positions and every random operator's state),
    `state_dict()` carries its serialized checkpoint and a loader built with that state continues
    the same stream (Pipeline(checkpoint=...)). Without one, a start at step k is a fresh stream
    reseeded from (seed, k): reproducible, not identical."""

    backend = "dali"

    def __init__(self, *args, state: dict | None = None):
        super().__init__(*args)
        saved = (state or {}).get("dali")
        if saved and self._changed(state):
            log(f"WARNING: the saved DALI state is for another dataset or layout ({', '.join(self._changed(state))} changed); "
                "starting a fresh stream")
            saved = None
        if not saved and self.step:
            log(f"no DALI loader state for step {self.step}: the stream restarts reseeded from (seed, step), "
                "reproducible but not identical to an uninterrupted run")
        # The pipeline's arguments (file order, seeds) are those of the step its stream began at.
        self.origin = int(saved["origin"]) if saved else self.step
        self._pipe = self._pipeline(self.origin * self.batch_size, base64.b64decode(saved["checkpoint"]) if saved else None)
        self._start_state = self._pipe.checkpoint()
        gen = self._run()
        self._it = itertools.chain([next(gen)], gen)  # run once now so "auto" can fall back
        self._ahead = True  # the pipeline has run one batch further than the trainer has taken

    def __next__(self) -> torch.Tensor:
        batch = super().__next__()
        self._ahead = False
        return batch

    def state_dict(self) -> dict:
        if self.backend != "dali":  # fell back to torch at run time: that stream's state
            return super().state_dict()
        checkpoint = self._start_state if self._ahead else self._pipe.checkpoint()
        return {**super().state_dict(), "dali": {"origin": self.origin, "checkpoint": base64.b64encode(checkpoint).decode("ascii")}}

    def _pipeline(self, pos: int, checkpoint: bytes | None = None):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        gpu = self.device.type == "cuda"
        gpu_id = (torch.cuda.current_device() if self.device.index is None else self.device.index) if gpu else None
        plan = self.plan
        # One reader seed for all ranks keeps the shards disjoint; augmentation seeds differ per rank.
        reader_seed = int(np.random.default_rng([plan.seed, pos // self.batch_size]).integers(2**31))
        aug_seed = int(np.random.default_rng([plan.seed, pos // self.batch_size, plan.dp_rank]).integers(2**31))
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, self.num_workers), device_id=gpu_id, seed=aug_seed,
                        enable_checkpointing=True, checkpoint=checkpoint)
        scale = 255.0
        with pipe:
            if self.external:
                images = fn.external_source(source=_ArraySource(self.files, plan, self.in_chans, self.batch_size, pos),
                                            batch=False, layout="HWC", dtype=types.FLOAT)
                images = images.gpu() if gpu else images
                images = fn.random_resized_crop(images, size=(self.img_size, self.img_size),
                                                random_area=CROP_AREA, random_aspect_ratio=CROP_RATIO,
                                                interp_type=types.INTERP_CUBIC, antialias=True)
                scale = 1.0
            else:
                order = np.random.default_rng(reader_seed).permutation(len(self.files))
                encoded, _ = fn.readers.file(files=[self.files[i] for i in order], shard_id=plan.dp_rank,
                                             num_shards=plan.dp_size, shuffle_after_epoch=True,
                                             seed=reader_seed, name="Reader")
                images = fn.decoders.image_random_crop(encoded, device="mixed" if gpu else "cpu",
                                                       output_type=types.RGB, random_area=CROP_AREA,
                                                       random_aspect_ratio=CROP_RATIO, num_attempts=10)
                images = fn.resize(images, resize_x=self.img_size, resize_y=self.img_size,
                                   interp_type=types.INTERP_CUBIC, antialias=True)
            out = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                           mean=[m * scale for m in self.mean], std=[s * scale for s in self.std],
                                           mirror=fn.random.coin_flip())
            pipe.set_outputs(out)
        pipe.build()
        return pipe

    def _run(self):
        while True:
            try:
                (out,) = self._pipe.run()
            except Exception as e:  # noqa: BLE001 - e.g. a file that passed the check fails to decode
                log(f"WARNING: rank {os.environ.get('RANK', '0')}: DALI failed at step {self.step} ({_short(e)}); "
                    "continuing with the torch DataLoader pipeline", every_rank=True)
                self.backend, self._pipe = "torch", None
                # spawned workers: a worker forked from this process could inherit a lock held by
                # one of DALI's threads and wait on it forever
                yield from PretrainLoader._start(self, self.step * self.batch_size, "spawn")
                return
            tensor = out.as_tensor()
            if self.device.type == "cuda":
                from nvidia.dali.plugin.pytorch import feed_ndarray

                batch = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
                feed_ndarray(tensor, batch, cuda_stream=torch.cuda.current_stream())
            else:
                batch = torch.from_numpy(np.array(tensor))
            yield batch


# ----------------------------------------------------------------------------- entry point


def build_pretrain_loader(root_or_files, img_size: int, batch_size: int, dp_rank: int = 0,
                          dp_size: int = 1, seed: int = 0, backend: str = "auto",
                          num_workers: int = 2, device: str = "cpu", in_chans: int = 3,
                          mean=None, std=None, start_step: int = 0, validate: bool = True,
                          max_pixels: int = MAX_PIXELS, state: dict | None = None):
    """Infinite, sharded, resumable iterator of normalized [B, in_chans, img_size, img_size] batches.

    backend "auto" uses DALI where it is installed and its pipeline runs, else torch, and says
    which and why in one log line (a WARNING when DALI is installed but fails); resuming from a
    `state` the torch loader wrote, it stays on torch. "dali" raises if DALI cannot run; "torch"
    never touches DALI. `state` is a loader's `state_dict()` (exact resume; its step wins over
    `start_step`). See the module docstring for the full contract.
    """
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'torch', not {backend!r}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
    if img_size < 1 or batch_size < 1:
        raise ValueError(f"img_size and batch_size must be positive, got {img_size} and {batch_size}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device")
    if state:
        if start_step and int(state["step"]) != start_step:
            raise ValueError(f"loader state is at step {state['step']} but start_step={start_step} was asked for")
        start_step = int(state["step"])
    files = scan_images(root_or_files)
    skipped, infos = 0, {}
    if validate:
        files, bad, infos = validate_images(files, in_chans, max_pixels=max_pixels)
        skipped = len(bad)
        for path, why in bad[:10]:
            log(f"skipping {path}: {why}")
    if skipped:
        log(f"skipped {skipped} image(s) (unreadable, too few bands or too many pixels{'; 10 named above' if skipped > 10 else ''}); "
            f"{len(files)} usable")
    if len(files) < dp_size:
        example = f" (e.g. {bad[0][0]}: {bad[0][1]})" if skipped else ""
        raise ValueError(f"{len(files)} usable images cannot be sharded over {dp_size} data-parallel ranks{example}")
    if (mean is None or std is None) and any(info.bits == 0 for info in infos.values()):
        mean, std = measure_stats(files, in_chans, num_files=64, seed=seed)  # same files on every rank
        log(f"float or signed imagery: normalizing with per-band statistics measured on up to 64 files: "
            f"mean {', '.join(f'{m:.4g}' for m in mean)}; std {', '.join(f'{v:.4g}' for v in std)} (pass mean/std to state them)")
    if mean is None or std is None:
        mean, std = default_stats(in_chans)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean/std need {in_chans} values (one per band), got {len(mean)}/{len(std)}")
    if any(v == 0 for v in std):
        raise ValueError(f"std must be non-zero in every band, got {tuple(std)} (constant imagery? pass std)")
    # DALI's own decoder takes 8-bit RGB JPEG/PNG only; TIFFs, 16-bit or float pixels and other band
    # counts go through external_source with this module's reader.
    external = in_chans != 3 or any(f.lower().endswith(TIFF_EXTS) or (f in infos and infos[f].bits != 8) for f in files)
    args = (files, img_size, batch_size, dp_rank, dp_size, seed, in_chans, tuple(mean), tuple(std),
            num_workers, device, start_step, skipped, external)
    if backend == "auto" and state and state.get("backend") == "torch":
        backend = "torch"
        log("data backend torch (auto: resuming a stream the torch loader started, which only it continues exactly)")
    loader = None
    if backend != "torch":
        try:
            loader = DaliPretrainLoader(*args, state=state)
        except Exception as e:  # noqa: BLE001 - any DALI failure means "use the torch pipeline"
            if backend == "dali":
                raise
            if isinstance(e, ImportError) and importlib.util.find_spec("nvidia.dali") is None:
                log("data backend torch (auto: nvidia-dali is not installed)")
            else:
                log(f"WARNING: data backend torch (auto: the DALI pipeline does not run here: {_short(e)})")
        else:
            if backend == "auto":
                log(f"data backend dali (auto: nvidia-dali is installed and its pipeline runs; "
                    f"{'GPU' if loader.device.type == 'cuda' else 'CPU'} decode)")
    if loader is None:
        loader = PretrainLoader(*args)
        if state:
            if state.get("backend", "torch") != "torch":
                log(f"WARNING: resuming a {state['backend']} stream with the torch loader: the batches differ from an uninterrupted run")
            loader.load_state_dict(state)
    log(f"{loader.backend} pipeline: {len(files)} images over {dp_size} DP rank(s), {loader.plan.per_rank} per rank "
        f"per epoch, batch {batch_size} x {in_chans} x {img_size}^2, starting at step {start_step}")
    return loader
