"""Up-front check of all fine-tuning data, before the first step: every training and validation
sample is read once (the ranks share the work), so a missing, undecodable or inconsistent file
fails the run at once with its name instead of hours later in a data worker or as NaN metrics.

Checked per sample: the image and its label file exist and decode; the image has the encoder's
band count; a segmentation mask has the image's size and only class indices or ignore; detection
objects carry known class names (the readers raise for the rest). A validation set without a
single valid (non-ignored) pixel is an error. Returns the class pixel counts per split.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rsscale.finetune.data.datasets import IGNORE_INDEX

MAX_LISTED = 10


def sample_source(dataset, i: int) -> str:
    """The file(s) behind sample i, through Subset and ConcatDataset wrappers."""
    while True:
        if isinstance(dataset, torch.utils.data.Subset):
            dataset, i = dataset.dataset, dataset.indices[i]
        elif isinstance(dataset, torch.utils.data.ConcatDataset):
            k = next(k for k, end in enumerate(dataset.cumulative_sizes) if i < end)
            i -= dataset.cumulative_sizes[k - 1] if k else 0
            dataset = dataset.datasets[k]
        else:
            return dataset.source(i) if hasattr(dataset, "source") else f"sample {i} of {type(dataset).__name__}"


def check_sample(image, target, task: str, num_classes: int, in_chans: int) -> list[str]:
    """Problems of one decoded sample (empty when it is fine)."""
    problems = []
    if image.dim() != 3 or image.shape[0] != in_chans:
        problems.append(f"image has shape {tuple(image.shape)}, the encoder takes {in_chans} bands")
    if task == "seg":
        mask = target["mask"]
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            problems.append(f"mask size {tuple(mask.shape)} differs from the image size {tuple(image.shape[-2:])}")
        bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= num_classes))
        if bad.any():
            problems.append(f"mask holds values {sorted(set(mask[bad].unique().tolist()))[:5]} outside 0..{num_classes - 1} and {IGNORE_INDEX}")
    else:
        labels = target["labels"]
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            problems.append(f"object labels outside 0..{num_classes - 1}")
    return problems


def check_data(splits: dict, task: str, classes, in_chans: int) -> dict:
    """Read every sample of every split ({"train": ds, "val": ds}); raise one ValueError naming
    the files at fault. Collective when torch.distributed is initialised (rank r checks samples
    r, r + W, ...). Returns {split: class pixel counts [K] (seg) or object counts (det)}."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    K = len(classes)
    errors, counts = [], {}
    for name, ds in splits.items():
        count = torch.zeros(K, dtype=torch.int64)
        if len(ds) == 0:
            errors.append(f"{name}: the split has no samples")
        for i in range(rank, len(ds), world):
            try:
                image, target = ds[i]
                problems = check_sample(image, target, task, K, in_chans)
            except (OSError, ValueError, RuntimeError, SyntaxError) as e:  # unreadable / malformed file
                problems = [f"{type(e).__name__}: {e}"]
            if problems:
                errors.append(f"{name}: {sample_source(ds, i)}: {'; '.join(problems)}")
                continue
            if task == "seg":
                m = target["mask"]
                count += torch.bincount(m[m != IGNORE_INDEX].flatten(), minlength=K)[:K]
            else:
                count += torch.bincount(target["labels"], minlength=K)[:K]
        counts[name] = count
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (errors, counts))
        errors = [e for errs, _ in gathered for e in errs]
        counts = {name: sum(c[name] for _, c in gathered) for name in splits}
    if not errors and task == "seg" and "val" in counts and int(counts["val"].sum()) == 0:
        errors.append("val: no valid (non-ignored) pixel in any mask: mIoU would be undefined")
    if errors:
        more = f" (and {len(errors) - MAX_LISTED} more)" if len(errors) > MAX_LISTED else ""
        raise ValueError(f"fine-tuning data check failed for {len(errors)} sample(s){more}:\n  "
                         + "\n  ".join(errors[:MAX_LISTED]))
    return counts
