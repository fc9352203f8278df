"""The front door across commands, as a new user meets it: out-of-range numbers are one-line
errors in every command, Ctrl-C in any command is one line, --help shows the defaults, and a
CPU-only install leaves DALI out as the README says."""

from __future__ import annotations

import configparser
import pathlib

import pytest

from rsscale.scaling.runtime.cli import main as cli
from rsscale.scaling.spec.config import CPU_LADDER


def _one_error_line(capsys, *needles):
    """The command wrote one 'error:' line naming every needle, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err
    assert "Traceback" not in err


# ------------------------------------------------------------------ numbers that make no sense
@pytest.mark.parametrize("argv, flag", [
    (["bench", "--steps", "0", "--no-record"], "--steps"),
    (["bench", "--global-batch", "-8", "--no-record"], "--global-batch"),
    (["profile", "--model", "tiny", "--gpus", "2", "--memory-gb", "-5"], "--memory-gb"),
    (["profile", "--model", "tiny", "--gpus", "2", "--efficiency", "1.5"], "--efficiency"),
    (["finetune", "--task", "seg", "--dataset", "synthetic", "--steps", "0"], "--steps"),
    (["finetune", "--task", "seg", "--dataset", "synthetic", "--log-every", "0"], "--log-every"),
    (["finetune", "--task", "seg", "--dataset", "synthetic", "--lr", "nan"], "--lr"),
])
def test_numeric_flags_out_of_range_are_one_line_errors(argv, flag, capsys):
    assert cli(argv) == 2
    _one_error_line(capsys, flag)




def test_keyboard_interrupt_in_any_command_is_one_line(monkeypatch, capsys):
    from rsscale.scaling.spec import models

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "main", interrupted)
    assert cli(["models"]) == 130
    assert capsys.readouterr().err == "rsscale models: interrupted\n"




ROOT = pathlib.Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("argv, shown", [
    (["demo"], ["pretraining steps per model (default: 30)", f"presets to pretrain (default: {','.join(CPU_LADDER)})"]),
    (["finetune"], ["--lr LR peak learning rate (default: 0.001)", "--warmup WARMUP linear warmup steps, then cosine to --min-lr at the last step (default: 50)", "layer-wise lr decay (1 = none) (default: 0.75)"]),
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
