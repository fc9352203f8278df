"""`rsscale kernels`: correctness, speed benchmark and regression check of the Triton kernels.

    rsscale kernels test                                   correctness table (GPU, or CPU interpreter)
    rsscale kernels bench [--shapes presets|quick] [--out FILE] [--allow-skip]
    rsscale kernels check --baseline FILE [--current FILE] [--threshold 0.10] [--allow-skip]

bench times every kernel next to its baselines (torch eager, torch.compile, SDPA's flash backend
for attention, apex / Transformer Engine LayerNorm when installed) on shapes taken from the model
presets, with triton.testing.do_bench medians, and reports GB/s (LayerNorm: bytes read + written)
or TFLOP/s (attention: 4*B*H*N*N*D forward, 2.5x that backward) and the percentage of this
device's peak, measured in the same run (a large device copy; a large bf16 matmul). Results go to
a JSON (or CSV) file and to the results store (kind="kernel").
check compares the Triton rows of a fresh (or given) result against a committed baseline. Exit
codes: 0 every row within the threshold; 1 a row slower by more than the threshold, missing, or
a kernel incorrect; 3 (EXIT_CANNOT_COMPARE) nothing could be compared, with a line saying why:
no GPU to time on, a missing or malformed baseline or results file, a timing that is not a
positive finite number, no Triton rows, or a baseline from another (or an unrecorded) device.
--allow-skip turns "could not compare" into exit 0 with a SKIPPED line; --allow-device-mismatch
compares across devices anyway. Without a GPU, bench and check run the correctness part under
the Triton interpreter, then exit 3 (timing needs a GPU; bench writes no file), or 0 with
--allow-skip. Each action's options are a dataclass tree (KernelsBench, KernelsCheck), so each
also takes --config FILE and --print-config.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import dataclass

import torch

from rsscale.scaling.runtime.options import add_options, check, option, resolve
from rsscale.scaling.spec.config import PAPER_PRESETS, PRESETS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXIT_SLOWER, EXIT_CANNOT_COMPARE = 1, 3
RECORD_KEYS = ("kernel", "impl", "shape", "dtype", "direction", "ms")
BWD_FLOP_FACTOR = 2.5  # attention backward FLOPs relative to the forward (5 matmuls vs 2)


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


def layer_norm_shapes(grid: str, batch: int = 64) -> list[dict]:
    """rows = batch * tokens (all patches + cls), width, K = branches of each preset.
    Grids: "presets" (all paper presets), "quick" (smallest and largest), "tiny" (CPU tests)."""
    if grid == "tiny":
        return [dict(M=8, N=40, K=2)]
    names = PAPER_PRESETS if grid == "presets" else ("b12x1", "g12x4")
    shapes = []
    for name in names:
        cfg = PRESETS[name]
        shape = dict(M=batch * (cfg.num_patches + 1), N=cfg.width, K=cfg.branches)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def attention_shapes(grid: str, tokens_per_batch: int = 16384) -> list[dict]:
    """Each preset's heads and head dim at 197 tokens (224 px global), 1024 and 4096 (1024 px
    fine-tuning: 64x64 patches globally); batch keeps ~16k tokens per call."""
    if grid == "tiny":
        return [dict(B=1, H=2, N=40, D=16)]
    names, lengths = (PAPER_PRESETS, (197, 1024, 4096)) if grid == "presets" else (("b12x1", "g12x4"), (1024, 4096))
    shapes = []
    for name in names:
        cfg = PRESETS[name]
        for n in lengths:
            shape = dict(B=max(1, tokens_per_batch // n), H=cfg.heads, N=n, D=cfg.width // cfg.heads)
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


# ---------------------------------------------------------------------------------------------
# Correctness (CPU under the interpreter, or GPU)
# ---------------------------------------------------------------------------------------------

CPU_CHECKS = [
    ("layer_norm", dict(M=13, N=100, K=1), "fp32"),
    ("layer_norm", dict(M=9, N=768, K=4), "fp32"),
    ("layer_norm", dict(M=11, N=72, K=2), "fp16"),
    ("attention", dict(B=1, H=2, N=50, D=16), "fp32"),
    ("attention", dict(B=1, H=1, N=70, D=64), "fp32"),
    ("attention", dict(B=1, H=1, N=40, D=128), "fp32"),
]
GPU_CHECKS = [
    ("layer_norm", dict(M=4099, N=1536, K=4), "bf16"),
    ("layer_norm", dict(M=1000, N=8192, K=1), "fp16"),
    ("layer_norm", dict(M=777, N=1000, K=2), "fp32"),
    ("attention", dict(B=2, H=12, N=197, D=64), "fp16"),
    ("attention", dict(B=1, H=16, N=1000, D=128), "bf16"),
    ("attention", dict(B=2, H=4, N=333, D=48), "fp16"),
]


def correctness_rows(device: str) -> list[dict]:
    """Each kernel vs its float64 torch reference; one row per (kernel, shape, dtype)."""
    from rsscale.kernels.testing import TOLERANCE, check_attention, check_layer_norm

    rows = []
    for kernel, shape, dtype_name in CPU_CHECKS if device == "cpu" else GPU_CHECKS:
        dtype = DTYPES[dtype_name]
        if kernel == "layer_norm":
            errors = check_layer_norm((shape["M"], shape["N"]), shape["K"], dtype, device)
        else:
            errors = check_attention(tuple(shape.values()), dtype, device)
        worst = max(errors.values())
        rows.append(
            dict(kernel=kernel, shape=shape_str(shape), dtype=dtype_name, worst_output=max(errors, key=errors.get),
                 max_error=worst, tolerance=TOLERANCE[dtype], ok=worst < TOLERANCE[dtype])
        )
    return rows


def print_correctness(rows: list[dict]) -> bool:
    print(f"{'kernel':<11} {'shape':<26} {'dtype':<5} {'worst':<8} {'max err':>9} {'tol':>7}  verdict")
    for r in rows:
        print(f"{r['kernel']:<11} {r['shape']:<26} {r['dtype']:<5} {r['worst_output']:<8} "
              f"{r['max_error']:>9.2e} {r['tolerance']:>7.0e}  {'ok' if r['ok'] else 'FAIL'}")
    return all(r["ok"] for r in rows)


# ---------------------------------------------------------------------------------------------
# Timing (GPU)
# ---------------------------------------------------------------------------------------------


def _bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def measure_peaks(device="cuda") -> dict:
    """Device copy bandwidth (GB/s, 1 GiB read + 1 GiB write) and bf16 matmul TFLOP/s (8192^3)."""
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    copy_gbps = 2 * x.numel() * 4 / _bench(lambda: y.copy_(x)) / 1e6
    del x, y
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device=device) for _ in range(2))
    matmul_tflops = 2 * 8192**3 / _bench(lambda: a @ b) / 1e9
    return dict(copy_gbps=copy_gbps, matmul_tflops=matmul_tflops)


@dataclass
class Impl:
    name: str
    fn: object  # callable(*inputs) -> output


def _maybe_compile(fn):
    try:
        return torch.compile(fn)
    except Exception as err:  # noqa: BLE001 - any backend problem just drops this baseline
        print(f"  (torch.compile unavailable: {err})")
        return None


def layer_norm_impls(n: int, k: int) -> list[Impl]:
    from rsscale.kernels import fused_layer_norm as fln

    impls = [Impl("triton", fln.triton_multi_layer_norm), Impl("torch", fln.torch_multi_layer_norm)]
    compiled = _maybe_compile(fln.torch_multi_layer_norm)
    if compiled is not None:
        impls.append(Impl("torch.compile", compiled))
    try:  # K separate apex calls: what a model would run without the multi-LN kernel
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        impls.append(Impl("apex", lambda x, w, b, eps: torch.stack(
            [fused_layer_norm_affine(x, w[i], b[i], (n,), eps) for i in range(k)])))
    except ImportError:
        pass
    try:
        import transformer_engine.pytorch as te

        lns = [te.LayerNorm(n, eps=1e-6) for _ in range(k)]
        impls.append(Impl("transformer_engine", lambda x, w, b, eps: torch.stack([ln(x) for ln in lns])))
    except ImportError:
        pass
    return impls


def attention_impls() -> list[Impl]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rsscale.kernels import flash_attention as fa

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    impls = [Impl("triton", fa.triton_attention), Impl("sdpa_flash", sdpa_flash), Impl("torch", fa.naive_attention)]
    compiled = _maybe_compile(fa.naive_attention)
    if compiled is not None:
        impls.append(Impl("torch.compile", compiled))
    return impls


def _time_impl(fn, inputs, grads) -> tuple[float, float]:
    """(forward ms, forward+backward ms)."""
    with torch.no_grad():
        fwd = _bench(lambda: fn(*inputs))
    out = fn(*inputs)
    dout = torch.randn_like(out)
    fwd_bwd = _bench(lambda: fn(*inputs).backward(dout), grad_to_none=grads)
    return fwd, fwd_bwd


def bench_layer_norm(shape: dict, dtype, peaks: dict, device="cuda") -> list[dict]:
    m, n, k = shape["M"], shape["N"], shape["K"]
    x = torch.randn(m, n, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(k, n, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(k, n, dtype=dtype, device=device, requires_grad=True)
    size = x.element_size()
    fwd_bytes = size * (m * n + k * m * n + 2 * k * n)  # read x, w, b; write K outputs
    bwd_bytes = size * (m * n + k * m * n + m * n + 3 * k * n)  # read x, dy; write dx, dw, db (+ w)
    return _timed_rows("layer_norm", shape, dtype, layer_norm_impls(n, k), (x, w, b, 1e-6), [x, w, b],
                       "GB/s", fwd_bytes / 1e6, (fwd_bytes + bwd_bytes) / 1e6, peaks["copy_gbps"])


def bench_attention(shape: dict, dtype, peaks: dict, device="cuda") -> list[dict]:
    q, k, v = (torch.randn(*shape.values(), dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    fwd_flops = 4 * shape["B"] * shape["H"] * shape["N"] ** 2 * shape["D"]
    return _timed_rows("attention", shape, dtype, attention_impls(), (q, k, v), [q, k, v],
                       "TFLOP/s", fwd_flops / 1e9, fwd_flops * (1 + BWD_FLOP_FACTOR) / 1e9, peaks["matmul_tflops"])


def _timed_rows(kernel, shape, dtype, impls, inputs, grads, unit, fwd_work, fwd_bwd_work, peak) -> list[dict]:
    """Rows for every impl and direction; work is per millisecond unit (GB/ms*1e3 or TFLOP/ms*1e3)."""
    rows = []
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    for impl in impls:
        try:
            times = _time_impl(impl.fn, inputs, grads)
        except Exception as err:  # noqa: BLE001 - a baseline that cannot run this shape is skipped
            print(f"  {kernel} {impl.name} {shape_str(shape)}: skipped ({type(err).__name__}: {str(err)[:80]})")
            continue
        for direction, ms, work in zip(("fwd", "fwd+bwd"), times, (fwd_work, fwd_bwd_work)):
            rate = work / ms
            rows.append(dict(kernel=kernel, impl=impl.name, shape=shape_str(shape), dtype=dtype_name,
                             direction=direction, ms=ms, unit=unit, rate=rate, pct_peak=100 * rate / peak))
            print(f"  {kernel:<10} {impl.name:<18} {shape_str(shape):<28} {direction:<7} "
                  f"{ms:8.3f} ms {rate:8.1f} {unit} {100 * rate / peak:5.1f}% of peak", flush=True)
    return rows


def run_bench(grid: str, dtype_name: str, device="cuda") -> dict:
    """All kernels x impls x shapes of a grid on the GPU -> {meta, records}."""
    dtype = DTYPES[dtype_name]
    peaks = measure_peaks(device)
    print(f"device peaks: copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s")
    records = []
    for shape in layer_norm_shapes(grid):
        records += bench_layer_norm(shape, dtype, peaks, device)
    for shape in attention_shapes(grid):
        records += bench_attention(shape, dtype, peaks, device)
    return dict(meta=dict(environment(), shapes=grid, dtype=dtype_name, **peaks), records=records)


def environment() -> dict:
    """Device, versions and git commit (the results store's own description of this process)."""
    from rsscale.scaling.runtime.store import environment as store_environment

    env = store_environment()
    return {k: env[k] for k in ("device", "torch_version", "triton_version", "mcore_version", "git_commit", "host")}


# ---------------------------------------------------------------------------------------------
# Files and the results store
# ---------------------------------------------------------------------------------------------


def save_results(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".csv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(result["records"][0]) + list(result["meta"]))
            writer.writeheader()
            for r in result["records"]:
                writer.writerow({**r, **result["meta"]})
    else:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    print(f"wrote {len(result['records'])} records to {path}")


class CannotCompare(Exception):
    """The regression check could not compare anything (exit EXIT_CANNOT_COMPARE); the message says why."""


def load_results(path: str) -> dict:
    """A file written by save_results (JSON or CSV) -> {meta, records}; CannotCompare naming the
    file when it is not one (absent, unparsable, no records, a record without its keys)."""
    if not os.path.exists(path):
        raise CannotCompare(f"no kernel benchmark results at {path} (write one with `rsscale kernels bench --out {path}` on a GPU)")
    try:
        if path.endswith(".csv"):
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            meta_keys = set(rows[0]) - set(RECORD_KEYS) - {"unit", "rate", "pct_peak"} if rows else set()
            for r in rows:
                r["ms"] = _float_or_nan(r.get("ms"))
            result = dict(meta={k: rows[0][k] for k in meta_keys}, records=rows)
        else:
            with open(path) as f:
                result = json.load(f)
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError) as err:
        raise CannotCompare(f"{path} is not a results file from `rsscale kernels bench` ({' '.join(str(err).split())})") from None
    if not isinstance(result, dict) or not isinstance(result.get("records"), list) or not result["records"]:
        raise CannotCompare(f"{path} has no 'records' list; write it with `rsscale kernels bench`")
    for i, r in enumerate(result["records"]):
        missing = [k for k in RECORD_KEYS if not isinstance(r, dict) or k not in r]
        if missing:
            raise CannotCompare(f"{path}: record {i} lacks {', '.join(missing)}")
    result.setdefault("meta", {})
    if not isinstance(result["meta"], dict):
        raise CannotCompare(f"{path}: 'meta' is not a mapping")
    return result


def record_in_store(result: dict, path: str | None = None) -> None:
    """One kind="kernel" run; per record the metrics ms, GB/s or TFLOP/s and pct_peak, tagged
    with kernel, impl, shape, dtype and direction."""
    from rsscale.scaling.runtime.store import ResultsStore

    meta = result["meta"]
    metrics = []
    for r in result["records"]:
        tags = {k: r[k] for k in ("kernel", "impl", "shape", "dtype", "direction")}
        metrics += [("ms", r["ms"], None, tags), (r["unit"], r["rate"], None, tags), ("pct_peak", r["pct_peak"], None, tags)]
    store = ResultsStore(path)
    with store.run(kind="kernel", precision=meta["dtype"], kernels="triton", config=meta) as run:
        run.log_many(metrics)
    print(f"recorded {len(metrics)} metrics in the results store {store.path} (kind=kernel)")


# ---------------------------------------------------------------------------------------------
# Regression check (pure)
# ---------------------------------------------------------------------------------------------


def _key(r: dict) -> tuple:
    return (r["kernel"], r["impl"], r["shape"], r["dtype"], r["direction"])


def compare(baseline: list[dict], current: list[dict], threshold: float = 0.10, impl: str = "triton") -> list[dict]:
    """One row per baseline record of `impl`: ratio = current ms / baseline ms; verdict 'slower'
    when ratio > 1 + threshold, 'missing' when the current run lacks the record, else 'ok'."""
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"--threshold must be a finite number >= 0, got {threshold}")
    now = {_key(r): _timing(r, "current") for r in current}
    rows = []
    for r in baseline:
        if r["impl"] != impl:
            continue
        base_ms, cur_ms = _timing(r, "baseline"), now.get(_key(r))
        ratio = None if cur_ms is None else cur_ms / base_ms
        verdict = "missing" if ratio is None else ("slower" if ratio > 1 + threshold else "ok")
        rows.append(dict(kernel=r["kernel"], shape=r["shape"], dtype=r["dtype"], direction=r["direction"],
                         baseline_ms=base_ms, current_ms=cur_ms, ratio=ratio, verdict=verdict))
    if not rows:
        raise CannotCompare(f"the baseline has no {impl} records")
    return rows


def _float_or_nan(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _timing(r: dict, which: str) -> float:
    """A record's ms as a positive finite float, or CannotCompare naming the record."""
    ms = _float_or_nan(r["ms"])
    if not (math.isfinite(ms) and ms > 0):
        raise CannotCompare(f"{which} timing of {' '.join(map(str, _key(r)))} is {r['ms']!r}, not a positive finite number of ms")
    return ms


def check_devices(baseline_meta: dict, current_meta: dict, allow_mismatch: bool) -> None:
    """CannotCompare when the two results come from different (or unrecorded) devices, unless allowed."""
    base, cur = baseline_meta.get("device"), current_meta.get("device")
    if base and cur and base == cur:
        return
    why = f"baseline from {base or 'an unrecorded device'!r}, current run on {cur or 'an unrecorded device'!r}"
    if not allow_mismatch:
        raise CannotCompare(f"{why}; timings are only comparable on one device (--allow-device-mismatch compares anyway)")
    print(f"note: {why} (compared anyway: --allow-device-mismatch)")


def print_comparison(rows: list[dict], threshold: float) -> bool:
    """Prints the table; True when nothing regressed or went missing."""
    print(f"{'kernel':<11} {'shape':<28} {'dtype':<5} {'dir':<7} {'baseline ms':>11} {'current ms':>11} {'ratio':>6}  verdict")
    for r in rows:
        cur = "-" if r["current_ms"] is None else f"{r['current_ms']:.4f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"{r['kernel']:<11} {r['shape']:<28} {r['dtype']:<5} {r['direction']:<7} "
              f"{r['baseline_ms']:>11.4f} {cur:>11} {ratio:>6}  {r['verdict']}")
    bad = [r for r in rows if r["verdict"] != "ok"]
    print(f"{len(rows) - len(bad)}/{len(rows)} within {threshold:.0%} of the baseline")
    return not bad and bool(rows)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


@dataclass
class KernelsTest:
    """`rsscale kernels test` has no options: it runs the correctness table."""


@dataclass
class KernelsBench:
    """The options of `rsscale kernels bench`."""
    shapes: str = option("presets", "shape grid", choices=["presets", "quick"])
    dtype: str = option("bf16", "element type of the timed inputs", choices=list(DTYPES))
    out: str = option("reports/kernel_bench.json", "results file (.json or .csv)")
    store: bool = option(True, "do not record in the results store")
    allow_skip: bool = option(False, "exit 0 (with a SKIPPED line) when there is no GPU to time on")

    def __post_init__(self):
        check(self)


@dataclass
class KernelsCheck:
    """The options of `rsscale kernels check`."""
    baseline: str | None = option(None, "results file written by `rsscale kernels bench`", required=True)
    current: str | None = option(None, "compare this results file instead of re-running the benchmark")
    threshold: float = option(0.10, "allowed slowdown (0.10 = 10%%)", ge=0)
    allow_skip: bool = option(False, "exit 0 (with a SKIPPED line) when nothing could be compared")
    allow_device_mismatch: bool = option(False, "compare against a baseline from another device")

    def __post_init__(self):
        check(self)


ACTIONS = {  # sub-action -> (its options, its --help line)
    "test": (KernelsTest, "correctness of every kernel vs a float64 torch reference"),
    "bench": (KernelsBench, "time the kernels and their baselines (GPU)"),
    "check": (KernelsCheck, "fail when a kernel is slower than a committed baseline"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    for action, (tree, help_) in ACTIONS.items():
        add_options(sub.add_parser(action, help=help_, formatter_class=parser.formatter_class), tree)


def config_from_args(args) -> KernelsTest | KernelsBench | KernelsCheck:
    """The options of the sub-action `args.action`: defaults <- --config file <- flags."""
    return resolve(ACTIONS[args.action][0], args)


def _prepare_device() -> str:
    """'cuda', or 'cpu' with TRITON_INTERPRET=1 set before any kernel module is imported."""
    if torch.cuda.is_available():
        return "cuda"
    if "rsscale.kernels.fused_layer_norm" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("rsscale kernels: kernels were imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"


def main(args) -> int:
    config = config_from_args(args)
    if args.action == "check":
        return run_check(config)
    device = _prepare_device()
    if not run_correctness(device):
        return 1
    if args.action == "test":
        return 0
    if device == "cpu":
        return could_not("bench", f"timing needs a CUDA GPU and this machine has none (the correctness check above ran; "
                                  f"nothing written to {config.out})", config.allow_skip)
    result = run_bench(config.shapes, config.dtype)
    save_results(result, config.out)
    if config.store:
        record_in_store(result)
    return 0


def run_correctness(device: str) -> bool:
    print(f"correctness of the Triton kernels vs float64 torch ({'GPU' if device == 'cuda' else 'CPU, Triton interpreter'}):")
    if print_correctness(correctness_rows(device)):
        return True
    print("rsscale kernels: a kernel disagrees with its reference (see FAIL rows)", file=sys.stderr)
    return False


def could_not(action: str, why: str, allow_skip: bool) -> int:
    """A command that could not do its job says why and exits EXIT_CANNOT_COMPARE, never 0 as if it
    had; --allow-skip makes that an explicit SKIPPED and exit 0."""
    if allow_skip:
        print(f"kernels {action} SKIPPED (--allow-skip): {why}")
        return 0
    print(f"rsscale kernels {action}: {why}", file=sys.stderr)
    return EXIT_CANNOT_COMPARE


def run_check(args: KernelsCheck) -> int:
    """`rsscale kernels check`: 0 within the threshold, 1 slower/missing/incorrect, 3 could not compare."""
    try:
        baseline = load_results(args.baseline)
        if args.current:
            current = load_results(args.current)
        else:
            device = _prepare_device()
            if not run_correctness(device):
                return EXIT_SLOWER
            if device == "cpu":
                raise CannotCompare("timing needs a CUDA GPU and this machine has none (the correctness check above ran)")
            meta = baseline["meta"]
            current = run_bench(meta.get("shapes", "presets"), meta.get("dtype", "bf16"))
        check_devices(baseline["meta"], current["meta"], args.allow_device_mismatch)
        rows = compare(baseline["records"], current["records"], args.threshold)
    except CannotCompare as err:
        return could_not("check", f"could not compare: {err}", args.allow_skip)
    return 0 if print_comparison(rows, args.threshold) else EXIT_SLOWER


if __name__ == "__main__":  # as `rsscale kernels ...`
    from rsscale.scaling.runtime.cli import main as cli_main

    sys.exit(cli_main(["kernels", *sys.argv[1:]]))
