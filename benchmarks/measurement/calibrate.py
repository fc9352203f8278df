"""`rsscale calibrate`: the speeds of this machine that the step-time model (benchmarks/prediction/timemodel.py) adds up.

    rsscale calibrate --model small --micro-batch 2 --micro-batch 8 --nproc 2 --nproc 4   # CPU, gloo
    rsscale calibrate --model b12x1 --model l12x4 --precision bf16                          # one GPU

Measured, each as the median of timed repetitions after a warm-up:
  gemm       FLOP/s of the matmuls the presets produce: (rows = micro-batch x tokens, in, out)
             for qkv, proj, fc1, fc2 at every TP degree that divides the model, and the patch
             embedding / decoder embedding / head, in the training dtype
  attention  FLOP/s of the selected kernel backend's attention (kernels.attention) on the
             presets' (batch x branches, heads / TP, tokens, head dim)
  layernorm  bytes/s of kernels.layer_norm (read + write) over the same rows; the time model
             uses it for every elementwise / normalization pass
  steps      real one-process training steps (`rsscale bench`, one thread per process on CPU) at
             each micro-batch size, with and without recompute, each the median of --rounds runs
             (taken in turn), to which timemodel.fit_overhead fits what the operator sum misses
  fsdp       forward+backward of one-process steps with and without FSDP, for three presets
             (`measure_fsdp`): FSDP's per-unit and per-byte work beyond its collectives
  collectives  for all_reduce, all_gather, reduce_scatter and a send/recv pair, per group size
             (--nproc, gloo on CPU; NCCL on GPU needs that many GPUs): time = latency + bytes /
             bandwidth, fitted by least squares over 2^12..2^22 bytes; each timed right after a
             chunk of compute, minus the chunk (as training meets it: arrival skew and wake-up
             included), and with 4 processes also over the pairs (0,1), (2,3) at once ("2@4");
             each group size --rounds times, the median per size kept
  tp_collectives  all_reduce, all_gather and reduce_scatter timed the same way after an eighth of
             that chunk (with 4 processes on 2 cores the latency is about a third lower); a TP
             collective follows its share of a block's compute, often one sharded GEMM or nothing,
             and the time model interpolates between the two by that compute (the chunks'
             one-process times: collective_chunk_s)
  concurrency  (CPU) the slowdown of a real one-process training step (the first model, the
             largest micro-batch) with N copies training at once vs one alone (medians of --rounds,
             taken in turn); with no step
             measurements, of that chunk (kept as concurrency_chunk)
  probe      (not stored) every collective kind and group of one world size, one round of 20
             repetitions, and one of the one-process steps again: `profile --measure` rescales
             the stored fits and compute to the probes, one before each round
             (benchmarks/prediction/cpu_sharing.py `drift`, `rescaled`)
On CPU, compute is measured with one thread per process (torchrun's OMP_NUM_THREADS=1), as a
multi-process run computes. The calibration is stored in the results store (kind "calibration",
one run per calibration, its `device` column the key) and `latest(device)` reads the newest one.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np

from rsscale.scaling.runtime.log import progress
from rsscale.scaling.runtime.options import add_options, check, option, resolve
from rsscale.scaling.spec.run import PRECISIONS

log = logging.getLogger(__name__)
SIZES = [2**k for k in range(12, 23, 2)]  # collective message sizes, bytes
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
TP_COLLECTIVES = COLLECTIVES[:3]
CHUNK_ROWS = {"collectives": 512, "tp_collectives": 64}  # the compute timed before each kind (_work_chunk)


def _timed(fn, sync, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _window(fn, reps: int) -> float:
    """Mean time of `fn` over one sustained window: with more processes than cores, the median of
    short repetitions misses the time slices a process spends descheduled (most repetitions fit
    inside one slice), so a concurrency slowdown needs the window's total."""
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def gemm_shapes(cfgs, micro_batches, tps) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every matmul one rank runs for these presets, micro-batches and TP degrees."""
    shapes = set()
    for cfg in cfgs:
        for mb in micro_batches:
            e, d = mb * (cfg.num_visible + 1), mb * (cfg.num_patches + 1)
            shapes |= {(mb * cfg.num_patches, cfg.patch_dim, cfg.width), (e, cfg.width, cfg.dec_width), (d, cfg.dec_width, cfg.patch_dim)}
            for t in tps:
                for rows, h, m in ((e, cfg.width, cfg.mlp), (d, cfg.dec_width, cfg.dec_mlp)):
                    if h % t == 0 and m % t == 0:
                        shapes |= {(rows, h, 3 * h // t), (rows, h // t, h), (rows, h, m // t), (rows, m // t, h)}
    return sorted(shapes)


def attention_shapes(cfgs, micro_batches, tps) -> list[tuple[int, int, int, int]]:
    """(batch, heads, tokens, head dim) of the attention calls for these presets and layouts."""
    shapes = set()
    for cfg in cfgs:
        for mb in micro_batches:
            for t in tps:
                if cfg.heads % t == 0:
                    shapes.add((mb * cfg.branches, cfg.heads // t, cfg.num_visible + 1, cfg.width // cfg.heads))
                if cfg.dec_heads % t == 0:
                    shapes.add((mb, cfg.dec_heads // t, cfg.num_patches + 1, cfg.dec_width // cfg.dec_heads))
    return sorted(shapes)


def measure_compute(cfgs, micro_batches, tps, precision: str, device, reps: int = 5) -> dict:
    """GEMM and attention FLOP/s and LayerNorm bytes/s on `device` (module doc)."""
    import torch

    from rsscale import kernels

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {"gemm": [], "attention": [], "layernorm": []}
    for m, k, n in progress(gemm_shapes(cfgs, micro_batches, tps), desc="[calibrate] GEMM shapes", unit="shape"):
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        t = _timed(lambda: a @ b, sync, reps)
        out["gemm"].append({"shape": [m, k, n], "flops_per_s": 2 * m * k * n / t})
    for B, H, N, Dh in progress(attention_shapes(cfgs, micro_batches, tps), desc="[calibrate] attention shapes", unit="shape"):
        q, k, v = (torch.randn(B, H, N, Dh, device=device, dtype=dtype) for _ in range(3))
        t = _timed(lambda: kernels.attention(q, k, v), sync, reps)
        out["attention"].append({"shape": [B, H, N, Dh], "flops_per_s": 4 * B * H * N * N * Dh / t})
    widths = sorted({c.width for c in cfgs} | {c.dec_width for c in cfgs})
    rows = sorted({mb * (c.num_patches + 1) for c in cfgs for mb in micro_batches})
    for r in rows:
        for h in widths:
            x, w, b = torch.randn(r, h, device=device, dtype=dtype), torch.ones(h, device=device), torch.zeros(h, device=device)
            t = _timed(lambda: kernels.layer_norm(x, w, b), sync, reps)
            out["layernorm"].append({"shape": [r, h], "bytes_per_s": 2 * r * h * x.element_size() / t})
    return out


def _one_process_step(model: str, micro_batch: int, global_batch: int, precision: str, steps: int, path: str,
                      recompute: str = "none", warmup: int = 1, fsdp: bool = False):
    """Start a one-process `rsscale bench` with one torch thread (as each process of a multi-process
    CPU run computes) that writes its summary to `path`; `_summary(path)` reads its median step time back."""
    import subprocess

    from rsscale.benchmarks.measurement.bench import BenchConfig, Measure, bench_command
    from rsscale.scaling.spec.layout import Layout
    from rsscale.scaling.spec.run import Compute, DataParallel

    opts = BenchConfig(model=model, parallel=Layout(micro_batch=micro_batch, global_batch=global_batch),
                       compute=Compute(precision=precision, recompute=recompute), data_parallel=DataParallel(fsdp=fsdp),
                       measure=Measure(warmup=warmup, steps=steps, peak_tflops=1.0, summary_json=path), record=False)
    return subprocess.Popen(bench_command(opts, 1), env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)


def _summary(path: str, key: str = "step_time_median_s") -> float:
    """One number of a `rsscale bench --summary-json` file."""
    with open(path) as f:
        return json.load(f)[key]


def measure_steps(models, micro_batches, precision: str, reps: int = 6, rounds: int = 2, recomputes=(False, True),
                  global_batch: int | None = None) -> list[dict]:
    """Step time of one-process `rsscale bench` runs: each model x micro-batch x recompute off/on, at
    a global batch of twice the largest micro-batch unless given (so the micro-batch count varies
    too); the median over `rounds` runs of each, the runs of a round in turn (a shared machine's
    slow spells last seconds to minutes: they then shift one run of every point, not every run of one)."""
    import tempfile

    points = [(model, mb, recompute) for model in models for mb in micro_batches for recompute in recomputes]
    gb = global_batch or 2 * max(micro_batches)
    times = {p: [] for p in points}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "summary.json")
        for model, mb, recompute in progress(points * rounds, desc="[calibrate] one-process steps", unit="run"):  # rounds in turn
            if _one_process_step(model, mb, gb, precision, reps, path, "full" if recompute else "none", warmup=2).wait():
                raise RuntimeError(f"the calibration step run of {model} mb {mb} recompute={recompute} failed")
            times[model, mb, recompute].append(_summary(path))
    runs = []
    for (model, mb, recompute), t in times.items():
        log.info("step of %s mb %d gb %d recompute=%s: %s s", model, mb, gb, recompute, " ".join(f"{x:.4f}" for x in t))
        runs.append(dict(model=model, micro_batch=mb, global_batch=gb, recompute=recompute, precision=precision, measured_s=statistics.median(t)))
    return runs


def fsdp_models(models) -> list[str]:
    """Three presets of different unit sizes for `measure_fsdp` (its per-unit and per-byte costs
    need two; a third leaves a residual that says how well they fit): the calibrated models, then
    `tiny`, `medium` and `small` (1.3, 32 and 8 MB of fp32 weights) as needed."""
    return list(dict.fromkeys([*models, "tiny", "medium", "small"]))[:3]


def measure_fsdp(models, micro_batch: int, precision: str, reps: int = 6, rounds: int = 2) -> dict:
    """FSDP2's own work beyond its collectives: one-process `rsscale bench` forward+backward with
    and without --fsdp (a DP group of one still copies each unit's weights in and out, its gradients
    into the reduce-scatter buffer, and runs its hooks; it moves nothing), at 2 micro-batches per
    step, for presets of different unit sizes (`fsdp_models`); the pairs in turn, `rounds` times,
    medians kept; timemodel.fit_fsdp fits the per-unit and per-byte cost to the differences."""
    import tempfile

    from rsscale.benchmarks.prediction.timemodel import fit_fsdp

    times = {(m, f): [] for m in models for f in (False, True)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "summary.json")
        for model, fsdp in progress(list(times) * rounds, desc="[calibrate] FSDP pairs", unit="run"):  # rounds in turn
            if _one_process_step(model, micro_batch, 2 * micro_batch, precision, reps, path, warmup=2, fsdp=fsdp).wait():
                raise RuntimeError(f"the calibration step run of {model} fsdp={fsdp} failed")
            times[model, fsdp].append(_summary(path, "t_fwd_bwd_median_s"))
    points = []
    for model in models:
        plain, sharded = statistics.median(times[model, False]), statistics.median(times[model, True])
        log.info("forward+backward of %s mb %d x 2: %.4f s, with FSDP on one process %.4f s", model, micro_batch, plain, sharded)
        points.append(dict(model=model, micro_batch=micro_batch, global_batch=2 * micro_batch, extra_s=sharded - plain))
    return {**fit_fsdp(points), "points": points}


def measure_step_concurrency(model: str, micro_batch: int, precision: str, group_sizes, reps: int = 30, rounds: int = 2) -> dict:
    """{n: slowdown} of a real one-process training step when n such processes train at once, over
    the same step alone: the compute slowdown a rank of an n-process run sees (shared caches and
    memory bandwidth below the cores, time-sharing above them), with a training step's working set
    rather than a cache-resident chunk's. `reps` steps per copy, so that the copies, started
    together, overlap well beyond their start-up skew; alone and each n in turn, `rounds` times,
    each the median over rounds."""
    import tempfile

    def together(n, tmp):
        paths = [os.path.join(tmp, f"{n}-{i}.json") for i in range(n)]
        procs = [_one_process_step(model, micro_batch, micro_batch, precision, reps, path, warmup=2) for path in paths]
        if any(p.wait() for p in procs):
            raise RuntimeError(f"a concurrent calibration step run of {model} failed")
        return statistics.mean(_summary(path) for path in paths)

    sizes = [1, *group_sizes]
    with tempfile.TemporaryDirectory() as tmp:
        times = [[together(n, tmp) for n in sizes] for _ in progress(range(rounds), desc="[calibrate] concurrency rounds", unit="round")]
    alone, *others = (statistics.median(col) for col in zip(*times))
    out = {str(n): max(1.0, t / alone) for n, t in zip(group_sizes, others)}
    log.info("step of %s mb %d alone %.4f s; slowdown with N at once: %s", model, micro_batch, alone, out)
    return out


def fit_latency_bandwidth(sizes, times) -> dict:
    """t = latency + bytes / bandwidth by least squares on relative residuals (each time weighted
    by 1 / t, so the small, latency-bound sizes count as much as the large ones; times below a
    quarter of the median weigh as that much, so that noise near 0 cannot dominate), both terms
    >= 0: when one comes out negative the other is fitted alone. Times below 0 (a collective
    timed after compute, minus the compute, lost in noise) count as 0."""
    x, t = np.asarray(sizes, dtype=float), np.maximum(np.asarray(times, dtype=float), 0.0)
    w = 1.0 / np.maximum(t, max(0.25 * float(np.median(t)), 1e-6))
    best = None
    for cols in ([0, 1], [0], [1]):  # both terms, latency only, bandwidth only: the first with none negative
        A = np.stack([np.ones_like(x), x], axis=1)[:, cols] * w[:, None]
        coef = np.zeros(2)
        coef[cols] = np.linalg.lstsq(A, t * w, rcond=None)[0]
        if coef.min() >= 0:
            best = coef
            break
    lat, inv_bw = best if best is not None else (0.0, 0.0)
    return {"latency_s": float(lat), "bandwidth_bytes_per_s": float(1.0 / max(inv_bw, 1e-15))}


def _work_chunk(rows: int = 512):
    """An MLP sublayer's CPU work (GEMM, GELU, GEMM, LayerNorm on `rows` tokens of width 128): what a
    rank computes before a DP or PP collective (512 rows) or a TP one (64: one TP-sharded GEMM of
    the CPU presets)."""
    import torch
    import torch.nn.functional as F

    x, w1, w2 = torch.randn(rows, 128), torch.randn(128, 512) / 12, torch.randn(512, 128) / 24
    return lambda: F.layer_norm(F.gelu(x @ w1) @ w2, (128,))


def _collective_worker(rank, world, port, reps, path):
    """One spawned rank: the work chunk's time alone and with every rank computing at once, then every
    collective at every size, each timed right after a work chunk (as in training: the ranks arrive
    from compute, not from a barrier) minus the chunk alone; over the whole world and, for a world
    of 4 or more (even), over pairs of ranks all at once (a TP or DP group of 2 inside a larger run).
    Rank 0 writes {"slowdown": the chunk's time with every rank computing at once (mean over
    ranks) over its time on rank 0 alone, "collectives": {"<group>": {op: [seconds per size]}},
    "tp_collectives": the same for TP_COLLECTIVES after the small chunk} to `path`."""
    import datetime

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    chunk = _work_chunk()
    alone, together = [], []
    for _ in range(5):  # alternated, so that both see the same state of the machine
        dist.barrier()
        if rank == 0:  # the others wait in the barrier (blocked, not spinning)
            alone.append(_window(chunk, 100))
        dist.barrier()
        together.append(_window(chunk, 100))
    slow = torch.tensor([statistics.median(together)])
    dist.all_reduce(slow)
    groups = {str(world): (None, world)}
    if world >= 4 and world % 2 == 0:
        pairs = [dist.new_group([r, r + 1]) for r in range(0, world - 1, 2)]  # every rank creates every group
        groups[f"2@{world}"] = (pairs[rank // 2] if rank // 2 < len(pairs) else None, 2)
    res = {"slowdown": float(slow) / world / statistics.median(alone) if rank == 0 else None}
    for kind, ops in (("collectives", COLLECTIVES), ("tp_collectives", TP_COLLECTIVES)):
        before = _work_chunk(CHUNK_ROWS[kind])
        res[kind] = {key: _time_collectives(rank, world, group, size, ops, before, reps) for key, (group, size) in groups.items()}
    if rank == 0:
        with open(path, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def _time_collectives(rank, world, group, size, ops, chunk, reps) -> dict:
    """{op: [seconds per size]}: each collective of `group` right after `chunk`, minus `chunk` alone."""
    import torch
    import torch.distributed as dist

    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.10
    res = {}
    for op in ops:
        res[op] = []
        for nbytes in SIZES:
            n = nbytes // 4
            x = torch.ones(n)
            parts = [torch.empty(n) for _ in range(size)]
            big = torch.ones(n * size)
            peer = rank ^ 1

            def call():
                if op == "all_reduce":
                    dist.all_reduce(x, group=group)
                elif op == "all_gather":
                    dist.all_gather(parts, x, group=group)
                elif op == "reduce_scatter":
                    reduce_scatter(x, big, group=group)
                elif peer < world:
                    works = [dist.isend(x, peer), dist.irecv(parts[0], peer)]
                    for w in works:
                        w.wait()

            def after_chunk():
                chunk()
                call()

            dist.barrier()
            res[op].append(_timed(after_chunk, lambda: None, reps) - _timed(chunk, lambda: None, reps))
    return res


def measure_collectives(group_sizes, reps: int = 60, rounds: int = 1) -> tuple[dict, dict]:
    """({"collectives": {op: {group: {latency_s, bandwidth_bytes_per_s, sizes, times}}},
    "tp_collectives": the same after the small chunk, "collective_chunk_s": {kind: the chunk's
    one-process seconds}}, {n: concurrency slowdown}) over gloo processes; group "2@4" is a pair
    inside a world of 4. The slowdown is the work chunk's time with n processes computing at once
    over its time in one of them alone. Each group size is measured `rounds` times (fresh
    processes) and the median of each time kept: one run of 20 repetitions per size gave a 4 KB
    all-gather of a pair in 4 processes anywhere from -0.7 to 3.7 ms in three calibrations of the
    same box."""
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from rsscale.scaling.parallel.state import _free_port

    out, slowdown = {kind: {} for kind in CHUNK_ROWS}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a rank computes
    try:  # the chunks' one-process times: where timemodel.collective_s puts a TP collective between the two fits
        out["collective_chunk_s"] = {kind: _timed(_work_chunk(rows), lambda: None, 50) for kind, rows in CHUNK_ROWS.items()}
    finally:
        torch.set_num_threads(threads)
    for n in progress(group_sizes, desc="[calibrate] collective group sizes", unit="size"):
        runs = []
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "times.json")
                mp.spawn(_collective_worker, args=(n, _free_port(), reps, path), nprocs=n, join=True)  # raises if a rank fails
                with open(path) as f:
                    runs.append(json.load(f))
        slowdown[str(n)] = max(1.0, statistics.median(r["slowdown"] for r in runs))
        for kind in CHUNK_ROWS:
            for key, ops in runs[0][kind].items():
                for op in ops:
                    times = [statistics.median(at_size) for at_size in zip(*(r[kind][key][op] for r in runs))]
                    out[kind].setdefault(op, {})[key] = {**fit_latency_bandwidth(SIZES, times), "sizes": SIZES, "times": times}
    return out, slowdown


def probe(n: int, step: dict | None = None, reps: int = 20) -> dict:
    """What drifts on a shared CPU machine, re-timed in 20-45 s: the collective times of every kind
    and group of an n-process world as `measure_collectives` times them (one round, fewer
    repetitions), and with `step` (one of a calibration's `steps`) that one-process training step
    again (`step_s`; `step`: cpu_sharing.probe_step). `profile --measure` probes before each round
    and rescales the calibration to the probes (cpu_sharing.drift, rescaled): calibrations minutes
    apart timed the 4-process TP all-reduce at 5.0-8.2 ms (reports/PROFILER_VALIDATION.md). The
    N-process compute slowdown is not probed: the work chunk's slowdown did not follow the training
    step's across nine calibrations."""
    fits, _ = measure_collectives([n], reps=reps, rounds=1)
    out = {kind: fits[kind] for kind in CHUNK_ROWS}
    if step:
        (again,) = measure_steps([step["model"]], [step["micro_batch"]], step["precision"], rounds=1, recomputes=(step["recompute"],),
                                 global_batch=step["global_batch"])
        out["step_s"] = again["measured_s"]
    return out


def calibrate(models, micro_batches, tps, group_sizes, precision: str, steps: bool = True, rounds: int = 2) -> dict:
    import torch

    from rsscale.benchmarks.prediction.timemodel import fit_overhead
    from rsscale.scaling.runtime.store import environment
    from rsscale.scaling.spec.config import get_preset

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # as each process of a multi-process CPU run computes
    try:
        compute = measure_compute([get_preset(m) for m in models], micro_batches, tps, precision, device)
    finally:
        torch.set_num_threads(threads)
    result = {"device": environment()["device"], "precision": precision, "cpu_cores": os.cpu_count(), "models": list(models),
              "threads_per_process": 1 if not cuda else None, **compute}
    if group_sizes and cuda:
        log.warning("collective calibration over NCCL needs several GPUs; skipped (group sizes %s)", group_sizes)
    elif group_sizes:
        fits, result["concurrency"] = measure_collectives(group_sizes, rounds=rounds)
        result.update(fits)
        if steps:  # the slowdown of real training steps replaces the chunk's (kept as concurrency_chunk)
            result["concurrency_chunk"] = result["concurrency"]
            result["concurrency"] = measure_step_concurrency(models[0], max(micro_batches), precision, group_sizes, rounds=rounds)
    if steps:
        result["steps"] = measure_steps(models, micro_batches, precision, rounds=rounds)
        result["overhead"] = fit_overhead(result, result["steps"])
        result["fsdp"] = measure_fsdp(fsdp_models(models), min(8, max(micro_batches)), precision, rounds=rounds)
    result["load_average"] = os.getloadavg()[0]  # the state of the machine it describes (profile compares)
    return result


def store_calibration(result: dict, path: str | None) -> int:
    from rsscale.scaling.runtime.store import ResultsStore

    with ResultsStore(path).run(kind="calibration", precision=result["precision"], config=result) as run:
        run.log_many([("gemm_flops_per_s", g["flops_per_s"], i) for i, g in enumerate(result["gemm"])])
    return run.id


def latest(device: str, precision: str | None = None, path: str | None = None) -> dict | None:
    """The newest complete calibration of `device` (and precision) in the results store, or None."""
    from rsscale.scaling.runtime.store import ResultsStore

    store = ResultsStore(path)
    if not os.path.isfile(store.path):
        return None
    runs = store.runs(kind="calibration", status="complete")
    runs = runs[runs["device"] == device]
    if precision is not None:
        runs = runs[runs["precision"] == precision]
    return None if runs.empty else runs.iloc[-1]["config"]


@dataclass
class CalibrateConfig:
    """Every option of `rsscale calibrate`: the shapes and group sizes timed, where the result goes."""
    model: list[str] | None = option(None, "presets whose shapes are measured (repeatable; default small on CPU, b12x1 and l12x4 on GPU)")
    micro_batch: list[int] | None = option(None, "micro-batch sizes (repeatable; default 1 2 4 8 16)", ge=1)
    tp: list[int] | None = option(None, "TP degrees (repeatable; default 1 2 4 8)", ge=1)
    nproc: list[int] | None = option(None, "collective group sizes (repeatable; default 2 and 4 on CPU)", ge=2)
    precision: str | None = option(None, "default bf16 on GPU, fp32 on CPU", choices=PRECISIONS)
    rounds: int = option(2, "runs of each one-process step measurement, in turn; the median is kept", ge=1)
    results: str | None = option(None, "results store (default $RSSCALE_RESULTS or reports/results.db)")
    json: str | None = option(None, "also write the calibration to this JSON file")

    def __post_init__(self):
        check(self)


def add_arguments(parser) -> None:
    add_options(parser, CalibrateConfig)


def config_from_args(args) -> CalibrateConfig:
    return resolve(CalibrateConfig, args)


def main(args) -> int:
    import torch

    args = config_from_args(args)
    cuda = torch.cuda.is_available()
    models = args.model or (["b12x1", "l12x4"] if cuda else ["small"])
    group_sizes = args.nproc if args.nproc is not None else ([] if cuda else [2, 4])
    precision = args.precision or ("bf16" if cuda else "fp32")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if not cuda and load > cores / 2:
        log.warning("load average %.1f on %d cores: other work shares this machine, so the calibration describes it that busy", load, cores)
    result = calibrate(models, args.micro_batch or [1, 2, 4, 8, 16], args.tp or [1, 2, 4, 8], group_sizes, precision, rounds=args.rounds)
    run_id = store_calibration(result, args.results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    g = [x["flops_per_s"] for x in result["gemm"]]
    print(f"[calibrate] {result['device']} {precision}: {len(g)} GEMM shapes {min(g) / 1e9:.2f}-{max(g) / 1e9:.2f} GFLOP/s, "
          f"{len(result['attention'])} attention shapes, {len(result['layernorm'])} LayerNorm shapes; stored as calibration run {run_id}")
    if "overhead" in result:
        o = result["overhead"]
        print(f"[calibrate] fitted to {len(result['steps'])} one-process steps: operator compute x {o['compute_factor']:.3f}, "
              f"+ {o['per_block_pass_s'] * 1e3:.3f} ms per block pass, + {o['per_step_s'] * 1e3:.2f} ms per step "
              f"(worst residual {o['residual_rel']:.1%})")
    if "fsdp" in result:
        f = result["fsdp"]
        print(f"[calibrate] FSDP's own work per unit and micro-batch, fitted to {len(f['points'])} one-process pairs: "
              f"{f['per_unit_s'] * 1e3:.3f} ms + {f['s_per_byte'] * 1e12:.1f} ms per GB of its weights (worst residual {f['residual_rel']:.1%})")
    print(f"[calibrate] load average at the end {result['load_average']:.1f} on {os.cpu_count()} cores")
    if "concurrency" in result:
        print("[calibrate] compute slowdown with N processes at once: " + ", ".join(f"N={n}: x{v:.2f}" for n, v in result["concurrency"].items()))
    for kind, label in (("collectives", "after compute"), ("tp_collectives", "TP (after a GEMM)")):
        if kind in result:
            print(f"[calibrate] collectives {label}:")
        for op, fits in result.get(kind, {}).items():
            print(f"[calibrate]   {op:<15} " + "  ".join(f"n={n}: {f['latency_s'] * 1e6:.0f} us + B / {f['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s" for n, f in fits.items()))
    return 0
