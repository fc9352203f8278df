"""`--layout auto`: the profiler's fastest fitting layout replaces the flag, deterministically,
the command runs it and records it; bad uses are one-line errors."""

from __future__ import annotations

import pytest

from rsscale.benchmarks import autolayout
from rsscale.benchmarks.autolayout import device_view, enumerate_plans, rank_plans
from rsscale.benchmarks.prediction import analytic
from rsscale.scaling.spec.config import get_preset


def test_the_choice_is_the_fastest_fitting_layout_of_the_ranking():
    cfg = get_preset("l12x4")
    plan, lines = autolayout.choose(cfg, 8, 64, "bf16", device_view("bf16", 8, "h100-sxm"))
    hw = analytic.Hardware(peak_flops=989.4e12, bandwidth=450e9 * 2 / 3)
    rows = [r for r in rank_plans(cfg, enumerate_plans(cfg, 8, 64, "bf16"), hw, (80 - 2) * 2**30) if r["fits"]]
    assert plan == rows[0]["plan"] and plan.layout.world_size == 8
    assert lines[-1].startswith(f"--layout auto: running {plan.layout}") and sum(line.startswith("  * ") for line in lines) == 1
    assert "counted exactly" in lines[-2]
    assert autolayout.choose(cfg, 8, 64, "bf16", device_view("bf16", 8, "h100-sxm"))[0] == plan  # deterministic: ranks under torchrun agree


def test_resolve_replaces_the_flag_by_the_chosen_layout(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = autolayout.resolve("bench", ["--model", "small", "--layout", "auto", "--gpus", "4", "--global-batch", "16", "--device", "a100-80"])
    plan, _ = autolayout.choose(get_preset("small"), 4, 16, "fp32", device_view("fp32", 4, "a100-80"))
    L = plan.layout
    want = ["--tp", str(L.tp), "--pp", str(L.pp), "--dp", str(L.dp), "--micro-batch", str(L.micro_batch), "--vpp", str(L.vpp)]
    assert argv[:4] == ["--model", "small", "--global-batch", "16"] and argv[4:14] == want and argv[-2:] == ["--nproc", "4"]
    assert "--layout" not in argv and "--gpus" not in argv and "--device" not in argv
    assert "--layout auto: running" in capsys.readouterr().out


def test_pretrain_runs_and_records_the_chosen_layout(tmp_path, monkeypatch):
    from rsscale.scaling.runtime.cli import main
    from rsscale.scaling.runtime.store import ResultsStore

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    db = tmp_path / "r.db"
    assert main(["pretrain", "--layout", "auto", "--model", "tiny", "--global-batch", "4", "--steps", "1", "--data", "random",
                 "--out", str(tmp_path / "run"), "--results", str(db)]) == 0
    run = ResultsStore(str(db)).runs(kind="pretrain").iloc[0]
    plan, _ = autolayout.choose(get_preset("tiny"), 1, 4, "fp32", device_view("fp32", 1))
    assert (run["micro_batch"], run["config"]["compute"]["recompute"]) == (plan.layout.micro_batch, plan.recompute)


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--layout", "fast"], "--layout takes 'auto'"),
    (["pretrain", "--layout", "auto", "--tp", "2"], "drop --tp"),
    (["evaluate", "--layout", "auto"], "not on evaluate"),
    (["bench", "--model", "b12x1", "--layout", "auto", "--gpus", "2", "--memory-gb", "0.01", "--reserve-gb", "0"], "fits in 0.01 GiB"),
])
def test_bad_uses_are_one_line(argv, message, capsys):
    from rsscale.scaling.runtime.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_broken_results_store_is_said_not_silently_skipped(tmp_path, monkeypatch, capsys):
    from rsscale.scaling.runtime.cli import main

    broken = tmp_path / "r.db"
    broken.write_bytes(b"not a database" * 100)
    monkeypatch.setenv("RSSCALE_RESULTS", str(broken))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["bench", "--model", "tiny", "--layout", "auto", "--gpus", "1", "--no-record"]) == 2  # (recording would find it later)
    assert str(broken) in capsys.readouterr().err


def test_finetune_gets_the_chosen_layout_as_flags_it_accepts(tmp_path, monkeypatch, capsys):
    """finetune --layout auto: every layout counted, the winner's flags replace it and finetune's
    own parser turns them into that layout (the run itself is pretrain's test above)."""
    import argparse

    from rsscale.finetune import finetune as FT

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = autolayout.resolve("finetune", ["--task", "seg", "--dataset", "synthetic", "--data", str(tmp_path), "--layout", "auto",
                                           "--gpus", "1", "--global-batch", "2", "--memory-gb", "4"])
    out = capsys.readouterr().out
    assert "fine-tuning layouts of tiny (seg, 128 px)" in out and "each counted exactly" in out
    plan, _ = autolayout.choose_finetune(get_preset("tiny"), 1, 2, "fp32", autolayout.device_view("fp32", 1, memory_gb=4), None, "seg", 128,
                                         dict(detector="orcnn", channels=32, window=4))
    assert f"running {plan.layout}" in out and "--pp" not in argv and "--layout" not in argv
    parser = argparse.ArgumentParser()
    FT.add_arguments(parser)
    assert FT.config_from_args(parser.parse_args(argv), 1).parallel == plan.layout


def test_profile_prints_the_choice_counted_and_as_flags(capsys):
    from rsscale.scaling.runtime.cli import main

    assert main(["profile", "--layout", "auto", "--model", "small", "--device", "h100-sxm", "--nodes", "2", "--gpus-per-node", "2",
                 "--global-batch", "16"]) == 0
    out = capsys.readouterr().out
    view = autolayout.device_view("bf16", 4, "h100-sxm", nodes=2, gpus_per_node=2)
    assert view.hw.inter_bandwidth == pytest.approx(50e9 * 2 / 3) and view.hw.gpus_per_node == 2
    plan, _ = autolayout.choose(get_preset("small"), 4, 16, "bf16", view, 2.0)
    assert f"choice: {plan.layout}" in out and "counted exactly" in out
    assert f"rsscale pretrain {' '.join(autolayout.layout_flags(plan))} --global-batch 16" in out


def test_a_layout_that_fits_by_the_analytic_model_but_not_when_counted_is_skipped(monkeypatch):
    """The exact count decides: a winner whose counted bytes exceed the budget is not run."""
    from rsscale.benchmarks.prediction import count

    cfg, view = get_preset("small"), autolayout.device_view("bf16", 4, "h100-sxm")
    first, _ = autolayout.choose(cfg, 4, 16, "bf16", view)
    real = count.count_plan
    monkeypatch.setattr(count, "count_plan", lambda c, p: [count.Counted(params=10**12)] if p == first else real(c, p))
    plan, lines = autolayout.choose(cfg, 4, 16, "bf16", view)
    assert plan != first and any("over the" in line and str(first.layout) in line for line in lines)
