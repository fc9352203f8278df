"""Oriented R-CNN (finetune.orcnn) and the DOTA multi-scale protocol (finetune.dota_protocol):
rotated RoI Align against a per-sample bilinear reference, the midpoint-offset coder, max-IoU
assignment and sampling on hand-built cases, split -> merge of ground truth, the detector's
interface, and (slow) fine-tuning on the bundled synthetic scenes."""

import math

import pytest
import torch
from builders import fit, tiny_backbone

from rsscale.finetune.data import datasets as D
from rsscale.finetune.evaluation.dota_protocol import detect_image, evaluate_protocol, unflip_boxes
from rsscale.finetune.model.fcos import RotatedFCOS, evaluate_det
from rsscale.finetune.model.orcnn import IGNORED, NEGATIVE, MidpointOffsetCoder, OrientedRCNN, max_iou_assign, roi_levels, rotated_roi_align, sample_rois
from rsscale.finetune.rotated import hbox_to_obb, norm_obb, obb_to_hbox, obb_to_poly, rotated_iou
from rsscale.scaling.parallel import state


@pytest.fixture(scope="module", autouse=True)
def world():
    state.ensure_initialized()


# --------------------------------------------------------------------------- rotated RoI Align
def reference_roi_align(feat, rois, out, scale, ratio):
    """mmcv's RoIAlignRotated (aligned, clockwise) written out per sample in float64 Python."""
    _, C, H, W = feat.shape
    f = feat.double()

    def bilinear(b, y, x):
        if y < -1.0 or y > H or x < -1.0 or x > W:
            return torch.zeros(C, dtype=torch.float64)
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = int(y), int(x)
        if y0 >= H - 1:
            y0 = y1 = H - 1
            y = float(y0)
        else:
            y1 = y0 + 1
        if x0 >= W - 1:
            x0 = x1 = W - 1
            x = float(x0)
        else:
            x1 = x0 + 1
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * f[b, :, y0, x0] + (1 - ly) * lx * f[b, :, y0, x1]
                + ly * (1 - lx) * f[b, :, y1, x0] + ly * lx * f[b, :, y1, x1])

    result = torch.zeros(len(rois), C, out, out, dtype=torch.float64)
    for r, (b, cx, cy, w, h, a) in enumerate(rois.double().tolist()):
        cx, cy, w, h = cx * scale - 0.5, cy * scale - 0.5, w * scale, h * scale
        bw, bh = w / out, h / out
        for ph in range(out):
            for pw in range(out):
                acc = torch.zeros(C, dtype=torch.float64)
                for iy in range(ratio):
                    for ix in range(ratio):
                        v = -h / 2 + ph * bh + (iy + 0.5) * bh / ratio  # along the box's height axis
                        u = -w / 2 + pw * bw + (ix + 0.5) * bw / ratio  # along its width axis
                        x = cx + u * math.cos(a) - v * math.sin(a)
                        y = cy + u * math.sin(a) + v * math.cos(a)
                        acc += bilinear(int(b), y, x)
                result[r, :, ph, pw] = acc / ratio ** 2
    return result


def test_rotated_roi_align_matches_per_sample_reference():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    rois = torch.cat([torch.randint(0, 2, (10, 1), generator=g).double(),
                      torch.rand(10, 2, generator=g, dtype=torch.float64) * torch.tensor([44.0, 36.0]),
                      torch.rand(10, 2, generator=g, dtype=torch.float64) * 30 + 2,
                      (torch.rand(10, 1, generator=g, dtype=torch.float64) - 0.5) * math.pi], 1)
    rois[0, 1:] = torch.tensor([0.0, 0.0, 20.0, 8.0, 0.4])  # centred on the corner: half outside
    rois[1, 1:] = torch.tensor([46.0, 18.0, 30.0, 10.0, -1.2])  # across the right border
    rois[2, 1:] = torch.tensor([22.0, 18.0, 80.0, 70.0, 0.7])  # larger than the map
    got = rotated_roi_align(feat, rois, output_size=3, spatial_scale=0.25, sampling_ratio=2)
    want = reference_roi_align(feat, rois, 3, 0.25, 2)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (want[2] == 0).any() and (want[0] != 0).any()  # the cases test both sides of the border rule
    # float32 maps, one image, gradients reach the features
    f32 = feat[:1].float().requires_grad_()
    out = rotated_roi_align(f32, rois[rois[:, 0] == 0].float(), 3, 0.25, 2)
    torch.testing.assert_close(out.double(), want[rois[:, 0] == 0], rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert f32.grad.abs().sum() > 0


def test_roi_levels_follow_the_size_rule():
    sides = [(10, 10), (111, 111), (112, 112), (300, 300), (448, 448), (900, 900)]  # sqrt(wh) / 56: < 2 -> 0, ...
    rois = torch.tensor([[0, 0, 0, w, h, 0.3] for w, h in sides], dtype=torch.float32)
    assert roi_levels(rois, 4, 56.0).tolist() == [0, 0, 1, 2, 3, 3]


# --------------------------------------------------------------------------- coder
def test_midpoint_offset_round_trip():
    g = torch.Generator().manual_seed(1)
    n = 200
    boxes = norm_obb(torch.cat([torch.rand(n, 2, generator=g) * 500, torch.rand(n, 2, generator=g) * 80 + 2,
                                (torch.rand(n, 1, generator=g) - 0.5) * 2 * math.pi], 1).double())
    boxes[:4, 4] = torch.tensor([0.0, -math.pi / 2, math.pi / 4, -math.pi / 4], dtype=torch.float64)  # ties
    anchors = obb_to_hbox(boxes) + torch.randn(n, 4, generator=g, dtype=torch.float64) * 5
    anchors[:, 2:] = torch.maximum(anchors[:, 2:], anchors[:, :2] + 4)
    coder = MidpointOffsetCoder()
    deltas = coder.encode(anchors, boxes)
    assert deltas[:, 4:].abs().max() <= 0.5 / 0.5 + 1e-9  # |da|, |db| <= 1/2 before the std
    back = coder.decode(anchors, deltas)
    torch.testing.assert_close(back, boxes, rtol=1e-7, atol=1e-6)
    # an axis-aligned box: its top-right and bottom-right corners, a = w/2, b = h/2
    d = coder.encode(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[5.0, 5.0, 10.0, 4.0, 0.0]]))
    torch.testing.assert_close(d, torch.tensor([[0.0, 0.0, 0.0, math.log(0.4), 1.0, 1.0]]))
    # a parallelogram (top vertex (7.5, 0), right vertex (10, 5) in a 10 x 10 box) decodes to the
    # rectangle with the longer diagonal, through the top vertex: diagonal 2 |(2.5, -5)|
    skew = coder.decode(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.5, 0.0]]))
    assert float(skew[0, 2] ** 2 + skew[0, 3] ** 2) == pytest.approx(4 * (2.5 ** 2 + 5 ** 2), rel=1e-5)
    corners = obb_to_poly(skew).view(4, 2)
    assert (corners - torch.tensor([7.5, 0.0])).norm(dim=1).min() < 1e-4


# --------------------------------------------------------------------------- assign and sample
def test_max_iou_assign_hand_case():
    iou = torch.tensor([[0.80, 0.10],   # positive for object 0
                        [0.50, 0.20],   # between the thresholds: ignored
                        [0.10, 0.35],   # object 1's best anchor: positive by low-quality matching
                        [0.05, 0.00],   # negative
                        [0.20, 0.35]])  # ties with object 1's best: also positive
    assert max_iou_assign(iou, 0.7, 0.3).tolist() == [0, IGNORED, IGNORED, NEGATIVE, IGNORED]
    assert max_iou_assign(iou, 0.7, 0.3, 0.3, match_low_quality=True).tolist() == [0, IGNORED, 1, NEGATIVE, 1]
    assert max_iou_assign(iou, 0.7, 0.3, 0.4, match_low_quality=True).tolist() == [0, IGNORED, IGNORED, NEGATIVE, IGNORED]
    assert max_iou_assign(torch.zeros(3, 0), 0.5, 0.5).tolist() == [NEGATIVE] * 3
    untouched = torch.tensor([[0.9, 0.0], [0.1, 0.0]])  # object 1 overlaps nothing: no row is its "best"
    assert max_iou_assign(untouched, 0.7, 0.3, 0.0, match_low_quality=True).tolist() == [0, NEGATIVE]


def test_sampler_counts_and_membership():
    assigned = torch.tensor([0, 1, 1, 2, NEGATIVE, NEGATIVE, NEGATIVE, IGNORED, NEGATIVE, 0])
    torch.manual_seed(0)
    pos, neg = sample_rois(assigned, num=6, pos_fraction=0.5)
    assert len(pos) == 3 and len(neg) == 3
    assert set(pos.tolist()) <= {0, 1, 2, 3, 9} and set(neg.tolist()) <= {4, 5, 6, 8}
    assert len(set(pos.tolist())) == 3 and len(set(neg.tolist())) == 3  # without replacement
    pos, neg = sample_rois(assigned, num=20, pos_fraction=0.25)  # 5 positives allowed, all taken; 4 negatives exist
    assert sorted(pos.tolist()) == [0, 1, 2, 3, 9] and sorted(neg.tolist()) == [4, 5, 6, 8]
    pos, neg = sample_rois(torch.tensor([NEGATIVE] * 8), num=4, pos_fraction=0.5)  # no positives: negatives fill
    assert len(pos) == 0 and len(neg) == 4
    torch.manual_seed(3)
    first = sample_rois(assigned, 6, 0.5)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, sample_rois(assigned, 6, 0.5)))  # same seed, same draw


# --------------------------------------------------------------------------- the detector
def tiny_orcnn(size=64, classes=2, **kw):
    return OrientedRCNN.scaled_to(tiny_backbone(size), classes, size, **kw)


def test_anchors_are_centred_per_level():
    model = tiny_orcnn(64)
    outs = model(torch.zeros(1, 3, 64, 64))
    anchors = model.anchors(outs)
    assert [a.shape[0] for a in anchors] == [32 * 32 * 3, 16 * 16 * 3, 8 * 8 * 3, 4 * 4 * 3, 2 * 2 * 3]
    first = hbox_to_obb(anchors[0][:3])  # the three ratios at cell (0, 0) of stride 2: centre (1, 1), area 16^2
    torch.testing.assert_close(first[:, :2], torch.ones(3, 2))
    torch.testing.assert_close(first[:, 2] * first[:, 3], torch.full((3,), 256.0))
    torch.testing.assert_close(first[:, 3] / first[:, 2], torch.tensor([0.5, 1.0, 2.0]))


def test_orcnn_learns_a_tiny_batch_and_predicts():
    model = tiny_orcnn(64)
    imgs = torch.randn(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[20.0, 24.0, 24.0, 10.0, 0.3]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[40.0, 32.0, 32.0, 16.0, -0.7], [16.0, 16.0, 12.0, 12.0, 0.0]]),
                "labels": torch.tensor([1, 0])}]
    parts = {}

    def total():
        parts.update(model.loss(model(imgs), targets))
        return parts["total"]

    losses = fit(model, total, steps=8, lr=3e-3)
    assert set(parts) == {"rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box", "total"}
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # evaluate_det (DOTA-style patches, merge, mAP) takes it as it takes RotatedFCOS
    polys = [obb_to_poly(t["boxes"]) for t in targets]
    data = [(img, {**t, "polys": p, "difficult": torch.zeros(len(p), dtype=torch.bool), "image_id": f"im{i}"})
            for i, (img, t, p) in enumerate(zip(imgs, targets, polys))]
    result = evaluate_det(model, data, crop=64, classes=("a", "b"), normalize=lambda x: x, score_thr=0.0)
    assert set(result["classes"]) == {"a", "b"} and 0.0 <= result["mAP"] <= 1.0
    assert result["classes"]["a"]["num_dets"] > 0
    empty = model.loss(model(imgs), [{"boxes": torch.zeros(0, 5), "labels": torch.zeros(0, dtype=torch.long)}] * 2)
    assert torch.isfinite(empty["total"])


def test_detector_flag_chooses_the_model():
    import argparse

    from rsscale.finetune import finetune

    parser = argparse.ArgumentParser()
    finetune.add_arguments(parser)
    base = ["--task", "det", "--dataset", "synthetic", "--crop", "32", "--channels", "16"]
    assert isinstance(finetune.build_model("det", finetune.config_from_args(parser.parse_args(base)), 3)[0], OrientedRCNN)  # the default
    fcos = finetune.build_model("det", finetune.config_from_args(parser.parse_args(base + ["--detector", "fcos"])), 3)[0]
    assert isinstance(fcos, RotatedFCOS)


def test_rcnn_targets_point_at_the_objects():
    """The RoI head's targets for the ground-truth proposal itself are zero deltas, and decoding
    the targets of any positive proposal returns its object."""
    model = tiny_orcnn(64)
    gt = torch.tensor([[30.0, 30.0, 24.0, 8.0, 0.5]])
    # the second describes nearly the object with its sides swapped (w < h): the coder's edge swap
    props = torch.tensor([[31.0, 29.0, 22.0, 9.0, 0.45], [30.0, 30.0, 8.0, 24.0, 0.5 - math.pi / 2 + 0.1]])
    assert (rotated_iou(props, gt) > 0.5).all()
    torch.testing.assert_close(model.roi_coder.encode(gt, gt), torch.zeros(1, 5))
    t = model.roi_coder.encode(props, gt.expand(2, 5))
    torch.testing.assert_close(model.roi_coder.decode(props, t), norm_obb(gt.expand(2, 5)), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- DOTA protocol
def _objects(boxes, labels, image_id="big"):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    return {"polys": obb_to_poly(boxes), "boxes": boxes, "labels": torch.tensor(labels),
            "difficult": torch.zeros(len(labels), dtype=torch.bool), "image_id": image_id}


def test_multiscale_split_then_merge_returns_the_ground_truth():
    """Every object seen whole in some patch of every scale, the patches' objects taken as
    detections: the merge (rate and offset undone, class-wise NMS) gives back each object once."""
    image = torch.zeros(3, 500, 620, dtype=torch.uint8)
    target = _objects([[100.0, 90.0, 60.0, 20.0, 0.3], [300.0, 250.0, 40.0, 30.0, -1.0], [305.0, 255.0, 40.0, 30.0, 0.2],
                       [560.0, 430.0, 70.0, 24.0, 1.2], [200.0, 400.0, 16.0, 8.0, 0.0]], [0, 1, 2, 0, 1])
    patches = D.split_image_multiscale(image, target, rates=(0.5, 1.0, 1.5), patch=256, overlap=100)
    assert {p.rate for p in patches} == {0.5, 1.0, 1.5}
    assert patches[-1].image.shape == (3, 256, 256) and patches[-1].target["image_id"].startswith("big__1.5__")
    dets = []
    for p in patches:
        whole = ~p.target["difficult"]
        dets.append({"boxes": p.target["boxes"][whole], "labels": p.target["labels"][whole],
                     "scores": torch.ones(int(whole.sum()))})
    counts = torch.zeros(len(target["labels"]), 3)  # how often each object is seen whole, per rate
    for p, d in zip(patches, dets):
        back = d["boxes"].clone()
        back[:, :2] += torch.tensor(p.offset, dtype=torch.float32)
        back[:, :4] /= p.rate
        if len(back):
            counts[:, [0.5, 1.0, 1.5].index(p.rate)] += (rotated_iou(target["boxes"], back) > 0.99).sum(1)
    assert (counts >= 1).all()
    merged = D.merge_detections(dets, [p.offset for p in patches], rates=[p.rate for p in patches])
    assert len(merged["boxes"]) == len(target["boxes"])  # the overlapping pair differs in class: both kept
    iou = rotated_iou(target["boxes"], merged["boxes"])
    best = iou.argmax(1)
    assert (iou.max(1).values > 0.999).all() and sorted(best.tolist()) == list(range(5))
    assert torch.equal(merged["labels"][best], target["labels"])
    torch.testing.assert_close(norm_obb(merged["boxes"][best]), norm_obb(target["boxes"]), rtol=1e-4, atol=1e-3)


def test_multiscale_patch_names_round_trip_through_the_submission_merge():
    assert D.patch_id("P0001", 100, 0, rate=0.5) == "P0001__0.5__100___0" and D.patch_id("P0001", 3, 4) == "P0001__1__3___4"
    assert D.parse_scaled_patch_id("P0001__1.5__824___0") == ("P0001", 1.5, 824, 0)
    poly = obb_to_poly(torch.tensor([[50.0, 40.0, 20.0, 10.0, 0.4]]))[0]
    rows = [(D.patch_id("P7", 24, 12, rate=r), 0.9 - 0.1 * k, (poly * r - torch.tensor([24.0, 12.0] * 4)).tolist())
            for k, r in enumerate((0.5, 1.0, 1.5))]  # one object, seen at three scales
    merged = D.merge_dota_submission({"plane": rows})["plane"]
    assert len(merged) == 1 and merged[0][0] == "P7" and merged[0][1] == pytest.approx(0.9)
    torch.testing.assert_close(torch.tensor(merged[0][2], dtype=torch.float64), poly.double(), rtol=1e-6, atol=1e-4)  # in the image again


def test_unflip_mirrors_boxes_back():
    box = torch.tensor([[20.0, 10.0, 16.0, 4.0, 0.3]])
    corners = obb_to_poly(box).view(4, 2)
    for flip, mirror in (("h", lambda p: torch.stack([64 - p[:, 0], p[:, 1]], 1)),
                         ("v", lambda p: torch.stack([p[:, 0], 64 - p[:, 1]], 1)),
                         ("hv", lambda p: 64 - p)):
        seen = norm_obb(torch.cat([mirror(box[:, :2]), box[:, 2:4], box[:, 4:] * (1 if flip == "hv" else -1)], 1))
        assert torch.allclose(mirror(obb_to_poly(seen).view(4, 2)).sort(0).values, corners.sort(0).values, atol=1e-4)
        torch.testing.assert_close(unflip_boxes(seen, 64, flip), norm_obb(box))
    with pytest.raises(ValueError, match="flip"):
        unflip_boxes(box, 64, "d")


class BrightBlobDetector(torch.nn.Module):
    """A stand-in detector with the RotatedFCOS interface: one axis-aligned box around the bright
    pixels of a patch (if they do not touch the patch border)."""

    def forward(self, imgs):
        return imgs

    def predict(self, imgs, score_thr=0.05):
        out = []
        for img in imgs:
            ys, xs = torch.nonzero(img[0] > 0.5, as_tuple=True)
            n = img.shape[-1]
            if len(xs) == 0 or xs.min() == 0 or ys.min() == 0 or xs.max() == n - 1 or ys.max() == n - 1:
                out.append({"boxes": torch.zeros(0, 5), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)})
                continue
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            box = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, torch.tensor(0)]).float()
            out.append({"boxes": norm_obb(box[None]), "scores": torch.ones(1), "labels": torch.zeros(1, dtype=torch.long)})
        return out


def test_protocol_detects_whole_images_at_all_scales_and_flips():
    image = torch.zeros(3, 300, 340, dtype=torch.uint8)
    image[:, 100:120, 140:180] = 255  # a 40 x 20 object at (160, 110)
    target = _objects([[160.0, 110.0, 40.0, 20.0, 0.0]], [0], image_id="im")
    for rates, flips in (((1.0,), ()), ((0.5, 1.0, 1.5), ("h", "v", "hv"))):
        found = detect_image(BrightBlobDetector(), image, lambda x: x.float() / 255, patch=128, overlap=64,
                             rates=rates, flips=flips)
        assert len(found["boxes"]) == 1
        assert float(rotated_iou(found["boxes"], target["boxes"])) > 0.9
    result = evaluate_protocol(BrightBlobDetector(), [(image, target)], ("thing",), lambda x: x.float() / 255,
                               protocol="dota-ms", patch=128, overlap=64, flips=("h",))
    assert result["mAP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="protocol"):
        evaluate_protocol(BrightBlobDetector(), [], ("thing",), lambda x: x, protocol="coco")


# --------------------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
def test_orcnn_finetunes_to_a_nontrivial_map_on_synthetic_scenes(tmp_path):
    """`finetune --task det` (Oriented R-CNN, the default) from the tiny encoder (randomly
    initialised: no pretraining in the test) on the bundled synthetic scenes, 300 steps: an mAP
    far above a detector that has learnt nothing (~0; at 60 steps it is still 0). Measured: mAP
    30.4 in 19 min on a shared, heavily loaded 2-core machine (eval 32 s for 10 images)."""
    import json

    from rsscale.scaling.runtime.cli import main

    argv = ["finetune", "--task", "det", "--dataset", "synthetic", "--data", str(tmp_path / "data"),
            "--synthetic-count", "48", "--steps", "300", "--global-batch", "8",
            "--results", str(tmp_path / "results.db"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["mAP"] > 10.0, metrics
