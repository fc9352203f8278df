"""`rsscale demo`, the README's "run it" command, end to end (two ladder models, 3 steps each)."""

import os
import subprocess
import sys

import yaml
from PIL import Image

from rsscale.scaling.runtime.cli import main
from rsscale.scaling.runtime.store import ResultsStore


def test_demo_writes_data_runs_and_report(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "rsscale.scaling.runtime.cli", "demo", "--out", str(out), "--data", str(tmp_path / "data"),
           "--models", "tiny,mini", "--steps", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "data" / "pretrain").is_dir() and f"report: {out}/report/report.md" in proc.stdout
    store = ResultsStore(str(out / "results.db"))
    runs = store.runs()
    assert sorted(runs["preset"]) == ["mini", "tiny"] and (runs["status"] == "complete").all()
    losses = store.metrics(name="loss")
    assert len(losses) == 6 and losses["value"].notna().all()
    for model in ("tiny", "mini"):
        assert (out / model / "checkpoints" / "latest").exists()
    report = (out / "report" / "report.md").read_text()
    assert "| tiny |" in report and "| mini |" in report
    for name in ("fig_throughput_vs_params", "fig_loss_vs_compute"):
        with Image.open(out / "report" / f"{name}.png") as im:
            assert im.width >= 300 and im.height >= 200
    assert (out / "report" / "report.html").stat().st_size > 10_000




def _listing(root):
    """Files under root (SQLite's -wal/-shm companions aside: reading a store may create them)."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if not f.endswith(("-wal", "-shm")))


# ------------------------------------------------------------------------- demo reruns
def _earlier_demo(out):
    with ResultsStore(str(out / "results.db")).run(kind="pretrain", preset="mini", params=1, layout=dict(tp=1, pp=1, dp=1, sp=False),
                                                   micro_batch=1, global_batch=1, precision="fp32", kernels="torch", config={}) as run:
        run.log("loss", 1.0, step=0)
    for name in ("tiny", "mini", "report"):
        (out / name).mkdir()
    (out / "notes.txt").write_text("mine")


def test_demo_rerun_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    _earlier_demo(out)
    before = _listing(out)
    assert main(["demo", "--out", str(out), "--models", "tiny", "--steps", "1", "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a demo (results.db, report, mini, tiny)" in err and "--overwrite" in err
    assert _listing(out) == before and not (tmp_path / "data").exists()


def test_demo_overwrite_deletes_the_earlier_demo_only(tmp_path):
    from rsscale.benchmarks.reporting.demo import clear_previous_demo

    out = tmp_path / "demo"
    out.mkdir()
    _earlier_demo(out)
    clear_previous_demo(str(out), ["tiny"], overwrite=True)  # mini: recorded in the earlier store
    assert sorted(os.listdir(out)) == ["notes.txt"]
    clear_previous_demo(str(out), ["tiny"], overwrite=False)  # nothing left: no refusal


def test_demo_refuses_bad_options_before_writing_anything(tmp_path, capsys):
    out, data = tmp_path / "demo", tmp_path / "data"
    for argv, message in [(["--steps", "0"], "--steps (config key 'steps') must be >= 1, got 0"),
                          (["--models", "tiny,huge"], "--models (config key 'models'): unknown model preset 'huge'"),
                          (["--models", ","], "--models (config key 'models') names no preset")]:
        assert main(["demo", "--out", str(out), "--data", str(data), *argv]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not out.exists() and not data.exists()


def test_demo_printed_config_reads_back_to_itself(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert main(["demo", "--out", str(tmp_path / "demo"), "--models", "tiny,mini", "--steps", "3", "--overwrite",
                 "--print-config", str(first)]) == 0
    tree = yaml.safe_load(first.read_text())
    assert tree["models"] == "tiny,mini" and tree["steps"] == 3 and tree["overwrite"] is True and tree["batch"] == 8
    assert main(["demo", "--config", str(first), "--print-config", str(second)]) == 0
    assert yaml.safe_load(second.read_text()) == tree and not (tmp_path / "demo").exists()
