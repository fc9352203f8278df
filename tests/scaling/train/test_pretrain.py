"""The pretraining trainer (scaling/train/pretrain.py): config loading and its checks, loss going
down on the bundled kind of data, a killed run resumed exactly (torch and DALI loaders), clear
failures (fp16 on CPU, a failing, frozen or non-finite rank), one batch per model replica, and the
peak memory it records."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from builders import checkpoints_dir as _ckpts
from builders import image_folder
from builders import steps_on_disk as _steps_on_disk
from builders import tiny_trainer as _trainer
from distributed import run_distributed

from rsscale.scaling.runtime.store import ResultsStore
from rsscale.scaling.spec.layout import Layout


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
    assert (c.optim.lr, c.optim.warmup, c.recording.record) == (5e-4, 3, True)  # --no-record is store_true: False means absent
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
    """A few steps on bundled-style aerial scenes (scaling/data/scenes.py) lower the MAE loss."""
    from PIL import Image

    from rsscale.scaling.data.scenes import scene
    from rsscale.scaling.spec.run import Checkpointing, OptimConfig, Recording
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    for i in range(8):
        rgb, _, _ = scene(np.random.default_rng(i), 64)
        Image.fromarray(rgb).save(tmp_path / f"{i}.png")
    trainer = Trainer.build(TrainConfig(model="tiny", parallel=Layout(micro_batch=8, global_batch=8), optim=OptimConfig(lr=3e-3, warmup=2),
                                        steps=15, data=str(tmp_path), num_workers=0, checkpointing=Checkpointing(out=str(tmp_path / "run")), recording=Recording(record=False)))
    losses = [trainer.train_step()["loss"] for _ in range(15)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses


def test_fp16_on_cpu_is_refused():
    from rsscale.scaling.spec.run import Compute, Recording
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="fp16 .* needs CUDA"):
        Trainer.build(TrainConfig(compute=Compute(precision="fp16"), data="random", recording=Recording(record=False)))


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




HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None


@pytest.mark.parametrize("flags, flag", [
    (dict(steps=0), "--steps"), (dict(steps=-3), "--steps"), (dict(lr=-1.0), "--lr"), (dict(save_every=-1), "--save-every"),
    (dict(in_chans=0), "--in-chans"), (dict(log_every=0), "--log-every"), (dict(lr=float("inf")), "--lr"),
    (dict(min_lr=0.5, lr=0.1), "--min-lr"), (dict(micro_batch=0), "--micro-batch"), (dict(data_backend="jax"), "--data-backend"),
])
def test_pretrain_config_values_are_range_checked(flags, flag):
    from rsscale.scaling.train.pretrain import config_from_args

    with pytest.raises(ValueError, match=f"^{flag} "):
        config_from_args(_args(**flags))


def test_pretrain_steps_zero_exits_nonzero_without_recording(tmp_path):
    cmd = [sys.executable, "-m", "rsscale.scaling.runtime.cli", "pretrain", "--steps", "0", "--data", "random",
           "--out", str(tmp_path / "run"), "--results", str(tmp_path / "r.db")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--steps" in proc.stderr and "must be >= 1" in proc.stderr
    assert not (tmp_path / "r.db").exists()


# ------------------------------------------------------------------------ mistyped config files
@pytest.mark.parametrize("text, key, expected", [
    ("steps: ten\n", "'steps'", "int"),
    ('checkpointing: {resume: "no"}\n', "'checkpointing.resume'", "true or false"),
    ('parallel: {sp: "false"}\n', "'parallel.sp'", "true or false"),
    ("optim: {lr: [1, 2]}\n", "'optim.lr'", "float"),
    ("parallel: 4\n", "parallel", "mapping"),
    ("model: 12\n", "'model'", "string"),
])
def test_pretrain_config_file_is_type_checked_up_front(tmp_path, text, key, expected):
    from rsscale.scaling.train.pretrain import config_from_args

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        config_from_args(_args(config=str(path)))
    msg = str(err.value)
    assert str(path) in msg and key in msg and expected in msg and "\n" not in msg


def test_pretrain_config_file_values_keep_their_meaning(tmp_path):
    """Real booleans, integral floats and null for an optional value are accepted as such."""
    from rsscale.scaling.train.pretrain import config_from_args

    path = tmp_path / "run.toml"
    path.write_text('steps = 4.0\n[checkpointing]\nresume = false\n[recording]\nresults = "x.db"\n[parallel]\nsp = false\n')
    c = config_from_args(_args(config=str(path)))
    assert (c.steps, c.checkpointing.resume, c.parallel.sp, c.recording.results) == (4, False, False, "x.db")


# ------------------------------------------------------------------------- DALI's exact resume
@pytest.mark.slow  # three pretraining processes; the DALI state round trip below is the fast check of the same stream
@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
def test_dali_run_killed_and_resumed_logs_the_same_losses(tmp_path):
    """The torch-loader kill/resume check above (test_killed_run_resumed_from_the_command_line_ends_at_the_same_loss) on DALI's CPU pipeline: the
    pipeline's checkpoint saved with the run makes the resumed losses equal the uninterrupted ones."""
    out = killed_and_resumed_losses_agree(tmp_path, "--data-backend", "dali")
    assert "dali pipeline" in out and "reseeded" not in out






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




def test_pretraining_records_its_peak_memory(tmp_path):
    from rsscale.scaling.parallel.state import destroy_parallel
    from rsscale.scaling.spec.layout import Layout
    from rsscale.scaling.spec.run import Checkpointing, Recording
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    db = str(tmp_path / "t.db")
    try:
        Trainer.build(TrainConfig(model="tiny", parallel=Layout(micro_batch=2, global_batch=2), steps=2, data="random",
                                  checkpointing=Checkpointing(out=str(tmp_path / "run")), recording=Recording(results=db))).fit()
    finally:
        destroy_parallel()
    m = ResultsStore(db).metrics()
    peak, delta = (m.loc[m["name"] == k, "value"].item() for k in ("peak_mem_bytes", "peak_mem_delta_bytes"))
    assert peak > delta > 0
