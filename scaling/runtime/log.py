"""Rank-aware logging and TensorBoard scalars (bottom layer: imports nothing else from rsscale).

    setup_logging()                      # once per process (the CLI does it): rank 0 logs INFO,
                                         # other ranks WARNING and above; in a world of several
                                         # processes lines carry "[rank r]"
    log = logging.getLogger(__name__)    # every module logs through its own logger
    with ScalarWriter("runs/x/tb") as tb:    # no-op when the folder is None or on ranks != 0
        tb.add(step, loss=0.93, lr=1e-3)     # one tag per keyword, e.g. "train/loss"

The results store (scaling/runtime/store.py) stays the source of truth; TensorBoard is for watching
curves while a run goes.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time

FORMAT = "%(rank_prefix)s%(name)s: %(message)s"


def rank() -> int:
    """Global rank: torch.distributed's when started, else torchrun's RANK, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """torch.distributed's world size when started, else torchrun's WORLD_SIZE, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


class _RankHandler(logging.StreamHandler):
    """To whatever sys.stderr is at the time of the record (so redirection and pytest capture
    work), with "[rank r] " before it only where there are ranks to tell apart (not in a launcher
    or a single-process run)."""

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
        record.rank_prefix = f"[rank {rank()}] " if world_size() > 1 else ""
        super().emit(record)


def setup_logging(level: int = logging.INFO, all_ranks: bool | None = None) -> None:
    """Log rsscale's `level` and above on rank 0 (on every rank with all_ranks or
    RSSCALE_LOG_ALL_RANKS=1), WARNING and above elsewhere, to stderr (rank-prefixed when world > 1).
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
    try:  # Linux: VmHWM is max(the high-water mark clear_refs restarted, the RSS now); getrusage's ru_maxrss
        with open("/proc/self/status") as f:  # lags the RSS (updated lazily), so a run's peak could read below its start
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device) -> int:
    """Restart `peak_memory_bytes` from now (on CPU through Linux's clear_refs, where it exists)
    and return the memory in use now: a run's peak and its increase, not the process's."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak stays the process's
        return 0
    return peak_memory_bytes(device)  # the restarted high-water mark: the same counter the run's peak is read from


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


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def progress_line(done: int, total: int | None, elapsed: float, desc: str, unit: str) -> str:
    """'<desc>: 3/10 units (30 %), 2.5 s/unit, elapsed 8 s, ETA 18 s' (no ETA without a total)."""
    rate = done / elapsed if elapsed > 0 else float("inf")
    speed = f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit}"
    if not total:
        return f"{desc}: {done} {unit}s, {speed}, elapsed {_duration(elapsed)}"
    return (f"{desc}: {done}/{total} {unit}s ({100 * done / total:.0f} %), {speed}, elapsed {_duration(elapsed)}, "
            f"ETA {_duration((total - done) / rate)}")


def progress(iterable, total: int | None = None, desc: str = "progress", unit: str = "item", inline: bool | None = None):
    """Yield the items of `iterable` and say on stderr (rank 0 only) how far the loop is: step/total,
    rate and ETA. On a terminal one line rewritten in place; otherwise (a log file, CI) a plain line at
    every 10 % (and after any item ending a minute or more after the last line). inline=False asks
    for plain lines on a terminal too, for loops whose items print lines of their own. A loop of one
    item has no rate to tell: nothing is shown."""
    total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
    if rank() != 0 or total is not None and total <= 1:
        yield from iterable
        return
    inline = sys.stderr.isatty() if inline is None else inline
    t0 = last = time.perf_counter()
    shown = 0
    try:
        for done, item in enumerate(iterable, 1):
            yield item
            now = time.perf_counter()
            if inline:
                due = now - last >= 0.5 or done == total
            else:
                due = now - last >= 60 or bool(total) and 10 * done // total > 10 * shown // total
            if due:
                line = progress_line(done, total, now - t0, desc, unit)
                sys.stderr.write(f"\r{line}\x1b[K" if inline else line + "\n")
                sys.stderr.flush()
                last, shown = now, done
    finally:
        if inline and shown:
            sys.stderr.write("\n")
