"""`rsscale demo`: the whole path in a few minutes on a laptop CPU.

    rsscale demo [--out runs/demo] [--steps 30]

1. writes the bundled synthetic aerial dataset if missing (scaling.synthetic.ensure_dataset);
2. pretrains each model of the CPU ladder (tiny, mini, small, medium) for a few MAE steps in
   this process, recording loss curves and step times into <out>/results.db;
3. writes the scaling report from that store (reports.report), and says where everything is.
"""

from __future__ import annotations

import os
import time

from rsscale.scaling.config import CPU_LADDER, get_preset, param_count
from rsscale.scaling.layout import Layout


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (results.db, runs, report)")
    parser.add_argument("--steps", type=int, default=30, help="pretraining steps per model")
    parser.add_argument("--data", default="data/synthetic", help="where the bundled dataset lives (generated if missing)")
    parser.add_argument("--models", default=",".join(CPU_LADDER), help="comma-separated presets to pretrain")
    parser.add_argument("--batch", type=int, default=8, help="global batch (one micro-batch)")


def main(args) -> int:
    t0 = time.perf_counter()
    from rsscale.scaling.synthetic import dataset_paths, ensure_dataset
    from rsscale.scaling.train import OptimConfig, Trainer, TrainConfig

    print(f"[demo] dataset: {args.data} (generated on first use)", flush=True)
    ensure_dataset(args.data)
    results = os.path.join(args.out, "results.db")
    os.makedirs(args.out, exist_ok=True)
    summary = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        config = TrainConfig(model=name, parallel=Layout(micro_batch=args.batch, global_batch=args.batch),
                             optim=OptimConfig(lr=2e-3, warmup=max(1, args.steps // 6)), steps=args.steps,
                             data=dataset_paths(args.data)["pretrain"], num_workers=1, out=os.path.join(args.out, name),
                             results=results, log_every=max(1, args.steps // 3), overwrite=True)  # a demo rerun starts over
        t = time.perf_counter()
        records = Trainer.build(config).fit()
        summary.append((name, param_count(get_preset(name), "encoder"), records[0]["loss"], records[-1]["loss"], time.perf_counter() - t))
    print("\n[demo] model    encoder params   loss first -> last   wall")
    for name, params, first, last, wall in summary:
        print(f"[demo] {name:<8} {params:>14,}   {first:.4f} -> {last:.4f}   {wall:5.1f} s")
    report = None
    try:
        from rsscale.reports.report import write_report
    except ImportError as e:
        print(f"[demo] report module unavailable ({e}); later run: rsscale report --results {results} --out {args.out}")
    else:
        report = write_report(results, args.out, "report")
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s. Results store: {results}; checkpoints: {args.out}/<model>/checkpoints"
          + (f"; report: {report} (+ report.html)" if report else ""), flush=True)
    return 0
