"""`rsscale data`: the bundled dataset of procedural aerial scenes, in the benchmarks' native formats.

A stand-in for MillionAID / LoveDA / DOTA so every reader, loader and metric runs on real files
without downloading anything. Deterministic: sample i of a split is a pure function of
(seed, split, i), so a rerun skips files already on disk and gives identical bytes.

    rsscale data --out data/synthetic --num-pretrain 512 --num-seg 64 --num-det 64 --size 256 --seed 0

Layout under <out> (mimicking the originals):
    pretrain/<theme>/P<id>.jpg                            MillionAID-like: JPEGs of varied size,
                                                          one folder per scene category (THEMES);
                                                          P<id>.tif with --bands 4: 16-bit RGB+NIR
    seg/{Train,Val}/{Urban,Rural}/images_png/<id>.png    LoveDA: RGB PNG
    seg/{Train,Val}/{Urban,Rural}/masks_png/<id>.png     LoveDA: uint8 mask, 0 no-data (a black
                                                          corner on ~15% of tiles), 1..7 = LOVEDA_CLASSES
    det/{train,val}/images/P<id>.png                      DOTA: RGB PNG
    det/{train,val}/labelTxt/P<id>.txt                    DOTA v1 label: "imagesource:", "gsd:"
                                                          lines, then "x1 y1 ... x4 y4 class difficult"
    manifest.json                                         generation parameters and counts

The pictures are scaling/data/scenes.py's; this module writes them, with their labels, in each
benchmark's layout, and finds or refuses a dataset for the commands that read one.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import tifffile
from PIL import Image

from rsscale.scaling.data.scenes import DET_CLASSES, LOVEDA_CLASSES, SCENE_SETS, THEMES, URBAN_THEMES, box_corners, nir_band, no_data_corner, scene
from rsscale.scaling.runtime.options import add_options, check, option, resolve

GSD = 0.5  # metres per pixel at size 256, written to the DOTA header
GENERATOR_VERSION = 3  # bump whenever a seed's pixels or labels change: old datasets get replaced


def log(msg: str) -> None:
    print(f"[data] {msg}", flush=True)


def dota_lines(boxes, gsd: float) -> list[str]:
    """DOTA v1 label file lines for scene boxes."""
    lines = ["imagesource:rsscale-synthetic", f"gsd:{gsd:.6g}"]
    for cx, cy, w, h, angle, name, difficult in boxes:
        xy = " ".join(f"{c:.2f}" for c in box_corners(cx, cy, w, h, angle).ravel())
        lines.append(f"{xy} {name} {difficult}")
    return lines


def _theme(seed: int, split: str, index: int) -> str:
    return str(np.random.default_rng([seed, sum(map(ord, split)), index, 1]).choice(list(THEMES)))


def _sample(seed: int, split: str, index: int, size, scenes: str = "base"):
    """(theme, scene) of sample `index` of a split: a pure function of its arguments."""
    theme = _theme(seed, split, index)
    return theme, scene(np.random.default_rng([seed, sum(map(ord, split)), index]), size, theme,
                        rich=scenes in ("rich", "vocab"), vocab=scenes == "vocab")


def _pretrain_size(seed: int, index: int, size: int) -> tuple[int, int]:
    """MillionAID images vary in size and aspect: sides in [0.75, 1.5] x size."""
    rng = np.random.default_rng([seed, 7, index])
    return tuple(int(s) for s in rng.integers(max(32, int(0.75 * size)), int(1.5 * size) + 1, 2))


def _val_count(n: int, fraction: float) -> int:
    """Validation tiles: the first round(n * fraction), at least one once there are two tiles."""
    return 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))


def _jobs(root, num_pretrain, num_seg, num_det, size, seed, val_fraction, bands, scenes):
    """(split, index, sample size, output paths, seed, scene set) for every sample of the dataset."""
    ext = "jpg" if bands == 3 else "tif"
    for i in range(num_pretrain):
        path = os.path.join(root, "pretrain", _theme(seed, "pretrain", i), f"P{i:06d}.{ext}")
        yield "pretrain", i, _pretrain_size(seed, i, size), [path], seed, scenes
    seg_val, det_val = _val_count(num_seg, val_fraction), _val_count(num_det, val_fraction)
    for i in range(num_seg):
        domain = "Urban" if _theme(seed, "seg", i) in URBAN_THEMES else "Rural"
        d = os.path.join(root, "seg", "Val" if i < seg_val else "Train", domain)
        paths = [os.path.join(d, "images_png", f"{i}.png"), os.path.join(d, "masks_png", f"{i}.png")]
        yield "seg", i, size, paths, seed, scenes
    for i in range(num_det):
        d = os.path.join(root, "det", "val" if i < det_val else "train")
        paths = [os.path.join(d, "images", f"P{i:04d}.png"), os.path.join(d, "labelTxt", f"P{i:04d}.txt")]
        yield "det", i, size, paths, seed, scenes


def _write_sample(job) -> None:
    split, i, size, paths, seed, scenes = job
    _, (rgb, mask, boxes) = _sample(seed, split, i, size, scenes)
    for p in paths:
        os.makedirs(os.path.dirname(p), exist_ok=True)
    if split == "pretrain" and paths[0].endswith(".tif"):  # 16-bit RGB + NIR, band-last
        tifffile.imwrite(paths[0], np.dstack([rgb, nir_band(rgb, mask)]).astype(np.uint16) * 257,
                         photometric="minisblack", planarconfig="contig")
    elif split == "pretrain":
        Image.fromarray(rgb).save(paths[0], quality=90)
    elif split == "seg":
        rgb, mask = no_data_corner(np.random.default_rng([seed, sum(map(ord, split)), i, 3]), rgb, mask)
        Image.fromarray(rgb).save(paths[0])
        Image.fromarray(mask).save(paths[1])
    else:
        Image.fromarray(rgb).save(paths[0])
        with open(paths[1], "w") as f:
            f.write("\n".join(dota_lines(boxes, GSD * 256 / min(rgb.shape[:2]))) + "\n")


def generate(root, num_pretrain: int = 512, num_seg: int = 64, num_det: int = 64, size: int = 256,
             seed: int = 0, val_fraction: float = 0.2, bands: int = 3, overwrite: bool = False,
             workers: int | None = None, scenes: str = "base") -> dict:
    """Write the dataset (skipping files already there unless overwrite) -> dict of paths.
    bands=4 writes the pretraining images as 16-bit RGB+NIR TIFFs instead of JPEGs.
    workers: processes (default min(4, CPUs)); the bytes written do not depend on it.
    scenes: "base"; "rich" for more regular structure a model can learn; "vocab" for rich plus
    roofs from a fixed Zipf-distributed vocabulary of designs (SCENE_SETS)."""
    if min(num_pretrain, num_seg, num_det) < 0 or size < 32:
        raise ValueError(f"counts must be >= 0 and size >= 32, got {num_pretrain}/{num_seg}/{num_det} and {size}")
    if scenes not in SCENE_SETS:
        raise ValueError(f"scenes must be one of {', '.join(SCENE_SETS)}, got {scenes!r}")
    if bands not in (3, 4):
        raise ValueError(f"bands must be 3 (RGB JPEG) or 4 (RGB+NIR TIFF), got {bands}")
    root = os.path.abspath(os.fspath(root))
    paths = dataset_paths(root)
    manifest = _manifest(num_pretrain, num_seg, num_det, size, seed, val_fraction, bands, scenes)
    old = _read_manifest(paths["manifest"])
    if old is not None and old != manifest:  # other parameters or generator: stale files would mix in
        log(f"{root} holds a dataset made with other parameters or an older generator; replacing it")
        for part in ("pretrain", "seg", "det"):
            shutil.rmtree(os.path.join(root, part), ignore_errors=True)
        os.remove(paths["manifest"])
    jobs = list(_jobs(root, num_pretrain, num_seg, num_det, size, seed, val_fraction, bands, scenes))
    todo = [j for j in jobs if overwrite or not all(os.path.exists(p) for p in j[3])]
    workers = min(4, os.cpu_count() or 1) if workers is None else max(1, workers)
    log(f"writing synthetic aerial dataset to {root}: {len(todo)} of {len(jobs)} samples to make "
        f"(seed {seed}, size {size}, {workers} worker(s))")
    t0 = time.time()
    pool = multiprocessing.Pool(workers) if workers > 1 and len(todo) > 8 else None
    try:
        results = pool.imap_unordered(_write_sample, todo, chunksize=4) if pool else map(_write_sample, todo)
        for done, _ in enumerate(results, 1):
            if done % 100 == 0 or done == len(todo):
                log(f"{done}/{len(todo)} samples ({(time.time() - t0) / done * 1000:.0f} ms each)")
    finally:
        if pool:
            pool.close()
            pool.join()
    if len(todo) < len(jobs):
        log(f"kept {len(jobs) - len(todo)} sample(s) already on disk (--overwrite regenerates them)")
    with open(paths["manifest"], "w") as f:
        json.dump(manifest, f, indent=1)
    log(f"done: {root}")
    return dataset_paths(root)


def _manifest(num_pretrain, num_seg, num_det, size, seed, val_fraction, bands, scenes="base", **_) -> dict:
    """What identifies a finished dataset (written last, so a missing one means unfinished)."""
    return dict(generator=GENERATOR_VERSION, num_pretrain=num_pretrain, num_seg=num_seg, num_det=num_det,
                size=size, seed=seed, val_fraction=val_fraction, bands=bands, det_classes=list(DET_CLASSES),
                seg_classes=["no-data", *LOVEDA_CLASSES], themes=sorted(THEMES),
                **({"scenes": scenes} if scenes != "base" else {}))  # base datasets keep their manifest


def _read_manifest(path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


LAYOUT = ("pretrain", "seg", "det", "manifest.json")  # everything generate() writes under its root
PARTS = {"pretrain": ("num_pretrain", "pretraining images"), "seg": ("num_seg", "segmentation tiles"),
         "det": ("num_det", "detection tiles")}


def dataset_paths(root) -> dict:
    """Where each part lives. seg_*_dirs list the LoveDA domain folders (Urban, Rural) that exist,
    each holding images_png/ and masks_png/ (what a LoveDA reader takes)."""
    root = os.path.abspath(os.fspath(root))
    paths = {"root": root, "manifest": os.path.join(root, "manifest.json"),
             "pretrain": os.path.join(root, "pretrain"),
             "seg_train": os.path.join(root, "seg", "Train"), "seg_val": os.path.join(root, "seg", "Val"),
             "det_train": os.path.join(root, "det", "train"), "det_val": os.path.join(root, "det", "val")}
    for split in ("seg_train", "seg_val"):
        domains = (os.path.join(paths[split], d) for d in ("Urban", "Rural"))
        paths[f"{split}_dirs"] = [d for d in domains if os.path.isdir(d)]
    return paths


def ensure_dataset(root, **kwargs) -> dict:
    """generate(root, **kwargs) unless that exact dataset is already finished there (then silent)."""
    args = inspect.signature(generate).bind(root, **kwargs)
    args.apply_defaults()
    paths = dataset_paths(root)
    if _read_manifest(paths["manifest"]) == _manifest(**args.arguments):
        return paths
    return generate(root, **kwargs)


def finished_manifest(root) -> dict | None:
    """The manifest of a dataset that generate() finished at root, else None."""
    manifest = _read_manifest(dataset_paths(root)["manifest"])
    return manifest if isinstance(manifest, dict) and "generator" in manifest else None


def dataset_for(root, part: str, **kwargs) -> dict:
    """dataset_paths(root) for a command that reads one part ("pretrain", "seg" or "det") there.
    A finished dataset is used as it is (never replaced); the bundled one (generate(root, **kwargs))
    is written only where root is missing, empty or holds an unfinished dataset. Anything else is
    refused: a command never writes into a folder of data it was asked to read."""
    name = os.fspath(root)
    manifest = finished_manifest(root)
    if manifest is None:
        if os.path.exists(name) and (not os.path.isdir(name) or set(os.listdir(name)) - set(LAYOUT)):
            raise FileNotFoundError(f"no synthetic dataset at {name} (no manifest.json) and it holds other files, so nothing "
                                    "is written there: write one with `rsscale data --out DIR` and pass --data DIR")
        generate(root, **kwargs)
        manifest = finished_manifest(root)
    key, what = PARTS[part]
    if not manifest.get(key):
        raise FileNotFoundError(f"the synthetic dataset at {name} has no {what} (written with --{key.replace('_', '-')} 0): "
                                "write one with `rsscale data --out DIR` and pass --data DIR")
    return dataset_paths(root)


# ----------------------------------------------------------------------------- CLI


@dataclass
class DataConfig:
    """Every option of `rsscale data`: where the dataset goes, how many samples of each part, their size and seed."""
    out: str = option("data/synthetic", "output folder")
    num_pretrain: int = option(512, "pretraining JPEGs (MillionAID-like)", ge=0)
    num_seg: int = option(64, "segmentation tiles (LoveDA layout)", ge=0)
    num_det: int = option(64, "detection tiles (DOTA layout)", ge=0)
    size: int = option(256, "tile side in pixels (pretraining images vary 0.75-1.5x)", ge=32)
    seed: int = option(0, "sample i of a split is a pure function of (seed, split, i)", ge=0)
    bands: int = option(3, "4: pretraining images as 16-bit RGB+NIR TIFFs (for --in-chans 4)", choices=(3, 4))
    val_fraction: float = option(0.2, "share of seg/det tiles in the val split", ge=0, lt=1)
    overwrite: bool = option(False, "regenerate files that already exist")
    workers: int | None = option(None, "processes (default: min(4, CPUs))", ge=1)
    scenes: str = option("base", "rich: regular crop rows, orchards, greenhouses and rows of houses along roads; "
                                 "vocab: rich plus roofs with designs from a fixed Zipf-distributed vocabulary", choices=SCENE_SETS)

    def __post_init__(self):
        check(self)


def add_arguments(parser) -> None:
    add_options(parser, DataConfig)


def config_from_args(args) -> DataConfig:
    return resolve(DataConfig, args)


def main(args) -> int:
    config = config_from_args(args)
    generate(config.out, num_pretrain=config.num_pretrain, num_seg=config.num_seg, num_det=config.num_det, size=config.size,
             seed=config.seed, val_fraction=config.val_fraction, bands=config.bands, overwrite=config.overwrite,
             workers=config.workers, scenes=config.scenes)
    return 0
