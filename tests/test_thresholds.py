"""Boundary cases a reviewer tries first, against hand-computed values and the official tools'
rules: rotated NMS and DOTA matching exactly at the IoU threshold, the VOC07 11-point AP of a
hand-worked case (computed here by hand, not with our voc_ap), and results-store tags named like
metrics columns."""

from pathlib import Path

import numpy as np
import pytest
import torch

from rsscale.finetune.data.dota_io import DotaObject
from rsscale.finetune.evaluation.metrics import evaluate_dota
from rsscale.finetune.rotated import batched_rotated_nms, poly_nms, rotated_iou, rotated_nms
from rsscale.scaling.runtime.store import ResultsStore

# Two 3 x 1 boxes one unit apart: intersection 2, union 4, IoU exactly 0.5 (all corners are
# dyadic, so every step of the clipping is exact in float64).
BOXES = torch.tensor([[1.5, 0.5, 3.0, 1.0, 0.0], [2.5, 0.5, 3.0, 1.0, 0.0]], dtype=torch.float64)
SCORES = torch.tensor([0.9, 0.8])


def _rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def test_rotated_nms_keeps_a_box_exactly_at_the_threshold():
    assert rotated_iou(BOXES[:1], BOXES[1:]).item() == 0.5
    # suppression is IoU > threshold (mmcv's nms_rotated): IoU == 0.5 keeps both
    assert rotated_nms(BOXES, SCORES, 0.5).tolist() == [0, 1]
    assert rotated_nms(BOXES, SCORES, 0.4999).tolist() == [0]
    assert batched_rotated_nms(BOXES, SCORES, torch.tensor([3, 3]), 0.5).tolist() == [0, 1]
    assert batched_rotated_nms(BOXES, SCORES, torch.tensor([3, 3]), 0.4999).tolist() == [0]
    polys = torch.tensor([_rect(0, 0, 3, 1), _rect(1, 0, 4, 1)], dtype=torch.float64)
    assert poly_nms(polys, SCORES, 0.5).tolist() == [0, 1]
    assert poly_nms(polys, SCORES, 0.4999).tolist() == [0]


def test_dota_match_exactly_at_the_threshold_follows_each_tool():
    """DOTA_devkit's dota_evaluation_task1 matches when ovmax > ovthresh; mmrotate's
    eval_rbbox_map when iou >= iou_thr. A detection at IoU exactly 0.5 is a FP in one, TP in the other."""
    gt = {"img": [DotaObject(tuple(_rect(0, 0, 3, 1)), "ship")]}
    dets = {"ship": [("img", 0.9, _rect(1, 0, 4, 1))]}
    dota = evaluate_dota(dets, gt, iou_thr=0.5, mode="dota")["classes"]["ship"]
    mmr = evaluate_dota(dets, gt, iou_thr=0.5, mode="mmrotate")["classes"]["ship"]
    assert (dota["tp"], dota["fp"], dota["ap"]) == (0, 1, 0.0)
    assert (mmr["tp"], mmr["fp"]) == (1, 0) and mmr["ap"] == pytest.approx(1.0, abs=1e-12)


def test_dota_voc07_ap_hand_computed():
    """One class, four counted objects (one more is difficult), five detections by score:
        d1 on g1 (TP), d2 on g1 again (FP, already matched), d3 on g2 (TP), d4 on nothing (FP),
        d5 on the difficult g5 (ignored by DOTA's rules: neither TP nor FP); g3, g4 are missed.
    cum TP 1 1 2 2 2, cum FP 0 1 1 2 2, npos 4 -> recall .25 .25 .5 .5 .5, precision 1 .5 2/3 .5 .5.
    VOC07 11-point: recall >= 0, .1, .2 -> max precision 1; >= .3, .4, .5 -> 2/3; >= .6 ... 1 -> 0.
    AP = (3 * 1 + 3 * 2/3) / 11 = 5/11. All-point: .25 * 1 + .25 * 2/3 = 5/12."""
    gt = {"img": [DotaObject(tuple(_rect(20 * i, 0, 20 * i + 10, 10)), "car") for i in range(4)]
          + [DotaObject(tuple(_rect(80, 0, 90, 10)), "car", difficult=True)]}
    dets = {"car": [("img", 0.9, _rect(0, 0, 10, 10)), ("img", 0.8, _rect(0, 0, 10, 10)),
                    ("img", 0.7, _rect(20, 0, 30, 10)), ("img", 0.6, _rect(200, 200, 210, 210)),
                    ("img", 0.5, _rect(80, 0, 90, 10))]}
    r = evaluate_dota(dets, gt, mode="dota")
    car = r["classes"]["car"]
    assert car["ap"] == pytest.approx(5 / 11, abs=1e-12)
    assert r["mAP"] == pytest.approx(5 / 11, abs=1e-12)
    assert (car["num_gt"], car["num_dets"], car["tp"], car["fp"]) == (4, 5, 2, 2)
    assert (car["recall"], car["precision"]) == (0.5, 0.5)
    assert evaluate_dota(dets, gt, mode="dota", use_07_metric=False)["classes"]["car"]["ap"] == pytest.approx(5 / 12, abs=1e-12)
    # difficult counted (DOTA-v1.5's script): npos 5, d5 is a TP -> recall .2 .2 .4 .4 .6,
    # precision 1 .5 2/3 .5 .6; 11-point: t <= .2 -> 1 (3x), .3 .4 -> 2/3 (2x), .5 -> .6, and
    # t = .6 -> 0: the devkit's thresholds are np.arange(0., 1.1, 0.1), whose 7th is 0.6000000000000001
    # > 3/5, so recall 0.6 does not reach it (the official script's float quirk, kept on purpose).
    assert np.arange(0.0, 1.1, 0.1)[6] > 3 / 5
    counted = evaluate_dota(dets, gt, mode="dota", ignore_difficult=False)["classes"]["car"]
    assert counted["ap"] == pytest.approx((3 + 2 * 2 / 3 + 0.6) / 11, abs=1e-12)


@pytest.mark.parametrize("tags", [
    {"name": "a", "step": 7},                      # the metric's own columns
    {"value": 1, "run_id": 2, "tags": "x"},
    {"incomplete": True, "kind": "k"},             # a derived column and a run column
    {"name": "a", "tag_name": "b"},                # the prefixed name is itself taken
])
def test_store_tags_named_like_columns_never_duplicate_columns(tmp_path, tags):
    store = ResultsStore(str(tmp_path / "r.db"))
    with store.run("bench", preset="tiny") as run:
        run.log_many([("loss", 0.5, 3, tags)])
    df = store.metrics()
    assert df.columns.is_unique, list(df.columns)
    row = df.iloc[0]
    assert (row["name"], row["value"], row["step"], bool(row["incomplete"])) == ("loss", 0.5, 3, False)
    assert row["tags"] == tags
    tag_values = {c: row[c] for c in df.columns if c not in store.metrics(name="none").columns}
    assert sorted(map(str, tag_values.values())) == sorted(map(str, tags.values()))


def test_metrics_command_line_on_a_hand_made_submission(tmp_path, capsys):
    """The CLI reads a Task1 folder and a labelTxt folder: the hand case of
    test_dota_voc07_ap_hand_computed gives 5/11 (VOC07) and 5/12 (--all-point); --classes adds a
    class without objects (AP 0 in DOTA's rules, n/a and null in mmrotate's)."""
    import json

    from rsscale.finetune.data.dota_io import write_dota_submission
    from rsscale.finetune.evaluation.metrics import main

    labels = tmp_path / "labelTxt"
    labels.mkdir()
    rows = [" ".join(map(str, _rect(20 * i, 0, 20 * i + 10, 10))) + " car 0" for i in range(4)]
    rows.append(" ".join(map(str, _rect(80, 0, 90, 10))) + " car 1")
    (labels / "img.txt").write_text("imagesource:test\ngsd:0.5\n" + "\n".join(rows) + "\n")
    write_dota_submission({"car": [("img", 0.9, _rect(0, 0, 10, 10)), ("img", 0.8, _rect(0, 0, 10, 10)),
                                   ("img", 0.7, _rect(20, 0, 30, 10)), ("img", 0.6, _rect(200, 200, 210, 210)),
                                   ("img", 0.5, _rect(80, 0, 90, 10))]}, tmp_path / "dets")
    out = tmp_path / "r.json"
    assert main([str(tmp_path / "dets"), str(labels), "--json", str(out)]) == 0
    assert "| car | 45.45 | 4 | 5 |" in capsys.readouterr().out
    assert json.loads(out.read_text())["mAP"] == pytest.approx(5 / 11, abs=1e-12)
    assert main([str(tmp_path / "dets"), str(labels), "--all-point", "--classes", "car,ship", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| car | 41.67 | 4 | 5 |" in printed and "| ship (no GT) | 0.00 | 0 | 0 |" in printed
    assert "| **mAP** | **20.83** | | |" in printed
    assert main([str(tmp_path / "dets"), str(labels), "--mode", "mmrotate", "--iou-thr", "0.99",
                 "--classes", "car,ship", "--json", str(out)]) == 0
    assert "| ship (no GT) | n/a | 0 | 0 |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["classes"]["ship"]["ap"] is None and result["classes"]["car"]["num_gt"] == 5
    ship = result["classes"]["ship"]
    assert (ship["tp"], ship["fp"], ship["recall"], ship["precision"], ship["num_dets"]) == (0, 0, 0.0, 0.0, 0)
    # mmrotate counts the difficult object and d5 matches it; IoU 1 >= 0.99: TP d1, d3, d5 of 5
    assert result["classes"]["car"]["tp"] == 3 and result["mAP"] == result["classes"]["car"]["ap"]


@pytest.mark.parametrize("name,count", [("dota-v1", 15), ("dota-v1.5", 16), ("dota-v2", 18), ("dior", 20)])
def test_metrics_command_line_named_class_lists(tmp_path, name, count):
    """A named list fixes the classes averaged in the mAP (the official counts: DOTA-v1 15,
    v1.5 16, v2 18, DIOR 20): one perfect class of `count` scores 1 / count."""
    import json

    from rsscale.finetune.data import dota_io
    from rsscale.finetune.data.dota_io import write_dota_submission
    from rsscale.finetune.evaluation.metrics import main

    cls = {"dior": "airplane"}.get(name, "plane")
    labels = tmp_path / "labelTxt"
    labels.mkdir()
    (labels / "img.txt").write_text(" ".join(map(str, _rect(0, 0, 10, 10))) + f" {cls} 0\n")
    write_dota_submission({cls: [("img", 0.9, _rect(0, 0, 10, 10))]}, tmp_path / "dets")
    out = tmp_path / "r.json"
    assert main([str(tmp_path / "dets"), str(labels), "--classes", name, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["classes"]) == count and cls in result["classes"]
    assert result["mAP"] == pytest.approx(1 / count, abs=1e-12)
    assert len({"dota-v1": dota_io.DOTA_V1_CLASSES, "dota-v1.5": dota_io.DOTA_V15_CLASSES,
                "dota-v2": dota_io.DOTA_V2_CLASSES, "dior": dota_io.DIOR_CLASSES}[name]) == count


def test_store_rejects_bad_input_with_one_sentence(tmp_path):
    store = ResultsStore(str(tmp_path / "r.db"))
    with pytest.raises(ValueError, match=r"layout keys must be tp, pp, dp, sp; got unexpected \['ep'\]"):
        store.start_run("bench", layout={"tp": 1, "ep": 2})
    with pytest.raises(ValueError, match=r"unknown run fields \['gpu'\]"):
        store.start_run("bench", gpu="x")
    run = store.start_run("bench", layout={"tp": 2, "sp": 0}, params=12.7, host="h")
    with pytest.raises(ValueError, match="metric name must be a non-empty string, got ''"):
        run.log("", 1.0)
    with pytest.raises(ValueError, match=r"cannot update run fields \['status'\]"):
        run.update(status="complete")
    with pytest.raises(ValueError, match="a run finishes as 'complete', 'failed', 'interrupted', not 'done'"):
        run.finish("done")
    run.log("x", None)
    run.log_many([("y", 2, None), ("z", 3.5, 4, {"k": 1, "path": Path("a") / "b"})])  # non-JSON tag: str
    run.update(device_count=3, config={"b": 1})
    r = store.runs().iloc[0]
    assert (r["tp"], r["sp"], r["params"], r["host"], r["device_count"], r["config"]) == (2, False, 12, "h", 3, {"b": 1})
    assert (r["status"], bool(r["incomplete"]), r["finished"]) == ("running", True, None)
    m = store.metrics()
    assert m["name"].tolist() == ["x", "y", "z"] and m["value"].isna().tolist() == [True, False, False]
    assert m["step"].isna().tolist() == [True, True, False] and m["step"].iloc[2] == 4
    assert m["path"].tolist()[2] == str(Path("a") / "b")
    assert m["k"].tolist()[2] == 1 and store.metrics(name="z", run_id=run.id)["value"].tolist() == [3.5]
    run.finish("failed")
    assert store.runs(status="failed")["id"].tolist() == [run.id] and store.runs(kind="pretrain").empty


def test_metrics_command_line_threshold_and_help(tmp_path, capsys):
    """--iou-thr reaches the matcher (a detection at IoU exactly 0.5 is a TP at 0.4 only), and
    --help documents every argument."""
    from rsscale.finetune.data.dota_io import write_dota_submission
    from rsscale.finetune.evaluation.metrics import main

    labels = tmp_path / "labelTxt"
    labels.mkdir()
    (labels / "img.txt").write_text(" ".join(map(str, _rect(0, 0, 3, 1))) + " ship 0\n")
    write_dota_submission({"ship": [("img", 0.9, _rect(1, 0, 4, 1))]}, tmp_path / "dets")
    args = [str(tmp_path / "dets"), str(labels)]
    assert main(args) == 0 and "| ship | 0.00 | 1 | 1 |" in capsys.readouterr().out
    assert main(args + ["--iou-thr", "0.4"]) == 0 and "| ship | 100.00 | 1 | 1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("score a DOTA Task1 submission", "folder of Task1_<class>.txt files", "DOTA labelTxt folder",
                   "class list averaged in the mAP", "also write the full result to this file"):
        assert phrase in text, phrase


def test_seg_metric_with_one_class():
    from rsscale.finetune.evaluation.metrics import SegMetric

    m = SegMetric(1)
    m.update(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0, 0, 255], [0, 0, 0]]))
    r = m.compute()
    assert (r["mIoU"], r["OA"]) == (1.0, 1.0) and m.confusion.tolist() == [[5]]
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        SegMetric(0)


def test_store_lock_errors_environment_and_config_values(tmp_path):
    import importlib.metadata
    import sqlite3
    import threading

    from rsscale.scaling.runtime import store as S

    assert S._is_locked(sqlite3.OperationalError("database is locked"))
    assert S._is_locked(sqlite3.OperationalError("database is busy"))
    assert not S._is_locked(sqlite3.OperationalError("no such table: runs"))
    env = S.environment()
    assert env["torch_version"] == torch.__version__
    assert env["triton_version"] == importlib.metadata.version("triton")

    class NoWait(ResultsStore):  # sqlite's own busy wait off: the store's retry loop must wait
        def _connect(self):
            db = super()._connect()
            db.execute("PRAGMA busy_timeout = 0")
            return db

    store = NoWait(str(tmp_path / "r.db"), timeout_s=20.0)
    run = store.start_run("bench", config={"out": Path("runs") / "x"})  # non-JSON config value: str
    holder = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock for a moment
    release = threading.Timer(0.5, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        run.log("x", 1.0)  # retried until the lock is released
    finally:
        release.join()
        holder.close()
    assert store.metrics()["value"].tolist() == [1.0]
    assert store.runs()["config"][0] == {"out": str(Path("runs") / "x")}
