"""Rotated geometry: exact IoU against hand-computed cases and shapely, NMS against a brute-force
greedy reference, conversions and the box coder round trips."""

import math

import pytest
import torch

from rsscale.finetune import rotated as R
from rsscale.finetune.rotated import (
    DeltaXYWHACoder,
    batched_poly_nms,
    batched_rotated_nms,
    decode_points,
    encode_points,
    hbox_to_obb,
    min_area_rect,
    norm_obb,
    obb_to_hbox,
    obb_to_poly,
    poly_iou,
    poly_nms,
    poly_to_obb,
    rotated_iou,
    rotated_iou_aligned,
    rotated_nms,
)

shapely = pytest.importorskip("shapely.geometry")


def _random_boxes(n, seed, spread=50.0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([
        torch.rand(n, 2, generator=g) * spread,
        torch.rand(n, 2, generator=g) * 30 + 1,
        (torch.rand(n, 1, generator=g) - 0.5) * 2 * math.pi,
    ], 1).double()


def _shapely_iou(p, q):
    a = shapely.Polygon(torch.as_tensor(p).view(-1, 2).tolist())
    b = shapely.Polygon(torch.as_tensor(q).view(-1, 2).tolist())
    return a.intersection(b).area / a.union(b).area


def test_iou_hand_computed_cases():
    sq = torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    assert rotated_iou(sq, sq).item() == pytest.approx(1.0, abs=1e-12)
    far = torch.tensor([[10.0, 0.0, 2.0, 2.0, 0.3]], dtype=torch.float64)
    assert rotated_iou(sq, far).item() == 0.0
    # A square and itself turned by 45 degrees meet in a regular octagon of inradius 1:
    # area 8 tan(pi/8), so IoU = tan(pi/8) / (1 - tan(pi/8)) = 1/sqrt(2).
    turned = torch.tensor([[0.0, 0.0, 2.0, 2.0, math.pi / 4]], dtype=torch.float64)
    assert rotated_iou(sq, turned).item() == pytest.approx(1 / math.sqrt(2), abs=1e-9)
    # A 4x2 box inside a 10x10 box (both turned): IoU is the area ratio.
    big = torch.tensor([[1.0, 1.0, 10.0, 10.0, 0.3]], dtype=torch.float64)
    small = torch.tensor([[1.5, 0.5, 4.0, 2.0, -0.7]], dtype=torch.float64)
    assert rotated_iou(big, small).item() == pytest.approx(8 / 100, abs=1e-9)
    # Touching edges only: zero area.
    touch = torch.tensor([[2.0, 0.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    assert rotated_iou(sq, touch).item() == pytest.approx(0.0, abs=1e-12)
    # Degenerate boxes (zero width or height) overlap nothing.
    flat = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0, 0.5]], dtype=torch.float64)
    assert rotated_iou(flat, torch.cat([sq, flat])).abs().max().item() == 0.0
    # Half overlap along x: inter 2, union 6.
    half = torch.tensor([[1.0, 0.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    assert rotated_iou(sq, half).item() == pytest.approx(1 / 3, abs=1e-12)


def test_iou_matches_shapely_on_random_boxes():
    b = _random_boxes(200, seed=0)
    iou = rotated_iou(b[:100], b[100:])
    p = obb_to_poly(b)
    ref = torch.tensor([[_shapely_iou(p[i], p[100 + j]) for j in range(100)] for i in range(100)])
    assert (ref > 0).sum() > 500  # the cases overlap enough to mean something
    torch.testing.assert_close(iou, ref.double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(poly_iou(p[:100], p[100:]), ref.double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(rotated_iou_aligned(b[:100], b[100:]), ref.diagonal().double(), atol=1e-4, rtol=0)
    assert rotated_iou(b[:3].float(), b[3:5].float()).dtype == torch.float32


def test_poly_iou_non_convex_and_either_orientation():
    g = torch.Generator().manual_seed(1)
    # Arrow-head quadrilaterals: the third corner pushed inside -> non-convex but simple.
    base = torch.tensor([0.0, 0.0, 10.0, 0.0, 4.0, 4.0, 0.0, 10.0])
    polys1 = base + torch.rand(60, 8, generator=g) * 4
    polys2 = base.view(4, 2).flip(0).reshape(8) + torch.rand(60, 8, generator=g) * 4 + 2  # reversed order
    ref = torch.tensor([[_shapely_iou(a, b) for b in polys2] for a in polys1])
    torch.testing.assert_close(poly_iou(polys1, polys2), ref, atol=1e-4, rtol=0)


def test_poly_obb_round_trip_and_min_area_rect():
    b = norm_obb(_random_boxes(100, seed=2))
    back = poly_to_obb(obb_to_poly(b))
    torch.testing.assert_close(rotated_iou_aligned(back, b), torch.ones(100, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(back[:, :4], b[:, :4], atol=1e-7, rtol=0)
    assert (back[:, 2] >= back[:, 3]).all() and (back[:, 4] >= -math.pi / 2).all() and (back[:, 4] < math.pi / 2).all()
    # Arbitrary quadrilaterals: same area as shapely's minimum rotated rectangle.
    g = torch.Generator().manual_seed(3)
    quads = torch.rand(50, 8, generator=g).double() * 20
    rect = poly_to_obb(quads)
    ref = torch.tensor([shapely.Polygon(q.view(4, 2).tolist()).convex_hull.minimum_rotated_rectangle.area
                        for q in quads]).double()
    torch.testing.assert_close(rect[:, 2] * rect[:, 3], ref, atol=0, rtol=1e-6)
    # Masked points do not count.
    pts = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [4.0, 2.0], [0.0, 2.0], [100.0, 100.0]]])
    r = min_area_rect(pts, torch.tensor([[True, True, True, True, False]]))
    torch.testing.assert_close(r, torch.tensor([[2.0, 1.0, 4.0, 2.0, 0.0]], dtype=torch.float64))


def test_conversions_hand_cases():
    box = torch.tensor([[10.0, 20.0, 4.0, 2.0, math.pi / 2]])
    # Turned by 90 degrees: the width runs along +y (image down).
    expected = torch.tensor([[11.0, 18.0, 11.0, 22.0, 9.0, 22.0, 9.0, 18.0]])
    torch.testing.assert_close(obb_to_poly(box), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(obb_to_hbox(box), torch.tensor([[9.0, 18.0, 11.0, 22.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(hbox_to_obb(torch.tensor([[0.0, 0.0, 4.0, 2.0]])),
                               torch.tensor([[2.0, 1.0, 4.0, 2.0, 0.0]]))
    # le90: w < h swaps and turns by 90 degrees; angles wrap into [-pi/2, pi/2).
    n = norm_obb(torch.tensor([[0.0, 0.0, 2.0, 4.0, 0.0], [0.0, 0.0, 4.0, 2.0, math.pi / 2]]))
    torch.testing.assert_close(n, torch.tensor([[0.0, 0.0, 4.0, 2.0, -math.pi / 2]] * 2))
    with pytest.raises(ValueError, match="shape"):
        obb_to_poly(torch.zeros(3, 4))


def _brute_nms(polys, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        if all(_shapely_iou(polys[i], polys[k]) <= thr for k in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("lazy", [False, True], ids=["batched-iou", "lazy-iou"])
def test_rotated_nms_matches_brute_force(lazy, monkeypatch):
    from rsscale.finetune import rotated

    monkeypatch.setattr(rotated, "LAZY_PAIRS_PER_BOX", 0 if lazy else 10**9)
    b = _random_boxes(80, seed=4, spread=40.0)
    scores = torch.rand(80, generator=torch.Generator().manual_seed(5))
    polys = obb_to_poly(b)
    for thr in (0.1, 0.5):
        ref = _brute_nms(polys, scores, thr)
        assert rotated_nms(b, scores, thr).tolist() == ref
        assert poly_nms(polys, scores, thr).tolist() == ref
    labels = torch.arange(80) % 3
    keep = batched_rotated_nms(b, scores, labels, 0.3)
    ref = []
    for c in range(3):
        idx = (labels == c).nonzero()[:, 0]
        ref += [int(idx[k]) for k in _brute_nms(polys[idx], scores[idx], 0.3)]
    assert sorted(keep.tolist()) == sorted(ref)
    assert (scores[keep].diff() <= 0).all()
    assert batched_poly_nms(polys, scores, labels, 0.3).tolist() == keep.tolist()
    assert rotated_nms(torch.zeros(0, 5), torch.zeros(0), 0.5).numel() == 0
    assert batched_rotated_nms(torch.zeros(0, 5), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0


@pytest.mark.parametrize("lazy", [False, True], ids=["batched-iou", "lazy-iou"])
def test_nms_at_the_threshold_keeps_and_above_suppresses(lazy, monkeypatch):
    """IoU exactly at the threshold keeps both boxes, above it suppresses: overlapping boxes
    (3x1 shifted by 1: IoU 2/4) and nested ones (4x2 inside 4x4: IoU 8/16, where the IoU bound
    that skips pairs equals the threshold too). Exact in floating point: axis-aligned, integers."""
    from rsscale.finetune import rotated

    monkeypatch.setattr(rotated, "LAZY_PAIRS_PER_BOX", 0 if lazy else 10**9)
    overlap = torch.tensor([[1.5, 0.5, 3.0, 1.0, 0.0], [2.5, 0.5, 3.0, 1.0, 0.0]], dtype=torch.float64)
    nested = torch.tensor([[2.0, 2.0, 4.0, 4.0, 0.0], [2.0, 1.0, 4.0, 2.0, 0.0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8])
    for boxes in (overlap, nested):
        assert rotated_iou(boxes[:1], boxes[1:]).item() == 0.5
        assert rotated_nms(boxes, scores, 0.5).tolist() == [0, 1]
        assert rotated_nms(boxes, scores, 0.5 - 1e-12).tolist() == [0]
        assert poly_nms(obb_to_poly(boxes), scores, 0.5).tolist() == [0, 1]
        assert batched_rotated_nms(boxes, scores, torch.tensor([0, 0]), 0.5 - 1e-12).tolist() == [0]
        assert batched_rotated_nms(boxes, scores, torch.tensor([0, 1]), 0.0).tolist() == [0, 1]


def test_nms_of_boxes_repeated_over_classes_matches_brute_force():
    """Oriented R-CNN's case: every proposal's box once per class with its own score (the NMS
    computes each distinct pair of shapes once); checked class by class against shapely."""
    b = _random_boxes(50, seed=13, spread=30.0)
    boxes, labels = b.repeat(3, 1), torch.arange(3).repeat_interleave(50)
    scores = torch.rand(150, generator=torch.Generator().manual_seed(14))
    keep = batched_rotated_nms(boxes, scores, labels, 0.1)
    polys = obb_to_poly(b)
    ref = []
    for c in range(3):
        ref += [c * 50 + k for k in _brute_nms(polys, scores[c * 50:(c + 1) * 50], 0.1)]
    assert sorted(keep.tolist()) == sorted(ref)
    assert 3 < keep.numel() < 150


def test_box_coder_hand_cases_and_round_trip():
    coder = DeltaXYWHACoder(edge_swap=False)
    p = torch.tensor([[0.0, 0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 2.0, 1.0, math.pi / 2]])
    # Moving 1 px along the proposal's width axis is dx = 1 / w = 0.5 in both frames; an angle
    # difference of 0.9 pi is the same rectangle as -0.1 pi.
    g = torch.tensor([[1.0, 0.0, 4.0, 1.0, 0.1], [0.0, 1.0, 2.0, 0.5, math.pi / 2 + 0.9 * math.pi]])
    expected = torch.tensor([[0.5, 0.0, math.log(2), 0.0, 0.1],
                             [0.5, 0.0, 0.0, math.log(0.5), -0.1 * math.pi]])
    torch.testing.assert_close(coder.encode(p, g), expected, atol=1e-6, rtol=0)
    # Edge swap: a 4x1 target turned by 0.4 pi is the 1x4 target turned by -0.1 pi.
    g = torch.tensor([[0.0, 0.0, 4.0, 1.0, 0.4 * math.pi]])
    swapped = DeltaXYWHACoder().encode(p[:1], g)
    torch.testing.assert_close(swapped, torch.tensor([[0.0, 0.0, math.log(0.5), math.log(4.0), -0.1 * math.pi]]),
                               atol=1e-6, rtol=0)
    assert DeltaXYWHACoder(edge_swap=False).encode(p[:1], g)[0, 4].item() == pytest.approx(0.4 * math.pi)
    # Round trip with means/stds on random le90 boxes, both conventions.
    props, gts = norm_obb(_random_boxes(50, seed=6)), norm_obb(_random_boxes(50, seed=7))
    for edge_swap in (True, False):
        coder = DeltaXYWHACoder(stds=(0.1, 0.1, 0.2, 0.2, 0.1), edge_swap=edge_swap)
        d = coder.encode(props, gts)
        assert (d[:, 4].abs() * 0.1 <= (math.pi / 4 if edge_swap else math.pi / 2) + 1e-9).all()
        dec = coder.decode(props, d)
        torch.testing.assert_close(rotated_iou_aligned(dec, gts), torch.ones(50, dtype=torch.float64),
                                   atol=1e-9, rtol=0)
        torch.testing.assert_close(dec[:, :4], gts[:, :4], atol=1e-9, rtol=0)


def test_point_coder():
    gts = norm_obb(_random_boxes(40, seed=8))
    g = torch.Generator().manual_seed(9)
    inside = gts[:, :2] + (torch.rand(40, 2, generator=g).double() - 0.5) * 0.5  # within 0.25 px of the centre
    dist = encode_points(inside, gts)
    assert (dist[:, :4] > 0).all()
    torch.testing.assert_close(decode_points(inside, dist), gts, atol=1e-9, rtol=0)
    outside = gts[:, :2] + 1000.0
    assert (encode_points(outside, gts)[:, :4].min(1).values < 0).all()
    # Hand case: point 1 px right of the centre of an axis-aligned 4x2 box.
    d = encode_points(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0, 4.0, 2.0, 0.0]]))
    torch.testing.assert_close(d, torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]]))


def test_nms_on_many_boxes_matches_dense_greedy():
    """5000 boxes take the blocked candidate-pair path; the reference uses dense IoU rows."""
    b = _random_boxes(5000, seed=10, spread=1500.0)
    scores = torch.rand(5000, generator=torch.Generator().manual_seed(11))
    order = scores.argsort(descending=True, stable=True)
    iou = torch.cat([rotated_iou(b[order[s:s + 500]], b[order]) for s in range(0, 5000, 500)])
    removed, keep = torch.zeros(5000, dtype=torch.bool), []
    for i in range(5000):
        if not removed[i]:
            keep.append(int(order[i]))
            removed |= iou[i] > 0.2
    assert rotated_nms(b, scores, 0.2).tolist() == keep
    assert 500 < len(keep) < 5000


def test_aligned_iou_checks_shapes():
    from rsscale.finetune.rotated import poly_iou_aligned

    p = obb_to_poly(_random_boxes(6, seed=12))
    torch.testing.assert_close(poly_iou_aligned(p[:3], p[3:]), poly_iou(p[:3], p[3:]).diagonal())
    with pytest.raises(ValueError, match="aligned IoU"):
        poly_iou_aligned(p[:3], p[:2])


def test_aligned_iou_gradient_matches_finite_differences():
    a = torch.tensor([[0.0, 0.0, 4.0, 2.0, 0.3], [1.0, 1.0, 3.0, 3.0, -0.2]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.5, 0.2, 3.0, 2.5, 0.1], [1.5, 0.5, 2.0, 4.0, 0.4]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rotated_iou_aligned, (a, b))




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
