"""`--layout auto` on `rsscale pretrain` and `rsscale bench`: the profiler chooses the layout.

    rsscale pretrain --layout auto --gpus 2 --model small --global-batch 16 --steps 100
    rsscale bench --layout auto --gpus 8 --model g12x4 --device h100-sxm --global-batch 256

The dispatcher (scaling/cli.py) hands the command line here before parsing it; `resolve` returns
it with `--layout auto` replaced by the chosen flags (--tp --pp --dp --micro-batch --vpp
[--sp] --recompute [--distributed-optimizer | --fsdp], and --nproc from --gpus), so the command
runs, checkpoints and records exactly what an explicit layout would (the run's config and the
store hold the choice). The choice: every valid layout (benchmarks/profile.py
`enumerate_plans`), the analytic memory of each against the device's memory minus a reserve, the
fastest predicted of those that fit (the calibrated time model when this machine has one stored,
else the analytic model; `--device` for a named device's datasheet). It is deterministic (no
timing here), so ranks started by torchrun with `--layout auto` agree. The top 5 are printed with
why the winner won: memory per rank, predicted step time, pipeline bubble, communication.
"""

from __future__ import annotations

import argparse
import importlib
import os

from rsscale.benchmarks import analytic, devices
from rsscale.benchmarks.profile import DEFAULT_MEMORY_GB, enumerate_plans, rank_plans, size
from rsscale.scaling.config import get_preset
from rsscale.scaling.layout import LAYOUT_FLAGS

COMMANDS = {"pretrain": "rsscale.scaling.train", "bench": "rsscale.benchmarks.harness"}
CHOSEN = tuple(f for f in LAYOUT_FLAGS if f != "--global-batch") + ("--sp", "--recompute", "--distributed-optimizer", "--fsdp")
OWN = {"--gpus": int, "--device": str, "--memory-gb": float, "--reserve-gb": float}  # this module's flags, removed before the command parses


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
        raise ValueError(f"--layout auto works on {' and '.join(COMMANDS)}, not yet on {command}")
    given = [f for f in CHOSEN if f in argv]
    if given:
        raise ValueError(f"--layout auto chooses {', '.join(CHOSEN)}; drop {', '.join(given)} or drop --layout auto")
    own = {}
    for flag, typ in OWN.items():
        own[flag], argv = _take(argv, flag, typ)
    launched = "WORLD_SIZE" in os.environ
    nproc, _ = _take(argv, "--nproc", int)
    nnodes, _ = _take(argv, "--nnodes", int)
    gpus = own["--gpus"] or (int(os.environ["WORLD_SIZE"]) if launched else (nproc or 1) * (nnodes or 1))
    if own["--gpus"] and nproc and own["--gpus"] != nproc * (nnodes or 1):
        raise ValueError(f"--gpus {own['--gpus']} but --nproc {nproc} x --nnodes {nnodes or 1}")
    cfg, global_batch, precision = _run_shape(command, argv, gpus)
    plan, lines = choose(cfg, gpus, global_batch, precision, own["--device"], own["--memory-gb"], own["--reserve-gb"])
    if int(os.environ.get("RANK", 0)) == 0:
        print("\n".join(lines), flush=True)
    L = plan.layout
    flags = ["--tp", str(L.tp), "--pp", str(L.pp), "--dp", str(L.dp), "--micro-batch", str(L.micro_batch), "--vpp", str(L.vpp),
             "--recompute", plan.recompute] + (["--sp"] if L.sp else []) + (["--distributed-optimizer"] if plan.distributed_optimizer else []) \
        + (["--fsdp"] if plan.fsdp else [])
    if gpus > 1 and not launched and nproc is None:
        flags += ["--nproc", str(gpus)]
    return argv + flags


def _run_shape(command: str, argv: list[str], gpus: int):
    """(ViTConfig, global batch, precision) the command would run with (its flags and config file)."""
    module = importlib.import_module(COMMANDS[command])
    parser = argparse.ArgumentParser(add_help=False)
    module.add_arguments(parser)
    args, _ = parser.parse_known_args(argv)
    if command == "pretrain":
        config = module.config_from_args(args, world=gpus)
        return get_preset(config.model), config.parallel.global_batch, config.precision
    return get_preset(args.model), args.global_batch, args.precision


def choose(cfg, gpus: int, global_batch: int, precision: str, device: str | None = None, memory_gb: float | None = None,
           reserve_gb: float | None = None) -> tuple[analytic.Plan, list[str]]:
    """The fastest predicted layout that fits, and the lines saying why (module doc)."""
    import torch

    named = devices.get_device(device) if device and device != "cpu" else None
    if named is not None:
        hw = devices.hardware(named, precision)
        memory, where = named.memory_gb, named.label
    elif torch.cuda.is_available():
        hw, memory = analytic.Hardware(), torch.cuda.get_device_properties(0).total_memory / 2**30
        where = torch.cuda.get_device_name(0)
    else:  # processes of this CPU share its RAM
        hw = analytic.Hardware()
        memory, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / gpus, "this CPU (RAM shared by the processes)"
    memory = memory_gb or memory or DEFAULT_MEMORY_GB
    reserve = reserve_gb if reserve_gb is not None else min(2.0, memory / 4)
    calib = _calibration(precision) if named is None else None
    plans = enumerate_plans(cfg, gpus, global_batch, precision)
    if not plans:
        raise ValueError(f"--layout auto: no valid layout of {cfg.name} on {gpus} devices with global batch {global_batch} "
                         "(the global batch must split over the data-parallel ranks)")
    rows = [r for r in rank_plans(cfg, plans, hw, (memory - reserve) * 2**30, calib) if r["fits"]]
    if not rows:
        raise ValueError(f"--layout auto: none of the {len(plans)} layouts of {cfg.name} on {gpus} devices fits in {memory:g} GiB "
                         f"- {reserve:g} reserved; use more devices or a smaller global batch")
    from rsscale.scaling.pipeline import bubble_fraction

    def why(r) -> str:
        L, e = r["plan"].layout, r["est"]
        return (f"{str(L):<30} {r['plan'].flags:<3} memory/rank {size(e.memory['total']):>7} (GiB; M: MiB), predicted step {r['step_s']:.4g} s, "
                f"bubble {100 * bubble_fraction(L.pp, L.vpp, L.num_micro):.0f} %, communication {e.comm_s:.3g} s")

    model = "the calibrated time model" if calib else "the analytic model"
    lines = [f"--layout auto: {len(plans)} layouts of {cfg.name} on {gpus} devices ({where}, {memory:.3g} GiB, {reserve:.3g} reserved), "
             f"{len(rows)} fit; ranked by {model}; the fastest 5:"]
    lines += [("  * " if i == 0 else "    ") + why(r) for i, r in enumerate(rows[:5])]
    lines.append(f"--layout auto: running {rows[0]['plan'].layout} {rows[0]['plan'].flags} (* above)")
    return rows[0]["plan"], lines


def _calibration(precision: str):
    """This machine's stored calibration (the profiler's), or None; a broken store is its one-line error."""
    from rsscale.benchmarks.calibrate import latest
    from rsscale.scaling.store import environment

    return latest(environment()["device"], precision)
