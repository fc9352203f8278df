"""The report as a new user meets it: the demo's store (the CPU ladder, pretraining only, a
repeated run) rendered once, and every figure checked as a reader would: numbers on each axis,
legends beside the points, a dot and an id per run, fits drawn or called not meaningful, MFU shown
or explained, the methods link resolving."""

import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from rsscale.benchmarks.reporting import report
from rsscale.benchmarks.reporting.fit import Fit
from rsscale.scaling.runtime.store import ResultsStore
from rsscale.scaling.spec.config import CPU_LADDER, PRESETS, param_count

LAYOUT = dict(tp=1, pp=1, dp=1, sp=False)
IMAGES_PER_S = dict(tiny=229.4, mini=146.9, small=111.9, medium=57.0)  # the demo's: less than a decade


def demo_store(path):
    """What `rsscale demo` records (pretraining runs of the ladder with their run summary), with
    `small` trained twice."""
    store = ResultsStore(path)
    for preset in [*CPU_LADDER, "small"]:
        n = param_count(PRESETS[preset], "encoder")
        with store.run(kind="pretrain", preset=preset, params=param_count(PRESETS[preset], "mae"), layout=LAYOUT, micro_batch=8,
                       global_batch=8, precision="fp32") as run:
            run.log_many(("loss", 0.8 + 3 * n**-0.2 * (1 + 5 / s), s) for s in range(1, 7))
            run.log_many([("images_per_s", IMAGES_PER_S[preset]), ("step_time_median_s", 8 / IMAGES_PER_S[preset]),
                          ("peak_mem_bytes", 4e8 + 30 * n), ("peak_mem_delta_bytes", 30 * n)])
    return store.path


def keep_figures(mp) -> dict:
    """{name: figure} of every figure the report draws from now on, kept for inspection."""
    figures, draw = {}, report.Doc.figure

    def keep(self, fig, name, caption):
        figures[name] = fig
        draw(self, fig, name, caption)

    mp.setattr(report.Doc, "figure", keep)
    return figures


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(report folder, {figure name: its matplotlib figure}) of the demo store's report."""
    tmp = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        figures = keep_figures(mp)
        md = report.write_report(demo_store(tmp / "results.db"), str(tmp), "report")
    return os.path.dirname(md), figures


def tick_labels(axis) -> list[str]:
    """The tick labels a reader sees on one axis (inside the view, not empty)."""
    axis.figure.canvas.draw()
    lo, hi = sorted(axis.get_view_interval())
    return [t.get_text() for t in axis.get_ticklabels(which="both") if t.get_text() and lo <= t.get_position()[axis is axis.axes.yaxis] <= hi]


def test_every_log_axis_has_numbers(demo):
    _, figures = demo
    for name, fig in figures.items():
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                if axis.get_scale() == "log":
                    assert len(tick_labels(axis)) >= 3, (name, axis.axis_name, tick_labels(axis))


@pytest.mark.parametrize("lo, hi", [(57, 229), (0.11, 0.13), (2e5, 7e6)])
def test_a_narrow_log_axis_gets_labelled_ticks(tmp_path, lo, hi):
    fig, ax = report._loglog_axes("x", "y")
    ax.plot([lo, hi], [lo, hi], "o")
    report.Doc(str(tmp_path)).figure(fig, "f", "f")
    for axis in (ax.xaxis, ax.yaxis):
        labels = tick_labels(axis)
        assert len(labels) >= 3 and all(re.fullmatch(r"[0-9.e-]+", t) for t in labels), labels


def test_legends_sit_beside_the_axes(demo):
    _, figures = demo
    assert figures
    for name, fig in figures.items():
        fig.canvas.draw()
        for ax in fig.axes:
            if ax.get_legend():
                assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1, name


def test_throughput_has_a_dot_per_run_with_its_id_and_the_fit(demo):
    folder, figures = demo
    ax = figures["fig_throughput_vs_params"].axes[0]
    dots = [line for line in ax.lines if line.get_marker() == "o"]
    assert sum(len(line.get_xdata()) for line in dots) == 5  # small's two runs are two dots
    assert sorted(t.get_text() for t in ax.texts) == ["1", "2", "3", "4", "5"]
    assert any(line.get_linestyle() == "--" for line in ax.lines)  # the power-law fit
    table = pd.read_csv(os.path.join(folder, "throughput.csv"))
    assert sorted(table["run_id"]) == [1, 2, 3, 4, 5]


def test_mfu_is_a_column_that_says_why_it_is_unknown(demo):
    folder, _ = demo
    table = pd.read_csv(os.path.join(folder, "throughput.csv"), keep_default_na=False)
    assert (table["mfu"] == "n/a").all()
    text = open(os.path.join(folder, "report.md")).read()
    assert "| mfu |" in text.split("## Step-time")[0] and "MFU n/a for 5 of 5 runs: MFU needs the device's peak FLOP/s" in text


def test_measured_memory_of_the_trained_models_is_in_the_memory_figure(demo):
    folder, figures = demo
    ax = figures["fig_memory_vs_params"].axes[0]
    measured = [line for line in ax.lines if line.get_label().startswith("measured")]
    xs = sorted(x for line in measured for x in line.get_xdata())
    assert xs == sorted(float(param_count(PRESETS[p], "encoder")) for p in [*CPU_LADDER, "small"])
    assert any(line.get_label().startswith("predicted TP1") for line in ax.lines)
    table = pd.read_csv(os.path.join(folder, "memory_predicted_vs_measured.csv"))
    n = param_count(PRESETS["tiny"], "encoder")
    assert table.loc[table["preset"] == "tiny", "measured_GiB"].item() == pytest.approx(30 * n / 2**30)  # the increase, on CPU


def test_title_and_methods_link(demo, tmp_path):
    folder, _ = demo
    text = open(os.path.join(folder, "report.md")).read()
    assert text.startswith("# rsscale scaling report\n")  # "report", the folder's name, says nothing
    link = re.search(r"\[METHODS\.md\]\(([^)]+)\)", text).group(1)
    assert os.path.isfile(os.path.join(folder, link))
    assert f"href='{link}'" in open(os.path.join(folder, "report.html")).read()
    md = report.write_report(ResultsStore(tmp_path / "e.db").path, str(tmp_path), "ladder-v2")
    assert open(md).read().startswith("# rsscale scaling report: ladder-v2\n")


def test_downstream_figures_only_where_we_have_points(demo, tmp_path, monkeypatch):
    folder, _ = demo
    assert not [f for f in os.listdir(folder) if f.startswith(("fig_diorr", "fig_loveda", "fig_potsdam"))]
    store = ResultsStore(tmp_path / "d.db")
    for p, value in (("tiny", 20.0), ("tiny", 21.0), ("small", 23.0)):
        with store.run(kind="finetune", preset=p, params=param_count(PRESETS[p], "encoder"), layout=LAYOUT) as run:
            run.log("mIoU", value, dataset="loveda", task="seg")
    figures = keep_figures(monkeypatch)
    out = os.path.dirname(report.write_report(store.path, str(tmp_path), "d"))
    ax = figures["fig_loveda_mIoU"].axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["1", "2", "3"]  # our runs, each with its id
    assert sum(line.get_marker() == "s" for line in ax.lines) == 3  # beside the published points
    assert [f for f in os.listdir(out) if f.startswith(("fig_diorr", "fig_loveda", "fig_potsdam")) and f.endswith(".png")] == ["fig_loveda_mIoU.png"]


def test_a_fit_that_is_not_meaningful_shows_no_numbers(tmp_path):
    runaway = Fit("saturating", {"a": 3.303e133, "b": 2.6e-9, "c": 13.4, "d": 0.87},
                  ci={"a": (165.3, np.nan), "b": (1e-12, 2e10), "c": (0.22, 44.8), "d": (0.1, 0.88)}, n_points=8)
    assert "not meaningful" in str(runaway) and "e+133" not in str(runaway)
    wild = Fit("power", {"a": 1.0, "c": 0.5}, ci={"a": (0.5, 2.0), "c": (0.2, 12.0)}, n_points=5)
    assert "beyond |c| = 10" in wild.problem()
    assert "2 points for 2 parameters" in Fit("power", {"a": 1.0, "c": 0.5}, n_points=2).problem()
    fine = Fit("power", {"a": 2.0, "c": -0.4}, ci={"a": (1.5, 2.5), "c": (-0.5, -0.3)}, n_points=4)
    assert fine.problem() is None and "c = -0.4 [-0.5, -0.3]" in str(fine)
    doc = report.Doc(str(tmp_path))
    doc.fit("loss vs compute", runaway)
    report.section_fits(doc)
    text = doc.markdown()
    assert "not meaningful" in text and "e+133" not in text and "3.303" not in text
    assert doc.fits[0]["problem"].startswith("no finite 95 % interval")


def test_five_sizes_get_the_saturating_law(tmp_path):
    store = ResultsStore(tmp_path / "s.db")
    for p in [*CPU_LADDER, "b12x1"]:
        n = param_count(PRESETS[p], "encoder")
        with store.run(kind="pretrain", preset=p, params=n, layout=LAYOUT, micro_batch=8, global_batch=8, precision="fp32") as run:
            run.log_many(("loss", 0.5 + 30 * n**-0.3 * (1 + 5 / s), s) for s in range(1, 11))
    folder = os.path.dirname(report.write_report(store.path, str(tmp_path), "s"))
    fits = json.load(open(os.path.join(folder, "fits.json")))
    assert fits[0]["law"] == "saturating" and fits[0]["what"].startswith("final loss vs encoder parameters")
