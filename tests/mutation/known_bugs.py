"""Put each bug of BUGS (bugs once found in the tree) into a copy of the tree, one at a time, and check
that the named tests fail with it (and pass without it).

    python tests/mutation/known_bugs.py            # all; exit 1 if a bug goes unnoticed
    python tests/mutation/known_bugs.py ln_stride  # one

The copy lives in --work (the tree itself is never edited); each run imports the copy through
PYTHONPATH, as tests/mutation/run.py does.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("known_bugs")
ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("scaling", "kernels", "benchmarks", "finetune")

# name -> (file, original text, buggy text, tests that must catch it)
BUGS = {
    "pipeline_loss_scale": ("scaling/parallel/pipeline.py", "torch.autograd.backward(y * loss_scale)",
                            "torch.autograd.backward(y)", [f"tests/scaling/parallel/test_pipeline.py::test_{t}" for t in (
                                "1f1b_with_loss_scale_clamped_warmup_and_one_stage", "interleaved_schedule_with_loss_scale_matches_a_plain_loop",
                                "single_stage_schedule_times_only_its_compute", "stage_links_on_a_non_contiguous_rank_list",
                                "three_stage_interleaved_cases_receive_twice_in_one_tick")]),
    "ln_stride": ("kernels/fused_layer_norm.py", "X + row * stride_x + cols", "X + row * n_cols + cols",
                  ["tests/kernels/test_kernels_strided.py::test_layer_norm_on_row_strided_odd_input"]),
    "nms_at_threshold": ("finetune/rotated.py", "aligned) > iou_threshold", "aligned) >= iou_threshold",
                         ["tests/finetune/test_rotated.py::test_rotated_nms_keeps_a_box_exactly_at_the_threshold"]),
    "store_tag_columns": ("scaling/runtime/store.py", "while c in taken:", "while c in RUN_COLUMNS:",
                          ["tests/scaling/runtime/test_store.py::test_store_tags_named_like_columns_never_duplicate_columns"]),
    "store_lock_retry": ("scaling/runtime/store.py", "delay = 0.01", "delay = None",
                         ["tests/scaling/runtime/test_store.py::test_store_lock_errors_environment_and_config_values"]),
    "voc07_threshold": ("finetune/evaluation/metrics.py", "precision[recall >= t].max() if (recall >= t).any()",
                        "precision[recall > t].max() if (recall > t).any()",
                        ["tests/finetune/evaluation/test_metrics.py::test_dota_voc07_ap_hand_computed"]),
    "dota_match_strict": ("finetune/evaluation/metrics.py", 'iou[j] > iou_thr if mode == "dota"', 'iou[j] >= iou_thr if mode == "dota"',
                          ["tests/finetune/evaluation/test_metrics.py::test_dota_match_exactly_at_the_threshold_follows_each_tool"]),
}


def pytest(tree: Path, tests: list[str]) -> int:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=tree, env=env, capture_output=True, text=True).returncode


def check(name: str, work: Path) -> bool:
    path, good, bad, tests = BUGS[name]
    tree = work / name
    shutil.rmtree(tree, ignore_errors=True)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, tree / "src" / "rsscale" / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tree / "setup.cfg")
    target = tree / "src" / "rsscale" / path
    text = target.read_text()
    if good not in text:
        raise ValueError(f"{name}: {path} no longer contains {good!r}; update BUGS")
    clean = pytest(tree, tests)
    target.write_text(text.replace(good, bad))
    buggy = pytest(tree, tests)
    ok = clean == 0 and buggy != 0
    log.info("%-20s without the bug: %s, with it: %s -> %s", name, "pass" if clean == 0 else f"FAIL ({clean})",
             "fail" if buggy != 0 else "pass", "caught" if ok else "NOT CAUGHT")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bugs", nargs="*", help=f"default all: {', '.join(BUGS)}")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rsscale-known-bugs"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = set(args.bugs) - set(BUGS)
    if unknown:
        ap.error(f"unknown bug(s) {sorted(unknown)}")
    results = [check(name, args.work) for name in (args.bugs or BUGS)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
