"""Oriented-box geometry for rotated detection: conversions, exact rotated/polygon IoU, rotated NMS
and the box coder used by the detector.

Conventions (the detector, the evaluator and the readers all use these):
- An oriented box is `(cx, cy, w, h, a)` in pixels and radians. Image axes: x to the right, y down.
  The box's width axis points along `(cos a, sin a)`, so a positive angle turns the x axis towards
  +y (clockwise on screen).
- "le90" normal form (as in mmrotate): `w >= h` and `a` in `[-pi/2, pi/2)`. `norm_obb` maps any
  box to it; `poly_to_obb` returns it.
- A polygon is 4 corners `(x1, y1, ..., x4, y4)` as in DOTA. `obb_to_poly` lists them as
  (-w/2,-h/2), (+w/2,-h/2), (+w/2,+h/2), (-w/2,+h/2) in the box frame: clockwise on screen.

IoU is exact (no rasterisation): the intersection of two convex polygons is the convex hull of
the vertices of each inside the other plus the edge-edge crossings, its area by the shoelace
formula after sorting by angle. Non-convex (but simple) quadrilaterals are handled like DOTA's
`polyiou`: each polygon is split into a triangle fan and the signed triangle intersections are
summed. Everything is computed in float64 and batched; N x M calls only evaluate pairs whose
enclosing axis-aligned boxes overlap.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

_PAIR_CHUNK = 1 << 16  # pairs evaluated at once (bounds the [pairs, candidates, 2] buffers)


# --------------------------------------------------------------------------- conversions
def norm_obb(boxes: torch.Tensor) -> torch.Tensor:
    """Map oriented boxes [..., 5] to the le90 normal form (w >= h, angle in [-pi/2, pi/2))."""
    _check_last(boxes, 5, "boxes")
    cx, cy, w, h, a = boxes.unbind(-1)
    swap = w < h
    w, h = torch.where(swap, h, w), torch.where(swap, w, h)
    a = torch.where(swap, a + math.pi / 2, a)
    a = torch.remainder(a + math.pi / 2, math.pi) - math.pi / 2
    return torch.stack([cx, cy, w, h, a], -1)


def obb_to_poly(boxes: torch.Tensor) -> torch.Tensor:
    """Oriented boxes [N, 5] -> corner polygons [N, 8] (clockwise on screen, see module doc)."""
    _check_last(boxes, 5, "boxes")
    cx, cy, w, h, a = boxes.unbind(-1)
    cos, sin = torch.cos(a), torch.sin(a)
    # Half-extent vectors along the box's width and height axes.
    wx, wy = cos * w / 2, sin * w / 2
    hx, hy = -sin * h / 2, cos * h / 2
    corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    pts = [torch.stack([cx + sw * wx + sh * hx, cy + sw * wy + sh * hy], -1) for sw, sh in corners]
    return torch.stack(pts, -2).flatten(-2)


def poly_to_obb(polys: torch.Tensor) -> torch.Tensor:
    """Quadrilaterals [N, 8] -> minimum-area enclosing rectangles [N, 5] in le90 form."""
    _check_last(polys, 8, "polys")
    out = min_area_rect(polys.reshape(*polys.shape[:-1], 4, 2))
    return out.to(polys.dtype if polys.is_floating_point() else torch.float32)


def min_area_rect(points: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Minimum-area enclosing rectangles [..., 5] (le90, float64) of point sets [..., V, 2]
    (only the `valid` points [..., V] count; each set needs at least one).

    Such a rectangle has one side along an edge of the convex hull (rotating calipers); every hull
    edge joins two of the points, so trying all point-pair directions is exact, needs no hull
    construction and no OpenCV. Meant for small V (quadrilaterals, clipped polygons).
    """
    pts = points.to(torch.float64)
    if valid is not None:  # invalid points become copies of the first valid one: no new direction
        first = valid.to(torch.uint8).argmax(-1)[..., None, None].expand(*pts.shape[:-2], 1, 2)
        pts = torch.where(valid[..., None], pts, pts.gather(-2, first))
    i, j = torch.triu_indices(pts.shape[-2], pts.shape[-2], 1, device=pts.device)
    d = pts[..., j, :] - pts[..., i, :]  # [..., P, 2] point-pair directions
    norm = d.norm(dim=-1, keepdim=True)
    u = d / norm.clamp_min(1e-12)  # width direction candidates
    v = torch.stack([-u[..., 1], u[..., 0]], -1)
    pu = torch.einsum("...kc,...pc->...kp", u, pts)  # projections [..., P, V]
    pv = torch.einsum("...kc,...pc->...kp", v, pts)
    w = pu.amax(-1) - pu.amin(-1)
    h = pv.amax(-1) - pv.amin(-1)
    area = torch.where(norm[..., 0] > 1e-12, w * h, torch.full_like(w, math.inf))
    k = area.argmin(-1, keepdim=True)
    pick = lambda t: t.gather(-1, k).squeeze(-1)  # noqa: E731
    mu, mv = (pu.amax(-1) + pu.amin(-1)) / 2, (pv.amax(-1) + pv.amin(-1)) / 2
    ux, uy = pick(u[..., 0]), pick(u[..., 1])
    cu, cv = pick(mu), pick(mv)
    cx, cy = cu * ux - cv * uy, cu * uy + cv * ux
    return norm_obb(torch.stack([cx, cy, pick(w), pick(h), torch.atan2(uy, ux)], -1))


def hbox_to_obb(hboxes: torch.Tensor) -> torch.Tensor:
    """Axis-aligned boxes (x1, y1, x2, y2) [N, 4] -> oriented boxes with angle 0 [N, 5]."""
    _check_last(hboxes, 4, "hboxes")
    x1, y1, x2, y2 = hboxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, torch.zeros_like(x1)], -1)


def poly_to_hbox(polys: torch.Tensor) -> torch.Tensor:
    """Enclosing axis-aligned boxes (x1, y1, x2, y2) [N, 4] of polygons [N, 2K]."""
    pts = polys.reshape(*polys.shape[:-1], polys.shape[-1] // 2, 2)
    return torch.cat([pts.amin(-2), pts.amax(-2)], -1)


def obb_to_hbox(boxes: torch.Tensor) -> torch.Tensor:
    """Enclosing axis-aligned boxes (x1, y1, x2, y2) [N, 4] of oriented boxes [N, 5]."""
    return poly_to_hbox(obb_to_poly(boxes))


def poly_area(polys: torch.Tensor) -> torch.Tensor:
    """Unsigned area of simple polygons [..., 2K] (shoelace)."""
    return _signed_area(polys.reshape(*polys.shape[:-1], polys.shape[-1] // 2, 2)).abs()


# --------------------------------------------------------------------------- IoU
def rotated_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Exact IoU of oriented boxes: [N, 5] x [M, 5] -> [N, M] (input dtype, float64 inside)."""
    _check_last(boxes1, 5, "boxes1")
    _check_last(boxes2, 5, "boxes2")
    p1, p2 = obb_to_poly(boxes1.to(torch.float64)), obb_to_poly(boxes2.to(torch.float64))
    return _pairwise(p1, p2, _convex_iou_aligned).to(_out_dtype(boxes1))


def poly_iou(polys1: torch.Tensor, polys2: torch.Tensor) -> torch.Tensor:
    """Exact IoU of simple quadrilaterals (DOTA's polygon IoU): [N, 8] x [M, 8] -> [N, M]."""
    _check_last(polys1, 8, "polys1")
    _check_last(polys2, 8, "polys2")
    p1, p2 = polys1.to(torch.float64), polys2.to(torch.float64)
    return _pairwise(p1, p2, _poly_iou_aligned).to(_out_dtype(polys1))


def rotated_iou_aligned(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows: [K, 5] and [K, 5] -> [K] (e.g. predictions vs their targets).
    Differentiable with respect to both (away from touching corners), so usable as an IoU loss."""
    _check_aligned(boxes1, boxes2, 5)
    p1, p2 = obb_to_poly(boxes1.to(torch.float64)), obb_to_poly(boxes2.to(torch.float64))
    idx = torch.arange(p1.shape[0], device=p1.device)
    return _aligned_in_chunks(p1, p2, idx, idx, _convex_iou_aligned).to(_out_dtype(boxes1))


def poly_iou_aligned(polys1: torch.Tensor, polys2: torch.Tensor) -> torch.Tensor:
    """Polygon IoU of matching rows: [K, 8] and [K, 8] -> [K] (many pairs in one batched call)."""
    _check_aligned(polys1, polys2, 8)
    p1, p2 = polys1.to(torch.float64), polys2.to(torch.float64)
    idx = torch.arange(p1.shape[0], device=p1.device)
    return _aligned_in_chunks(p1, p2, idx, idx, _poly_iou_aligned).to(_out_dtype(polys1))


def _check_aligned(a: torch.Tensor, b: torch.Tensor, n: int) -> None:
    _check_last(a, n, "first argument")
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"aligned IoU needs two [K, {n}] tensors, got {tuple(a.shape)} and {tuple(b.shape)}.")


def _pairwise(p1: torch.Tensor, p2: torch.Tensor, aligned) -> torch.Tensor:
    """Fill an [N, M] IoU matrix, evaluating `aligned` only where enclosing boxes overlap."""
    out = p1.new_zeros(p1.shape[0], p2.shape[0])
    ii, jj = _candidate_pairs(poly_to_hbox(p1), poly_to_hbox(p2))
    out[ii, jj] = _aligned_in_chunks(p1, p2, ii, jj, aligned)
    return out


def _candidate_pairs(h1: torch.Tensor, h2: torch.Tensor, upper: bool = False):
    """Index pairs (i, j), sorted by i, whose axis-aligned boxes [N, 4] x [M, 4] overlap (only
    j > i with `upper`); built in row blocks so that memory stays bounded for large N."""
    ii, jj = [], []
    step = max(1, (1 << 24) // max(h2.shape[0], 1))
    cols = torch.arange(h2.shape[0], device=h2.device)
    for s in range(0, h1.shape[0], step):
        b = h1[s:s + step]
        ov = ((b[:, None, 0] <= h2[None, :, 2]) & (h2[None, :, 0] <= b[:, None, 2])
              & (b[:, None, 1] <= h2[None, :, 3]) & (h2[None, :, 1] <= b[:, None, 3]))
        if upper:
            ov &= cols[None, :] > torch.arange(s, s + b.shape[0], device=h2.device)[:, None]
        i, j = ov.nonzero(as_tuple=True)
        ii.append(i + s)
        jj.append(j)
    if not ii:
        empty = torch.zeros(0, dtype=torch.long, device=h1.device)
        return empty, empty
    return torch.cat(ii), torch.cat(jj)


def _aligned_in_chunks(p1, p2, ii, jj, aligned) -> torch.Tensor:
    out = [aligned(p1[ii[s:s + _PAIR_CHUNK]], p2[jj[s:s + _PAIR_CHUNK]]) for s in range(0, ii.numel(), _PAIR_CHUNK)]
    return torch.cat(out) if out else p1.new_zeros(0)


def _convex_iou_aligned(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    a = p1.reshape(-1, 4, 2)
    b = p2.reshape(-1, 4, 2)
    inter = _convex_intersection_area(a, b)
    union = _signed_area(a).abs() + _signed_area(b).abs() - inter
    return inter / union.clamp_min(1e-12)


def _poly_iou_aligned(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    a = p1.reshape(-1, 4, 2)
    b = p2.reshape(-1, 4, 2)
    ta, tb = _fan(a), _fan(b)  # [K, 2, 3, 2]
    sa, sb = torch.sign(_signed_area(ta)), torch.sign(_signed_area(tb))  # [K, 2]
    inter = a.new_zeros(a.shape[0])
    for i in range(2):
        for j in range(2):
            inter = inter + sa[:, i] * sb[:, j] * _convex_intersection_area(ta[:, i], tb[:, j])
    inter = inter.abs()
    union = _signed_area(a).abs() + _signed_area(b).abs() - inter
    return inter / union.clamp_min(1e-12)


def _fan(poly: torch.Tensor) -> torch.Tensor:
    """Quadrilaterals [K, 4, 2] -> triangles (v0, v1, v2), (v0, v2, v3) as [K, 2, 3, 2]."""
    return torch.stack([poly[:, [0, 1, 2]], poly[:, [0, 2, 3]]], 1)


def _signed_area(pts: torch.Tensor) -> torch.Tensor:
    """Shoelace signed area of polygons [..., V, 2] (positive = counter-clockwise in x-right/y-up)."""
    x, y = pts[..., 0], pts[..., 1]
    return 0.5 * (x * y.roll(-1, -1) - x.roll(-1, -1) * y).sum(-1)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside(points: torch.Tensor, poly: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """Which of points [K, P, 2] lie in (or on) convex polygons [K, V, 2] of either orientation."""
    edge = poly.roll(-1, 1) - poly  # [K, V, 2]
    rel = points[:, :, None, :] - poly[:, None, :, :]  # [K, P, V, 2]
    side = _cross(edge[:, None], rel) / edge.norm(dim=-1)[:, None].clamp_min(1e-30)  # signed distance
    orient = torch.sign(_signed_area(poly))[:, None, None]
    # A degenerate (zero-area) polygon contains nothing.
    return (side * orient >= -tol[:, None, None]).all(-1) & (orient[:, :, 0] != 0)


def _convex_intersection_area(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Area of the intersection of convex polygons a [K, n, 2] and b [K, m, 2] (any orientation)."""
    return hull_area(*convex_intersection_points(a, b))


def convex_intersection_points(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices of the intersection of convex polygons a [K, n, 2] and b [K, m, 2]: candidate
    points [K, n + m + n*m, 2] (the vertices of each inside the other, the edge crossings) and
    which of them are valid; unordered, possibly repeated."""
    scale = torch.cat([a, b], 1).abs().amax((1, 2))
    tol = 1e-9 * (1.0 + scale)
    # Edge-edge crossings: a_i + t r_i = b_j + u s_j with t, u in [0, 1].
    r = (a.roll(-1, 1) - a)[:, :, None]  # [K, n, 1, 2]
    s = (b.roll(-1, 1) - b)[:, None]  # [K, 1, m, 2]
    qp = b[:, None] - a[:, :, None]  # [K, n, m, 2]
    denom = _cross(r, s)
    ok = denom.abs() > 1e-12 * (1.0 + scale[:, None, None]) ** 2
    safe = torch.where(ok, denom, torch.ones_like(denom))
    t, u = _cross(qp, s) / safe, _cross(qp, r) / safe
    eps = 1e-9
    ok = ok & (t >= -eps) & (t <= 1 + eps) & (u >= -eps) & (u <= 1 + eps)
    cross_pts = (a[:, :, None] + t[..., None] * r).flatten(1, 2)
    pts = torch.cat([a, b, cross_pts], 1)  # [K, C, 2]
    valid = torch.cat([_inside(a, b, tol), _inside(b, a, tol), ok.flatten(1)], 1)
    return pts, valid


def hull_area(pts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Area of the convex polygon spanned by the valid points (they are its vertices, in any
    order, possibly repeated): sort by angle about their mean, pad with the first point, shoelace."""
    count = valid.sum(1, keepdim=True)
    w = valid.to(pts.dtype)[..., None]
    center = (pts * w).sum(1, keepdim=True) / count.clamp_min(1)[..., None]
    d = pts - center
    ang = torch.atan2(d[..., 1], d[..., 0])
    ang = torch.where(valid, ang, torch.full_like(ang, 10.0))  # invalid points sort last
    order = ang.argsort(1)
    d = d.gather(1, order[..., None].expand_as(d))
    keep = valid.gather(1, order)
    d = torch.where(keep[..., None], d, d[:, :1].expand_as(d))  # padding adds zero area
    area = _signed_area(d).abs()
    return torch.where(count[:, 0] >= 3, area, torch.zeros_like(area))


# --------------------------------------------------------------------------- NMS
def rotated_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS of oriented boxes [N, 5]: keep the best-scoring box, drop boxes with IoU
    > iou_threshold to a kept one; returns kept indices sorted by decreasing score."""
    return _nms(obb_to_poly(boxes.to(torch.float64)), scores, iou_threshold, _convex_iou_aligned, convex=True)


def poly_nms(polys: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS of quadrilaterals [N, 8] with polygon IoU (as DOTA's merge scripts do)."""
    return _nms(polys.to(torch.float64), scores, iou_threshold, _poly_iou_aligned)


def batched_rotated_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                        iou_threshold: float) -> torch.Tensor:
    """Class-aware rotated NMS: boxes of different labels never suppress each other; kept
    indices sorted by decreasing score."""
    return _nms(obb_to_poly(boxes.to(torch.float64)), scores, iou_threshold, _convex_iou_aligned, labels, convex=True)


def batched_poly_nms(polys: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                     iou_threshold: float) -> torch.Tensor:
    """Polygon NMS within groups (e.g. one group per image and class, as in DOTA's merge)."""
    return _nms(polys.to(torch.float64), scores, iou_threshold, _poly_iou_aligned, groups)


def batched_hbox_nms(hboxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                     iou_threshold: float) -> torch.Tensor:
    """NMS of axis-aligned boxes (x1, y1, x2, y2) [N, 4] within groups (e.g. the oriented RPN's
    per-level NMS on its proposals' enclosing boxes); kept indices by decreasing score. Each
    group's IoU matrix is built densely (cheap for the few thousand boxes of a group)."""
    _check_last(hboxes, 4, "hboxes")
    if scores.shape[0] != hboxes.shape[0] or groups.shape[0] != hboxes.shape[0]:
        raise ValueError(f"got {hboxes.shape[0]} boxes but {scores.shape[0]} scores and {groups.shape[0]} groups.")
    with one_thread():
        keep = []
        for v in groups.unique():
            idx = torch.nonzero(groups == v)[:, 0]
            idx = idx[scores[idx].argsort(descending=True, stable=True)]
            b = hboxes[idx].to(torch.float64)
            over = (hbox_iou(b, b) > iou_threshold).triu(1).cpu().numpy()
            removed = np.zeros(idx.numel(), dtype=bool)
            mine = []
            for i in range(idx.numel()):
                if not removed[i]:
                    mine.append(i)
                    removed |= over[i]
            keep.append(idx[torch.tensor(mine, dtype=torch.long, device=idx.device)])
        if not keep:
            return torch.zeros(0, dtype=torch.long, device=hboxes.device)
        keep = torch.cat(keep)
    return keep[scores[keep].argsort(descending=True, stable=True)]


def hbox_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of axis-aligned boxes (x1, y1, x2, y2): [N, 4] x [M, 4] -> [N, M]."""
    _check_last(boxes1, 4, "boxes1")
    _check_last(boxes2, 4, "boxes2")
    return _hbox_iou_aligned(boxes1[:, None], boxes2[None])


def _hbox_iou_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp_min(0).prod(-1)
    area = lambda t: (t[..., 2:] - t[..., :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp_min(1e-12)


LAZY_PAIRS_PER_BOX = 32


@contextlib.contextmanager
def one_thread():
    """Run detection post-processing (NMS, proposals, RoI head) with one intra-op thread: it is a
    chain of many small tensor ops, where thread start-up and synchronisation cost more than they
    save (on 2 shared cores, the NMS calls of evaluating 2 synthetic images took 8.7 s of CPU with
    2 threads and 0.46 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
_BOUND_MARGIN = 1e-9  # a pair is skipped only when its IoU bound is this far below the threshold


def _nms(polys: torch.Tensor, scores: torch.Tensor, iou_threshold: float, aligned,
         groups: torch.Tensor | None = None, convex: bool = False) -> torch.Tensor:
    with one_thread():
        return _greedy_nms(polys, scores, iou_threshold, aligned, groups, convex)


def _greedy_nms(polys: torch.Tensor, scores: torch.Tensor, iou_threshold: float, aligned,
                groups: torch.Tensor | None = None, convex: bool = False) -> torch.Tensor:
    """Greedy NMS over a sparse suppression graph: the candidate pairs i < j (in score order) of one
    group are those whose enclosing boxes overlap. For convex polygons a pair is also dropped when
    an upper bound of its IoU, u / (area_i + area_j - u) with u = min(area of the enclosing boxes'
    overlap, area_i, area_j), is below the threshold (so it could not suppress). Few pairs: the
    exact IoUs in one batched call, each distinct pair of shapes once (a detector's boxes often
    repeat over classes: Oriented R-CNN regresses one box per proposal for every class). Many pairs
    (more than LAZY_PAIRS_PER_BOX per box: dense clusters of duplicates): the IoU is computed
    lazily, for each kept box against its candidates not yet suppressed, so a cluster costs about
    (kept boxes x cluster size), not (cluster size)^2. IoU > iou_threshold suppresses; equal keeps."""
    n = polys.shape[0]
    if scores.shape[0] != n or (groups is not None and groups.shape[0] != n):
        got = f"{scores.shape[0]} scores" + ("" if groups is None else f" and {groups.shape[0]} labels")
        raise ValueError(f"got {n} boxes but {got}.")
    order = scores.argsort(descending=True, stable=True)
    polys = polys[order]
    h = poly_to_hbox(polys)
    if groups is None:
        ii, jj = _candidate_pairs(h, h, upper=True)
    else:  # per group (fewer comparisons than one masked n x n pass), then back in row order
        g = groups[order].to(h.device)
        ii = jj = h.new_zeros(0, dtype=torch.long)
        for v in g.unique():
            idx = torch.nonzero(g == v)[:, 0]  # this group's positions, in score order
            a, b = _candidate_pairs(h[idx], h[idx], upper=True)
            ii, jj = torch.cat([ii, idx[a]]), torch.cat([jj, idx[b]])
        by_row = ii.argsort(stable=True)
        ii, jj = ii[by_row], jj[by_row]
    if convex and iou_threshold >= 0 and ii.numel():
        area = poly_area(polys)
        lo, hi = torch.maximum(h[ii, :2], h[jj, :2]), torch.minimum(h[ii, 2:], h[jj, 2:])
        u = torch.minimum((hi - lo).clamp_min(0).prod(-1), torch.minimum(area[ii], area[jj]))
        bound = u / (area[ii] + area[jj] - u).clamp_min(1e-300)
        near = bound >= iou_threshold - _BOUND_MARGIN
        ii, jj = ii[near], jj[near]
    lazy = ii.numel() > LAZY_PAIRS_PER_BOX * max(n, 1)  # dense clusters: IoU only where still needed
    if not lazy:
        hit = _distinct_pair_iou(polys, ii, jj, aligned) > iou_threshold
        ii, jj = ii[hit], jj[hit]
    ii, jj = ii.cpu().numpy(), jj.cpu().numpy()
    ptr = np.searchsorted(ii, np.arange(n + 1))
    removed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        cand = jj[ptr[i]:ptr[i + 1]]
        if lazy:
            cand = cand[~removed[cand]]
            if cand.size:
                dev = torch.from_numpy(cand).to(polys.device)
                cand = cand[(_aligned_in_chunks(polys, polys, torch.full_like(dev, i), dev, aligned) > iou_threshold).cpu().numpy()]
        removed[cand] = True
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def _distinct_pair_iou(polys: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor, aligned) -> torch.Tensor:
    """aligned(polys[ii], polys[jj]), evaluated once per distinct ordered pair of shapes (rows of
    equal coordinates are one shape), so every value is exactly what evaluating its own pair gives."""
    if ii.numel() == 0:
        return polys.new_zeros(0)
    shapes, shape_of = torch.unique(polys, dim=0, return_inverse=True)
    if shapes.shape[0] == polys.shape[0]:
        return _aligned_in_chunks(polys, polys, ii, jj, aligned)
    key = shape_of[ii] * shapes.shape[0] + shape_of[jj]
    distinct, which = torch.unique(key, return_inverse=True)
    first = torch.full((distinct.numel(),), ii.numel(), dtype=torch.long, device=ii.device)
    first.scatter_reduce_(0, which, torch.arange(ii.numel(), device=ii.device), reduce="amin")
    return _aligned_in_chunks(polys, polys, ii[first], jj[first], aligned)[which]


# --------------------------------------------------------------------------- box coder
class DeltaXYWHACoder:
    """Regression targets of oriented boxes relative to oriented proposals/anchors (Oriented R-CNN's
    RoI-head convention: mmrotate's DeltaXYWHAOBBoxCoder, angle 'le90', edge_swap, no angle
    normalisation factor):

        dx = ( (gx-px) cos pa + (gy-py) sin pa) / pw     dw = log(gw / pw)
        dy = (-(gx-px) sin pa + (gy-py) cos pa) / ph     dh = log(gh / ph)
        da = wrap(ga - pa), wrapped to [-pi/2, pi/2) (a rectangle turned by pi is itself), radians

    then `(delta - means) / stds`. With `edge_swap` (default) the target is first rewritten as
    (gh, gw, ga + pi/2) when that turns it less, so |da| <= pi/4 and a near-square target never
    asks for a jump of pi/2. Horizontal anchors are proposals with angle 0 (`hbox_to_obb`).
    `decode` clamps dw, dh to +-log(1000/16) like the usual coders, and returns le90 boxes.
    """

    def __init__(self, means=(0.0, 0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0, 1.0),
                 wh_ratio_clip: float = 16 / 1000, edge_swap: bool = True):
        if len(means) != 5 or len(stds) != 5:
            raise ValueError("means and stds need 5 values each (dx, dy, dw, dh, da).")
        self.means, self.stds = tuple(means), tuple(stds)
        self.max_ratio = abs(math.log(wh_ratio_clip))
        self.edge_swap = edge_swap

    def encode(self, proposals: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Proposals [N, 5], targets [N, 5] -> normalised deltas [N, 5]."""
        _check_last(proposals, 5, "proposals")
        if proposals.shape != gt.shape:
            raise ValueError(f"encode needs one target per proposal, got {tuple(proposals.shape)} "
                             f"and {tuple(gt.shape)}.")
        px, py, pw, ph, pa = proposals.unbind(-1)
        gx, gy, gw, gh, ga = gt.unbind(-1)
        da = _wrap(ga - pa)
        if self.edge_swap:
            da2 = _wrap(ga - pa + math.pi / 2)
            swap = da2.abs() < da.abs()
            gw, gh, da = torch.where(swap, gh, gw), torch.where(swap, gw, gh), torch.where(swap, da2, da)
        cos, sin = torch.cos(pa), torch.sin(pa)
        dx = ((gx - px) * cos + (gy - py) * sin) / pw
        dy = (-(gx - px) * sin + (gy - py) * cos) / ph
        deltas = torch.stack([dx, dy, torch.log(gw / pw), torch.log(gh / ph), da], -1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, proposals: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Proposals [N, 5], normalised deltas [N, 5] -> boxes [N, 5] in le90 form."""
        _check_last(proposals, 5, "proposals")
        d = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        dx, dy, dw, dh, da = d.unbind(-1)
        dw, dh = dw.clamp(-self.max_ratio, self.max_ratio), dh.clamp(-self.max_ratio, self.max_ratio)
        px, py, pw, ph, pa = proposals.unbind(-1)
        cos, sin = torch.cos(pa), torch.sin(pa)
        gx = px + dx * pw * cos - dy * ph * sin
        gy = py + dx * pw * sin + dy * ph * cos
        out = torch.stack([gx, gy, pw * dw.exp(), ph * dh.exp(), pa + da], -1)
        return norm_obb(out)


def encode_points(points: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Anchor-free targets: for points [N, 2] inside boxes gt [N, 5], the distances
    (left, top, right, bottom) to the box sides measured in the box frame, and the angle:
    [N, 5] = (l, t, r, b, a). All four distances are positive iff the point is inside."""
    _check_last(points, 2, "points")
    cx, cy, w, h, a = gt.unbind(-1)
    cos, sin = torch.cos(a), torch.sin(a)
    ox, oy = points[:, 0] - cx, points[:, 1] - cy
    lx, ly = ox * cos + oy * sin, -ox * sin + oy * cos  # the point in the box frame
    return torch.stack([w / 2 + lx, h / 2 + ly, w / 2 - lx, h / 2 - ly, a], -1)


def decode_points(points: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_points`: points [N, 2], (l, t, r, b, a) [N, 5] -> boxes [N, 5]."""
    _check_last(points, 2, "points")
    l, t, r, b, a = dist.unbind(-1)
    cos, sin = torch.cos(a), torch.sin(a)
    ox, oy = (r - l) / 2, (b - t) / 2  # centre minus point, in the box frame
    cx = points[:, 0] + ox * cos - oy * sin
    cy = points[:, 1] + ox * sin + oy * cos
    return torch.stack([cx, cy, l + r, t + b, a], -1)


# --------------------------------------------------------------------------- helpers
def _wrap(a: torch.Tensor) -> torch.Tensor:
    """Angle difference modulo pi, into [-pi/2, pi/2)."""
    return torch.remainder(a + math.pi / 2, math.pi) - math.pi / 2


def _check_last(t: torch.Tensor, n: int, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[-1] != n:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a tensor of shape [..., {n}], got {shape}.")


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32
