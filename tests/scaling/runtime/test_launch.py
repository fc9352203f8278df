"""The shared launcher, layout flags and config files (scaling/runtime/launch.py, layout.py,
config_file.py), as every command that trains or measures uses them."""

from __future__ import annotations

import argparse
import sys

import pytest

from rsscale.scaling.runtime import launch
from rsscale.scaling.runtime.cli import main as cli


def test_launch_flags_are_stripped_in_both_forms():
    argv = ["--model", "tiny", "--nproc", "4", "--nnodes=2", "--node-rank", "1", "--rdzv-endpoint=h:29500", "--tp", "2"]
    assert launch.strip_launch_flags(argv) == ["--model", "tiny", "--tp", "2"]


def test_torchrun_command_single_and_multi_node():
    one = launch.torchrun_command("bench", ["--tp", "2"], 2)
    assert one[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" in one
    assert one[-5:] == ["-m", "rsscale.scaling.runtime.cli", "bench", "--tp", "2"]
    multi = launch.torchrun_command("pretrain", [], 8, nnodes=4, node_rank=3, rdzv_endpoint="node0:29500")
    assert "--standalone" not in multi
    assert {"--nproc-per-node=8", "--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--rdzv-conf=is_host=0"} <= set(multi)
    assert not any(a.startswith("--node-rank") for a in multi)  # c10d ignores it (with a warning): it picks the store's host
    assert "--rdzv-conf=is_host=1" in launch.torchrun_command("pretrain", [], 8, nnodes=4, node_rank=0, rdzv_endpoint="node0:29500")
    assert launch.rendezvous_text(4, "node0:29500") == "node0:29500 (c10d)"
    assert launch.rendezvous_text() == "local (torchrun --standalone)"


def _parser():
    p = argparse.ArgumentParser()
    launch.add_launch_arguments(p)
    p.add_argument("--steps", type=int, default=5)
    return p


def test_wants_launch_and_its_errors(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    p = _parser()
    assert launch.wants_launch(p.parse_args(["--nproc", "2"]))
    assert not launch.wants_launch(p.parse_args(["--nproc", "1"]))
    with pytest.raises(ValueError, match="--nproc must be >= 1"):
        launch.wants_launch(p.parse_args(["--nproc", "0"]))
    with pytest.raises(ValueError, match="--rdzv-endpoint"):
        launch.wants_launch(p.parse_args(["--nproc", "2", "--nnodes", "2"]))
    with pytest.raises(ValueError, match=r"--node-rank must be < --nnodes \(2\), got 2"):
        launch.wants_launch(p.parse_args(["--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"]))
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a rank: never launch again
    assert not launch.wants_launch(p.parse_args(["--nproc", "2"]))


def _bench_config(argv):
    from rsscale.benchmarks.measurement import bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    bench.add_arguments(parser)
    return bench.config_from_args(parser.parse_args(argv), world=1)


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("parallel: {tp: 2, sp: true}\nmeasure: {steps: 7}\ncompute: {precision: bf16}\n")
    c = _bench_config(["--config", str(cfg), "--steps", "9"])
    assert (c.parallel.tp, c.measure.steps, c.parallel.sp, c.compute.precision) == (2, 9, True, "bf16")
    toml = tmp_path / "b.toml"
    toml.write_text("[parallel]\nmicro-batch = 2\n")  # a key may be spelled like its flag
    assert _bench_config(["--config", str(toml)]).parallel.micro_batch == 2


@pytest.mark.parametrize("text, message", [
    ("measure: {steps: ten}\n", r"key 'measure.steps' must be int, got 'ten'"),
    ("measure: {steps: 2.5}\n", r"key 'measure.steps' must be int"),
    ("parallel: {sp: 'false'}\n", r"key 'parallel.sp' must be true or false"),
    ("compute: {precision: fp64}\n", r"--precision \(config key 'compute.precision'\) must be one of fp32, bf16"),
    ("measure: {stepz: 3}\n", r"unknown config key\(s\) measure.stepz \(did you mean measure.steps\?\)"),
    ("- a\n- b\n", r"must be a mapping"),
    ("steps: [1\n", r"not valid YAML"),
])
def test_config_errors_name_file_and_key(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        _bench_config(["--config", str(cfg)])
    assert "\n" not in str(e.value)


def test_bench_reads_a_config_file_through_the_cli(tmp_path, capsys):
    from rsscale.scaling.runtime import cli

    cfg = tmp_path / "bench.yaml"
    cfg.write_text("measure:\n  steps: ten\n")
    assert cli.main(["bench", "--config", str(cfg)]) == 2
    assert "key 'measure.steps' must be int" in capsys.readouterr().err
    cfg.write_text("steps: 3\n")  # a flat key of the old dialect: where it belongs
    assert cli.main(["bench", "--config", str(cfg)]) == 2
    assert "steps (belongs under 'measure:', as measure.steps)" in capsys.readouterr().err




def _one_error_line(capsys, *needles):
    """The command wrote one 'error:' line naming every needle, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err
    assert "Traceback" not in err


def test_config_file_booleans_and_repeatable_flags(tmp_path, capsys):
    """bench/profile files: 'record: "no"' is refused; a list feeds a repeatable flag."""
    cfg = tmp_path / "bench.yaml"
    cfg.write_text('record: "no"\n')
    assert cli(["bench", "--config", str(cfg)]) == 2
    _one_error_line(capsys, str(cfg), "record", "true or false")
    prof = tmp_path / "profile.yaml"
    prof.write_text("model: tiny\ngpus: 2\nglobal_batch: 8\nmicro_batch: [2, 4]\ntop: 3\n")
    assert cli(["profile", "--config", str(prof)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if " mb" in line]
    assert rows and all(" mb2 " in r or " mb4 " in r for r in rows)
