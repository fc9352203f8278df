"""`rsscale study PLAN`: a scaling study as a list of cells, run in order, resumable at any point.

    rsscale study cpu-ladder                 # the bundled CPU plan (benchmarks/reporting/plans/cpu-ladder.yaml)
    rsscale study my-plan.yaml --dry-run     # list the cells with predicted times, run nothing
    rsscale study my-plan.yaml --emit-slurm slurm/   # one sbatch script per cell + submit.sh

A plan crosses model sizes x budgets (steps, or training FLOPs from which each size's steps are
derived) x pretraining image counts, and adds fine-tuning cells (tasks x label fractions) on the
encoders of the largest budget. Each pretraining cell is `rsscale pretrain` in its own folder,
always with --resume, so a killed cell continues from its last checkpoint; when it has trained,
its checkpoints are evaluated on a fixed held-out image set with fixed masks
(scaling/train/heldout.py) and ONE store run of kind "study" is written for the cell, in one
transaction at the end. A cell counts as done only through that record, so restarting the study
skips finished cells, resumes the half-done one and never records a cell twice.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rsscale.scaling.runtime.launch import command_line

if TYPE_CHECKING:
    from rsscale.scaling.train.pretrain import TrainConfig
from rsscale.scaling.runtime.log import progress
from rsscale.scaling.runtime.options import add_options, check, option, resolve

log = logging.getLogger("rsscale.study")

PLANS_DIR = Path(__file__).with_name("plans")
TOP_KEYS = {"name", "models", "budgets", "images", "heldout", "pretrain", "finetune", "data", "synthetic", "out", "results", "slurm",
            "lr_width", "env", "jobs"}


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class Cell:
    key: str  # unique within the study, also its folder name
    kind: str  # "pretrain" or "finetune"
    model: str
    steps: int
    images: int | None = None  # pretraining images (None: all)
    budget: float | None = None  # the plan's budget value this cell came from (steps or FLOPs)
    task: str | None = None
    fraction: float | None = None
    parent: str | None = None  # the pretraining cell a fine-tuning cell starts from


@dataclass
class Plan:
    name: str
    path: str
    models: list[str]
    budget_kind: str  # "steps" or "flops"
    budgets: list[float]
    images: list[int | None]
    heldout: dict = field(default_factory=dict)
    pretrain: TrainConfig | None = None  # every pretraining cell's options (the plan's pretrain section), before the cell's own
    pretrain_nproc: int = 1  # processes per pretraining cell (pretrain.nproc)
    finetune: dict = field(default_factory=dict)
    data: str = "synthetic"
    out: str = ""
    results: str = ""
    slurm: dict = field(default_factory=dict)
    synthetic: dict = field(default_factory=dict)  # rsscale data options when data is "synthetic"
    lr_width: int | None = None  # per-size learning rate pretrain.optim.lr * lr_width / width (None: one lr)
    env: dict = field(default_factory=dict)  # environment variables of the cells run here (e.g. OMP_NUM_THREADS)
    jobs: int = 1  # cells run at once on this machine (each its own process tree)


def _need(path, cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"{path}: {message}")


def _number(v):
    """PyYAML reads 2.0e13 (no sign in the exponent) as a string; accept it as the number it means."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _positive_list(path, key, values, typ) -> list:
    _need(path, isinstance(values, list) and values, f"{key} must be a non-empty list")
    values = [_number(v) for v in values]
    for v in values:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (typ is float or float(v).is_integer())
        _need(path, ok, f"{key} must hold positive {'integers' if typ is int else 'numbers'}, got {v!r}")
    return [typ(v) for v in values]


def load_plan(spec: str, out: str | None = None, results: str | None = None) -> Plan:
    """A plan from a file, or the name of a bundled plan (reports/plans/<name>.yaml); checked whole."""
    from rsscale.scaling.runtime.config_file import load_config_file
    from rsscale.scaling.spec.config import PRESETS, is_model_file

    path = Path(spec)
    if not path.exists() and (PLANS_DIR / f"{spec}.yaml").exists():
        path = PLANS_DIR / f"{spec}.yaml"
    raw = load_config_file(path)
    unknown = set(raw) - TOP_KEYS
    _need(path, not unknown, f"unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(TOP_KEYS))})")
    name = str(raw.get("name") or path.stem)
    models = raw.get("models")
    _need(path, isinstance(models, list) and models, "models must be a non-empty list of presets")
    for m in models:
        _need(path, m in PRESETS or is_model_file(m), f"unknown model preset {m!r} in models (rsscale models lists them; or a model file)")
    budgets = raw.get("budgets")
    _need(path, isinstance(budgets, dict) and len(budgets) == 1 and next(iter(budgets)) in ("steps", "flops"),
          "budgets must be {steps: [...]} or {flops: [...]}")
    kind, values = next(iter(budgets.items()))
    values = _positive_list(path, f"budgets.{kind}", values, int if kind == "steps" else float)
    images = raw.get("images")
    images = [None] if images in (None, "all") else _positive_list(path, "images", images, int)
    sections = {}
    for key in ("heldout", "pretrain", "finetune", "slurm", "synthetic", "env"):
        sections[key] = raw.get(key) or {}
        _need(path, isinstance(sections[key], dict), f"{key} must be a mapping")
    ho = {"images": 64, "seed": 0, "every": 0, **sections["heldout"]}
    for k in ("images", "every", "seed"):
        _need(path, isinstance(ho[k], int) and not isinstance(ho[k], bool) and ho[k] >= (1 if k == "images" else 0),
              f"heldout.{k} must be an integer >= {1 if k == 'images' else 0}, got {ho[k]!r}")
    ft = {"tasks": [], "fractions": [1.0], "steps": 100, **sections["finetune"]}
    for t in ft["tasks"]:
        _need(path, t in ("seg", "det"), f"finetune.tasks holds {t!r}; the tasks are seg and det")
    ft["fractions"] = _positive_list(path, "finetune.fractions", ft["fractions"], float)
    _need(path, all(f <= 1 for f in ft["fractions"]), "finetune.fractions must lie in (0, 1]")
    if ft["tasks"]:  # the finetune options are checked now, not when the first fine-tuning cell starts
        from rsscale.finetune.finetune import finetune_options

        try:
            finetune_options(ft["tasks"][0], **{k: v for k, v in ft.items() if k not in FINETUNE_PLAN_KEYS})
        except ValueError as e:
            raise ValueError(f"{path}: finetune: {e}") from None
    jobs = raw.get("jobs", 1)
    _need(path, isinstance(jobs, int) and not isinstance(jobs, bool) and jobs >= 1, f"jobs must be an integer >= 1, got {jobs!r}")
    lr_width = raw.get("lr_width")
    _need(path, lr_width is None or (isinstance(lr_width, int) and not isinstance(lr_width, bool) and lr_width > 0),
          f"lr_width must be a positive integer (the width that gets pretrain.optim.lr), got {lr_width!r}")
    default_out = os.path.join("runs", "study", name)
    pretrain = dict(sections["pretrain"])
    nproc = pretrain.pop("nproc", 1)
    _need(path, isinstance(nproc, int) and not isinstance(nproc, bool) and nproc >= 1, f"pretrain.nproc must be an integer >= 1, got {nproc!r}")
    return Plan(name=name, path=str(path), models=list(models), budget_kind=kind, budgets=values, images=images,
                heldout=ho, pretrain=pretrain_config(path, pretrain), pretrain_nproc=nproc, finetune=ft, data=str(raw.get("data", "synthetic")),
                out=out or raw.get("out") or default_out,
                results=results or raw.get("results") or os.path.join(out or raw.get("out") or default_out, "results.db"),
                slurm=sections["slurm"], synthetic=sections["synthetic"], lr_width=lr_width,
                env={str(k): str(v) for k, v in sections["env"].items()}, jobs=jobs)


def pretrain_config(path, section: dict):
    """The plan's pretrain section as `rsscale pretrain`'s config tree (nested like its --config file:
    parallel, compute, data_parallel, optim, ...), checked whole when the plan loads."""
    from rsscale.scaling.runtime.options import build, defaults_with
    from rsscale.scaling.train.pretrain import TrainConfig

    tree, _ = defaults_with(TrainConfig, section, f"{path}: pretrain")
    try:
        return build(TrainConfig, tree)
    except ValueError as e:
        raise ValueError(f"{path}: pretrain: {e}") from None


def steps_for(plan: Plan, model: str, budget: float) -> int:
    """Optimizer steps of `model` for a budget: the budget itself, or FLOPs / (batch x FLOPs per image)."""
    if plan.budget_kind == "steps":
        return int(budget)
    from rsscale.scaling.spec.config import get_preset, mae_step_flops

    return max(1, round(budget / (plan.pretrain.parallel.global_batch * mae_step_flops(get_preset(model)))))


def lr_for(plan: Plan, model: str) -> float:
    """Peak learning rate of a size: pretrain.optim.lr, times lr_width / width when the plan sets lr_width
    (muP-style 1/width for Adam: narrow models take larger steps, wide ones smaller)."""
    from rsscale.scaling.spec.config import get_preset

    lr = plan.pretrain.optim.lr
    return lr * plan.lr_width / get_preset(model).width if plan.lr_width else lr


def cells(plan: Plan) -> list[Cell]:
    """Every cell in run order: pretraining (small models and budgets first), then fine-tuning."""
    out = []
    for images in plan.images:
        for budget in plan.budgets:
            for model in plan.models:
                tag = f"{budget:g}".replace("+", "")
                key = f"pt-{model}-{plan.budget_kind}{tag}" + (f"-n{images}" if images else "")
                out.append(Cell(key, "pretrain", model, steps_for(plan, model, budget), images, budget))
    largest = max(plan.budgets)
    for parent in [c for c in out if c.budget == largest and c.images == plan.images[-1]]:
        for task in plan.finetune["tasks"]:
            for fraction in plan.finetune["fractions"]:
                key = f"ft-{task}-f{fraction:g}-{parent.key}"
                out.append(Cell(key, "finetune", parent.model, int(plan.finetune["steps"]), task=task,
                                fraction=fraction, parent=parent.key))
    return out


# ---------------------------------------------------------------------------------------------
# Data: nested image subsets and the held-out set, fixed by sorted file order
# ---------------------------------------------------------------------------------------------


def data_root(plan: Plan) -> str:
    from rsscale.scaling.data.data import ensure_dataset

    if plan.data == "synthetic":
        root = os.path.join(plan.out, "data")
        return ensure_dataset(root, **plan.synthetic)["root"]
    return plan.data


def split_images(plan: Plan) -> tuple[list[str], list[str]]:
    """(training pool, held-out files): the held-out set is every k-th file of the sorted list, so
    it spans the scene types; the pool is the rest, in sorted order (subsets are its prefixes)."""
    from rsscale.scaling.data.loader import scan_images
    from rsscale.scaling.data.data import dataset_paths

    root = data_root(plan)
    folder = dataset_paths(root)["pretrain"] if plan.data == "synthetic" else root
    files = sorted(scan_images(folder))
    n_held = plan.heldout["images"]
    if len(files) < 2 * n_held:
        raise ValueError(f"{folder} has {len(files)} images; the plan holds out {n_held} and needs at least as many to train on")
    stride = len(files) // n_held
    held = set(files[::stride][:n_held])
    return [f for f in files if f not in held], sorted(held)


def subset_folder(plan: Plan, pool: list[str], images: int | None) -> str:
    """A folder of links to the first `images` files of the pool (nested: smaller subsets are prefixes)."""
    if images is not None and images > len(pool):
        raise ValueError(f"the plan asks for {images} pretraining images; only {len(pool)} remain after the held-out set")
    chosen = pool if images is None else pool[:images]
    folder = Path(plan.out) / "data" / f"subset-{images or 'all'}"
    marker = folder / ".complete"
    if not marker.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for i, src in enumerate(chosen):
            link = folder / f"{i:07d}{Path(src).suffix}"
            if not link.exists():
                link.symlink_to(os.path.abspath(src))
        marker.write_text(str(len(chosen)))
    return str(folder)


# ---------------------------------------------------------------------------------------------
# Running cells
# ---------------------------------------------------------------------------------------------


def cell_dir(plan: Plan, cell: Cell) -> str:
    return os.path.join(plan.out, "cells", cell.key)


RESUME_EVERY = 1000  # steps between checkpoints when the plan asks for no held-out curve: a killed cell loses at most this much


def pretrain_args(plan: Plan, cell: Cell, data: str) -> list[str]:
    """`rsscale pretrain` arguments of a cell (launch flags excluded): the plan's options with the cell's own."""
    from rsscale.scaling.runtime.options import to_argv

    every = plan.heldout["every"]
    config = dataclasses.replace(
        plan.pretrain, model=cell.model, steps=cell.steps, data=data,
        checkpointing=dataclasses.replace(plan.pretrain.checkpointing, out=cell_dir(plan, cell), resume=True,
                                          save_every=every or min(cell.steps, RESUME_EVERY),
                                          keep=plan.pretrain.checkpointing.keep if every else 2),  # no held-out curve: the resume points only, the newest two
        recording=dataclasses.replace(plan.pretrain.recording, results=plan.results),
        optim=dataclasses.replace(plan.pretrain.optim, lr=float(f"{lr_for(plan, cell.model):.4g}")))
    argv = to_argv(config)  # the values other than pretrain's defaults; the model always, so every cell's command names it
    return argv if "--model" in argv else ["--model", cell.model, *argv]


FINETUNE_PLAN_KEYS = ("tasks", "fractions", "steps", "nproc")  # the plan's own keys of its finetune section; the rest are finetune options


def finetune_options_of(plan: Plan, cell: Cell):
    """`rsscale finetune`'s options of a fine-tuning cell: the plan's finetune section (option names,
    or sections nested like finetune's --config) with the cell's own values."""
    from rsscale.finetune.finetune import finetune_options

    own = {k: v for k, v in plan.finetune.items() if k not in FINETUNE_PLAN_KEYS}
    return finetune_options(cell.task, int(plan.finetune.get("nproc", 1)), **{
        **own, "dataset": "synthetic" if plan.data == "synthetic" else "loveda", "data": data_root(plan),
        "checkpoint": cell_dir(plan, Cell(cell.parent, "pretrain", cell.model, 0)), "steps": cell.steps, "out": cell_dir(plan, cell),
        "results": plan.results, "train_fraction": cell.fraction if cell.fraction is not None else 1.0})


def finetune_args(plan: Plan, cell: Cell) -> list[str]:
    """`rsscale finetune` arguments of a cell (launch flags excluded)."""
    from rsscale.scaling.runtime.options import to_argv

    return to_argv(finetune_options_of(plan, cell))


def done_cells(plan: Plan) -> dict[str, dict]:
    """{cell key: its study record's config} for the cells this study has completed."""
    from rsscale.scaling.runtime.store import ResultsStore

    if not os.path.exists(plan.results):
        return {}
    runs = ResultsStore(plan.results).runs(kind="study", status="complete")
    done = {}
    for c in runs.get("config", []):
        if c.get("study") == plan.name:
            done[c["cell"]] = c
    return done


def checkpoints_of(folder: str) -> list[tuple[int, str]]:
    ck = Path(folder) / "checkpoints"
    found = sorted((int(p.name.split("_")[1]), str(p)) for p in ck.glob("step_*") if (p / "index.json").exists())
    return found


def finish_pretrain_cell(plan: Plan, cell: Cell, heldout_files: list[str], wall_s: float) -> dict:
    """Held-out loss of each checkpoint of a trained cell, then the cell's one study record."""
    from rsscale.scaling.runtime.store import ResultsStore
    from rsscale.scaling.spec.config import get_preset, mae_step_flops, param_count
    from rsscale.scaling.train.heldout import heldout_images, heldout_loss

    cfg = get_preset(cell.model)
    images = heldout_images(heldout_files, cfg)
    every = plan.heldout["every"]
    scored = [(step, path) for step, path in checkpoints_of(cell_dir(plan, cell)) if step == cell.steps or (every and step % every == 0)]
    curve = [(step, heldout_loss(path, images, seed=plan.heldout["seed"]))
             for step, path in progress(scored, desc=f"[study] held-out loss of {cell.key}", unit="checkpoint")]
    if not curve or curve[-1][0] != cell.steps:
        raise RuntimeError(f"cell {cell.key}: no checkpoint of step {cell.steps} in {cell_dir(plan, cell)} after training")
    batch = plan.pretrain.parallel.global_batch
    flops = cell.steps * batch * mae_step_flops(cfg)
    config = dict(study=plan.name, cell=cell.key, cell_kind="pretrain", model=cell.model, steps=cell.steps,
                  images=cell.images, budget=cell.budget, budget_kind=plan.budget_kind, lr=lr_for(plan, cell.model), plan=plan.path)
    with ResultsStore(plan.results).run(kind="study", preset=cell.model, params=param_count(cfg, "encoder"),
                                        global_batch=batch, config=config) as run:
        run.log_many([("heldout_loss", loss, step) for step, loss in curve]
                     + [("heldout_loss_final", curve[-1][1], None), ("train_flops", float(flops), None),
                        ("wall_s", wall_s, None)])
    return {"heldout_loss": curve[-1][1], "flops": flops}


def finetune_metric(plan: Plan, cell: Cell) -> tuple[str, float]:
    """The headline metric (mIoU or mAP) of the fine-tuning run that wrote into the cell's folder."""
    from rsscale.scaling.runtime.store import ResultsStore

    store = ResultsStore(plan.results)
    name = "mIoU" if cell.task == "seg" else "mAP"
    out = os.path.abspath(cell_dir(plan, cell))
    runs = store.runs(kind="finetune", status="complete")
    mine = [r for r, c in zip(runs.get("id", []), runs.get("config", [])) if os.path.abspath((c.get("checkpointing") or {}).get("out") or c.get("out") or "") == out]  # (top-level: stores written before the sections)
    values = store.metrics(name=name, run_id=int(mine[-1])) if mine else None
    if values is None or values[values["step"].isna()].empty:
        raise RuntimeError(f"cell {cell.key}: no complete fine-tuning run in {out} recorded {name} in {plan.results}")
    return name, float(values[values["step"].isna()]["value"].iloc[-1])


def finish_finetune_cell(plan: Plan, cell: Cell, wall_s: float) -> dict:
    from rsscale.scaling.runtime.store import ResultsStore
    from rsscale.scaling.spec.config import get_preset, param_count

    name, value = finetune_metric(plan, cell)
    config = dict(study=plan.name, cell=cell.key, cell_kind="finetune", model=cell.model, task=cell.task,
                  fraction=cell.fraction, parent=cell.parent, plan=plan.path)
    with ResultsStore(plan.results).run(kind="study", preset=cell.model, params=param_count(get_preset(cell.model), "encoder"),
                                        config=config) as run:
        run.log_many([(name, value, None), ("wall_s", wall_s, None)])
    return {name: value}


def predicted_seconds(plan: Plan, cell: Cell, calib: dict | None = None) -> float | None:
    """Training time of a cell from the time model (benchmarks/prediction/timemodel.py), calibrated on this
    machine when it is, else at the measured matmul rate and the datasheet defaults of
    analytic.Hardware (None if unknown). Both leave out process start-up, data loading and the
    held-out evaluation."""
    try:
        from rsscale.benchmarks.prediction import analytic, timemodel
        from rsscale.scaling.spec.config import get_preset

        aplan = analytic.Plan.of(plan.pretrain, dataclasses.replace(plan.pretrain.parallel, dp=1))
        cfg = get_preset(cell.model)
        if calib:
            step_s = timemodel.predict(cfg, aplan, calib, os.cpu_count())["step_s"]
        else:
            step_s = analytic.estimate(cfg, aplan, analytic.Hardware(peak_flops=_peak_flops(), efficiency=0.5)).step_time_s
        return step_s * cell.steps * (1.5 if cell.kind == "finetune" else 1.0)
    except Exception:  # noqa: BLE001 - a prediction is advisory; never stop a study over it
        return None


def calibration(plan: Plan) -> dict | None:
    """This machine's newest `rsscale calibrate` result (the plan's store, else the default one)."""
    try:
        from rsscale.benchmarks.measurement.calibrate import latest
        from rsscale.scaling.runtime.store import environment

        device, precision = environment()["device"], plan.pretrain.compute.precision
        return latest(device, precision, plan.results) or latest(device, precision)
    except Exception:  # noqa: BLE001 - no calibration: the uncalibrated time model predicts
        return None


def measured_ratio(plan: Plan, calib: dict | None) -> tuple[float, int] | None:
    """(median measured / predicted wall time, cells) over this study's recorded cells, or None."""
    from rsscale.scaling.runtime.store import ResultsStore

    if not done_cells(plan):
        return None
    store = ResultsStore(plan.results)
    runs = store.runs(kind="study", status="complete")
    config_of = dict(zip(runs["id"], runs["config"]))
    walls = store.metrics(kind="study", name="wall_s")
    by_cell = {c.key: c for c in cells(plan)}
    ratios = []
    for run_id, wall in zip(walls["run_id"], walls["value"]):
        config = config_of.get(run_id, {})
        cell = by_cell.get(config.get("cell")) if config.get("study") == plan.name else None
        predicted = predicted_seconds(plan, cell, calib) if cell else None
        if predicted and math.isfinite(wall):
            ratios.append(wall / predicted)
    return (float(sorted(ratios)[len(ratios) // 2]), len(ratios)) if ratios else None


_PEAK: list[float] = []


def _peak_flops() -> float:
    if not _PEAK:
        import torch

        from rsscale.benchmarks.prediction.devices import matmul_peak_tflops

        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _PEAK.append(matmul_peak_tflops(dev, "bf16" if dev.type == "cuda" else "fp32") * 1e12)
    return _PEAK[0]


def cell_command(plan: Plan, cell: Cell, pool: list[str]) -> list[str]:
    """The launch command of a cell (torchrun when its section sets nproc > 1)."""
    if cell.kind == "pretrain":
        args = pretrain_args(plan, cell, subset_folder(plan, pool, cell.images))
        return command_line("pretrain", args, plan.pretrain_nproc)
    return command_line("finetune", finetune_args(plan, cell), int(plan.finetune.get("nproc", 1)))


def run_study(plan: Plan, max_cells: int | None = None, jobs: int | None = None) -> int:
    """Run every cell not yet recorded, up to `jobs` at once (a fine-tuning cell waits for its
    pretraining parent); returns the number of cells finished now. A failed cell stops new starts,
    lets the running ones finish and record, then raises."""
    jobs = jobs or plan.jobs
    todo_all = cells(plan)
    done = set(done_cells(plan))
    todo = [c for c in todo_all if c.key not in done]
    log.info("[study] %s: %d cells, %d done, %d to run (%d at a time); results in %s",
             plan.name, len(todo_all), len(done), len(todo), jobs, plan.results)
    if not todo:
        return 0
    pool, held = split_images(plan)
    calib = calibration(plan)
    predicted = {c.key: predicted_seconds(plan, c, calib) for c in todo}
    ratio, t_start = (measured_ratio(plan, calib) or (None,))[0], time.perf_counter()
    pending, running, started, finished, failed = list(todo), {}, 0, 0, []
    try:
        while pending or running:
            while not failed and len(running) < jobs and (max_cells is None or started < max_cells):
                cell = next((c for c in pending if c.kind == "pretrain" or c.parent in done), None)
                if cell is None:
                    break
                pending.remove(cell)
                cmd = cell_command(plan, cell, pool)
                started += 1
                log.info("[study] cell %d/%d %s: %s", len(done) + len(running) + 1, len(todo_all), cell.key, shlex.join(cmd))
                running[cell.key] = (cell, subprocess.Popen(cmd, env={**os.environ, **plan.env}), time.perf_counter())
            if not running:
                break
            time.sleep(0.2)
            for key, (cell, proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[key]
                if proc.returncode:
                    failed.append(f"cell {key} failed (exit code {proc.returncode})")
                    continue
                wall = time.perf_counter() - t0
                result = finish_pretrain_cell(plan, cell, held, wall) if cell.kind == "pretrain" else finish_finetune_cell(plan, cell, wall)
                done.add(key)
                finished += 1
                if predicted.get(key):
                    ratio = wall / predicted[key] if ratio is None else 0.5 * (ratio + wall / predicted[key])
                left = [predicted.get(c.key) for c in pending + [r[0] for r in running.values()]]
                eta = sum(p for p in left if p) * (ratio or 1.0) / jobs if all(left) else float("nan")
                log.info("[study] done %d/%d (%s: %s) in %.0f s; elapsed %.0f s, estimated left %s",
                         len(done), len(todo_all), key, ", ".join(f"{k} {v:.4g}" for k, v in result.items()),
                         wall, time.perf_counter() - t_start, "unknown" if math.isnan(eta) else f"{eta:.0f} s")
    finally:  # an error here (or Ctrl-C) must not leave cells training with nobody to record them
        for _, proc, _ in running.values():
            proc.terminate()
            proc.wait()
    if failed:
        raise RuntimeError(f"{'; '.join(failed)}; rerun `rsscale study {plan.path}` to resume")
    return finished


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------



def emit_slurm(plan: Plan, folder: str) -> list[str]:
    """One sbatch script per cell that is not done (scaling/runtime/launch.py `sbatch_script`), and
    submit.sh chaining them (afterok) in order."""
    from rsscale.scaling.runtime.launch import SLURM_DEFAULTS, sbatch_script

    s = {**SLURM_DEFAULTS, "env": {}, **plan.slurm}
    for key in ("nodes", "gpus_per_node", "cpus_per_task", "port"):
        _need(plan.path, isinstance(s[key], int) and s[key] >= 1, f"slurm.{key} must be a positive integer")
    out = Path(folder)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    done = done_cells(plan)
    todo = [c for c in cells(plan) if c.key not in done]
    pool = split_images(plan)[0] if any(c.kind == "pretrain" for c in todo) else []  # the cells' data, written now (a shared filesystem)
    paths, job_of = [], {}
    submit = ["#!/bin/bash", f"# submit the {len(todo)} remaining cells of study {plan.name} in order", "set -euo pipefail"]
    prev = None
    for cell in todo:
        if cell.kind == "pretrain":
            command, args = "pretrain", pretrain_args(plan, cell, subset_folder(plan, pool, cell.images))
        else:
            command, args = "finetune", finetune_args(plan, cell)
        env = "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in s["env"].items())
        finish = (f"python -m rsscale.scaling.runtime.cli study {shlex.quote(os.path.abspath(plan.path))} --out {shlex.quote(os.path.abspath(plan.out))} "
                  f"--results {shlex.quote(os.path.abspath(plan.results))} --finish-cell {cell.key}")
        text = sbatch_script(f"rsscale-{plan.name}-{cell.key}", f"rsscale study {plan.name}, cell {cell.key}", s, os.path.abspath(out / "logs"),
                             command, args, env=env + f"export RSSCALE_RESULTS={shlex.quote(os.path.abspath(plan.results))}\n", after=finish)
        path = out / f"{cell.key}.sbatch"
        path.write_text(text)
        paths.append(str(path))
        dep = f"--dependency=afterok:${prev} " if prev else ""
        var = "job_" + cell.key.replace("-", "_").replace(".", "_")
        submit.append(f"{var}=$(sbatch --parsable {dep}{shlex.quote(str(path.resolve()))})")
        job_of[cell.key], prev = var, var
    (out / "submit.sh").write_text("\n".join(submit) + "\n")
    os.chmod(out / "submit.sh", 0o755)
    return paths


# ---------------------------------------------------------------------------------------------
# `rsscale study`
# ---------------------------------------------------------------------------------------------


def _secs(t: float) -> str:
    """Whole seconds for long work; three decimals under ten seconds (a tiny study is not '0 s')."""
    return f"{t:,.0f} s" if t >= 10 else f"{t:.3f} s"


def dry_run(plan: Plan, jobs: int | None = None) -> None:
    """Print every cell with its predicted time, and how far the predictions are to be trusted;
    the time left is the cells' sum over the `jobs` run at once (the study's own estimate)."""
    jobs = jobs or plan.jobs
    done, calib = done_cells(plan), calibration(plan)
    measured = measured_ratio(plan, calib)
    scale = measured[0] if measured else 1.0
    total = 0.0
    print(f"study {plan.name}: {len(cells(plan))} cells ({len(done)} done); results {plan.results}")
    for c in cells(plan):
        t = predicted_seconds(plan, c, calib)
        total += (t or 0.0) * scale if c.key not in done else 0.0
        what = f"{c.task} fraction {c.fraction:g} from {c.parent}" if c.kind == "finetune" else f"{c.images or 'all'} images"
        print(f"  {'done' if c.key in done else 'todo':<4} {c.key:<44} {c.model:<8} {c.steps:>7} steps  {what:<40} "
              f"predicted {'?' if t is None else _secs(t * scale)}")
    basis = "the time model calibrated on this machine" if calib else "the uncalibrated time model at this machine's measured matmul rate"
    print(f"predicted time left {_secs(total / jobs)}" + (f" ({_secs(total)} of cells, {jobs} at once)" if jobs > 1 else "") + f", from {basis}"
          + (f", rescaled by the measured/predicted ratio {scale:.3g} of {measured[1]} recorded cell(s)" if measured else ""))
    if not measured:
        print("  caveat: not yet checked against this study's own cells; the training-step model leaves out process start-up, "
              "data loading and evaluation, and the uncalibrated time model is far off on CPU (docs/STUDY.md); "
              "`rsscale calibrate` or a first cell makes it honest")
    elif not 0.5 <= scale <= 2.0:
        print(f"  caveat: the model's own predictions were off by {scale:.2g}x on the recorded cells (shown rescaled)")


@dataclass
class StudyConfig:
    """Every option of `rsscale study` (the command's own; the study itself is the PLAN file's)."""
    plan: str | None = option(None, "plan file (YAML/TOML) or a bundled plan name (cpu-ladder)", positional=True, required=True)
    out: str | None = option(None, "study folder (default: the plan's out, or runs/study/<name>)")
    results: str | None = option(None, "results store (default: <out>/results.db)")
    dry_run: bool = option(False, "list the cells and predicted times; run nothing")
    emit_slurm: str | None = option(None, "write one sbatch script per remaining cell and DIR/submit.sh", metavar="DIR")
    max_cells: int | None = option(None, "stop after starting this many cells", ge=0)
    jobs: int | None = option(None, "cells run at once on this machine (default: the plan's jobs, else 1)", ge=1)
    finish_cell: str | None = option(None, "(used by the sbatch scripts) evaluate and record one trained cell", metavar="KEY")
    report: bool = option(True, "do not write the report at the end")

    def __post_init__(self):
        check(self)


def add_arguments(parser) -> None:
    add_options(parser, StudyConfig)


def config_from_args(args) -> StudyConfig:
    return resolve(StudyConfig, args)


def main(args) -> int:
    args = config_from_args(args)
    plan = load_plan(args.plan, args.out, args.results)
    all_cells = cells(plan)
    if args.dry_run:
        dry_run(plan, args.jobs)
        return 0
    if args.emit_slurm:
        paths = emit_slurm(plan, args.emit_slurm)
        print(f"wrote {len(paths)} sbatch scripts and {os.path.join(args.emit_slurm, 'submit.sh')}")
        return 0
    if args.finish_cell:
        cell = next((c for c in all_cells if c.key == args.finish_cell), None)
        if cell is None:
            raise ValueError(f"no cell {args.finish_cell!r} in study {plan.name}")
        if cell.key not in done_cells(plan):
            _, held = split_images(plan)
            finish_pretrain_cell(plan, cell, held, float("nan")) if cell.kind == "pretrain" else finish_finetune_cell(plan, cell, float("nan"))
        return 0
    os.makedirs(plan.out, exist_ok=True)
    run_study(plan, args.max_cells, args.jobs)
    remaining = len(all_cells) - len(done_cells(plan))
    if remaining == 0 and args.report:
        from rsscale.benchmarks.reporting.report import write_report

        path = write_report(plan.results, plan.out, "report")
        print(f"[study] {plan.name}: all {len(all_cells)} cells done; report {path}")
    elif remaining:
        print(f"[study] {plan.name}: {remaining} cells left; rerun the same command to continue")
    return 0
