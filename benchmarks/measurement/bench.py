"""`rsscale bench`: measure one (preset, layout) for a few optimizer steps.

    rsscale bench --model small --tp 2 --micro-batch 8 --global-batch 16 --nproc 2
    torchrun --nproc-per-node 8 -m rsscale.scaling.runtime.cli bench --model g12x4 --tp 4 --pp 2 --precision bf16 \
        --micro-batch 8 --global-batch 64 --recompute full --peak-tflops 989

It drives the trainer (scaling/train/pretrain.py `Trainer.build(config).train_step()`) on in-memory random
images, so no data I/O is timed except the per-step drawing of images and masks ("data" time).
Warm-up steps are run and dropped; each measured step is timed by the trainer with device
synchronization (torch.cuda.synchronize on GPU). Reported per layout:
  step time median, IQR and min/max; images/s = global batch / median step time;
  achieved TFLOP/s = global batch x mae_step_flops(cfg, recompute) / median step time (all devices);
  MFU = model FLOPs (no recompute) / (median step time x peak x devices), peak from --peak-tflops or
  a matmul timed here in the training dtype;
  peak memory per rank: allocator peak on GPU (torch.cuda.max_memory_allocated), on CPU the peak
  RSS (resource.getrusage) and its increase over the RSS before the model was built;
  time split medians: data / forward+backward / exposed DP communication (end of backward to the
  end of the gradient-reduction wait: what the bucketed reduction did not hide behind backward)
  / optimizer; `--overlap-sweep` follows every measured step by one with the reduction
  after backward (same trainer, so both see the same drift of a shared machine) and reports the
  two side by side;
  the analytic model's prediction for the same layout (benchmarks/prediction/analytic.py), side by side;
  with --pp > 1 the pipeline bubble: per rank (forward+backward time - the rank's own compute
  time) / its compute time, each forward and backward timed with a device synchronize around it
  (scaling/parallel/pipeline.py `run_schedule(clock=...)`; so p2p waits, transfers and stage imbalance all
  count as bubble); reported as the mean over ranks and on the bottleneck rank (the most compute:
  the one that sets the step time), beside the theory (p-1)/(v*m) of balanced stages.
--vpp-sweep 1,2: measure the layout once per --vpp value in this one launch and print a table of
img/s and bubble side by side (reports/interleaved.md).
--trace DIR: after the timed steps, --trace-steps more run under torch.profiler (benchmarks/measurement/trace.py):
  DIR/trace_rank<r>.json (Chrome/Perfetto), DIR/ops_rank<r>.txt and .csv (per-operator times), on
  CUDA DIR/memory_rank<r>.pickle (torch.cuda.memory._dump_snapshot; open at pytorch.org/memory_viz)
  and DIR/memory_rank<r>.json with the allocator peak beside the counted (benchmarks/prediction/count.py)
  and analytic bytes of that rank's stage.
Every rank measures; rank 0 gathers the per-rank peaks and writes one record (kind "bench", or
"profile" when the profiler runs it) to the results store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from rsscale.benchmarks.prediction.devices import matmul_peak_tflops
from rsscale.scaling.runtime.launch import add_launch_arguments, command_line, wants_launch
from rsscale.scaling.runtime.log import ScalarWriter, peak_memory_bytes
from rsscale.scaling.runtime.options import add_options, as_config, check, option, resolve, section, to_argv
from rsscale.scaling.spec.config import get_preset
from rsscale.scaling.spec.layout import Layout, fill_dp, relaunch_checked
from rsscale.scaling.spec.run import Compute, DataParallel, Recording

log = logging.getLogger(__name__)


@dataclass
class Measure:
    """What `bench` times and where its outputs go."""
    warmup: int = option(3, "steps run before timing (dropped)", ge=0)
    steps: int = option(10, "measured steps", ge=1)
    overlap_sweep: bool = option(False, "follow every measured step by one with the DP reduction after backward "
                                 "(same trainer) and report overlap on vs off side by side")
    vpp_sweep: str | None = option(None, "measure once per --vpp value in this launch (V1,V2,...), img/s and pipeline bubble side by "
                                   "side (overrides --vpp)")
    peak_tflops: float | None = option(None, "per-device peak for MFU (default: measure a matmul)", gt=0)
    trace: str | None = option(None, "after the timed steps, profile --trace-steps more: a Chrome trace and per-operator table per "
                               "rank, and on CUDA a memory snapshot (benchmarks/measurement/trace.py)")
    trace_steps: int = option(2, "steps profiled with --trace", ge=1)
    summary_json: str | None = option(None, "also write rank 0's summary to this JSON file")
    peer: str = option("none", "torch: also run the same model the PyTorch-native way (one process, DDP, ZeroRedundancyOptimizer, "
                       "DTensor TP and SP, torch.distributed.pipelining, FSDP2; fused AdamW, SDPA), steps alternating with ours; "
                       "ratios in the summary and the store", choices=("none", "torch"))
    predicted_step_s: float | None = option(None, "the time model's prediction (`profile --measure`), recorded beside the measurement", hidden=True)
    record_kind: str = option("bench", "the store's run kind", choices=("bench", "profile"), hidden=True)


@dataclass
class BenchConfig:
    """Every option of `rsscale bench`; the layout, compute and data-parallel sections are the trainer's own."""
    model: str = option("tiny", "model preset (rsscale models) or a model file")
    parallel: Layout = section(Layout)
    compute: Compute = section(Compute)
    data_parallel: DataParallel = section(DataParallel)
    measure: Measure = section(Measure)
    results: str | None = option(None, "results store (default: $RSSCALE_RESULTS or reports/results.db)")
    record: bool = option(True, "do not write to the results store")
    tensorboard: str | None = option(None, "write TensorBoard scalars (step time, loss, lr, grad norm, img/s, memory) here")

    def __post_init__(self):
        check(self)


def bench_command(config: BenchConfig, nproc: int) -> list[str]:
    """The command line that runs `config` on `nproc` local processes (torchrun when nproc > 1)."""
    argv = to_argv(config)
    return command_line("bench", argv if "--dp" in argv else argv + ["--dp", str(config.parallel.dp)], nproc)  # --dp 1 stays 1 on more ranks


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def summarize(step_times, global_batch: int, step_flops: float, model_flops: float, peak_tflops: float, devices: int) -> dict:
    """Robust statistics of the measured steps and the rates derived from the median."""
    t = np.asarray(step_times, dtype=float)
    med = float(np.median(t))
    return {
        "step_time_median_s": med,
        "step_time_p25_s": float(np.percentile(t, 25)),
        "step_time_p75_s": float(np.percentile(t, 75)),
        "step_time_min_s": float(t.min()),
        "step_time_max_s": float(t.max()),
        "images_per_s": global_batch / med,
        "tflops": global_batch * step_flops / med / 1e12,
        "tflops_per_device": global_batch * step_flops / med / 1e12 / devices,
        "mfu": global_batch * model_flops / med / 1e12 / (peak_tflops * devices),
    }


def check_peer(config: BenchConfig) -> Layout:
    """The layout, unless --peer torch asks for a native peer it has none of (bad usage, one line)."""
    if config.measure.peer == "torch":
        from rsscale.benchmarks.measurement.peer import native_kind

        try:
            native_kind(config.parallel, config.data_parallel)
        except ValueError as e:
            raise ValueError(f"--peer torch: {e}") from None
    return config.parallel


def run_bench(opts: BenchConfig) -> dict | None:
    """Measure `opts` on this process's rank; returns the summary on rank 0 (None elsewhere)."""
    import torch
    import torch.distributed as dist

    from rsscale.benchmarks.prediction import analytic
    from rsscale.scaling.spec.config import get_preset, mae_step_flops, param_count
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    store = open_store(opts)  # before measuring: a bad store must not throw a measurement away
    layout, m = opts.parallel, opts.measure
    measured = m.steps * (2 if m.overlap_sweep else 1)
    config = TrainConfig(model=opts.model, parallel=layout, compute=opts.compute, data_parallel=opts.data_parallel,
                         steps=m.warmup + measured, data="random", recording=Recording(record=False))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.reset_peak_memory_stats()
    import rsscale.scaling.model.mae  # noqa: F401 - libraries loaded before the baseline, so the RSS increase is the run's

    plan = analytic.Plan.of(opts)
    counted_stages, counted = None, {}
    if m.trace:  # counted before any process group exists (counting builds its own fake one)
        from rsscale.benchmarks.prediction.count import count_plan

        counted_stages = count_plan(get_preset(opts.model), plan)
        counted = {"counted_mem_bytes": max(c.total for c in counted_stages),
                   "counted_act_bytes": max(c.activations for c in counted_stages)}
    check_peer(opts)  # before any process group
    trainer = Trainer.build(config)
    before = trainer.memory_at_start  # memory when the trainer restarted the peak count, before its model: the same window as the peak
    trainer.time_compute = layout.pp > 1  # each forward/backward timed: the measured pipeline bubble
    rank = dist.get_rank()
    peer, peer_recs = None, []
    if m.peer == "torch":
        from rsscale.benchmarks.measurement.peer import NativePeer

        peer = NativePeer(trainer)
        log.info(f"peer: the same model the PyTorch-native way ({peer.kind}, {peer.optimizer_impl} AdamW), steps alternating with ours")

    def step():
        """Our step, after the peer's on the same batch when there is one."""
        if peer is not None:
            peer_recs.append(peer.train_step(trainer._micro_batches()))
        return trainer.train_step()

    log.info(f"{opts.model} {layout} {opts.compute.precision}: {m.warmup} warm-up + {m.steps} measured steps")
    first = [step() for _ in range(m.warmup)]
    first_peer = peer_recs[:1]
    del peer_recs[:]
    recs, other = [], ([] if m.overlap_sweep else None)
    with ScalarWriter(opts.tensorboard, prefix="bench") as tb:
        for i in range(m.steps):
            if other is not None:
                other.append(_step_without_overlap(trainer))
            recs.append(step())
            r = recs[-1]
            tb.add(i + 1, **{k: r[k] for k in ("t_step", "loss", "lr", "grad_norm", "images_per_s")}, peak_memory_bytes=peak_memory_bytes(trainer.device))
            log.info(f"step {i + 1}/{m.steps}: {r['t_step']:.4f} s, loss {r['loss']:.4f}")
    mine = {"rank": rank, "peak": peak_memory_bytes(trainer.device), "before": before}
    if trainer.time_compute:  # this rank's idle share of forward+backward, per step
        mine["bubble"] = float(np.median([(r["t_fwd_bwd"] - r["t_compute"]) / r["t_compute"] for r in recs]))
        mine["compute"] = float(np.median([r["t_compute"] for r in recs]))
    if m.trace:  # after the timed steps, so the profiler does not slow them down
        from rsscale.benchmarks.measurement.trace import trace_steps

        mine["peak"] = max(mine["peak"], trace_steps(trainer, m.trace, m.trace_steps, counted_stages))
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, mine)
    if rank != 0:
        return None

    cfg = trainer.cfg
    peak_tflops = m.peak_tflops or matmul_peak_tflops(trainer.device, opts.compute.precision)
    summary = summarize([r["t_step"] for r in recs], layout.global_batch, mae_step_flops(cfg, opts.compute.recompute),
                        mae_step_flops(cfg, "none"), peak_tflops, layout.world_size)
    for key in ("t_data", "t_fwd_bwd", "t_dp_exposed", "t_optim"):
        summary[f"{key}_median_s"] = float(np.median([r[key] for r in recs]))
    if other is not None:  # the same steps with the reduction after backward, side by side
        for key in ("t_fwd_bwd", "t_dp_exposed", "t_step"):
            summary[f"overlap_off_{key}_median_s"] = float(np.median([r[key] for r in other]))
        summary["overlap_off_images_per_s"] = layout.global_batch / summary["overlap_off_t_step_median_s"]
    if m.trace:
        summary.update(counted)
    if peer is not None:
        summary.update(peer_summary(peer, recs, peer_recs, (first[:1] or recs[:1])[0], (first_peer or peer_recs[:1])[0], layout.global_batch))
    summary["peak_mem_bytes"] = max(p["peak"] for p in peaks)
    summary["peak_mem_delta_bytes"] = max(p["peak"] - p["before"] for p in peaks)
    summary["peak_tflops_used"] = peak_tflops
    if layout.pp > 1:
        from rsscale.scaling.parallel.pipeline import bubble_fraction

        summary["bubble_measured"] = float(np.mean([p["bubble"] for p in peaks]))
        summary["bubble_bottleneck"] = max(peaks, key=lambda p: p["compute"])["bubble"]
        summary["bubble_theory"] = bubble_fraction(layout.pp, layout.vpp, layout.num_micro)
    est = analytic.estimate(cfg, plan, analytic.Hardware(peak_flops=peak_tflops * 1e12))
    summary["predicted_mem_bytes"] = est.memory["total"]
    summary["predicted_act_bytes"] = est.memory["activations"]
    summary["predicted_images_per_s"] = est.images_per_s
    if m.predicted_step_s is not None:
        summary["predicted_step_time_s"] = m.predicted_step_s
    if store is not None:
        summary["recorded"] = _record(store, opts, layout, cfg, param_count(cfg, "mae"), summary, recs, peaks, trainer.device)
    return summary


def peer_summary(peer, recs, peer_recs, first, first_peer, global_batch: int) -> dict:
    """Ours beside the native peer, each step's time without drawing the batch (medians of the
    alternating steps), and both sides' loss on the first step (same weights and batch)."""
    ours = float(np.median([r["t_step"] - r["t_data"] for r in recs]))
    native = float(np.median([r["t_step"] for r in peer_recs]))
    return {"peer_kind": peer.kind, "peer_optimizer": peer.optimizer_impl, "ours_step_no_data_median_s": ours,
            "peer_step_time_median_s": native, "peer_images_per_s": global_batch / native, "ours_over_peer_step_time": ours / native,
            "first_step_loss_ours": first["loss"], "first_step_loss_peer": first_peer["loss"],
            "first_step_loss_abs_diff": abs(first["loss"] - first_peer["loss"])}


def _step_without_overlap(trainer) -> dict:
    """One training step with the DP reduction started after backward instead of during it."""
    trainer.optimizer.overlap = False
    try:
        return trainer.train_step()
    finally:
        trainer.optimizer.overlap = True


def open_store(opts: BenchConfig):
    """The results store this process will record into (rank 0 with recording on), opened and
    checked now; None when nothing is recorded. Raises StoreError (one line) for a bad store."""
    if not opts.record or int(os.environ.get("RANK", 0)) != 0:
        return None
    from rsscale.scaling.runtime.store import ResultsStore

    return ResultsStore(opts.results)


def _record(store, opts, layout, cfg, params, summary, recs, peaks, device) -> bool:
    """Write the run into `store`; if that fails, save it as JSON beside the store and say where.
    Returns whether the store holds the run."""
    device_name = None
    if device.type == "cuda":
        import torch

        device_name = torch.cuda.get_device_name(device)
    extra = {"device": device_name} if device_name else {}
    fields = dict(kind=opts.measure.record_kind, preset=cfg.name, params=params, layout=dict(tp=layout.tp, pp=layout.pp, dp=layout.dp, sp=layout.sp),
                  micro_batch=layout.micro_batch, global_batch=layout.global_batch, precision=opts.compute.precision,
                  kernels=opts.compute.kernels, config=as_config(opts), device_count=layout.world_size, **extra)
    texts = {k: v for k, v in summary.items() if isinstance(v, str)}  # the peer's kind and optimizer: tags of its numbers
    metrics = ([(k, v, None, texts) if k.startswith(("peer_", "ours_", "first_step")) else (k, v) for k, v in summary.items() if k not in texts]
               + [("step_time_s", r["t_step"], i) for i, r in enumerate(recs)]
               + [("peak_mem_rank_bytes", p["peak"], None, {"rank": p["rank"]}) for p in peaks])
    try:
        with store.run(**fields) as run:
            run.log_many(metrics)
    except Exception as err:  # noqa: BLE001 - whatever broke the store, keep the measurement
        path = save_unrecorded(store.path, dict(store=store.path, run=fields, metrics=metrics, error=str(err)))
        log.error(f"could not record in {store.path} ({err}); the record is saved in {path}")
        return False
    log.info(f"recorded run {run.id} in {store.path} (kind={opts.measure.record_kind})")
    return True


def save_unrecorded(store_path: str, record: dict) -> str:
    """Write `record` as JSON beside the store (else in the current folder); returns the path."""
    import json

    name = f"{os.path.basename(store_path)}.unrecorded-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    for folder in (os.path.dirname(os.path.abspath(store_path)), os.getcwd()):
        path = os.path.join(folder, name)
        try:
            with open(path, "w") as f:
                json.dump(record, f, indent=1, default=str)
            return path
        except OSError:
            continue
    raise OSError(f"could not save the unrecorded bench result beside {store_path} nor in {os.getcwd()}")


def print_summary(s: dict) -> None:
    gib = 2**30
    print(f"[bench] step time median {s['step_time_median_s']:.4f} s (IQR {s['step_time_p25_s']:.4f}-{s['step_time_p75_s']:.4f}, "
          f"min {s['step_time_min_s']:.4f}, max {s['step_time_max_s']:.4f})")
    print(f"[bench] {s['images_per_s']:.1f} img/s, {s['tflops']:.3f} TFLOP/s ({s['tflops_per_device']:.3f} per device), "
          f"MFU {100 * s['mfu']:.1f}% of {s['peak_tflops_used']:.2f} TFLOP/s per device")
    print(f"[bench] split: data {s['t_data_median_s']:.4f} s, forward+backward {s['t_fwd_bwd_median_s']:.4f} s, "
          f"exposed DP comm {s['t_dp_exposed_median_s']:.4f} s, optimizer {s['t_optim_median_s']:.4f} s")
    if "overlap_off_t_step_median_s" in s:
        print(f"[bench] {'DP grad reduction':<28} {'exposed comm s':>14} {'fwd+bwd s':>10} {'step s':>8} {'img/s':>8}")
        for name, pre, step, ips in (("overlapped (bucketed)", "", "step_time_median_s", "images_per_s"),
                                     ("after backward", "overlap_off_", "overlap_off_t_step_median_s", "overlap_off_images_per_s")):
            print(f"[bench] {name:<28} {s[pre + 't_dp_exposed_median_s']:>14.4f} {s[pre + 't_fwd_bwd_median_s']:>10.4f} "
                  f"{s[step]:>8.4f} {s[ips]:>8.1f}")
    print(f"[bench] peak memory (max over ranks) {s['peak_mem_bytes'] / gib:.3f} GiB, increase over start "
          f"{s['peak_mem_delta_bytes'] / gib:.3f} GiB; predicted {s['predicted_mem_bytes'] / gib:.3f} GiB"
          + (f", counted {s['counted_mem_bytes'] / gib:.3f} GiB" if "counted_mem_bytes" in s else ""), flush=True)
    if "peer_step_time_median_s" in s:
        print(f"[bench] vs PyTorch-native ({s['peer_kind']}, {s['peer_optimizer']} AdamW), step without drawing the batch: "
              f"ours {s['ours_step_no_data_median_s']:.4f} s, native {s['peer_step_time_median_s']:.4f} s, "
              f"ratio {s['ours_over_peer_step_time']:.3f}; first-step loss ours {s['first_step_loss_ours']:.6f}, "
              f"native {s['first_step_loss_peer']:.6f}", flush=True)
    if "bubble_measured" in s:
        print(f"[bench] pipeline bubble (idle / compute time in forward+backward) {100 * s['bubble_measured']:.1f}% mean over ranks, "
              f"{100 * s['bubble_bottleneck']:.1f}% on the bottleneck rank; theory (p-1)/(v*m) {100 * s['bubble_theory']:.1f}%", flush=True)


def sweep_table(rows: list[tuple[int, dict]]) -> str:
    """Markdown: img/s, step time and pipeline bubble per --vpp value, side by side."""
    lines = ["| --vpp | img/s | step time median s (IQR) | bubble, mean over ranks | bubble, bottleneck rank | bubble theory (p-1)/(v*m) "
             "| predicted img/s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for v, s in rows:
        pct = {k: f"{100 * s[k]:.1f} %" if k in s else "-" for k in ("bubble_measured", "bubble_bottleneck", "bubble_theory")}
        lines.append(f"| {v} | {s['images_per_s']:.1f} | {s['step_time_median_s']:.4f} ({s['step_time_p25_s']:.4f}-{s['step_time_p75_s']:.4f}) "
                     f"| {pct['bubble_measured']} | {pct['bubble_bottleneck']} | {pct['bubble_theory']} | {s['predicted_images_per_s']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `rsscale bench`
# ---------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    add_options(parser, BenchConfig)
    add_launch_arguments(parser)


def config_from_args(args, world: int | None = None) -> BenchConfig:
    """Defaults <- --config file <- flags; --dp defaults to world / (tp*pp) ($WORLD_SIZE under torchrun)."""
    return resolve(BenchConfig, args, adjust=lambda tree, given: fill_dp(tree, given, world))


def main(args) -> int:
    config = config_from_args(args)
    if wants_launch(args):
        return relaunch_checked("bench", args, lambda world: (check_peer(config_from_args(args, world)), get_preset(config.model)))
    sweep = config.measure.vpp_sweep
    if sweep:
        try:
            values = [int(v) for v in sweep.split(",")]
        except ValueError:
            raise SystemExit(f"rsscale bench: --vpp-sweep takes comma-separated integers, got {sweep!r}") from None
        rows = [(v, run_bench(dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, vpp=v),
                                                  measure=dataclasses.replace(config.measure, vpp_sweep=None)))) for v in values]
        summary = rows[-1][1]
        if summary is not None:
            for v, s in rows:
                print(f"[bench] --vpp {v}:")
                print_summary(s)
            print(sweep_table(rows), flush=True)
    else:
        summary = run_bench(config)
        if summary is not None:
            print_summary(summary)
    if summary is not None:
        if config.measure.summary_json:
            import json

            with open(config.measure.summary_json, "w") as f:
                json.dump(summary, f, indent=1)
    from rsscale.scaling.parallel.state import destroy_parallel

    destroy_parallel()
    return 1 if summary is not None and summary.get("recorded") is False else 0
