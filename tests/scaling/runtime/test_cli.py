"""The front door: `rsscale` dispatches sub-commands and the models table shows exact counts."""

import subprocess
import sys

import pytest

from rsscale.scaling.runtime import cli
from rsscale.scaling.spec.config import CPU_LADDER, PAPER_PRESETS, PRESETS, ViTConfig, get_preset, mae_forward_flops, param_count


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_takes_a_config_file_and_prints_its_own(name, capsys):
    """Each command's options are one dataclass tree: --help offers --config and --print-config
    (on each action of `kernels`), and its module resolves the tree."""
    import importlib

    module = importlib.import_module(cli.COMMANDS[name][0])
    assert hasattr(module, "config_from_args"), name
    argv = [name, "check"] if name == "kernels" else [name]
    with pytest.raises(SystemExit):
        cli.main(argv + ["--help"])
    text = capsys.readouterr().out
    assert "--config CONFIG" in text and "--print-config [FILE]" in text, name


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_models_table_via_entry_point():
    out = subprocess.run([sys.executable, "-m", "rsscale.scaling.runtime.cli", "models"], capture_output=True, text=True, check=True).stdout
    assert "2,419,181,568" in out  # g12x4 encoder: the paper's 2.4B
    assert "85,798,656" in out  # b12x1: ViT-B/16 without head, timm-style
    assert all(name in out for name in CPU_LADDER + PAPER_PRESETS)  # PRESETS itself may hold a model an earlier test in this worker registered


def test_paper_sizes_within_one_percent():
    published = {"b12x1": 86e6, "l12x4": 605.26e6, "h12x4": 1.3e9, "g12x4": 2.4e9}
    for name, n in published.items():
        assert abs(param_count(PRESETS[name]) / n - 1) < 0.05, name
    assert abs(param_count(PRESETS["l12x4"]) / 605.26e6 - 1) < 0.001


def test_flops_hand_computed_for_one_block():
    cfg = ViTConfig("t", width=8, heads=2, mlp=16, depth=1, img_size=8, patch_size=4, dec_width=4,
                    dec_depth=1, dec_heads=1, mask_ratio=0.5)
    # 4 patches, 2 visible + cls = 3 encoder tokens.
    n, d, m = 3, 8, 16
    by_hand = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * m
    assert mae_forward_flops(cfg)["encoder"] == by_hand
    assert mae_forward_flops(cfg)["patch_embed"] == 2 * 4 * 48 * 8


def test_bad_config_and_unknown_preset_are_clear():
    with pytest.raises(ValueError, match="not divisible by heads"):
        ViTConfig("bad", width=10, heads=3, mlp=8)
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny"):
        get_preset("huge")


@pytest.mark.parametrize("argv, message", [
    (["report", "--results", "{tmp}/missing.db"], "no results store at"),
    (["finetune", "--task", "det", "--dataset", "loveda", "--data", "{tmp}"], "is not a det benchmark"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    from rsscale.scaling.runtime.cli import main

    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "missing.db").exists()  # a typo in --results does not create an empty store
