"""The kernel regression check on synthetic records, the results-file round trip, and a CPU
smoke run of the benchmark pipeline (do_bench and the device peaks replaced by stand-ins)."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed

from rsscale.benchmarks.measurement import gpu_check
from rsscale.benchmarks.measurement import kernels as kb
from rsscale.scaling.runtime.cli import main as cli

os.environ["TRITON_INTERPRET"] = "1"  # before kernels/triton build any kernel (see kernels/dispatch.py)


def _rec(ms, impl="triton", kernel="layer_norm", shape="M=8 N=40 K=2", direction="fwd"):
    return dict(kernel=kernel, impl=impl, shape=shape, dtype="bf16", direction=direction, ms=ms,
                unit="GB/s", rate=1.0, pct_peak=1.0)


def test_slower_fails_faster_passes_and_threshold_edge():
    baseline = [_rec(2.0, direction="fwd"), _rec(2.0, direction="fwd+bwd"), _rec(2.0, kernel="attention"),
                _rec(1.0, impl="torch")]
    current = [_rec(2.2, direction="fwd"), _rec(1.0, direction="fwd+bwd"), _rec(2.2000001, kernel="attention"),
               _rec(9.0, impl="torch")]
    rows = kb.compare(baseline, current, threshold=0.10)
    verdicts = {(r["kernel"], r["direction"]): r["verdict"] for r in rows}
    assert verdicts == {
        ("layer_norm", "fwd"): "ok",  # exactly +10%: not "more than" the threshold
        ("layer_norm", "fwd+bwd"): "ok",  # twice as fast
        ("attention", "fwd"): "slower",  # just over +10%
    }  # the torch baseline row is not ours to police
    assert rows[0]["ratio"] == pytest.approx(1.1)
    assert not kb.print_comparison(rows, 0.10)
    assert kb.print_comparison(kb.compare(baseline, baseline, 0.0), 0.0)


def test_missing_record_fails_and_bad_threshold_raises():
    rows = kb.compare([_rec(1.0)], [_rec(1.0, shape="M=9 N=40 K=2")], 0.1)
    assert [r["verdict"] for r in rows] == ["missing"]
    assert not kb.print_comparison(rows, 0.1)
    with pytest.raises(ValueError, match="threshold"):
        kb.compare([], [], -0.1)


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_check_cli_exit_codes_from_files(tmp_path, suffix, capsys):
    meta = dict(device="synthetic", shapes="tiny", dtype="bf16")
    base, fast, slow = (tmp_path / f"{n}{suffix}" for n in ("base", "fast", "slow"))
    kb.save_results(dict(meta=meta, records=[_rec(1.0), _rec(4.0, kernel="attention")]), str(base))
    kb.save_results(dict(meta=meta, records=[_rec(0.9), _rec(4.1, kernel="attention")]), str(fast))
    kb.save_results(dict(meta=meta, records=[_rec(1.3), _rec(4.0, kernel="attention")]), str(slow))
    assert kb.load_results(str(base))["records"][1]["ms"] == 4.0
    assert cli(["kernels", "check", "--baseline", str(base), "--current", str(fast)]) == 0
    assert cli(["kernels", "check", "--baseline", str(base), "--current", str(slow)]) == 1
    assert "slower" in capsys.readouterr().out
    assert cli(["kernels", "check", "--baseline", str(base), "--current", str(slow), "--threshold", "0.5"]) == 0


def test_bench_pipeline_smoke_on_cpu(monkeypatch, tmp_path):
    """The GPU timing path end to end on CPU: records for both kernels, both directions."""

    def one_shot(fn, grad_to_none=None):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    monkeypatch.setattr(kb, "_bench", one_shot)
    monkeypatch.setattr(kb, "measure_peaks", lambda device: dict(copy_gbps=10.0, matmul_tflops=1.0))
    monkeypatch.setattr(kb, "_maybe_compile", lambda fn: None)  # inductor compiles take minutes on CPU
    result = kb.run_bench("tiny", "fp32", device="cpu")
    got = {(r["kernel"], r["impl"], r["direction"]) for r in result["records"]}
    for kernel in ("layer_norm", "attention"):
        for impl in ("triton", "torch"):
            assert {(kernel, impl, "fwd"), (kernel, impl, "fwd+bwd")} <= got
    for r in result["records"]:
        assert r["ms"] > 0 and r["pct_peak"] == pytest.approx(100 * r["rate"] / (10.0 if r["unit"] == "GB/s" else 1.0))
    assert result["meta"]["shapes"] == "tiny" and result["meta"]["git_commit"]
    out = tmp_path / "bench.json"
    kb.save_results(result, str(out))
    rows = kb.compare(json.loads(out.read_text())["records"], result["records"], 0.0)
    assert rows and all(r["verdict"] == "ok" for r in rows)
    from rsscale.scaling.runtime.store import ResultsStore

    store = ResultsStore(tmp_path / "results.db")
    kb.record_in_store(result, store.path)
    ms = store.metrics(kind="kernel", name="ms")
    assert len(ms) == len(result["records"]) and set(ms["impl"]) >= {"triton", "torch"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, check runs the real benchmark")
def test_cpu_check_runs_correctness_and_says_timing_needs_gpu(tmp_path, capsys):
    """On CPU the check runs correctness, then fails as 'could not compare' (exit 3) unless skipping is allowed."""
    base = tmp_path / "b.json"
    kb.save_results(dict(meta={}, records=[_rec(1.0)]), str(base))
    assert cli(["kernels", "check", "--baseline", str(base)]) == kb.EXIT_CANNOT_COMPARE
    captured = capsys.readouterr()
    assert "could not compare: timing needs a CUDA GPU" in captured.err
    assert "FAIL" not in captured.out and captured.out.count(" ok") >= 6
    assert cli(["kernels", "check", "--baseline", str(base), "--allow-skip"]) == 0
    assert "SKIPPED" in capsys.readouterr().out


def test_kernels_compile_for_h100_without_a_gpu():
    """Every kernel, in the tile configurations its launcher uses on a GPU, compiles to an sm_90
    cubin (triton ships ptxas), fp32 attention with its IEEE-precision dots included. A fresh
    process: the interpreter must be off for compilation."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from rsscale.kernels.testing import compile_all_for_gpu; print(len(compile_all_for_gpu()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "4"  # multi-LN; attention fp16, bf16 and fp32




# ------------------------------------------------------------ kernel checks that could not compare
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
    from rsscale.benchmarks.measurement import kernels as kb

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




ROOT = pathlib.Path(__file__).resolve().parents[3]
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


# ------------------------------------------------------------ options (scaling/runtime/options.py)
@pytest.mark.parametrize("argv, flag", [
    (["kernels", "check", "--baseline", "b.json", "--threshold", "-0.1"], "--threshold (config key 'threshold') must be >= 0, got -0.1"),
    (["kernels", "check", "--baseline", "b.json", "--threshold", "inf"], "--threshold (config key 'threshold') must be >= 0, got inf"),
    (["kernels", "check"], "--baseline is required (or the key 'baseline' in a --config file)"),
])
def test_a_bad_option_is_one_line_naming_its_flag(argv, flag, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert flag in err[0] and err[0].startswith("rsscale kernels: error:") and len(err) == 2  # the line + the traceback hint


def test_a_bad_value_in_a_config_file_names_its_flag_and_key(tmp_path, capsys):
    path = tmp_path / "bench.yaml"
    path.write_text("dtype: int8\n")
    assert cli(["kernels", "bench", "--config", str(path)]) == 2
    assert "--dtype (config key 'dtype') must be one of fp32, fp16, bf16, got 'int8'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["kernels", "bench", "--shapes", "quick", "--dtype", "fp16", "--out", "k.csv", "--no-store", "--allow-skip"],
    ["kernels", "check", "--baseline", "b.json", "--current", "c.json", "--threshold", "0.25", "--allow-device-mismatch"],
    ["kernels", "test"],
])
def test_each_actions_printed_config_reads_back_to_itself(argv, tmp_path):
    import yaml

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert cli(argv + ["--print-config", str(first)]) == 0
    assert cli(argv[:2] + ["--config", str(first), "--print-config", str(second)]) == 0
    tree = yaml.safe_load(first.read_text())
    assert tree == yaml.safe_load(second.read_text())
    if argv[1] == "bench":
        assert tree == dict(command="kernels bench", shapes="quick", dtype="fp16", out="k.csv", store=False, allow_skip=True)
    if argv[1] == "check":
        assert tree["threshold"] == 0.25 and tree["allow_device_mismatch"] is True and tree["allow_skip"] is False


def test_check_takes_its_options_from_a_config_file(tmp_path, capsys):
    base = _results_file(tmp_path, "base.json", [_kernel_rec(1.0)])
    slow = _results_file(tmp_path, "slow.json", [_kernel_rec(1.3)])
    path = tmp_path / "check.yaml"
    path.write_text(f"baseline: {base}\ncurrent: {slow}\nthreshold: 0.5\n")
    assert cli(["kernels", "check", "--config", str(path)]) == 0
    assert cli(["kernels", "check", "--config", str(path), "--threshold", "0.1"]) == 1  # the flag overrides the file
    assert "slower" in capsys.readouterr().out
