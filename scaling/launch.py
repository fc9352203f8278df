"""The one torchrun launcher: `rsscale pretrain|bench|finetune --nproc N ...` re-runs the same
command under `torchrun` (torch.distributed.run), on one node or several.

    add_launch_arguments(parser)            # --nproc, --nnodes, --node-rank, --rdzv-endpoint
    if wants_launch(args): return relaunch("pretrain", argv_without_launch_flags)

Bottom layer: imports nothing from the rest of rsscale.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys

log = logging.getLogger(__name__)

# flag -> (argparse type, help); all of them are consumed here and never reach the ranks.
LAUNCH_FLAGS = {
    "--nproc": (int, "launch torchrun with this many processes per node"),
    "--nnodes": (int, "nodes of a multi-node torchrun launch (default 1)"),
    "--node-rank": (int, "this node's rank in a multi-node launch (default 0)"),
    "--rdzv-endpoint": (str, "host:port of the rendezvous for a multi-node launch"),
}


def add_launch_arguments(parser) -> None:
    for flag, (typ, help_) in LAUNCH_FLAGS.items():
        parser.add_argument(flag, type=typ, default=None, help=help_)


def under_torchrun() -> bool:
    """True in a process that torchrun (or a test harness) started as one rank of a group."""
    return "WORLD_SIZE" in os.environ


def wants_launch(args) -> bool:
    """Launch flags given on the command line of a process that is not yet a rank."""
    if under_torchrun():
        return False
    nproc, nnodes = getattr(args, "nproc", None), getattr(args, "nnodes", None) or 1
    for flag in LAUNCH_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if isinstance(value, int) and value < (0 if flag == "--node-rank" else 1):
            raise ValueError(f"{flag} must be >= {0 if flag == '--node-rank' else 1}, got {value}")
    if nnodes > 1 and not getattr(args, "rdzv_endpoint", None):
        raise ValueError("--nnodes > 1 needs --rdzv-endpoint host:port")
    return bool(nproc and (nproc > 1 or nnodes > 1))


def strip_launch_flags(argv: list[str]) -> list[str]:
    """argv without the launch flags (both `--flag value` and `--flag=value` forms)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_FLAGS:
            skip = True
        elif a.split("=", 1)[0] not in LAUNCH_FLAGS:
            out.append(a)
    return out


def torchrun_command(command: str, args: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None) -> list[str]:
    """`python -m torch.distributed.run ... -m rsscale.scaling.cli <command> <args>`."""
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes > 1:
        run += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        run += ["--standalone"]
    return run + ["-m", "rsscale.scaling.cli", command, *args]


def command_line(command: str, args: list[str], nproc: int) -> list[str]:
    """`rsscale <command> <args>` on `nproc` local processes: under torchrun when nproc > 1."""
    if nproc > 1:
        return torchrun_command(command, args, nproc)
    return [sys.executable, "-m", "rsscale.scaling.cli", command, *args]


def relaunch(command: str, args, argv: list[str]) -> int:
    """Run `rsscale <command> <argv minus launch flags>` under torchrun as `args` asks; returns its exit code."""
    cmd = torchrun_command(command, strip_launch_flags(argv), args.nproc, getattr(args, "nnodes", None) or 1,
                           getattr(args, "node_rank", None) or 0, getattr(args, "rdzv_endpoint", None))
    log.info("launching: %s", shlex.join(cmd))
    return subprocess.call(cmd)
