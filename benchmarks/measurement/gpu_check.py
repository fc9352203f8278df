"""`rsscale gpu-check`: everything that needs a GPU, in one command, into one Markdown summary.

    rsscale gpu-check --out reports/gpu/          # on a CUDA machine: about 5-8 minutes on one GPU
    rsscale gpu-check --dry-run                   # list the steps and their commands, run nothing

Steps (each a subprocess with its own time limit; a step that fails or times out is marked FAIL in
the summary with the tail of its output, the others still run, and the command exits 1):
  kernels-test     Triton kernels vs float64 torch (`rsscale kernels test`)
  kernels-bench    kernels and their baselines (torch eager, torch.compile, SDPA flash) on the
                   presets' full shapes (`rsscale kernels bench`), saved as OUT/kernel_bench.json
                   (commit it as a baseline for `rsscale kernels check`)
  bench-b12x1, bench-l12x4   MAE training steps in bf16 on one GPU (`rsscale bench --trace`):
                   img/s, TFLOP/s, MFU (against the bf16 matmul peak measured in the same run),
                   allocator peak vs counted (benchmarks/prediction/count.py) vs analytic bytes, and the
                   predicted step time beside the measured one; traces under OUT/trace-<model>/
  peer-small, peer-b12x1   ours vs the PyTorch-native peer (`rsscale bench --peer torch`, bf16,
                   one GPU: the same model, weights and batches; step times, ratio, first-step losses)
  fp16             b12x1 in fp16 with dynamic loss scaling: finite losses, steps skipped, final scale
  calibrate        `rsscale calibrate` on this GPU (GEMM / attention / LayerNorm throughput)
The summary OUT/SUMMARY.md names the device, torch / triton / megatron-core versions and the commit.

Exit codes: 0 every step passed; 1 a step failed; 3 (EXIT_NO_GPU) there is no CUDA device here:
the steps are listed and nothing is run, so a CPU machine never reports a GPU check as passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from rsscale.scaling.runtime.options import add_options, check, option, resolve

EXIT_NO_GPU = 3

BENCHES = {  # model -> (micro-batch, global batch): sizes that fill an 80 GB GPU without recompute
    "b12x1": (128, 128),
    "l12x4": (32, 32),
}


PEERS = {"small": 64, "b12x1": 64}  # model -> batch of the PyTorch-native comparison (both models resident on the GPU)
STEP_NAMES = ("kernels-test", "kernels-bench", *(f"bench-{m}" for m in BENCHES), *(f"peer-{m}" for m in PEERS), "fp16", "calibrate")  # steps()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rsscale.scaling.runtime.cli", *args]


def steps(out: str) -> list[dict]:
    """The checks: name, command, time limit (s), and the JSON file the step leaves (if any)."""
    todo = [dict(name="kernels-test", cmd=_cli("kernels", "test"), timeout=90),
            dict(name="kernels-bench", cmd=_cli("kernels", "bench", "--out", os.path.join(out, "kernel_bench.json"), "--no-store"), timeout=180)]
    for model, (mb, gb) in BENCHES.items():
        summary = os.path.join(out, f"bench-{model}.json")
        todo.append(dict(name=f"bench-{model}", summary=summary, timeout=120,
                         cmd=_cli("bench", "--model", model, "--precision", "bf16", "--kernels", "triton", "--micro-batch", str(mb),
                                  "--global-batch", str(gb), "--warmup", "3", "--steps", "10", "--trace", os.path.join(out, f"trace-{model}"),
                                  "--summary-json", summary, "--results", os.path.join(out, "results.db"))))
    for model, mb in PEERS.items():
        summary = os.path.join(out, f"peer-{model}.json")
        todo.append(dict(name=f"peer-{model}", summary=summary, timeout=120,
                         cmd=_cli("bench", "--model", model, "--precision", "bf16", "--micro-batch", str(mb), "--global-batch", str(mb),
                                  "--warmup", "3", "--steps", "7", "--peer", "torch", "--summary-json", summary,
                                  "--results", os.path.join(out, "results.db"))))
    todo.append(dict(name="fp16", cmd=_cli("gpu-check", "--fp16-step", os.path.join(out, "fp16.json")),
                     summary=os.path.join(out, "fp16.json"), timeout=90))
    todo.append(dict(name="calibrate", cmd=_cli("calibrate", "--results", os.path.join(out, "results.db"), "--json", os.path.join(out, "calibration.json")),
                     summary=os.path.join(out, "calibration.json"), timeout=120))
    return todo


def fp16_step(path: str, model: str = "b12x1", n: int = 20) -> None:
    """Train `n` fp16 steps with the trainer's loss scaler; write losses, skips and the scale."""
    import math

    from rsscale.scaling.parallel.state import destroy_parallel
    from rsscale.scaling.spec.layout import Layout
    from rsscale.scaling.spec.run import Compute, Recording
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    tr = Trainer.build(TrainConfig(model=model, parallel=Layout(micro_batch=64, global_batch=64), compute=Compute(precision="fp16"), data="random",
                                   recording=Recording(record=False), steps=n))
    recs = [tr.train_step() for _ in range(n)]
    destroy_parallel()
    losses = [r["loss"] for r in recs]
    result = {"model": model, "steps": n, "losses": losses, "skipped": sum(r["skipped"] for r in recs), "final_scale": recs[-1]["loss_scale"]}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    if not all(math.isfinite(x) for x in losses) or result["skipped"] == n:
        raise SystemExit(f"fp16 check failed: losses {losses[0]:.4f} -> {losses[-1]:.4f}, {result['skipped']}/{n} steps skipped")


def _environment() -> dict:
    import torch  # noqa: F401 - so the store's environment() names the GPU

    from rsscale.scaling.runtime.store import environment

    return environment()


def _bench_rows(s: dict) -> list[str]:
    gib = 2**30
    if "peer_step_time_median_s" in s:
        return [f"| step without drawing the batch: ours / native ({s['peer_kind']}, {s['peer_optimizer']} AdamW) | "
                f"{s['ours_step_no_data_median_s']:.4f} s / {s['peer_step_time_median_s']:.4f} s |",
                f"| ratio ours / native | {s['ours_over_peer_step_time']:.3f} |",
                f"| first-step loss ours / native | {s['first_step_loss_ours']:.6f} / {s['first_step_loss_peer']:.6f} |"]
    predicted_step = s["global_batch"] / s["predicted_images_per_s"] if s.get("predicted_images_per_s") else float("nan")
    return [f"| img/s | {s['images_per_s']:.1f} |", f"| TFLOP/s (all devices) | {s['tflops']:.1f} |",
            f"| MFU (vs measured bf16 matmul peak {s['peak_tflops_used']:.0f} TFLOP/s) | {100 * s['mfu']:.1f} % |",
            f"| step time measured / predicted (analytic) | {s['step_time_median_s']:.4f} s / {predicted_step:.4f} s |",
            f"| peak allocated / counted / analytic | {s['peak_mem_bytes'] / gib:.2f} / {s.get('counted_mem_bytes', float('nan')) / gib:.2f} / "
            f"{s['predicted_mem_bytes'] / gib:.2f} GiB |"]


def write_summary(out: str, results: list[dict], env: dict) -> str:
    lines = ["# rsscale gpu-check", "", f"device: {env.get('device')}; torch {env.get('torch_version')}, triton {env.get('triton_version')}, "
             f"megatron-core {env.get('mcore_version')}; commit {env.get('git_commit')}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| step | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} |" for r in results]
    for r in results:
        lines += ["", f"## {r['name']}: {r['status']}", "", f"`{' '.join(r['cmd'][2:])}`", ""]
        data = r.get("data")
        if data and r["name"].startswith(("bench-", "peer-")):
            data["global_batch"] = BENCHES[r["name"][6:]][1]
            lines += ["| quantity | value |", "| --- | --- |"] + _bench_rows(data)
        elif data:
            lines += ["```", json.dumps(data, indent=1)[:3000], "```"]
        if r["status"] != "PASS" or not data:
            lines += ["```", r["tail"], "```"]
    path = os.path.join(out, "SUMMARY.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def run_step(step: dict) -> dict:
    t0 = time.time()
    try:
        proc = subprocess.run(step["cmd"], capture_output=True, text=True, timeout=step["timeout"])
        status = "PASS" if proc.returncode == 0 else f"FAIL (exit {proc.returncode})"
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        status, tail = f"FAIL (timeout {step['timeout']} s)", str(e.stdout or "")[-3000:]
    data = None
    if step.get("summary") and os.path.isfile(step["summary"]):
        with open(step["summary"]) as f:
            data = json.load(f)
    if status == "PASS" and step.get("summary") and data is None:
        status = "FAIL (no result file)"
    return {**step, "status": status, "tail": tail, "seconds": time.time() - t0, "data": data}


@dataclass
class GpuCheckConfig:
    """Every option of `rsscale gpu-check`."""
    out: str = option("reports/gpu", "folder for SUMMARY.md, kernel baseline, traces, results store")
    dry_run: bool = option(False, "list the steps and exit 0 without running them")
    only: list[str] | None = option(None, f"run only this step (repeatable): {', '.join(STEP_NAMES)}", choices=STEP_NAMES)
    fp16_step: str | None = option(None, "(the fp16 step's own subprocess) train fp16 steps and write their JSON here", hidden=True)

    def __post_init__(self):
        check(self)


def add_arguments(parser) -> None:
    add_options(parser, GpuCheckConfig)


def config_from_args(args) -> GpuCheckConfig:
    return resolve(GpuCheckConfig, args)


def main(args) -> int:
    args = config_from_args(args)
    if args.fp16_step:
        fp16_step(args.fp16_step)
        return 0
    todo = [s for s in steps(args.out) if not args.only or s["name"] in args.only]
    import torch

    if args.dry_run or not torch.cuda.is_available():
        print(f"rsscale gpu-check would run {len(todo)} steps into {args.out}/:")
        for s in todo:
            print(f"  {s['name']:<14} (limit {s['timeout']:>3} s)  {' '.join(s['cmd'][2:])}")
        if args.dry_run:
            return 0
        print(f"no CUDA device here: nothing was run (exit code {EXIT_NO_GPU})", file=sys.stderr)
        return EXIT_NO_GPU
    os.makedirs(args.out, exist_ok=True)
    results = []
    for s in todo:
        print(f"[gpu-check] {s['name']} ...", flush=True)
        results.append(run_step(s))
        print(f"[gpu-check] {s['name']}: {results[-1]['status']} ({results[-1]['seconds']:.0f} s)", flush=True)
    path = write_summary(args.out, results, _environment())
    print(f"[gpu-check] summary: {path}")
    return 0 if all(r["status"] == "PASS" for r in results) else 1
