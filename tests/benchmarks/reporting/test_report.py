"""Report generation from a filled store (files, real images, fits, incomplete runs), an empty
store ("no data yet"), and the benchmark harness end to end on the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rsscale.benchmarks.reporting.report import write_report
from rsscale.scaling.runtime.cli import main as cli
from rsscale.scaling.runtime.store import ResultsStore
from rsscale.scaling.spec.config import PRESETS, param_count

LAYOUT = dict(tp=1, pp=1, dp=1, sp=False)
LADDER = ("tiny", "mini", "small", "medium")


def fill(path):
    """Synthetic records of every kind: throughput follows 1e7 * N^-0.7 in encoder parameters."""
    store = ResultsStore(path)
    for i, p in enumerate(LADDER):
        n = param_count(PRESETS[p], "encoder")
        with store.run(kind="bench", preset=p, params=param_count(PRESETS[p], "mae"), layout=LAYOUT, micro_batch=8,
                       global_batch=8, precision="fp32", kernels="torch") as run:
            run.log_many([("images_per_s", 1e7 * n**-0.7), ("mfu", 0.1), ("tflops", 0.01), ("peak_mem_bytes", 40 * n),
                          ("peak_mem_delta_bytes", 30 * n), ("predicted_mem_bytes", 24 * n)])
        with store.run(kind="pretrain", preset=p, params=n, layout=LAYOUT, micro_batch=8, global_batch=32, precision="fp32") as run:
            run.log_many(("loss", 0.5 + 3 * n**-0.2 * (1 + 5 / s), s) for s in range(1, 11))
        with store.run(kind="finetune", preset=p, params=n, layout=LAYOUT) as run:
            run.log("mIoU", 20.0 + i, dataset="loveda", task="seg")
        with store.run(kind="finetune", preset=p, params=n, layout=LAYOUT) as run:  # the data-efficiency study
            run.log("mIoU", 10.0 + i, dataset="loveda", task="seg", train_fraction=0.1)
    for n, predicted in ((2, 0.12), (4, 0.09)):  # `profile --measure` runs with the time model's prediction beside
        with store.run(kind="profile", preset="small", params=1, layout=dict(LAYOUT, dp=n), micro_batch=8, global_batch=16,
                       precision="fp32", device_count=n) as run:
            run.log_many([("step_time_median_s", 0.10), ("predicted_step_time_s", predicted), ("images_per_s", 160.0)])
    with store.run(kind="bench", preset="tiny", params=1, layout=dict(LAYOUT, dp=2), micro_batch=4, global_batch=8,
                   precision="fp32", device_count=2) as run:  # `bench --peer torch`: ours beside the native peer
        tags = {"peer_kind": "ddp", "peer_optimizer": "fused"}
        run.log_many([("ours_step_no_data_median_s", 0.09, None, tags), ("peer_step_time_median_s", 0.10, None, tags),
                      ("ours_over_peer_step_time", 0.9, None, tags), ("first_step_loss_abs_diff", 0.0, None, tags)])
    for commit, ms in (("aaaa", 1.0), ("bbbb", 0.8)):
        with store.run(kind="kernel", precision="bf16", kernels="triton", git_commit=commit) as run:
            run.log("ms", ms, kernel="layer_norm", impl="triton", shape="M=8 N=40 K=2", dtype="bf16", direction="fwd")
    store.start_run("pretrain", preset="tiny").log("loss", 9.0, step=1)  # a killed run: never finished


def check_png(path):
    with Image.open(path) as im:
        w, h = im.size
        px = np.asarray(im.convert("L"), dtype=float)
    assert 400 <= w <= 2000 and 300 <= h <= 1500, (path, im.size)
    assert px.std() > 5 and len(np.unique(px)) > 10, f"{path} looks blank"


def test_report_from_filled_store(tmp_path):
    fill(tmp_path / "r.db")
    md = write_report(str(tmp_path / "r.db"), str(tmp_path), "t")
    folder = os.path.dirname(md)
    text = open(md).read()
    pngs = [f for f in os.listdir(folder) if f.endswith(".png")]
    for name in ("fig_throughput_vs_params", "fig_memory_vs_params", "fig_loss_vs_params", "fig_loss_vs_compute",
                 "fig_loveda_mIoU", "fig_loveda_mIoU_vs_fraction", "fig_kernel_layer_norm", "fig_time_model"):
        assert f"{name}.png" in pngs and os.path.exists(os.path.join(folder, f"{name}.svg"))
    assert "fig_diorr_mAP.png" not in pngs  # no runs of ours there: the published points stay in their table
    for f in pngs:
        check_png(os.path.join(folder, f))
    assert "1 incomplete runs" in text and "| running |" in text
    assert "median |error| 15.0 %, worst 20.0 %" in text  # +20 % and -10 % by hand
    assert "no data yet" not in text.split("## Fitted")[0].split("## Kernel")[0]
    page = open(os.path.join(folder, "report.html")).read()
    assert page.count("data:image/png;base64,") == len(pngs) and "src='fig_" not in page
    fits = json.load(open(os.path.join(folder, "fits.json")))
    tput = [f for f in fits if f["what"].startswith("images/s")]
    assert len(tput) == 1 and tput[0]["params"]["c"] == pytest.approx(-0.7, abs=1e-6)
    assert {f["law"] for f in fits} == {"power"}  # 4 sizes: too few for the saturating law's 4 parameters
    assert "73.6" in text and "rsscale's choice" in text  # published points with the preset caveat
    down = __import__("pandas").read_csv(os.path.join(folder, "downstream.csv"))
    assert sorted(down["train_fraction"].unique()) == [0.1, 1.0] and len(down) == 2 * len(LADDER)


def test_report_from_empty_store(tmp_path):
    from rsscale.scaling.runtime.store import ResultsStore

    md = write_report(ResultsStore(tmp_path / "empty.db").path, str(tmp_path), "e")  # reports read only: the store must exist
    text = open(md).read()
    assert text.count("no data yet") >= 5
    check_png(os.path.join(os.path.dirname(md), "fig_memory_vs_params.png"))  # the prediction alone


def test_summarize_by_hand():
    from rsscale.benchmarks.measurement.bench import summarize

    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0], global_batch=8, step_flops=1e12, model_flops=5e11, peak_tflops=2.0, devices=2)
    assert s["step_time_median_s"] == 3.0 and s["step_time_min_s"] == 1.0 and s["step_time_max_s"] == 100.0
    assert (s["step_time_p25_s"], s["step_time_p75_s"]) == (2.0, 4.0)
    assert s["images_per_s"] == pytest.approx(8 / 3) and s["tflops"] == pytest.approx(8 / 3)
    assert s["mfu"] == pytest.approx(8 * 0.5 / 3 / 4)


def test_bench_command_round_trips_through_the_cli():
    import argparse

    from rsscale.benchmarks.measurement import bench
    from rsscale.scaling.spec.layout import Layout
    from rsscale.scaling.spec.run import Compute, DataParallel

    opts = bench.BenchConfig(model="mini", parallel=Layout(tp=2, sp=True, micro_batch=4, global_batch=16), record=False,
                             compute=Compute(recompute="selective"), data_parallel=DataParallel(overlap_grad_reduce=False, bucket_mb=2.5),
                             measure=bench.Measure(steps=2, record_kind="profile", peak_tflops=3.5))
    cmd = bench.bench_command(opts, 2)
    assert "torch.distributed.run" in cmd and "--nproc-per-node=2" in cmd
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(cmd[cmd.index("bench") + 1:])
    assert bench.config_from_args(args, world=2) == opts


def test_harness_end_to_end_tiny(tmp_path):
    """`rsscale bench` in a fresh process (on CPU the run's memory increase is its resident-set growth,
    which a process that already freed more heap than the run needs would not show): two measured
    steps recorded, their median, images/s, a positive peak and increase, and a report row."""
    import json
    import subprocess
    import sys

    db, summary = str(tmp_path / "b.db"), tmp_path / "s.json"
    cmd = [sys.executable, "-m", "rsscale.scaling.runtime.cli", "bench", "--model", "tiny", "--micro-batch", "2", "--global-batch", "4",
           "--warmup", "1", "--steps", "2", "--peak-tflops", "1.0", "--results", db, "--summary-json", str(summary)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(summary.read_text())
    store = ResultsStore(db)
    runs = store.runs()
    assert runs["kind"].tolist() == ["bench"] and runs["status"].tolist() == ["complete"]
    m = store.metrics()
    steps = m[m["name"] == "step_time_s"]["value"]
    assert len(steps) == 2 and s["step_time_median_s"] == pytest.approx(np.median(steps))
    assert s["images_per_s"] == pytest.approx(4 / s["step_time_median_s"])
    assert s["peak_mem_bytes"] > s["peak_mem_delta_bytes"] > 0 and s["predicted_mem_bytes"] > 0
    md = write_report(db, str(tmp_path), "b")
    assert "| tiny |" in open(md).read()


@pytest.mark.slow
def test_harness_under_torchrun_rank0_records_every_rank(tmp_path):
    """`rsscale bench --nproc 2` (TP=2 + SP): one record, written by rank 0, with both ranks' peaks."""
    import subprocess
    import sys

    db = str(tmp_path / "mp.db")
    cmd = [sys.executable, "-m", "rsscale.scaling.runtime.cli", "bench", "--model", "tiny", "--tp", "2", "--sp", "--micro-batch", "2",
           "--global-batch", "2", "--warmup", "1", "--steps", "2", "--peak-tflops", "1", "--results", db, "--nproc", "2"]
    subprocess.run(cmd, check=True, timeout=300)
    store = ResultsStore(db)
    runs = store.runs()
    assert len(runs) == 1 and runs.iloc[0]["status"] == "complete" and runs.iloc[0]["device_count"] == 2
    ranks = store.metrics(name="peak_mem_rank_bytes")
    assert sorted(ranks["rank"].astype(int)) == [0, 1] and (ranks["value"] > 0).all()




def _one_error_line(capsys, *needles):
    """The command wrote one 'error:' line naming every needle, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err
    assert "Traceback" not in err


def _store_with_a_run(path):
    from rsscale.scaling.runtime.store import ResultsStore

    store = ResultsStore(path)
    with store.run(kind="bench", preset="tiny", params=1000, layout=dict(tp=1, pp=1, dp=1, sp=False), micro_batch=2,
                   global_batch=2, precision="fp32", kernels="torch") as run:
        run.log("images_per_s", 10.0)
    return store


def test_report_reads_a_store_on_read_only_media_without_writing(tmp_path):
    """`rsscale report` as an unprivileged user on a store whose folder and file are read-only:
    it reports, and the store's bytes (journal mode included) are unchanged, no WAL files made."""
    import shutil
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to run the report as an unprivileged user")
    top = tempfile.mkdtemp(prefix="rsscale-ro-")
    try:
        os.chmod(top, 0o755)
        media, out = os.path.join(top, "media"), os.path.join(top, "out")
        os.makedirs(media)
        os.makedirs(out)
        os.chmod(out, 0o777)
        db = os.path.join(media, "results.db")
        _store_with_a_run(db)
        before = open(db, "rb").read()
        os.chmod(db, 0o444)
        os.chmod(media, 0o555)
        cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-m", "rsscale.scaling.runtime.cli",
               "report", "--results", db, "--out", out, "--name", "ro"]
        env = dict(os.environ, MPLCONFIGDIR=out, HOME=out)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "1 runs" in open(os.path.join(out, "ro", "report.md")).read()
        assert open(db, "rb").read() == before and sorted(os.listdir(media)) == ["results.db"]
    finally:
        os.chmod(os.path.join(top, "media"), 0o755)
        shutil.rmtree(top)


def test_report_on_a_corrupt_store_is_one_line(tmp_path, capsys):
    db = tmp_path / "results.db"
    db.write_bytes(b"\0garbage" * 500)
    assert cli(["report", "--results", str(db), "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, str(db), "cannot read it")


def test_a_bad_option_is_one_line_naming_it(tmp_path, capsys):
    assert cli(["report", "--results", str(tmp_path / "none.db"), "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, "no results store at", "--results")
    (tmp_path / "bad.yaml").write_text("name: [a, b]\n")
    assert cli(["report", "--config", str(tmp_path / "bad.yaml")]) == 2
    _one_error_line(capsys, "bad.yaml", "'name' must be a single")


def test_the_printed_config_reads_back_to_itself(tmp_path):
    import yaml

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert cli(["report", "--results", "r.db", "--name", "study", "--print-config", str(first)]) == 0
    assert cli(["report", "--config", str(first), "--print-config", str(second)]) == 0
    tree = yaml.safe_load(first.read_text())
    assert tree == yaml.safe_load(second.read_text()) == {"command": "report", "results": "r.db", "name": "study", "out": "reports"}
