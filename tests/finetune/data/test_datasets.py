"""Benchmark readers on the shared real samples and on hand-made tiles; DOTA patch split/merge on
hand-computed cases."""

from pathlib import Path

import numpy as np
import pytest
import torch

from rsscale.finetune.data import datasets as D
from rsscale.finetune.data import dota_io
from rsscale.finetune.rotated import rotated_iou

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"


def _needs(sub):
    return pytest.mark.skipif(not (DATA / sub).is_dir(), reason=f"shared sample {sub} not found under {DATA}")


@_needs("dota-example")
def test_dota_labels_match_the_files():
    folder = DATA / "dota-example" / "labelTxt"
    labels = D.read_dota_labels(folder)
    assert sorted(labels) == (DATA / "dota-example" / "images.txt").read_text().split()
    for image_id, objects in labels.items():
        lines = [ln for ln in (folder / f"{image_id}.txt").read_text().splitlines()
                 if ln.strip() and not ln.startswith(("imagesource", "gsd"))]
        assert len(objects) == len(lines), image_id
        assert [o.poly[0] for o in objects] == [float(ln.split()[0]) for ln in lines]
        assert {o.cls for o in objects} <= set(D.DOTA_V1_CLASSES)
    first = labels["P0075"][0]
    assert first == D.DotaObject((218.0, 108.0, 249.0, 101.0, 260.0, 146.0, 224.0, 150.0), "swimming-pool", False)
    assert sum(o.difficult for objs in labels.values() for o in objs) > 0


def test_dota_label_without_header_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("0 0 4 0 4 2 0 2 plane\n1 1 5 1 5 3 1 3 ship 1\n")
    objs = dota_io.read_dota_label_file(tmp_path / "a.txt")
    assert [(o.cls, o.difficult) for o in objs] == [("plane", False), ("ship", True)]
    (tmp_path / "b.txt").write_text("0 0 4 0 plane 0\n")
    with pytest.raises(ValueError, match="b.txt:1"):
        dota_io.read_dota_label_file(tmp_path / "b.txt")
    with pytest.raises(ValueError, match="not in the dataset's class list"):
        D.objects_to_target([D.DotaObject((0,) * 8, "ufo")], D.DOTA_V1_CLASSES, "x")


@_needs("dota-example")
def test_dota_dataset_item():
    root = DATA / "dota-example"
    ds = D.DotaDataset(root / "images", root / "labelTxt", image_ids=["P0075"])
    image, t = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 839, 451)
    assert t["polys"].shape == (2, 8) and t["boxes"].shape == (2, 5)
    assert t["labels"].tolist() == [D.DOTA_V1_CLASSES.index("swimming-pool"), D.DOTA_V1_CLASSES.index("roundabout")]
    # The roundabout is an axis-aligned 221 x 256 rectangle: le90 puts the long side first.
    torch.testing.assert_close(t["boxes"][1], torch.tensor([229.5, 398.0, 256.0, 221.0, -np.pi / 2]))


@_needs("dior-r-example")
def test_dior_r_corner_points():
    folder = DATA / "dior-r-example"
    objs = D.read_dior_xml(folder / "00001.xml")
    assert objs == [D.DotaObject((133.0, 237.0, 684.0, 237.0, 684.0, 672.0, 133.0, 672.0), "golffield", False)]
    image, t = D.DiorRDataset(folder, folder)[0]
    assert image.shape == (3, 800, 800)
    assert t["labels"].tolist() == [D.DIOR_CLASSES.index("golffield")]
    torch.testing.assert_close(t["boxes"], torch.tensor([[408.5, 454.5, 551.0, 435.0, 0.0]]))


@_needs("loveda-example")
def test_loveda_masks():
    ds = D.LoveDADataset(DATA / "loveda-example")
    assert len(ds) == 3
    image, t = ds[1]
    assert image.shape == (3, 1024, 1024) and t["mask"].shape == (1024, 1024)
    raw = np.asarray(__import__("PIL.Image").Image.open(DATA / "loveda-example" / "mask" / "1.png"))
    assert torch.equal(t["mask"], torch.from_numpy(raw.astype(np.int64) - 1))  # no 0 (no-data) pixels here
    values = set(t["mask"].unique().tolist())
    assert values <= set(range(7)) and len(values) > 1
    torch.testing.assert_close(torch.from_numpy(D.loveda_mask(np.array([[0, 1, 7]], np.uint8))),
                               torch.tensor([[255, 0, 6]]))
    with pytest.raises(ValueError, match="0..7"):
        D.loveda_mask(np.array([[8]], np.uint8))


def _colour_tile():
    colours = list(D.POTSDAM_COLOURS) + [D.POTSDAM_BOUNDARY]  # indices 0..5, then ignore
    label = np.zeros((2, 7, 3), np.uint8)
    for x, c in enumerate(colours):
        label[:, x] = c
    return label, np.array([list(range(6)) + [255]] * 2)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_potsdam_colour_conversion(tmp_path, suffix):
    import tifffile
    from PIL import Image

    label, expected = _colour_tile()
    image = np.random.default_rng(0).integers(0, 255, (2, 7, 3), dtype=np.uint8)
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    if suffix == ".tif":
        tifffile.imwrite(tmp_path / "img" / f"top_2_10_RGB{suffix}", image)
        tifffile.imwrite(tmp_path / "lab" / f"top_2_10_label{suffix}", label)
    else:
        Image.fromarray(image).save(tmp_path / "img" / f"top_2_10_RGB{suffix}")
        Image.fromarray(label).save(tmp_path / "lab" / f"top_2_10_label{suffix}")
    img, t = D.PotsdamDataset(tmp_path / "img", tmp_path / "lab")[0]
    assert torch.equal(img, torch.from_numpy(image).permute(2, 0, 1))
    assert torch.equal(t["mask"], torch.from_numpy(expected))
    _, t5 = D.PotsdamDataset(tmp_path / "img", tmp_path / "lab", clutter=False)[0]
    expected5 = expected.copy()
    expected5[expected == 5] = 255
    assert torch.equal(t5["mask"], torch.from_numpy(expected5))


def test_potsdam_unknown_colour():
    label, _ = _colour_tile()
    label[0, 0] = (10, 20, 30)
    with pytest.raises(ValueError, match=r"1 label pixels.*\(10, 20, 30\) at \(0, 0\)"):
        D.potsdam_mask(label)
    assert D.potsdam_mask(label, strict=False)[0, 0] == 255


@_needs("potsdam-example")
def test_potsdam_index_sample():
    folder = DATA / "potsdam-example"
    image, t = D.PotsdamDataset(folder, folder, image_tag="_img", label_tag="_label")[0]
    assert image.shape == (3, 512, 512)
    raw = np.asarray(__import__("PIL.Image").Image.open(folder / "2_10_0_0_512_512_label.png")).astype(np.int64)
    mask = t["mask"].numpy()
    # mmseg's converted labels: 0 is boundary (ignored), 1..6 are the classes.
    assert (mask[raw == 0] == 255).all() and (mask[raw > 0] == raw[raw > 0] - 1).all()


def test_patch_starts():
    assert D.patch_starts(300, 200, 50) == [0, 100]
    assert D.patch_starts(100, 200, 50) == [0]
    assert D.patch_starts(2000, 1024, 200) == [0, 824, 976]
    assert D.patch_starts(1024, 1024, 200) == [0]
    with pytest.raises(ValueError, match="overlap"):
        D.patch_starts(100, 64, 64)


def _rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def test_split_image_keeps_objects_by_area_ratio():
    image = torch.arange(300 * 300).remainder(251).to(torch.uint8).view(1, 300, 300).expand(3, 300, 300)
    polys = torch.tensor([_rect(10, 10, 50, 50),        # inside patch (0, 0) only
                          _rect(150, 10, 220, 50),      # 50/70 of it in patch x0=0: kept, difficult
                          _rect(180, 100, 280, 140)])   # 20/100 in patch x0=0: dropped there
    target = {"polys": polys, "labels": torch.tensor([0, 1, 2]), "difficult": torch.tensor([False, False, True]),
              "image_id": "img"}
    patches = D.split_image(image, target, patch=200, overlap=50)
    assert [p.offset for p in patches] == [(0, 0), (100, 0), (0, 100), (100, 100)]
    assert torch.equal(patches[1].image, image[:, 0:200, 100:300])
    first = patches[0].target
    assert first["labels"].tolist() == [0, 1]
    assert first["difficult"].tolist() == [False, True]
    torch.testing.assert_close(first["polys"][0], torch.tensor(_rect(10.0, 10.0, 50.0, 50.0)))
    clipped = first["polys"][1].view(4, 2)
    assert clipped[:, 0].min() == pytest.approx(150, abs=1e-4) and clipped[:, 0].max() == pytest.approx(200, abs=1e-4)
    second = patches[1].target
    assert second["labels"].tolist() == [1, 2] and second["difficult"].tolist() == [False, True]
    torch.testing.assert_close(second["polys"][0], torch.tensor(_rect(50.0, 10.0, 120.0, 50.0)))
    assert second["image_id"] == "img__1__100___0" and D.parse_patch_id(second["image_id"]) == ("img", 100, 0)
    # Small images are padded to a full patch.
    small = D.split_image(image[:, :50, :60], {"polys": torch.zeros(0, 8), "labels": torch.zeros(0, dtype=torch.int64),
                                               "difficult": torch.zeros(0, dtype=torch.bool)}, patch=64, overlap=8)
    assert len(small) == 1 and small[0].image.shape == (3, 64, 64) and small[0].image[:, 50:].sum() == 0


def test_merge_detections_maps_back_and_suppresses_duplicates():
    box = torch.tensor([[60.0, 30.0, 40.0, 20.0, 0.2]])  # one object, seen from two patches
    patch_dets = [
        {"boxes": box.clone(), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])},
        {"boxes": box - torch.tensor([[50.0, 0, 0, 0, 0]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([0])},
        {"boxes": box - torch.tensor([[50.0, 0, 0, 0, 0]]), "scores": torch.tensor([0.7]), "labels": torch.tensor([3])},
    ]
    merged = D.merge_detections(patch_dets, [(100, 0), (150, 0), (150, 0)], nms_iou=0.1)
    assert merged["labels"].tolist() == [0, 3] and merged["scores"].tolist() == pytest.approx([0.9, 0.7])
    expected = box + torch.tensor([[100.0, 0, 0, 0, 0]])
    assert rotated_iou(merged["boxes"][:1], expected).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="offsets"):
        D.merge_detections(patch_dets, [(0, 0)])


@_needs("dota-example")
def test_split_and_merge_folders_round_trip(tmp_path):
    """Patch ground truth submitted as patch-level detections and merged back recovers every
    object small enough to lie wholly inside some patch (smaller than the overlap)."""
    from rsscale.finetune.data.dota_io import read_dota_submission, write_dota_submission
    from rsscale.finetune.rotated import poly_area, poly_iou

    src = tmp_path / "src"
    for sub in ("images", "labelTxt"):
        (src / sub).mkdir(parents=True)
    for image_id in ("P0075", "P1888"):
        (src / "images" / f"{image_id}.png").symlink_to(DATA / "dota-example" / "images" / f"{image_id}.png")
        (src / "labelTxt" / f"{image_id}.txt").symlink_to(DATA / "dota-example" / "labelTxt" / f"{image_id}.txt")
    assert D.main(["split", str(src), str(tmp_path / "split"), "--patch", "512", "--overlap", "128"]) == 0
    patches = D.read_dota_labels(tmp_path / "split" / "labelTxt")
    assert len(list((tmp_path / "split" / "images").glob("*.png"))) == len(patches) > 2
    dets = {}
    for name, objs in patches.items():
        for o in objs:
            # Score by area, so a whole copy outranks the clipped copies from neighbouring patches.
            dets.setdefault(o.cls, []).append((name, float(poly_area(torch.tensor(o.poly))), list(o.poly)))
    write_dota_submission(dets, tmp_path / "patch_dets")
    assert D.main(["merge", str(tmp_path / "patch_dets"), str(tmp_path / "merged")]) == 0
    merged = read_dota_submission(tmp_path / "merged")
    gt = D.read_dota_labels(src / "labelTxt")
    small = 0
    for image_id, objs in gt.items():
        for o in objs:
            xs, ys = o.poly[0::2], o.poly[1::2]
            if max(xs) - min(xs) < 128 and max(ys) - min(ys) < 128:
                small += 1
                found = torch.tensor([p for img, _, p in merged.get(o.cls, []) if img == image_id]).reshape(-1, 8)
                assert poly_iou(torch.tensor([o.poly]), found).max() > 0.99, (image_id, o)
    assert small > 20


def test_palette_masks_keep_indices_and_id_lists(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    Image.fromarray(np.full((4, 5, 3), 7, np.uint8)).save(tmp_path / "img" / "0.png")
    mask = Image.fromarray(np.array([[0, 1, 2, 3, 7]] * 4, np.uint8), mode="L").convert("P")
    mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [9] * 756)
    mask.save(tmp_path / "mask" / "0.png")
    _, t = D.LoveDADataset(tmp_path)[0]
    assert t["mask"][0].tolist() == [255, 0, 1, 2, 6]
    (tmp_path / "ids.txt").write_text("a\nb\n")
    assert D.read_image_ids(tmp_path / "ids.txt") == ["a", "b"] and D.read_image_ids(None) is None


def test_dior_xml_names_and_errors(tmp_path):
    corners = "".join(f"<{ax}_{c}>{v}</{ax}_{c}>" for (ax, c), v in zip(
        [(a, c) for c in ("left_top", "right_top", "right_bottom", "left_bottom") for a in "xy"],
        [1, 2, 5, 2, 5, 4, 1, 4]))
    (tmp_path / "a.xml").write_text(
        f"<annotation><object><name>Expressway-Service-area</name><difficult>1</difficult>"
        f"<robndbox>{corners}</robndbox><angle>0</angle></object></annotation>")
    assert D.read_dior_xml(tmp_path / "a.xml") == [
        D.DotaObject((1.0, 2.0, 5.0, 2.0, 5.0, 4.0, 1.0, 4.0), "expressway-service-area", True)]
    (tmp_path / "b.xml").write_text("<annotation><object><name>ship</name><bndbox/></object></annotation>")
    with pytest.raises(ValueError, match="robndbox"):
        D.read_dior_xml(tmp_path / "b.xml")
