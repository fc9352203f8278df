"""Run a function on N local gloo processes and collect the return values (calibration's launcher).

    results = run_processes(fn, 4, *args)   # fn(rank, world_size, *args), importable, in rank order
"""

from __future__ import annotations

import datetime
import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
        queue.put((rank, None, fn(rank, world_size, *args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put((rank, f"{type(e).__name__}: {e}", None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_processes(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world_size):
            rank, err, value = queue.get(timeout=timeout)
            if err:
                raise RuntimeError(f"rank {rank} of {world_size} failed: {err}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
