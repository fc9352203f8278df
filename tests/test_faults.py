"""Fault injection: nothing lost, nothing silently wrong, no code run from a checkpoint.

One test per guarantee (docs/CHECKPOINTS.md): resume falls back past a broken `latest` or a corrupt
checkpoint, a re-save never removes the old copy first, run-folder lock and no silent overwrite,
--keep, per-rank sharded save/load within 1.5x of the rank's own bytes, one batch per model replica
even when one rank's loader differs, grouped pipeline p2p, a frozen rank named within --timeout, a
non-finite loss stops the run, pickles in checkpoint files are refused.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from builders import image_folder, tiny_run
from distributed import run_distributed

from rsscale.scaling.spec.layout import Layout


def _config(out, zero=False, **kw):
    return tiny_run(out, layout=kw.pop("parallel", None), data_parallel={"distributed_optimizer": zero}, **kw)


def _trainer(out, **kw):
    from rsscale.scaling.train.pretrain import Trainer

    return Trainer.build(_config(out, **kw))


def _ckpts(out):
    return os.path.join(str(out), "checkpoints")


def _steps_on_disk(out):
    return sorted(d for d in os.listdir(_ckpts(out)) if d.startswith("step_"))


# --- resume falls back to the newest complete checkpoint -------------------------------------


def test_resume_falls_back_past_a_broken_latest_and_a_corrupt_checkpoint(tmp_path, caplog):
    t = _trainer(tmp_path, steps=4)
    for _ in range(2):
        t.train_step()
        t.save()
    latest = os.path.join(_ckpts(tmp_path), "latest")
    open(latest, "w").close()  # empty `latest`
    assert _trainer(tmp_path, steps=4, resume=True).step == 2
    with open(latest, "w") as f:
        f.write("step_00000099\n")  # points at a missing folder
    assert _trainer(tmp_path, steps=4, resume=True).step == 2
    rank_file = os.path.join(_ckpts(tmp_path), "step_00000002", "rank_00000.safetensors")
    with open(rank_file, "r+b") as f:  # same size, one byte flipped
        f.seek(os.path.getsize(rank_file) - 3)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING):
        assert _trainer(tmp_path, steps=4, resume=True).step == 1
    assert "step_00000002" in caplog.text and "sha256" in caplog.text
    os.remove(os.path.join(_ckpts(tmp_path), "step_00000001", "index.json"))
    with pytest.raises(ValueError, match="no complete checkpoint"):  # never silently from step 0
        _trainer(tmp_path, steps=4, resume=True)


# --- a re-save keeps the old copy until the new one is in place --------------------------------


def test_resaving_a_step_killed_midway_keeps_a_valid_checkpoint(tmp_path, monkeypatch):
    from rsscale.scaling.train import checkpoint

    t = _trainer(tmp_path)
    t.train_step()
    t.save()
    real_rename = os.rename

    def killed(src, dst):  # the process dies as the new folder would move into place
        if os.path.basename(src).startswith(".tmp_step_00000001"):
            raise KeyboardInterrupt("killed")
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        t.save()
    monkeypatch.undo()
    resumed = _trainer(tmp_path, resume=True)
    assert resumed.step == 1
    assert torch.equal(resumed.optimizer.flat, t.optimizer.flat)


# --- run-folder lock and no silent overwrite ---------------------------------------------------


def _write_lock(out, pid):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(str(out), ".lock"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": pid, "started": "earlier"}, f)


def test_run_folder_lock_and_no_fresh_run_over_checkpoints(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(tmp_path / "busy", holder.pid)
        with pytest.raises(ValueError, match=f"in use by PID {holder.pid} on {socket.gethostname()}"):
            _trainer(tmp_path / "busy", steps=1).fit()
        assert not os.path.exists(_ckpts(tmp_path / "busy"))
    finally:
        holder.kill()
        holder.wait()
    _write_lock(tmp_path / "stale", holder.pid)  # now a dead process's lock
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path / "stale", steps=1).fit()
    assert "stale lock" in caplog.text and str(holder.pid) in caplog.text
    assert _steps_on_disk(tmp_path / "stale") == ["step_00000001"]
    assert not os.path.exists(tmp_path / "stale" / ".lock")  # released at the end of fit

    _trainer(tmp_path / "run", steps=2).fit()
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume.*--overwrite"):
        _trainer(tmp_path / "run", steps=1).fit()
    assert _steps_on_disk(tmp_path / "run") == ["step_00000002"]
    _trainer(tmp_path / "run", steps=1, overwrite=True).fit()
    assert _steps_on_disk(tmp_path / "run") == ["step_00000001"]


# --- --keep N ----------------------------------------------------------------------------------


def test_keep_last_n_never_deletes_the_newest_complete(tmp_path):
    from rsscale.scaling.train import checkpoint

    _trainer(tmp_path, steps=5, save_every=1, keep=2).fit()
    assert _steps_on_disk(tmp_path) == ["step_00000004", "step_00000005"]
    os.remove(os.path.join(_ckpts(tmp_path), "step_00000005", "rank_00000.safetensors"))  # newest now incomplete
    checkpoint.prune(_ckpts(tmp_path), 1)
    assert _steps_on_disk(tmp_path) == ["step_00000004", "step_00000005"]  # 4 is the newest complete one
    with pytest.raises(ValueError, match=r"--keep \(config key 'keep'\) must be >= 0"):
        _trainer(tmp_path / "neg", keep=-1).fit()


# --- each rank writes and reads only its own shard ---------------------------------------------


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _extra_host_bytes(fn):
    """(peak RSS above the start, peak traced Python allocation) while fn() runs."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    tracemalloc.start()
    fn()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (_status_kb("VmHWM") - base) * 1024, traced


def _memory_worker(rank, world, root):
    out = []
    for name, layout, zero in (("tp2", Layout(tp=2, micro_batch=2, global_batch=2), False),
                               ("dp2zero", Layout(dp=2, micro_batch=2, global_batch=4), True)):
        t = _trainer(f"{root}/{name}", model="medium", parallel=layout, zero=zero, steps=2)
        t.train_step()
        own = sum(p.numel() * p.element_size() for _, p in t.optimizer.named) + t.optimizer.state_bytes()
        save_extra = _extra_host_bytes(t.save)
        fresh = _trainer(f"{root}/{name}", model="medium", parallel=layout, zero=zero, steps=2)
        load_extra = _extra_host_bytes(lambda: fresh.load(_ckpts(f"{root}/{name}")))
        exact = torch.equal(fresh.optimizer.flat, t.optimizer.flat) and torch.equal(fresh.optimizer.exp_avg_sq, t.optimizer.exp_avg_sq)
        out.append({"name": name, "own": own, "save": save_extra, "load": load_extra, "exact": exact})
    return out


def test_sharded_save_and_load_stay_within_the_ranks_own_bytes(tmp_path):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    results = run_distributed(_memory_worker, 2, str(tmp_path), timeout=600)
    for rank, per_rank in enumerate(results):
        for r in per_rank:
            print(f"\n[memory] rank {rank} {r['name']}: own {r['own'] / 2**20:.1f} MiB; save +{r['save'][0] / 2**20:.1f} MiB RSS "
                  f"({r['save'][1] / 2**20:.1f} traced); load +{r['load'][0] / 2**20:.1f} MiB RSS ({r['load'][1] / 2**20:.1f} traced)")
            assert r["exact"], r["name"]
            for what in ("save", "load"):
                assert max(r[what]) < 1.5 * r["own"], (rank, r["name"], what, r[what], r["own"])
    files = sorted(os.listdir(os.path.join(_ckpts(tmp_path / "dp2zero"), "step_00000001")))
    assert files == ["index.json", "rank_00000.safetensors", "rank_00001.safetensors"]  # both ZeRO shards written by their owners


# --- one batch per model replica -----------------------------------------------------------------


class _OtherPipeline:
    """A loader that yields other crops than its peers (as a DALI -> torch fallback on one rank would)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.loader).flip(-1)


def _tp_worker(rank, world, data, out):
    from rsscale.scaling.data import loader as data_mod

    if rank == 1:
        real = data_mod.build_pretrain_loader
        data_mod.build_pretrain_loader = lambda *a, **k: _OtherPipeline(real(*a, **k))
    t = _trainer(out, data=data, parallel=Layout(tp=2, micro_batch=2, global_batch=4))
    return [t.train_step()["loss"] for _ in range(2)]


def test_tp_ranks_consume_the_same_batch_when_one_ranks_loader_differs(tmp_path, two_processes):
    image_folder(tmp_path, 8)
    ref = _trainer(tmp_path / "ref", data=str(tmp_path))
    want = [ref.train_step()["loss"] for _ in range(2)]
    got = two_processes(_tp_worker, str(tmp_path), str(tmp_path / "tp2"))
    assert got[0] == got[1]
    assert got[0] == pytest.approx(want, abs=1e-5)


# --- grouped pipeline p2p ------------------------------------------------------------------------


def _p2p_worker(rank, world):
    import torch.distributed as dist
    from test_pipeline import _stage_worker
    from torch.distributed import distributed_c10d as c10d

    seen = {"grouped": 0, "loose": 0, "inside": False}
    real_batch = dist.batch_isend_irecv

    def batch(ops):
        seen["grouped"] += 1
        seen["inside"] = True
        try:
            return real_batch(ops)
        finally:
            seen["inside"] = False

    def spy(op):
        def call(*a, **k):
            seen["loose"] += not seen["inside"]
            return op(*a, **k)
        return call

    dist.batch_isend_irecv = batch
    for name in ("isend", "irecv"):
        wrapped = spy(getattr(c10d, name))
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)
    result = _stage_worker(rank, world)
    return {"grouped": seen["grouped"], "loose": seen["loose"], "loss": result["loss"]}


def test_pipeline_exchanges_are_grouped_batch_isend_irecv():
    results = run_distributed(_p2p_worker, 3)
    assert all(r["loose"] == 0 and r["grouped"] > 0 for r in results), results
    assert np.isfinite(results[-1]["loss"])


# --- --timeout everywhere, the frozen rank named -------------------------------------------------


def _freeze_worker(rank, world, out):
    t = _trainer(out, parallel=Layout(tp=2, micro_batch=2, global_batch=4), steps=4, timeout=5.0)
    if rank == 1:
        real = t.train_step

        def freeze():
            if t.step == 1:
                os.kill(os.getpid(), signal.SIGSTOP)  # frozen, not dead: its sockets stay open
            return real()

        t.train_step = freeze
    t0 = time.perf_counter()
    try:
        t.fit()
    except TimeoutError as e:
        raise TimeoutError(f"after {time.perf_counter() - t0:.1f} s: {e}") from None


def test_frozen_rank_is_named_within_the_timeout(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        run_distributed(_freeze_worker, 2, str(tmp_path), timeout=150)
    message = str(info.value)
    assert "rank 0:" in message and "rank(s) 1 stopped responding" in message, message
    assert "--timeout 5 s" in message
    seconds = float(message.rsplit("TimeoutError: after ", 1)[1].split(" s")[0])
    assert seconds < 25, message  # 5 s in the collective + 5 s of heartbeat, not 60 s or more
    print(f"\n[timeout] frozen rank named after {seconds:.1f} s (test wall {time.perf_counter() - t0:.1f} s)")


# --- a non-finite loss stops the run ------------------------------------------------------------


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from rsscale.scaling.train import checkpoint
    from rsscale.scaling.train import pretrain as train

    real = train.random_images
    monkeypatch.setattr(train, "random_images", lambda cfg, seed, step, first, n: real(cfg, seed, step, first, n) * (float("nan") if step == 2 else 1.0))
    t = _trainer(tmp_path, steps=5, save_every=1)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 3"):
        t.fit()
    assert _steps_on_disk(tmp_path) == ["step_00000001", "step_00000002"]
    assert checkpoint.newest_complete(_ckpts(tmp_path)).endswith("step_00000002")
    assert torch.isfinite(t.optimizer.flat).all()  # stopped before the bad step's update


# --- loading never runs code ----------------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_pickles_in_checkpoint_files_are_refused_without_side_effects(tmp_path):
    from rsscale.scaling.train import checkpoint

    marker = str(tmp_path / "pwned")
    t = _trainer(tmp_path / "run")
    t.train_step()
    folder = t.save()
    evil = tmp_path / "evil.pt"
    torch.save({"tensors": {}, "rank_state": _Payload(marker)}, evil)

    # a rank file (here: another rank's, which only its own state loader reads) and the old .pt name
    for name in ("rank_00001.safetensors", "rank_00001.pt"):
        (tmp_path / "run" / "checkpoints" / "step_00000001" / name).write_bytes(evil.read_bytes())
    with pytest.raises(ValueError, match="rank_00001.safetensors"):
        checkpoint.load_rank_state(folder, 1)
    assert not os.path.exists(marker)

    # this rank's file, with the index's checksum forged to match: resume and fine-tuning's loader refuse it
    rank0 = os.path.join(folder, "rank_00000.safetensors")
    with open(rank0, "wb") as f:
        f.write(evil.read_bytes())
    index = json.load(open(os.path.join(folder, "index.json")))
    index["files"]["rank_00000.safetensors"] = checkpoint.file_digest(rank0)
    json.dump(index, open(os.path.join(folder, "index.json"), "w"))
    with pytest.raises(ValueError, match="rank_00000.safetensors"):
        _trainer(tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="rank_00000.safetensors"):
        checkpoint.load_full_state_dict(folder)

    # a pickle as the index, and an old-format (pickle) checkpoint
    os.replace(evil, os.path.join(folder, "index.json"))
    with pytest.raises(ValueError, match="index.json"):
        checkpoint.load_full_state_dict(folder)
    json.dump(dict(index, format="rsscale-checkpoint-1"), open(os.path.join(folder, "index.json"), "w"))
    with pytest.raises(ValueError, match="index.json.*older rsscale checkpoints held pickles"):
        checkpoint.load_full_state_dict(folder)
    assert not os.path.exists(marker)
