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
