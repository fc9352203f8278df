"""`rsscale gpu-check` on a machine without a GPU: lists its steps, runs nothing, exits 3."""

import subprocess
import sys

import pytest
import torch

from rsscale.benchmarks.measurement import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_gpu_check_on_cpu_lists_steps_and_exits_with_its_own_code(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, "-m", "rsscale.scaling.runtime.cli", "gpu-check", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == gpu_check.EXIT_NO_GPU == 3, proc.stderr[-2000:]
    for name in ("kernels-test", "kernels-bench", "bench-b12x1", "bench-l12x4", "fp16", "calibrate"):
        assert name in proc.stdout
    assert "nothing was run" in proc.stderr and not out.exists()  # no summary that could pass for a check


def test_summary_marks_failures_and_shows_their_output(tmp_path):
    ok = {"name": "calibrate", "cmd": ["python", "-m", "x", "calibrate"], "status": "PASS", "seconds": 3.0, "tail": "", "data": {"gemm": []}}
    bad = {"name": "kernels-test", "cmd": ["python", "-m", "x", "kernels", "test"], "status": "FAIL (exit 1)", "seconds": 1.0, "tail": "boom", "data": None}
    path = gpu_check.write_summary(str(tmp_path), [ok, bad], {"device": "NVIDIA H100", "git_commit": "abc"})
    text = open(path).read()
    assert "| kernels-test | FAIL (exit 1) |" in text and "boom" in text and "NVIDIA H100" in text and "abc" in text


def test_the_step_names_are_the_steps():
    assert tuple(s["name"] for s in gpu_check.steps("out")) == gpu_check.STEP_NAMES


def test_an_unknown_step_is_one_line_naming_the_flag(capsys):
    from rsscale.scaling.runtime.cli import main

    assert main(["gpu-check", "--only", "fp16", "--only", "kernel-test", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == ("rsscale gpu-check: error: --only (config key 'only') must be one of "
                                   f"{', '.join(gpu_check.STEP_NAMES)}, got 'kernel-test'")


def test_the_printed_config_reads_back_to_itself(tmp_path, capsys):
    import yaml

    from rsscale.scaling.runtime.cli import main

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert main(["gpu-check", "--out", str(tmp_path / "gpu"), "--only", "fp16", "--only", "calibrate", "--dry-run",
                 "--print-config", str(first)]) == 0
    assert main(["gpu-check", "--config", str(first), "--print-config", str(second)]) == 0
    tree = yaml.safe_load(first.read_text())
    assert yaml.safe_load(second.read_text()) == tree and tree["only"] == ["fp16", "calibrate"] and tree["dry_run"] is True
    capsys.readouterr()
    assert main(["gpu-check", "--config", str(first)]) == 0  # the file's options run: a dry run of its two steps
    out = capsys.readouterr().out
    assert "would run 2 steps" in out and "--fp16-step" in out and "kernels" not in out


def test_the_fp16_step_flag_is_hidden_but_accepted(tmp_path, capsys):
    from rsscale.scaling.runtime.cli import main

    with pytest.raises(SystemExit):
        main(["gpu-check", "--help"])
    assert "--fp16-step" not in capsys.readouterr().out
    assert main(["gpu-check", "--fp16-step", str(tmp_path / "fp16.json"), "--print-config"]) == 0
    assert f"fp16_step: {tmp_path / 'fp16.json'}" in capsys.readouterr().out
