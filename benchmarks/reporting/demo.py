"""`rsscale demo`: the whole path in a few minutes on a laptop CPU.

    rsscale demo [--out runs/demo] [--steps 30]

0. refuses to run over an earlier demo in <out> unless --overwrite, which deletes it first (its
   store would mix both runs into the report);
1. writes the bundled synthetic aerial dataset if missing (scaling.data.data.dataset_for);
2. pretrains each model of the CPU ladder (tiny, mini, small, medium) for a few MAE steps in
   this process, recording loss curves and step times into <out>/results.db;
3. writes the scaling report from that store (reports.report), and says where everything is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass

from rsscale.scaling.runtime.log import progress
from rsscale.scaling.runtime.options import add_options, check, option, resolve
from rsscale.scaling.spec.config import CPU_LADDER, get_preset, param_count
from rsscale.scaling.spec.layout import Layout


@dataclass
class DemoConfig:
    """Every option of `rsscale demo`: where it writes, the models it pretrains and for how long."""
    out: str = option("runs/demo", "output folder (results.db, runs, report)")
    steps: int = option(30, "pretraining steps per model", ge=1)
    data: str = option("data/synthetic", "where the bundled dataset lives (written there if the folder is missing or empty)")
    overwrite: bool = option(False, "delete an earlier demo in --out (its store, report and model folders) and start over")
    models: str = option(",".join(CPU_LADDER), "comma-separated presets to pretrain")
    batch: int = option(8, "global batch (one micro-batch)", ge=1)

    def __post_init__(self):
        check(self)
        if not self.model_names:
            raise ValueError(f"--models (config key 'models') names no preset, got {self.models!r}")
        for name in self.model_names:  # refused before any data is written or model trained
            try:
                get_preset(name)
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"--models (config key 'models'): {e}") from None

    @property
    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]


def add_arguments(parser) -> None:
    add_options(parser, DemoConfig)


def config_from_args(args) -> DemoConfig:
    return resolve(DemoConfig, args)


def previous_demo(out: str, models: list[str]) -> list[str]:
    """What an earlier demo left in `out` that this one writes: its store, report and model folders
    (those its store records and this run's)."""
    from rsscale.scaling.runtime.store import ResultsStore

    store, names = os.path.join(out, "results.db"), set(models)
    if os.path.exists(store):
        with contextlib.suppress(ValueError):  # a broken store goes with the rest
            names |= set(ResultsStore(store, readonly=True).runs()["preset"].dropna())
    paths = [store, store + "-wal", store + "-shm", os.path.join(out, "report"), *(os.path.join(out, n) for n in sorted(names))]
    return [p for p in paths if os.path.exists(p)]


def clear_previous_demo(out: str, models: list[str], overwrite: bool) -> None:
    """Refuse to run over an earlier demo unless overwrite (then delete it): the report would mix
    both demos' runs, and the fine-tuning examples point at its model folders."""
    previous = previous_demo(out, models)
    if not previous:
        return
    names = ", ".join(os.path.relpath(p, out) for p in previous if not p.endswith(("-wal", "-shm")))
    if not overwrite:
        raise ValueError(f"{out} already holds a demo ({names}): pass --overwrite to delete it and start over, or choose another --out")
    for path in previous:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    print(f"[demo] --overwrite: deleted the earlier demo in {out} ({names})", flush=True)


def main(args) -> int:
    t0 = time.perf_counter()
    args = config_from_args(args)
    from rsscale.scaling.data.data import dataset_for
    from rsscale.scaling.spec.run import Checkpointing, OptimConfig, Recording
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    models = args.model_names
    clear_previous_demo(args.out, models, args.overwrite)
    print(f"[demo] dataset: {args.data} (generated on first use)", flush=True)
    paths = dataset_for(args.data, "pretrain")
    results = os.path.join(args.out, "results.db")
    os.makedirs(args.out, exist_ok=True)
    summary = []
    for name in progress(models, desc="[demo] pretrained", unit="model", inline=False):  # each model logs its steps
        config = TrainConfig(model=name, parallel=Layout(micro_batch=args.batch, global_batch=args.batch),
                             optim=OptimConfig(lr=2e-3, warmup=max(1, args.steps // 6)), steps=args.steps,
                             data=paths["pretrain"], num_workers=1, checkpointing=Checkpointing(out=os.path.join(args.out, name)),
                             recording=Recording(results=results, log_every=max(1, args.steps // 3)))
        t = time.perf_counter()
        records = Trainer.build(config).fit()
        summary.append((name, param_count(get_preset(name), "encoder"), records[0]["loss"], records[-1]["loss"], time.perf_counter() - t))
    print("\n[demo] model    encoder params   loss first -> last   wall")
    for name, params, first, last, wall in summary:
        print(f"[demo] {name:<8} {params:>14,}   {first:.4f} -> {last:.4f}   {wall:5.1f} s")
    report = None
    try:
        from rsscale.benchmarks.reporting.report import write_report
    except ImportError as e:
        print(f"[demo] report module unavailable ({e}); later run: rsscale report --results {results} --out {args.out}")
    else:
        report = write_report(results, args.out, "report")
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s. Results store: {results}; checkpoints: {args.out}/<model>/checkpoints"
          + (f"; report: {report} (+ report.html)" if report else ""), flush=True)
    return 0
