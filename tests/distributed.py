"""Run a function on N local processes with the gloo backend (the CPU stand-in for torchrun).

    results = run_distributed(fn, world_size, *args)

`fn(rank, world_size, *args)` must be importable (module level). Each rank's return value comes
back in rank order; an exception on any rank fails the caller with that rank's traceback, and a
hung group is killed after `timeout` seconds instead of hanging the test session.

Ranks are forked from a forkserver that has imported torch, megatron-core and rsscale once per
test process (about 5 s of imports a rank would otherwise pay); each rank gets the caller's
environment as it is at the call.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOAD = ["torch", "torch.distributed", "rsscale.scaling.train.pretrain", "rsscale.finetune.finetune"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read only when the server starts (the first call)
    return ctx


def _worker(rank, world_size, port, fn, args, queue, env):
    import datetime

    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        queue.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0):
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, dict(os.environ))) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            (results.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed run failed on " + "\n".join(errors))
    return [results[r] for r in range(world_size)]
