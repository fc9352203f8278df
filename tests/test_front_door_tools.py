"""The tools as a new user first meets them: kernel check and bench without a baseline or a GPU,
the device `profile` assumes, defaults in --help, quiet single-process logs, and an install that
a CPU-only machine can make without DALI."""

from __future__ import annotations

import configparser
import logging
import pathlib
import shlex
import sys

import pytest
import torch.distributed

from rsscale.benchmarks import profile
from rsscale.benchmarks.measurement import gpu_check
from rsscale.benchmarks.measurement import kernels as kb
from rsscale.scaling.runtime import log as rsscale_log
from rsscale.scaling.runtime.cli import main as cli
from rsscale.scaling.spec.config import CPU_LADDER

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_command(prefix: str) -> list[str]:
    """The README's command line that starts with `prefix`, as argv after `rsscale`."""
    line = next(line for line in README.splitlines() if line.startswith(prefix))
    return shlex.split(line, comments=True)[1:]


def test_a_missing_baseline_is_could_not_check_and_the_docs_name_one_file(tmp_path, capsys):
    check, bench = readme_command("rsscale kernels check"), readme_command("rsscale kernels bench --shapes")
    baseline = check[check.index("--baseline") + 1]
    assert bench[bench.index("--out") + 1] == baseline  # what bench writes is what check reads
    assert f"--out {baseline}" in (ROOT / "reports/baselines/README.md").read_text()
    missing = str(tmp_path / "h100-bf16.json")
    check[check.index("--baseline") + 1] = missing
    assert cli(check) == kb.EXIT_CANNOT_COMPARE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"could not compare: no kernel benchmark results at {missing}" in err[0]
    assert cli(check + ["--allow-skip"]) == 0
    assert "kernels check SKIPPED" in capsys.readouterr().out


def test_kernels_bench_without_a_gpu_says_so_in_its_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kb, "_prepare_device", lambda: "cpu")
    monkeypatch.setattr(kb, "run_correctness", lambda device: True)  # the interpreter's table: tested elsewhere
    out = tmp_path / "bench.json"
    assert cli(["kernels", "bench", "--out", str(out)]) == kb.EXIT_CANNOT_COMPARE
    assert "timing needs a CUDA GPU" in capsys.readouterr().err and not out.exists()
    assert cli(["kernels", "bench", "--out", str(out), "--allow-skip"]) == 0
    assert "kernels bench SKIPPED" in capsys.readouterr().out and not out.exists()
    step = gpu_check.run_step(dict(name="kernels-bench", cmd=[sys.executable, "-c", "raise SystemExit(3)"], timeout=60))
    assert step["status"] == "FAIL (exit 3)"  # gpu-check never counts such a bench as passed


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


@pytest.mark.parametrize("argv, shown", [
    (["demo"], ["pretraining steps per model (default: 30)", f"presets to pretrain (default: {','.join(CPU_LADDER)})"]),
    (["finetune"], ["--lr LR (default: 0.001)", "layer-wise lr decay (1 = none) (default: 0.75)"]),
    (["bench"], ["measured steps (default: 10)", "(fp16: CUDA only) (default: fp32)"]),
    (["kernels", "bench"], ["shape grid (default: presets)"]),
])
def test_help_shows_defaults(argv, shown, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    with pytest.raises(SystemExit) as exit_:
        cli(argv + ["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for piece in shown:
        assert piece in text
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: ==SUPPRESS==)" not in text


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


def test_cpu_only_install_leaves_dali_out_and_the_readme_says_so():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = {name: value.split() for name, value in cfg["options.extras_require"].items()}
    assert not any("nvidia" in req for req in extras["test"]) and "pytest" in extras["test"]
    assert any("nvidia-dali" in req for req in extras["dali"])
    assert extras["dev"] == ["rsscale[test,dali]"]
    ci = (ROOT / ".ci/run").read_text()
    install = next(line for line in README.splitlines() if line.startswith("pip install torch")).split("#")[0].strip()
    assert install in ci  # the README's install is CI's
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert 'pip install -e ".[test]"' in setup and "DALI" in setup
