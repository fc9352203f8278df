"""Procedural aerial scenes: an RGB image, its LoveDA-class mask and its rotated object boxes,
drawn from a seed (the pixels of the bundled dataset that `rsscale data` writes, scaling/data/data.py).

Geometry convention (DOTA's): x right, y down, pixel (row i, col j) covers [j, j+1) x [i, i+1);
a box (cx, cy, w, h, angle) has its w side along (cos angle, sin angle), angle in radians in
[-pi/2, pi/2); its corners are listed clockwise on screen starting at the (-w/2, -h/2) corner.
A pixel belongs to an object iff its centre lies inside the object's shape, and every shape
touches all four sides of its box, so the boxes are exactly the rendered objects
(rectangles for vehicles, a hull with a blunt bow for ships, the circumscribed square for storage tanks).
An object is `difficult` when less than 60% of it is inside the image or its short side is
under 4 px. Detection classes (DOTA names): DET_CLASSES. Buildings appear in the masks only
(DOTA has no building class); vehicles keep the road class and ships the water class in the
masks, as in LoveDA; storage tanks are buildings.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# LoveDA's classes; its masks store them as 1..7, with 0 for no-data.
LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
BACKGROUND, BUILDING, ROAD, WATER, BARREN, FOREST, AGRICULTURE = range(1, 8)
DET_CLASSES = ("small-vehicle", "large-vehicle", "ship", "storage-tank")

# Scene categories: land-cover weights (background, barren, forest, agriculture), water kind,
# and object counts (roads, parking lots, buildings, small/large vehicles, ships, tanks) as (low, high).
THEMES = {
    "farmland": dict(cover=(1, 1, 1, 8), water=("none", "river"), roads=(0, 2), lots=(0, 0), buildings=(0, 4),
                     small=(0, 4), large=(0, 2), ships=(0, 0), tanks=(0, 0)),
    "forest": dict(cover=(1, 1, 8, 1), water=("none", "lake"), roads=(0, 1), lots=(0, 0), buildings=(0, 2),
                   small=(0, 2), large=(0, 1), ships=(0, 0), tanks=(0, 0)),
    "residential": dict(cover=(6, 1, 2, 1), water=("none",), roads=(2, 4), lots=(0, 2), buildings=(10, 30),
                        small=(8, 25), large=(0, 4), ships=(0, 0), tanks=(0, 0)),
    "industrial": dict(cover=(4, 4, 1, 1), water=("none",), roads=(1, 3), lots=(0, 2), buildings=(4, 10),
                       small=(2, 10), large=(4, 12), ships=(0, 0), tanks=(3, 12)),
    "river": dict(cover=(3, 1, 3, 3), water=("river",), roads=(0, 2), lots=(0, 1), buildings=(0, 8),
                  small=(0, 8), large=(0, 2), ships=(2, 6), tanks=(0, 0)),
    "harbor": dict(cover=(4, 3, 1, 0), water=("coast",), roads=(1, 2), lots=(0, 2), buildings=(2, 8),
                   small=(2, 10), large=(2, 8), ships=(6, 16), tanks=(0, 6)),
    "bare_land": dict(cover=(1, 8, 1, 1), water=("none", "lake"), roads=(0, 2), lots=(0, 0), buildings=(0, 3),
                      small=(0, 3), large=(0, 3), ships=(0, 0), tanks=(0, 2)),
}
URBAN_THEMES = ("residential", "industrial", "harbor")
# "rich" gives agriculture regular textures at a visible scale (crop rows, orchard lattices,
# greenhouse rows) and stands most buildings in rows along the roads: structure that the
# visible patches determine, so a larger model has more to learn (docs/STUDY.md).
# "vocab" adds to "rich" flat roofs that each carry one of VOCAB_SIZE fixed designs (a 4x4 layout
# of panels), drawn with Zipf frequencies. The masked part of a roof is predictable only by
# remembering its design, and a model of N parameters can remember only so many: the rare designs
# are what capacity buys, the mechanism of the quantization model of neural scaling (Michaud et
# al. 2023) put into pixels.
SCENE_SETS = ("base", "rich", "vocab")
VOCAB_SIZE, VOCAB_ZIPF, VOCAB_SEED = 512, 1.2, 20231
PANEL_COLOURS = np.array([(230, 230, 225), (40, 45, 60), (60, 90, 150), (180, 60, 50), (90, 140, 80),
                          (215, 180, 60), (140, 100, 160), (120, 120, 120)], np.float32)
COVERS = (BACKGROUND, BARREN, FOREST, AGRICULTURE)
CROP_COLOURS = np.array([(96, 128, 60), (140, 150, 80), (170, 150, 95), (120, 100, 70), (75, 110, 55),
                         (190, 175, 110)], np.float32)
ROOF_COLOURS = np.array([(170, 70, 60), (150, 150, 155), (200, 200, 195), (110, 90, 80), (90, 110, 130),
                         (185, 130, 90)], np.float32)
CAR_COLOURS = np.array([(235, 235, 235), (30, 30, 35), (160, 160, 165), (150, 30, 30), (40, 60, 140),
                        (200, 200, 190)], np.float32)
SHIP_COLOURS = np.array([(235, 235, 235), (200, 200, 205), (150, 40, 40), (60, 70, 90)], np.float32)


# ----------------------------------------------------------------------------- rasterization


class Canvas:
    """RGB (float), LoveDA mask, instance ids and an occupancy map painted together."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.rgb = np.zeros((h, w, 3), np.float32)
        self.mask = np.full((h, w), BACKGROUND, np.uint8)
        self.inst = np.zeros((h, w), np.int32)  # 0 = none, k = boxes[k - 1]
        self.occupied = np.zeros((h, w), bool)

    def frame(self, cx: float, cy: float, angle: float, radius: float):
        """Window around (cx, cy) clipped to the image, plus the unclipped pixel-centre
        coordinates (u along the box's w axis, v along h) and the clipped part of them."""
        x0, x1 = math.floor(cx - radius), math.ceil(cx + radius) + 1
        y0, y1 = math.floor(cy - radius), math.ceil(cy + radius) + 1
        xs, ys = np.meshgrid(np.arange(x0, x1) + 0.5 - cx, np.arange(y0, y1) + 0.5 - cy)
        c, s = math.cos(angle), math.sin(angle)
        u, v = xs * c + ys * s, -xs * s + ys * c
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, self.h), max(x0, 0), min(x1, self.w)
        inner = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
        return (slice(cy0, cy1), slice(cx0, cx1)), u, v, inner


def box_corners(cx, cy, w, h, angle) -> np.ndarray:
    """4x2 corners of a rotated box, clockwise on screen from the (-w/2, -h/2) corner."""
    c, s = math.cos(angle), math.sin(angle)
    local = np.array([(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)])
    return np.array([cx, cy]) + local @ np.array([[c, s], [-s, c]])


def _shape(kind: str, u, v, w, h):
    """Boolean footprint of an object in its own frame; each shape touches all 4 box sides."""
    if kind == "storage-tank":
        return u * u + v * v <= (w / 2) ** 2
    inside = (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)
    if kind == "ship":  # bow over the front quarter, blunt enough that its nose hits pixel centres
        bow = 0.25 * w
        inside &= np.abs(v) <= (h / 2) * np.minimum(1.0, 0.35 + 0.65 * (w / 2 - u) / bow)
    return inside


def _smooth_noise(rng, h: int, w: int, cell: float) -> np.ndarray:
    """Value noise in [0, 1] with features about `cell` pixels wide."""
    small = rng.random((max(2, int(h / cell) + 2), max(2, int(w / cell) + 2))).astype(np.float32)
    return np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BICUBIC)).clip(0, 1)


def _line_mask(h, w, points, width) -> np.ndarray:
    img = Image.new("L", (w, h))
    ImageDraw.Draw(img).line([tuple(p) for p in points], fill=1, width=max(1, int(round(width))), joint="curve")
    return np.asarray(img, bool)


# ----------------------------------------------------------------------------- scene layers


def _lattice(xx, yy, angle: float, period: float, offset) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) relative to the nearest node of a square lattice turned by `angle`."""
    c, s = math.cos(angle), math.sin(angle)
    u, v = xx * c + yy * s + offset[0], -xx * s + yy * c + offset[1]
    return (u % period) - period / 2, (v % period) - period / 2


def _rich_crop(rng, xx, yy, fine, k: float) -> np.ndarray:
    """A field with regular structure a model can continue from the visible part: crop rows at a
    visible period, an orchard (a lattice of tree crowns with their shadows), or greenhouse rows."""
    a, period = rng.uniform(0, math.pi), rng.uniform(14, 40) * k
    kind = rng.integers(3)
    soil = np.array((150, 125, 90), np.float32) * rng.uniform(0.85, 1.15)
    if kind == 0:  # crop rows: two colours, soft-edged
        c1, c2 = CROP_COLOURS[rng.choice(len(CROP_COLOURS), 2, replace=False)]
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period)
        return (c1 * t[..., None] + c2 * (1 - t[..., None])) * (0.93 + 0.14 * fine[..., None])
    if kind == 1:  # orchard: crowns of radius ~0.3 period, lit from the upper left
        du, dv = _lattice(xx, yy, a, period, rng.random(2) * period)
        r = rng.uniform(0.25, 0.4) * period
        d2 = (du * du + dv * dv) / (r * r)
        crown = np.array((45, 95, 40), np.float32) * (1.25 - 0.5 * np.clip(d2 + 0.3 * (du + dv) / r, 0, 1))[..., None]
        shade = ((du - 0.3 * r) ** 2 + (dv - 0.3 * r) ** 2) < r * r
        ground = soil * np.where(shade, 0.6, 1.0)[..., None]
        return np.where((d2 <= 1)[..., None], crown, ground)
    # greenhouses: bright roofs of a fixed width with dark gaps, ridges along the rows
    u = (xx * math.cos(a) + yy * math.sin(a)) % period
    roof = u < rng.uniform(0.55, 0.8) * period
    ridge = np.abs(u - 0.25 * period) < 0.06 * period
    tone = np.where(roof, np.where(ridge, 0.8, 1.0), 0.45)[..., None]
    return np.array((215, 220, 225), np.float32) * tone * (0.97 + 0.06 * fine[..., None])


@functools.cache
def _vocabulary() -> tuple[np.ndarray, np.ndarray]:
    """(designs VOCAB_SIZE x 4 x 4 of panel colour indices, Zipf probabilities of the designs):
    one fixed vocabulary for every split and dataset seed, so held-out roofs use the designs that
    pretraining saw."""
    designs = np.random.default_rng(VOCAB_SEED).integers(len(PANEL_COLOURS), size=(VOCAB_SIZE, 4, 4))
    p = np.arange(1, VOCAB_SIZE + 1, dtype=float) ** -VOCAB_ZIPF
    return designs, p / p.sum()


def _roofs(rng, cv: Canvas, k: float) -> None:
    """vocab scenes: 16-36 square flat roofs (axis-aligned, labelled building, no boxes; up to 5
    places tried each), each painted with a design of the vocabulary drawn by its Zipf frequency."""
    designs, p = _vocabulary()
    for _ in range(int(rng.integers(16, 37))):
        side, design = rng.uniform(32, 44) * k, designs[rng.choice(VOCAB_SIZE, p=p)]

        def paint(u, v, side=side, design=design):
            i = np.clip(((u / side + 0.5) * 4).astype(int), 0, 3)
            j = np.clip(((v / side + 0.5) * 4).astype(int), 0, 3)
            return PANEL_COLOURS[design[j, i]]

        for _try in range(5):
            placed = _place(cv, "roof", *rng.random(2) * (cv.w, cv.h), side, side, 0.0, COVERS, paint, shadow=2 * k)
            if placed is not None:
                cv.mask[placed[0]][placed[1]] = BUILDING
                break


def _land_cover(rng, cv: Canvas, theme: dict, k: float, rich: bool = False) -> None:
    """Voronoi fields with wobbly edges; each gets a cover class and its texture (rich: the
    agriculture fields get the regular textures of `_rich_crop`)."""
    h, w = cv.h, cv.w
    n = int(rng.integers(3, 8))
    seeds = rng.random((n, 2)) * (w, h)
    weights = np.array(theme["cover"], float)
    covers = rng.choice(COVERS, size=n, p=weights / weights.sum())
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    wob = 20 * k * (_smooth_noise(rng, h, w, 40 * k) - 0.5)
    d = (xx[None] + wob - seeds[:, 0, None, None]) ** 2 + (yy[None] - wob - seeds[:, 1, None, None]) ** 2
    region = d.argmin(0)
    fine, coarse = _smooth_noise(rng, h, w, 3 * k), _smooth_noise(rng, h, w, 25 * k)
    for r in range(n):
        sel = region == r
        cover = covers[r]
        if cover == AGRICULTURE and rich:
            tex = _rich_crop(rng, xx, yy, fine, k)
        elif cover == AGRICULTURE:
            a, period = rng.uniform(0, math.pi), rng.uniform(5, 14) * k
            stripes = np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period) > 0
            c1, c2 = CROP_COLOURS[rng.choice(len(CROP_COLOURS), 2)]
            tex = np.where(stripes[..., None], c1, 0.5 * c1 + 0.5 * c2) * (0.9 + 0.2 * fine[..., None])
        elif cover == FOREST:
            canopy = _smooth_noise(rng, h, w, 2.5 * k)
            tex = np.array((35, 70, 35), np.float32) * (0.6 + 0.8 * canopy[..., None] * (0.7 + 0.6 * coarse[..., None]))
        elif cover == BARREN:
            tex = np.array((175, 155, 125), np.float32) * (0.8 + 0.25 * coarse[..., None] + 0.1 * fine[..., None])
        else:
            tex = np.array((115, 128, 90), np.float32) * (0.75 + 0.3 * coarse[..., None] + 0.15 * fine[..., None])
        cv.rgb[sel] = tex[sel]
        cv.mask[sel] = cover


def _water(rng, cv: Canvas, kind: str, k: float) -> None:
    h, w = cv.h, cv.w
    if kind == "none":
        return
    if kind == "lake":
        cx, cy = rng.random() * w, rng.random() * h
        r = rng.uniform(0.15, 0.35) * min(h, w)
        ang = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        rad = r * (0.7 + 0.6 * rng.random(24))
        img = Image.new("L", (w, h))
        ImageDraw.Draw(img).polygon(list(zip(cx + rad * np.cos(ang), cy + rad * np.sin(ang))), fill=1)
        water = np.asarray(img.filter(ImageFilter.GaussianBlur(4 * k)), np.uint8) > 0
    elif kind == "river":
        water = _line_mask(h, w, _crossing(rng, h, w, 3), rng.uniform(0.1, 0.25) * min(h, w))
    else:  # coast: the sea covers one side of a wavy line
        yy, xx = np.mgrid[0:h, 0:w]
        edge = rng.uniform(0.35, 0.6) * w + 0.08 * w * (_smooth_noise(rng, h, 1, 30 * k)[:, :1] - 0.5)
        water = xx > edge if rng.random() < 0.5 else xx < w - edge
    depth = _smooth_noise(rng, h, w, 30 * k)[..., None]
    cv.rgb[water] = (np.array((35, 70, 85), np.float32) * (0.8 + 0.4 * depth))[water]
    cv.mask[water] = WATER


def _crossing(rng, h, w, n_mid: int) -> np.ndarray:
    """A polyline from one image side to the opposite one through n_mid jittered points."""
    t = np.linspace(0, 1, n_mid + 2)
    a, b = rng.random(2)
    along = t * 1.2 - 0.1
    across = a + (b - a) * t + rng.normal(0, 0.08, t.size) * (t > 0) * (t < 1)
    pts = np.stack([along * w, across * h], 1)
    return pts if rng.random() < 0.5 else pts[:, ::-1] * (w / h, h / w)


def _roads(rng, cv: Canvas, n: int, k: float) -> list[tuple[np.ndarray, float]]:
    roads = []
    for _ in range(n):
        pts, width = _crossing(rng, cv.h, cv.w, int(rng.integers(0, 3))), rng.uniform(6, 12) * k
        road = _line_mask(cv.h, cv.w, pts, width)
        tone = rng.uniform(80, 110)
        cv.rgb[road] = tone + rng.normal(0, 3, (int(road.sum()), 1))
        cv.mask[road] = ROAD
        roads.append((pts, width))
    return roads


def _place(cv: Canvas, kind, cx, cy, w, h, angle, allowed, paint, shadow, occupy=True):
    """Paint one object if its visible footprint lies on `allowed` classes and on nothing else;
    returns (window, visible footprint, unclipped footprint) or None when it does not fit.
    occupy=False paints ground (a parking lot) that later objects may stand on."""
    if not (0 <= cx < cv.w and 0 <= cy < cv.h):
        return None
    sl, u, v, inner = cv.frame(cx, cy, angle, math.hypot(w, h) / 2 + shadow + 1)
    full = _shape(kind, u, v, w, h)
    inside = full[inner]
    if not inside.any() or cv.occupied[sl][inside].any() or not np.isin(cv.mask[sl][inside], allowed).all():
        return None
    if shadow:  # the same footprint shifted down-right, drawn first, darkens what is under it
        su = u - shadow * (math.cos(angle) + math.sin(angle))
        sv = v - shadow * (math.cos(angle) - math.sin(angle))
        cast = _shape(kind, su, sv, w, h)[inner] & ~inside & ~cv.occupied[sl]
        cv.rgb[sl][cast] *= 0.55
    cv.rgb[sl][inside] = paint(u[inner][inside], v[inner][inside])
    if occupy:
        cv.occupied[sl] |= inside
    return sl, inside, full


def _objects(rng, cv: Canvas, theme: dict, roads, k: float, rich: bool = False) -> list[tuple]:
    """Parking lots, buildings, storage tanks, vehicles (on roads and lots) and ships (on water).
    rich: most buildings stand in rows along the roads (one size, spacing and roof per row side)."""
    boxes = []

    def count(name):
        lo, hi = theme[name]
        return int(rng.integers(lo, hi + 1))

    def add(kind, cx, cy, w, h, angle, allowed, paint, shadow, label=None):
        placed = _place(cv, kind, cx, cy, w, h, angle, allowed, paint, shadow)
        if placed is None:
            return False
        sl, inside, full = placed
        if label is None or kind == "storage-tank":
            cv.mask[sl][inside] = BUILDING
        if label is not None:
            cv.inst[sl][inside] = len(boxes) + 1
            difficult = int(inside.sum() < 0.6 * full.sum() or min(w, h) < 4)
            angle = (angle + math.pi / 2) % math.pi - math.pi / 2  # a box is the same turned by pi
            boxes.append((float(cx), float(cy), float(w), float(h), float(angle), label, difficult))
        return True

    def flat(colour, detail=None):
        def paint(u, v):
            out = np.broadcast_to(colour, (u.size, 3)).copy()
            if detail is not None:
                out *= detail(u, v)[:, None]
            return out
        return paint

    def vehicle_paint(label, w):
        body = CAR_COLOURS[rng.integers(len(CAR_COLOURS))]
        front = 0.15 if label == "small-vehicle" else 0.3  # dark windscreen band behind the bonnet
        return flat(body, lambda u, v: np.where((u > w * front) & (u < w * (front + 0.15)), 0.35, 1.0))

    covers = (BACKGROUND, BARREN, AGRICULTURE, FOREST)
    for _ in range(count("lots")):  # asphalt with painted bays; two rows of cars parked across it
        lw, lh, bay = rng.uniform(50, 90) * k, rng.uniform(28, 44) * k, 8 * k
        angle = _road_angle(rng, roads)
        lines = lambda u, v: np.where(np.abs((u + lw / 2) % bay - bay / 2) < 0.4 * k, 1.9, 1.0)  # noqa: E731
        for _try in range(10):
            cx, cy = rng.random(2) * (cv.w, cv.h)
            lot = _place(cv, "lot", cx, cy, lw, lh, angle, covers,
                         flat(np.full(3, 100, np.float32), lines), shadow=0, occupy=False)
            if lot is None:
                continue
            cv.mask[lot[0]][lot[1]] = ROAD
            axis, across = np.array((math.cos(angle), math.sin(angle))), np.array((-math.sin(angle), math.cos(angle)))
            for row in (-lh / 4, lh / 4):
                for slot in np.arange(-lw / 2 + bay, lw / 2 - bay / 2, bay):
                    if rng.random() < 0.65:
                        w, h = rng.uniform(9, 12) * k, rng.uniform(4.5, 6) * k
                        x, y = np.array((cx, cy)) + slot * axis + row * across
                        add("vehicle", x, y, w, h, angle + math.pi / 2 + rng.normal(0, 0.05), (ROAD,),
                            vehicle_paint("small-vehicle", w), shadow=1.5 * k, label="small-vehicle")
            break
    buildings = count("buildings")
    for pts, width in roads if rich and buildings else []:
        for side in (-1, 1):
            w, h = rng.uniform(12, 24) * k, rng.uniform(10, 18) * k
            gap, roof = w + rng.uniform(4, 12) * k, ROOF_COLOURS[rng.integers(len(ROOF_COLOURS))]
            for p0, p1 in zip(pts[:-1], pts[1:]):
                d = p1 - p0
                length, angle = float(np.hypot(*d)), math.atan2(d[1], d[0])
                normal = np.array((-d[1], d[0])) / max(length, 1e-9)
                for t in np.arange(gap / 2, length, gap):
                    cx, cy = p0 + d * (t / length) + side * normal * (width / 2 + h / 2 + 3 * k)
                    if buildings > 0 and add("building", cx, cy, w, h, angle, covers,
                                             flat(roof, lambda u, v: np.where(v > 0, 0.82, 1.0)), shadow=3 * k):
                        buildings -= 1
    for _ in range(buildings):
        w, h = rng.uniform(12, 40) * k, rng.uniform(10, 28) * k
        angle = _road_angle(rng, roads)
        roof = ROOF_COLOURS[rng.integers(len(ROOF_COLOURS))]
        for _try in range(10):
            if add("building", *rng.random(2) * (cv.w, cv.h), w, h, angle, covers,
                   flat(roof, lambda u, v: np.where(v > 0, 0.82, 1.0)), shadow=3 * k):
                break
    for _ in range(count("tanks")):
        d = rng.uniform(14, 30) * k
        for _try in range(10):
            if add("storage-tank", *rng.random(2) * (cv.w, cv.h), d, d, 0.0, covers,
                   flat(np.array((215, 215, 210), np.float32),
                        lambda u, v, r=d / 2: np.where(u * u + v * v > (0.8 * r) ** 2, 0.75, 1.0)),
                   shadow=3 * k, label="storage-tank"):
                break
    for label, n, size in (("small-vehicle", count("small"), ((9, 14), (4.5, 6.5))),
                           ("large-vehicle", count("large"), ((18, 32), (7, 10)))):
        for _ in range(n):
            w, h = rng.uniform(*size[0]) * k, rng.uniform(*size[1]) * k
            paint = vehicle_paint(label, w)
            for _try in range(10):
                if roads and rng.random() < 0.85:
                    cx, cy, angle, allowed = _on_road(rng, roads, h)
                else:
                    cx, cy = rng.random(2) * (cv.w, cv.h)
                    angle, allowed = rng.uniform(-math.pi, math.pi), (BACKGROUND, BARREN)
                if add("vehicle", cx, cy, w, h, angle, allowed, paint, shadow=1.5 * k, label=label):
                    break
    water = np.argwhere(cv.mask == WATER)
    for _ in range(count("ships") if len(water) else 0):
        w, h = rng.uniform(25, 70) * k, rng.uniform(7, 15) * k
        hull = SHIP_COLOURS[rng.integers(len(SHIP_COLOURS))]
        paint = flat(hull, lambda u, v, w=w, h=h: np.where((np.abs(u) < w / 5) & (np.abs(v) < h / 4), 0.7, 1.0))
        for _try in range(15):
            cy, cx = water[rng.integers(len(water))] + 0.5
            if add("ship", cx, cy, w, h, rng.uniform(-math.pi, math.pi), (WATER,), paint, shadow=2 * k, label="ship"):
                break
    return boxes


def _road_angle(rng, roads) -> float:
    if not roads or rng.random() < 0.3:
        return rng.uniform(-math.pi / 2, math.pi / 2)
    pts, _ = roads[rng.integers(len(roads))]
    i = rng.integers(len(pts) - 1)
    return math.atan2(*(pts[i + 1] - pts[i])[::-1])


def _on_road(rng, roads, car_h):
    """A point in a lane of a random road, heading along it."""
    pts, width = roads[rng.integers(len(roads))]
    i = rng.integers(len(pts) - 1)
    d = pts[i + 1] - pts[i]
    angle = math.atan2(d[1], d[0])
    normal = np.array((-math.sin(angle), math.cos(angle)))
    lane = rng.uniform(-1, 1) * max(0.0, width / 2 - car_h / 2 - 1)
    cx, cy = pts[i] + rng.random() * d + lane * normal
    return cx, cy, angle + (math.pi if rng.random() < 0.5 else 0.0), (ROAD,)


def scene(rng: np.random.Generator, size, theme: str | None = None, return_instances: bool = False, rich: bool = False,
          vocab: bool = False):
    """One aerial scene: (rgb uint8 HxWx3, LoveDA mask uint8 HxW, boxes) [, instance ids HxW].
    rich: regular structure (crop rows, orchards, greenhouses, rows of houses along roads) in
    place of some random placement; vocab: also roofs with designs of a fixed vocabulary (see
    SCENE_SETS).

    size is an int (square) or (height, width). boxes are (cx, cy, w, h, angle, class, difficult)
    in the convention of the module docstring; instance ids are k for boxes[k - 1], 0 elsewhere.
    """
    h, w = (size, size) if np.isscalar(size) else size
    if min(h, w) < 32:
        raise ValueError(f"scene size must be at least 32 px, got {h}x{w}")
    theme = theme or str(rng.choice(list(THEMES)))
    if theme not in THEMES:
        raise ValueError(f"unknown theme {theme!r}; choose from {sorted(THEMES)}")
    spec, k = THEMES[theme], min(h, w) / 256
    cv = Canvas(h, w)
    _land_cover(rng, cv, spec, k, rich)
    _water(rng, cv, str(rng.choice(spec["water"])), k)
    roads = _roads(rng, cv, int(rng.integers(spec["roads"][0], spec["roads"][1] + 1)), k)
    boxes = _objects(rng, cv, spec, roads, k, rich)
    if vocab:
        _roofs(rng, cv, k)
    rgb = cv.rgb * rng.uniform(0.9, 1.1, 3) + rng.normal(0, 3, cv.rgb.shape)  # per-scene tint + sensor noise
    rgb = np.asarray(Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5)))
    return (rgb, cv.mask, boxes, cv.inst) if return_instances else (rgb, cv.mask, boxes)


# ----------------------------------------------------------------------------- writers


# Near-infrared brightness relative to visible, per LoveDA class: vegetation reflects NIR strongly,
# water absorbs it (the contrast NDVI and water indices rely on).
NIR_GAIN = np.array([0, 1.3, 0.9, 0.8, 0.15, 1.0, 2.2, 1.8], np.float32)


def nir_band(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A plausible NIR band (uint8 HxW) for a scene: visible brightness times a per-class gain."""
    return (rgb.astype(np.float32).mean(-1) * NIR_GAIN[mask]).clip(0, 255).astype(np.uint8)


def no_data_corner(rng, rgb: np.ndarray, mask: np.ndarray, p: float = 0.15):
    """With probability p, blank a triangle at one corner (black pixels, mask 0), like the
    no-data edges of LoveDA tiles, so that readers and metrics meet the ignored class."""
    if rng.random() >= p:
        return rgb, mask
    h, w = mask.shape
    a, b = rng.uniform(0.1, 0.35, 2) * (w, h)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    if rng.random() < 0.5:
        xx = w - xx
    if rng.random() < 0.5:
        yy = h - yy
    blank = xx / a + yy / b <= 1
    rgb, mask = rgb.copy(), mask.copy()
    rgb[blank], mask[blank] = 0, 0
    return rgb, mask
