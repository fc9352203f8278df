"""`rsscale report`: the scaling report, from the results store to Markdown + HTML + figures.

    rsscale report [--results reports/results.db] [--name latest] [--out reports/]
    write_report(results_path, out_dir, name) -> path of report.md   (used by `rsscale demo`)

Writes <out>/<name>/report.md, a self-contained report.html (figures embedded as base64 PNG),
every figure as PNG and SVG, fits.json, the tables as CSV and a copy of METHODS.md (linked).
Sections: runs (incomplete runs listed as such), throughput and MFU vs parameters per layout,
memory per device vs parameters (measured beside the analytic prediction, with the error),
pretraining loss vs parameters and vs compute, downstream metrics vs parameters with the
published points (benchmarks/reporting/paper.py), kernel speed over commits, and the fitted scaling exponents.
A section without data says "no data yet"; a value that cannot be known says "n/a" and why; a fit
that is not meaningful says so instead of giving numbers. Every run is its own table row and its
own dot (labelled with its run id); legends sit beside the axes; every log axis has numbers.
Parameters are the encoder's (the paper's sizes), from the preset when known.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import os
import re
import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rsscale.benchmarks.reporting import fit as fitting  # noqa: E402
from rsscale.benchmarks.reporting.paper import PRESET_NOTE, reference_points  # noqa: E402
from rsscale.scaling.runtime.options import add_options, check, option, resolve  # noqa: E402

NO_DATA = "no data yet"
GENERIC_NAMES = ("latest", "report")  # folder names that say nothing: left out of the title
GIB = 2**30
DOWNSTREAM = ("mAP", "mIoU", "OA", "mF1")


# ---------------------------------------------------------------------------------------------
# A tiny document model rendered twice (Markdown and HTML)
# ---------------------------------------------------------------------------------------------


class Doc:
    def __init__(self, folder: str):
        self.folder, self.blocks, self.fits = folder, [], []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame, name: str, floatfmt: str = "{:.4g}") -> None:
        df = df.reset_index(drop=True)
        df.to_csv(os.path.join(self.folder, f"{name}.csv"), index=False)
        shown = df.map(lambda v: floatfmt.format(v) if isinstance(v, (float, np.floating)) and np.isfinite(v) else ("" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)))
        self.blocks.append(("t", shown))

    def figure(self, fig, name: str, caption: str) -> None:
        for ax in fig.axes:
            _label_log_ticks(ax)
        png = os.path.join(self.folder, f"{name}.png")
        fig.savefig(png, dpi=100, bbox_inches="tight")  # tight: the legends sit beside the axes
        fig.savefig(os.path.join(self.folder, f"{name}.svg"), bbox_inches="tight")
        plt.close(fig)
        self.blocks.append(("f", name, caption))

    def fit(self, what: str, result) -> None:
        self.fits.append(dict(what=what, law=result.law, params=result.params, ci=result.ci, n=result.n_points, text=str(result),
                              problem=result.problem(), caveats="; ".join(result.caveats())))
        self.text(f"Fit, {what}: `{result}`")

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "t":
                df = b[1]
                out.append("| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns))
                out[-1] += "".join("\n| " + " | ".join(r) + " |" for r in df.astype(str).values.tolist())
            else:
                out.append(f"![{b[2]}]({b[1]}.png)\n\n*{b[2]}* ([SVG]({b[1]}.svg))")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse;font-size:90%}"
               "td,th{border:1px solid #ccc;padding:2px 6px}code{background:#f4f4f4}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                text = html.escape(b[1]).replace('`', '')
                out.append("<p>" + re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r"<a href='\2'>\1</a>", text) + "</p>")
            elif b[0] == "t":
                out.append(b[1].to_html(index=False, escape=True))
            else:
                with open(os.path.join(self.folder, f"{b[1]}.png"), "rb") as f:
                    data = base64.b64encode(f.read()).decode()
                out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b[2])}'>"
                           f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        return "\n".join(out + ["</body></html>"])


# ---------------------------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------------------------


def encoder_params(preset, fallback) -> float:
    """The encoder's parameter count (the paper's size axis) from the preset, else the stored count."""
    from rsscale.scaling.spec.config import PRESETS, param_count

    return float(param_count(PRESETS[preset], "encoder")) if preset in PRESETS else float(fallback)


def layout_label(r) -> str:
    sp = "+SP" if r.get("sp") else ""
    n = {k: "?" if pd.isna(r.get(k)) else int(r[k]) for k in ("tp", "pp", "dp", "micro_batch")}
    return f"TP{n['tp']}{sp} PP{n['pp']} DP{n['dp']} mb{n['micro_batch']} {r['precision']}"


def wide(metrics: pd.DataFrame, names) -> pd.DataFrame:
    """One row per run with one column per (unstepped) metric name; run columns kept."""
    m = metrics[metrics["name"].isin(names) & metrics["step"].isna()]
    if m.empty:
        return pd.DataFrame()
    values = m.pivot_table(index="run_id", columns="name", values="value", aggfunc="last")
    runs = m.drop_duplicates("run_id").set_index("run_id")[["kind", "preset", "params", "tp", "pp", "dp", "sp", "micro_batch",
                                                             "global_batch", "precision", "device", "device_count", "git_commit"]]
    return runs.join(values).reset_index()


def _loglog_axes(xlabel: str, ylabel: str, logy: bool = True):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _number(v, _=None) -> str:
    return f"{v:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _label_log_ticks(ax) -> None:
    """Numbers on every log axis (Doc.figure calls it): inside one decade a log axis has no major
    tick, inside three two or three, so the minor ticks are labelled there too (all of them within
    a decade, 2 and 5 within three), and an axis narrower than half a decade (0.11 to 0.13 holds no
    log tick at all) gets evenly spaced ticks; a reader must be able to read every figure's values."""
    for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if axis.get_scale() != "log":
            continue
        decades = abs(np.log10(hi / lo))
        subs = () if decades < 0.5 else range(1, 10) if decades < 1 else (2, 5) if decades < 3 else ()
        if decades < 0.5:
            axis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(_number))
        axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _, subs=subs: _number(v) if round(v / 10 ** np.floor(np.log10(v))) in subs else ""))
    ax.tick_params(which="both", labelsize=8)


def _legend(ax, fontsize: int = 7) -> None:
    """Beside the axes, so that it never covers a point."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def _runs(ax, x, y, names, **style):
    """One marker per run, labelled with its name (a run id: repeated runs of a layout stay apart)."""
    line, = ax.plot(x, y, "o", ls="none", **style)
    for xi, yi, name in zip(x, y, names):
        ax.annotate(str(name), (xi, yi), xytext=(3, 3), textcoords="offset points", fontsize=6, color=line.get_color())
    return line


def _fit_line(ax, fit, x, **style) -> None:
    """The fitted curve over the data's range, drawn only for a meaningful fit."""
    if fit is not None and not fit.problem():
        xs = np.logspace(np.log10(np.min(x)), np.log10(np.max(x)), 50)
        ax.plot(xs, fit.predict(xs), "--", lw=1, **style)


def _fit_any(x, y, saturating: bool):
    """Saturating law with more distinct sizes than its 4 parameters (when asked), else a plain
    power law with >= 3."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if saturating and len(np.unique(x)) > 4:
        return fitting.fit_saturating(x, y, n_boot=100)
    if len(np.unique(x)) >= 3:
        return fitting.fit_power_law(x, y, n_boot=200)
    return None


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def section_runs(doc: Doc, runs: pd.DataFrame) -> None:
    doc.heading("Runs")
    if runs.empty:
        doc.text(NO_DATA)
        return
    counts = runs.groupby(["kind", "status"]).size().rename("runs").reset_index()
    doc.table(counts, "runs_by_kind")
    bad = runs[runs["incomplete"]]
    if bad.empty:
        doc.text("All runs are complete.")
        return
    doc.text(f"{len(bad)} incomplete runs (status 'running' means still running or killed; 'failed' raised an error; "
             "'interrupted' was stopped by Ctrl-C or SIGTERM). "
             "Their metrics are left out of the sections below.")
    doc.table(bad[["id", "kind", "preset", "status", "started", "host", "pid"]], "incomplete_runs")


def section_throughput(doc: Doc, metrics: pd.DataFrame) -> None:
    doc.heading("Throughput and MFU vs parameters")
    b = wide(metrics, ["images_per_s", "tflops", "mfu", "step_time_median_s", "step_time_p25_s", "step_time_p75_s",
                       "predicted_images_per_s"])
    if b.empty or "images_per_s" not in b:
        doc.text(NO_DATA + " (run `rsscale bench` or `rsscale profile --measure`).")
        return
    b["encoder_params"] = [encoder_params(p, n) for p, n in zip(b["preset"], b["params"])]
    b["layout"] = [layout_label(r) for _, r in b.iterrows()]
    if "predicted_images_per_s" in b:
        b["prediction_error_pct"] = 100 * (b["predicted_images_per_s"] - b["images_per_s"]) / b["images_per_s"]
    b["mfu"] = b["mfu"] if "mfu" in b else np.nan
    no_peak = b["mfu"].isna()
    cols = ["run_id", "kind", "preset", "encoder_params", "layout", "device", "images_per_s", "tflops", "mfu", "step_time_median_s",
            "step_time_p25_s", "step_time_p75_s", "predicted_images_per_s", "prediction_error_pct"]
    shown = b.assign(mfu=[("n/a" if pd.isna(v) else v) for v in b["mfu"]])
    doc.table(shown[[c for c in cols if c in b]].sort_values(["layout", "encoder_params", "run_id"]), "throughput")
    if no_peak.any():
        doc.text(f"MFU n/a for {int(no_peak.sum())} of {len(b)} runs: MFU needs the device's peak FLOP/s, which only "
                 "`rsscale bench` and `rsscale profile --measure` measure (a matmul) or take (--peak-tflops); other runs "
                 "(pretraining, the demo) record throughput only.")
    if "predicted_images_per_s" in b:
        doc.text("Predicted images/s: benchmarks/prediction/analytic.py at the run's peak (given or measured matmul) x efficiency 0.5.")
    for metric, label, name in (("images_per_s", "images / s", "throughput"), ("mfu", "MFU", "mfu")):
        if b[metric].isna().all():
            continue
        fig, ax = _loglog_axes("encoder parameters", label, logy=metric == "images_per_s")
        for layout, g in b.dropna(subset=[metric]).groupby("layout"):
            median = g.groupby("encoder_params")[metric].median()
            line = _runs(ax, g["encoder_params"], g[metric], g["run_id"], label=f"{layout} (run ids)")
            ax.plot(median.index, median.values, "-", lw=1, alpha=0.5, color=line.get_color())
            if metric == "images_per_s":
                f = _fit_any(median.index, median.values, saturating=False)
                if f:
                    doc.fit(f"images/s vs encoder parameters, {layout}", f)
                    _fit_line(ax, f, median.index, color=line.get_color(), label=f"fit {layout}: c = {f.params['c']:.2f}")
        _legend(ax)
        doc.figure(fig, f"fig_{name}_vs_params", f"{label} vs encoder parameters: one dot per run (its run id beside), "
                   "a line through the median per size and layout, dashed: the power-law fit")


def section_time_model(doc: Doc, metrics: pd.DataFrame) -> None:
    doc.heading("Step-time model: predicted vs measured")
    t = wide(metrics, ["predicted_step_time_s", "step_time_median_s"])
    if t.empty or "predicted_step_time_s" not in t or t["predicted_step_time_s"].isna().all():
        doc.text(NO_DATA + " (run `rsscale calibrate`, then `rsscale profile --measure`).")
        return
    t = t.dropna(subset=["predicted_step_time_s", "step_time_median_s"]).copy()
    t["layout"] = [layout_label(r) for _, r in t.iterrows()]
    t["error_pct"] = 100 * (t["predicted_step_time_s"] / t["step_time_median_s"] - 1)
    doc.table(t[["run_id", "preset", "device_count", "layout", "device", "predicted_step_time_s", "step_time_median_s", "error_pct"]],
              "time_model_validation")
    err = t["error_pct"].abs()
    doc.text(f"Calibrated time model (benchmarks/prediction/timemodel.py) over {len(t)} measured layouts: median |error| {err.median():.1f} %, "
             f"worst {err.max():.1f} %.")
    fig, ax = _loglog_axes("measured step time (s)", "predicted step time (s)")
    for n, g in t.groupby("device_count"):
        ax.plot(g["step_time_median_s"], g["predicted_step_time_s"], "o", label=f"{int(n)} processes")
    lo, hi = t[["step_time_median_s", "predicted_step_time_s"]].min().min(), t[["step_time_median_s", "predicted_step_time_s"]].max().max()
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = measured")
    _legend(ax)
    doc.figure(fig, "fig_time_model", "Predicted vs measured step time, one point per measured layout")


def section_peer(doc: Doc, metrics: pd.DataFrame) -> None:
    doc.heading("Versus PyTorch-native")
    t = wide(metrics, ["ours_step_no_data_median_s", "peer_step_time_median_s", "ours_over_peer_step_time", "first_step_loss_abs_diff"])
    if t.empty or "ours_over_peer_step_time" not in t or t["ours_over_peer_step_time"].isna().all():
        doc.text(NO_DATA + " (run `rsscale bench --peer torch`).")
        return
    t = t.dropna(subset=["ours_over_peer_step_time"]).copy()
    kinds = metrics[metrics["name"] == "ours_over_peer_step_time"].drop_duplicates("run_id").set_index("run_id")
    t["native"] = t["run_id"].map(kinds["peer_kind"]) if "peer_kind" in kinds else "?"
    t["layout"] = [layout_label(r) for _, r in t.iterrows()]
    doc.table(t[["run_id", "preset", "layout", "native", "ours_step_no_data_median_s", "peer_step_time_median_s",
                 "ours_over_peer_step_time", "first_step_loss_abs_diff", "device"]], "vs_native")
    doc.text("Each row: one `rsscale bench --peer torch` launch; the same model, weights, batches and precision run our way and "
             "the PyTorch-native way (DDP, ZeroRedundancyOptimizer, DTensor TP and SP, torch.distributed.pipelining, FSDP2, fused "
             "AdamW, SDPA; benchmarks/measurement/peer.py), steps alternating; ratio < 1: ours is faster. Step times leave out drawing the batch; "
             "the first-step losses of both sides agree when they train the same model.")
    fig, ax = plt.subplots(figsize=(6, max(3.5, 0.35 * len(t) + 1.2)))
    labels = [f"{r['preset']} {r['layout']} vs {r['native']} (run {r['run_id']})" for _, r in t.iterrows()]
    ax.barh(range(len(t)), t["ours_over_peer_step_time"], color=["tab:green" if v <= 1 else "tab:red" for v in t["ours_over_peer_step_time"]])
    ax.axvline(1.0, color="k", ls="--", lw=1)
    ax.set(yticks=range(len(t)), yticklabels=labels, xlabel="step time, ours / PyTorch-native (< 1: ours faster)")
    ax.invert_yaxis()
    doc.figure(fig, "fig_vs_native", "Step time of ours over the PyTorch-native peer's, one bar per launch")


def section_memory(doc: Doc, metrics: pd.DataFrame) -> None:
    doc.heading("Memory per device vs parameters")
    from rsscale.benchmarks.prediction import analytic
    from rsscale.scaling.spec.config import PAPER_PRESETS, PRESETS
    from rsscale.scaling.spec.layout import Layout

    names = ["peak_mem_bytes", "peak_mem_delta_bytes", "predicted_mem_bytes", "images_per_s"]  # images/s: every trained run
    m = wide(metrics[metrics["kind"].isin(("pretrain", "bench", "profile"))], names)
    if not m.empty:
        m = m.reindex(columns=list(m.columns) + [n for n in names if n not in m])
        m["encoder_params"] = [encoder_params(p, n) for p, n in zip(m["preset"], m["params"])]
        m["layout"] = [layout_label(r) for _, r in m.iterrows()]
        m["predicted_mem_bytes"] = [v if pd.notna(v) else predicted_memory(r) for v, (_, r) in zip(m["predicted_mem_bytes"], m.iterrows())]
        # On CPU the peak RSS includes the interpreter and libraries: compare its increase instead.
        cpu = m["device"].fillna("").str.startswith("CPU") & m["peak_mem_delta_bytes"].notna()
        m["measured_bytes"] = np.where(cpu, m["peak_mem_delta_bytes"], m["peak_mem_bytes"])
        m = m.dropna(subset=["measured_bytes", "predicted_mem_bytes"], how="all")
    fig, ax = _loglog_axes("encoder parameters", "GiB per device")
    plan = analytic.Plan(Layout(micro_batch=32, global_batch=32), precision="bf16")
    xs = [encoder_params(p, 0) for p in PAPER_PRESETS]
    ax.plot(xs, [analytic.estimate(PRESETS[p], plan).memory["total"] / GIB for p in PAPER_PRESETS], "k--",
            label="predicted, paper presets, 1 device mb32 bf16")
    if m.empty:
        doc.text(NO_DATA + " for trained models; the figure shows the analytic prediction for the paper presets only.")
    else:
        m["measured_GiB"] = m["measured_bytes"] / GIB
        m["predicted_GiB"] = m["predicted_mem_bytes"] / GIB
        m["error_pct"] = 100 * (m["predicted_mem_bytes"] - m["measured_bytes"]) / m["measured_bytes"]
        doc.table(m[["run_id", "kind", "preset", "encoder_params", "layout", "device", "measured_GiB", "predicted_GiB", "error_pct"]]
                  .sort_values(["layout", "encoder_params", "run_id"]), "memory_predicted_vs_measured")
        doc.text("Measured: allocator peak on GPU; on CPU the increase of the peak RSS over the RSS before the model was "
                 "built (allocator caching and library buffers included), so CPU errors are large for tiny models. "
                 "Predicted: benchmarks/prediction/analytic.py, as the run recorded it or else at its layout and precision; "
                 "a run without a measurement shows the prediction alone.")
        for layout, g in m.groupby("layout"):
            g = g.sort_values("encoder_params")
            seen = g.dropna(subset=["measured_GiB"])
            line = _runs(ax, seen["encoder_params"], seen["measured_GiB"], seen["run_id"],
                         label=f"measured {layout} (run ids)" if len(seen) else None)
            pred = g.groupby("encoder_params")["predicted_GiB"].median()
            ax.plot(pred.index, pred.values, "x:", color=line.get_color(), label=f"predicted {layout}")
    _legend(ax)
    doc.figure(fig, "fig_memory_vs_params", "memory per device vs encoder parameters: measured o (run ids beside), "
               "predicted x, and the paper presets' prediction (dashed)")


def predicted_memory(r) -> float:
    """Analytic bytes per device of a run that recorded no prediction (pretraining), at its layout
    and precision (its recompute and optimizer sharding are not in the store's run columns)."""
    from rsscale.benchmarks.prediction import analytic
    from rsscale.scaling.spec.config import PRESETS
    from rsscale.scaling.spec.layout import Layout

    try:
        layout = Layout(tp=int(r["tp"]), pp=int(r["pp"]), dp=int(r["dp"]), sp=bool(r["sp"]), micro_batch=int(r["micro_batch"]),
                        global_batch=int(r["global_batch"]))
        return float(analytic.estimate(PRESETS[r["preset"]], analytic.Plan(layout, precision=r["precision"])).memory["total"])
    except (KeyError, TypeError, ValueError):  # a preset, layout or precision the model does not know
        return np.nan


def _pretrain_runs(metrics: pd.DataFrame) -> pd.DataFrame:
    loss = metrics[(metrics["kind"] == "pretrain") & (metrics["name"] == "loss") & metrics["step"].notna()]
    if loss.empty:
        return pd.DataFrame()
    from rsscale.scaling.spec.config import PRESETS, mae_step_flops

    rows = []
    for run_id, g in loss.groupby("run_id"):
        g = g.sort_values("step")
        r = g.iloc[0]
        per_image = mae_step_flops(PRESETS[r["preset"]]) if r["preset"] in PRESETS else np.nan
        steps = g["step"].to_numpy(float)
        rows.append(dict(run_id=run_id, preset=r["preset"], encoder_params=encoder_params(r["preset"], r["params"]),
                         steps=int(steps.max()), global_batch=r["global_batch"], final_loss=float(g["value"].tail(3).mean()),
                         compute_flops=float(steps.max() * r["global_batch"] * per_image),
                         curve=(steps * r["global_batch"] * per_image, g["value"].to_numpy(float))))
    return pd.DataFrame(rows)


def section_loss(doc: Doc, metrics: pd.DataFrame) -> None:
    doc.heading("Pretraining loss vs parameters and compute")
    p = _pretrain_runs(metrics)
    if p.empty:
        doc.text(NO_DATA + " (run `rsscale pretrain` or `rsscale demo`).")
        return
    doc.text("Final loss: mean of the last 3 logged steps. Compute = steps x global batch x MAE step FLOPs per image.")
    doc.table(p.drop(columns="curve"), "pretrain_loss")
    fig, ax = _loglog_axes("encoder parameters", "final MAE loss", logy=False)
    _runs(ax, p["encoder_params"], p["final_loss"], [f"{r.preset}, run {r.run_id}" for r in p.itertuples()], color="tab:blue")
    best = p.groupby("encoder_params")["final_loss"].min()
    f = _fit_any(best.index, best.values, saturating=True)
    if f:
        _fit_line(ax, f, best.index, color="k", label=f"{f.law} law fit, best run per size")
        doc.fit("final loss vs encoder parameters (best run per size)", f)
    _legend(ax)
    doc.figure(fig, "fig_loss_vs_params", "final pretraining loss vs encoder parameters, one dot per run")
    fig, ax = _loglog_axes("training compute (FLOPs)", "MAE loss", logy=False)
    for _, r in p.iterrows():
        x, y = r["curve"]
        ax.plot(x, y, "-", label=f"{r['preset']} (run {r['run_id']})")
    _legend(ax)
    doc.figure(fig, "fig_loss_vs_compute", "pretraining loss curves vs training compute")
    f = _fit_any(p["compute_flops"], p["final_loss"], saturating=True)
    if f:
        doc.fit("final loss vs training compute", f)


def section_downstream(doc: Doc, metrics: pd.DataFrame) -> None:
    doc.heading("Downstream metrics vs parameters")
    refs = pd.DataFrame(reference_points())
    doc.text("Published reference points (percent). " + PRESET_NOTE)
    doc.table(refs, "paper_points")
    d = metrics[(metrics["kind"] == "finetune") & metrics["name"].isin(DOWNSTREAM) & metrics["step"].isna()].copy()
    if d.empty:
        doc.text(NO_DATA + " for our fine-tuning runs (run `rsscale finetune`): no figure, the published points are "
                 "in the table above.")
        return
    d["encoder_params"] = [encoder_params(p, n) for p, n in zip(d["preset"], d["params"])]
    d["dataset"] = d.get("dataset", pd.Series(["?"] * len(d), index=d.index)).fillna("?")
    d["train_fraction"] = pd.to_numeric(d.get("train_fraction", pd.Series(1.0, index=d.index)), errors="coerce").fillna(1.0)
    cols = [c for c in ("run_id", "preset", "encoder_params", "dataset", "train_fraction", "name", "value", "init",
                        "pretrain_steps", "pretrain_images", "pretrain_flops") if c in d]
    doc.table(d[cols], "downstream")
    doc.text("Our runs use the bundled synthetic data or small subsets unless stated; they are not comparable in "
             "absolute terms with the published full-benchmark numbers.")
    for (dataset, metric), ours in d.groupby(["dataset", "name"]):  # a figure where we have points, published ones beside
        fig, ax = _loglog_axes("encoder parameters", f"{metric} (%)", logy=False)
        for p in reference_points(dataset, metric):
            ax.plot(p["params"], p["value"], "s", label=p["model"])
        # one line per training-data fraction (mean over runs of a size), the paper's RQ4; a dot per run
        means = ours.groupby(["train_fraction", "encoder_params", "preset"], as_index=False)["value"].mean()
        for frac, line in means.groupby("train_fraction"):
            line = line.sort_values("encoder_params")
            drawn, = ax.plot(line["encoder_params"], line["value"], "-", label=f"rsscale, {100 * frac:g} % of training data")
            runs = ours[ours["train_fraction"] == frac]
            _runs(ax, runs["encoder_params"], runs["value"], runs["run_id"], color=drawn.get_color())
        _legend(ax)
        doc.figure(fig, f"fig_{dataset}_{metric}", f"{dataset} {metric} vs encoder parameters: one dot per run (run id "
                   "beside), one line per training fraction through the means; squares: published")
        if means["train_fraction"].nunique() > 1:
            fig, ax = _loglog_axes("fraction of training data", f"{metric} (%)", logy=False)
            for preset, line in means.groupby("preset"):
                line = line.sort_values("train_fraction")
                ax.plot(line["train_fraction"], line["value"], "o-", label=f"{preset} ({line['encoder_params'].iloc[0]:.3g} params)")
            _legend(ax)
            doc.figure(fig, f"fig_{dataset}_{metric}_vs_fraction", f"{dataset} {metric} vs training-data fraction, one line per model size")


def section_kernels(doc: Doc, metrics: pd.DataFrame, runs: pd.DataFrame) -> None:
    doc.heading("Kernel speed over commits")
    k = metrics[(metrics["kind"] == "kernel") & (metrics["name"] == "ms")].copy()
    if k.empty or "kernel" not in k:
        doc.text(NO_DATA + " (run `rsscale kernels bench`).")
        return
    started = runs.set_index("id")["started"]
    k["started"] = k["run_id"].map(started)
    k["commit"] = k["git_commit"].fillna("?")
    for col in ("impl", "shape", "direction", "dtype"):
        if col not in k:
            k[col] = ""
    k["series"] = k["impl"].astype(str) + " " + k["shape"].astype(str) + " " + k["direction"].astype(str)
    order = k.drop_duplicates("run_id").sort_values("started")
    labels = [f"{c[:8]} (run {r})" for r, c in zip(order["run_id"], order["commit"])]
    pos = {r: i for i, r in enumerate(order["run_id"])}
    latest = k.sort_values("started").groupby(["kernel", "series", "dtype"]).agg(first_ms=("value", "first"), latest_ms=("value", "last"),
                                                                                 runs=("value", "size")).reset_index()
    latest["change_pct"] = 100 * (latest["latest_ms"] - latest["first_ms"]) / latest["first_ms"]
    doc.table(latest, "kernel_speed")
    for kernel, g in k.groupby("kernel"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for series, s in g.groupby("series"):
            s = s.sort_values("started")
            ax.plot([pos[r] for r in s["run_id"]], s["value"], "o-", label=series)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("ms (median)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        _legend(ax, fontsize=6)
        fig.tight_layout()
        doc.figure(fig, f"fig_kernel_{kernel}", f"{kernel}: time per call over commits (kind=kernel runs)")


def section_study(doc: Doc, metrics: pd.DataFrame, runs: pd.DataFrame) -> None:
    """A study's cells (kind "study", one complete record per cell; benchmarks/reporting/study.py)."""
    study = runs[(runs["kind"] == "study") & (runs["status"] == "complete")] if not runs.empty else runs
    if study.empty:
        return
    doc.heading("Scaling study: held-out loss, IsoFLOP frontier, downstream")
    cfg = {int(r["id"]): r["config"] for _, r in study.iterrows()}
    m = metrics[metrics["run_id"].isin(list(cfg))]
    final = {int(r.run_id): r.value for r in m[m["name"] == "heldout_loss_final"].itertuples()}
    flops = {int(r.run_id): r.value for r in m[m["name"] == "train_flops"].itertuples()}
    pre = pd.DataFrame([dict(cell=c["cell"], model=c["model"], encoder_params=int(study.set_index("id").loc[i, "params"]),
                             steps=c["steps"], images=c.get("images") or "all", budget=c["budget"],
                             train_flops=flops.get(i), heldout_loss=final.get(i))
                        for i, c in cfg.items() if c.get("cell_kind") == "pretrain"])
    name = study.iloc[0]["config"].get("study")
    doc.text(f"Study `{name}`: {len(cfg)} cells complete. Held-out loss: MAE loss of the last checkpoint on a fixed "
             "held-out image set with fixed masks (never trained on). Training FLOPs = steps x batch x MAE step FLOPs.")
    if pre.empty:
        return
    doc.table(pre.sort_values(["budget", "encoder_params"]), "study_cells")
    # (a) held-out loss vs parameters at the largest budget (largest image count)
    top = pre[(pre["budget"] == pre["budget"].max())]
    top = top[top["images"] == top["images"].iloc[-1]].sort_values("encoder_params")
    fig, ax = _loglog_axes("encoder parameters", "held-out MAE loss")
    ax.plot(top["encoder_params"], top["heldout_loss"], "o", color="k", label="measured")
    if len(top) >= 3:
        f = fitting.fit_power_law(top["encoder_params"], top["heldout_loss"])
        _fit_line(ax, f, top["encoder_params"], color="k", label=f"L = a N^c, c = {f.params['c']:.3f}")
        doc.fit(f"held-out loss vs encoder parameters (study {name}, largest budget)", f)
    if len(top) >= 4:  # (d) the law fitted without the largest model predicts it
        n, y = top["encoder_params"].to_numpy(float), top["heldout_loss"].to_numpy(float)
        pred, lo, hi = fitting.predict_with_interval(n[:-1], y[:-1], n[-1])
        inside = lo <= y[-1] <= hi
        ax.errorbar([n[-1]], [pred], yerr=[[pred - lo], [hi - pred]], fmt="s", color="tab:red", capsize=3,
                    label="predicted from the smaller sizes")
        doc.table(pd.DataFrame([dict(model=top["model"].iloc[-1], encoder_params=int(n[-1]), predicted=pred, ci_low=lo,
                                     ci_high=hi, measured=y[-1], within_interval=inside,
                                     error_pct=100 * (pred - y[-1]) / y[-1])]), "study_prediction")
        doc.text("Prediction check: a power law fitted on every size but the largest predicts the largest one's "
                 f"held-out loss; the measurement {'lies inside' if inside else 'falls OUTSIDE'} the 95 % interval.")
    _legend(ax)
    doc.figure(fig, "fig_study_heldout_vs_params", "held-out loss vs encoder parameters at the largest budget")
    # (b) IsoFLOP profiles and the compute-optimal frontier
    profiles = {b: (g["encoder_params"].to_numpy(float), g["heldout_loss"].to_numpy(float))
                for b, g in pre.groupby("budget") if g["encoder_params"].nunique() >= 3}
    if pre["train_flops"].notna().all() and len(profiles) >= 2:
        fig, ax = _loglog_axes("encoder parameters", "held-out MAE loss")
        compute = {b: float(g["train_flops"].median()) for b, g in pre.groupby("budget")}
        for b, (n, y) in sorted(profiles.items()):
            order = np.argsort(n)
            line, = ax.plot(n[order], y[order], "o-", label=f"budget {b:g} (~{compute[b]:.2g} FLOPs)")
            opt, inside = fitting.isoflop_optimum(n, y)
            ax.axvline(opt, color=line.get_color(), ls=":", lw=1)
            ax.plot([opt], [np.interp(np.log(opt), np.log(n[order]), y[order])], "*", ms=12, color=line.get_color(),
                    markeredgecolor="k" if inside else "none")
        _legend(ax)
        doc.figure(fig, "fig_study_isoflop", "IsoFLOP profiles: held-out loss vs size per compute budget; "
                   "stars mark the loss-minimising size (parabola in log N; outlined when inside the measured sizes)")
        if len(profiles) >= 3:
            f, optima = fitting.fit_frontier({compute[b]: v for b, v in profiles.items()})
            doc.fit(f"compute-optimal size N_opt vs training FLOPs (study {name})", f)
            doc.table(pd.DataFrame([dict(train_flops=c, n_opt=o[0], inside_measured_sizes=o[1]) for c, o in optima.items()]),
                      "study_frontier")
            fig, ax = _loglog_axes("training FLOPs", "compute-optimal encoder parameters")
            cs = np.array(sorted(optima))
            for inside, style in ((True, dict(color="k")), (False, dict(markerfacecolor="none", markeredgecolor="k"))):
                at = [c for c in cs if optima[c][1] == inside]
                if at:
                    ax.plot(at, [optima[c][0] for c in at], "*", ms=10, ls="none", **style,
                            label="optimum inside the sizes" if inside else "optimum at the ladder's edge (a bound)")
            _fit_line(ax, f, cs, color="k", label=f"N_opt = a C^c, c = {f.params['c']:.2f}")
            _legend(ax)
            doc.figure(fig, "fig_study_frontier", "compute-optimal frontier fitted to the IsoFLOP optima")
    # (c) downstream metrics of the study's fine-tuning cells
    ft = [dict(model=c["model"], task=c["task"], fraction=c["fraction"], encoder_params=int(study.set_index("id").loc[i, "params"]),
               metric=r.name, value=r.value)
          for i, c in cfg.items() if c.get("cell_kind") == "finetune"
          for r in m[(m["run_id"] == i) & m["name"].isin(DOWNSTREAM)].itertuples()]
    if ft:
        ft = pd.DataFrame(ft)
        doc.table(ft, "study_downstream")
        fig, ax = _loglog_axes("encoder parameters", "metric (%)", logy=False)
        for (task, metric, fraction), g in ft.groupby(["task", "metric", "fraction"]):
            g = g.sort_values("encoder_params")
            ax.plot(g["encoder_params"], g["value"], "o-", label=f"{task} {metric}, {fraction:g} of labels")
        _legend(ax)
        doc.figure(fig, "fig_study_downstream", "downstream metric vs encoder parameters (study cells)")


def section_fits(doc: Doc) -> None:
    doc.heading("Fitted scaling exponents")
    if not doc.fits:
        doc.text(NO_DATA + " (a fit needs at least 3 model sizes; the saturating law 4).")
        return
    rows = [dict(what=f["what"], law=f["law"], exponent_c=f["params"]["c"],
                 ci_low=f["ci"].get("c", (np.nan, np.nan))[0], ci_high=f["ci"].get("c", (np.nan, np.nan))[1], points=f["n"],
                 caveats=f["caveats"] or "-") if not f["problem"] else
            dict(what=f["what"], law=f["law"], exponent_c=np.nan, ci_low=np.nan, ci_high=np.nan, points=f["n"],
                 caveats=f"not meaningful: {f['problem']}")
            for f in doc.fits]
    doc.table(pd.DataFrame(rows), "fits")
    doc.text("Power law y = a N^c; saturating law E = a (N + b)^-c + d (Zhai et al. 2022), fitted only with more sizes "
             "than its 4 parameters; 95 % bootstrap intervals. A fit with no more points than parameters, no finite "
             "interval or an exponent beyond 10 is not meaningful and shows no numbers. See [METHODS.md](METHODS.md).")


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def write_report(results_path: str | None, out_dir: str = "reports", name: str = "latest") -> str:
    """Build the whole report from a results store; returns the path of report.md."""
    from rsscale.scaling.runtime.store import ResultsStore

    store = ResultsStore(results_path, readonly=True)  # reading never writes (read-only media work)
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    runs = store.runs()
    metrics = store.metrics()
    complete = metrics[metrics["status"] == "complete"] if not metrics.empty else metrics
    doc = Doc(folder)
    title = "rsscale scaling report" + ("" if name in GENERIC_NAMES else f": {name}")
    doc.heading(title, 1)
    shutil.copyfile(os.path.join(os.path.dirname(__file__), "METHODS.md"), os.path.join(folder, "METHODS.md"))
    doc.text(f"Results store: `{store.path}`; {len(runs)} runs, {len(metrics)} metric rows. How every number is "
             "predicted, measured and fitted: [METHODS.md](METHODS.md) (a copy beside this report).")
    section_runs(doc, runs)
    sections = [lambda: section_throughput(doc, complete), lambda: section_time_model(doc, complete), lambda: section_peer(doc, complete),
                lambda: section_memory(doc, complete),
                lambda: section_loss(doc, complete), lambda: section_downstream(doc, complete),
                lambda: section_kernels(doc, complete, runs), lambda: section_study(doc, complete, runs)]
    for section in sections:
        section()
    section_fits(doc)
    md = os.path.join(folder, "report.md")
    with open(md, "w") as f:
        f.write(doc.markdown())
    with open(os.path.join(folder, "report.html"), "w") as f:
        f.write(doc.html(title))
    with open(os.path.join(folder, "fits.json"), "w") as f:
        json.dump(doc.fits, f, indent=1, default=float)
    for fit in doc.fits:
        print(f"[report] fit {fit['what']}: {fit['text']}")
    print(f"[report] wrote {md}, report.html and figures in {folder}", flush=True)
    return md


@dataclasses.dataclass
class ReportConfig:
    """Every option of `rsscale report`: the results store read and where the report goes."""
    results: str | None = option(None, "results store (default $RSSCALE_RESULTS or reports/results.db)")
    name: str = option("latest", "report folder name under --out")
    out: str = option("reports", "output folder")

    def __post_init__(self):
        check(self)


def add_arguments(parser) -> None:
    add_options(parser, ReportConfig)


def config_from_args(args) -> ReportConfig:
    return resolve(ReportConfig, args)


def main(args) -> int:
    from rsscale.scaling.runtime.store import resolve_path

    config = config_from_args(args)
    path = resolve_path(config.results)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no results store at {path}: run `rsscale demo`, `rsscale pretrain`, `rsscale bench` "
                                "or `rsscale finetune` first, or pass --results")
    write_report(path, config.out, config.name)
    return 0
