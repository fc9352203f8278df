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


# ---------------------------------------------------------------------------------- item 15
def _kernel_rec(ms, kernel="layer_norm", impl="triton"):
    return dict(kernel=kernel, impl=impl, shape="M=8 N=40 K=2", dtype="bf16", direction="fwd", ms=ms,
                unit="GB/s", rate=1.0, pct_peak=1.0)


def _results_file(tmp_path, name, records, device="GPU A", raw=None):
    path = tmp_path / name
    path.write_text(raw if raw is not None else json.dumps(dict(meta=dict(device=device, shapes="tiny", dtype="bf16"), records=records)))
    return str(path)


@pytest.mark.parametrize("case, why", [
    ("nan", "not a positive finite number"),
    ("malformed", "is not a results file"),
    ("no_ms", "lacks ms"),
    ("device", "baseline from 'GPU A', current run on 'GPU B'"),
    ("no_triton", "no triton records"),
])
def test_kernel_check_that_could_not_compare_fails_with_its_own_exit_code(tmp_path, capsys, case, why):
    from rsscale.benchmarks import kernel_bench as kb

    base = _results_file(tmp_path, "base.json", [_kernel_rec(1.0)])
    current = {
        "nan": lambda: _results_file(tmp_path, "cur.json", [_kernel_rec(float("nan"))]),
        "malformed": lambda: _results_file(tmp_path, "cur.json", None, raw='{"records": [ truncated'),
        "no_ms": lambda: _results_file(tmp_path, "cur.json", [{k: v for k, v in _kernel_rec(1.0).items() if k != "ms"}]),
        "device": lambda: _results_file(tmp_path, "cur.json", [_kernel_rec(1.0)], device="GPU B"),
        "no_triton": lambda: _results_file(tmp_path, "cur.json", [_kernel_rec(1.0)]),
    }[case]()
    if case == "no_triton":
        base = _results_file(tmp_path, "base.json", [_kernel_rec(1.0, impl="torch")])
    assert cli(["kernels", "check", "--baseline", base, "--current", current]) == kb.EXIT_CANNOT_COMPARE == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "could not compare" in err and why in err, err
    assert cli(["kernels", "check", "--baseline", base, "--current", current, "--allow-skip"]) == 0
    assert "SKIPPED" in capsys.readouterr().out


def test_kernel_check_device_mismatch_can_be_allowed_and_then_compares(tmp_path, capsys):
    base = _results_file(tmp_path, "base.json", [_kernel_rec(1.0)])
    slow = _results_file(tmp_path, "slow.json", [_kernel_rec(1.5)], device="GPU B")
    assert cli(["kernels", "check", "--baseline", base, "--current", slow, "--allow-device-mismatch"]) == 1
    out = capsys.readouterr().out
    assert "compared anyway" in out and "slower" in out
