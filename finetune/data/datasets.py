"""Readers for the fine-tuning benchmarks' native formats, and DOTA's patch split/merge.

Every dataset returns `(image, target)`: `image` a uint8 tensor [3, H, W]; `target` a dict.
- Detection (DOTA, DIOR-R): `polys` float32 [K, 8] (corner points as annotated), `boxes` float32
  [K, 5] (their le90 minimum-area rectangles, see finetune.rotated), `labels` int64 [K],
  `difficult` bool [K], `image_id` str.
- Segmentation (LoveDA, Potsdam): `mask` int64 [H, W] with class indices and `ignore_index`
  (255) for pixels that do not count, `image_id` str.
No torchvision: images are read with Pillow (PNG/JPEG) or tifffile (TIFF).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from rsscale.finetune.data.dota_io import (
    DIOR_CLASSES,
    DOTA_V1_CLASSES,
    DotaObject,
    read_dota_labels,
    read_dota_submission,
    read_image_ids,
    write_dota_label_file,
    write_dota_submission,
)
from rsscale.finetune.rotated import (
    batched_poly_nms,
    batched_rotated_nms,
    convex_intersection_points,
    hull_area,
    min_area_rect,
    obb_to_poly,
    poly_area,
    poly_to_obb,
)
from rsscale.scaling.data.scenes import LOVEDA_CLASSES

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
POTSDAM_CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
POTSDAM_COLOURS = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
POTSDAM_BOUNDARY = (0, 0, 0)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


# --------------------------------------------------------------------------- image files
def read_rgb_image(path) -> torch.Tensor:
    """An RGB image file (PNG/JPEG/TIFF) -> uint8 tensor [3, H, W]; extra bands (e.g. IR) dropped."""
    arr = _read_array(path)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise ValueError(f"{path}: expected an RGB image, got an array of shape {arr.shape}.")
    if arr.dtype != np.uint8:
        raise ValueError(f"{path}: expected 8-bit pixels, got {arr.dtype}.")
    return torch.from_numpy(np.ascontiguousarray(arr[..., :3].transpose(2, 0, 1)))


def _read_array(path, label: bool = False) -> np.ndarray:
    """Pixels of an image file; label files keep palette ('P') PNGs as their indices."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such image file: {path}.")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return np.asarray(tifffile.imread(path))
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # DOTA-v2 has 20000 x 20000 images
    try:
        with Image.open(path) as im:
            if im.mode not in (("L", "RGB", "RGBA", "P") if label else ("L", "RGB", "RGBA")):
                im = im.convert("RGB")
            return np.asarray(im)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _find_image(folder: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        for cand in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if cand.exists():
                return cand
    raise FileNotFoundError(f"no image named {stem}.* ({'/'.join(IMAGE_SUFFIXES)}) in {folder}.")


# --------------------------------------------------------------------------- detection readers
def read_dior_xml(path) -> list[DotaObject]:
    """Parse one DIOR-R annotation (Pascal-VOC-like XML): each `object` has a `robndbox` with the
    corner points x/y_left_top, _right_top, _right_bottom, _left_bottom (in that polygon order).
    Class names are lower-cased (DIOR writes e.g. 'Expressway-Service-area'); the `angle` field
    is redundant with the corners and not read."""
    root = ET.parse(path).getroot()
    objects = []
    for obj in root.iter("object"):
        box = obj.find("robndbox")
        if box is None:
            raise ValueError(f"{path}: an object has no <robndbox> (not a DIOR-R oriented annotation).")
        try:
            poly = tuple(float(box.find(f"{ax}_{corner}").text)
                         for corner in ("left_top", "right_top", "right_bottom", "left_bottom") for ax in "xy")
        except AttributeError:
            raise ValueError(f"{path}: a <robndbox> lacks one of its 8 corner coordinates.") from None
        difficult = obj.findtext("difficult", "0").strip() not in ("0", "")
        objects.append(DotaObject(poly, obj.findtext("name").strip().lower(), difficult))
    return objects


def objects_to_target(objects: list[DotaObject], classes, image_id: str) -> dict:
    """DotaObjects -> the detection target dict (see module doc)."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({o.cls for o in objects} - set(index))
    if unknown:
        raise ValueError(f"{image_id}: classes {unknown} are not in the dataset's class list.")
    polys = torch.tensor([o.poly for o in objects], dtype=torch.float32).reshape(-1, 8)
    return {
        "polys": polys,
        "boxes": poly_to_obb(polys),
        "labels": torch.tensor([index[o.cls] for o in objects], dtype=torch.int64),
        "difficult": torch.tensor([o.difficult for o in objects], dtype=torch.bool),
        "image_id": image_id,
    }


class DetectionDataset(torch.utils.data.Dataset):
    """Images in `image_dir` named by id, with objects from `read_objects(image_id)`."""

    def __init__(self, image_dir, ids, read_objects, classes):
        self.image_dir, self.ids, self.classes = Path(image_dir), list(ids), tuple(classes)
        self.read_objects = read_objects
        if not self.ids:
            raise ValueError(f"no annotated images for {image_dir}.")

    def __len__(self) -> int:
        return len(self.ids)

    def source(self, i) -> str:
        """The files sample i is read from (for error messages)."""
        return f"{self.image_dir / self.ids[i]}.* (image) with its objects"

    def __getitem__(self, i):
        image_id = self.ids[i]
        image = read_rgb_image(_find_image(self.image_dir, image_id))
        return image, objects_to_target(self.read_objects(image_id), self.classes, image_id)


def DotaDataset(image_dir, label_dir, classes=DOTA_V1_CLASSES, image_ids=None) -> DetectionDataset:
    """DOTA in its native layout: `images/<id>.png` and `labelTxt/<id>.txt`. Use `split_image`
    for 1024-px training patches."""
    labels = read_dota_labels(label_dir, image_ids)
    return DetectionDataset(image_dir, labels, labels.__getitem__, classes)


def DiorRDataset(image_dir, ann_dir, classes=DIOR_CLASSES, image_ids=None) -> DetectionDataset:
    """DIOR-R: JPEG images and oriented-box XML files (`<id>.jpg`, `<id>.xml`; folders may be equal)."""
    ann_dir = Path(ann_dir)
    ids = read_image_ids(image_ids) or sorted(p.stem for p in ann_dir.glob("*.xml"))
    return DetectionDataset(image_dir, ids, lambda i: read_dior_xml(ann_dir / f"{i}.xml"), classes)


# --------------------------------------------------------------------------- segmentation readers
def loveda_mask(raw: np.ndarray) -> np.ndarray:
    """LoveDA mask values -> class indices: 0 (no-data) -> ignore, 1..7 -> 0..6."""
    if raw.ndim != 2:
        raise ValueError(f"a LoveDA mask has one channel, got shape {raw.shape}.")
    if raw.max(initial=0) > 7:
        raise ValueError(f"LoveDA mask values must be in 0..7, got {raw.max()}.")
    out = raw.astype(np.int64) - 1
    out[raw == 0] = IGNORE_INDEX
    return out


def potsdam_mask(raw: np.ndarray, clutter: bool = True, strict: bool = True) -> np.ndarray:
    """Potsdam label tile -> class indices.

    Colour tiles [H, W, 3] use the ISPRS colours (POTSDAM_COLOURS, in POTSDAM_CLASSES order);
    boundary (0, 0, 0) is ignored. Index tiles [H, W] use mmseg's converted format: 0 = boundary
    (ignored), 1..6 = the classes. With `clutter=False`, clutter pixels are ignored too (5 classes).
    Unknown colours are an error with `strict`, else ignored.
    """
    if raw.ndim == 2:
        out = raw.astype(np.int64) - 1
        if out.max(initial=0) > 5:
            raise ValueError(f"Potsdam index labels must be in 0..6, got {raw.max()}.")
        out[raw == 0] = IGNORE_INDEX
    elif raw.ndim == 3 and raw.shape[-1] >= 3:
        rgb = raw[..., :3].astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        out = np.full(code.shape, -1, dtype=np.int64)
        for idx, (r, g, b) in enumerate(POTSDAM_COLOURS):
            out[code == (r << 16 | g << 8 | b)] = idx
        out[code == 0] = IGNORE_INDEX
        bad = out < 0
        if bad.any():
            if strict:
                y, x = np.argwhere(bad)[0]
                raise ValueError(f"{int(bad.sum())} label pixels have colours outside the Potsdam table, "
                                 f"e.g. {tuple(int(v) for v in rgb[y, x])} at ({x}, {y}).")
            out[bad] = IGNORE_INDEX
    else:
        raise ValueError(f"a Potsdam label tile is [H, W] or [H, W, 3], got shape {raw.shape}.")
    if not clutter:
        out[out == 5] = IGNORE_INDEX
    return out


class SegFolderDataset(torch.utils.data.Dataset):
    """Image tiles and label tiles in two folders, paired by name: `image_dir/<stem><suffix>`
    with `label_dir/<stem'><suffix>` where stem' = stem with `image_tag` replaced by `label_tag`
    (e.g. Potsdam's `..._RGB.tif` / `..._label.tif`, mmseg's `_img` / `_label`)."""

    def __init__(self, image_dir, label_dir, convert, image_tag: str = "", label_tag: str = ""):
        self.image_dir, self.label_dir, self.convert = Path(image_dir), Path(label_dir), convert
        self.image_tag, self.label_tag = image_tag, label_tag
        self.images = sorted(p for p in self.image_dir.iterdir()
                             if p.suffix.lower() in IMAGE_SUFFIXES and image_tag in p.stem)
        if not self.images:
            raise ValueError(f"no image tiles in {image_dir}.")

    def __len__(self) -> int:
        return len(self.images)

    def source(self, i) -> str:
        """The files sample i is read from (for error messages)."""
        return f"{self.images[i]} (label in {self.label_dir})"

    def __getitem__(self, i):
        path = self.images[i]
        stem = path.stem.replace(self.image_tag, self.label_tag) if self.image_tag else path.stem
        mask = self.convert(_read_array(_find_image(self.label_dir, stem), label=True))
        image = read_rgb_image(path)
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise ValueError(f"{path.name}: label size {mask.shape} differs from image size {tuple(image.shape[1:])}.")
        return image, {"mask": torch.from_numpy(mask), "image_id": path.stem}


def LoveDADataset(root) -> SegFolderDataset:
    """LoveDA split folder with `images_png/` (or `img/`) and `masks_png/` (or `mask/`); 7 classes."""
    root = Path(root)
    pick = lambda *names: next((root / n for n in names if (root / n).is_dir()), root / names[0])  # noqa: E731
    return SegFolderDataset(pick("images_png", "img"), pick("masks_png", "mask"), loveda_mask)


def PotsdamDataset(image_dir, label_dir, clutter: bool = True, image_tag: str = "_RGB",
                   label_tag: str = "_label", strict: bool = True) -> SegFolderDataset:
    """Potsdam tiles (RGB TIFF/PNG) with colour-coded or index labels; 6 classes, 5 without clutter."""
    return SegFolderDataset(image_dir, label_dir, lambda raw: potsdam_mask(raw, clutter, strict),
                            image_tag, label_tag)


# --------------------------------------------------------------------------- DOTA split / merge
class Patch(NamedTuple):
    image: torch.Tensor  # [C, patch, patch], zero-padded at the right/bottom edges
    target: dict  # polys/boxes/labels/difficult in patch coordinates
    offset: tuple  # (x0, y0) of the patch in the (rescaled) image
    rate: float = 1.0  # the image was resized by this factor before the split


def patch_starts(size: int, patch: int, overlap: int) -> list[int]:
    """Patch origins along one axis, like DOTA_devkit's ImgSplit: step patch - overlap, the last
    patch moved back to end at the image border (one patch at 0 for small images)."""
    if not 0 <= overlap < patch:
        raise ValueError(f"overlap must be in [0, patch), got overlap={overlap}, patch={patch}.")
    starts, s = [], 0
    while True:
        if s + patch >= size:
            starts.append(max(size - patch, 0))
            return starts
        starts.append(s)
        s += patch - overlap


def patch_id(image_id: str, x0: int, y0: int, rate: float = 1.0) -> str:
    """Patch name in DOTA_devkit's convention, `<image>__<rate>__<x0>___<y0>` (x0, y0 in the
    image resized by rate; rate written as 1, 0.5, 1.5)."""
    return f"{image_id}__{rate:g}__{x0}___{y0}"


def parse_scaled_patch_id(name: str) -> tuple[str, float, int, int]:
    """`<image>__<rate>__<x0>___<y0>` -> (image, rate, x0, y0)."""
    try:
        head, y0 = name.rsplit("___", 1)
        image_id, rate, x0 = head.rsplit("__", 2)
        if not float(rate) > 0:
            raise ValueError
        return image_id, float(rate), int(x0), int(y0)
    except ValueError:
        raise ValueError(f"{name!r} is not a patch name '<image>__<rate>__<x0>___<y0>'.") from None


def parse_patch_id(name: str) -> tuple[str, int, int]:
    """`<image>__1__<x0>___<y0>` -> (image, x0, y0); only rate 1 (no rescaling)."""
    image_id, rate, x0, y0 = parse_scaled_patch_id(name)
    if rate != 1.0:
        raise ValueError(f"{name!r} is not a rate-1 patch name '<image>__1__<x0>___<y0>'.")
    return image_id, x0, y0


def split_image(image: torch.Tensor, objects: dict, patch: int = 1024, overlap: int = 200,
                keep_thr: float = 0.7) -> list[Patch]:
    """Cut a large image [C, H, W] and its objects (a detection target dict) into overlapping
    patches, following DOTA_devkit's ImgSplit rule: an object is kept in a patch when the patch
    covers >= keep_thr of its area; a partly covered kept object becomes the minimum-area rectangle
    of its part inside the patch and is marked difficult; fully covered objects are unchanged.
    Patches without objects are returned too (the caller decides whether to train on them)."""
    if image.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got shape {tuple(image.shape)}.")
    _, h, w = image.shape
    polys = objects["polys"].to(torch.float64).reshape(-1, 4, 2)
    patches = []
    for y0 in patch_starts(h, patch, overlap):
        for x0 in patch_starts(w, patch, overlap):
            crop = image[:, y0:y0 + patch, x0:x0 + patch]
            canvas = image.new_zeros(image.shape[0], patch, patch)
            canvas[:, :crop.shape[1], :crop.shape[2]] = crop
            patches.append(Patch(canvas, _objects_in_window(objects, polys, x0, y0, patch, keep_thr), (x0, y0)))
    return patches


def rescale_sample(image: torch.Tensor, objects: dict, rate: float) -> tuple[torch.Tensor, dict]:
    """Resize an image [C, H, W] by `rate` (bilinear, antialiased when shrinking; the dtype kept)
    and scale its objects' coordinates alike, as DOTA_devkit's multi-scale split does."""
    if not rate > 0:
        raise ValueError(f"rates must be > 0, got {rate}.")
    if rate == 1.0:
        return image, objects
    _, h, w = image.shape
    size = (max(1, round(h * rate)), max(1, round(w * rate)))
    out = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                                          antialias=rate < 1)[0]
    if not image.is_floating_point():
        out = out.round().clamp(torch.iinfo(image.dtype).min, torch.iinfo(image.dtype).max)
    scaled = dict(objects, polys=objects["polys"] * rate)
    if "boxes" in objects:
        scaled["boxes"] = torch.cat([objects["boxes"][:, :4] * rate, objects["boxes"][:, 4:]], 1)
    return out.to(image.dtype), scaled


def split_image_multiscale(image: torch.Tensor, objects: dict, rates=(1.0,), patch: int = 1024, overlap: int = 200,
                           keep_thr: float = 0.7) -> list[Patch]:
    """DOTA's multi-scale split: the image (and its objects) resized by each rate, then
    `split_image`; patches carry their rate and are named `<image>__<rate>__<x0>___<y0>`. The
    usual protocol: rates (0.5, 1.0, 1.5), patch 1024, overlap 500 (200 for rate 1 alone)."""
    patches = []
    for rate in rates:
        img, obj = rescale_sample(image, objects, float(rate))
        for p in split_image(img, obj, patch, overlap, keep_thr):
            p.target["image_id"] = patch_id(objects.get("image_id", "image"), *p.offset, rate=float(rate))
            patches.append(p._replace(rate=float(rate)))
    return patches


def _objects_in_window(objects, polys, x0, y0, patch, keep_thr) -> dict:
    """The objects of one patch (see split_image). Objects whose enclosing box lies inside the
    window are kept as they are; only those crossing its border are clipped exactly."""
    lo, hi = polys.amin(1), polys.amax(1)  # [K, 2] enclosing boxes
    win_lo, win_hi = polys.new_tensor([x0, y0]), polys.new_tensor([x0 + patch, y0 + patch])
    inside = ((lo >= win_lo) & (hi <= win_hi)).all(1)
    crossing = torch.nonzero(((lo < win_hi) & (hi > win_lo)).all(1) & ~inside)[:, 0]
    new = polys.clone()
    keep = inside.clone()
    if crossing.numel():
        part = polys[crossing]
        rect = torch.stack([win_lo, torch.stack([win_hi[0], win_lo[1]]), win_hi, torch.stack([win_lo[0], win_hi[1]])])
        pts, valid = convex_intersection_points(part, rect.expand(len(crossing), 4, 2))
        ratio = hull_area(pts, valid) / poly_area(part.flatten(1)).clamp_min(1e-12)  # covered fraction
        ok = (ratio >= keep_thr) & (valid.sum(1) >= 3)
        full = ratio >= 1 - 1e-6  # on the border but not beyond it
        clip = ok & ~full
        keep[crossing[ok]] = True
        inside[crossing[full]] = True
        if clip.any():  # the minimum-area rectangle of the part inside the window
            new[crossing[clip]] = obb_to_poly(min_area_rect(pts[clip], valid[clip])).view(-1, 4, 2)
    new = (new[keep] - win_lo).clamp_min(0).clamp_max(float(patch)).flatten(1).float()
    return {
        "polys": new,
        "boxes": poly_to_obb(new),
        "labels": objects["labels"][keep],
        "difficult": (objects["difficult"] | ~inside)[keep],
        "image_id": patch_id(objects.get("image_id", "image"), x0, y0),
    }


def merge_detections(patch_dets: list[dict], offsets, nms_iou: float = 0.1, rates=None, max_dets: int | None = None) -> dict:
    """Map per-patch detections ({"boxes" [K, 5], "scores" [K], "labels" [K]}) back to image
    coordinates by their patch offsets (x0, y0) and, for a multi-scale split, divided by the
    patches' rates; keep the best `max_dets` (all when None); then class-wise rotated NMS over the
    whole image (the duplicates come from overlapping patches and scales; 0.1 is the usual DOTA
    merge threshold)."""
    rates = [1.0] * len(offsets) if rates is None else list(rates)
    if not len(patch_dets) == len(offsets) == len(rates):
        raise ValueError(f"got {len(patch_dets)} patch results but {len(offsets)} offsets and {len(rates)} rates.")
    boxes, scores, labels = [], [], []
    for dets, (x0, y0), rate in zip(patch_dets, offsets, rates):
        b = dets["boxes"].clone()
        b[:, 0] += x0
        b[:, 1] += y0
        b[:, :4] /= rate
        boxes.append(b)
        scores.append(dets["scores"])
        labels.append(dets["labels"])
    if not boxes:
        return {"boxes": torch.zeros(0, 5), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    if max_dets is not None and len(scores) > max_dets:
        best = scores.topk(max_dets).indices
        boxes, scores, labels = boxes[best], scores[best], labels[best]
    keep = batched_rotated_nms(boxes, scores, labels, nms_iou)
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def merge_dota_submission(dets: dict, nms_iou: float = 0.1) -> dict:
    """Patch-level Task1 detections {class: [(patch name, score, poly8)]} -> image-level ones:
    polygons shifted by the offsets in the patch names and divided by their rates (multi-scale
    splits), then polygon NMS per image and class
    (DOTA_devkit's ResultMerge step); one batched NMS call per class. mmrotate merges at IoU 0.1;
    DOTA_devkit's example at 0.3 (with 0.3 this reproduces the devkit's merged plane file of the
    shared DOTA sample up to which of two equal-score duplicates survives)."""
    merged = {}
    for cls, rows in dets.items():
        names = [parse_scaled_patch_id(name) for name, _, _ in rows]
        images = sorted({image_id for image_id, _, _, _ in names})
        index = {image_id: i for i, image_id in enumerate(images)}
        polys = torch.tensor([poly for _, _, poly in rows], dtype=torch.float64).reshape(-1, 8)
        shift = torch.tensor([[x0, y0] for _, _, x0, y0 in names], dtype=torch.float64).reshape(-1, 2)
        rate = torch.tensor([r for _, r, _, _ in names], dtype=torch.float64).reshape(-1, 1)
        polys = (polys + shift.repeat(1, 4)) / rate
        scores = torch.tensor([score for _, score, _ in rows], dtype=torch.float64)
        groups = torch.tensor([index[image_id] for image_id, _, _, _ in names], dtype=torch.long)
        keep = batched_poly_nms(polys, scores, groups, nms_iou).tolist()
        merged[cls] = [(names[k][0], rows[k][1], polys[k].tolist()) for k in keep]
    return merged


def split_dota(image_dir, label_dir, out_dir, patch: int = 1024, overlap: int = 200,
               classes=DOTA_V1_CLASSES, keep_empty: bool = False, rates=(1.0,)) -> int:
    """Split a DOTA folder pair into `out_dir/images/*.png` + `out_dir/labelTxt/*.txt` patches
    named `<image>__<rate>__<x0>___<y0>` (DOTA_devkit's ImgSplit layout; one set of patches per
    rate of `split_image_multiscale`); returns the patch count."""
    from PIL import Image

    ds = DotaDataset(image_dir, label_dir, classes)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labelTxt").mkdir(parents=True, exist_ok=True)
    count = 0
    for i in range(len(ds)):
        image, target = ds[i]
        for p in split_image_multiscale(image, target, rates, patch, overlap):
            if not keep_empty and len(p.target["labels"]) == 0:
                continue
            name = p.target["image_id"]
            Image.fromarray(p.image.permute(1, 2, 0).numpy()).save(out / "images" / f"{name}.png")
            write_dota_label_file(out / "labelTxt" / f"{name}.txt", p.target, classes)
            count += 1
        log.info("split %s (%d/%d): %d patches so far", target["image_id"], i + 1, len(ds), count)
    return count


def main(argv=None) -> int:
    """DOTA patch tools: `split` an images/labelTxt folder pair into patches, or `merge`
    a patch-level Task1 submission into an image-level one."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rsscale.finetune.data.datasets", description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("split", help="cut images + labelTxt into overlapping patches")
    sp.add_argument("root", help="folder with images/ and labelTxt/")
    sp.add_argument("out", help="output folder (gets images/ and labelTxt/)")
    sp.add_argument("--patch", type=int, default=1024)
    sp.add_argument("--overlap", type=int, default=200, help="200 single-scale; the multi-scale protocol uses 500")
    sp.add_argument("--rates", default="1.0", help="resize factors, e.g. 0.5,1.0,1.5 (DOTA multi-scale)")
    sp.add_argument("--keep-empty", action="store_true", help="also write patches without objects")
    mp = sub.add_parser("merge", help="merge patch-level Task1_<class>.txt files into image level")
    mp.add_argument("dets", help="folder of patch-level Task1_<class>.txt")
    mp.add_argument("out", help="output folder for image-level Task1_<class>.txt")
    mp.add_argument("--nms-iou", type=float, default=0.1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "split":
        root = Path(args.root)
        try:
            rates = tuple(float(r) for r in args.rates.split(","))
        except ValueError:
            parser.error(f"--rates must be comma-separated numbers, got {args.rates!r}")
        n = split_dota(root / "images", root / "labelTxt", args.out, args.patch, args.overlap,
                       keep_empty=args.keep_empty, rates=rates)
        print(f"wrote {n} patches to {args.out}")
    else:
        merged = merge_dota_submission(read_dota_submission(args.dets), args.nms_iou)
        write_dota_submission(merged, args.out)
        print(f"wrote {sum(len(v) for v in merged.values())} detections to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
