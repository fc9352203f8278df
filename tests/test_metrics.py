"""DOTA mAP against hand-computed precision/recall cases and an independent shapely-based
evaluator on real DOTA labels and detections; segmentation scores against a hand-made confusion
matrix."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rsscale.finetune.data.dota_io import DotaObject, read_dota_labels, read_dota_submission, write_dota_submission
from rsscale.finetune.evaluation.metrics import SegMetric, evaluate_dota, format_ap_table, voc_ap

DOTA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dota-example"
needs_dota = pytest.mark.skipif(not DOTA.is_dir(), reason=f"shared DOTA sample not found at {DOTA}")


def _rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def test_voc_ap_hand_computed():
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    # 11-point: recall thresholds 0..0.5 see precision 1, 0.6..1.0 see 2/3.
    assert voc_ap(rec, prec, True) == pytest.approx((6 + 5 * 2 / 3) / 11)
    # All-point: 0.5 recall at precision 1, then 0.5 at 2/3.
    assert voc_ap(rec, prec, False) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc_ap(np.zeros(0), np.zeros(0), True) == 0.0


def _hand_case():
    gt = {"A": [DotaObject(tuple(_rect(0, 0, 10, 10)), "car"),
                DotaObject(tuple(_rect(20, 0, 30, 10)), "car", difficult=True),
                DotaObject(tuple(_rect(40, 0, 50, 10)), "car"),
                DotaObject(tuple(_rect(0, 0, 2, 1)), "ship")],
          "B": []}
    dets = {
        "car": [("A", 0.9, _rect(0, 0, 10, 10)),      # TP
                ("A", 0.8, _rect(1, 0, 11, 10)),      # duplicate of the same object: FP
                ("A", 0.7, _rect(20, 0, 30, 10)),     # difficult: ignored (dota) / TP (mmrotate)
                ("A", 0.6, _rect(60, 0, 70, 10)),     # nothing there: FP
                ("B", 0.55, _rect(0, 0, 10, 10)),     # image without objects: FP
                ("A", 0.5, _rect(40, 0, 50, 10))],    # TP
        "ship": [("A", 0.9, _rect(0, 0, 2, 0.5))],  # IoU exactly 0.5
        "plane": [("A", 0.3, _rect(0, 0, 5, 5))],   # class without ground truth
    }
    return dets, gt


def test_dota_rules_hand_computed():
    dets, gt = _hand_case()
    r = evaluate_dota(dets, gt)
    car = r["classes"]["car"]
    # TP, FP, (difficult: neither), FP, FP, TP over npos=2 -> cumulative recall
    # .5 .5 .5 .5 .5 1, precision 1 .5 .5 .33 .25 .4
    assert car["num_gt"] == 2 and car["tp"] == 2 and car["fp"] == 3
    assert car["ap"] == pytest.approx((6 * 1.0 + 5 * 0.4) / 11)
    assert r["classes"]["ship"]["ap"] == 0.0  # IoU 0.5 is not > 0.5
    assert r["classes"]["plane"]["ap"] == 0.0 and r["classes"]["plane"]["num_gt"] == 0
    assert r["mAP"] == pytest.approx(car["ap"] / 3)
    all_point = evaluate_dota(dets, gt, use_07_metric=False)
    assert all_point["classes"]["car"]["ap"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.4)


def test_mmrotate_mode_hand_computed():
    dets, gt = _hand_case()
    r = evaluate_dota(dets, gt, mode="mmrotate")
    car = r["classes"]["car"]
    # Difficult counted (npos=3): TP FP TP FP FP TP -> recall 1/3 1/3 2/3 2/3 2/3 1,
    # precision 1 .5 .667 .5 .4 .5
    assert car["num_gt"] == 3 and car["tp"] == 3
    assert car["ap"] == pytest.approx((4 * 1.0 + 3 * 2 / 3 + 4 * 0.5) / 11)
    assert r["classes"]["ship"]["ap"] == pytest.approx(1.0)  # IoU >= 0.5 matches
    assert math.isnan(r["classes"]["plane"]["ap"])
    assert r["mAP"] == pytest.approx((car["ap"] + 1.0) / 2)  # only classes with ground truth
    assert evaluate_dota(dets, gt, mode="mmrotate", ignore_difficult=True)["classes"]["car"]["num_gt"] == 2


def test_bad_inputs_are_clear_errors(tmp_path):
    dets, gt = _hand_case()
    with pytest.raises(ValueError, match="without ground truth"):
        evaluate_dota({"car": [("Z", 1.0, _rect(0, 0, 1, 1))]}, gt)
    with pytest.raises(ValueError, match="mode"):
        evaluate_dota(dets, gt, mode="voc")
    (tmp_path / "Task1_car.txt").write_text("A 0.9 1 2 3\n")
    with pytest.raises(ValueError, match="10 fields"):
        read_dota_submission(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_dota_submission(tmp_path / "empty")


def _shapely_reference(dets, gt, use_07_metric, mmrotate=False, stable=False):
    """Independent evaluator with shapely geometry and plain loops (test reference only): DOTA's
    rules, or mmrotate's (minimum rotated rectangles, IoU >= 0.5, difficult counted). Detections
    are ordered as DOTA_devkit's voc_eval does (`np.argsort(-confidence)`), or stably."""
    from shapely.geometry import Polygon

    def shape(poly):
        p = Polygon(np.reshape(poly, (4, 2)))
        return p.minimum_rotated_rectangle if mmrotate else p

    classes = sorted({o.cls for objs in gt.values() for o in objs} | set(dets))
    aps = {}
    for cls in classes:
        objs = {img: [o for o in v if o.cls == cls] for img, v in gt.items()}
        shapes = {img: [shape(o.poly) for o in v] for img, v in objs.items()}
        used = {img: [False] * len(v) for img, v in objs.items()}
        npos = sum(mmrotate or not o.difficult for v in objs.values() for o in v)
        tp, fp = [], []
        rows = dets.get(cls, [])
        confidence = np.array([d[1] for d in rows])
        order = sorted(range(len(rows)), key=lambda k: -rows[k][1]) if stable else np.argsort(-confidence)
        for img, _, poly in (rows[k] for k in order):
            p = shape(poly)
            ious = [p.intersection(g).area / p.union(g).area if p.intersects(g) else 0.0 for g in shapes[img]]
            j = int(np.argmax(ious)) if ious else -1
            t = f = 0
            if j >= 0 and (ious[j] >= 0.5 if mmrotate else ious[j] > 0.5):
                if mmrotate or not objs[img][j].difficult:
                    if used[img][j]:
                        f = 1
                    else:
                        t, used[img][j] = 1, True
            else:
                f = 1
            tp.append(t)
            fp.append(f)
        if npos == 0:
            aps[cls] = float("nan") if mmrotate else 0.0
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        aps[cls] = voc_ap(tp / npos, tp / np.maximum(tp + fp, 1e-12), use_07_metric)
    return aps


@needs_dota
def test_real_dota_example_matches_independent_evaluator(tmp_path):
    gt = read_dota_labels(DOTA / "labelTxt")
    dets = read_dota_submission(DOTA / "dets")
    assert sum(len(v) for v in dets.values()) == 857
    r = evaluate_dota(DOTA / "dets", DOTA / "labelTxt")
    assert 0.0 < r["mAP"] < 1.0
    assert all(0.0 <= c["ap"] <= 1.0 + 1e-12 for c in r["classes"].values())
    reference = _shapely_reference(dets, gt, use_07_metric=True)
    for cls, ap in reference.items():
        assert r["classes"][cls]["ap"] == pytest.approx(ap, abs=1e-9), cls
    assert "| **mAP** |" in format_ap_table(r)
    stable = evaluate_dota(dets, gt, tie_order="stable")
    for cls, ap in _shapely_reference(dets, gt, use_07_metric=True, stable=True).items():
        assert stable["classes"][cls]["ap"] == pytest.approx(ap, abs=1e-9), cls
    # tied scores in the plane detections: the devkit's order and a stable one give different APs
    assert r["classes"]["plane"]["ap"] == pytest.approx(0.9754, abs=1e-4)
    assert stable["classes"]["plane"]["ap"] == pytest.approx(0.9645, abs=1e-4)
    mm = evaluate_dota(dets, gt, mode="mmrotate", use_07_metric=False)
    reference = _shapely_reference(dets, gt, use_07_metric=False, mmrotate=True)
    for cls, ap in reference.items():
        assert mm["classes"][cls]["ap"] == pytest.approx(ap, abs=1e-6, nan_ok=True), cls
    assert mm["mAP"] == pytest.approx(np.nanmean(list(reference.values())), abs=1e-6)
    # The submission writer round-trips (coordinates are written with 0.1 px precision, as read).
    write_dota_submission(dets, tmp_path / "sub")
    again = evaluate_dota(tmp_path / "sub", DOTA / "labelTxt")
    assert again["mAP"] == pytest.approx(r["mAP"], abs=1e-9)


@needs_dota
def test_ground_truth_as_detections_scores_one():
    gt = read_dota_labels(DOTA / "labelTxt")
    dets = {}
    for img, objs in gt.items():
        for o in objs:
            dets.setdefault(o.cls, []).append((img, 1.0, list(o.poly)))
    for use_07 in (True, False):
        r = evaluate_dota(dets, gt, use_07_metric=use_07)
        for cls, c in r["classes"].items():
            if c["num_gt"] > 0:
                assert c["ap"] == pytest.approx(1.0), cls
    assert r["mAP"] == pytest.approx(1.0)  # every class in this sample has non-difficult objects


def test_seg_metric_hand_computed():
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    m = SegMetric(num_classes=4, ignore_index=255)  # class 3 never occurs
    m.update(pred, target)
    expected_cm = torch.zeros(4, 4, dtype=torch.int64)
    expected_cm[0, 0], expected_cm[0, 1], expected_cm[1, 1], expected_cm[2, 0] = 1, 1, 2, 1
    assert torch.equal(m.confusion, expected_cm)
    r = m.compute()
    torch.testing.assert_close(r["IoU"][:3], torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    torch.testing.assert_close(r["F1"][:3], torch.tensor([0.5, 0.8, 0.0], dtype=torch.float64))
    assert math.isnan(r["IoU"][3]) and math.isnan(r["F1"][3])
    assert r["mIoU"] == pytest.approx(1 / 3)
    assert r["mF1"] == pytest.approx(1.3 / 3)
    assert r["OA"] == pytest.approx(3 / 5)
    # Logits [B, C, H, W] in two batches accumulate to the same matrix.
    m2 = SegMetric(num_classes=4)
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 2, 1).float()[:, :, None, :]  # [1, 4, 1, 6]
    m2.update(logits[..., :3], target[:, None, :3])
    m2.update(logits[..., 3:], target[:, None, 3:])
    assert torch.equal(m2.confusion, expected_cm)
    assert "mean" in m.table()


def test_seg_metric_errors():
    m = SegMetric(num_classes=3, ignore_index=255)
    with pytest.raises(ValueError, match="outside"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))


def test_seg_metric_random_against_direct_counts():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 17, 19), generator=g)
    target[target == 4] = 255  # class 4 of 5 only ever predicted, never a target -> IoU 0, not NaN
    pred = torch.randint(0, 5, (3, 17, 19), generator=g)
    m = SegMetric(num_classes=5, ignore_index=255)
    for b in range(3):
        m.update(pred[b], target[b])
    r = m.compute()
    valid = target != 255
    for c in range(5):
        tp = ((pred == c) & (target == c) & valid).sum().item()
        fp = ((pred == c) & (target != c) & valid).sum().item()
        fn = ((pred != c) & (target == c) & valid).sum().item()
        assert r["IoU"][c].item() == pytest.approx(tp / (tp + fp + fn))
        assert r["F1"][c].item() == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert r["OA"] == pytest.approx(((pred == target) & valid).sum().item() / valid.sum().item())
    assert r["mIoU"] == pytest.approx(r["IoU"].mean().item())


@needs_dota
def test_command_line(tmp_path, capsys):
    import json

    from rsscale.finetune.evaluation.metrics import main

    out = tmp_path / "r.json"
    assert main([str(DOTA / "dets"), str(DOTA / "labelTxt"), "--mode", "mmrotate", "--json", str(out)]) == 0
    assert "| **mAP** |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["classes"]["basketball-court"]["ap"] is None  # no ground truth: NaN -> null
    assert 0 < result["mAP"] < 1
    # DOTA rules over the fixed 16-class v1.5 list: container-crane (absent) scores 0 in the mean.
    assert main([str(DOTA / "dets"), str(DOTA / "labelTxt"), "--classes", "dota-v1.5", "--json", str(out)]) == 0
    v15 = json.loads(out.read_text())
    v1 = evaluate_dota(DOTA / "dets", DOTA / "labelTxt")
    assert len(v15["classes"]) == 16 and v15["mAP"] == pytest.approx(v1["mAP"] * 15 / 16)
