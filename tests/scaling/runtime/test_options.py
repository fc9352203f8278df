"""scaling/runtime/options.py: one dataclass tree gives a command its flags, help, ranges,
choices, nested config file, --print-config and the argv that rebuilds it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest
import yaml

from rsscale.scaling.runtime.cli import main
from rsscale.scaling.runtime.options import add_options, as_config, check, defaults_with, leaves, option, resolve, section, to_argv


@dataclass
class Inner:
    lr: float = option(1e-3, "peak learning rate", gt=0)
    warmup: int = option(5, "warmup steps", ge=0)
    overlap: bool = option(True, "reduce after backward")


@dataclass
class Outer:
    model: str | None = option(None, "preset", required=True)
    optim: Inner = section(Inner, warmup=50)
    steps: int = option(10, "steps", ge=1)
    sizes: list[int] | None = option(None, "sizes to try (repeatable)", ge=1)
    mode: str = option("a", "a or b", choices=("a", "b"))
    sp: bool = option(False, "switch on")
    beta: float = option(0.9, "file only", cli=False, ge=0, lt=1)

    def __post_init__(self):
        check(self)


def _parse(argv, config=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_options(parser, Outer)
    return parser, parser.parse_args(argv + (["--config", str(config)] if config else []))


def test_flags_help_and_defaults_come_from_the_fields():
    parser, args = _parse(["--model", "m"])
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings} - {"-h", "--config"}
    assert flags == {"--model", "--lr", "--warmup", "--no-overlap", "--steps", "--sizes", "--mode", "--sp"}  # beta: file only
    assert vars(args) == {"config": None, "model": "m"}  # absent flags stay absent, so a file's values survive
    text = " ".join(parser.format_help().split())
    assert "warmup steps (default: 50)" in text  # the section's own default, not the field's
    c = resolve(Outer, args)
    assert (c.model, c.optim.warmup, c.optim.overlap, c.sizes) == ("m", 50, True, None)


def test_file_then_flags_negation_and_lists(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\noptim: {lr: 0.5, overlap: false}\nsizes: [2, 4]\nsteps: 3\n")
    c = resolve(Outer, _parse(["--steps", "7", "--lr", "0.25"], path)[1])
    assert (c.optim.lr, c.optim.overlap, c.sizes, c.steps) == (0.25, False, [2, 4], 7)
    c = resolve(Outer, _parse(["--model", "m", "--no-overlap", "--sizes", "8", "--sizes", "16", "--sp"])[1])
    assert (c.optim.overlap, c.sizes, c.sp) == (False, [8, 16], True)


@pytest.mark.parametrize("argv, text, message", [
    (["--model", "m", "--steps", "0"], None, r"--steps \(config key 'steps'\) must be >= 1, got 0"),
    (["--model", "m", "--lr", "-1"], None, r"--lr \(config key 'optim.lr'\) must be > 0"),
    (["--model", "m", "--sizes", "0"], None, r"--sizes \(config key 'sizes'\) must be >= 1"),
    (["--model", "m"], "beta: 1.5\n", r"config key 'beta' must be >= 0 and < 1"),
    (["--model", "m"], "mode: c\n", r"--mode \(config key 'mode'\) must be one of a, b"),
    (["--model", "m"], "lr: 0.1\n", r"lr \(belongs under 'optim:', as optim.lr\)"),
    (["--model", "m"], "optim: {lr: fast}\n", r"key 'optim.lr' must be float"),
    ([], None, r"--model is required \(or the key 'model' in a --config file\)"),
])
def test_bad_values_are_one_line_naming_flag_and_key(argv, text, message, tmp_path):
    path = None
    if text:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        resolve(Outer, _parse(argv, path)[1])
    assert "\n" not in str(e.value)


def test_a_choice_outside_the_list_is_refused_by_the_parser_too(capsys):
    with pytest.raises(SystemExit):
        _parse(["--model", "m", "--mode", "c"])
    assert "argument --mode: invalid choice: 'c'" in capsys.readouterr().err


def test_print_config_and_argv_round_trip(tmp_path):
    c = Outer(model="m", optim=Inner(lr=0.5, warmup=50, overlap=False), sizes=[2, 4], mode="b", sp=True)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(as_config(c)))
    assert resolve(Outer, _parse([], path)[1]) == c
    argv = to_argv(c)
    assert argv == ["--model", "m", "--lr", "0.5", "--no-overlap", "--sizes", "2", "--sizes", "4", "--mode", "b", "--sp"]
    assert resolve(Outer, _parse(argv)[1]) == c
    with pytest.raises(ValueError, match="config key 'beta' = 0.5 has no command-line flag"):
        to_argv(Outer(model="m", beta=0.5))


def test_two_leaves_with_one_flag_are_refused():
    @dataclass
    class Twice:
        a: Inner = section(Inner)
        b: Inner = section(Inner)

    with pytest.raises(TypeError, match="Twice: b.lr and a.lr would both be --lr"):
        add_options(argparse.ArgumentParser(), Twice)
    assert [leaf.path for leaf in leaves(Twice)][:3] == ["a.lr", "a.warmup", "a.overlap"]




@pytest.mark.parametrize("argv", [
    ["pretrain", "--model", "small", "--tp", "2", "--lr", "3e-4", "--recompute", "selective", "--sp"],
    ["bench", "--model", "small", "--steps", "3", "--distributed-optimizer"],
    ["finetune", "--task", "det", "--dataset", "synthetic", "--no-rel-pos", "--layer-decay", "0.9", "--tp", "2"],
    ["profile", "--model", "small", "--gpus", "2", "--micro-batch", "4", "--micro-batch", "8", "--no-probe"],
    ["calibrate", "--model", "tiny", "--nproc", "2", "--rounds", "3"],
])
def test_the_printed_config_reads_back_to_itself(argv, tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert main(argv + ["--print-config", str(first)]) == 0
    assert main([argv[0], "--config", str(first), "--print-config", str(second)]) == 0
    assert yaml.safe_load(first.read_text()) == yaml.safe_load(second.read_text())


def test_printed_values_are_the_resolved_ones(tmp_path, capsys):
    assert main(["pretrain", "--model", "small", "--tp", "2", "--print-config"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["model"] == "small" and tree["parallel"]["tp"] == 2 and tree["optim"]["lr"] == 1e-3  # the default, resolved
    assert main(["finetune", "--task", "seg", "--dataset", "synthetic", "--no-rel-pos", "--print-config"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["rel_pos"] is False and tree["task"] == "seg" and tree["parallel"]["micro_batch"] == 8  # global / dp, resolved


@pytest.mark.parametrize("text, rel_pos", [("rel-pos: true\n", True), ("rel_pos: false\n", False), ("", True)])
def test_a_negated_switch_in_a_config_file_keeps_its_meaning(text, rel_pos, tmp_path):
    """The key of a True-by-default switch is its option's name (`rel_pos`, flag `--no-rel-pos`):
    `rel_pos: true` keeps relative position bias on."""
    path = tmp_path / "f.yaml"
    path.write_text("task: seg\ndataset: synthetic\nparallel: {global_batch: 4}\n" + text)
    out = tmp_path / "o.yaml"
    assert main(["finetune", "--config", str(path), "--print-config", str(out)]) == 0
    tree = yaml.safe_load(out.read_text())
    assert tree["rel_pos"] is rel_pos and tree["parallel"]["micro_batch"] == 4


def test_a_group_size_below_two_is_refused_by_calibrate_before_measuring(capsys):
    assert main(["calibrate", "--nproc", "1"]) == 2
    assert "--nproc (config key 'nproc') must be >= 2, got 1" in capsys.readouterr().err


def test_a_positional_comes_from_the_line_or_the_file(tmp_path):
    @dataclass
    class WithRun:
        run: str | None = option(None, "run folder", positional=True, required=True)
        steps: int = option(3, "steps", ge=1)

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_options(parser, WithRun)
    assert resolve(WithRun, parser.parse_args(["runs/a", "--steps", "4"])) == WithRun("runs/a", 4)
    path = tmp_path / "c.yaml"
    path.write_text("run: runs/b\n")
    assert resolve(WithRun, parser.parse_args(["--config", str(path)])).run == "runs/b"
    assert resolve(WithRun, parser.parse_args(["runs/c", "--config", str(path)])).run == "runs/c"  # the line wins
    with pytest.raises(ValueError, match=r"^the argument RUN is required \(or the key 'run' in a --config file\)$"):
        resolve(WithRun, parser.parse_args(["--steps", "2"]))
    assert to_argv(WithRun("runs/a", 4)) == ["runs/a", "--steps", "4"]
    assert "RUN" in parser.format_usage()


def test_bounds_hidden_flags_and_metavars(tmp_path):
    # defined here, not at import: option() runs inside the test (mutation testing switches its code per test)
    @dataclass
    class Knobs:
        ratio: float = option(0.5, "a fraction below one", ge=0, lt=1)
        share: float = option(1.0, "at most one", le=1)
        secret: int = option(0, "an internal flag", hidden=True)
        where: str = option("out", "output folder", metavar="DIR")

        def __post_init__(self):
            check(self)

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_options(parser, Knobs)
    text = parser.format_help()
    assert "--secret" not in text and "--ratio RATIO" in text and "--where DIR" in text
    assert resolve(Knobs, parser.parse_args(["--secret", "3", "--ratio", "0.25"])) == Knobs(0.25, 1.0, 3)  # hidden, still accepted
    with pytest.raises(ValueError, match=r"^--ratio \(config key 'ratio'\) must be >= 0 and < 1, got 1.0$"):
        resolve(Knobs, parser.parse_args(["--ratio", "1.0"]))
    with pytest.raises(ValueError, match=r"^--share \(config key 'share'\) must be <= 1, got 1.5$"):
        resolve(Knobs, parser.parse_args(["--share", "1.5"]))


def test_a_files_keys_are_named_by_their_dotted_paths():
    tree, given = defaults_with(Outer, {"optim": {"lr": 0.5}, "steps": 4}, "c.yaml")
    assert given == {"optim.lr", "steps"} and tree["optim"]["lr"] == 0.5 and tree["optim"]["warmup"] == 50


def test_a_leaf_must_be_an_option():
    @dataclass
    class Plain:
        steps: int = 3

    with pytest.raises(TypeError, match=r"Plain\.steps is not an option\(\.\.\.\) or a section"):
        leaves(Plain)


def test_a_printed_config_is_read_by_every_command_that_shares_its_sections(tmp_path, capsys):
    """pretrain's printed file runs bench on the same layout and compute (pretrain's own keys left
    out, said in one line), and bench's runs pretrain; the shared sections stay strict, and a file
    that no command wrote is checked key by key."""
    written = tmp_path / "pretrain.yaml"
    assert main(["pretrain", "--model", "small", "--tp", "2", "--sp", "--recompute", "full", "--print-config", str(written)]) == 0
    assert yaml.safe_load(written.read_text())["command"] == "pretrain"
    capsys.readouterr()
    assert main(["bench", "--config", str(written), "--print-config"]) == 0
    out, err = capsys.readouterr()
    bench = yaml.safe_load(out)
    assert (bench["command"], bench["model"], bench["parallel"]["tp"], bench["parallel"]["sp"], bench["compute"]["recompute"]) == (
        "bench", "small", 2, True, "full")
    assert "was written by `rsscale pretrain`; its keys" in err and "optim" in err and "checkpointing" in err
    from_bench = tmp_path / "bench.yaml"
    from_bench.write_text(out)
    assert main(["pretrain", "--config", str(from_bench), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["parallel"]["tp"] == 2
    typo = tmp_path / "typo.yaml"
    typo.write_text(written.read_text().replace("  sp: true", "  spp: true"))
    assert main(["bench", "--config", str(typo), "--print-config"]) == 2
    assert "spp" in capsys.readouterr().err
    hand = tmp_path / "hand.yaml"
    hand.write_text("model: small\noptim: {lr: 0.1}\n")
    assert main(["bench", "--config", str(hand), "--print-config"]) == 2
    assert "unknown config key(s) optim" in capsys.readouterr().err
