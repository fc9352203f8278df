"""Semantic segmentation on the ViTDet pyramid: a UperNet-style head (Xiao et al. 2018), the loss,
sliding-window inference for tiles larger than the training crop, and evaluation.

UperNet here: a pyramid pooling module (PPM, average pools to 1, 2, 3, 6 cells) on the coarsest
level gives global context; an FPN top-down path adds it into the finer levels (1x1 laterals,
upsample + add, 3x3 convs); all levels are upsampled to the finest one, concatenated and fused by
a 3x3 conv; a 1x1 classifier gives logits, bilinearly upsampled to the input size. Norms are
GroupNorm so tiny CPU batches behave the same in training and evaluation.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from rsscale.finetune.data.datasets import IGNORE_INDEX
from rsscale.finetune.evaluation.metrics import SegMetric
from rsscale.finetune.model.vitdet import ViTDetBackbone, conv_norm_act
from rsscale.scaling.runtime.log import progress

log = logging.getLogger(__name__)


def _up(x, like):
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """4 maps [B, C_in, H_l, W_l] (fine to coarse) -> logits [B, num_classes, H_0, W_0]."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 128, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.pool_scales = pool_scales
        self.ppm = nn.ModuleList(conv_norm_act(in_channels, channels, 1) for _ in pool_scales)
        self.bottleneck = conv_norm_act(in_channels + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_norm_act(in_channels, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(conv_norm_act(channels, channels, 3) for _ in range(3))
        self.fuse = conv_norm_act(4 * channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats):
        top = feats[-1]
        pooled = [_up(conv(F.adaptive_avg_pool2d(top, s)), top) for s, conv in zip(self.pool_scales, self.ppm)]
        maps = [lat(f) for lat, f in zip(self.lateral, feats[:-1])] + [self.bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(len(maps) - 2, -1, -1):  # top-down: coarse context into finer levels
            maps[i] = maps[i] + _up(maps[i + 1], maps[i])
        outs = [conv(m) for conv, m in zip(self.fpn, maps[:-1])] + [maps[-1]]
        fused = self.fuse(torch.cat([outs[0]] + [_up(o, outs[0]) for o in outs[1:]], 1))
        return self.classifier(fused)


class Segmenter(nn.Module):
    """ViTDet backbone + UperNet head: images [B, 3, H, W] -> logits [B, num_classes, H, W]."""

    def __init__(self, backbone: ViTDetBackbone, num_classes: int, channels: int = 128):
        super().__init__()
        self.backbone, self.num_classes = backbone, num_classes
        self.head = UperHead(backbone.out_channels, num_classes, channels)

    def forward(self, imgs):
        return F.interpolate(self.head(self.backbone(imgs)), size=imgs.shape[-2:], mode="bilinear", align_corners=False)

    def loss(self, logits, masks):
        """Pixel cross-entropy; IGNORE_INDEX pixels (no-data, boundaries) do not count."""
        return self.loss_from(logits, masks, self.normalizers(masks))["total"]

    # The loss as sum / normalizer, so data-parallel ranks and micro-batches can share one
    # normalizer (the global count) and their gradients add up to the one-process gradient.
    def prepare(self, masks, hw=None):
        return masks

    def normalizers(self, masks) -> torch.Tensor:
        """[counted pixels] (float64) of a batch of masks."""
        return (masks != IGNORE_INDEX).sum().to(torch.float64).reshape(1)

    def loss_from(self, logits, masks, norms) -> dict:
        total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
        return {"total": total / norms[0].clamp_min(1).to(total.dtype)}


@torch.no_grad()
def slide_inference(model, img: torch.Tensor, crop: int, stride: int, num_classes: int) -> torch.Tensor:
    """Logits [B, K, H, W] of an image of any size from overlapping crop x crop windows (step
    `stride`, the last window flush with the border), averaged where windows overlap. Images
    smaller than the crop are zero-padded and the padding cropped off again."""
    if not 0 < stride <= crop:
        raise ValueError(f"sliding-window stride must be in (0, crop={crop}], got {stride}")
    B, _, H, W = img.shape
    ph, pw = max(crop - H, 0), max(crop - W, 0)
    x = F.pad(img, (0, pw, 0, ph)) if ph or pw else img
    Hp, Wp = x.shape[-2:]
    logits = x.new_zeros(B, num_classes, Hp, Wp, dtype=torch.float32)
    count = x.new_zeros(1, 1, Hp, Wp, dtype=torch.float32)
    starts = lambda size: sorted({min(s, size - crop) for s in range(0, size - crop + stride, stride)})  # noqa: E731
    for y0 in starts(Hp):
        for x0 in starts(Wp):
            logits[:, :, y0:y0 + crop, x0:x0 + crop] += model(x[:, :, y0:y0 + crop, x0:x0 + crop])
            count[:, :, y0:y0 + crop, x0:x0 + crop] += 1
    return (logits / count)[:, :, :H, :W]


@torch.no_grad()
def evaluate_seg(model, dataset, crop: int, class_names, normalize, stride: int | None = None, indices=None) -> SegMetric:
    """Run sliding-window inference over a dataset of (uint8 image, {"mask"}) (the images
    `indices`, default all) on the model's device -> filled SegMetric."""
    model.eval()
    device = next(model.parameters()).device
    metric = SegMetric(len(class_names), IGNORE_INDEX, class_names)
    t0 = time.time()
    indices = range(len(dataset)) if indices is None else indices
    for i in progress(indices, desc="[eval] segmentation", unit="image"):
        img, target = dataset[i]
        logits = slide_inference(model, normalize(img)[None].to(device), crop, stride or crop * 2 // 3, len(class_names))
        metric.update(logits.argmax(1), target["mask"][None].to(device))
    log.debug("evaluated %d images in %.1f s", len(indices), time.time() - t0)
    return metric
