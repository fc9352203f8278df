"""`--layout auto` on `rsscale pretrain`, `bench`, `finetune` and `profile`: the profiler chooses the layout.

    rsscale pretrain --layout auto --gpus 2 --model small --global-batch 16 --steps 100
    rsscale finetune --layout auto --gpus 2 --task seg --dataset synthetic --global-batch 8
    rsscale profile --layout auto --model g12x4 --device h100-sxm --nodes 4 --gpus-per-node 8

The dispatcher (scaling/runtime/cli.py) hands the command line here before parsing it; `resolve` returns
it with `--layout auto` replaced by the chosen flags (--tp --pp --dp --micro-batch --vpp [--sp]
--recompute [--distributed-optimizer | --fsdp]; fine-tuning: --tp --dp --micro-batch [--sp]
[--activation-checkpointing] [--distributed-optimizer]; and --nproc from --gpus), so the command
runs, checkpoints and records exactly what an explicit layout would (the run's config and the
store hold the choice). `profile --layout auto` prints the choice and stops.

The choice: every valid layout (`enumerate_plans` below), the analytic memory of
each against the device's memory minus a reserve, ranked by predicted step time (benchmarks/prediction/timemodel.py,
calibrated on this machine when it has a calibration stored, else on the device's datasheet;
`--device` for a named device's datasheet, `--nodes`/`--gpus-per-node` for collectives that
cross nodes). The fastest is
then counted exactly (benchmarks/prediction/count.py: each pipeline stage's rank built on fake tensors in a
fake process group of the full world size); if the count does not fit, the next is counted, so
the layout run is one whose exact count fits. Fine-tuning layouts have no analytic memory model:
each is counted (`rank_finetune_plans`). It is deterministic (no timing here), so ranks started
by torchrun with `--layout auto` agree. The top 5 are printed with why the winner won: memory per
rank, predicted step time, pipeline bubble, communication.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import os
from dataclasses import dataclass

from rsscale.benchmarks.prediction import analytic, devices
from rsscale.scaling.spec.config import RECOMPUTE, get_preset
from rsscale.scaling.spec.layout import LAYOUT_FLAGS, Layout, validate_layout

GIB, MIB = 2**30, 2**20
DEFAULT_MEMORY_GB = 80.0  # an H100's, like analytic.Hardware's defaults
COMMANDS = {"pretrain": "rsscale.scaling.train.pretrain", "bench": "rsscale.benchmarks.measurement.bench", "finetune": "rsscale.finetune.finetune"}
CHOSEN = tuple(f for f in LAYOUT_FLAGS if f != "--global-batch") + ("--recompute", "--distributed-optimizer", "--fsdp",
                                                                     "--activation-checkpointing")
# this module's flags, removed before the command parses
OWN = {"--gpus": int, "--device": str, "--memory-gb": float, "--reserve-gb": float, "--nodes": int, "--gpus-per-node": int}
MAX_COUNTED = 8  # layouts counted exactly before giving up on the analytic ranking


# ------------------------------------------------------------------------------- the search
SHARDINGS = ("none", "zero", "fsdp", "fsdp-deferred")  # DP sharing: replicated, ZeRO-1, FSDP, FSDP synced on the last micro-batch


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_plans(cfg, gpus: int, global_batch: int, precision: str, micro_batches=None, vpps=None,
                    pipeline: bool = True) -> list[analytic.Plan]:
    """All valid plans for `gpus` devices (validity: scaling.layout.validate_layout); with
    pipeline=False only pp = 1 (fine-tuning)."""
    plans = []
    for tp in divisors(gpus):
        for pp in divisors(gpus // tp) if pipeline else [1]:
            dp = gpus // (tp * pp)
            per_replica = global_batch // dp if global_batch % dp == 0 else 0
            mbs = micro_batches or [2**k for k in range(12) if 2**k <= max(per_replica, 1)]
            vs = vpps or [v for v in divisors(max(cfg.depth // pp, 1)) if pp > 1 or v == 1]
            for sp, mb, vpp, recompute, shard in itertools.product((False, True), mbs, vs, RECOMPUTE, SHARDINGS):
                if shard != "none" and dp == 1:
                    continue
                layout = Layout(tp=tp, pp=pp, dp=dp, sp=sp, micro_batch=mb, global_batch=global_batch, vpp=vpp)
                if validate_layout(layout, cfg, gpus) or (shard == "fsdp-deferred" and (vpp > 1 or layout.num_micro == 1)):
                    continue  # a deferred sync needs several micro-batches and one chunk per stage
                plans.append(analytic.Plan(layout, precision=precision, recompute=recompute, distributed_optimizer=shard == "zero",
                                           fsdp=shard.startswith("fsdp"), defer_fsdp_sync=shard == "fsdp-deferred"))
    return plans


def finetune_plans(cfg, gpus: int, global_batch: int, precision: str, micro_batches=None) -> list[analytic.Plan]:
    """The valid fine-tuning plans: TP x DP (no pipeline), full recompute or none, ZeRO-1 or not (no FSDP)."""
    return [p for p in enumerate_plans(cfg, gpus, global_batch, precision, micro_batches, pipeline=False)
            if p.recompute != "selective" and not p.fsdp]


def rank_plans(cfg, plans, hw: analytic.Hardware, budget_bytes: float, calib: dict | None = None) -> list[dict]:
    """Predictions (analytic.estimate), fitting layouts first, each group by predicted images/s
    (best first). Step time: benchmarks/prediction/timemodel.py at `calib`'s measured rates if given, else at
    `hw`'s datasheet rates."""
    rows = []
    for plan in plans:
        est = analytic.estimate(cfg, plan, hw, calib)
        rows.append(dict(plan=plan, est=est, fits=est.memory["total"] <= budget_bytes, step_s=est.step_time_s, calibrated=calib is not None,
                         img_s=est.images_per_s, mfu=est.mfu))
    return sorted(rows, key=lambda r: (not r["fits"], -r["img_s"]))


def rank_finetune_plans(cfg, plans, hw: analytic.Hardware, budget_bytes: float, task: str, img: int, options: dict,
                        calib: dict | None = None) -> list[dict]:
    """Fine-tuning layouts, each counted exactly (benchmarks/prediction/count.py `count_finetune`: the run's
    own model and optimizer on one rank, activations and forward FLOPs of one micro-batch), ranked
    like `rank_plans`. Step time: timemodel.predict_counted on the counted work, at `calib`'s
    measured rates if given, else at `hw`'s datasheet rates."""
    from rsscale.benchmarks.prediction import timemodel
    from rsscale.benchmarks.prediction.count import count_finetune

    rates = timemodel.calibration(hw, calib)
    rows, allocations, activations = [], {}, {}
    tokens = (img // cfg.patch_size) ** 2
    for plan in plans:  # each part counted once: it depends on only some of the layout's fields
        L = plan.layout
        a_key, b_key = (L.tp, L.dp, plan.distributed_optimizer), (L.tp, L.sp, L.micro_batch, plan.recompute)
        if a_key not in allocations:
            allocations[a_key] = count_finetune(cfg, plan, task, img, parts=("allocations",), **options)
        if b_key not in activations:
            activations[b_key] = count_finetune(cfg, plan, task, img, parts=("activations",), **options)
        (allocated, work), (saved, flops_of) = allocations[a_key], activations[b_key]
        counted, work = dataclasses.replace(allocated, activations=saved.activations), {**work, **flops_of}
        t = timemodel.predict_counted(cfg, plan, rates, work, tokens, os.cpu_count())
        step_s = t["step_s"]
        mfu = L.num_micro * 3 * work["flops"] / (step_s * hw.peak_flops)
        flops = 3 * work["flops"] + (work["block_flops"] if plan.recompute == "full" else 0)
        est = analytic.Estimate(plan=plan, memory=counted.as_dict(), step_flops=L.num_micro * flops * L.world_size, step_time_s=step_s,
                                images_per_s=L.global_batch / step_s, mfu=mfu, time=t)
        rows.append(dict(plan=plan, est=est, fits=counted.total <= budget_bytes, step_s=step_s, calibrated=calib is not None,
                         img_s=est.images_per_s, mfu=mfu))
    return sorted(rows, key=lambda r: (not r["fits"], -r["img_s"]))


def size(n_bytes: float) -> str:
    """GiB to two decimals; below 0.1 GiB, where that keeps one digit or none (small models on
    CPU), MiB to two decimals, marked M."""
    if 0 < n_bytes < 0.1 * GIB:
        return f"{n_bytes / MIB:.2f}M"
    return f"{n_bytes / GIB:.2f}"


# ------------------------------------------------------------------------------- the choice
@dataclass
class View:
    """What the choice assumes about each device: the time model's hardware, memory, a name."""

    hw: analytic.Hardware
    memory_gb: float
    where: str
    named: bool = False


def device_view(precision: str, gpus: int, device: str | None = None, memory_gb: float | None = None,
                nodes: int = 1, gpus_per_node: int | None = None) -> View:
    """A named device's datasheet (uncalibrated constants), else this machine: its GPU, or its CPU
    whose RAM the processes share."""
    import torch

    if gpus_per_node is None:
        gpus_per_node = gpus // nodes if gpus % nodes == 0 else 0
    if device and device != "cpu":
        named = devices.get_device(device)
        hw = devices.hardware(named, precision, gpus_per_node if nodes > 1 else 0)
        view = View(hw, named.memory_gb, named.label + (f", {nodes} nodes x {gpus_per_node}" if nodes > 1 else ""), named=True)
    elif torch.cuda.is_available():
        view = View(analytic.Hardware(), torch.cuda.get_device_properties(0).total_memory / GIB, torch.cuda.get_device_name(0))
    else:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        view = View(analytic.Hardware(), ram / gpus, "this CPU (RAM shared by the processes)")
    view.memory_gb = memory_gb or view.memory_gb or DEFAULT_MEMORY_GB
    return view


def _take(argv: list[str], flag: str, typ):
    """(value of `flag` or None, argv without it)."""
    if flag not in argv:
        return None, argv
    i = argv.index(flag)
    if i + 1 >= len(argv):
        raise ValueError(f"{flag} needs a value")
    return typ(argv[i + 1]), argv[:i] + argv[i + 2:]


def resolve(command: str, argv: list[str]) -> list[str]:
    """`argv` with `--layout auto` replaced by the chosen layout's flags (module doc)."""
    value, argv = _take(argv, "--layout", str)
    if value != "auto":
        raise ValueError(f"--layout takes 'auto' (the profiler chooses), got {value!r}")
    if command not in COMMANDS:
        raise ValueError(f"--layout auto works on {', '.join(COMMANDS)} and profile, not on {command}")
    given = [f for f in CHOSEN if f in argv]
    if given:
        raise ValueError(f"--layout auto chooses the layout flags; drop {', '.join(given)} or drop --layout auto")
    own = {}
    for flag, typ in OWN.items():
        own[flag], argv = _take(argv, flag, typ)
    launched = "WORLD_SIZE" in os.environ
    nproc, _ = _take(argv, "--nproc", int)
    nnodes, _ = _take(argv, "--nnodes", int)
    gpus = own["--gpus"] or (int(os.environ["WORLD_SIZE"]) if launched else (nproc or 1) * (nnodes or 1))
    if own["--gpus"] and nproc and own["--gpus"] != nproc * (nnodes or 1):
        raise ValueError(f"--gpus {own['--gpus']} but --nproc {nproc} x --nnodes {nnodes or 1}")
    shape = _run_shape(command, argv, gpus)
    view = device_view(shape["precision"], gpus, own["--device"], own["--memory-gb"], own["--nodes"] or nnodes or 1, own["--gpus-per-node"])
    calib = None if view.named else _calibration(shape["precision"])
    if command == "finetune":
        plan, lines = choose_finetune(shape["cfg"], gpus, shape["global_batch"], shape["precision"], view, own["--reserve-gb"],
                                      shape["task"], shape["img"], shape["options"], calib)
    else:
        plan, lines = choose(shape["cfg"], gpus, shape["global_batch"], shape["precision"], view, own["--reserve-gb"], calib)
    if int(os.environ.get("RANK", 0)) == 0:
        print("\n".join(lines), flush=True)
    flags = layout_flags(plan, finetune=command == "finetune")
    if gpus > 1 and not launched and nproc is None:
        flags += ["--nproc", str(gpus)]
    return argv + flags


def layout_flags(plan: analytic.Plan, finetune: bool = False) -> list[str]:
    """The command-line flags that run `plan` (fine-tuning: TP x DP, full recompute or none, ZeRO-1)."""
    L = plan.layout
    if finetune:
        return (["--tp", str(L.tp), "--dp", str(L.dp), "--micro-batch", str(L.micro_batch)] + (["--sp"] if L.sp else [])
                + (["--activation-checkpointing"] if plan.recompute == "full" else [])
                + (["--distributed-optimizer"] if plan.distributed_optimizer else []))
    return (["--tp", str(L.tp), "--pp", str(L.pp), "--dp", str(L.dp), "--micro-batch", str(L.micro_batch), "--vpp", str(L.vpp),
             "--recompute", plan.recompute] + (["--sp"] if L.sp else []) + (["--distributed-optimizer"] if plan.distributed_optimizer else [])
            + (["--fsdp"] if plan.fsdp else []) + (["--defer-fsdp-sync"] if plan.defer_fsdp_sync else []))


def _run_shape(command: str, argv: list[str], gpus: int) -> dict:
    """The model, global batch and precision the command would run with (its flags and config
    file); for fine-tuning also its task, crop and head options."""
    module = importlib.import_module(COMMANDS[command])
    parser = argparse.ArgumentParser(add_help=False)
    module.add_arguments(parser)
    if hasattr(module, "config_from_args"):
        parser.add_argument("--config")  # the CLI adds it to commands whose options are a tree
    args, _ = parser.parse_known_args(argv)
    args.command = command  # a config file another command wrote: this one's keys (options.resolve)
    if command not in ("pretrain", "bench", "finetune"):
        raise ValueError(f"--layout auto: no run shape for {command!r}")
    config = module.config_from_args(args, world=gpus)
    if command == "finetune":
        options = dict(detector=config.detector, channels=config.channels, window=config.window)
        return dict(cfg=module.load_config(config), global_batch=config.parallel.global_batch, precision=config.precision, task=config.task,
                    img=config.crop, options=options)
    return dict(cfg=get_preset(config.model), global_batch=config.parallel.global_batch, precision=config.compute.precision)


def _reserve(view: View, reserve_gb: float | None) -> float:
    return reserve_gb if reserve_gb is not None else min(2.0, view.memory_gb / 4)


def _why(r) -> str:
    from rsscale.scaling.parallel.pipeline import bubble_fraction

    L, e = r["plan"].layout, r["est"]
    comm = sum(e.time[k] for k in ("tp_comm_s", "pp_comm_s", "dp_comm_s", "sync_s"))
    return (f"{str(L):<30} {r['plan'].flags:<3} memory/rank {size(e.memory['total']):>7} (GiB; M: MiB), predicted step {r['step_s']:.4g} s, "
            f"bubble {100 * bubble_fraction(L.pp, L.vpp, L.num_micro):.0f} %, communication {comm:.3g} s")


def choose(cfg, gpus: int, global_batch: int, precision: str, view: View, reserve_gb: float | None = None,
           calib: dict | None = None) -> tuple[analytic.Plan, list[str]]:
    """The fastest predicted layout whose exact count fits, and the lines saying why (module doc)."""
    from rsscale.benchmarks.prediction.count import count_plan

    reserve = _reserve(view, reserve_gb)
    budget = (view.memory_gb - reserve) * GIB
    plans = enumerate_plans(cfg, gpus, global_batch, precision)
    if not plans:
        raise ValueError(f"--layout auto: no valid layout of {cfg.name} on {gpus} devices with global batch {global_batch} "
                         "(the global batch must split over the data-parallel ranks)")
    rows = [r for r in rank_plans(cfg, plans, view.hw, budget, calib) if r["fits"]]
    if not rows:
        raise ValueError(f"--layout auto: none of the {len(plans)} layouts of {cfg.name} on {gpus} devices fits in {view.memory_gb:g} GiB "
                         f"- {reserve:g} reserved; use more devices or a smaller global batch")
    model = "the time model calibrated on this machine" if calib else "the time model on the datasheet"
    lines = [f"--layout auto: {len(plans)} layouts of {cfg.name} on {gpus} devices ({view.where}, {view.memory_gb:.3g} GiB, "
             f"{reserve:.3g} reserved), {len(rows)} fit; ranked by {model}; the fastest 5:"]
    lines += [("  * " if i == 0 else "    ") + _why(r) for i, r in enumerate(rows[:5])]
    for r in rows[:MAX_COUNTED]:  # the analytic memory ranks; the exact count decides
        stages = [c.total for c in count_plan(cfg, r["plan"])]
        if max(stages) <= budget:
            lines.append(f"--layout auto: counted exactly (fake tensors, {len(stages)} stage(s)): {size(max(stages))} on the "
                         f"fullest rank, analytic {size(r['est'].memory['total'])} (GiB; M: MiB)")
            lines.append(f"--layout auto: running {r['plan'].layout} {r['plan'].flags}" + (" (* above)" if r is rows[0] else ""))
            return r["plan"], lines
        lines.append(f"--layout auto: {r['plan'].layout} {r['plan'].flags} counts {size(max(stages))} on its fullest rank, "
                     f"over the {size(budget)} budget (GiB; M: MiB); next")
    raise ValueError(f"--layout auto: the {MAX_COUNTED} fastest layouts that fit by the analytic memory of {cfg.name} do not fit "
                     f"when counted exactly in {view.memory_gb:g} GiB - {reserve:g} reserved; use more devices or a smaller global batch")


def choose_finetune(cfg, gpus: int, global_batch: int, precision: str, view: View, reserve_gb: float | None, task: str, img: int,
                    options: dict, calib: dict | None = None) -> tuple[analytic.Plan, list[str]]:
    """The fastest predicted fine-tuning layout (TP x DP) whose exact count fits (every one is
    counted: `rank_finetune_plans`), and the lines saying why."""
    reserve = _reserve(view, reserve_gb)
    plans = finetune_plans(cfg, gpus, global_batch, precision)
    if not plans:
        raise ValueError(f"--layout auto: no valid fine-tuning layout of {cfg.name} on {gpus} devices with global batch {global_batch}")
    options = {k: v for k, v in options.items() if v is not None}
    rows = [r for r in rank_finetune_plans(cfg, plans, view.hw, (view.memory_gb - reserve) * GIB, task, img, options, calib) if r["fits"]]
    if not rows:
        raise ValueError(f"--layout auto: none of the {len(plans)} fine-tuning layouts of {cfg.name} on {gpus} devices fits in "
                         f"{view.memory_gb:g} GiB - {reserve:g} reserved; use more devices or a smaller global batch")
    lines = [f"--layout auto: {len(plans)} fine-tuning layouts of {cfg.name} ({task}, {img} px) on {gpus} devices ({view.where}, "
             f"{view.memory_gb:.3g} GiB, {reserve:.3g} reserved), each counted exactly, {len(rows)} fit; ranked by the time model "
             f"on counted FLOPs ({'calibrated on this machine' if calib else 'on the datasheet'}); the fastest 5:"]
    lines += [("  * " if i == 0 else "    ") + _why(r) for i, r in enumerate(rows[:5])]
    lines.append(f"--layout auto: running {rows[0]['plan'].layout} {rows[0]['plan'].flags} (* above)")
    return rows[0]["plan"], lines


def _calibration(precision: str):
    """This machine's stored calibration (the profiler's), or None; a broken store is its one-line error."""
    from rsscale.benchmarks.measurement.calibrate import latest
    from rsscale.scaling.runtime.store import environment

    return latest(environment()["device"], precision)
