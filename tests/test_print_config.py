"""`--print-config`: every command with a config file writes its resolved options as YAML that its
`--config` reads back to the same options (a fixed point), without running anything."""

from __future__ import annotations

import pytest
import yaml

from rsscale.scaling.runtime.cli import main


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
