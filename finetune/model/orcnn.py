"""Oriented R-CNN (Xie et al. 2021, "Oriented R-CNN for Object Detection") on the ViTDet simple
feature pyramid: the two-stage oriented detector that published remote-sensing foundation-model
results (RVSA, MTP, ...) use, so our mAP can be set beside theirs.

Stages (settings as mmrotate's `oriented_rcnn_r50_fpn_1x_dota_le90`, scaled by `scaled_to`):
- Oriented RPN on 5 levels (the 4 pyramid maps + a stride-2 max-pool of the last, as ViTDet and
  FPN do): 3x3 conv + ReLU, then per anchor one objectness logit and 6 midpoint-offset deltas.
  Anchors are horizontal, `anchor_scale * stride` on a side for ratios h/w in `anchor_ratios`,
  centred on the cells. Anchors are matched to the ground truth's enclosing horizontal boxes
  (max-IoU: >= 0.7 positive, < 0.3 negative, each object's best anchors positive if IoU >= 0.3),
  256 sampled per image, half positive at most; BCE + smooth-L1 (beta 1/9).
- Proposals: per level the top `rpn_pre_nms` anchors by score, decoded to oriented boxes, NMS
  (IoU 0.8) per level on their enclosing horizontal boxes (as mmrotate), the best
  `rpn_post_nms` kept.
- Oriented RoI head: rotated RoI Align (7x7, 2x2 samples per bin) on the level chosen by the
  proposal's size (sqrt(wh) / (14 stride_0), floor(log2)), two shared FC layers, a softmax
  classifier over K classes + background and class-agnostic (dx, dy, dw, dh, da) deltas
  (`finetune.rotated.DeltaXYWHACoder`, stds 0.1/0.1/0.2/0.2/0.1). Training: ground truth added to
  the proposals, rotated-IoU max matching at 0.5, `rcnn_batch` RoIs sampled per image, a quarter
  positive at most; cross-entropy + smooth-L1 (beta 1), both over the sampled RoIs.
- Inference: softmax scores above `score_thr`, class-wise rotated NMS (IoU 0.1), at most
  `max_per_image` boxes. Everything in the le90 convention of `finetune.rotated`.

The model has `RotatedFCOS`'s interface (finetune.det): `forward(imgs)` -> raw outputs,
`loss(outs, targets)` -> dict with "total", `predict(outs, score_thr=...)` -> per image
{"boxes", "scores", "labels"}, `.backbone`; so training and `evaluate_det` take either.
Random sampling draws from the torch RNG: tensor-parallel ranks, seeded alike, draw alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rsscale.finetune.model.vitdet import ViTDetBackbone
from rsscale.finetune.rotated import DeltaXYWHACoder, batched_hbox_nms, batched_rotated_nms, hbox_iou, norm_obb, obb_to_hbox, obb_to_poly, rotated_iou

NEGATIVE, IGNORED = -1, -2  # max_iou_assign's codes for rows that match no object


# --------------------------------------------------------------------------- box coding
class MidpointOffsetCoder:
    """Oriented RPN's box coding: an oriented box is described by its enclosing horizontal box
    (x, y, w, h) and the offsets of two of its vertices along that box's sides: `a`, the x offset
    from the top side's midpoint of the vertex touching the top side, and `b`, the y offset from
    the right side's midpoint of the vertex touching the right side (for an axis-aligned box the
    top-right and bottom-right corners, a = w/2, b = h/2). Relative to a horizontal anchor
    (x1, y1, x2, y2):

        dx = (x - px) / pw   dy = (y - py) / ph   dw = log(w / pw)   dh = log(h / ph)
        da = a / w           db = b / h           then (delta - means) / stds

    Decoding gives the parallelogram (x + a, y - h/2), (x + w/2, y + b), (x - a, y + h/2),
    (x - w/2, y - b); its shorter diagonal is stretched to the longer one's length, which makes it
    a rectangle (equal diagonals that bisect each other), returned in le90 form.
    """

    def __init__(self, means=(0.0,) * 6, stds=(1.0, 1.0, 1.0, 1.0, 0.5, 0.5), wh_ratio_clip: float = 16 / 1000):
        if len(means) != 6 or len(stds) != 6:
            raise ValueError("means and stds need 6 values each (dx, dy, dw, dh, da, db).")
        self.means, self.stds = tuple(means), tuple(stds)
        self.max_ratio = abs(math.log(wh_ratio_clip))

    def encode(self, anchors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Horizontal anchors (x1, y1, x2, y2) [N, 4], oriented targets [N, 5] -> deltas [N, 6]."""
        if anchors.shape[:-1] != gt.shape[:-1] or anchors.shape[-1] != 4 or gt.shape[-1] != 5:
            raise ValueError(f"encode needs anchors [N, 4] and targets [N, 5], got {tuple(anchors.shape)} and {tuple(gt.shape)}.")
        px, py, pw, ph = _xywh(anchors)
        pts = obb_to_poly(gt).unflatten(-1, (4, 2))
        xs, ys = pts[..., 0], pts[..., 1]
        lo, hi = pts.amin(-2), pts.amax(-2)
        gx, gy = (lo[..., 0] + hi[..., 0]) / 2, (lo[..., 1] + hi[..., 1]) / 2
        gw, gh = (hi[..., 0] - lo[..., 0]).clamp_min(1e-3), (hi[..., 1] - lo[..., 1]).clamp_min(1e-3)
        tol = (1e-3 * (1 + gw + gh))[..., None]  # equal coordinates (axis-aligned boxes): the right/bottom vertex
        top_x = torch.where(ys <= lo[..., 1:2] + tol, xs, torch.full_like(xs, -math.inf)).amax(-1)
        right_y = torch.where(xs >= hi[..., 0:1] - tol, ys, torch.full_like(ys, -math.inf)).amax(-1)
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph),
                              (top_x - gx) / gw, (right_y - gy) / gh], -1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Horizontal anchors [N, 4], deltas [N, 6] -> oriented boxes [N, 5] (le90)."""
        d = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        dx, dy, dw, dh, da, db = d.unbind(-1)
        px, py, pw, ph = _xywh(anchors)
        gx, gy = px + dx * pw, py + dy * ph
        gw = pw * dw.clamp(-self.max_ratio, self.max_ratio).exp()
        gh = ph * dh.clamp(-self.max_ratio, self.max_ratio).exp()
        v1 = torch.stack([da.clamp(-0.5, 0.5) * gw, -gh / 2], -1)  # top vertex minus the centre
        v2 = torch.stack([gw / 2, db.clamp(-0.5, 0.5) * gh], -1)  # right vertex minus the centre
        n1, n2 = v1.norm(dim=-1, keepdim=True), v2.norm(dim=-1, keepdim=True)
        longest = torch.maximum(n1, n2)
        v1, v2 = v1 * longest / n1, v2 * longest / n2  # equal half-diagonals: a rectangle
        side_w, side_h = v2 - v1, -v1 - v2
        angle = torch.atan2(side_w[..., 1], side_w[..., 0])
        return norm_obb(torch.stack([gx, gy, side_w.norm(dim=-1), side_h.norm(dim=-1), angle], -1))


def _xywh(hboxes):
    x1, y1, x2, y2 = hboxes.unbind(-1)
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


# --------------------------------------------------------------------------- rotated RoI Align
def rotated_roi_align(feat: torch.Tensor, rois: torch.Tensor, output_size: int = 7, spatial_scale: float = 1.0,
                      sampling_ratio: int = 2, aligned: bool = True) -> torch.Tensor:
    """Rotated RoI Align (mmcv's RoIAlignRotated with clockwise=True, i.e. our angle convention).

    feat [B, C, H, W]; rois [R, 6] = (batch index, cx, cy, w, h, angle) in image pixels, scaled
    by `spatial_scale` onto the map (with `aligned`, pixel centres sit at +0.5). Each RoI is cut
    into output_size^2 bins along its own axes; a bin is the mean of sampling_ratio^2 evenly
    spaced bilinear samples. A sample more than one pixel outside the map counts as 0; one within
    a pixel of it reads the border. Returns [R, C, output_size, output_size] in float32 (or the
    map's dtype if wider). All samples are read by one `grid_sample` call."""
    if feat.dim() != 4 or rois.dim() != 2 or rois.shape[1] != 6:
        raise ValueError(f"need feat [B, C, H, W] and rois [R, 6], got {tuple(feat.shape)} and {tuple(rois.shape)}.")
    _, C, H, W = feat.shape
    feat = feat.float() if feat.dtype in (torch.float16, torch.bfloat16) else feat
    rois = rois.to(feat.dtype)
    n = output_size * sampling_ratio
    R = rois.shape[0]
    if R == 0:
        return feat.new_zeros(0, C, output_size, output_size)
    idx, cx, cy, w, h, a = rois.unbind(-1)
    shift = 0.5 if aligned else 0.0
    cx, cy, w, h = cx * spatial_scale - shift, cy * spatial_scale - shift, w * spatial_scale, h * spatial_scale
    if not aligned:
        w, h = w.clamp_min(1.0), h.clamp_min(1.0)
    t = (torch.arange(n, device=feat.device, dtype=feat.dtype) + 0.5) / n - 0.5  # sample positions in [-1/2, 1/2]
    u, v = t[None, None, :] * w[:, None, None], t[None, :, None] * h[:, None, None]  # [R, 1, n], [R, n, 1]
    cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    x = cx[:, None, None] + u * cos - v * sin  # [R, n (along h), n (along w)]
    y = cy[:, None, None] + u * sin + v * cos
    inside = (x >= -1) & (x <= W) & (y >= -1) & (y <= H)
    grid = torch.stack([x * (2 / max(W - 1, 1)) - 1, y * (2 / max(H - 1, 1)) - 1], -1)
    # One grid_sample call: each image's samples in a row of a [B, max RoIs per image, ...] grid.
    idx = idx.long()
    counts = torch.bincount(idx, minlength=feat.shape[0])
    order = idx.argsort(stable=True)
    rank = torch.empty_like(idx)
    rank[order] = torch.arange(R, device=idx.device) - (counts.cumsum(0) - counts)[idx[order]]
    full = grid.new_zeros(feat.shape[0], int(counts.max()), n, n, 2)
    full[idx, rank] = grid
    s = F.grid_sample(feat, full.view(feat.shape[0], -1, n, 2), mode="bilinear", padding_mode="border",
                      align_corners=True)  # 'border' clamps to [0, size-1] as mmcv's sampler does
    out = s.view(feat.shape[0], C, -1, n, n).transpose(1, 2)[idx, rank] * inside[:, None].to(feat.dtype)
    return F.avg_pool2d(out, sampling_ratio)  # each bin's mean (3x faster than a strided .mean on CPU)


def _by_group(groups: torch.Tensor, fn) -> torch.Tensor:
    """Rows of fn(group, rows of that group) for every group, concatenated back in row order."""
    pieces, rows = [], []
    for g in groups.unique().tolist():
        sel = torch.nonzero(groups == g)[:, 0]
        pieces.append(fn(g, sel))
        rows.append(sel)
    return torch.cat(pieces)[torch.cat(rows).argsort()]


def roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: float) -> torch.Tensor:
    """Pyramid level of each RoI [R, 6] by its size: floor(log2(sqrt(wh) / finest_scale)),
    clamped to the available levels (FPN's rule; mmdet's finest scale 56 at stride 4)."""
    scale = (rois[:, 3] * rois[:, 4]).clamp_min(0).sqrt()
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


# --------------------------------------------------------------------------- assign and sample
def max_iou_assign(iou: torch.Tensor, pos_thr: float, neg_thr: float, min_pos_iou: float = 0.0,
                   match_low_quality: bool = False) -> torch.Tensor:
    """Max-IoU assignment of rows (anchors/proposals) to columns (objects), iou [N, G] -> [N]:
    the matched object's index for positives, NEGATIVE (-1) or IGNORED (-2). A row is positive
    when its best IoU >= pos_thr, negative when < neg_thr, ignored in between. With
    `match_low_quality`, every row whose IoU with an object equals that object's best IoU (if
    that is > 0 and >= min_pos_iou) is made positive for it, so every object gets an anchor (later objects
    win ties, as in mmdet)."""
    n, g = iou.shape
    if g == 0:
        return torch.full((n,), NEGATIVE, dtype=torch.long, device=iou.device)
    best, arg = iou.max(1)
    out = torch.full((n,), IGNORED, dtype=torch.long, device=iou.device)
    out[(best >= 0) & (best < neg_thr)] = NEGATIVE
    pos = best >= pos_thr
    out[pos] = arg[pos]
    if match_low_quality and n:
        gt_best = iou.max(0).values
        hit = (iou == gt_best[None]) & (gt_best[None] >= min_pos_iou) & (gt_best[None] > 0)
        last = g - 1 - hit.flip(1).to(torch.uint8).argmax(1)
        rows = hit.any(1)
        out[rows] = last[rows]
    return out


def sample_rois(assigned: torch.Tensor, num: int, pos_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sampler: at most int(num * pos_fraction) positives, negatives fill up to `num`;
    -> (positive indices, negative indices), each a random subset drawn with the torch RNG."""
    pos = torch.nonzero(assigned >= 0)[:, 0]
    neg = torch.nonzero(assigned == NEGATIVE)[:, 0]
    n_pos = min(pos.numel(), int(num * pos_fraction))
    pos = pos[torch.randperm(pos.numel(), device=pos.device)[:n_pos]]
    neg = neg[torch.randperm(neg.numel(), device=neg.device)[:num - n_pos]]
    return pos, neg


# --------------------------------------------------------------------------- the detector
class OrientedRPNHead(nn.Module):
    """Shared over levels: 3x3 conv + ReLU -> (objectness [B, A, H, W], deltas [B, 6A, H, W])."""

    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.cls = nn.Conv2d(channels, num_anchors, 1)
        self.reg = nn.Conv2d(channels, 6 * num_anchors, 1)
        for conv in (self.conv, self.cls, self.reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats):
        outs = []
        for f in feats:
            x = F.relu(self.conv(f))
            outs.append((self.cls(x), self.reg(x)))
        return outs


class OrientedRoIHead(nn.Module):
    """Flattened RoI features -> 2 x (FC + ReLU) -> (logits [R, K + 1], deltas [R, 5])."""

    def __init__(self, in_features: int, num_classes: int, fc_dim: int = 1024):
        super().__init__()
        self.fcs = nn.Sequential(nn.Linear(in_features, fc_dim), nn.ReLU(inplace=True),
                                 nn.Linear(fc_dim, fc_dim), nn.ReLU(inplace=True))
        self.cls = nn.Linear(fc_dim, num_classes + 1)
        self.reg = nn.Linear(fc_dim, 5)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.normal_(self.reg.weight, std=0.001)
        nn.init.zeros_(self.cls.bias)
        nn.init.zeros_(self.reg.bias)

    def forward(self, x):
        x = self.fcs(x.flatten(1))
        return self.cls(x), self.reg(x)


class OrientedRCNN(nn.Module):
    """ViTDet backbone + oriented RPN + oriented RoI head (module doc). Targets are
    [{"boxes" [K, 5] le90, "labels" [K]}] as for RotatedFCOS."""

    def __init__(self, backbone: ViTDetBackbone, num_classes: int, fc_dim: int = 1024, anchor_scale: float = 8.0,
                 anchor_ratios=(0.5, 1.0, 2.0), roi_size: int = 7, sampling_ratio: int = 2,
                 rpn_pre_nms: int = 2000, rpn_post_nms: int = 2000, rpn_nms_iou: float = 0.8,
                 rpn_batch: int = 256, rcnn_batch: int = 512, rcnn_pos_fraction: float = 0.25):
        super().__init__()
        if min(rpn_pre_nms, rpn_post_nms, rpn_batch, rcnn_batch, roi_size, sampling_ratio) < 1:
            raise ValueError("proposal counts, batch sizes, roi_size and sampling_ratio must be >= 1.")
        self.backbone, self.num_classes = backbone, num_classes
        self.strides = tuple(backbone.strides)  # RoI levels; the RPN adds one at twice the last stride
        self.rpn_strides = self.strides + (2 * self.strides[-1],)
        self.anchor_scale, self.anchor_ratios = float(anchor_scale), tuple(float(r) for r in anchor_ratios)
        self.roi_size, self.sampling_ratio = roi_size, sampling_ratio
        self.rpn_pre_nms, self.rpn_post_nms, self.rpn_nms_iou = rpn_pre_nms, rpn_post_nms, rpn_nms_iou
        self.rpn_batch, self.rcnn_batch, self.rcnn_pos_fraction = rpn_batch, rcnn_batch, rcnn_pos_fraction
        self.rpn_coder = MidpointOffsetCoder()
        self.roi_coder = DeltaXYWHACoder(stds=(0.1, 0.1, 0.2, 0.2, 0.1))
        c = backbone.out_channels
        self.rpn_head = OrientedRPNHead(c, len(self.anchor_ratios))
        self.roi_head = OrientedRoIHead(c * roi_size * roi_size, num_classes, fc_dim)

    @classmethod
    def scaled_to(cls, backbone: ViTDetBackbone, num_classes: int, crop: int, **overrides) -> "OrientedRCNN":
        """The paper's settings are for 1024-px patches and 256 channels. For smaller crops the
        proposal and sampled-RoI counts shrink with the patch area (floors 300 and 128), the FC
        width with the channels (8 per channel, at most 1024): 1024 px / 256 channels gives the paper."""
        area = (crop / 1024) ** 2
        kw = dict(fc_dim=min(1024, 8 * backbone.out_channels),
                  rpn_pre_nms=max(300, round(2000 * area)), rpn_post_nms=max(300, round(2000 * area)),
                  rcnn_batch=max(128, round(512 * area)))
        return cls(backbone, num_classes, **{**kw, **overrides})

    def forward(self, imgs):
        feats = self.backbone(imgs)
        rpn = self.rpn_head(feats + [F.max_pool2d(feats[-1], 1, stride=2)])
        return {"feats": feats, "rpn": rpn}

    # -- RPN --------------------------------------------------------------------------------------
    def anchors(self, outs) -> list[torch.Tensor]:
        """Per RPN level: horizontal anchors [H*W*A, 4] (x1, y1, x2, y2), in (row, column, ratio)
        order, the order of the flattened RPN outputs."""
        out = []
        for (cls, _), s in zip(outs["rpn"], self.rpn_strides):
            h, w = cls.shape[-2:]
            ratios = torch.tensor(self.anchor_ratios, device=cls.device)
            size = self.anchor_scale * s
            half = torch.stack([size / ratios.sqrt(), size * ratios.sqrt()], -1) / 2  # [A, 2] half (w, h)
            ys, xs = torch.meshgrid(torch.arange(h, device=cls.device), torch.arange(w, device=cls.device), indexing="ij")
            ctr = torch.stack([xs, ys], -1).reshape(-1, 1, 2).float().add(0.5).mul(s)  # [H*W, 1, 2]
            out.append(torch.cat([ctr - half, ctr + half], -1).reshape(-1, 4))
        return out

    def _rpn_flat(self, outs):
        """-> objectness [B, N], deltas [B, N, 6] (float32), N = all anchors of all levels."""
        cls = torch.cat([c.permute(0, 2, 3, 1).reshape(c.shape[0], -1) for c, _ in outs["rpn"]], 1)
        reg = torch.cat([r.permute(0, 2, 3, 1).reshape(r.shape[0], -1, 6) for _, r in outs["rpn"]], 1)
        return cls.float(), reg.float()

    def rpn_loss(self, outs, targets) -> dict:
        anchors = torch.cat(self.anchors(outs))
        cls, reg = self._rpn_flat(outs)
        logits, labels, pred, target = [], [], [], []
        for b, t in enumerate(targets):
            boxes = t["boxes"].to(anchors)
            assigned = max_iou_assign(hbox_iou(anchors, obb_to_hbox(boxes)), 0.7, 0.3, 0.3, match_low_quality=True)
            pos, neg = sample_rois(assigned, self.rpn_batch, 0.5)
            logits.append(cls[b, torch.cat([pos, neg])])
            labels.append(torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).to(cls.dtype))
            pred.append(reg[b, pos])
            target.append(self.rpn_coder.encode(anchors[pos], boxes[assigned[pos]]))
        n = max(sum(x.numel() for x in labels), 1)
        return {"rpn_cls": F.binary_cross_entropy_with_logits(torch.cat(logits), torch.cat(labels), reduction="sum") / n,
                "rpn_box": F.smooth_l1_loss(torch.cat(pred), torch.cat(target), beta=1 / 9, reduction="sum") / n}

    @torch.no_grad()
    def proposals(self, outs) -> list[torch.Tensor]:
        """Per image: oriented proposals [P, 5] (best first, P <= rpn_post_nms)."""
        anchors = self.anchors(outs)
        sizes = [a.shape[0] for a in anchors]
        cls, reg = self._rpn_flat(outs)
        result = []
        for b in range(cls.shape[0]):
            boxes, scores, levels = [], [], []
            for lvl, (c, r, a) in enumerate(zip(cls[b].split(sizes), reg[b].split(sizes), anchors)):
                top = c.topk(min(self.rpn_pre_nms, c.numel())).indices
                boxes.append(self.rpn_coder.decode(a[top], r[top]))
                scores.append(c[top])
                levels.append(torch.full_like(top, lvl))
            boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
            ok = (boxes[:, 2] > 1e-2) & (boxes[:, 3] > 1e-2)
            boxes, scores, levels = boxes[ok], scores[ok], levels[ok]
            keep = batched_hbox_nms(obb_to_hbox(boxes), scores, levels, self.rpn_nms_iou)[:self.rpn_post_nms]
            result.append(boxes[keep])
        return result

    # -- RoI head ---------------------------------------------------------------------------------
    def roi_forward(self, feats, rois: torch.Tensor):
        """rois [R, 6] (batch index, oriented box) -> (logits [R, K + 1], deltas [R, 5])."""
        levels = roi_levels(rois, len(feats), 14.0 * self.strides[0])
        if rois.shape[0] == 0:
            pooled = feats[0].new_zeros(0, feats[0].shape[1], self.roi_size, self.roi_size)
        else:
            pooled = _by_group(levels, lambda lvl, sel: rotated_roi_align(
                feats[lvl], rois[sel], self.roi_size, 1.0 / self.strides[lvl], self.sampling_ratio))
        return self.roi_head(pooled.to(feats[0].dtype))

    @staticmethod
    def _rois(boxes: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], 1) for i, b in enumerate(boxes)])

    def loss(self, outs, targets) -> dict:
        losses = self.rpn_loss(outs, targets)
        props = self.proposals(outs)
        rois, labels, pos_rows, reg_targets = [], [], [], []
        start = 0
        for p, t in zip(props, targets):
            gt, gt_labels = t["boxes"].to(p), t["labels"].to(p.device)
            gt = torch.cat([gt[:, :2], gt[:, 2:4].clamp_min(1.0), gt[:, 4:]], 1)  # no zero-size targets
            cand = torch.cat([gt, p])  # the objects themselves are proposals too
            iou = rotated_iou(cand, gt) if gt.shape[0] else cand.new_zeros(cand.shape[0], 0)
            assigned = max_iou_assign(iou, 0.5, 0.5, 0.5)
            pos, neg = sample_rois(assigned, self.rcnn_batch, self.rcnn_pos_fraction)
            rois.append(cand[torch.cat([pos, neg])])
            labels.append(torch.cat([gt_labels[assigned[pos]], gt_labels.new_full((neg.numel(),), self.num_classes)]))
            pos_rows.append(torch.arange(pos.numel(), device=p.device) + start)
            reg_targets.append(self.roi_coder.encode(cand[pos], gt[assigned[pos]]))
            start += pos.numel() + neg.numel()
        logits, deltas = self.roi_forward(outs["feats"], self._rois(rois))
        logits, deltas = logits.float(), deltas.float()
        n = max(logits.shape[0], 1)
        losses["rcnn_cls"] = F.cross_entropy(logits, torch.cat(labels), reduction="sum") / n
        losses["rcnn_box"] = F.smooth_l1_loss(deltas[torch.cat(pos_rows)], torch.cat(reg_targets), beta=1.0,
                                              reduction="sum") / n
        losses["total"] = sum(losses.values())
        return losses

    # The fine-tuning loop's interface (finetune/finetune.py): `prepare` per micro-batch, the global
    # batch's `normalizers`, then `loss_from`. Oriented R-CNN normalises within each image's sampled
    # anchors and RoIs, so a micro-batch's loss is weighted by its share of the global batch's
    # images: summed over micro-batches and DP ranks, that is the per-image mean (as DDP trains it).
    def prepare(self, targets, hw):
        return targets

    def normalizers(self, prepared) -> torch.Tensor:
        return torch.tensor([float(len(prepared))], dtype=torch.float64)

    def loss_from(self, outs, prepared, norms) -> dict:
        weight = len(prepared) / float(norms[0])
        return {k: v * weight for k, v in self.loss(outs, prepared).items()}

    @torch.no_grad()
    def predict(self, outs, score_thr: float = 0.05, pre_nms: int = 2000, nms_iou: float = 0.1, max_per_image: int = 2000):
        """Per image {"boxes" [N, 5], "scores" [N], "labels" [N]}, best first."""
        props = self.proposals(outs)
        logits, deltas = self.roi_forward(outs["feats"], self._rois(props))
        probs = logits.float().softmax(-1)[:, :-1].split([p.shape[0] for p in props])
        boxes = self.roi_coder.decode(torch.cat(props), deltas.float()).split([p.shape[0] for p in props])
        results = []
        for prob, box in zip(probs, boxes):
            scores = prob.flatten()
            cand = torch.nonzero(scores > score_thr)[:, 0]
            cand = cand[scores[cand].topk(min(pre_nms, cand.numel())).indices]
            row, lab = cand // self.num_classes, cand % self.num_classes
            b, s = box[row], scores[cand]
            keep = batched_rotated_nms(b, s, lab, nms_iou)[:max_per_image]
            results.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
        return results
