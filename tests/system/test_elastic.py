"""`--max-restarts N`: a rank killed with SIGKILL mid-run makes the launcher start the ranks
again, they resume from the newest complete checkpoint by themselves, and the job ends with the
same weights as an uninterrupted run; the store records the restart and the steps it cost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rsscale.scaling.runtime.store import ResultsStore
from rsscale.scaling.train.checkpoint import load_full_state_dict


def _cmd(out, *extra):
    return [sys.executable, "-m", "rsscale.scaling.runtime.cli", "pretrain", "--model", "tiny", "--data", "random", "--steps", "6",
            "--save-every", "2", "--micro-batch", "2", "--global-batch", "4", "--warmup", "1", "--log-every", "1", "--nproc", "2",
            "--dp", "2", "--out", str(out), "--results", f"{out}.db", *extra]


def _rank_pid(marker: str, rank: int, attempt: int) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and f"RANK={rank}".encode() in env and f"RSSCALE_RESTART_COUNT={attempt}".encode() in env:
            return int(pid)
    return None


@pytest.mark.slow  # three 2-process launches, about 40 s on 2 cores
def test_a_killed_rank_restarts_the_job_which_resumes_and_ends_equal(tmp_path):
    subprocess.run(_cmd(tmp_path / "full"), check=True, capture_output=True, timeout=300)
    job = subprocess.Popen(_cmd(tmp_path / "cut", "--max-restarts", "1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, killed = [], False
    for line in job.stdout:
        seen.append(line)
        if not killed and "step 3/6" in line:
            os.kill(_rank_pid(str(tmp_path / "cut"), 1, 0), signal.SIGKILL)
            killed = True
    out = "".join(seen)
    assert job.wait(timeout=300) == 0, out
    assert "restart 1 of 1" in out and "elastic restart 1: resuming" in out and "resumed from" in out
    _, a = load_full_state_dict(str(tmp_path / "full"))
    _, b = load_full_state_dict(str(tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if never stopped
    runs = ResultsStore(f"{tmp_path / 'cut'}.db")
    m = runs.metrics()
    assert m[m["name"] == "elastic_restarts"]["value"].tolist() == [1.0]
    assert m[m["name"] == "lost_steps"]["value"].iloc[0] >= 1  # step 3 (and maybe 4) was done after the step-2 checkpoint


def test_restarts_are_not_tried_for_bad_usage_nor_without_the_flag(monkeypatch):
    from rsscale.scaling.runtime import launch

    calls = []
    monkeypatch.setattr(launch, "_run_torchrun", lambda cmd, env: calls.append(env[launch.RESTART_COUNT]) or (1, None))

    class Args:
        nproc, nnodes, node_rank, rdzv_endpoint, max_restarts = 2, 1, 0, None, 2

    assert launch.relaunch("pretrain", Args, ["--model", "tiny"]) == 1 and calls == ["0", "1", "2"]
    calls.clear()
    Args.max_restarts = None
    assert launch.relaunch("pretrain", Args, []) == 1 and calls == ["0"]
    calls.clear()

    def a_rank_refuses_its_input(cmd, env):  # what run_rank does in a rank; torchrun then exits 1
        calls.append(1)
        monkeypatch.setattr(launch.os, "environ", env)
        launch.note_bad_input()
        return 1, None

    monkeypatch.setattr(launch, "_run_torchrun", a_rank_refuses_its_input)
    Args.max_restarts = 3
    assert launch.relaunch("pretrain", Args, []) == 2 and calls == [1]


def test_bad_input_in_the_ranks_exits_2_through_torchrun_and_is_not_retried(tmp_path, capsys):
    """torchrun exits 1 for any failed rank; the launcher still says bad usage (2) and does not restart."""
    from rsscale.scaling.runtime.cli import main

    argv = ["pretrain", "--model", "tiny", "--data", str(tmp_path / "no-such-folder"), "--steps", "2", "--micro-batch", "2",
            "--global-batch", "4", "--dp", "2", "--nproc", "2", "--max-restarts", "1", "--out", str(tmp_path / "run"), "--no-record"]
    assert main(argv) == 2
    assert "restart 1 of 1" not in capsys.readouterr().err


@pytest.mark.slow  # two launchers of 2 processes, a restart of both; about 40 s
def test_a_rank_lost_on_one_node_restarts_both_nodes_which_meet_again(tmp_path):
    from distributed import free_port

    out = tmp_path / "run"
    base = _cmd(out, "--max-restarts", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    base[base.index("--global-batch") + 1], base[base.index("--dp") + 1] = "8", "4"
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    nodes = [subprocess.Popen(base + ["--node-rank", str(r)], stdout=open(logs[r], "w"), stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        killed = None
        for _ in range(1200):
            if killed is None and "step 3/6" in "".join(p.read_text() for p in logs):
                killed = _rank_pid(str(out), 3, 0)  # global rank 3: on whichever node torchrun put it
                if killed:
                    os.kill(killed, signal.SIGKILL)
            if all(n.poll() is not None for n in nodes):
                break
            time.sleep(0.2)
        codes = [n.wait(timeout=120) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    text = "".join(p.read_text() for p in logs)
    assert killed and codes == [0, 0], text
    assert "elastic restart 1: resuming" in text and "elastic restarts: 1" in text and (out / "checkpoints" / "step_00000006").is_dir()


@pytest.mark.slow  # two 2-process runs of `medium`, one restarted; about 60 s
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_to_resume_from(tmp_path):
    def cmd(out, *extra):
        argv = _cmd(out, *extra)
        argv[argv.index("--model") + 1] = "medium"  # a save long enough (about 0.2 s) to be caught in the act
        return argv

    subprocess.run(cmd(tmp_path / "full"), check=True, capture_output=True, timeout=300)
    out = tmp_path / "cut"
    job = subprocess.Popen(cmd(out, "--max-restarts", "1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    caught = None
    for _ in range(60000):  # poll for the temporary folder of the step-4 save
        ckpts = out / "checkpoints"
        if ckpts.is_dir() and any(p.name.startswith(".tmp_step_00000004") for p in ckpts.iterdir()):
            caught = _rank_pid(str(out), 1, 0)
            if caught:
                os.kill(caught, signal.SIGKILL)
                break
        if job.poll() is not None:
            break
        time.sleep(0.002)
    text = job.communicate(timeout=300)[0]
    assert caught and job.returncode == 0, text
    assert "resumed from" in text and "elastic restarts: 1" in text
    _, a = load_full_state_dict(str(tmp_path / "full"))
    _, b = load_full_state_dict(str(out))
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from a complete checkpoint: the same end
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp_")]  # the killed save's leftovers are gone
