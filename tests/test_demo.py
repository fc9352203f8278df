"""`rsscale demo`, the README's "run it" command, end to end (two ladder models, 3 steps each)."""

import subprocess
import sys

from PIL import Image

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
