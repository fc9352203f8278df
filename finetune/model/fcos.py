"""Oriented-object detection on the ViTDet pyramid: a single-stage, anchor-free FCOS-style
detector with an angle branch (Tian et al. 2019 FCOS; the rotated variant as in mmrotate's
RotatedFCOS with a separate angle loss).

Design (one place each):
- Head, shared over the 4 levels: a classification tower and a regression tower (`convs` 3x3
  conv + GroupNorm + ReLU each). From the cls tower: per-class logits (sigmoid, bias prior 0.01).
  From the reg tower: 4 distances (l, t, r, b) from the location to the box sides measured in the
  box's own frame, as exp(s_level * x) * stride with a learnable per-level s; the angle as
  (cos 2a, sin 2a) (period pi, so the le90 wrap at +-pi/2 is no discontinuity); centerness.
- Locations: cell centres (j + 0.5) * stride of each level. A location is a positive for an object
  when it lies inside the rotated box, within `center_radius` * stride of its centre (in the box
  frame), and max(l, t, r, b) falls in the level's size range (FCOS's rule: level k takes objects
  whose max distance is in [8 s_{k-1}, 8 s_k), the last level everything above); ties go to the
  smallest box. Targets come from `finetune.rotated.encode_points`.
- Losses, normalised by the number of positives: sigmoid focal loss (alpha 0.25, gamma 2) on all
  locations and classes; GIoU loss of the (l, t, r, b) distances (both measured in the target's
  frame, so the boxes are aligned there) weighted by the centerness target; smooth-L1 on
  (cos 2a, sin 2a); BCE on centerness.
- Inference: score = sigmoid(cls) * sigmoid(centerness), threshold, top-k per level, decode with
  `finetune.rotated.decode_points`, class-wise rotated NMS (`batched_rotated_nms`, IoU 0.1 as
  mmrotate's rotated FCOS), at most `max_per_image` boxes.
- Big images: DOTA-style overlapping patches (`finetune.datasets.split_image`), per-patch
  detection, `merge_detections`; mAP with `finetune.metrics.evaluate_dota` (DOTA rules).
Known limit: for near-square boxes le90 may swap w/h (angle shifts by pi/2), which this angle
encoding does not absorb; the IoU of such a miss is still high for squares.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from rsscale.finetune.data.datasets import DotaObject, merge_detections, split_image
from rsscale.finetune.evaluation.metrics import evaluate_dota
from rsscale.finetune.model.vitdet import ViTDetBackbone, conv_norm_act
from rsscale.finetune.rotated import batched_rotated_nms, decode_points, encode_points, obb_to_poly, one_thread
from rsscale.scaling.runtime.log import progress

log = logging.getLogger(__name__)

INF = 1e8


class RotatedFCOSHead(nn.Module):
    """Shared head: per level -> (cls [B, K, H, W], dist [B, 4, H, W] in units of the stride
    before exp, angle [B, 2, H, W], centerness [B, 1, H, W])."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 64, convs: int = 2, levels: int = 4, prior: float = 0.01):
        super().__init__()
        tower = lambda: nn.Sequential(*[conv_norm_act(in_channels if i == 0 else channels, channels, 3) for i in range(convs)])  # noqa: E731
        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.dist = nn.Conv2d(channels, 4, 3, padding=1)
        self.angle = nn.Conv2d(channels, 2, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(levels))
        for conv in (self.cls, self.dist, self.angle, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls.bias, -math.log((1 - prior) / prior))

    def forward(self, feats):
        outs = []
        for i, f in enumerate(feats):
            c, r = self.cls_tower(f), self.reg_tower(f)
            outs.append((self.cls(c), self.scales[i] * self.dist(r), self.angle(r), self.centerness(r)))
        return outs


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Summed focal loss (Lin et al. 2017) of logits vs 0/1 targets of the same shape."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (a_t * ce * (1 - p_t) ** gamma).sum()


def giou_loss_ltrb(pred, target):
    """1 - GIoU of boxes given by distances (l, t, r, b) [N, 4] from a shared point in one frame."""
    area_p = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    area_t = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    lo, hi = torch.min(pred, target), torch.max(pred, target)
    inter = (lo[:, 0] + lo[:, 2]) * (lo[:, 1] + lo[:, 3])
    union = area_p + area_t - inter
    enclose = (hi[:, 0] + hi[:, 2]) * (hi[:, 1] + hi[:, 3])
    iou = inter / union.clamp_min(1e-6)
    return 1 - (iou - (enclose - union) / enclose.clamp_min(1e-6))


def centerness_target(ltrb):
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    return ((lr.amin(1) / lr.amax(1)) * (tb.amin(1) / tb.amax(1))).clamp_min(0).sqrt()


class RotatedFCOS(nn.Module):
    """ViTDet backbone + rotated FCOS head. forward(imgs) -> raw per-level outputs; `loss(outs,
    targets)` with targets [{"boxes" [K, 5] le90, "labels" [K]}]; `predict(outs)` -> per image
    {"boxes" [N, 5], "scores" [N], "labels" [N]}."""

    def __init__(self, backbone: ViTDetBackbone, num_classes: int, channels: int = 64, convs: int = 2,
                 size_ranges=None, center_radius: float = 1.5):
        super().__init__()
        self.backbone, self.num_classes, self.center_radius = backbone, num_classes, center_radius
        self.strides = backbone.strides
        self.head = RotatedFCOSHead(backbone.out_channels, num_classes, channels, convs, len(self.strides))
        if size_ranges is None:
            bounds = [0.0] + [8.0 * s for s in self.strides[:-1]] + [INF]
            size_ranges = list(zip(bounds[:-1], bounds[1:]))
        if len(size_ranges) != len(self.strides):
            raise ValueError(f"need one size range per level ({len(self.strides)}), got {len(size_ranges)}")
        self.size_ranges = [tuple(map(float, r)) for r in size_ranges]

    def forward(self, imgs):
        return self.head(self.backbone(imgs))

    # -- locations and targets ------------------------------------------------------------------
    def locations(self, outs=None, hw=None):
        """Per level: cell centres [H*W, 2] (x, y) in image pixels, from the outputs' map sizes or
        from the image size hw (level k has H // stride_k rows)."""
        sizes = [o[0].shape[-2:] for o in outs] if outs is not None else [(hw[0] // s, hw[1] // s) for s in self.strides]
        device = outs[0][0].device if outs is not None else None
        pts = []
        for (h, w), s in zip(sizes, self.strides):
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            pts.append(torch.stack([xs.flatten(), ys.flatten()], -1).float().add(0.5).mul(s))
        return pts

    @torch.no_grad()
    def assign(self, points, boxes, labels):
        """FCOS assignment for one image -> labels [P] (num_classes = background), targets [P, 5]
        as (l, t, r, b, angle) in the matched box's frame."""
        P = sum(p.shape[0] for p in points)
        if boxes.shape[0] == 0:
            return labels.new_full((P,), self.num_classes), boxes.new_zeros(P, 5)
        all_pts = torch.cat(points)
        stride = torch.cat([p.new_full((p.shape[0],), s) for p, s in zip(points, self.strides)])
        lo = torch.cat([p.new_full((p.shape[0],), r[0]) for p, r in zip(points, self.size_ranges)])
        hi = torch.cat([p.new_full((p.shape[0],), r[1]) for p, r in zip(points, self.size_ranges)])
        G = boxes.shape[0]
        enc = encode_points(all_pts.repeat_interleave(G, 0), boxes.repeat(P, 1)).view(P, G, 5)
        ltrb = enc[..., :4]
        inside = ltrb.amin(-1) > 0
        off = torch.stack([(ltrb[..., 0] - ltrb[..., 2]).abs(), (ltrb[..., 1] - ltrb[..., 3]).abs()], -1).amax(-1) / 2
        near = off < self.center_radius * stride[:, None]
        far = ltrb.amax(-1)
        in_range = (far >= lo[:, None]) & (far < hi[:, None])
        area = (boxes[:, 2] * boxes[:, 3])[None].expand(P, G)
        area = torch.where(inside & near & in_range, area, torch.full_like(area, INF))
        best_area, best = area.min(1)
        cls = torch.where(best_area < INF, labels[best], labels.new_full((P,), self.num_classes))
        return cls, enc[torch.arange(P), best]

    def _flat(self, outs):
        """Per-level outputs -> [B, P, *] float32 tensors (P = all locations of all levels, level order)."""
        cat = lambda i: torch.cat([o[i].float().flatten(2).transpose(1, 2) for o in outs], 1)  # noqa: E731
        stride = torch.cat([outs[k][0].new_full((outs[k][0].shape[-2] * outs[k][0].shape[-1],), s, dtype=torch.float32)
                            for k, s in enumerate(self.strides)])
        dist = cat(1).clamp(max=20).exp() * stride[None, :, None]
        return cat(0), dist, cat(2), cat(3)[..., 0]

    # -- loss: sums over the batch / normalizers (number of positives, summed centerness target),
    # so data-parallel ranks and micro-batches can share the global normalizers -------------------
    def loss(self, outs, targets) -> dict:
        """The batch's losses (dict with "total"), normalised by this batch's own positives."""
        hw = [s * self.strides[0] for s in outs[0][0].shape[-2:]]
        prepared = self.prepare(targets, hw)
        return self.loss_from(outs, prepared, self.normalizers(prepared))

    @torch.no_grad()
    def prepare(self, targets, hw):
        """FCOS targets of a batch of images of size hw: (labels [B, P], (l, t, r, b, angle) [B, P, 5])."""
        points = self.locations(hw=hw)
        assigned = [self.assign(points, t["boxes"].float(), t["labels"]) for t in targets]
        return torch.stack([a[0] for a in assigned]), torch.stack([a[1] for a in assigned])

    def normalizers(self, prepared) -> torch.Tensor:
        """[positives, sum of their centerness targets] (float64) of a prepared batch."""
        labels, reg = prepared
        pos = labels < self.num_classes
        return torch.stack([pos.sum().double(), centerness_target(reg[pos][:, :4]).double().sum()])

    def loss_from(self, outs, prepared, norms) -> dict:
        cls, dist, angle, ctr = self._flat(outs)
        labels, reg = (t.to(cls.device) for t in prepared)
        pos = labels < self.num_classes
        n_pos = norms[0].clamp_min(1.0).to(cls.dtype)
        onehot = F.one_hot(labels, self.num_classes + 1)[..., :-1].to(cls.dtype)
        losses = {"cls": sigmoid_focal_loss(cls, onehot) / n_pos}
        if pos.any():
            t = reg[pos]
            c_t = centerness_target(t[:, :4])
            a_t = torch.stack([torch.cos(2 * t[:, 4]), torch.sin(2 * t[:, 4])], -1)
            losses["box"] = (giou_loss_ltrb(dist[pos], t[:, :4]) * c_t).sum() / norms[1].clamp_min(1e-6).to(cls.dtype)
            losses["angle"] = F.smooth_l1_loss(angle[pos], a_t, beta=0.1, reduction="sum") / n_pos
            losses["centerness"] = F.binary_cross_entropy_with_logits(ctr[pos], c_t, reduction="sum") / n_pos
        else:  # keep every parameter in the graph
            zero = (dist.sum() + angle.sum() + ctr.sum()) * 0
            losses.update(box=zero, angle=zero, centerness=zero)
        losses["total"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def predict(self, outs, score_thr: float = 0.05, pre_nms: int = 1000, nms_iou: float = 0.1, max_per_image: int = 2000):
        """Per image: boxes scoring above score_thr (score = class prob x centerness, mmdet's rule),
        the best pre_nms per level, class-wise rotated NMS, the best max_per_image kept."""
        points = self.locations(outs)
        sizes = [p.shape[0] for p in points]
        cls, dist, angle, ctr = self._flat(outs)
        results = []
        for b in range(cls.shape[0]):
            boxes, scores, labels = [], [], []
            for lvl_cls, lvl_dist, lvl_ang, lvl_ctr, pts in zip(cls[b].split(sizes), dist[b].split(sizes),
                                                               angle[b].split(sizes), ctr[b].split(sizes), points):
                prob = lvl_cls.sigmoid()
                score = (prob * lvl_ctr.sigmoid()[:, None]).flatten()
                score = torch.where(score > score_thr, score, torch.zeros_like(score))
                top = score.topk(min(pre_nms, int((score > 0).sum()))).indices
                loc, lab = top // self.num_classes, top % self.num_classes
                a = torch.atan2(lvl_ang[loc, 1], lvl_ang[loc, 0]) / 2
                boxes.append(decode_points(pts[loc], torch.cat([lvl_dist[loc], a[:, None]], -1)))
                scores.append(score[top])
                labels.append(lab)
            boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            keep = batched_rotated_nms(boxes, scores, labels, nms_iou)[:max_per_image]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results


@torch.no_grad()
def detect_images(model: RotatedFCOS, dataset, crop: int, classes, normalize, indices=None, overlap: int | None = None,
                  score_thr: float = 0.05, max_per_image: int = 2000, batch_size: int = 8, rates=None, flips=()):
    """DOTA-style inference on the images `indices` (default all): each image is cut into
    overlapping crop x crop patches (a smaller image is one zero-padded patch), detected per patch;
    the image's best `max_per_image` boxes above `score_thr` are merged with rotated NMS. `rates`
    (and `flips`): the DOTA protocol's multi-scale split and flip TTA instead (dota_protocol).
    Returns (detections {class: [(image, score, poly8)]}, ground truth {image: [DotaObject]})."""
    model.eval()
    device = next(model.parameters()).device
    overlap = crop // 4 if overlap is None else overlap
    dets = {c: [] for c in classes}
    gts = {}
    for i in progress(range(len(dataset)) if indices is None else indices, desc="[eval] detection", unit="image"):
        image, target = dataset[i]
        image_id = target["image_id"]
        gts[image_id] = [DotaObject(tuple(p.tolist()), classes[int(l)], bool(d))
                         for p, l, d in zip(target["polys"], target["labels"], target["difficult"])]
        if rates is not None:
            from rsscale.finetune.evaluation.dota_protocol import detect_image

            merged = detect_image(model, image, normalize, patch=crop, overlap=overlap, rates=rates, flips=flips, score_thr=score_thr,
                                  batch_size=batch_size, max_dets=max_per_image)
            for poly, score, label in zip(obb_to_poly(merged["boxes"]), merged["scores"], merged["labels"]):
                dets[classes[int(label)]].append((image_id, float(score), poly.tolist()))
            continue
        patches = split_image(image, target, patch=crop, overlap=overlap)
        found = []
        for k in range(0, len(patches), batch_size):  # bounded memory on big (DOTA) images
            batch = torch.stack([normalize(p.image) for p in patches[k:k + batch_size]]).to(device)
            outs = model(batch)
            with one_thread() if device.type == "cpu" else contextlib.nullcontext():  # small ops: see one_thread
                found += [{k: v.cpu() for k, v in d.items()}
                          for d in model.predict(outs, score_thr=score_thr, max_per_image=max_per_image)]
        merged = merge_detections(found, [p.offset for p in patches], max_dets=max_per_image)
        for poly, score, label in zip(obb_to_poly(merged["boxes"]), merged["scores"], merged["labels"]):
            dets[classes[int(label)]].append((image_id, float(score), poly.tolist()))
    return dets, gts


def evaluate_det(model: RotatedFCOS, dataset, crop: int, classes, normalize, tie_order: str = "devkit", **kw) -> dict:
    """`detect_images` on the whole dataset scored with `evaluate_dota` (DOTA's rules: polygon
    IoU > 0.5, difficult objects ignored, VOC07 AP; ties in the devkit's order)."""
    t0 = time.time()
    dets, gts = detect_images(model, dataset, crop, classes, normalize, **kw)
    log.info("detected on %d images in %.1f s", len(dataset), time.time() - t0)
    return evaluate_dota(dets, gts, classes=list(classes), tie_order=tie_order)
