"""Hostile-but-realistic inputs (issue 10, items 9, 10, 12, 14, 15, 16): numbers that make no sense,
mistyped config files, 16-bit and float imagery, broken or read-only results stores, kernel checks
that could not compare, and DALI's exact resume. Each test failed on the code before its fix."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from rsscale.scaling.cli import main as cli

HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None


def _one_error_line(capsys, *needles):
    """The command wrote one 'error:' line naming every needle, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------- item 9
@pytest.mark.parametrize("argv, flag", [
    (["bench", "--steps", "0", "--no-record"], "--steps"),
    (["bench", "--global-batch", "-8", "--no-record"], "--global-batch"),
    (["profile", "--model", "tiny", "--gpus", "2", "--memory-gb", "-5"], "--memory-gb"),
    (["profile", "--model", "tiny", "--gpus", "2", "--efficiency", "1.5"], "--efficiency"),
    (["finetune", "--task", "seg", "--dataset", "synthetic", "--steps", "0"], "--steps"),
    (["finetune", "--task", "seg", "--dataset", "synthetic", "--log-every", "0"], "--log-every"),
    (["finetune", "--task", "seg", "--dataset", "synthetic", "--lr", "nan"], "--lr"),
])
def test_numeric_flags_out_of_range_are_one_line_errors(argv, flag, capsys):
    assert cli(argv) == 2
    _one_error_line(capsys, flag)


@pytest.mark.parametrize("flags, flag", [
    (dict(steps=0), "--steps"), (dict(steps=-3), "--steps"), (dict(lr=-1.0), "--lr"), (dict(save_every=-1), "--save-every"),
    (dict(in_chans=0), "--in-chans"), (dict(log_every=0), "--log-every"), (dict(lr=float("inf")), "--lr"),
    (dict(min_lr=0.5, lr=0.1), "--min-lr"), (dict(micro_batch=0), "--micro-batch"), (dict(data_backend="jax"), "--data-backend"),
])
def test_pretrain_config_values_are_range_checked(flags, flag):
    from rsscale.scaling.train import config_from_args

    with pytest.raises(ValueError, match=f"^{flag} "):
        config_from_args(_args(**flags))


def test_pretrain_steps_zero_exits_nonzero_without_recording(tmp_path):
    cmd = [sys.executable, "-m", "rsscale.scaling.cli", "pretrain", "--steps", "0", "--data", "random",
           "--out", str(tmp_path / "run"), "--results", str(tmp_path / "r.db")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--steps" in proc.stderr and "must be >= 1" in proc.stderr
    assert not (tmp_path / "r.db").exists()


def _args(**flags):
    ns = argparse.Namespace(config=None, nproc=None)
    for k, v in flags.items():
        setattr(ns, k, v)
    return ns


# ---------------------------------------------------------------------------------- item 10
@pytest.mark.parametrize("text, key, expected", [
    ("steps: ten\n", "'steps'", "int"),
    ('resume: "no"\n', "'resume'", "true or false"),
    ('parallel: {sp: "false"}\n', "'parallel.sp'", "true or false"),
    ("optim: {lr: [1, 2]}\n", "'optim.lr'", "float"),
    ("parallel: 4\n", "parallel", "mapping"),
    ("model: 12\n", "'model'", "string"),
])
def test_pretrain_config_file_is_type_checked_up_front(tmp_path, text, key, expected):
    from rsscale.scaling.train import config_from_args

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        config_from_args(_args(config=str(path)))
    msg = str(err.value)
    assert str(path) in msg and key in msg and expected in msg and "\n" not in msg


def test_pretrain_config_file_values_keep_their_meaning(tmp_path):
    """Real booleans, integral floats and null for an optional value are accepted as such."""
    from rsscale.scaling.train import config_from_args

    path = tmp_path / "run.toml"
    path.write_text('steps = 4.0\nresume = false\nresults = "x.db"\n[parallel]\nsp = false\n')
    c = config_from_args(_args(config=str(path)))
    assert (c.steps, c.resume, c.parallel.sp, c.results) == (4, False, False, "x.db")


def test_flat_config_file_booleans_and_repeatable_flags(tmp_path, capsys):
    """bench/profile files: 'no-record: "yes"' is refused; a list feeds a repeatable flag."""
    cfg = tmp_path / "bench.yaml"
    cfg.write_text('no_record: "yes"\n')
    assert cli(["bench", "--config", str(cfg)]) == 2
    _one_error_line(capsys, str(cfg), "no_record", "true or false")
    prof = tmp_path / "profile.yaml"
    prof.write_text("model: tiny\ngpus: 2\nglobal_batch: 8\nmicro_batch: [2, 4]\ntop: 3\n")
    assert cli(["profile", "--config", str(prof)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if " mb" in line]
    assert rows and all(" mb2 " in r or " mb4 " in r for r in rows)
