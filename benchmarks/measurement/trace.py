"""`rsscale bench --trace DIR`: where a step's time and memory go, per rank.

    trace_steps(trainer, "runs/trace", steps=2, counted_stages=count_plan(cfg, plan))

Runs `steps` training steps under torch.profiler (CPU activity, plus CUDA on a GPU) and writes:
  DIR/trace_rank<r>.json   Chrome / Perfetto trace (chrome://tracing, ui.perfetto.dev)
  DIR/ops_rank<r>.txt      per-operator table (key_averages), sorted by self device time on CUDA,
                           by self CPU time otherwise
  DIR/ops_rank<r>.csv      the same, one row per operator: name, calls, self/total CPU and CUDA us
  DIR/memory_rank<r>.json  this rank's stage, the allocator peak (CUDA: max_memory_allocated over
                           the traced steps; absent on CPU, which has no allocator statistics) and
                           the counted and analytic bytes of that stage, component by component
  DIR/memory_rank<r>.pickle  CUDA only: torch.cuda.memory._dump_snapshot of the traced steps
                           (drag into https://pytorch.org/memory_viz)
"""

from __future__ import annotations

import csv
import json
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def operator_rows(prof, cuda: bool) -> list[dict]:
    """One dict per operator of a finished torch.profiler run, the most expensive first."""
    rows = []
    for e in prof.key_averages():
        rows.append({"name": e.key, "calls": e.count, "self_cpu_us": e.self_cpu_time_total, "cpu_us": e.cpu_time_total,
                     "self_cuda_us": getattr(e, "self_device_time_total", 0.0) if cuda else 0.0,
                     "cuda_us": getattr(e, "device_time_total", 0.0) if cuda else 0.0})
    key = "self_cuda_us" if cuda else "self_cpu_us"
    return sorted(rows, key=lambda r: -r[key])


def trace_steps(trainer, out_dir: str, steps: int, counted_stages=None) -> int:
    """Profile `steps` more steps of `trainer` into `out_dir` (module doc); returns the allocator
    peak in bytes on CUDA (0 on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from rsscale.benchmarks.prediction import analytic

    if steps < 1:
        raise ValueError(f"--trace-steps must be >= 1, got {steps}")
    os.makedirs(out_dir, exist_ok=True)
    rank, cuda = dist.get_rank(), trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        for _ in range(steps):
            trainer.train_step()
    prof.export_chrome_trace(os.path.join(out_dir, f"trace_rank{rank}.json"))
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(os.path.join(out_dir, f"ops_rank{rank}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=60) + "\n")
    rows = operator_rows(prof, cuda)
    with open(os.path.join(out_dir, f"ops_rank{rank}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    peak = 0
    if cuda:
        peak = int(torch.cuda.max_memory_allocated(trainer.device))
        torch.cuda.memory._dump_snapshot(os.path.join(out_dir, f"memory_rank{rank}.pickle"))
        torch.cuda.memory._record_memory_history(enabled=None)
    stage = trainer.state.pp_rank()
    plan = analytic.Plan.of(trainer.config, trainer.layout)
    memory = {"rank": rank, "stage": stage, "device": str(trainer.device),
              "peak_allocated_bytes": peak if cuda else None,
              "analytic_bytes": analytic.memory_per_stage(trainer.cfg, plan)[stage],
              "counted_bytes": counted_stages[stage].as_dict() if counted_stages else None}
    with open(os.path.join(out_dir, f"memory_rank{rank}.json"), "w") as f:
        json.dump(memory, f, indent=1)
    if rank == 0:
        log.info("trace of %d steps written to %s (rank 0's slowest operators: %s)", steps, out_dir,
                 ", ".join(r["name"] for r in rows[:5]))
    return peak
