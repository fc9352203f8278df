"""`rsscale profile` (benchmarks/profile.py) as a new user meets it: the device it assumes, memory
in readable units."""

from __future__ import annotations

from rsscale.benchmarks import profile
from rsscale.scaling.runtime.cli import main as cli


def test_profile_states_the_device_it_assumes_and_shows_small_memory_in_mib(capsys):
    argv = ["profile", "--model", "tiny", "--gpus", "2", "--global-batch", "8", "--top", "2", "--no-calibration"]
    assert cli(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("device assumed: 80 GiB, 989 TFLOP/s peak, 300 GB/s per device")
    assert "H100" in lines[0] and all(flag in lines[0] for flag in ("--memory-gb", "--peak-tflops", "--bandwidth-gbs"))
    rows = [line for line in lines if line.startswith("TP")]
    assert rows and all(c.endswith("M") and float(c[:-1]) > 0 for r in rows for c in r.split()[6:11])
    assert "3350 GB/s memory" in lines[0] and "--hbm-gbs" in lines[0]
    assert cli(argv + ["--memory-gb", "16", "--peak-tflops", "50", "--bandwidth-gbs", "25", "--hbm-gbs", "100"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "device assumed: 16 GiB, 50 TFLOP/s peak, 25 GB/s per device, 100 GB/s memory"
    assert (profile.size(0), profile.size(3 * 2**20), profile.size(2**30)) == ("0.00", "3.00M", "1.00")
