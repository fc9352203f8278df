"""The one torchrun launcher: `rsscale pretrain|bench|finetune|evaluate|predict --nproc N ...` re-runs the same
command under `torchrun` (torch.distributed.run), on one node or several.

    add_launch_arguments(parser)            # --nproc, --nnodes, --node-rank, --rdzv-endpoint
    if wants_launch(args): return relaunch("pretrain", args, argv)   # commands call it through
                                            # layout.relaunch_checked: the layout is checked first

Several nodes: the same command on each, with its `--node-rank` and one `--rdzv-endpoint
HOST:PORT` (see `torchrun_command`); two "nodes" on one machine work the same way
(tests/system/test_multinode.py).

Stopping (Ctrl-C, or SIGTERM from a scheduler before it kills): every rsscale process handles
SIGINT and SIGTERM alike (`on_signals`); a command ends with one line and exit code 128 + the
signal number (130, 143), never a traceback; a training loop stops at a step boundary, agreed over
its ranks (`StopRequest`). `relaunch` starts torchrun in its own session and passes a signal to
the ranks itself: torchrun would answer it, and a rank's non-zero exit, with tracebacks of its
own; so a rank it started exits 0 when interrupted and the launcher returns the code.

Bottom layer: imports nothing from the rest of rsscale.
"""

from __future__ import annotations

import glob
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import traceback
from contextlib import contextmanager

log = logging.getLogger(__name__)

# flag -> (argparse type, help); all of them are consumed here and never reach the ranks.
LAUNCH_FLAGS = {
    "--nproc": (int, "launch torchrun with this many processes per node"),
    "--nnodes": (int, "nodes of a multi-node torchrun launch (default 1)"),
    "--node-rank": (int, "this node's rank in a multi-node launch (default 0); node 0 runs on the --rdzv-endpoint host"),
    "--rdzv-endpoint": (str, "host:port of the rendezvous for a multi-node launch (node 0's host, a free port)"),
    "--max-restarts": (int, "elastic: when a rank dies, restart the ranks up to this many times; each restart resumes from "
                            "the newest complete checkpoint (default 0: a dead rank ends the job)"),
}
RESTART_COUNT, MAX_RESTARTS = "RSSCALE_RESTART_COUNT", "RSSCALE_MAX_RESTARTS"  # set by `relaunch` in the ranks it starts
BAD_INPUT = "RSSCALE_BAD_INPUT_FILE"  # where a rank notes that it refused bad input (`note_bad_input`)


def note_bad_input() -> None:
    """In a rank `relaunch` started: tell the launcher that this failure is bad input (its exit 2),
    which torchrun's own exit code (1 for any failed rank) cannot say."""
    path = os.environ.get(BAD_INPUT)
    if path:
        with open(path, "a"):
            pass


def restart_count() -> int:
    """How many times the launcher has restarted this job's ranks after a failure (0: the first start)."""
    return int(os.environ.get(RESTART_COUNT, 0) or 0)


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
        low = 0 if flag in ("--node-rank", "--max-restarts") else 1
        if isinstance(value, int) and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if nnodes > 1 and not getattr(args, "rdzv_endpoint", None):
        raise ValueError("--nnodes > 1 needs --rdzv-endpoint host:port")
    if (getattr(args, "node_rank", None) or 0) >= nnodes:
        raise ValueError(f"--node-rank must be < --nnodes ({nnodes}), got {args.node_rank}")
    return bool(nproc and (nproc > 1 or nnodes > 1 or getattr(args, "max_restarts", None)))


def strip_launch_flags(argv: list[str], also: tuple[str, ...] = ()) -> list[str]:
    """argv without the launch flags and the flags `also` (each with a value; both `--flag value`
    and `--flag=value` forms)."""
    flags = set(LAUNCH_FLAGS) | set(also)
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif a.split("=", 1)[0] not in flags:
            out.append(a)
    return out


def torchrun_command(command: str, args: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None) -> list[str]:
    """`python -m torch.distributed.run ... -m rsscale.scaling.runtime.cli <command> <args>`.

    One node: `--standalone`. Several: torchrun's c10d rendezvous at `rdzv_endpoint`
    (`--nnodes=N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT`), where node rank 0 must run on
    HOST: it hosts the rendezvous store (`--rdzv-conf=is_host=1`), every other node connects to it
    (`is_host=0`). Said explicitly, not guessed by torchrun from the host name, so that several
    agents on one host (two "nodes" on one machine) never race to host it, and an endpoint that
    torchrun does not recognise as its own address (an alias, another interface) still gets a
    host. torchrun numbers the nodes itself: global ranks go node by node (the node it numbers k
    holds ranks k*nproc .. k*nproc+nproc-1), in the order of the nodes' host names (on one host:
    of the agents' process ids), not by --node-rank, which torchrun's c10d rendezvous ignores
    (with a warning): so it is not passed on. Any node may hold global rank 0, which logs.
    """
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes > 1:
        run += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-conf=is_host={int(node_rank == 0)}"]
    else:
        run += ["--standalone"]
    return run + ["-m", "rsscale.scaling.runtime.cli", command, *args]


SLURM_DEFAULTS = {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": 32, "time": "24:00:00", "port": 29500, "sbatch": []}
SBATCH = """#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --output={logs}/%x-%j.out
{extra}
# {what}: {nodes} node(s) x {gpus} GPU(s), one torchrun per node.
set -euo pipefail
{env}head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 python -m torch.distributed.run --nnodes={nodes} --nproc-per-node={gpus} \\
    --rdzv-backend=c10d --rdzv-endpoint="$head_node:{port}" --rdzv-id="$SLURM_JOB_ID" \\
    -m rsscale.scaling.runtime.cli {command} {args}
{after}"""


def sbatch_script(job: str, what: str, slurm: dict, logs: str, command: str, args: list[str], env: str = "", after: str = "") -> str:
    """An sbatch script that runs `rsscale <command> <args>` with one torchrun per node (`slurm`:
    nodes, gpus_per_node, cpus_per_task, time, port, extra #SBATCH lines), then the shell line
    `after`. `study --emit-slurm` and `pretrain --emit-slurm` write these; tests/system/test_slurm.py runs
    them under a local sbatch/srun stand-in."""
    s = {**SLURM_DEFAULTS, **slurm}
    return SBATCH.format(job=job, nodes=s["nodes"], gpus=s["gpus_per_node"], cpus=s["cpus_per_task"], time=s["time"], logs=logs,
                         extra="".join(f"#SBATCH {x}\n" for x in s["sbatch"]), what=what, env=env, port=s["port"],
                         command=command, args=shlex.join(args), after=f"{after}\n" if after else "")


RENDEZVOUS = "RSSCALE_RENDEZVOUS"  # set in the ranks `relaunch` starts: how they met (init_parallel logs it)


def rendezvous_text(nnodes: int = 1, rdzv_endpoint: str | None = None) -> str:
    """How `torchrun_command`'s ranks meet, for the log: 'HOST:PORT (c10d)' across nodes."""
    return f"{rdzv_endpoint} (c10d)" if nnodes > 1 else "local (torchrun --standalone)"


def command_line(command: str, args: list[str], nproc: int) -> list[str]:
    """`rsscale <command> <args>` on `nproc` local processes: under torchrun when nproc > 1."""
    if nproc > 1:
        return torchrun_command(command, args, nproc)
    return [sys.executable, "-m", "rsscale.scaling.runtime.cli", command, *args]


def relaunch(command: str, args, argv: list[str]) -> int:
    """Run `rsscale <command> <argv minus launch flags>` under torchrun as `args` asks; returns its
    exit code, or 128 + the signal number when a SIGINT/SIGTERM here was passed on to the ranks.

    `--max-restarts N`: when the ranks fail (a rank died or raised), start torchrun again, up to N
    times, with RSSCALE_RESTART_COUNT set: the trainer then resumes from the newest complete
    checkpoint by itself. A fresh torchrun each time (new rendezvous, new process groups): torchrun's
    own in-place restart (its --max-restarts) left gloo's new groups connecting to the dead ranks'
    addresses on CPU in about half the tries. On several nodes every node's launcher restarts, and
    they meet again at the same endpoint. Interrupts are not retried, nor bad input a rank refused:
    torchrun exits 1 for any failed rank, so such a rank notes it in the file named by BAD_INPUT
    (`note_bad_input`) and the launcher returns 2, the CLI's code for bad usage."""
    import tempfile

    nnodes, endpoint = getattr(args, "nnodes", None) or 1, getattr(args, "rdzv_endpoint", None)
    cmd = torchrun_command(command, strip_launch_flags(argv), args.nproc, nnodes, getattr(args, "node_rank", None) or 0, endpoint)
    log.debug("launching: %s", shlex.join(cmd))
    max_restarts = getattr(args, "max_restarts", None) or 0
    with tempfile.TemporaryDirectory(prefix="rsscale-launch-") as scratch:
        bad_input = os.path.join(scratch, "bad-input")
        for attempt in range(max_restarts + 1):
            env = {**os.environ, LAUNCHED: "1", RENDEZVOUS: rendezvous_text(nnodes, endpoint), RESTART_COUNT: str(attempt),
                   MAX_RESTARTS: str(max_restarts), BAD_INPUT: bad_input}
            # the cores shared by this node's processes (torchrun would set 1 and print a banner about it)
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
            code, signum = _run_torchrun(cmd, env)
            if signum is not None:
                return 128 + signum
            if code and os.path.exists(bad_input):
                return 2
            if code == 0 or attempt == max_restarts:
                return code
            log.warning(f"the ranks failed (exit code {code}): restart {attempt + 1} of {max_restarts}, resuming from the newest complete checkpoint")
    return code


def _run_torchrun(cmd: list[str], env: dict) -> tuple[int, int | None]:
    """(torchrun's exit code, the first SIGINT/SIGTERM received here and passed on to the ranks, or None)."""
    received, pending = [], []
    with on_signals(lambda signum: (received.append(signum), pending.append(signum))):
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            ranks = _ranks_of(proc.pid)
            while pending and ranks:  # a signal before torchrun started the ranks waits for them
                signum = pending.pop(0)
                for pid in ranks:
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        pass
    return code, (received[0] if received else None)


def _ranks_of(torchrun_pid: int) -> list[int]:
    """The rank processes torchrun started (its children, from Linux's /proc); torchrun itself
    where /proc cannot tell (the ranks then get the signal through it, with its tracebacks)."""
    paths = glob.glob(f"/proc/{torchrun_pid}/task/*/children")
    if not paths:
        return [torchrun_pid]
    pids = []
    for path in paths:
        try:
            with open(path) as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:  # the thread or torchrun has just ended
            pass
    return pids


# ---------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM
# ---------------------------------------------------------------------------------------------

LAUNCHED = "RSSCALE_LAUNCHED"  # set in the ranks `relaunch` starts
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Stopped by Ctrl-C (SIGINT) or SIGTERM; the message is the one line a command ends with."""

    def __init__(self, message: str = "interrupted", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def interrupted_exit_code(err: KeyboardInterrupt) -> int:
    """128 + the signal number (130 for Ctrl-C, 143 for SIGTERM); 0 in a rank that `relaunch`
    started, whose launcher returns the code (torchrun reports a non-zero rank with a traceback)."""
    return 0 if os.environ.get(LAUNCHED) else 128 + getattr(err, "signum", signal.SIGINT)


def raise_interrupted(signum: int) -> None:
    raise Interrupted(signum=signum)


@contextmanager
def on_signals(handler):
    """`handler(signum)` on SIGINT and SIGTERM while the block runs, the previous handlers after.
    A process forked meanwhile (a data-loader worker) ignores both: its parent stops it. Off the
    main thread, where Python cannot handle signals, the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def handle(signum, frame):
        if os.getpid() == pid:
            handler(signum)

    old = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: set outside Python, not restorable


class StopRequest:
    """`with StopRequest() as stop:` around a loop that stops at a step boundary: the first SIGINT or
    SIGTERM only sets `stop.signum`; a second Ctrl-C raises at once; a repeated SIGTERM is ignored
    (a scheduler may signal every process, and the launcher passes it on too). An error after a
    signal leaves the block as Interrupted: the signal ended the run (a SIGTERM to every process
    also ends the data-loader workers; a peer rank that stopped at once closes its connections)."""

    def __init__(self):
        self.signum = None
        self._handlers = on_signals(self._handle)

    def _handle(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT:
            raise Interrupted(signum=signum)

    def __enter__(self) -> "StopRequest":
        self._handlers.__enter__()
        return self

    def __exit__(self, kind, err, tb) -> None:
        self._handlers.__exit__(None, None, None)
        if isinstance(err, Exception) and self.signum:
            traceback.clear_frames(tb)  # release what its frames held (a data-loader iterator): a quiet exit
            raise Interrupted(signum=self.signum) from None
