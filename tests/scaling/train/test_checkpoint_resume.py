"""Exact resume (a run stopped at step k and resumed equals the uninterrupted run at step N,
bit for bit, data position included) and atomic checkpoints (a crash mid-save keeps `latest`)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from builders import checkpoints_dir as _ckpts
from builders import tiny_run
from builders import tiny_trainer as _trainer


def _config(data, out, steps=4, resume=False):
    return tiny_run(out, steps=steps, data=data, resume=resume, log_every=10)


def test_resume_is_exact(images, tmp_path):
    from rsscale.scaling.train.pretrain import Trainer

    full = Trainer.build(_config(images, tmp_path / "full"))
    want = [full.train_step()["loss"] for _ in range(4)]
    want_weights = full.full_state_dict()

    first = Trainer.build(_config(images, tmp_path / "cut"))
    got = [first.train_step()["loss"] for _ in range(2)]
    first.save()  # what a run killed after its step-2 checkpoint leaves behind
    del first
    resumed = Trainer.build(_config(images, tmp_path / "cut", resume=True))
    assert resumed.step == 2 and resumed.loader.step == 2 * resumed.layout.num_micro
    got += [resumed.train_step()["loss"] for _ in range(2)]
    assert got == want  # bitwise: same weights, moments, LR schedule, data position and masks
    for name, w in resumed.full_state_dict().items():
        assert torch.equal(w, want_weights[name]), name


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    from rsscale.scaling.train.pretrain import Trainer

    trainer = Trainer.build(_config("random", tmp_path / "none", resume=True))
    assert trainer.step == 0


def test_crash_during_save_keeps_latest(tmp_path, monkeypatch):
    from rsscale.scaling.train import checkpoint
    from rsscale.scaling.train.pretrain import Trainer

    trainer = Trainer.build(_config("random", tmp_path / "run", steps=3))
    trainer.train_step()
    good = trainer.save()
    trainer.train_step()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    monkeypatch.undo()
    ckpts = os.path.join(str(tmp_path / "run"), "checkpoints")
    assert checkpoint.resolve(ckpts) == good  # the half-written step 2 is not "latest"
    assert [d for d in os.listdir(ckpts) if d.startswith(".tmp_step_00000002.")]  # the half-written one, under a temporary name
    cfg, weights = checkpoint.load_full_state_dict(ckpts)
    assert cfg.name == "tiny" and "blocks.0.attn.0.qkv.weight" in weights
    again = trainer.save()
    assert checkpoint.resolve(ckpts) == again and not [d for d in os.listdir(ckpts) if d.startswith(".tmp_")]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from rsscale.scaling.train.checkpoint import load_full_state_dict

    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_full_state_dict(str(tmp_path))


@pytest.mark.parametrize("writers, readers, dim, stride", [(2, 1, 0, 3), (1, 4, 1, 1), (4, 2, 0, 3), (2, 4, 1, 1), (3, 1, 1, 2)])
def test_read_local_reshards_any_tp_size_from_whole_and_flat_pieces(tmp_path, writers, readers, dim, stride):
    """Slices written by `writers` TP ranks (one of them as ZeRO-style flat pieces) read back as any
    reader TP rank's slice equal `shard_tensor` of the full tensor (megatron's strided layout)."""
    from rsscale.scaling.parallel.state import shard_tensor
    from rsscale.scaling.train import checkpoint

    shape = [24, 36]
    full = torch.arange(24 * 36, dtype=torch.float32).reshape(shape)
    reports = []
    for q in range(writers):
        local = shard_tensor(full, dim, stride, q, writers)
        entry = {"key": "exp_avg/w", "dtype": "F32", "partition_dim": dim, "stride": stride, "tp_rank": q, "tp_size": writers, "shape": list(local.shape)}
        if q == writers - 1:  # this writer's slice straddles two ZeRO shards: two flat pieces
            cut = local.numel() // 3
            tensors = {"exp_avg/w@0": local.reshape(-1)[:cut], f"exp_avg/w@{cut}": local.reshape(-1)[cut:]}
            entries = {"exp_avg/w@0": dict(entry, flat=[0, cut]), f"exp_avg/w@{cut}": dict(entry, flat=[cut, local.numel()])}
        else:
            tensors, entries = {"exp_avg/w": local}, {"exp_avg/w": dict(entry, flat=None)}
        file = f"rank_{q:05d}.safetensors"
        checkpoint.write_safetensors(str(tmp_path / file), tensors, {})
        reports.append({"file": file, "entries": entries})
    e = checkpoint._merge(reports)["exp_avg/w"]
    assert e["shape"] == shape
    for r in range(readers):
        assert torch.equal(checkpoint.read_local(str(tmp_path), e, r, readers), shard_tensor(full, dim, stride, r, readers)), r






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
