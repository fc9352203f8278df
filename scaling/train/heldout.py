"""Held-out MAE loss: what a scaling law is fitted to (the last training step's loss is noisy and
measured on images the model has seen).

    images = heldout_images(files, cfg)              # fixed preprocessing: centre square, resize
    loss = heldout_loss("runs/x/checkpoints/step_00000400", images, seed=0)

The same images get the same masks in every evaluation (masking noise drawn from a generator
seeded per image index), so the losses of two checkpoints or two model sizes differ only by
the model. Evaluation runs in one process on the model assembled from the layout-independent
checkpoint: the study's CPU ladder is small; a paper-size model would be evaluated inside the
training job instead (see docs/STUDY.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsscale.scaling.data.loader import default_stats, read_image, to_unit_float
from rsscale.scaling.spec.config import ViTConfig


def heldout_images(files: list[str], cfg: ViTConfig) -> torch.Tensor:
    """[len(files), C, S, S] normalized images: the centre square of each, resized to cfg.img_size."""
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in default_stats(cfg.in_chans))
    out = []
    for path in files:
        x = to_unit_float(*read_image(path, cfg.in_chans))
        h, w = x.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, top : top + side, left : left + side]
        x = F.interpolate(x[None], size=(cfg.img_size, cfg.img_size), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append((x - mean) / std)
    if not out:
        raise ValueError("no held-out images given")
    return torch.stack(out)


def fixed_noise(n: int, cfg: ViTConfig, seed: int) -> torch.Tensor:
    """Masking noise [n, N]: row i depends only on (seed, i), never on the batch it is evaluated in."""
    return torch.stack([torch.rand(cfg.num_patches, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                        for i in range(n)])


@torch.no_grad()
def heldout_loss(checkpoint: str, images: torch.Tensor, seed: int = 0, batch: int = 32,
                 device: str | torch.device | None = None) -> float:
    """Mean masked-patch MAE loss of a checkpoint on `images` (fp32, eval mode, fixed masks)."""
    from rsscale.scaling.model.mae import build_mae
    from rsscale.scaling.train.checkpoint import load_full_state_dict

    cfg, tensors = load_full_state_dict(checkpoint)
    if images.shape[1:] != (cfg.in_chans, cfg.img_size, cfg.img_size):
        raise ValueError(f"held-out images have shape {tuple(images.shape[1:])}, the model in {checkpoint} "
                         f"takes {(cfg.in_chans, cfg.img_size, cfg.img_size)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_mae(cfg).to(device).eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]  # megatron's per-linear FP8 state
    if unexpected or missing:
        raise ValueError(f"{checkpoint}: checkpoint and model disagree (missing {missing[:3]}, unexpected {unexpected[:3]})")
    noise = fixed_noise(len(images), cfg, seed)
    total = 0.0
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(device)
        loss, _, _ = model(x, noise=noise[start : start + batch].to(device))
        total += float(loss) * len(x)  # every image masks the same number of patches: a plain mean
    return total / len(images)
