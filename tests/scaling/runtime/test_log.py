"""Rank-aware logging and TensorBoard curves: what `--tensorboard` writes equals what the results
store (the source of truth) records for the same run."""

from __future__ import annotations

import glob
import logging
import re
import subprocess
import sys

import pytest
import torch.distributed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rsscale.scaling.runtime import log as rsscale_log
from rsscale.scaling.runtime.log import ScalarWriter, setup_logging
from rsscale.scaling.runtime.store import ResultsStore


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    files = glob.glob(f"{folder}/events.out.tfevents.*")
    assert files, f"no TensorBoard event file under {folder}"
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_cli(*argv):
    proc = subprocess.run([sys.executable, "-m", "rsscale.scaling.runtime.cli", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_pretrain_writes_the_curves_the_store_records(tmp_path):
    db, tb = tmp_path / "results.db", tmp_path / "tb"
    proc = run_cli("pretrain", "--model", "tiny", "--steps", "3", "--micro-batch", "2", "--global-batch", "2", "--data", "random",
                   "--log-every", "1", "--out", str(tmp_path / "run"), "--results", str(db), "--tensorboard", str(tb))
    lines = proc.stderr.splitlines()  # progress through logging; one process: no rank prefix
    assert any(line.startswith("rsscale.scaling.train.pretrain: step 3/3 loss") for line in lines)
    assert "[rank" not in proc.stderr
    scalars = read_scalars(tb)
    expected = {f"train/{k}" for k in ("loss", "lr", "grad_norm", "images_per_s", "peak_memory_bytes")}
    assert expected <= set(scalars) and all(len(scalars[t]) == 3 for t in expected)
    stored = ResultsStore(str(db)).metrics(kind="pretrain")
    for name in ("loss", "lr", "grad_norm"):
        rows = stored[stored["name"] == name].sort_values("step")
        assert [s for s, _ in scalars[f"train/{name}"]] == [1, 2, 3] == list(rows["step"])
        assert [v for _, v in scalars[f"train/{name}"]] == pytest.approx(list(rows["value"]), rel=1e-6)
    assert all(v > 1e6 for _, v in scalars["train/peak_memory_bytes"])


def test_bench_writes_step_curves(tmp_path):
    tb = tmp_path / "tb"
    run_cli("bench", "--model", "tiny", "--micro-batch", "2", "--global-batch", "2", "--warmup", "0", "--steps", "2",
            "--no-record", "--peak-tflops", "1", "--tensorboard", str(tb))
    scalars = read_scalars(tb)
    for tag in ("t_step", "loss", "lr", "grad_norm", "images_per_s", "peak_memory_bytes"):
        assert [s for s, _ in scalars[f"bench/{tag}"]] == [1, 2]


@pytest.mark.slow  # (fine-tuning writes through the pretraining Trainer's writer: test_pretrain_writes_the_curves_the_store_records)
def test_finetune_writes_loss_and_metric_curves(tmp_path):
    tb, db = tmp_path / "tb", tmp_path / "results.db"
    run_cli("finetune", "--task", "seg", "--dataset", "synthetic", "--data", str(tmp_path / "data"), "--synthetic-count", "6",
            "--model", "tiny", "--crop", "32", "--channels", "16", "--global-batch", "2", "--steps", "2",
            "--results", str(db), "--tensorboard", str(tb))
    scalars = read_scalars(tb)
    for tag in ("loss", "lr", "grad_norm", "images_per_s", "peak_memory_bytes"):
        assert [s for s, _ in scalars[f"finetune_seg/{tag}"]] == [1, 2]
    stored = ResultsStore(str(db)).metrics(kind="finetune", name="mIoU")
    assert scalars["finetune_seg/mIoU"] == [(2, pytest.approx(float(stored["value"].iloc[-1]), rel=1e-6))]


def test_only_rank_zero_logs_info(monkeypatch, capsys):
    logger = logging.getLogger("rsscale.test")
    monkeypatch.setattr(rsscale_log, "world_size", lambda: 2)
    monkeypatch.setattr(rsscale_log, "rank", lambda: 1)
    setup_logging()
    logger.info("hidden")
    logger.warning("shown")
    monkeypatch.setattr(rsscale_log, "rank", lambda: 0)
    setup_logging()
    logger.info("visible")
    err = capsys.readouterr().err
    assert "hidden" not in err and "[rank 1] rsscale.test: shown" in err and "[rank 0] rsscale.test: visible" in err


def test_writer_is_a_no_op_without_a_folder_or_off_rank_zero(tmp_path):
    with ScalarWriter(None) as tb:
        tb.add(1, loss=1.0)
    with ScalarWriter(str(tmp_path / "tb"), enabled=False) as tb:
        tb.add(1, loss=1.0)
    assert not (tmp_path / "tb").exists()




# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------
PLAIN = r"\[x\] done: (\d+)/20 images \((\d+) %\), [0-9.e+]+ (image/s|s/image), elapsed \d+ s, ETA \d+ s"


def test_progress_prints_step_rate_and_eta_every_tenth_when_not_a_terminal(capsys):
    from rsscale.scaling.runtime.log import progress

    assert list(progress(range(20), desc="[x] done", unit="image", inline=False)) == list(range(20))
    lines = capsys.readouterr().err.splitlines()
    assert [int(re.fullmatch(PLAIN, line).group(1)) for line in lines] == list(range(2, 21, 2)), lines
    assert list(progress([7], desc="one")) == [7] and capsys.readouterr().err == ""  # one item: no rate to tell


def test_progress_rewrites_one_line_on_a_terminal_and_is_silent_off_rank_0(capsys, monkeypatch):
    from rsscale.scaling.runtime.log import progress

    list(progress(range(3), desc="[x] done", unit="image", inline=True))
    err = capsys.readouterr().err
    assert err.startswith("\r[x] done: ") and err.endswith("ETA 0 s\x1b[K\n") and err.count("\n") == 1
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: False)  # torchrun's RANK, whatever group an earlier test left
    list(progress(range(20), desc="[x] done", inline=False))
    assert capsys.readouterr().err == ""




def test_rank_prefix_only_in_a_world_of_several_processes(monkeypatch, capsys):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    rsscale_log.setup_logging()
    logger = logging.getLogger("rsscale.test")
    logger.info("one process")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logger.info("two processes")
    err = capsys.readouterr().err.splitlines()
    assert "rsscale.test: one process" in err and "[rank 0] rsscale.test: two processes" in err
