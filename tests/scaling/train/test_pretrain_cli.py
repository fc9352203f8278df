"""`rsscale pretrain` as a new user meets it: resuming a finished run or with another schedule,
where the run was recorded, Ctrl-C and SIGTERM (one process and --nproc 2), the layout checked
before any launch, exit codes, config-file keys and --help defaults. Each test failed before its fix."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest

from rsscale.scaling.runtime import launch
from rsscale.scaling.runtime.cli import main as cli
from rsscale.scaling.runtime.store import SCHEMA, ResultsStore

PRETRAIN = ["pretrain", "--model", "tiny", "--data", "random", "--micro-batch", "2", "--global-batch", "2", "--warmup", "1"]


def _pretrain(tmp_path, *flags) -> int:
    return cli(PRETRAIN + ["--out", str(tmp_path / "run"), "--results", str(tmp_path / "r.db"), *flags])


def _statuses(tmp_path) -> list[str]:
    return list(ResultsStore(str(tmp_path / "r.db")).runs()["status"])


# --- resume -------------------------------------------------------------------------------------
def test_resuming_a_finished_run_has_nothing_to_do_and_records_nothing(tmp_path, capsys):
    assert _pretrain(tmp_path, "--steps", "2") == 0
    capsys.readouterr()
    for steps in ("2", "1"):  # at its end, or past a shorter one
        assert _pretrain(tmp_path, "--steps", steps, "--resume") == 0
        assert "nothing to do: run already at step 2" in capsys.readouterr().err
    assert _statuses(tmp_path) == ["complete"]


def test_resume_refuses_another_schedule_unless_allowed(tmp_path, capsys):
    assert _pretrain(tmp_path, "--steps", "2") == 0
    capsys.readouterr()
    assert _pretrain(tmp_path, "--steps", "4", "--lr", "5e-4", "--resume") == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "error:" in line)
    assert "--steps 2 -> 4" in line and "--lr 0.001 -> 0.0005" in line and "--allow-schedule-change" in line, err
    assert "Traceback" not in err and _statuses(tmp_path) == ["complete"]
    assert _pretrain(tmp_path, "--steps", "4", "--resume", "--allow-schedule-change") == 0
    assert "step 4/4" in capsys.readouterr().err and _statuses(tmp_path) == ["complete", "complete"]


def test_pretrain_says_where_it_recorded(tmp_path, capsys):
    assert _pretrain(tmp_path, "--steps", "1") == 0
    assert f"recorded run 1 in {tmp_path / 'r.db'} (kind=pretrain)" in capsys.readouterr().err


# --- Ctrl-C and SIGTERM --------------------------------------------------------------------------
def _interrupt(cmd, signum, after: str, tmp_path, group: bool = False) -> tuple[int, str]:
    """Start `cmd`, send `signum` once stderr shows `after` (to its process group with `group`, as
    a terminal's Ctrl-C does); returns the exit code and the whole stderr."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if after in line:
                (os.killpg if group else os.kill)(proc.pid, signum)
                break
        seen.append(proc.stderr.read())
        return proc.wait(), "".join(seen)
    finally:
        watchdog.cancel()


def _one_interrupted_line(err: str) -> tuple[int, int]:
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1, err
    m = re.fullmatch(r"rsscale pretrain: interrupted at step (\d+); last checkpoint step (\d+); continue with --resume", lines[0])
    assert m, err
    for noise in ("Traceback", "SignalException", "ChildFailedError", "KeyboardInterrupt"):
        assert noise not in err, err
    return int(m[1]), int(m[2])


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_pretrain_with_one_line_and_an_interrupted_run(tmp_path, signum, code):
    cmd = [sys.executable, "-m", "rsscale.scaling.runtime.cli", *PRETRAIN, "--steps", "100000", "--save-every", "3", "--log-every", "1",
           "--out", "run", "--results", "r.db"]
    rc, err = _interrupt(cmd, signum, "step 4/", tmp_path)
    assert rc == code, err
    step, saved = _one_interrupted_line(err)
    assert 4 <= step and saved == step - step % 3 and (tmp_path / "run" / "checkpoints" / f"step_{saved:08d}").is_dir()
    assert _statuses(tmp_path) == ["interrupted"]


def test_ctrl_c_stops_an_nproc_2_run_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "rsscale.scaling.runtime.cli", *PRETRAIN, "--global-batch", "4", "--steps", "100000", "--save-every", "2",
           "--log-every", "1", "--out", "run", "--results", "r.db", "--nproc", "2"]
    rc, err = _interrupt(cmd, signal.SIGINT, "step 3/", tmp_path, group=True)
    assert rc == 130, err
    assert "OMP_NUM_THREADS" not in err  # no torchrun banner: the launcher sets the threads per process
    step, saved = _one_interrupted_line(err)
    assert step >= 3 and saved == step - step % 2
    assert _statuses(tmp_path) == ["interrupted"]


def test_a_stop_request_waits_for_the_step_boundary_unless_ctrl_c_comes_twice():
    with launch.StopRequest() as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # the scheduler and the launcher: still only noted
        assert stop.signum == signal.SIGTERM
    with pytest.raises(launch.Interrupted) as err:
        with launch.StopRequest() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.signum == signal.SIGINT
            signal.raise_signal(signal.SIGINT)
    assert err.value.signum == signal.SIGINT
    with pytest.raises(launch.Interrupted):  # an error after the signal: the signal ended the block
        with launch.StopRequest():
            signal.raise_signal(signal.SIGTERM)
            raise RuntimeError("DataLoader worker exited unexpectedly")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_interrupted_block_is_recorded_as_interrupted_also_in_an_old_store(tmp_path):
    """What fine-tuning and pretraining record on Ctrl-C; a store written before that status
    existed (its CHECK constraint knew running, complete, failed) takes it, ids and metrics kept."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA.replace(", 'interrupted'", ""))
    db.execute("INSERT INTO runs (kind, started, status) VALUES ('bench', 'then', 'complete')")
    db.execute("INSERT INTO metrics (run_id, name, value) VALUES (1, 'images_per_s', 5.0)")
    db.commit()
    db.close()
    store = ResultsStore(str(path))
    with pytest.raises(KeyboardInterrupt):
        with store.run(kind="finetune"):
            raise KeyboardInterrupt
    runs = store.runs()
    assert list(runs["id"]) == [1, 2] and list(runs["status"]) == ["complete", "interrupted"]
    assert list(runs["incomplete"]) == [False, True]  # the report does not count it as complete
    assert list(store.metrics()["value"]) == [5.0]


# --- the layout, checked once before any launch; exit codes --------------------------------------
@pytest.mark.parametrize("argv", [
    ["bench", "--model", "small", "--tp", "3", "--no-record"],
    ["pretrain", "--model", "small", "--tp", "3", "--no-record"],
    ["finetune", "--task", "seg", "--dataset", "synthetic", "--model", "small", "--tp", "3"],
])
def test_a_bad_layout_is_refused_before_launching(argv, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("launched a bad layout")

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch, "relaunch", never)
    for module in ("rsscale.benchmarks.measurement.bench", "rsscale.finetune.finetune", "rsscale.scaling.train.pretrain"):
        monkeypatch.setattr(f"{module}.relaunch", never, raising=False)  # where a command held its own copy
    assert cli(argv + ["--nproc", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("invalid parallel layout") == 1 and "TP size 3 does not divide" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    PRETRAIN + ["--tp", "2", "--no-record"],
    ["bench", "--tp", "2", "--no-record"],
])
def test_tp_without_nproc_suggests_it_and_exits_2(argv, tmp_path, capsys):
    assert cli(argv + ["--out", str(tmp_path)] if argv[0] == "pretrain" else argv) == 2
    err = capsys.readouterr().err
    assert "world size 1 must equal tp*pp*dp" in err and "--nproc 2" in err and "Traceback" not in err


# --- config file keys and --help ------------------------------------------------------------------
@pytest.mark.parametrize("text, needles", [
    ("micro_batch: 4\n", ["micro_batch", "belongs under 'parallel:'", "parallel.micro_batch"]),
    ("stepz: 3\n", ["stepz (did you mean steps?)", "known: model, in_chans, parallel, compute, data_parallel, optim, steps"]),
    ("optim: {lrr: 1.0e-3}\n", ["optim.lrr (did you mean optim.lr?)", "known: optim.lr, optim.min_lr"]),
])
def test_pretrain_config_key_errors_say_where_a_key_belongs(tmp_path, text, needles):
    from rsscale.scaling.train.pretrain import config_from_args

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        config_from_args(argparse.Namespace(config=str(path), nproc=None))
    assert all(n in str(err.value) for n in needles) and "\n" not in str(err.value), err.value


def test_pretrain_help_shows_the_defaults():
    from rsscale.scaling.train.pretrain import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for needle in ("optimizer steps (default: 50)", "peak learning rate (default: 0.001)", "tensor-parallel size: heads / MLP columns split over T ranks (default: 1)",
                   "--data DATA 'synthetic' (bundled, generated if missing), 'random' (in-memory noise) or an image folder (default: synthetic)"):
        assert needle in text, needle
    args = parser.parse_args([])
    assert "steps" not in vars(args)  # absent flags stay absent: a config file's values survive
