"""The front door's data safety, as a new user meets it: reading commands never write into a data
folder, a dataset `rsscale data` wrote is read as what it is, a demo rerun does not mix two demos
in one report, and the detection table says which classes its means count."""

import json
import os
import re

import pytest
from PIL import Image

from rsscale.scaling.data.synthetic import ensure_dataset
from rsscale.scaling.runtime.cli import main
from rsscale.scaling.runtime.store import ResultsStore


def _listing(root):
    """Files under root (SQLite's -wal/-shm companions aside: reading a store may create them)."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if not f.endswith(("-wal", "-shm")))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    ensure_dataset(root, num_pretrain=3, num_seg=2, num_det=2, size=64, workers=1)
    return root


# ------------------------------------------------------------------------- finetune reads, never writes
def test_finetune_refuses_a_folder_of_other_data_and_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "small" / "pretrain"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(folder / "P0.jpg")
    argv = ["finetune", "--task", "det", "--dataset", "synthetic", "--data", str(folder), "--synthetic-count", "2",
            "--steps", "1", "--global-batch", "1", "--crop", "32", "--channels", "16", "--results", str(tmp_path / "r.db")]
    assert main(argv) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rsscale finetune: error:")]
    assert len(error) == 1 and str(folder) in error[0] and "rsscale data --out" in error[0]
    assert _listing(folder) == ["P0.jpg"]


def test_dataset_for_uses_a_finished_dataset_as_it_is(small_dataset, tmp_path):
    from rsscale.scaling.data.synthetic import dataset_for

    before = (small_dataset / "manifest.json").read_text()
    assert dataset_for(small_dataset, "seg", num_seg=9, num_det=9)["root"] == str(small_dataset)  # other counts: not rewritten
    assert (small_dataset / "manifest.json").read_text() == before
    seg_only = tmp_path / "seg-only"  # missing: the bundled set is written there
    dataset_for(seg_only, "seg", num_pretrain=0, num_seg=2, num_det=0, size=64, workers=1)
    with pytest.raises(FileNotFoundError, match="has no detection tiles"):
        dataset_for(seg_only, "det")


# ------------------------------------------------------------------------- pretrain on a dataset root
def test_pretraining_a_dataset_root_reads_its_pretraining_images(small_dataset):
    from rsscale.scaling.data.loader import build_pretrain_loader, scan_images

    files = scan_images(small_dataset)
    assert len(files) == 3 and all(os.sep + "pretrain" + os.sep in f for f in files)
    loader = build_pretrain_loader(small_dataset, img_size=16, batch_size=1, backend="torch", num_workers=0)
    assert len(loader.files) == 3


def test_pretraining_a_dataset_root_without_pretraining_images_is_refused(tmp_path):
    from rsscale.scaling.data.loader import scan_images

    root = tmp_path / "ft-only"
    ensure_dataset(root, num_pretrain=0, num_seg=2, num_det=0, size=64, workers=1)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{root} has no pretraining images")):
        scan_images(root)


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


# ------------------------------------------------------------------------- detection means
def _perfect_submission(tmp_path):
    from rsscale.finetune.data.dota_io import write_dota_submission

    box = [0, 0, 10, 0, 10, 10, 0, 10]
    labels = tmp_path / "labelTxt"
    labels.mkdir()
    (labels / "img.txt").write_text("imagesource:test\ngsd:0.5\n" + " ".join(map(str, box)) + " car 0\n")
    write_dota_submission({"car": [("img", 0.9, box)]}, tmp_path / "dets")
    return tmp_path / "dets", labels


def test_ap_table_marks_classes_without_ground_truth_and_averages_those_with(tmp_path, capsys):
    from rsscale.finetune.evaluation.metrics import evaluate_dota, format_ap_table
    from rsscale.finetune.evaluation.metrics import main as metrics_main

    dets, labels = _perfect_submission(tmp_path)
    result = evaluate_dota(dets, labels, classes=["car", "ship"])
    assert result["mAP"] == pytest.approx(0.5) and result["mAP_with_gt"] == pytest.approx(1.0)  # the official mean is unchanged
    table = format_ap_table(result)
    assert "| car | 100.00 | 1 | 1 |" in table and "| ship (no GT) | 0.00 | 0 | 0 |" in table
    assert "| **mAP** | **50.00** | | |" in table and "| mAP over classes with GT | 100.00 | | |" in table
    assert "mAP averages 2 classes, 1 without GT scored 0" in table
    out = tmp_path / "r.json"
    assert metrics_main([str(dets), str(labels), "--classes", "car,ship", "--json", str(out)]) == 0
    assert "| mAP over classes with GT | 100.00 | | |" in capsys.readouterr().out
    assert json.loads(out.read_text())["mAP_with_gt"] == pytest.approx(1.0)
