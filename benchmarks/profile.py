"""`rsscale profile`: rank every parallel layout of a model on N devices by its memory and step time.

    rsscale profile --model g12x4 --gpus 8 --memory-gb 80 --peak-tflops 989 --global-batch 256
    rsscale profile --model small --gpus 4 --global-batch 16 --precision fp32 --measure --max-measure 4
    rsscale profile --model g12x4 --gpus 32 --global-batch 256 --top 5 --count

Layouts: every (tp, pp, dp) with tp*pp*dp = gpus, SP on/off, power-of-two micro-batches,
interleaved 1F1B with every --vpp V whose pp*V divides the depth (when pp > 1; --vpp to pick),
activation checkpointing off/on, distributed optimizer off/on (when dp > 1), kept when
scaling/spec/layout.py `validate_layout` accepts them. Each is predicted by benchmarks/prediction/analytic.py
`estimate` (per-device memory of the worst pipeline stage; step time, images/s and MFU from
benchmarks/prediction/timemodel.py, calibrated on this machine when `rsscale calibrate` stored a calibration
of it, else on the device's datasheet) and marked as not fitting when its memory exceeds
--memory-gb minus --reserve-gb (CUDA context, allocator slack, workspaces). The table is ranked by
predicted images/s, fitting layouts first.
--measure runs `rsscale bench` (torchrun with `gpus` processes) on the best fitting layouts that
this machine can hold (on CPU at most 4 gloo processes; memory from this machine) and stores each
measured run (kind "profile") with the prediction beside it; `rsscale report` shows the error.
--count counts the memory of every shown layout exactly (benchmarks/prediction/count.py: the rank built on
fake tensors inside a fake process group of the full world size) and prints it beside the analytic
figures, component by component.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
from dataclasses import dataclass

from rsscale.benchmarks.autolayout import DEFAULT_MEMORY_GB, GIB, enumerate_plans, finetune_plans, rank_finetune_plans, rank_plans, size
from rsscale.benchmarks.measurement.bench import BenchConfig, Measure, bench_command
from rsscale.benchmarks.prediction import analytic, devices
from rsscale.scaling.runtime.options import add_options, check, option, resolve
from rsscale.scaling.spec.config import get_preset
from rsscale.scaling.spec.run import PRECISIONS

MAX_CPU_PROCESSES = 4


def assumed_device(args, hw: analytic.Hardware, peak_measured: bool = False, named: devices.Device | None = None) -> str:
    """The first line of the output: every figure in the table follows from these numbers, and
    the ones no flag set are an H100's (or the named device's), whatever this machine is."""
    if named is not None:
        nodes = (f"; {args.nodes} nodes x {args.gpus_per_node}, {hw.inter_bandwidth / 1e9:.3g} GB/s between nodes"
                 if args.nodes > 1 else "")
        return (f"device: {named.label} ({named.source}): {args.memory_gb:g} GiB, {hw.peak_flops / 1e12:g} TFLOP/s {args.precision} peak, "
                f"{hw.hbm_bytes_per_s / 1e9:g} GB/s memory, {hw.bandwidth / 1e9:.3g} GB/s in a node{nodes}")
    h100 = analytic.Hardware()
    defaults = [flag for flag, value, default in (("--memory-gb", args.memory_gb, DEFAULT_MEMORY_GB),
                                                  ("--peak-tflops", hw.peak_flops, h100.peak_flops),
                                                  ("--bandwidth-gbs", hw.bandwidth, h100.bandwidth),
                                                  ("--hbm-gbs", hw.hbm_bytes_per_s, h100.hbm_bytes_per_s)) if value == default]
    line = (f"device assumed: {args.memory_gb:g} GiB, {hw.peak_flops / 1e12:g} TFLOP/s peak"
            f"{' (CPU matmul, measured here)' if peak_measured else ''}, {hw.bandwidth / 1e9:g} GB/s per device, "
            f"{hw.hbm_bytes_per_s / 1e9:g} GB/s memory")
    if defaults:
        line += f" ({', '.join(defaults)}: {analytic.DEFAULT_DEVICE} defaults; set them for another device)"
    return line


def format_row(r: dict) -> str:
    p, m = r["plan"], r["est"].memory
    flags = p.flags
    return (f"{str(p.layout):<34} {flags:<3} {size(m['params']):>7} {size(m['grads']):>7} {size(m['optimizer']):>7} "
            f"{size(m['activations']):>7} {size(m['total']):>8} {'yes' if r['fits'] else 'NO':>4} "
            f"{r['img_s']:10.1f} {100 * r['mfu']:6.1f}")


def print_table(rows: list[dict], top: int) -> list[dict]:
    """Print the ranking; returns the rows shown."""
    print(f"{'layout':<34} {'R/Z':<3} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'total':>8} {'fits':>4} "
          f"{'img/s':>10} {'MFU%':>6}")
    shown = [r for r in rows if r["fits"]][:top]
    for r in shown:
        print(format_row(r))
    misfits = [r for r in rows if not r["fits"]]
    if misfits:
        print(f"... {len(misfits)} layouts do not fit; the {min(3, len(misfits))} fastest of them:")
        for r in misfits[:3]:
            print(format_row(r))
    print("memory in GiB per device (M: MiB; worst pipeline stage); R/S = full/selective recompute, Z = ZeRO-1, F = FSDP, D = FSDP synced on the last micro-batch only")
    return shown + misfits[:3]


def print_counted(cfg, rows: list[dict]) -> None:
    """Counted (benchmarks/prediction/count.py, every stage) beside analytic bytes for the worst stage of each row."""
    from rsscale.benchmarks.prediction.count import COMPONENTS, count_plan

    print(f"\ncounted (fake tensors in a fake {rows[0]['plan'].layout.world_size}-rank world) / analytic, GiB (M: MiB) on the worst stage:")
    print(f"{'layout':<34} {'R/Z':<3} " + " ".join(f"{c:>15}" for c in COMPONENTS + ("total",)) + f" {'worst err':>9}")
    for r in rows:
        p = r["plan"]
        stages = count_plan(cfg, p)
        worst = max(range(len(stages)), key=lambda s: stages[s].total)
        counted, predicted = stages[worst].as_dict(), analytic.memory_per_stage(cfg, p)[worst]
        err = max(abs(predicted[c] / counted[c] - 1) for c in counted if counted[c])
        flags = p.flags
        cells = " ".join(f"{size(counted[c]):>7}/{size(predicted[c]):<7}" for c in COMPONENTS + ("total",))
        print(f"{str(p.layout):<34} {flags:<3} {cells} {100 * err:8.2f}%")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def machine_limits() -> tuple[int, float]:
    """(processes this machine can run for --measure, bytes per process)."""
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return n, torch.cuda.get_device_properties(0).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return MAX_CPU_PROCESSES, total / MAX_CPU_PROCESSES


def measure(cfg, rows: list[dict], args, calib: dict | None = None) -> int:
    """Run the harness on the best fitting layouts, `--rounds` times each, round-robin (a slow spell
    of a shared machine then hits every layout, not one); returns how many layouts failed. On CPU
    with a calibration and more than one process, each round starts with a probe of the
    collectives and of one one-process step (calibrate.probe), and the table predicts with the
    calibration rescaled to the probes (cpu_sharing.drift), the calibration's own prediction beside
    it; the results store keeps the ranking's prediction."""
    procs, mem_each = machine_limits()
    if args.gpus > procs:
        raise SystemExit(f"rsscale profile: --measure with --gpus {args.gpus} needs {args.gpus} local devices; this machine runs at most {procs}")
    todo = [r for r in rows if r["fits"] and r["est"].memory["total"] <= mem_each]
    todo = todo[: args.max_measure] if not args.measure_spread else spread(todo, args.max_measure)
    runs, natives, failed, probes = [[] for _ in todo], [[] for _ in todo], set(), []
    peers = [_peer_of(cfg, r["plan"]) if args.peer == "torch" else None for r in todo]
    probing = calib is not None and args.gpus > 1 and args.probe and not _cuda()
    tmp = tempfile.mkdtemp(prefix="rsscale-profile-")
    for k in range(args.rounds):
        if probing and todo:
            from rsscale.benchmarks.measurement.calibrate import probe
            from rsscale.benchmarks.prediction.cpu_sharing import probe_step

            print(f"[profile] probing {args.gpus}-process collectives and a one-process step (round {k + 1}/{args.rounds})", flush=True)
            probes.append(probe(args.gpus, probe_step(calib)))
        for i, r in enumerate(todo):
            if i in failed:
                continue
            p = r["plan"]
            L = p.layout
            measure = Measure(warmup=args.warmup, steps=args.steps, peak_tflops=args.peak_tflops,
                              record_kind="profile", summary_json=os.path.join(tmp, f"{k}-{i}.json"),
                              predicted_step_s=r["step_s"] if r.get("calibrated") else None, peer="torch" if peers[i] == "" else "none")
            opts = BenchConfig(model=cfg.name, **p.run_sections(), measure=measure, results=args.results)
            print(f"[profile] measuring {i + 1}/{len(todo)}" + (f" (round {k + 1}/{args.rounds})" if args.rounds > 1 else "")
                  + f": {L} {p.precision} recompute={p.recompute} zero={p.distributed_optimizer} fsdp={p.fsdp}"
                  + (f" (no PyTorch-native peer: {peers[i]})" if peers[i] else ", with its PyTorch-native peer" if peers[i] == "" else ""),
                  flush=True)
            rc = subprocess.call(bench_command(opts, args.gpus))
            if rc:
                failed.add(i)
                print(f"[profile] layout {L} failed with exit code {rc}", flush=True)
                continue
            with open(opts.measure.summary_json) as f:
                summary = json.load(f)
            runs[i].append(summary["step_time_median_s"])
            if "ours_over_peer_step_time" in summary:
                natives[i].append(summary["ours_over_peer_step_time"])
    predicted = {i: r["step_s"] for i, r in enumerate(todo)}
    if probes:
        from rsscale.benchmarks.prediction import timemodel
        from rsscale.benchmarks.prediction.cpu_sharing import drift, rescaled

        factors = drift(calib, probes)
        print("[profile] probed over calibrated: " + ", ".join(f"{name} x{f:.2f}" for name, f in factors.items()), flush=True)
        now = rescaled(calib, factors)
        predicted = {i: timemodel.predict(cfg, r["plan"], now, os.cpu_count())["step_s"] for i, r in enumerate(todo)}
    medians = {i: statistics.median(m) for i, m in enumerate(runs) if i not in failed}
    table = [dict(row=todo[i], predicted_s=predicted[i], calibrated_s=todo[i]["step_s"] if probes else None, measured_s=t,
                  rounds=runs[i], error=predicted[i] / t - 1, vs_native=statistics.median(natives[i]) if natives[i] else None)
             for i, t in medians.items()]
    if table:
        text = validation_table(table)
        print(text)
        if args.validation_out:
            write_validation(args.validation_out, text, cfg, args)
            scatter(table, os.path.splitext(args.validation_out)[0] + f"-{cfg.name}-{args.gpus}.png")
    return len(failed)


def spread(rows: list[dict], n: int) -> list[dict]:
    """n rows spread over the ranking (best, worst and between), one per (tp, pp, dp, sp) first."""
    seen, distinct = set(), []
    for r in rows:
        L = r["plan"].layout
        key = (L.tp, L.pp, L.vpp, L.dp, L.sp, r["plan"].flags)
        if key not in seen:
            seen.add(key)
            distinct.append(r)
    if len(distinct) <= n:
        return distinct
    return [distinct[round(i * (len(distinct) - 1) / (n - 1))] for i in range(n)] if n > 1 else distinct[:1]


def _peer_of(cfg, plan) -> str:
    """Empty where `bench --peer torch` has a native peer for the plan, else why not (one line)."""
    from rsscale.benchmarks.measurement.peer import why_no_peer

    return "the peer is an MAE" if cfg.supervised else why_no_peer(plan.layout, plan.run_sections()["data_parallel"]) or ""


def validation_table(table: list[dict]) -> str:
    """Markdown: predicted vs measured step time per layout, with the error statistics and ranks;
    with probes, the calibration's own prediction and its median and worst error too."""
    import numpy as np

    probed = any(t.get("calibrated_s") for t in table)
    peer = any(t.get("vs_native") for t in table)
    head = ("| layout | R/Z | predicted s | " + ("calibration only s | " if probed else "") + "measured s | rounds: min-max s | error |"
            + (" ours / native |" if peer else ""))
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for t in table:
        p, m = t["row"]["plan"], t.get("rounds") or [t["measured_s"]]
        lines.append(f"| {p.layout} | {p.flags} | {t['predicted_s']:.4f} | " + (f"{t['calibrated_s']:.4f} | " if probed else "")
                     + f"{t['measured_s']:.4f} | {min(m):.4f}-{max(m):.4f} ({len(m)}) | {100 * t['error']:+.1f} % |"
                     + ((f" {t['vs_native']:.3f} |" if t.get("vs_native") else " - |") if peer else ""))
    errs = np.abs([t["error"] for t in table])
    fastest = min(range(len(table)), key=lambda i: table[i]["measured_s"] / table[i]["row"]["plan"].layout.global_batch)
    rank = sorted(range(len(table)), key=lambda i: table[i]["predicted_s"]).index(fastest) + 1
    lines += ["", f"median |error| {100 * np.median(errs):.1f} %, worst {100 * errs.max():.1f} % over {len(table)} layouts; "
              f"the measured fastest layout is predicted #{rank}"]
    if probed:
        own = np.abs([t["calibrated_s"] / t["measured_s"] - 1 for t in table])
        lines.append(f"(the calibration alone, without the probes: median {100 * np.median(own):.1f} %, worst {100 * own.max():.1f} %)")
    return "\n".join(lines)


def scatter(table: list[dict], path: str) -> None:
    """Predicted vs measured step time, log-log, with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = [t["measured_s"] for t in table], [t["predicted_s"] for t in table]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.loglog(x, y, "o")
    for t in table:
        ax.annotate(str(t["row"]["plan"].layout).rsplit(" mb", 1)[0], (t["measured_s"], t["predicted_s"]), fontsize=6)
    lo, hi = min(x + y) / 1.5, max(x + y) * 1.5
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xlabel="measured step time (s)", ylabel="predicted step time (s)", title="time model vs measurement")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_validation(path: str, text: str, cfg, args) -> None:
    import torch  # noqa: F401 - so environment() names a GPU

    from rsscale.scaling.runtime.store import environment

    env = environment()
    head = (f"# Step-time model: predicted vs measured ({cfg.name}, {args.gpus} processes, global batch {args.global_batch}, {args.precision})\n\n"
            f"device: {env['device']}; torch {env['torch_version']}, megatron-core {env['mcore_version']}; commit {env['git_commit']}; "
            f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n\n")
    with open(path, "a" if os.path.exists(path) else "w") as f:
        f.write(head + text + "\n\n")


def load_calibration(args, named: devices.Device | None = None) -> dict | None:
    """The newest calibration of this device in the results store; says so when there is none.
    With a named device other than this machine's, or several nodes (a calibration times one
    node), none: the datasheet numbers and the stated constants are used."""
    import torch  # also so environment() names a GPU

    from rsscale.benchmarks.measurement.calibrate import latest
    from rsscale.scaling.runtime.store import environment

    device = environment()["device"]
    if named is not None and not devices.is_this_machine(named, device):
        print(f"[profile] step times from {named.label}'s datasheet (benchmarks/prediction/devices.py; matmuls at {args.efficiency:g} of peak, "
              f"collectives at {args.comm_efficiency:.2f} of the links, elementwise at the memory bandwidth); this machine is {device!r}")
        return None
    if args.nodes > 1:
        print(f"[profile] {args.nodes} nodes: step times from the datasheet (a calibration times one node)")
        return None
    calib = latest(device, args.precision, args.results)
    if calib is None:
        print(f"[profile] no {args.precision} calibration of {device!r} in the results store: step times from the time model "
              "on the datasheet (run `rsscale calibrate` to calibrate it on this machine)")
    else:
        print(f"[profile] step times from the time model calibrated on {device!r} (benchmarks/prediction/timemodel.py)")
        if "load_average" in calib and not torch.cuda.is_available():
            print(f"[profile] load average {os.getloadavg()[0]:.1f} now, {calib['load_average']:.1f} when calibrated, on {os.cpu_count()} cores "
                  "(on CPU the calibration describes the machine as loaded then)")
    return calib


@dataclass
class ProfileConfig:
    """Every option of `rsscale profile`: the device assumed, the layouts searched, what is measured."""
    model: str | None = option(None, "model preset (rsscale models) or a model file", required=True)
    gpus: int | None = option(None, "number of devices (tp*pp*dp); default --nodes x --gpus-per-node", ge=1)
    device: str | None = option(None, "a named device: its datasheet peak, memory and link bandwidths (benchmarks/prediction/devices.py); "
                                "--memory-gb, --peak-tflops, --bandwidth-gbs, --hbm-gbs still override", choices=devices.NAMES)
    nodes: int = option(1, "nodes: collectives whose ranks span more than --gpus-per-node run at the device's inter-node bandwidth", ge=1)
    gpus_per_node: int | None = option(None, "devices per node (default: --gpus, one node)", ge=1)
    comm_efficiency: float = option(devices.COMM_EFFICIENCY, "with --device: fraction of the link bandwidth a ring collective reaches",
                                    gt=0, le=1)
    memory_gb: float | None = option(None, f"memory per device in GB (GiB) (default {DEFAULT_MEMORY_GB:g}, or --device's)", gt=0)
    reserve_gb: float = option(2.0, "memory kept free per device (context, workspaces)", ge=0)
    peak_tflops: float | None = option(None, f"per-device peak TFLOP/s (default {analytic.Hardware.peak_flops / 1e12:g}, "
                                       f"{analytic.DEFAULT_DEVICE} bf16; with --measure on CPU, measured here)", gt=0)
    efficiency: float = option(devices.MATMUL_EFFICIENCY, "fraction of peak the matmuls reach", gt=0, le=1)
    bandwidth_gbs: float | None = option(None, "effective collective bandwidth per device, GB/s "
                                         f"(default {analytic.Hardware.bandwidth / 1e9:g}, or --device's link x --comm-efficiency)", gt=0)
    hbm_gbs: float | None = option(None, "memory bandwidth per device, GB/s, for the elementwise passes "
                                   f"(default {analytic.Hardware.hbm_bytes_per_s / 1e9:g}, or --device's)", gt=0)
    global_batch: int | None = option(None, "images per optimizer step (default 256; 16 with --task)", ge=1)
    micro_batch: list[int] | None = option(None, "micro-batch sizes to try (repeatable; default powers of 2)", ge=1)
    vpp: list[int] | None = option(None, "virtual pipeline sizes (interleaved 1F1B) to try (repeatable; default 1 and every V with "
                                   "pp*V dividing the depth)", ge=1)
    precision: str = option("bf16", "training precision of the layouts ranked", choices=PRECISIONS)
    top: int = option(20, "fitting layouts to print", ge=1)
    layout: str | None = option(None, "print only the layout `--layout auto` on pretrain/bench/finetune would run: the fastest "
                                "predicted whose exact count fits (benchmarks/autolayout.py)", choices=("auto",))
    count: bool = option(False, "also count each shown layout's memory exactly on fake tensors (benchmarks/prediction/count.py)")
    measure: bool = option(False, "run the harness on the best fitting layouts")
    max_measure: int = option(4, "layouts to measure", ge=1)
    peer: str = option("none", "--measure: also run each measured layout the PyTorch-native way (bench --peer torch, steps "
                       "alternating) and add ours / native to the table; a layout without a native peer says why in one line",
                       choices=("none", "torch"))
    warmup: int = option(2, "harness warm-up steps", ge=0)
    steps: int = option(5, "harness measured steps", ge=1)
    rounds: int = option(1, "--measure: times each layout is measured, round-robin; the table uses the median", ge=1)
    results: str | None = option(None, "results store for --measure and the calibration")
    probe: bool = option(True, "--measure on CPU: predict with the stored calibration alone, without re-timing the collectives and "
                         "one step before each round")
    measure_spread: bool = option(False, "measure layouts spread over the ranking (one per layout kind) instead of the best ones")
    validation_out: str | None = option(None, "append the predicted-vs-measured table (Markdown) to this file")
    calibration: bool = option(True, "ignore stored calibrations; rank with the datasheet's rates")
    task: str | None = option(None, "profile `rsscale finetune --task` layouts (TP x DP, every layout counted exactly) instead of MAE "
                              "pretraining", choices=("seg", "det"))
    img: int = option(1024, "--task: fine-tuning crop in pixels", ge=1)
    detector: str | None = option(None, "--task det: as rsscale finetune --detector", choices=("orcnn", "fcos"))
    channels: int | None = option(None, "--task: pyramid/head channels (rsscale finetune --channels)", ge=1)
    window: int | None = option(None, "--task: window attention size in tokens (rsscale finetune --window)", ge=1)

    def __post_init__(self):
        check(self)


def add_arguments(parser) -> None:
    add_options(parser, ProfileConfig)


def config_from_args(args) -> ProfileConfig:
    return resolve(ProfileConfig, args)


def check_args(args: ProfileConfig) -> None:
    """One-line ValueError for options that make no sense together; fills in --gpus/--gpus-per-node/--memory-gb."""
    if args.peer != "none" and not args.measure:
        raise ValueError("--peer torch compares measured steps; add --measure")
    if args.layout and (args.measure or args.count):
        raise ValueError("--layout auto prints the choice (counted exactly); drop --count/--measure")
    if args.task and (args.measure or args.count):
        raise ValueError("--task counts every layout already and cannot --measure yet; drop --count/--measure")
    if args.gpus is None:
        if args.gpus_per_node is None:
            raise ValueError("give --gpus, or --nodes and --gpus-per-node")
        args.gpus = args.nodes * args.gpus_per_node
    elif args.gpus_per_node is not None and args.gpus != args.nodes * args.gpus_per_node:
        raise ValueError(f"--gpus {args.gpus} is not --nodes {args.nodes} x --gpus-per-node {args.gpus_per_node}")
    elif args.nodes > 1:
        if args.gpus % args.nodes:
            raise ValueError(f"--gpus {args.gpus} does not split over --nodes {args.nodes}")
        args.gpus_per_node = args.gpus // args.nodes
    if args.memory_gb is None:
        args.memory_gb = DEFAULT_MEMORY_GB
    if args.reserve_gb >= args.memory_gb:
        raise ValueError(f"--reserve-gb ({args.reserve_gb:g}) must be below --memory-gb ({args.memory_gb:g})")


def main_finetune(args, cfg, hw, budget, calib) -> int:
    """`rsscale profile --task seg|det`: fine-tuning layouts, counted and ranked."""
    options = {k: getattr(args, k) for k in ("detector", "channels", "window") if getattr(args, k) is not None}
    plans = finetune_plans(cfg, args.gpus, args.global_batch, args.precision, args.micro_batch or [1, 2])
    if not plans:
        print(f"no valid fine-tuning layout of {cfg.name} on {args.gpus} devices with global batch {args.global_batch}")
        return 1
    print(f"fine-tuning {args.task} ({cfg.name}, {args.img} px) on {args.gpus} devices, global batch {args.global_batch}, "
          f"{args.precision}: counting {len(plans)} layouts (fake tensors in a fake {args.gpus}-rank world)", flush=True)
    rows = rank_finetune_plans(cfg, plans, hw, budget, args.task, args.img, options, calib)
    rates = "calibrated on this machine" if calib else (f"peak {hw.peak_flops / 1e12:g} TFLOP/s x {hw.efficiency:g}, "
                                                       f"{hw.bandwidth / 1e9:g} GB/s")
    print(f"{sum(r['fits'] for r in rows)} fit in {args.memory_gb:g} GiB - {args.reserve_gb:g} reserved (step time on counted FLOPs, "
          f"{rates})")
    print_table(rows, args.top)
    print("memory counted exactly per rank (TP0/DP0) except transient buffers; detection activations up to the dense head "
          "outputs (the loss's sampled anchors/RoIs are not counted)")
    return 0


def main_auto(args, cfg, hw, dev) -> int:
    """`rsscale profile --layout auto`: the choice the training commands would make, and why."""
    from rsscale.benchmarks import autolayout

    view = autolayout.View(hw, args.memory_gb, dev.label if dev else "the device assumed above", named=dev is not None)
    calib = None if not args.calibration else load_calibration(args, dev)
    if args.task:
        options = {k: getattr(args, k) for k in ("detector", "channels", "window")}
        plan, lines = autolayout.choose_finetune(cfg, args.gpus, args.global_batch, args.precision, view, args.reserve_gb, args.task, args.img,
                                                 options, calib)
    else:
        plan, lines = autolayout.choose(cfg, args.gpus, args.global_batch, args.precision, view, args.reserve_gb, calib)
    command = "finetune --task " + args.task if args.task else "pretrain"
    lines[-1] = lines[-1].replace("running", "choice:", 1)
    print("\n".join(lines))
    print(f"as flags: rsscale {command} {' '.join(autolayout.layout_flags(plan, finetune=bool(args.task)))} --global-batch {args.global_batch}")
    return 0


def apply_device(args) -> devices.Device | None:
    """--device: fill the memory, peak and bandwidth flags the user left unset from its datasheet."""
    if not args.device:
        return None
    dev = devices.get_device(args.device)
    if args.memory_gb is None:
        args.memory_gb = dev.memory_gb
    if args.peak_tflops is None:
        args.peak_tflops = devices.peak_tflops(dev, args.precision)
    if args.bandwidth_gbs is None:
        args.bandwidth_gbs = dev.intra_gbs * args.comm_efficiency
    if args.hbm_gbs is None:
        args.hbm_gbs = dev.hbm_gbs
    return dev


def main(args) -> int:
    args = config_from_args(args)
    dev = apply_device(args)
    check_args(args)
    cfg = get_preset(args.model)
    if args.global_batch is None:
        args.global_batch = 16 if args.task else 256
    peak_measured = args.measure and args.peak_tflops is None and not _cuda()
    if peak_measured:
        import torch

        from rsscale.benchmarks.prediction.devices import matmul_peak_tflops

        args.peak_tflops = matmul_peak_tflops(torch.device("cpu"), "fp32")
    hw = analytic.Hardware(peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else analytic.Hardware.peak_flops,
                           efficiency=args.efficiency, bandwidth=(args.bandwidth_gbs or analytic.Hardware.bandwidth / 1e9) * 1e9,
                           gpus_per_node=args.gpus_per_node or 0,
                           inter_bandwidth=dev.inter_gbs * args.comm_efficiency * 1e9 if dev and args.nodes > 1 else 0.0,
                           hbm_bytes_per_s=args.hbm_gbs * 1e9 if args.hbm_gbs else analytic.Hardware.hbm_bytes_per_s)
    print(assumed_device(args, hw, peak_measured, dev), flush=True)
    budget = (args.memory_gb - args.reserve_gb) * GIB
    if args.layout:
        return main_auto(args, cfg, hw, dev)
    calib = None if not args.calibration else load_calibration(args, dev)
    if args.task:
        return main_finetune(args, cfg, hw, budget, calib)
    plans = enumerate_plans(cfg, args.gpus, args.global_batch, args.precision, args.micro_batch, args.vpp)
    if not plans:
        print(f"no valid layout of {cfg.name} on {args.gpus} devices with global batch {args.global_batch}")
        return 1
    rows = rank_plans(cfg, plans, hw, budget, calib)
    n_fit = sum(r["fits"] for r in rows)
    print(f"{cfg.name} on {args.gpus} devices, global batch {args.global_batch}, {args.precision}: {len(rows)} valid layouts, "
          f"{n_fit} fit in {args.memory_gb:g} GiB - {args.reserve_gb:g} reserved (peak {hw.peak_flops / 1e12:g} TFLOP/s x "
          f"{hw.efficiency:g}, {hw.bandwidth / 1e9:g} GB/s)")
    shown = print_table(rows, args.top)
    if args.count and shown:
        print_counted(cfg, shown)
    if args.measure:
        return 1 if measure(cfg, rows, args, calib) else 0
    return 0
