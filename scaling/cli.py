"""`rsscale` command line. Each sub-command lives in the module that does the work; that module
exposes `add_arguments(parser)` and `main(args) -> int`. Modules are imported only when their
command runs, so `rsscale --help` stays fast and optional dependencies stay optional."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

COMMANDS = {
    "models": ("rsscale.scaling.config", "list model presets with exact parameter counts and FLOPs"),
    "data": ("rsscale.scaling.synthetic", "write the bundled procedural aerial-scene dataset to disk"),
    "pretrain": ("rsscale.scaling.train", "MAE pretraining (launch with torchrun for TP/PP/DP layouts)"),
    "demo": ("rsscale.reports.demo", "one-command demo: data, tiny-ladder pretraining, scaling report"),
    "finetune": ("rsscale.finetune.train", "fine-tune a pretrained encoder for segmentation or rotated detection"),
    "bench": ("rsscale.benchmarks.harness", "measure throughput / memory / MFU of a preset and layout"),
    "profile": ("rsscale.benchmarks.profile", "rank parallel layouts with the analytic memory/FLOP model"),
    "calibrate": ("rsscale.benchmarks.calibrate", "measure GEMM/attention/LayerNorm/collective speeds of this device for the time model"),
    "gpu-check": ("rsscale.benchmarks.gpu_check", "run every GPU-only check (kernels, benches, fp16, calibration) into one summary"),
    "kernels": ("rsscale.benchmarks.kernel_bench", "Triton kernel correctness, speed benchmark and regression check"),
    "report": ("rsscale.reports.report", "scaling report (tables, power-law fits, plots) from the results store"),
}


def _usage() -> str:
    lines = ["usage: rsscale <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`rsscale <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # megatron-core warns at import that Apex/Transformer Engine are absent; its torch fallbacks
    # are what we use on CPU, so the warning is noise on every command.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rsscale: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"rsscale {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # bad input: one clear line, no traceback
        if os.environ.get("RSSCALE_TRACEBACK"):
            raise
        print(f"rsscale {name}: error: {e}\n(set RSSCALE_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
