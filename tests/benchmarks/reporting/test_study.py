"""`rsscale study`: plans, cells, held-out loss, restart without losing or duplicating a cell,
Slurm scripts, and the IsoFLOP / prediction fits against hand-computed cases."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rsscale.benchmarks.reporting import fit as F
from rsscale.benchmarks.reporting import study as S
from rsscale.scaling.spec.config import get_preset, mae_step_flops


def _plan(tmp_path, text: str, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


SMALL = """
name: t
models: [tiny, mini]
budgets: {steps: [3]}
synthetic: {num_pretrain: 36, num_seg: 4, num_det: 2, size: 64}
heldout: {images: 6}
pretrain: {parallel: {micro_batch: 4, global_batch: 4}, num_workers: 0, optim: {warmup: 1}}
"""


@pytest.mark.parametrize("text, message", [
    ("models: [tiny]\nbudgets: {steps: [1]}\nbogus: 1\n", "unknown key"),
    ("models: [giant]\nbudgets: {steps: [1]}\n", "unknown model preset 'giant'"),
    ("models: [tiny]\nbudgets: {epochs: [1]}\n", "budgets must be"),
    ("models: [tiny]\nbudgets: {steps: [0]}\n", "positive integers"),
    ("models: [tiny]\nbudgets: {steps: [1]}\nfinetune: {tasks: [cls]}\n", "the tasks are seg and det"),
    ("models: [tiny]\nbudgets: {steps: [1]}\nheldout: {images: 0}\n", "heldout.images"),
    ("models: [tiny]\nbudgets: {steps: [1]}\nlr_width: 0.5\n", "lr_width must be a positive integer"),
    ("models: [tiny]\nbudgets: {steps: [1]}\nenv: [OMP_NUM_THREADS]\n", "env must be a mapping"),
    ("models: [tiny]\nbudgets: {steps: [1]}\njobs: 0\n", "jobs must be an integer >= 1"),
    ("models: [tiny]\nbudgets: {steps: [1]}\npretrain: {lr: 0.1}\n", r"pretrain: unknown config key\(s\) lr \(belongs under 'optim:'"),
    ("models: [tiny]\nbudgets: {steps: [1]}\npretrain: {parallel: {micro_batch: 0}}\n", r"pretrain: --micro-batch \(config key 'parallel.micro_batch'\) must be >= 1"),
    ("models: [tiny]\nbudgets: {steps: [1]}\npretrain: {nproc: 0}\n", "pretrain.nproc must be an integer >= 1"),
    ("models: [tiny]\nbudgets: {steps: [1]}\nfinetune: {tasks: [seg], chanels: 8}\n", "finetune: not options of rsscale finetune: chanels"),
])
def test_plan_errors_name_the_file_and_key(tmp_path, text, message):
    path = _plan(tmp_path, text)
    with pytest.raises(ValueError, match=message) as e:
        S.load_plan(str(path))
    assert str(path) in str(e.value)


def test_cells_from_flops_budgets_and_finetune_on_the_largest(tmp_path):
    plan = S.load_plan(str(_plan(tmp_path, "models: [tiny, small]\nbudgets: {flops: [1.0e+12, 4e12]}\n"
                                           "pretrain: {parallel: {global_batch: 16}}\nfinetune: {tasks: [seg], fractions: [0.5, 1]}\n")))
    cells = S.cells(plan)
    pre = [c for c in cells if c.kind == "pretrain"]
    assert [(c.model, c.budget) for c in pre] == [("tiny", 1e12), ("small", 1e12), ("tiny", 4e12), ("small", 4e12)]
    for c in pre:  # steps x batch x per-image FLOPs = the budget, to rounding
        assert c.steps == round(c.budget / (16 * mae_step_flops(get_preset(c.model))))
    ft = [c for c in cells if c.kind == "finetune"]
    assert [(c.model, c.fraction) for c in ft] == [("tiny", 0.5), ("tiny", 1.0), ("small", 0.5), ("small", 1.0)]
    assert all(c.parent.endswith("flops4e12") for c in ft)
    assert len({c.key for c in cells}) == len(cells)


def test_lr_width_gives_each_size_lr_times_lr_width_over_width(tmp_path):
    text = "models: [w32, tiny, w96]\nbudgets: {steps: [2]}\npretrain: {optim: {lr: 3.0e-3}}\n"
    for extra, expected in (("lr_width: 64\n", [6e-3, 3e-3, 2e-3]), ("", [3e-3] * 3)):
        plan = S.load_plan(str(_plan(tmp_path, text + extra)))
        lrs = [float(a[a.index("--lr") + 1]) for a in (S.pretrain_args(plan, c, "d") for c in S.cells(plan))]
        assert lrs == pytest.approx(expected, rel=1e-3)
        assert [get_preset(m).width for m in plan.models] == [32, 64, 96]


def test_bundled_plan_loads():
    plan = S.load_plan("cpu-ladder")
    assert plan.env == {"OMP_NUM_THREADS": "1"} and plan.synthetic["scenes"] == "rich"
    cells = S.cells(plan)
    assert len({c.budget for c in cells if c.kind == "pretrain"}) >= 3 and len(plan.models) >= 4


def test_isoflop_optimum_is_the_parabola_vertex():
    n = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    loss = 0.3 * (np.log(n) - np.log(7e5)) ** 2 + 0.5
    opt, inside = F.isoflop_optimum(n, loss)
    assert opt == pytest.approx(7e5, rel=1e-6) and inside
    opt, inside = F.isoflop_optimum(n, 30 - np.log(n))  # monotone: no interior minimum
    assert not inside and opt == pytest.approx(1e7, rel=1e-6)


def test_frontier_recovers_a_known_exponent():
    sizes = np.array([1e3, 1e4, 1e5, 1e6, 1e7])
    profiles = {}
    for c in (1e12, 1e13, 1e14):
        n_opt = 0.02 * c ** 0.5
        profiles[c] = (sizes, 0.1 * (np.log(sizes) - np.log(n_opt)) ** 2 + 1.0)
    fit, optima = F.fit_frontier(profiles, n_boot=50)
    assert fit.params["c"] == pytest.approx(0.5, abs=1e-6)
    assert fit.params["a"] == pytest.approx(0.02, rel=1e-5)
    assert all(inside for _, inside in optima.values())
    lo, hi = fit.ci["c"]
    assert lo == pytest.approx(0.5, abs=1e-6) and hi == pytest.approx(0.5, abs=1e-6)  # noise-free: a point interval


def test_prediction_of_an_exact_power_law():
    n = np.array([1e5, 1e6, 1e7])
    pred, lo, hi = F.predict_with_interval(n, 3.0 * n ** -0.1, 1e8)
    assert pred == pytest.approx(3.0 * 1e8 ** -0.1, rel=1e-9) and lo == pytest.approx(pred) and hi == pytest.approx(pred)


def test_emit_slurm_writes_one_script_per_cell(tmp_path):
    plan_path = _plan(tmp_path, SMALL + "slurm: {nodes: 2, gpus_per_node: 4, time: '02:00:00', env: {NCCL_DEBUG: WARN}}\n")
    out = tmp_path / "slurm"
    assert S.main(_args(plan_path, tmp_path, emit_slurm=str(out))) == 0
    scripts = sorted(out.glob("*.sbatch"))
    assert [p.stem for p in scripts] == ["pt-mini-steps3", "pt-tiny-steps3"]
    text = (out / "pt-tiny-steps3.sbatch").read_text()
    for needle in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --time=02:00:00", "export NCCL_DEBUG=WARN",
                   "--nnodes=2 --nproc-per-node=4", "--rdzv-backend=c10d", "srun", "-m rsscale.scaling.runtime.cli pretrain",
                   "--model tiny ", "--steps 3 ", "--resume", "export RSSCALE_RESULTS=", "study ", "--finish-cell pt-tiny-steps3"):
        assert needle in text, needle
    submit = (out / "submit.sh").read_text().splitlines()
    assert "--dependency=afterok:$job_pt_tiny_steps3" in submit[-1]


def test_the_emitted_finish_command_parses_to_its_cell(tmp_path, capsys):
    """The `study PLAN --out --results --finish-cell KEY` line each sbatch script ends with is a
    valid command line of `rsscale study` (its options resolve, the cell key intact)."""
    import shlex

    import yaml

    from rsscale.scaling.runtime.cli import main

    plan_path = _plan(tmp_path, SMALL)
    assert S.main(_args(plan_path, tmp_path, emit_slurm=str(tmp_path / "slurm"))) == 0
    text = (tmp_path / "slurm" / "pt-tiny-steps3.sbatch").read_text()
    line = re.search(r"-m rsscale\.scaling\.runtime\.cli (study .*--finish-cell \S+)", text).group(1)
    capsys.readouterr()
    assert main(shlex.split(line) + ["--print-config"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["finish_cell"] == "pt-tiny-steps3" and tree["plan"] == os.path.abspath(plan_path) and tree["report"] is True


@pytest.mark.parametrize("flags, message", [(["--jobs", "0"], "--jobs (config key 'jobs') must be >= 1, got 0"),
                                            (["--max-cells", "-1"], "--max-cells (config key 'max_cells') must be >= 0, got -1")])
def test_a_bad_option_is_one_line_naming_the_flag(tmp_path, capsys, flags, message):
    from rsscale.scaling.runtime.cli import main

    assert main(["study", str(_plan(tmp_path, SMALL)), "--out", str(tmp_path / "study"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"rsscale study: error: {message}"
    assert not (tmp_path / "study").exists()  # refused before anything was written


def test_the_printed_config_reads_back_to_itself(tmp_path, capsys):
    import yaml

    from rsscale.scaling.runtime.cli import main

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    plan = str(_plan(tmp_path, SMALL))
    assert main(["study", plan, "--out", str(tmp_path / "study"), "--jobs", "2", "--max-cells", "1", "--no-report",
                 "--print-config", str(first)]) == 0
    assert main(["study", "--config", str(first), "--print-config", str(second)]) == 0
    tree = yaml.safe_load(first.read_text())
    assert yaml.safe_load(second.read_text()) == tree
    assert tree["plan"] == plan and tree["jobs"] == 2 and tree["max_cells"] == 1 and tree["report"] is False
    assert main(["study", "--print-config"]) == 2 and "the argument PLAN is required" in capsys.readouterr().err


def _args(plan, tmp_path, **kw):
    import argparse

    d = dict(plan=str(plan), out=str(tmp_path / "study"), results=None, dry_run=False, emit_slurm=None, max_cells=None,
             finish_cell=None, no_report=False, jobs=None)
    d.update(kw)
    return argparse.Namespace(**d)


def _study_cmd(plan, tmp_path, *extra):
    return [sys.executable, "-m", "rsscale.scaling.runtime.cli", "study", str(plan), "--out", str(tmp_path / "study"), *extra]


def _complete_cells(tmp_path):
    from rsscale.scaling.runtime.store import ResultsStore

    runs = ResultsStore(str(tmp_path / "study" / "results.db")).runs(kind="study", status="complete")
    return sorted(c["cell"] for c in runs["config"])


@pytest.mark.slow  # (resume points of long cells: test_long_cells_leave_resume_points; a failed cell: the tests above)
def test_study_killed_mid_cell_restarts_with_every_cell_exactly_once(tmp_path, capsys):
    plan = _plan(tmp_path, SMALL.replace("steps: [3]", "steps: [6]"))
    proc = subprocess.Popen(_study_cmd(plan, tmp_path, "--no-report"), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = tmp_path / "study" / "cells" / "pt-mini-steps6" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not second.exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole study, mid-way through the second cell
    proc.wait()
    assert _complete_cells(tmp_path) == ["pt-tiny-steps6"]
    out = subprocess.run(_study_cmd(plan, tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 cells, 1 done, 1 to run" in out.stdout + out.stderr
    assert _complete_cells(tmp_path) == ["pt-mini-steps6", "pt-tiny-steps6"]
    again = subprocess.run(_study_cmd(plan, tmp_path, "--no-report"), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 to run" in again.stdout + again.stderr
    assert _complete_cells(tmp_path) == ["pt-mini-steps6", "pt-tiny-steps6"]
    from rsscale.scaling.runtime.store import ResultsStore

    m = ResultsStore(str(tmp_path / "study" / "results.db")).metrics(kind="study", name="heldout_loss_final")
    assert len(m) == 2 and np.isfinite(m["value"]).all() and (m["value"] > 0).all()
    assert (tmp_path / "study" / "report" / "report.md").exists()
    S.dry_run(S.load_plan(str(plan), str(tmp_path / "study")))  # predictions rescaled by the two measured cells
    printed = capsys.readouterr().out
    assert printed.count("  done ") == 2 and "measured/predicted ratio" in printed and "of 2 recorded cell(s)" in printed
    assert "held-out" in (tmp_path / "study" / "report" / "report.md").read_text()


@pytest.mark.slow  # the real cells end to end; test_two_jobs_schedule_with_fake_cells checks the same order in a second
def test_two_jobs_overlap_cells_and_finetune_waits_for_its_parent(tmp_path):
    plan = _plan(tmp_path, SMALL + "jobs: 2\nfinetune: {tasks: [seg], steps: 2}\n")
    out = subprocess.run(_study_cmd(plan, tmp_path, "--no-report"), capture_output=True, text=True, timeout=400)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert _complete_cells(tmp_path) == ["ft-seg-f1-pt-mini-steps3", "ft-seg-f1-pt-tiny-steps3", "pt-mini-steps3", "pt-tiny-steps3"]
    lines = [ln for ln in log.splitlines() if "[study] cell " in ln or "[study] done " in ln]
    order = [("start " if "[study] cell " in ln else "done ") + re.search(r"(?:pt|ft)-[A-Za-z0-9.-]+", ln).group() for ln in lines]
    assert order.index("start pt-mini-steps3") < order.index("done pt-tiny-steps3")  # both pretraining cells ran at once
    for m in ("tiny", "mini"):
        assert order.index(f"done pt-{m}-steps3") < order.index(f"start ft-seg-f1-pt-{m}-steps3")


def _fake_cells(monkeypatch, tmp_path, commands, finish):
    """A 3-cell plan whose cells run `commands[key]` and are recorded by `finish` (no data, no store)."""
    plan = S.load_plan(str(_plan(tmp_path, "models: [w32, w48, tiny]\nbudgets: {steps: [1]}\njobs: 2\n")), str(tmp_path / "s"))
    monkeypatch.setattr(S, "split_images", lambda plan: ([], []))
    monkeypatch.setattr(S, "predicted_seconds", lambda *a: None)
    monkeypatch.setattr(S, "calibration", lambda plan: None)
    monkeypatch.setattr(S, "cell_command", lambda plan, cell, pool: [sys.executable, "-c", commands[cell.model]])
    monkeypatch.setattr(S, "finish_pretrain_cell", lambda plan, cell, held, wall: finish(cell))
    return plan


def test_a_fine_tuning_cell_runs_the_plans_finetune_options(tmp_path, monkeypatch):
    """The plan's finetune section (option names, a boolean switch among them) becomes the cell's
    flags through finetune's own options, so `rel_pos: false` is --no-rel-pos, not "--rel-pos False"."""
    plan = S.load_plan(str(_plan(tmp_path, SMALL + "finetune: {tasks: [seg], fractions: [0.5], steps: 2, rel_pos: false, channels: 16}\n")),
                       str(tmp_path / "s"))
    monkeypatch.setattr(S, "data_root", lambda plan: str(tmp_path / "data"))  # no dataset is written for the flags
    flags = " ".join(S.finetune_args(plan, next(c for c in S.cells(plan) if c.kind == "finetune")))
    for needle in ("--task seg", "--no-rel-pos", "--channels 16", "--train-fraction 0.5", "--steps 2", f"--data {tmp_path / 'data'}"):
        assert needle in flags, (needle, flags)
    assert "False" not in flags


def test_two_jobs_schedule_with_fake_cells(tmp_path, monkeypatch):
    """Two pretraining cells run at once; each fine-tuning cell starts only after its own parent
    has been recorded, while the other parent may still be training."""
    plan = S.load_plan(str(_plan(tmp_path, "models: [w32, w48]\nbudgets: {steps: [1]}\njobs: 2\nfinetune: {tasks: [seg]}\n")),
                       str(tmp_path / "s"))
    events = []
    slow = {"w32": 0.1, "w48": 1.2}  # w48 pretrains longest, so w32's fine-tune starts while it still runs
    monkeypatch.setattr(S, "split_images", lambda plan: ([], []))
    monkeypatch.setattr(S, "predicted_seconds", lambda *a: None)
    monkeypatch.setattr(S, "calibration", lambda plan: None)

    def command(plan, cell, pool):
        events.append(f"start {cell.key}")
        return [sys.executable, "-c", f"import time; time.sleep({slow[cell.model] if cell.kind == 'pretrain' else 0.1})"]

    monkeypatch.setattr(S, "cell_command", command)
    monkeypatch.setattr(S, "finish_pretrain_cell", lambda plan, cell, held, wall: events.append(f"done {cell.key}") or {})
    monkeypatch.setattr(S, "finish_finetune_cell", lambda plan, cell, wall: events.append(f"done {cell.key}") or {})
    assert S.run_study(plan) == 4
    assert events[:2] == ["start pt-w32-steps1", "start pt-w48-steps1"]  # both at once
    for m in ("w32", "w48"):
        assert events.index(f"done pt-{m}-steps1") < events.index(f"start ft-seg-f1-pt-{m}-steps1")
    assert events.index("start ft-seg-f1-pt-w32-steps1") < events.index("done pt-w48-steps1")  # not held back by the other parent


def test_a_failed_cell_stops_new_starts_and_lets_the_running_one_record(tmp_path, monkeypatch):
    recorded = []
    plan = _fake_cells(monkeypatch, tmp_path, {"w32": "raise SystemExit(3)", "w48": "import time; time.sleep(1)",
                                               "tiny": "pass"}, lambda cell: recorded.append(cell.model) or {})
    with pytest.raises(RuntimeError, match=r"cell pt-w32-steps1 failed \(exit code 3\)"):
        S.run_study(plan)
    assert recorded == ["w48"]  # tiny never started: the failure stopped new starts


def test_an_error_while_recording_stops_the_cells_still_running(tmp_path, monkeypatch):
    marker = tmp_path / "still-running"
    started = []
    real_popen = S.subprocess.Popen
    monkeypatch.setattr(S.subprocess, "Popen", lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])

    def finish(cell):
        raise OSError("disk full")

    plan = _fake_cells(monkeypatch, tmp_path, {"w32": "pass", "w48": f"import time; time.sleep(5); open({str(marker)!r}, 'w')",
                                               "tiny": "pass"}, finish)
    with pytest.raises(OSError, match="disk full"):
        S.run_study(plan)
    assert len(started) == 2 and all(p.poll() is not None for p in started)  # none left behind
    time.sleep(6)
    assert not marker.exists()


def test_dry_run_time_left_divides_the_cells_over_the_jobs(tmp_path, capsys):
    plan = S.load_plan(str(_plan(tmp_path, SMALL)), str(tmp_path / "study"))

    def left(jobs):
        S.dry_run(plan, jobs)
        return float(re.search(r"predicted time left ([\d,.]+) s", capsys.readouterr().out).group(1).replace(",", ""))

    one = left(1)
    assert one > 0 and left(2) == pytest.approx(one / 2, rel=0.01, abs=1)


def test_long_cells_leave_resume_points(tmp_path):
    """With no held-out curve asked for, a cell still checkpoints every RESUME_EVERY steps (a killed
    cell resumes from the last one) and keeps the newest two; with `every`, the curve's checkpoints are the resume points."""
    plan = S.load_plan(str(_plan(tmp_path, "models: [tiny]\nbudgets: {steps: [2500, 400]}\n")), str(tmp_path / "s"))
    long, short = sorted(S.cells(plan), key=lambda c: -c.steps)

    def flag(args, name):
        return args[args.index(name) + 1] if name in args else None

    args = S.pretrain_args(plan, long, "d")
    assert flag(args, "--save-every") == str(S.RESUME_EVERY) and flag(args, "--keep") == "2"
    assert flag(S.pretrain_args(plan, short, "d"), "--save-every") == "400"
    curve = S.load_plan(str(_plan(tmp_path, "models: [tiny]\nbudgets: {steps: [2500]}\nheldout: {every: 500}\n", "c.yaml")), str(tmp_path / "c"))
    args = S.pretrain_args(curve, S.cells(curve)[0], "d")
    assert flag(args, "--save-every") == "500" and flag(args, "--keep") is None


@pytest.mark.parametrize("every, scored", [(None, [2500]), (1000, [1000, 2000, 2500])])
def test_heldout_scores_the_final_checkpoint_and_the_curve_steps_only(tmp_path, monkeypatch, every, scored):
    """Resume points (every RESUME_EVERY steps) are not scored unless they are curve steps; the
    final step always is, and it is the recorded final loss."""
    from rsscale.scaling.train import heldout

    text = "models: [tiny]\nbudgets: {steps: [2500]}\n" + (f"heldout: {{every: {every}}}\n" if every else "")
    plan = S.load_plan(str(_plan(tmp_path, text)), str(tmp_path / "s"))
    cell = S.cells(plan)[0]
    monkeypatch.setattr(S, "checkpoints_of", lambda folder: [(s, f"ck/{s}") for s in (1000, 2000, 2500)])
    monkeypatch.setattr(heldout, "heldout_images", lambda files, cfg: None)
    seen = []
    monkeypatch.setattr(heldout, "heldout_loss", lambda path, images, seed=0: seen.append(path) or 1.0 / int(path.split("/")[1]))
    out = S.finish_pretrain_cell(plan, cell, [], 1.0)
    assert seen == [f"ck/{s}" for s in scored] and out["heldout_loss"] == pytest.approx(1 / 2500)
