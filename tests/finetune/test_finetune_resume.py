"""A fine-tune killed with SIGKILL after a checkpoint and continued with --resume logs the same
per-step losses and ends with the same weights, optimizer state and metrics as the uninterrupted
run: one process, DP=2 and TP=2, segmentation and detection (the trainer pretraining uses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from rsscale.scaling.runtime.store import ResultsStore

STEPS, EVERY = 4, 2


def _kill_all(marker: str) -> None:
    """SIGKILL every process whose command line holds `marker` (the launcher, torchrun, the ranks)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def _losses(db, status) -> dict:
    store = ResultsStore(str(db))
    runs = store.runs()
    run_id = runs[runs["status"] == status]["id"].iloc[-1]
    m = store.metrics(name="loss")
    m = m[m["run_id"] == run_id]
    return dict(zip(m["step"].astype(int), m["value"]))


def _final_tensors(out) -> dict:
    from safetensors.torch import load_file

    folder = out / "checkpoints" / f"step_{STEPS:08d}"
    return {f"{p.name}/{k}": v for p in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(p)).items()}


def killed_and_resumed_finetune_agrees(tmp_path, task, *layout):
    from rsscale.scaling.data.data import generate

    data = tmp_path / "data"
    generate(data, num_pretrain=0, num_seg=4, num_det=4, size=64)

    def cmd(name, *extra):
        return [sys.executable, "-m", "rsscale.scaling.runtime.cli", "finetune", "--task", task, "--dataset", "synthetic", "--data", str(data),
                "--steps", str(STEPS), "--save-every", str(EVERY), "--global-batch", "4", "--crop", "32", "--channels", "16",
                "--warmup", "1", "--log-every", "1", "--out", str(tmp_path / name), "--results", str(tmp_path / f"{name}.db"), *layout, *extra]

    subprocess.run(cmd("full"), check=True, capture_output=True, timeout=300)
    victim = subprocess.Popen(cmd("cut"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in victim.stdout:
        seen.append(line)
        if f"saved step {EVERY}" in line:
            _kill_all(str(tmp_path / "cut"))
            break
    victim.wait(timeout=300)
    assert any(f"saved step {EVERY}" in line for line in seen), "".join(seen)
    resumed = subprocess.run(cmd("cut", "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and f"at step {EVERY}" in resumed.stderr, resumed.stderr

    full, cut = _losses(tmp_path / "full.db", "complete"), _losses(tmp_path / "cut.db", "complete")
    assert sorted(cut) == list(range(EVERY + 1, STEPS + 1))
    assert [cut[s] for s in sorted(cut)] == [full[s] for s in sorted(cut)]  # bit-equal losses
    a, b = _final_tensors(tmp_path / "full"), _final_tensors(tmp_path / "cut")
    assert a.keys() == b.keys() and any(k.split("/", 1)[1].startswith("exp_avg") for k in a)  # weights and AdamW moments
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("full", "cut")]
    for m in metrics:
        m.pop("eval_seconds")
    assert metrics[0] == metrics[1]
    return metrics[0]


@pytest.mark.parametrize("task, layout", [
    ("seg", ()),
    pytest.param("det", ("--nproc", "2", "--tp", "2"), marks=pytest.mark.slow),  # (TP checkpoints resume: tests/scaling/train/test_layouts.py)
    pytest.param("det", (), marks=pytest.mark.slow),
    pytest.param("seg", ("--nproc", "2", "--tp", "2"), marks=pytest.mark.slow),
    pytest.param("seg", ("--nproc", "2", "--dp", "2"), marks=pytest.mark.slow),
    pytest.param("det", ("--nproc", "2", "--dp", "2", "--distributed-optimizer"), marks=pytest.mark.slow),
])
def test_a_killed_finetune_resumes_exactly(tmp_path, task, layout):
    metrics = killed_and_resumed_finetune_agrees(tmp_path, task, *layout)
    assert ("mIoU" if task == "seg" else "mAP") in metrics
