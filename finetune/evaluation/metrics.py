"""Evaluation metrics: DOTA-style rotated-detection mAP and semantic-segmentation scores.

Detection follows DOTA's official Task1 evaluator (`dota_evaluation_task1.py`) by default:
per class, detections sorted by score are matched greedily to the ground truth of their image
with polygon IoU > 0.5 (strict); a detection matching an already-matched object is a false
positive; difficult objects are not positives, and a detection whose best match is difficult is
neither a true nor a false positive; AP is VOC07 11-point (or all-point) and mAP is the mean over
all evaluated classes (a class without non-difficult ground truth scores 0, as in the official
script with its fixed class list; `mAP_with_gt`, shown beside it, averages only the classes with
ground truth). Detections with equal scores are ordered as the official
script orders them (`tie_order="devkit"`, the default): `np.argsort(-confidence)` over the class's
detections in submission order, numpy's default (unstable) sort. `tie_order="stable"` keeps
submission order among equal scores instead. Ties matter: on the shared DOTA sample the plane AP
is 97.54 in the devkit's order and 96.45 with a stable sort.

`mode="mmrotate"` reproduces mmrotate's numbers instead: IoU of the minimum-area rotated
rectangles, match at IoU >= threshold, difficult objects counted as ordinary ones, and the mean
taken only over classes that have ground truth.

Formats: detections are `{class: [(image_id, score, [x1, y1, ..., x4, y4]), ...]}`, the content
of a DOTA Task1 submission (a folder of `Task1_<class>.txt` with lines
`image score x1 y1 ... x4 y4`); ground truth is `{image_id: [DotaObject, ...]}` as read from a
labelTxt folder by `finetune.dota_io.read_dota_labels`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from rsscale.finetune.data import dota_io
from rsscale.finetune.data.dota_io import read_dota_labels, read_dota_submission
from rsscale.finetune.rotated import obb_to_poly, poly_iou_aligned, poly_to_obb, rotated_iou_aligned

MODES = ("dota", "mmrotate")
TIE_ORDERS = ("devkit", "stable")


# --------------------------------------------------------------------------- AP
def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """Area under the precision/recall curve: VOC07 11-point interpolation (max precision at
    recall >= 0, 0.1, ..., 1) or all-point (area under the monotone precision envelope)."""
    recall, precision = np.asarray(recall, float), np.asarray(precision, float)
    if use_07_metric:
        return float(sum(
            (precision[recall >= t].max() if (recall >= t).any() else 0.0) / 11
            for t in np.linspace(0, 1, 11)
        ))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(((mrec[step + 1] - mrec[step]) * mpre[step + 1]).sum())


def evaluate_dota(detections, ground_truth, iou_thr: float = 0.5, use_07_metric: bool = True,
                  mode: str = "dota", classes=None, ignore_difficult: bool | None = None,
                  tie_order: str = "devkit") -> dict:
    """Rotated-detection mAP (see the module doc for the rules of each mode).

    detections: {class: [(image, score, poly8)]} or a Task1 submission folder.
    ground_truth: {image: [DotaObject]} or a DOTA labelTxt folder.
    classes: classes to evaluate (default: every class in the ground truth or the detections).
    ignore_difficult: override the mode's handling of difficult objects (DOTA-v1.5's official
    script counts every object: pass False there).
    Returns {"mAP": float, "mAP_with_gt": float, "classes": {class: {"ap", "num_gt", "num_dets",
    "tp", "fp", "recall", "precision"}}} with recall/precision those at the last detection;
    mAP_with_gt averages only the classes with (non-difficult) ground truth, which DOTA's official
    mAP also counts, as 0, when they are in the class list.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"tie_order must be one of {TIE_ORDERS}, got {tie_order!r}.")
    if isinstance(detections, (str, Path)):
        detections = read_dota_submission(detections)
    if isinstance(ground_truth, (str, Path)):
        ground_truth = read_dota_labels(ground_truth)
    unknown = {img for rows in detections.values() for img, _, _ in rows} - set(ground_truth)
    if unknown:
        raise ValueError(f"detections name {len(unknown)} images without ground truth, e.g. {sorted(unknown)[0]!r}.")
    if ignore_difficult is None:
        ignore_difficult = mode == "dota"
    if classes is None:
        classes = sorted({o.cls for objs in ground_truth.values() for o in objs} | set(detections))
    per_class = {
        cls: _evaluate_class(detections.get(cls, []), ground_truth, cls, iou_thr, use_07_metric,
                             mode, ignore_difficult, tie_order)
        for cls in classes
    }
    with_gt = [r["ap"] for r in per_class.values() if r["num_gt"] > 0]
    aps = [r["ap"] for r in per_class.values()] if mode == "dota" else with_gt
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"mAP": mean(aps), "mAP_with_gt": mean(with_gt), "classes": per_class}


def _evaluate_class(dets, ground_truth, cls, iou_thr, use_07_metric, mode, ignore_difficult, tie_order) -> dict:
    gts = {}
    for img, objs in ground_truth.items():
        mine = [o for o in objs if o.cls == cls]
        polys = np.array([o.poly for o in mine], dtype=np.float64).reshape(-1, 8)
        difficult = np.array([o.difficult and ignore_difficult for o in mine], dtype=bool)
        gts[img] = (polys, difficult)
    npos = int(sum((~d).sum() for _, d in gts.values()))

    confidence = np.array([d[1] for d in dets], dtype=np.float64)
    order = np.argsort(-confidence, kind="stable" if tie_order == "stable" else None)
    dets = [dets[k] for k in order]
    ious = _ious_by_image(dets, gts, mode)
    matched = {img: np.zeros(len(p), dtype=bool) for img, (p, _) in gts.items()}
    tp = np.zeros(len(dets))
    fp = np.zeros(len(dets))
    for k, (img, _, _) in enumerate(dets):
        iou = ious[k]
        difficult = gts[img][1]
        if iou.size == 0:
            fp[k] = 1
            continue
        j = int(iou.argmax())
        hit = iou[j] > iou_thr if mode == "dota" else iou[j] >= iou_thr
        if not hit:
            fp[k] = 1
        elif difficult[j]:
            continue  # neither true nor false positive
        elif matched[img][j]:
            fp[k] = 1
        else:
            tp[k] = 1
            matched[img][j] = True
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    if npos == 0:
        ap = 0.0 if mode == "dota" else float("nan")
        recall = np.zeros_like(tp)
    else:
        recall = tp / npos
        ap = voc_ap(recall, tp / np.maximum(tp + fp, np.finfo(np.float64).eps), use_07_metric)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return {
        "ap": ap, "num_gt": npos, "num_dets": len(dets),
        "tp": int(tp[-1]) if len(dets) else 0, "fp": int(fp[-1]) if len(dets) else 0,
        "recall": float(recall[-1]) if len(dets) else 0.0,
        "precision": float(precision[-1]) if len(dets) else 0.0,
    }


def _ious_by_image(dets, gts, mode) -> list[np.ndarray]:
    """IoU of each (score-sorted) detection with every object of its image. The candidate pairs
    of all images (same image, overlapping enclosing boxes of the shapes the IoU is taken of: the
    polygons, or under mmrotate their minimum-area rectangles, which can reach past a polygon's
    own box) go through one batched IoU call."""
    def extent(polys: np.ndarray) -> np.ndarray:  # [n, 4, 2] corners whose min/max enclose the scored shape
        if mode != "dota" and len(polys):
            polys = obb_to_poly(poly_to_obb(torch.from_numpy(polys.reshape(-1, 8)))).numpy()
        return polys.reshape(-1, 4, 2)

    by_image: dict[str, list[int]] = {}
    for k, (img, _, _) in enumerate(dets):
        by_image.setdefault(img, []).append(k)
    det_polys = np.array([d[2] for d in dets], dtype=np.float64).reshape(-1, 8)
    out: list[np.ndarray] = [np.zeros(0)] * len(dets)
    pair_d, pair_g, blocks = [], [], []
    for img, ks in by_image.items():
        g = gts[img][0]
        d, e = extent(det_polys[ks]), extent(g)
        lo_d, hi_d = d.min(1), d.max(1)
        lo_g, hi_g = e.min(1), e.max(1)
        overlap = ((lo_d[:, None] <= hi_g[None]) & (lo_g[None] <= hi_d[:, None])).all(-1)  # [len(ks), len(g)]
        a, b = np.nonzero(overlap)
        pair_d.append(np.asarray(ks)[a])
        pair_g.append(g[b])
        blocks.append((ks, a, b, len(g)))
    if dets:
        p_det = torch.from_numpy(np.concatenate([det_polys[p] for p in pair_d]).reshape(-1, 8))
        p_gt = torch.from_numpy(np.concatenate(pair_g).reshape(-1, 8))
        if mode == "dota":
            values = poly_iou_aligned(p_det, p_gt).numpy()
        else:
            values = rotated_iou_aligned(poly_to_obb(p_det), poly_to_obb(p_gt)).numpy()
    start = 0
    for ks, a, b, num_gt in blocks:
        m = np.zeros((len(ks), num_gt))
        m[a, b] = values[start:start + len(a)]
        start += len(a)
        for row, k in enumerate(ks):
            out[k] = m[row]
    return out


def format_ap_table(result: dict) -> str:
    """Per-class AP table (percent) as Markdown. Classes without ground truth are marked and the
    table says which classes each mean counts: the official mAP scores them 0, which hides how
    well the classes that are there were found."""
    pct = lambda v: "n/a" if math.isnan(v) else f"{100 * v:.2f}"  # noqa: E731
    lines = ["| class | AP | gt | dets |", "|---|---:|---:|---:|"]
    for cls, r in result["classes"].items():
        lines.append(f"| {cls if r['num_gt'] else f'{cls} (no GT)'} | {pct(r['ap'])} | {r['num_gt']} | {r['num_dets']} |")
    lines.append(f"| **mAP** | **{pct(result['mAP'])}** | | |")
    lines.append(f"| mAP over classes with GT | {pct(result['mAP_with_gt'])} | | |")
    counted = sum(not math.isnan(r["ap"]) for r in result["classes"].values())
    with_gt = sum(r["num_gt"] > 0 for r in result["classes"].values())
    zeros = f", {counted - with_gt} without GT scored 0 (DOTA's official rule)" if counted > with_gt else ""
    lines.append(f"\nmAP averages {counted} classes{zeros}; mAP over classes with GT averages {with_gt}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- segmentation
class SegMetric:
    """Confusion-matrix accumulator for semantic segmentation.

    `update(pred, target)` takes class indices (or logits [B, C, H, W], arg-maxed over C) and
    targets with `ignore_index` for pixels that do not count. `compute()` gives per-class IoU,
    precision, recall and F1, their means, and overall accuracy. A class absent from both
    predictions and targets has 0/0 for its scores: it is reported as NaN and left out of the
    means (so mIoU averages only classes that occur), the convention of mmseg.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, class_names=None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [target, pred]

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.is_floating_point() and pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}.")
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()  # counted on their device
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        c = self.num_classes
        if target.numel() and (target.min() < 0 or target.max() >= c):
            raise ValueError(f"target holds labels outside [0, {c}) that are not ignore_index={self.ignore_index}.")
        if pred.numel() and (pred.min() < 0 or pred.max() >= c):
            raise ValueError(f"pred holds labels outside [0, {c}).")
        self.confusion += torch.bincount(target * c + pred, minlength=c * c).reshape(c, c).cpu()

    def compute(self) -> dict:
        """{"IoU", "F1", "precision", "recall": per-class float64 tensors (NaN where undefined),
        "mIoU", "mF1", "OA", "mAcc": floats}."""
        cm = self.confusion.double()
        tp = cm.diag()
        gt, pr = cm.sum(1), cm.sum(0)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        div = lambda a, b: torch.where(b > 0, a / b.clamp_min(1), nan)  # noqa: E731
        iou = div(tp, gt + pr - tp)
        f1 = div(2 * tp, gt + pr)
        recall, precision = div(tp, gt), div(tp, pr)
        total = cm.sum()
        return {
            "IoU": iou, "F1": f1, "precision": precision, "recall": recall,
            "mIoU": float(iou.nanmean()), "mF1": float(f1.nanmean()), "mAcc": float(recall.nanmean()),
            "OA": float(tp.sum() / total) if total > 0 else float("nan"),
        }

    def table(self) -> str:
        """Per-class IoU / F1 table (percent) as Markdown."""
        r = self.compute()
        lines = ["| class | IoU | F1 |", "|---|---:|---:|"]
        for name, iou, f1 in zip(self.class_names, r["IoU"].tolist(), r["F1"].tolist()):
            lines.append(f"| {name} | {100 * iou:.2f} | {100 * f1:.2f} |")
        lines.append(f"| **mean** | **{100 * r['mIoU']:.2f}** | **{100 * r['mF1']:.2f}** |")
        lines.append(f"\nOA {100 * r['OA']:.2f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    """`python -m rsscale.finetune.evaluation.metrics DETS_DIR LABELTXT_DIR`: score a DOTA Task1 submission."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m rsscale.finetune.evaluation.metrics", description=main.__doc__)
    parser.add_argument("detections", help="folder of Task1_<class>.txt files")
    parser.add_argument("labels", help="DOTA labelTxt folder (one <image>.txt per image)")
    parser.add_argument("--mode", choices=MODES, default="dota")
    parser.add_argument("--all-point", action="store_true", help="all-point AP instead of VOC07 11-point")
    parser.add_argument("--iou-thr", type=float, default=0.5)
    parser.add_argument("--tie-order", choices=TIE_ORDERS, default="devkit",
                        help="order of equal-score detections: the official devkit's np.argsort(-score) or stable")
    parser.add_argument("--classes", default="auto",
                        help="class list averaged in the mAP: dota-v1, dota-v1.5, dota-v2, dior, a comma "
                             "list, or auto (every class in labels or detections)")
    parser.add_argument("--json", help="also write the full result to this file")
    args = parser.parse_args(argv)
    named = {"dota-v1": dota_io.DOTA_V1_CLASSES, "dota-v1.5": dota_io.DOTA_V15_CLASSES,
             "dota-v2": dota_io.DOTA_V2_CLASSES, "dior": dota_io.DIOR_CLASSES, "auto": None}
    classes = named[args.classes] if args.classes in named else args.classes.split(",")
    result = evaluate_dota(args.detections, args.labels, iou_thr=args.iou_thr,
                           use_07_metric=not args.all_point, mode=args.mode, classes=classes,
                           tie_order=args.tie_order)
    print(format_ap_table(result))
    if args.json:
        nan_to_null = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        clean = {"mAP": nan_to_null(result["mAP"]), "mAP_with_gt": nan_to_null(result["mAP_with_gt"]),
                 "classes": {c: {k: nan_to_null(v) for k, v in r.items()} for c, r in result["classes"].items()}}
        Path(args.json).write_text(json.dumps(clean, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
