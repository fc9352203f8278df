"""Rotated-box geometry at its edges, by hand: le90 normal form at the half-open angle bound and
for squares, exact corner order, touching/contained boxes, the coder's edge swap at exactly
pi/4 and its clamp, point targets on the box boundary, and the shape errors."""

import math

import pytest
import torch

from rsscale.finetune import rotated as R

PI = math.pi
D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


def test_norm_obb_edges():
    out = R.norm_obb(t([0, 0, 4, 2, PI / 2], [0, 0, 4, 2, -PI / 2], [1, 2, 1, 3, 0.25], [0, 0, 2, 2, PI / 2 + 0.1]))
    assert out[0].tolist() == [0, 0, 4, 2, -PI / 2]  # pi/2 is outside [-pi/2, pi/2): it wraps
    assert out[1].tolist() == [0, 0, 4, 2, -PI / 2]
    assert out[2, :4].tolist() == [1, 2, 3, 1] and out[2, 4].item() == pytest.approx(0.25 + PI / 2 - PI)
    assert out[3, :4].tolist() == [0, 0, 2, 2] and out[3, 4].item() == pytest.approx(0.1 - PI / 2)  # square: no swap


def test_corners_hboxes_and_area_by_hand():
    assert R.obb_to_poly(t([10, 20, 4, 2, 0])).tolist() == [[8, 19, 12, 19, 12, 21, 8, 21]]
    poly = R.obb_to_poly(t([0, 0, 4, 2, PI / 2]))  # width axis along +y
    torch.testing.assert_close(poly, t([1, -2, 1, 2, -1, 2, -1, -2]), atol=1e-12, rtol=0)
    assert R.hbox_to_obb(t([1, 2, 5, 8])).tolist() == [[3, 5, 4, 6, 0]]
    assert R.poly_to_hbox(t([3, 1, 5, 4, 0, 7, -2, 2])).tolist() == [[-2, 1, 5, 7]]
    torch.testing.assert_close(R.obb_to_hbox(t([0, 0, 4, 2, PI / 2])), t([-1, -2, 1, 2]), atol=1e-12, rtol=0)
    hexagon = t([0, 0, 2, 0, 3, 1, 2, 2, 0, 2, -1, 1])
    assert R.poly_area(hexagon).item() == 6.0 and R.poly_area(hexagon.flip(-1)).item() == 6.0


def test_poly_to_obb_and_min_area_rect_with_invalid_points():
    obb = R.poly_to_obb(t([0, 0, 4, 0, 4, 2, 0, 2]))
    torch.testing.assert_close(obb, t([2, 1, 4, 2, 0]), atol=1e-12, rtol=0)
    assert R.poly_to_obb(torch.tensor([[0, 0, 4, 0, 4, 2, 0, 2]])).dtype == torch.float32
    pts = t([0, 0], [2, 0], [2, 1], [0, 1], [100, 100])[None]
    rect = R.min_area_rect(pts, torch.tensor([[True, True, True, True, False]]))
    torch.testing.assert_close(rect, t([1, 0.5, 2, 1, 0]), atol=1e-12, rtol=0)


def test_iou_identical_touching_and_contained():
    a = t([0, 0, 4, 2, 0.3])
    touching = t([4, 0, 4, 2, 0])
    iou = R.rotated_iou(t([0, 0, 4, 2, 0], [0, 0, 4, 2, 0]), torch.cat([touching, t([0, 0, 2, 1, 0])]))
    assert iou[0, 0].item() == 0.0 and iou[1, 1].item() == pytest.approx(2 / 8, abs=1e-12)
    assert R.rotated_iou(a, a).item() == pytest.approx(1.0, abs=1e-12)
    assert R.rotated_iou(a.float(), a.float()).dtype == torch.float32
    assert R.rotated_iou_aligned(t([0, 0, 4, 2, 0]), t([0, 0, 2, 1, 0])).tolist() == [0.25]
    assert R.poly_iou(t([0, 0, 2, 0, 2, 2, 0, 2]), t([1, 0, 3, 0, 3, 2, 1, 2])).item() == pytest.approx(1 / 3, abs=1e-12)
    with pytest.raises(ValueError, match=r"aligned IoU needs two \[K, 5\] tensors"):
        R.rotated_iou_aligned(t([0, 0, 1, 1, 0]), t([0, 0, 1, 1, 0], [0, 0, 1, 1, 0]))
    with pytest.raises(ValueError, match=r"boxes1 must be a tensor of shape \[..., 5\], got \(1, 4\)"):
        R.rotated_iou(t([0, 0, 1, 1]), a)


def test_coder_by_hand_swap_and_clamp():
    coder = R.DeltaXYWHACoder()
    prop = t([10, 10, 4, 2, PI / 2])  # width axis along +y
    gt = t([10, 14, 8, 1, PI / 2 + 0.1])
    d = coder.encode(prop, gt)[0]
    # centre moves +4 along y = +1 width (4) along the box's width axis: dx = 4 / 4 = 1, dy = 0
    torch.testing.assert_close(d, t([1, 0, math.log(2), math.log(0.5), 0.1])[0], atol=1e-12, rtol=0)
    # a target turned by 0.3 pi is re-described as turned by -0.2 pi with w, h swapped
    d2 = coder.encode(t([0, 0, 4, 2, 0]), t([0, 0, 6, 3, 0.3 * PI]))[0]
    torch.testing.assert_close(d2[2:], t([math.log(3 / 4), math.log(6 / 2), -0.2 * PI])[0], atol=1e-12, rtol=0)
    norm = R.DeltaXYWHACoder(means=(0, 0, 0, 0, 0.1), stds=(0.5, 0.5, 1, 1, 2))
    assert norm.encode(prop, gt)[0].tolist() == pytest.approx([2, 0, math.log(2), math.log(0.5), 0.0], abs=1e-12)
    big = coder.decode(t([0, 0, 16, 16, 0]), t([0, 0, 50, -50, 0]))[0]
    assert big[2].item() == pytest.approx(16 * 1000 / 16) and big[3].item() == pytest.approx(16 * 16 / 1000)
    with pytest.raises(ValueError, match="5 values each"):
        R.DeltaXYWHACoder(means=(0, 0, 0, 0))
    with pytest.raises(ValueError, match="one target per proposal"):
        coder.encode(prop, torch.cat([gt, gt]))


def test_point_targets_on_the_boundary():
    gt = t([0, 0, 4, 2, 0])
    dist = R.encode_points(t([2, 0], [0, -1], [0, 0]), gt.expand(3, 5))
    assert dist.tolist() == [[4, 1, 0, 1, 0], [2, 0, 2, 2, 0], [2, 1, 2, 1, 0]]
    back = R.decode_points(t([2, 0], [0, -1], [0, 0]), dist)
    assert back.tolist() == [[0, 0, 4, 2, 0]] * 3


def test_float32_boxes_are_measured_in_float64():
    """Far from the origin float32 corner arithmetic is off by ~1e-5 in IoU; the module computes
    corners and IoU in float64 from the float32 values, so NMS decides within 1e-6 of the float64 IoU."""
    b = torch.tensor([[10000.3, 5000.7, 30.1, 10.3, 0.3], [10007.1, 5002.2, 28.4, 11.9, 0.5]])
    iou64 = R.rotated_iou_aligned(b[:1].double(), b[1:].double()).item()
    assert R.rotated_iou_aligned(b[:1], b[1:]).item() == pytest.approx(iou64, abs=1e-7)
    assert R.rotated_iou(b[:1], b[1:]).item() == pytest.approx(iou64, abs=1e-7)
    scores = torch.tensor([0.9, 0.8])
    assert R.batched_rotated_nms(b, scores, torch.tensor([1, 1]), iou64 - 1e-6).tolist() == [0]
    assert R.rotated_nms(b, scores, iou64 - 1e-6).tolist() == [0]
    assert R.batched_rotated_nms(b, scores, torch.tensor([1, 2]), 0.1).tolist() == [0, 1]  # other class


def _scan_min_area(pts, steps=20000):
    """Independent reference: the smallest enclosing-rectangle area over a fine angle scan."""
    ang = torch.linspace(0, PI / 2, steps, dtype=D)
    u = torch.stack([ang.cos(), ang.sin()], -1)
    v = torch.stack([-ang.sin(), ang.cos()], -1)
    pu, pv = u @ pts.T, v @ pts.T
    return ((pu.amax(1) - pu.amin(1)) * (pv.amax(1) - pv.amin(1))).min().item()


def test_min_area_rect_of_single_quads_matches_an_angle_scan():
    quads = [t([4, 1], [5, 3], [1, 4], [0, 0]), t([0, 0], [6, 0], [5, 2], [1, 2]),  # irregular, trapezoid
             t([2, 0], [5, 3], [3, 5], [0, 2]), t([6, 4], [2, 3], [0, 0], [7, 1])]  # 45-degree rectangle; in the
    # first and last the best side joins two points other than point 0: every point pair must be tried
    for q in quads:
        rect = R.min_area_rect(q[None])[0]  # one polygon: a batch of size 1
        area, scan = (rect[2] * rect[3]).item(), _scan_min_area(q)  # the scan is an upper bound
        assert scan - 5e-4 * scan <= area <= scan + 1e-9
        assert rect[2] >= rect[3] and -PI / 2 <= rect[4] < PI / 2


def test_shape_errors_name_the_argument_and_any_leading_dims():
    with pytest.raises(ValueError, match=r"boxes must be a tensor of shape \[..., 5\], got \(3,\)"):
        R.norm_obb(torch.zeros(3))
    with pytest.raises(ValueError, match=r"polys must be a tensor of shape \[..., 8\], got \(1, 6\)"):
        R.poly_to_obb(torch.zeros(1, 6))
    polys = t([0, 0, 2, 0, 2, 1, 0, 1], [1, 1, 3, 1, 3, 4, 1, 4])
    assert R.poly_to_hbox(polys[None]).tolist() == [[[0, 0, 2, 1], [1, 1, 3, 4]]]
    assert R.poly_to_hbox(polys[0]).tolist() == [0, 0, 2, 1]
