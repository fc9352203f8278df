"""`rsscale` command line. Each sub-command lives in the module that does the work; that module
exposes `add_arguments(parser)` and `main(args) -> int`, and where its options are a dataclass tree
(scaling/runtime/options.py) also `config_from_args(args)`: then the command takes `--config FILE`
(nested like the tree) and `--print-config`. Modules are imported only when their command runs, so
`rsscale --help` stays fast and optional dependencies stay optional."""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import warnings

from rsscale.scaling.runtime.launch import interrupted_exit_code, on_signals, raise_interrupted
from rsscale.scaling.runtime.log import setup_logging
from rsscale.scaling.runtime.options import as_config

COMMANDS = {
    "models": ("rsscale.scaling.spec.models", "list model presets with exact parameter counts and FLOPs"),
    "data": ("rsscale.scaling.data.data", "write the bundled procedural aerial-scene dataset to disk"),
    "pretrain": ("rsscale.scaling.train.pretrain", "MAE pretraining (launch with torchrun for TP/PP/DP layouts)"),
    "demo": ("rsscale.benchmarks.reporting.demo", "one-command demo: data, tiny-ladder pretraining, scaling report"),
    "finetune": ("rsscale.finetune.finetune", "fine-tune a pretrained encoder for segmentation or rotated detection"),
    "evaluate": ("rsscale.finetune.evaluate", "score a fine-tuned run's saved model again (its data and options, or others)"),
    "predict": ("rsscale.finetune.predict", "apply a fine-tuned run's model to new images of any size: masks or DOTA boxes"),
    "bench": ("rsscale.benchmarks.measurement.bench", "measure throughput / memory / MFU of a preset and layout"),
    "profile": ("rsscale.benchmarks.profile", "rank parallel layouts with the analytic memory/FLOP model"),
    "calibrate": ("rsscale.benchmarks.measurement.calibrate", "measure GEMM/attention/LayerNorm/collective speeds of this device for the time model"),
    "gpu-check": ("rsscale.benchmarks.measurement.gpu_check", "run every GPU-only check (kernels, benches, fp16, calibration) into one summary"),
    "kernels": ("rsscale.benchmarks.measurement.kernels", "Triton kernel correctness, speed benchmark and regression check"),
    "study": ("rsscale.benchmarks.reporting.study", "a resumable scaling study: model sizes x budgets x data, held-out loss, fits"),
    "report": ("rsscale.benchmarks.reporting.report", "scaling report (tables, power-law fits, plots) from the results store"),
    "convert": ("rsscale.scaling.train.convert", "import MAE/timm ViT weights into an rsscale checkpoint, or export one"),
}

AUTO_LAYOUT = "rsscale.benchmarks.autolayout"  # named as a string like the commands: imported only when asked for

class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help appends "(default: X)" to each option whose default says something: not None, a
    bool, an empty value or a hidden one, nor where the help already names its default."""

    def _format_action(self, action):
        default, help_ = action.default, action.help or ""
        if (action.option_strings and action.help is not argparse.SUPPRESS and default is not argparse.SUPPRESS
                and default not in (None, "", [], ()) and not isinstance(default, bool) and "default" not in help_.lower()):
            action = copy.copy(action)
            action.help = f"{help_} (default: %(default)s)".lstrip()
        return super()._format_action(action)


def print_config(data: dict, dest: str) -> int:
    """`--print-config`: `data` as YAML on stdout ("-") or into a file."""
    import yaml

    text = yaml.safe_dump(data, sort_keys=False)
    if dest == "-":
        print(text, end="")
    else:
        with open(dest, "w") as f:
            f.write(text)
        print(f"wrote {dest}", file=sys.stderr)
    return 0


def _action_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that take a command's options: each sub-action's (`rsscale kernels check`), or the command's own."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(subs[0].choices.values()) if subs else [parser]


def _usage() -> str:
    lines = ["usage: rsscale <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`rsscale <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with on_signals(raise_interrupted):  # SIGTERM as Ctrl-C: one line, never a traceback nor a silent kill
        try:
            return _run(argv)
        except KeyboardInterrupt as e:
            if int(os.environ.get("RANK", 0)) == 0:  # one line per run, not one per rank
                print(f"rsscale {argv[0]}: {str(e) or 'interrupted'}", file=sys.stderr)
            return interrupted_exit_code(e)


def _run(argv: list[str]) -> int:
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
    setup_logging()  # rank-aware progress lines on stderr
    if "--layout" in rest and name != "profile":  # `--layout auto`: the profiler's choice replaces it by explicit layout flags
        try:
            rest = importlib.import_module(AUTO_LAYOUT).resolve(name, rest)
        except (ValueError, FileNotFoundError) as e:
            print(f"rsscale {name}: error: {e}", file=sys.stderr)
            return 2
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"rsscale {name}", description=help_, formatter_class=DefaultsHelpFormatter)
    module.add_arguments(parser)
    if hasattr(module, "config_from_args"):
        for command_parser in _action_parsers(parser):
            command_parser.add_argument("--config", help="YAML or TOML file nested like the options (as --print-config writes it); "
                                        "flags override it")
            command_parser.add_argument("--print-config", nargs="?", const="-", default=None, metavar="FILE",
                                        help="write the resolved options as a YAML config file that --config accepts back "
                                             "(to FILE, or stdout), and exit")
    args = parser.parse_args(rest)
    args.command_argv = rest  # what a torchrun relaunch (scaling/runtime/launch.py) passes on to the ranks
    args.command = " ".join([name] + ([args.action] if getattr(args, "action", None) else []))  # `kernels check`: its own tree
    try:
        if getattr(args, "print_config", None) is not None:  # the file names its command: another one reads what it shares
            return print_config({"command": args.command, **as_config(module.config_from_args(args))}, args.print_config)
        return int(module.main(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # bad input: one clear line, no traceback
        if os.environ.get("RSSCALE_TRACEBACK"):
            raise
        print(f"rsscale {name}: error: {e}\n(set RSSCALE_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
