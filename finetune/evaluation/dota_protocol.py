"""The DOTA test protocol of published oriented-detection tables: big images cut into patches at
one or more scales, optional flip test-time augmentation, patch detections merged back to the
full image with class-wise rotated NMS, then DOTA's mAP (`finetune.metrics.evaluate_dota`).

Settings (`PROTOCOLS`):
- dota-ss: rate 1.0, 1024-px patches, overlap 200 (DOTA_devkit / mmrotate single scale);
- dota-ms: rates 0.5, 1.0, 1.5, 1024-px patches, overlap 500 (mmrotate's multi-scale split);
- dior-r: native 800 x 800 images, one patch each.
Training on the same footing: `python -m rsscale.finetune.data.datasets split ... --rates 0.5,1.0,1.5
--overlap 500` writes the multi-scale training patches.

Flips: each patch is also detected mirrored ("h": left-right, "v": up-down, "hv": both); the
boxes are mirrored back (centre reflected; the angle negated for one flip, unchanged for two)
and pooled with the unflipped ones before the merge's NMS.
"""

from __future__ import annotations

import logging
import time

import torch

from rsscale.finetune.data.datasets import merge_detections, split_image_multiscale
from rsscale.finetune.data.dota_io import DotaObject
from rsscale.finetune.evaluation.metrics import evaluate_dota
from rsscale.finetune.rotated import norm_obb, obb_to_poly

log = logging.getLogger(__name__)

PROTOCOLS = {
    "dota-ss": dict(rates=(1.0,), patch=1024, overlap=200),
    "dota-ms": dict(rates=(0.5, 1.0, 1.5), patch=1024, overlap=500),
    "dior-r": dict(rates=(1.0,), patch=800, overlap=0),
}
FLIPS = {"h": (-1,), "v": (-2,), "hv": (-2, -1)}  # image dims mirrored by each flip


def unflip_boxes(boxes: torch.Tensor, size: int, flip: str) -> torch.Tensor:
    """Boxes [N, 5] found in a size x size patch mirrored by `flip` -> boxes in the patch itself."""
    if flip not in FLIPS:
        raise ValueError(f"flip must be one of {', '.join(FLIPS)}, got {flip!r}.")
    b = boxes.clone()
    for dim in FLIPS[flip]:
        coord = 0 if dim == -1 else 1
        b[:, coord] = size - b[:, coord]
        b[:, 4] = -b[:, 4]
    return norm_obb(b)


@torch.no_grad()
@torch.no_grad()
def detect_image(model, image: torch.Tensor, normalize, patch: int, overlap: int, rates=(1.0,), flips=(),
                 score_thr: float = 0.05, nms_iou: float = 0.1, batch_size: int = 8, max_dets: int | None = None) -> dict:
    """Detections {"boxes", "scores", "labels"} (on the CPU) on a whole image [C, H, W] (any size)
    under the protocol: multi-scale patches, each detected on the model's device as is and under
    `flips`, merged with rotated NMS (the best `max_dets`). `model` is any detector with the
    RotatedFCOS interface (forward + predict)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    empty = {"polys": torch.zeros(0, 8), "labels": torch.zeros(0, dtype=torch.long),
             "difficult": torch.zeros(0, dtype=torch.bool)}
    patches = split_image_multiscale(image, empty, rates, patch, overlap)
    found = []
    for k in range(0, len(patches), batch_size):  # bounded memory on big (DOTA) images
        batch = torch.stack([normalize(p.image) for p in patches[k:k + batch_size]]).to(device)
        per_patch = [[d] for d in model.predict(model(batch), score_thr=score_thr)]
        for flip in flips:
            for dets, d in zip(per_patch, model.predict(model(batch.flip(FLIPS[flip])), score_thr=score_thr)):
                dets.append(dict(d, boxes=unflip_boxes(d["boxes"], patch, flip)))
        found += [{key: torch.cat([d[key] for d in dets]).cpu() for key in ("boxes", "scores", "labels")} for dets in per_patch]
    return merge_detections(found, [p.offset for p in patches], nms_iou, [p.rate for p in patches], max_dets=max_dets)


@torch.no_grad()
def evaluate_protocol(model, dataset, classes, normalize, protocol: str = "dota-ss", flips=(), patch: int | None = None,
                      overlap: int | None = None, rates=None, score_thr: float = 0.05) -> dict:
    """DOTA mAP (`evaluate_dota`: polygon IoU > 0.5, difficult ignored, VOC07 AP) of `model` on
    whole images of `dataset` under a named protocol (PROTOCOLS), its patch/overlap/rates
    overridable (e.g. for small images)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}.")
    cfg = dict(PROTOCOLS[protocol])
    cfg.update({k: v for k, v in dict(patch=patch, overlap=overlap, rates=rates).items() if v is not None})
    model.eval()
    dets, truth = {c: [] for c in classes}, {}
    t0 = time.time()
    for i in range(len(dataset)):
        image, target = dataset[i]
        name = target["image_id"]
        truth[name] = [DotaObject(tuple(p.tolist()), classes[int(c)], bool(d))
                       for p, c, d in zip(target["polys"], target["labels"], target["difficult"])]
        found = detect_image(model, image, normalize, flips=flips, score_thr=score_thr, **cfg)
        for poly, score, label in zip(obb_to_poly(found["boxes"]).tolist(), found["scores"].tolist(), found["labels"].tolist()):
            dets[classes[label]].append((name, score, poly))
    log.info("%s protocol (%s, flips %s) on %d images in %.1f s", protocol, cfg, list(flips) or "none",
             len(dataset), time.time() - t0)
    return evaluate_dota(dets, truth, classes=list(classes))
