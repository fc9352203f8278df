"""Rank-aware logging and TensorBoard scalars (bottom layer: imports nothing else from rsscale).

    setup_logging()                      # once per process (the CLI does it): rank 0 logs INFO,
                                         # other ranks WARNING and above; lines carry "[rank r]"
    log = logging.getLogger(__name__)    # every module logs through its own logger
    with ScalarWriter("runs/x/tb") as tb:    # no-op when the folder is None or on ranks != 0
        tb.add(step, loss=0.93, lr=1e-3)     # one tag per keyword, e.g. "train/loss"

The results store (scaling/store.py) stays the source of truth; TensorBoard is for watching
curves while a run goes.
"""

from __future__ import annotations

import logging
import os
import resource
import sys

FORMAT = "[rank %(rank)s] %(name)s: %(message)s"


def rank() -> int:
    """Global rank: torch.distributed's when started, else torchrun's RANK, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


class _RankHandler(logging.StreamHandler):
    """To whatever sys.stderr is at the time of the record (so redirection and pytest capture
    work), with the rank in the record."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        record.rank = rank()
        super().emit(record)


def setup_logging(level: int = logging.INFO, all_ranks: bool | None = None) -> None:
    """Log rsscale's `level` and above on rank 0 (on every rank with all_ranks or
    RSSCALE_LOG_ALL_RANKS=1), WARNING and above elsewhere, to stderr with a rank prefix.
    The handler sits on the root logger (other libraries' warnings get the prefix too, and
    records still propagate to pytest's caplog). Idempotent."""
    if all_ranks is None:
        all_ranks = os.environ.get("RSSCALE_LOG_ALL_RANKS") == "1"
    root = logging.getLogger()
    if not any(isinstance(h, _RankHandler) for h in root.handlers):
        root.addHandler(_RankHandler())
    logging.getLogger("rsscale").setLevel(level if all_ranks or rank() == 0 else max(level, logging.WARNING))


def peak_memory_bytes(device) -> int:
    """Allocator peak on a CUDA device; peak resident set size of this process otherwise."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ScalarWriter:
    """TensorBoard scalar curves under `folder` (torch's SummaryWriter), written by one rank only.

    `enabled` defaults to "this is global rank 0"; with folder None every call is a no-op."""

    def __init__(self, folder: str | None, prefix: str = "train", enabled: bool | None = None):
        self.prefix = prefix
        self._writer = None
        if folder and (rank() == 0 if enabled is None else enabled):
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=folder)

    def add(self, step: int, **scalars: float) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            if value is not None:
                self._writer.add_scalar(f"{self.prefix}/{name}", float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "ScalarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
