"""Mutation testing of the core modules with mutmut 3, one module at a time.

    python tests/mutation/run.py --list
    python tests/mutation/run.py rotated            # one module (or several)
    python tests/mutation/run.py all                # every module; slow (see reports/mutation.md)

Each module's mutants run against that module's tests only (MODULES below), on --jobs workers
(2 by default). mutmut names a mutant after the module path of the file it mutates, while the
folders install under `rsscale.` (setup.cfg package_dir), so every module runs in a stage folder
(--work, one per module) that holds the five folders as src/rsscale/<folder>; mutmut strips
`src.` and the mutant names match the imported modules (`rsscale.scaling.parallel.pipeline.x_...`).

mutmut records which tests reach a function only in its own process; a function reached (also)
in spawned workers (the gloo tests) or subprocesses would miss those tests, so every mutant that
survives its first run is run again with every test of the module. Functions mutmut cannot mutate (decorated ones, e.g. @triton.jit
kernels) are not counted; the report says so.

Results are merged into reports/mutation.md (one section per module; other modules' sections
are kept). tests/mutation/equivalent.txt lists mutants that cannot change behaviour, one per line:
`<mutant name>  <one-line reason>`; they are subtracted from the score's denominator.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("mutation")

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("scaling", "kernels", "benchmarks", "finetune")
REPORT = ROOT / "reports" / "mutation.md"
EQUIVALENT = Path(__file__).with_name("equivalent.txt")

# boundary cases (once one file, test_thresholds.py) that the metrics, rotated and store modules all share
THRESHOLDS = [f"tests/finetune/evaluation/test_metrics.py::test_{t}" for t in (
    "dota_match_exactly_at_the_threshold_follows_each_tool", "dota_voc07_ap_hand_computed", "metrics_command_line_on_a_hand_made_submission",
    "metrics_command_line_named_class_lists", "metrics_command_line_threshold_and_help", "seg_metric_with_one_class")] + [
    f"tests/scaling/runtime/test_store.py::test_{t}" for t in (
        "store_tags_named_like_columns_never_duplicate_columns", "store_rejects_bad_input_with_one_sentence",
        "store_lock_errors_environment_and_config_values")] + [
    "tests/finetune/test_rotated.py::test_rotated_nms_keeps_a_box_exactly_at_the_threshold"]

# module key -> (files to mutate, relative to the repo root; test files that check them)
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "parallel": (["scaling/parallel/mappings.py", "scaling/parallel/state.py"],
                 ["tests/scaling/parallel/test_tensor_parallel.py", "tests/scaling/spec/test_config.py", "tests/scaling/parallel/test_mappings.py",
                  "tests/scaling/parallel/test_state.py"]),
    "optim": (["scaling/train/optim.py"], ["tests/scaling/train/test_optim.py"] + [
        f"tests/scaling/train/test_optim_overlap.py::test_{t}" for t in (
            "overlapped_and_bucketed_reduction_equal_the_plain_run[dp2]", "bf16_weights_with_fp32_master_track_fp32")]),
    "mae": (["scaling/model/mae.py"], ["tests/scaling/model/test_mae.py", "tests/scaling/parallel/test_tensor_parallel.py"]),
    # the trainings of tests/scaling/train/test_layouts.py (its `runs` fixture) take minutes: only its up-front check here
    "layout": (["scaling/spec/layout.py"], ["tests/scaling/spec/test_layout.py",
                                            "tests/scaling/train/test_layouts.py::test_invalid_layout_fails_before_any_process_group"]
        # the layout flags; chunk ranges
        + ["tests/scaling/runtime/test_launch.py", "tests/scaling/train/test_interleaved.py::test_chunks_are_interleaved_over_ranks"]),
    "kernels": (["kernels/fused_layer_norm.py", "kernels/flash_attention.py"],
                ["tests/kernels/test_fused_layer_norm.py", "tests/kernels/test_flash_attention.py", "tests/kernels/test_kernels_strided.py"]),
    "metrics": (["finetune/evaluation/metrics.py"], ["tests/finetune/evaluation/test_metrics.py"] + [t for t in THRESHOLDS if "test_metrics.py" not in t]),
    "rotated": (["finetune/rotated.py"], ["tests/finetune/test_rotated.py"] + [t for t in THRESHOLDS if "test_rotated.py" not in t]),
    "fit": (["benchmarks/reporting/fit.py"], ["tests/benchmarks/reporting/test_fit.py"]),
    # test_interleaved.py's trainings (its `runs` fixture) take minutes: only its schedule tests here
    "pipeline": (["scaling/parallel/pipeline.py"], ["tests/scaling/parallel/test_pipeline.py"] + [
        f"tests/scaling/train/test_interleaved.py::test_{t}" for t in (
            "timetable_reaches_the_theoretical_bubble", "megatron_order_and_in_flight_by_hand", "chunks_are_interleaved_over_ranks",
            "the_schedule_refuses_what_it_cannot_take")]),
    "checkpoint": (["scaling/train/checkpoint.py"], ["tests/scaling/train/test_checkpoint.py", "tests/scaling/train/test_checkpoint_resume.py"]),
    # the memory model against exact counts (supervised ViT-L/16: its head), span-aware bandwidth through the time model
    "analytic": (["benchmarks/prediction/analytic.py"], ["tests/benchmarks/prediction/test_analytic.py", "tests/benchmarks/prediction/test_devices.py",
                 "tests/benchmarks/prediction/test_timemodel.py",
                 "tests/benchmarks/prediction/test_count.py::test_analytic_memory_within_3pct_of_counted_supervised_vit_l16",
                 "tests/scaling/train/test_fsdp.py::test_a_deferred_sync_is_counted_as_the_whole_stage_unsharded"]),
    "store": (["scaling/runtime/store.py"], ["tests/scaling/runtime/test_store.py"] + [t for t in THRESHOLDS if "test_store.py" not in t]),
    # the options trees: the mechanism's own tests, the config-file and launcher ones that drive bench's tree
    "options": (["scaling/runtime/options.py"], ["tests/scaling/runtime/test_options.py", "tests/scaling/runtime/test_launch.py",
                                                 "tests/scaling/runtime/test_cli.py"]),
}

KILLED = {1, 3, -24, 24, 152, 255, 36, -11, -9}  # test failure, pytest error, timeout, crash
SURVIVED = 0
NO_TESTS = {5, 33}


def load_equivalent() -> dict[str, str]:
    out = {}
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, reason = line.strip().partition(" ")
                out[name] = reason.strip()
    return out


def stage(key: str, work: Path) -> Path:
    """A fresh stage folder for one module: src/rsscale/<folder>, tests/, a [mutmut] setup.cfg."""
    files, tests = MODULES[key]
    missing = [p for p in files if not (ROOT / p).exists()]
    if missing:
        raise ValueError(f"module {key!r}: missing {', '.join(missing)}")
    tests = [t for t in tests if (ROOT / t.partition("::")[0]).exists()]
    d = work / key
    shutil.rmtree(d, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.db", "*.pt")
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, d / "src" / "rsscale" / folder, ignore=ignore)
    shutil.copytree(ROOT / "tests", d / "tests", ignore=ignore)
    shutil.copytree(ROOT / "reports", d / "reports", ignore=ignore)  # committed tables some tests compare with (also_copy)
    if (ROOT.parent / "shared").is_dir():  # tests find ../shared/data beside the checkout
        (d / "shared").symlink_to(ROOT.parent / "shared")
    write_config(d, files, tests)
    return d


def write_config(d: Path, files: list[str], tests: list[str]) -> None:
    only = "\n".join(f"    src/rsscale/{p}" for p in files)
    selection = "\n".join(f"    {t}" for t in tests)
    (d / "setup.cfg").write_text(
        "[mutmut]\nsource_paths = src\n"
        f"only_mutate =\n{only}\n"
        f"pytest_add_cli_args_test_selection =\n{selection}\n"
        "pytest_add_cli_args =\n    -m\n    not slow\n    -p\n    no:cacheprovider\n    -p\n    no:xdist\n"  # mutmut forks its own workers
        "also_copy =\n    reports\n"
        "process_isolation = forkserver\nuse_git_change_detection = false\ntrack_dependencies = false\n"
        "timeout_multiplier = 5.0\ntimeout_constant = 20.0\n"
        # the project's pytest section (markers, warning filters), copied verbatim but for the xdist workers
        + (ROOT / "setup.cfg").read_text().partition("[tool:pytest]")[1]
        + (ROOT / "setup.cfg").read_text().partition("[tool:pytest]")[2].replace(" -n 2 --dist loadfile", "").replace(" -n 2", "")
    )


def mutmut(d: Path, *args: str, jobs: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(d / "mutants" / "src"), OMP_NUM_THREADS="1",
               TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *args]
    log.info("%s: %s", d.name, " ".join(cmd[2:]))
    with open(d / "mutmut.log", "a") as f:
        subprocess.run(cmd, cwd=d, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)


def retest(key: str, work: Path, jobs: int) -> tuple[Path, dict]:
    """Refresh the tests of an existing stage and rerun the mutants of its last run that were
    not killed (the run's sample and timing are kept in run.json)."""
    d = work / key
    if not (d / "run.json").exists():
        raise ValueError(f"module {key}: no earlier run in {d} to retest")
    run = json.loads((d / "run.json").read_text())
    files, tests = MODULES[key]
    for target in (d / "tests", d / "mutants" / "tests"):
        shutil.copytree(ROOT / "tests", target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    write_config(d, files, [t for t in tests if (ROOT / t.partition("::")[0]).exists()])
    shutil.copy(d / "setup.cfg", d / "mutants" / "setup.cfg")
    codes = results(d, key)
    run["previous"] = {n: codes.get(n) for n in run["chosen"]}  # mutmut resets all when the tests change
    again = [n for n in run["chosen"] if codes.get(n) not in KILLED]
    log.info("%s: retesting %d of %d mutants", key, len(again), len(run["chosen"]))
    if again:
        mutmut(d, *again, jobs=jobs)
    return d, run


def generate(d: Path, key: str) -> list[str]:
    """Write the mutants (mutmut's own generator, no tests run); return their names."""
    code = ("from mutmut.__main__ import copy_src_dir, copy_also_copy_files, create_mutants\n"
            "copy_src_dir(); copy_also_copy_files(); create_mutants(2)")
    subprocess.run([sys.executable, "-c", code], cwd=d, check=True, capture_output=True)
    names = []
    for p in MODULES[key][0]:
        module = "rsscale." + p[:-3].replace("/", ".")
        text = (d / "mutants" / "src" / "rsscale" / p).read_text()
        names += sorted({f"{module}.{k}" for k in re.findall(r"'(x[_\wǁ]+?__mutmut_\d+)'", text)})
    return names


def results(d: Path, key: str) -> dict[str, int]:
    out = {}
    for p in MODULES[key][0]:
        meta = d / "mutants" / "src" / "rsscale" / (p + ".meta")
        if not meta.exists():
            raise RuntimeError(f"module {key}: mutmut wrote no {meta} (see {d / 'mutmut.log'})")
        out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def rerun_survivors(d: Path, key: str, codes: dict[str, int], jobs: int) -> None:
    """Rerun the mutants that no test killed with every test of the module. mutmut runs a mutant
    against the tests it saw reach the function, in its own process only: a function reached (also
    or only) in spawned workers or subprocesses would miss the tests that reach it there."""
    survivors = sorted(n for n, c in codes.items() if c not in KILLED)
    if not survivors:
        return
    stats_path = d / "mutants" / "mutmut-stats.json"
    stats = json.loads(stats_path.read_text())
    by_fn = stats["tests_by_mangled_function_name"]
    all_tests = sorted(set().union(*by_fn.values()) | set(stats["duration_by_test"]))
    for name in survivors:
        by_fn[name.partition("__mutmut_")[0]] = all_tests
    stats_path.write_text(json.dumps(stats))
    log.info("%s: rerunning %d surviving mutants with all %d tests", key, len(survivors), len(all_tests))
    mutmut(d, *survivors, jobs=jobs)


def mutated_line(d: Path, name: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(d / "mutants" / "src"))
    diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=d, env=env,
                          capture_output=True, text=True).stdout
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return plus[0] if plus else "?"


def section(key: str, d: Path, codes: dict[str, int], generated: int, seconds: float) -> str:
    eq = load_equivalent()
    equiv = sorted(n for n in codes if n in eq)
    killed = sorted(n for n, c in codes.items() if c in KILLED and n not in eq)
    survived = sorted(n for n, c in codes.items() if c not in KILLED and n not in eq)
    denom = len(codes) - len(equiv)
    score = f"{100.0 * len(killed) / denom:.1f} %" if denom else "n/a"
    if denom and len(codes) < generated:  # a sample: add the 95 % Wilson interval of the score
        lo, hi = wilson(len(killed), denom)
        score += f" ({100 * lo:.0f}-{100 * hi:.0f})"
    lines = [f"## {key}", "",
             f"Files: {', '.join(MODULES[key][0])}; tests: {', '.join(MODULES[key][1])}.", "",
             "| generated | run | killed | equivalent | survived | score | run time |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| {generated} | {len(codes)} | {len(killed)} | {len(equiv)} | {len(survived)} | {score} | {seconds:.0f} s |", ""]
    if equiv:
        lines += ["Equivalent:", ""] + [f"- `{n}`: {eq[n]}" for n in equiv] + [""]
    if survived:
        lines += ["Survivors:", ""]
        for n in survived:
            status = "no test reached it" if codes[n] in NO_TESTS else "survived" if codes[n] == SURVIVED else f"exit {codes[n]}"
            lines.append(f"- `{n}` ({status}): `{mutated_line(d, n)}`")
        lines.append("")
    return "\n".join(lines)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n (the score of a random mutant sample)."""
    p, z2 = k / n, z * z / n
    mid, half = (p + z2 / 2) / (1 + z2), z * ((p * (1 - p) + z2 / 4) / n) ** 0.5 / (1 + z2)
    return max(0.0, mid - half), min(1.0, mid + half)


def write_report(sections: dict[str, str]) -> None:
    old = REPORT.read_text() if REPORT.exists() else ""
    kept = {m.group(1): m.group(0).rstrip() + "\n" for m in re.finditer(r"^## (\w+)\n.*?(?=^## |\Z)", old, re.S | re.M)}
    kept.update(sections)
    summary = ["| module | generated | run | killed | equivalent | survived | score | run time |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in MODULES:
        if key in kept:
            row = re.search(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([^|]+?) \| (\d+ s) \|$", kept[key], re.M)
            summary.append(f"| {key} | " + " | ".join(row.groups()) + " |")
        else:
            summary.append(f"| {key} | not run | | | | | | |")
    head = old.partition("\n## ")[0].partition("| module | generated |")[0].rstrip() or (
        "# Mutation testing\n\nmutmut 3 over the core modules, each module's mutants against that module's "
        "tests (`python tests/mutation/run.py --help`). Score = killed / (mutants - equivalent); "
        "timeouts and crashes count as killed; where only a seeded random sample of the mutants ran "
        "(--sample), the score is followed by its 95 % Wilson interval. Decorated functions (the @triton.jit kernel bodies) "
        "are not mutated by mutmut and are not counted.")
    body = "\n".join(kept[k] for k in MODULES if k in kept)
    REPORT.write_text(head + "\n\n" + "\n".join(summary) + "\n\n" + body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("modules", nargs="*", help=f"'all' or any of: {', '.join(MODULES)}")
    ap.add_argument("--jobs", type=int, default=2, help="parallel mutant workers (default 2)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rsscale-mutation"), help="stage folders")
    ap.add_argument("--sample", type=int, default=0,
                    help="run a seeded random sample of N mutants per module (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample")
    ap.add_argument("--retest", action="store_true",
                    help="rerun only the survivors of the last run of each module, with the current tests")
    ap.add_argument("--list", action="store_true", help="list modules, their files and tests")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.list or not args.modules:
        for key, (files, tests) in MODULES.items():
            print(f"{key:11s} {' '.join(files)}  <-  {' '.join(tests)}")
        return 0
    keys = list(MODULES) if args.modules == ["all"] else args.modules
    unknown = [k for k in keys if k not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {', '.join(unknown)}; --list shows them")
    for key in keys:
        start = time.monotonic()
        if args.retest:
            d, run = retest(key, args.work, args.jobs)
        else:
            d = stage(key, args.work)
            names = generate(d, key)
            chosen = sorted(random.Random(args.seed).sample(names, args.sample)) if 0 < args.sample < len(names) else []
            log.info("%s: %d mutants, running %s", key, len(names), len(chosen) or "all")
            mutmut(d, *chosen, jobs=args.jobs)
            run = {"generated": len(names), "chosen": chosen or names, "seconds": 0.0}
        keep = set(run["chosen"])
        rerun_survivors(d, key, {n: c for n, c in results(d, key).items() if n in keep}, args.jobs)
        codes = {n: c for n, c in results(d, key).items() if n in keep}
        codes = {n: run.get("previous", {}).get(n) if c is None else c for n, c in codes.items()}
        run.pop("previous", None)
        run["seconds"] += time.monotonic() - start
        (d / "run.json").write_text(json.dumps(run))
        write_report({key: section(key, d, codes, run["generated"], run["seconds"])})
        log.info("%s done in %.0f s", key, time.monotonic() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
