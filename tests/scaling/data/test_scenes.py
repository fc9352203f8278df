"""Procedural aerial scenes: determinism, valid masks, boxes that are exactly the rendered objects."""

import math

import numpy as np
import pytest
from shapely.geometry import MultiPoint, Polygon

from rsscale.scaling.data import data, scenes
from rsscale.scaling.data.scenes import BUILDING, DET_CLASSES, ROAD, THEMES, WATER, scene

SCENE_KW = [{}, {"rich": True}, {"rich": True, "vocab": True}]


def _scenes(kw):
    for i, theme in enumerate(THEMES):
        yield theme, scene(np.random.default_rng(100 + i), 160, theme, return_instances=True, **kw)


def test_scene_is_deterministic_and_seed_dependent():
    a = scene(np.random.default_rng(3), (96, 128))
    b = scene(np.random.default_rng(3), (96, 128))
    c = scene(np.random.default_rng(4), (96, 128))
    assert a[0].shape == (96, 128, 3) and a[0].dtype == np.uint8 and a[1].shape == (96, 128)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("kw", SCENE_KW)
def test_masks_and_boxes_are_valid(kw):
    counts = dict.fromkeys(DET_CLASSES, 0)
    for theme, (rgb, mask, boxes, inst) in _scenes(kw):
        assert mask.min() >= 1 and mask.max() <= 7, theme
        assert inst.max() == len(boxes)
        for cx, cy, w, h, angle, name, difficult in boxes:
            assert name in DET_CLASSES and difficult in (0, 1)
            assert 0 <= cx < 160 and 0 <= cy < 160 and w > 0 and h > 0 and -math.pi / 2 <= angle < math.pi / 2
            counts[name] += 1
    assert all(counts.values()), counts  # every class appears across the themes


@pytest.mark.parametrize("kw", SCENE_KW)
def test_boxes_are_exactly_the_rendered_objects(kw):
    """Checked with shapely (independent geometry): every pixel centre of an object lies in its
    DOTA polygon, the object reaches every side of it (within a pixel), and its mask class fits."""
    checked = 0
    for theme, (rgb, mask, boxes, inst) in _scenes(kw):
        lines = data.dota_lines(boxes, 0.5)[2:]
        for k, (box, line) in enumerate(zip(boxes, lines), start=1):
            cx, cy, w, h, angle, name, difficult = box
            poly = Polygon(np.array(line.split()[:8], float).reshape(4, 2))
            assert poly.area == pytest.approx(w * h, abs=0.02 * (w + h))
            ys, xs = np.nonzero(inst == k)
            centres = np.stack([xs + 0.5, ys + 0.5], 1)
            assert poly.buffer(0.1).contains(MultiPoint(centres)), (theme, name)
            labels = set(np.unique(mask[ys, xs]))
            expected = {"ship": {WATER}, "storage-tank": {BUILDING}}.get(name)
            assert labels <= (expected or {ROAD, 1, 5}), (theme, name, labels)
            image = Polygon([(0, 0), (160, 0), (160, 160), (0, 160)])
            if name.endswith("vehicle"):  # difficult = less than 60% inside or short side < 4 px
                seen = poly.intersection(image).area / poly.area
                if seen < 0.5 or min(w, h) < 4:
                    assert difficult == 1, (theme, name, seen)
                elif seen > 0.7:
                    assert difficult == 0, (theme, name, seen)
            if not poly.within(image):
                continue  # truncated by the border: tightness only holds inside the image
            c, s = math.cos(angle), math.sin(angle)
            u = (centres[:, 0] - cx) * c + (centres[:, 1] - cy) * s
            v = -(centres[:, 0] - cx) * s + (centres[:, 1] - cy) * c
            for extent, half in ((u.max(), w / 2), (-u.min(), w / 2), (v.max(), h / 2), (-v.min(), h / 2)):
                assert half - 1.1 <= extent <= half + 1e-6, (theme, name, extent, half)
            checked += 1
    assert checked > 30


def test_nir_is_bright_on_vegetation_and_dark_on_water():
    rgb, mask, _ = scene(np.random.default_rng(1), 96, "river")
    nir = scenes.nir_band(rgb, mask).astype(float)
    assert nir[mask == scenes.FOREST].mean() > 2 * nir[mask == WATER].mean()
    assert nir[mask == scenes.AGRICULTURE].mean() > 2 * nir[mask == WATER].mean()


def test_no_data_corner():
    rgb, mask, _ = scene(np.random.default_rng(0), 64)
    same = scenes.no_data_corner(np.random.default_rng(0), rgb, mask, p=0.0)
    assert same[0] is rgb and same[1] is mask
    out_rgb, out_mask = scenes.no_data_corner(np.random.default_rng(0), rgb, mask, p=1.0)
    blank = out_mask == 0
    assert 0.005 < blank.mean() < 0.07  # a triangle with legs 10-35% of the sides
    assert (out_rgb[blank] == 0).all() and np.array_equal(out_rgb[~blank], rgb[~blank])
    corners = [blank[0, 0], blank[0, -1], blank[-1, 0], blank[-1, -1]]
    assert sum(corners) == 1 and mask.min() >= 1  # one corner, input untouched


def test_vocab_roofs_are_unboxed_buildings_drawn_from_a_fixed_zipf_vocabulary():
    designs, p = scenes._vocabulary()
    again, _ = scenes._vocabulary.__wrapped__()
    assert designs.shape == (scenes.VOCAB_SIZE, 4, 4) and np.array_equal(designs, again)
    assert p.sum() == pytest.approx(1.0) and p[0] / p[9] == pytest.approx(10 ** scenes.VOCAB_ZIPF)
    assert len({d.tobytes() for d in designs}) == scenes.VOCAB_SIZE  # no two designs alike
    added = 0
    for i, theme in enumerate(THEMES):
        rich = scene(np.random.default_rng(100 + i), 160, theme, return_instances=True, rich=True)
        vocab = scene(np.random.default_rng(100 + i), 160, theme, return_instances=True, rich=True, vocab=True)
        assert vocab[2] == rich[2] and np.array_equal(vocab[3], rich[3])  # roofs come after the boxed objects
        new = (vocab[1] != rich[1])
        assert (vocab[1][new] == BUILDING).all() and (vocab[3][new] == 0).all()
        added += new.sum()
    assert added > 0.1 * 160 * 160 * len(THEMES)
