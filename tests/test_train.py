"""Optimizer pieces against torch/hand references, config loading, loss going down on the bundled
kind of data, and clear failures (fp16 on CPU, a failing rank)."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rsscale.scaling.spec.layout import Layout
from rsscale.scaling.train.optim import FlatAdamW, LossScaler, clip_grad_norm_, lr_at


def test_flat_adamw_equals_torch_adamw_with_no_decay_groups():
    torch.manual_seed(0)
    shapes = {"blocks.0.fc.weight": (5, 3), "blocks.0.fc.bias": (5,), "cls_token": (1, 1, 3), "norm.weight": (3,)}
    mine = {n: torch.nn.Parameter(torch.randn(s)) for n, s in shapes.items()}
    ref = {n: torch.nn.Parameter(p.detach().clone()) for n, p in mine.items()}
    opt = FlatAdamW(mine.items(), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([{"params": [ref["blocks.0.fc.weight"]], "weight_decay": 0.1},
                                 {"params": [ref[n] for n in shapes if n != "blocks.0.fc.weight"], "weight_decay": 0.0}],
                                lr=1.0, betas=(0.9, 0.95), eps=1e-8)
    for step in range(4):
        lr = lr_at(step, 1e-2, 2, 4)
        grads = {n: torch.randn(s) for n, s in shapes.items()}
        opt.zero_grad()
        sum((mine[n] * grads[n]).sum() for n in shapes).backward()  # into the flat gradient buffer
        for n in shapes:
            ref[n].grad = grads[n].clone()
        opt.finish_grad_sync()
        opt.step(lr)
        for g in ref_opt.param_groups:
            g["lr"] = lr
        ref_opt.step()
    for n in shapes:
        assert torch.allclose(mine[n], ref[n], atol=1e-6), n


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 4, 14, min_lr=0.1) for s in range(14)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lr_at(100, 1.0, 4, 14, min_lr=0.1) == pytest.approx(0.1)


def test_clip_counts_masked_elements_once():
    grad = torch.tensor([3.0, 4.0, 12.0, 0.0])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])  # element 2 is a replica held (and counted) elsewhere
    norm = clip_grad_norm_([grad], (grad**2 * mask).sum(), max_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(grad, torch.tensor([3.0, 4.0, 12.0, 0.0]) / (5.0 + 1e-6))


def test_loss_scaler_skips_overflow_and_halves():
    scaler = LossScaler(enabled=True, init_scale=8.0, growth_interval=2)
    assert not scaler.unscale_and_check(torch.tensor([1.0, float("inf")]))
    assert scaler.scale == 4.0
    g = torch.tensor([8.0])
    assert scaler.unscale_and_check(g) and g.item() == 2.0
    assert scaler.unscale_and_check(torch.tensor([1.0])) and scaler.scale == 8.0


def _args(**flags):
    ns = argparse.Namespace(config=None, nproc=None)
    for k, v in flags.items():
        setattr(ns, k, v)
    return ns


def test_config_file_then_flags(tmp_path):
    from rsscale.scaling.train.pretrain import config_from_args

    path = tmp_path / "run.yaml"
    path.write_text("model: mini\nsteps: 7\nparallel: {tp: 2, micro_batch: 4, global_batch: 16}\noptim: {lr: 0.002, warmup: 3}\n")
    c = config_from_args(_args(config=str(path), lr=5e-4, sp=True, record=False))
    assert (c.model, c.steps, c.parallel.tp, c.parallel.sp, c.parallel.global_batch) == ("mini", 7, 2, True, 16)
    assert (c.optim.lr, c.optim.warmup, c.record) == (5e-4, 3, True)  # --no-record is store_true: False means absent
    toml = tmp_path / "run.toml"
    toml.write_text('model = "small"\n[optim]\nclip_grad = 0.5\n')
    c = config_from_args(_args(config=str(toml), steps=2))
    assert (c.model, c.optim.clip_grad, c.steps, c.optim.lr) == ("small", 0.5, 2, 1e-3)
    with pytest.raises(ValueError, match="unknown config key.*parallel.tpp"):
        config_from_args(_args(config=str(_write(tmp_path / "bad.yaml", "parallel: {tpp: 2}\n"))))


def _write(path, text):
    path.write_text(text)
    return path


def test_loss_goes_down_on_synthetic_scenes(tmp_path):
    """A few steps on bundled-style aerial scenes (scaling.synthetic) lower the MAE loss."""
    from PIL import Image

    from rsscale.scaling.data.synthetic import scene
    from rsscale.scaling.spec.run import OptimConfig
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    for i in range(8):
        rgb, _, _ = scene(np.random.default_rng(i), 64)
        Image.fromarray(rgb).save(tmp_path / f"{i}.png")
    trainer = Trainer.build(TrainConfig(model="tiny", parallel=Layout(micro_batch=8, global_batch=8), optim=OptimConfig(lr=3e-3, warmup=2),
                                        steps=15, data=str(tmp_path), num_workers=0, out=str(tmp_path / "run"), record=False))
    losses = [trainer.train_step()["loss"] for _ in range(15)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses


def test_fp16_on_cpu_is_refused():
    from rsscale.scaling.spec.run import Compute
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="fp16 .* needs CUDA"):
        Trainer.build(TrainConfig(compute=Compute(precision="fp16"), data="random", record=False))


def test_failing_rank_is_named_and_exits_nonzero(tmp_path):
    """Under torchrun-like env a rank that fails prints 'rank R failed: ...' and exits (2 for bad input)."""
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    cmd = [sys.executable, "-m", "rsscale.scaling.runtime.cli", "pretrain", "--tp", "3", "--data", "random", "--no-record", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # bad input, as for every command
    assert "rank 1 failed: ValueError: invalid parallel layout" in proc.stderr
    assert "world size 2 must equal tp*pp*dp" in proc.stderr


def test_killed_run_resumed_from_the_command_line_ends_at_the_same_loss(tmp_path):
    """`rsscale pretrain` SIGKILLed right after its step-3 checkpoint, then rerun with --resume,
    logs the same losses at steps 4..6 as an uninterrupted run; the killed run's store row stays
    'running' (incomplete), never half-written."""
    assert "torch pipeline" in killed_and_resumed_losses_agree(tmp_path, "--data-backend", "torch")


def killed_and_resumed_losses_agree(tmp_path, *flags) -> str:
    """The kill-and-resume check above with extra pretrain flags; returns the resumed run's output."""
    import signal

    from PIL import Image

    from rsscale.scaling.runtime.store import ResultsStore

    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")

    def cmd(out, db, *extra):
        return [sys.executable, "-m", "rsscale.scaling.runtime.cli", "pretrain", "--model", "tiny", "--steps", "6", "--save-every", "3",
                "--micro-batch", "2", "--global-batch", "4", "--warmup", "1", "--data", str(tmp_path), "--num-workers", "0",
                "--log-every", "1", "--out", str(tmp_path / out), "--results", str(tmp_path / db), *flags, *extra]

    subprocess.run(cmd("full", "full.db"), check=True, capture_output=True, timeout=300)
    victim = subprocess.Popen(cmd("cut", "cut.db"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in victim.stdout:
        if "saved step 3" in line:
            victim.send_signal(signal.SIGKILL)
            break
    assert victim.wait(timeout=300) == -signal.SIGKILL
    resumed_run = subprocess.run(cmd("cut", "cut.db", "--resume"), check=True, capture_output=True, text=True, timeout=300)

    def losses(db, status):
        store = ResultsStore(str(tmp_path / db))
        runs = store.runs()
        run_id = runs[runs["status"] == status]["id"].iloc[-1]
        m = store.metrics(name="loss")
        m = m[m["run_id"] == run_id]
        return dict(zip(m["step"].astype(int), m["value"]))

    full = losses("full.db", "complete")
    resumed = losses("cut.db", "complete")
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]
    killed = losses("cut.db", "running")
    # the kill lands after "saved step 3"; on a loaded machine step 4 may already be recorded
    assert sorted(killed)[:3] == [1, 2, 3] and len(killed) < 6 and all(killed[s] == full[s] for s in killed)
    return resumed_run.stdout + resumed_run.stderr


def test_nproc_validates_the_layout_before_launching(tmp_path):
    """`rsscale pretrain --nproc 3 --tp 3` explains the bad layout once and never starts torchrun."""
    cmd = [sys.executable, "-m", "rsscale.scaling.runtime.cli", "pretrain", "--nproc", "3", "--tp", "3", "--data", "random", "--no-record", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "TP size 3 does not divide the encoder heads (4)" in proc.stderr
    assert "launching" not in proc.stdout and proc.stderr.count("invalid parallel layout") == 1
