"""DOTA mAP against hand-computed precision/recall cases and an independent shapely-based
evaluator on real DOTA labels and detections; segmentation scores against a hand-made confusion
matrix."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rsscale.finetune.data.dota_io import DotaObject, read_dota_labels, read_dota_submission, write_dota_submission
from rsscale.finetune.evaluation.metrics import SegMetric, evaluate_dota, format_ap_table, voc_ap

DOTA = Path(__file__).resolve().parents[4] / "shared" / "data" / "dota-example"


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
                   "class list averaged in the mAP", "also write the full result to this file", "all-point AP instead of VOC07 11-point",
                   "usage: python -m rsscale.finetune.evaluation.metrics"):
        assert phrase in text, phrase


def test_seg_metric_with_one_class():
    from rsscale.finetune.evaluation.metrics import SegMetric

    m = SegMetric(1)
    m.update(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0, 0, 255], [0, 0, 0]]))
    r = m.compute()
    assert (r["mIoU"], r["OA"]) == (1.0, 1.0) and m.confusion.tolist() == [[5]]
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        SegMetric(0)




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
    assert table.splitlines()[:2] == ["| class | AP | gt | dets |", "|---|---:|---:|---:|"]  # the header a report pastes
    assert "| car | 100.00 | 1 | 1 |" in table and "| ship (no GT) | 0.00 | 0 | 0 |" in table
    assert "| **mAP** | **50.00** | | |" in table and "| mAP over classes with GT | 100.00 | | |" in table
    assert "mAP averages 2 classes, 1 without GT scored 0" in table
    out = tmp_path / "r.json"
    assert metrics_main([str(dets), str(labels), "--classes", "car,ship", "--json", str(out)]) == 0
    assert "| mAP over classes with GT | 100.00 | | |" in capsys.readouterr().out
    assert json.loads(out.read_text())["mAP_with_gt"] == pytest.approx(1.0)


def test_seg_metric_recall_and_mean_accuracy_hand_computed():
    """compute() also returns per-class recall (pixel accuracy of each class) and their mean, mAcc:
    target 0 0 1 1 2 | pred 0 1 1 1 0 -> recall 1/2, 2/2, 0/1, NaN (class 3 absent) -> mAcc 1/2."""
    m = SegMetric(num_classes=4, ignore_index=255)
    m.update(torch.tensor([[0, 1, 1, 1, 0, 2]]), torch.tensor([[0, 0, 1, 1, 2, 255]]))
    r = m.compute()
    torch.testing.assert_close(r["recall"][:3], torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))
    assert math.isnan(r["recall"][3])
    assert r["mAcc"] == pytest.approx(0.5)
    torch.testing.assert_close(r["precision"][:2], torch.tensor([0.5, 2 / 3], dtype=torch.float64))


def test_dota_means_without_ground_truth_are_nan():
    """With no class that has ground truth, the mean over classes with GT is NaN (null in the JSON), while
    DOTA's official mAP scores the listed classes 0; mmrotate's mean and an empty class list are NaN."""
    gt = {"img": [DotaObject(tuple(_rect(0, 0, 10, 10)), "car")]}
    dets = {"ship": [("img", 0.9, _rect(0, 0, 10, 10))]}
    r = evaluate_dota(dets, gt, classes=["ship"])
    assert r["mAP"] == 0.0 and math.isnan(r["mAP_with_gt"])
    mm = evaluate_dota(dets, gt, classes=["ship"], mode="mmrotate")
    assert math.isnan(mm["mAP"]) and math.isnan(mm["mAP_with_gt"])
    empty = evaluate_dota(dets, gt, classes=[])
    assert empty["classes"] == {} and math.isnan(empty["mAP"]) and math.isnan(empty["mAP_with_gt"])


def test_metrics_command_line_tie_order(tmp_path, capsys):
    """--tie-order reaches the evaluator. One car; submission order: two misses at 0.5, the hit and a
    miss at 0.9. A stable sort ranks the hit first (AP 1); the devkit's np.argsort(-score) puts it at
    rank k among the equal scores, and with one object the VOC07 AP is then 1/k."""
    from rsscale.finetune.evaluation.metrics import main

    labels = tmp_path / "labelTxt"
    labels.mkdir()
    (labels / "img.txt").write_text(" ".join(map(str, _rect(0, 0, 10, 10))) + " car 0\n")
    far = [_rect(100 * i, 100, 100 * i + 10, 110) for i in range(1, 4)]
    scores = [0.5, 0.5, 0.9, 0.9]
    write_dota_submission({"car": [("img", s, p) for s, p in zip(scores, [far[0], far[1], _rect(0, 0, 10, 10), far[2]])]},
                          tmp_path / "dets")
    rank = int(np.nonzero(np.argsort(-np.array(scores)) == 2)[0][0]) + 1
    assert rank > 1  # numpy's default sort reorders the tied 0.9s (else this case could not tell the orders apart)
    args = [str(tmp_path / "dets"), str(labels)]
    assert main(args) == 0 and f"| car | {100 / rank:.2f} | 1 | 4 |" in capsys.readouterr().out
    assert main(args + ["--tie-order", "devkit"]) == 0 and f"| car | {100 / rank:.2f} | 1 | 4 |" in capsys.readouterr().out
    assert main(args + ["--tie-order", "stable"]) == 0 and "| car | 100.00 | 1 | 4 |" in capsys.readouterr().out


def test_voc_ap_takes_recall_as_float64():
    """Recall and precision are float64 arrays, as in the devkit: recall 0.1 held in extended precision
    (np.longdouble 1/10, a hair below float64's 0.1) rounds to 0.1 and reaches the 0.1 threshold, so
    thresholds 0 and 0.1 see precision 1: AP 2/11."""
    recall = np.array([np.longdouble(1) / 10])
    assert voc_ap(recall, np.array([1.0]), True) == pytest.approx(2 / 11, abs=1e-15)
    assert voc_ap(recall.astype(float), np.array([1.0]), True) == pytest.approx(2 / 11, abs=1e-15)


def test_seg_metric_table_is_the_markdown_of_the_scores():
    """table(): a Markdown table with a right-aligned IoU/F1 header, one row per class in percent
    (NaN for a class that never occurs), the means in bold, then the overall accuracy."""
    m = SegMetric(num_classes=4, ignore_index=255)
    m.update(torch.tensor([[0, 1, 1, 1, 0, 2]]), torch.tensor([[0, 0, 1, 1, 2, 255]]))  # as in the hand-computed test
    assert m.table() == "\n".join([
        "| class | IoU | F1 |",
        "|---|---:|---:|",
        "| 0 | 33.33 | 50.00 |",
        "| 1 | 66.67 | 80.00 |",
        "| 2 | 0.00 | 0.00 |",
        "| 3 | nan | nan |",
        "| **mean** | **33.33** | **43.33** |",
        "",
        "OA 60.00",
    ])


def test_integer_corners_score_as_the_same_float_corners():
    """Detections whose corners are Python ints (a hand-made or converted submission) are scored in
    float64 like float corners: IoU 70/100 is exactly 0.7, so it matches mmrotate's IoU >= 0.7, and both
    modes give the same result for ints and floats."""
    gt = {"img": [DotaObject(tuple(map(float, _rect(0, 0, 10, 10))), "car")]}
    ints, floats = _rect(0, 0, 10, 7), [float(v) for v in _rect(0, 0, 10, 7)]
    assert all(type(v) is int for v in ints)
    for mode in ("dota", "mmrotate"):
        for thr in (0.5, 0.7):
            r_int = evaluate_dota({"car": [("img", 0.9, ints)]}, gt, iou_thr=thr, mode=mode)
            r_float = evaluate_dota({"car": [("img", 0.9, floats)]}, gt, iou_thr=thr, mode=mode)
            assert r_int == r_float, (mode, thr)
    mm = evaluate_dota({"car": [("img", 0.9, ints)]}, gt, iou_thr=0.7, mode="mmrotate")["classes"]["car"]
    assert (mm["tp"], mm["fp"]) == (1, 0)


def test_mmrotate_iou_counts_rectangles_reaching_past_the_polygons_bounding_box():
    """mmrotate's IoU is that of the minimum-area rectangles, which can reach beyond a polygon's own
    axis-aligned box: a thin 45-degree parallelogram's rectangle reaches y = -0.5, so a unit square just
    below it, whose box only touches the parallelogram's at y = 0, overlaps it with IoU 0.25 / 11.25 = 1/45
    (shapely: minimum_rotated_rectangle); so does the mirror case, a square above touching at y = 10.
    DOTA's polygon IoU of the same pairs is 0."""
    gt = {"img": [DotaObject((0.0, 0.0, 1.0, 0.0, 11.0, 10.0, 10.0, 10.0), "car")]}
    for square in (_rect(0, -1, 1, 0), _rect(10, 10, 11, 11)):
        dets = {"car": [("img", 0.9, square)]}
        for thr, tp in ((0.02, 1), (0.025, 0)):  # 1/45 = 0.0222
            r = evaluate_dota(dets, gt, iou_thr=thr, mode="mmrotate")["classes"]["car"]
            assert (r["tp"], r["fp"]) == (tp, 1 - tp), (square, thr)
        assert evaluate_dota(dets, gt, iou_thr=0.0001)["classes"]["car"]["tp"] == 0


def test_dota_scoring_raises_no_warnings():
    """Scoring is warning-free (numpy deprecations included, which later numpy versions turn into
    errors), e.g. every epsilon is float64's, asked for by that dtype."""
    import warnings

    gt = {"img": [DotaObject(tuple(map(float, _rect(0, 0, 10, 10))), "car")]}
    dets = {"car": [("img", 0.9, _rect(0, 0, 10, 7)), ("img", 0.8, _rect(50, 50, 60, 60))]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mode in ("dota", "mmrotate"):
            r = evaluate_dota(dets, gt, mode=mode)["classes"]["car"]
            assert (r["tp"], r["fp"], r["precision"]) == (1, 1, 0.5)


def test_mmrotate_pairs_a_detection_with_a_quad_whose_rectangle_reaches_it():
    """mmrotate scores the minimum-area rectangles of the quads, which can reach past a quad's own
    bounding box: a detection there is paired and scored like rotated_iou_aligned scores it, not
    dropped by the candidate filter (DOTA's polygon IoU of the same pair is 0)."""
    from rsscale.finetune.evaluation.metrics import _ious_by_image
    from rsscale.finetune.rotated import poly_to_obb, rotated_iou_aligned

    gt = np.array([[0, 0, 1, 0, 11, 10, 10, 10]], dtype=np.float64)  # a thin parallelogram
    det = _rect(0, -1.2, 1, -0.2)  # below its bounding box, inside its rectangle's reach
    expected = float(rotated_iou_aligned(poly_to_obb(torch.tensor([det], dtype=torch.float64)), poly_to_obb(torch.from_numpy(gt)))[0])
    assert expected > 0.005
    [mm] = _ious_by_image([("img", 0.9, det)], {"img": (gt,)}, "mmrotate")
    [dota] = _ious_by_image([("img", 0.9, det)], {"img": (gt,)}, "dota")
    assert mm[0] == pytest.approx(expected, rel=1e-9) and dota[0] == 0
