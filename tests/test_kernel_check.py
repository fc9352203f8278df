"""The kernel regression check on synthetic records, the results-file round trip, and a CPU
smoke run of the benchmark pipeline (do_bench and the device peaks replaced by stand-ins)."""

import json
import os
import subprocess
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before kernels/triton build any kernel (see kernels/dispatch.py)

import pytest
import torch

from rsscale.benchmarks.measurement import kernels as kb
from rsscale.scaling.runtime.cli import main as cli


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
