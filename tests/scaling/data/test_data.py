"""The bundled dataset on disk: native formats, reruns that keep or replace it, the `rsscale data` command."""

import os

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from rsscale.scaling.data import data, scenes
from rsscale.scaling.data.data import ensure_dataset
from rsscale.scaling.data.scenes import THEMES, scene

SCENE_KW = [{}, {"rich": True}, {"rich": True, "vocab": True}]


def _scenes(kw):
    for i, theme in enumerate(THEMES):
        yield theme, scene(np.random.default_rng(100 + i), 160, theme, return_instances=True, **kw)


def test_generate_writes_native_formats_and_skips_existing(tmp_path):
    paths = data.generate(tmp_path, num_pretrain=6, num_seg=5, num_det=5, size=64, seed=1)
    jpgs = sorted(p for p in (tmp_path / "pretrain").rglob("*.jpg"))
    assert len(jpgs) == 6 and {p.parent.name for p in jpgs} <= set(THEMES)
    assert len({Image.open(p).size for p in jpgs}) > 1  # MillionAID-like: varied sizes
    # LoveDA: <split>/<Urban|Rural>/images_png + masks_png with the same ids
    imgs = sorted((tmp_path / "seg").rglob("images_png/*.png"))
    assert len(imgs) == 5 and {p.parts[-4] for p in imgs} == {"Train", "Val"}
    for p in imgs:
        mask = np.asarray(Image.open(p.parent.parent / "masks_png" / p.name))
        assert mask.shape == (64, 64) and mask.dtype == np.uint8 and mask.max() <= 7
        assert (np.asarray(Image.open(p))[mask == 0] == 0).all()  # no-data pixels are black
    # DOTA: header, then 8 coordinates, class, difficult; equal to the scene's own boxes
    labels = sorted((tmp_path / "det").rglob("labelTxt/*.txt"))
    assert len(labels) == 5 and (tmp_path / "det" / "val" / "images" / "P0000.png").exists()
    for p in labels:
        lines = p.read_text().splitlines()
        assert lines[0].startswith("imagesource:") and lines[1].startswith("gsd:")
        i = int(p.stem[1:])
        _, (_, _, boxes) = data._sample(1, "det", i, 64)
        assert len(lines) - 2 == len(boxes)
        for line, box in zip(lines[2:], boxes):
            parts = line.split()
            assert len(parts) == 10 and parts[8] == box[5] and int(parts[9]) == box[6]
            corners = np.array(parts[:8], float).reshape(4, 2)
            assert np.allclose(corners, scenes.box_corners(*box[:5]), atol=0.0051)
        rgb = np.asarray(Image.open(p.parent.parent / "images" / f"{p.stem}.png"))
        assert np.array_equal(rgb, data._sample(1, "det", i, 64)[1][0])
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    assert data.ensure_dataset(tmp_path, num_pretrain=6, num_seg=5, num_det=5, size=64, seed=1) == paths
    data.generate(tmp_path, num_pretrain=6, num_seg=5, num_det=5, size=64, seed=1)
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}  # nothing rewritten


def test_worker_processes_write_identical_bytes(tmp_path):
    kw = dict(num_pretrain=8, num_seg=3, num_det=3, size=48, seed=4)
    data.generate(tmp_path / "one", workers=1, **kw)
    data.generate(tmp_path / "two", workers=2, **kw)
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert one == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert all((tmp_path / "one" / p).read_bytes() == (tmp_path / "two" / p).read_bytes() for p in one)


def test_four_band_pretraining_tiffs_feed_the_loader(tmp_path):
    from rsscale.scaling.data.loader import build_pretrain_loader

    data.generate(tmp_path, num_pretrain=3, num_seg=0, num_det=0, size=48, bands=4, workers=1)
    tifs = sorted((tmp_path / "pretrain").rglob("*.tif"))
    assert len(tifs) == 3 and not list((tmp_path / "pretrain").rglob("*.jpg"))
    arr = tifffile.imread(tifs[0])
    assert arr.dtype == np.uint16 and arr.ndim == 3 and arr.shape[2] == 4
    rgb, mask, _ = data._sample(0, "pretrain", 0, arr.shape[:2])[1]
    assert np.array_equal(arr[..., :3], rgb.astype(np.uint16) * 257)
    batch = next(build_pretrain_loader(tmp_path / "pretrain", 16, 2, in_chans=4, backend="torch", num_workers=0))
    assert batch.shape == (2, 4, 16, 16) and torch.isfinite(batch).all()


def test_other_parameters_replace_the_old_dataset(tmp_path, capsys):
    data.generate(tmp_path, num_pretrain=4, num_seg=3, num_det=3, size=48, workers=1)
    data.ensure_dataset(tmp_path, num_pretrain=4, num_seg=3, num_det=3, size=48)
    assert capsys.readouterr().out.count("writing") == 1  # the second call found it finished
    data.ensure_dataset(tmp_path, num_pretrain=2, num_seg=2, num_det=2, size=40, workers=1)
    assert "replacing it" in capsys.readouterr().out
    assert len(list(tmp_path.rglob("*.jpg"))) == 2 and len(list(tmp_path.rglob("labelTxt/*.txt"))) == 2
    assert {Image.open(p).size for p in tmp_path.rglob("*.png")} == {(40, 40)}


def test_cli_data_command(tmp_path, capsys):
    from rsscale.scaling.runtime.cli import main

    out = tmp_path / "d"
    assert main(["data", "--out", str(out), "--num-pretrain", "2", "--num-seg", "1", "--num-det", "1",
                 "--size", "48"]) == 0
    assert str(out) in capsys.readouterr().out
    assert os.path.exists(out / "manifest.json") and len(list(out.rglob("*.jpg"))) == 2


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="theme"):
        scene(np.random.default_rng(0), 64, "moon")
    with pytest.raises(ValueError, match="32"):
        scene(np.random.default_rng(0), 8)


def test_finetune_readers_accept_the_output(tmp_path):
    """The LoveDA and DOTA readers of the fine-tuning part read what we write."""
    datasets = pytest.importorskip("rsscale.finetune.data.datasets")
    paths = data.generate(tmp_path, num_pretrain=0, num_seg=4, num_det=3, size=64, seed=2)
    for folder in paths["seg_train_dirs"] + paths["seg_val_dirs"]:
        for image, target in datasets.LoveDADataset(folder):
            assert image.shape == (3, 64, 64) and target["mask"].shape == (64, 64)
    det = datasets.DotaDataset(os.path.join(paths["det_train"], "images"), os.path.join(paths["det_train"], "labelTxt"))
    assert len(det) == 2
    for image, target in det:
        i = int(target["image_id"][1:])
        assert len(target["labels"]) == len(data._sample(2, "det", i, 64)[1][2])


def test_rich_scenes_are_their_own_dataset(tmp_path):
    """scenes="rich" changes the pixels (not the labels' format), is named in the manifest, and a
    base dataset in the same folder is replaced rather than mixed in."""
    kw = dict(num_pretrain=3, num_seg=2, num_det=2, size=64, workers=1)
    base = data.generate(tmp_path / "base", **kw)
    rich = data.generate(tmp_path / "rich", scenes="rich", **kw)
    assert "scenes" not in open(base["manifest"]).read() and '"scenes": "rich"' in open(rich["manifest"]).read()
    names = sorted(os.path.relpath(os.path.join(d, f), base["root"]) for d, _, fs in os.walk(base["root"]) for f in fs)
    assert names == sorted(os.path.relpath(os.path.join(d, f), rich["root"]) for d, _, fs in os.walk(rich["root"]) for f in fs)
    differ = [n for n in names if n.endswith((".jpg", ".png")) and
              not np.array_equal(np.asarray(Image.open(os.path.join(base["root"], n))), np.asarray(Image.open(os.path.join(rich["root"], n))))]
    assert differ
    data.ensure_dataset(tmp_path / "base", scenes="rich", **kw)
    assert '"scenes": "rich"' in open(base["manifest"]).read()
    with pytest.raises(ValueError, match="scenes must be one of base, rich, vocab"):
        data.generate(tmp_path / "x", scenes="fancy", **kw)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    ensure_dataset(root, num_pretrain=3, num_seg=2, num_det=2, size=64, workers=1)
    return root


def test_dataset_for_uses_a_finished_dataset_as_it_is(small_dataset, tmp_path):
    from rsscale.scaling.data.data import dataset_for

    before = (small_dataset / "manifest.json").read_text()
    assert dataset_for(small_dataset, "seg", num_seg=9, num_det=9)["root"] == str(small_dataset)  # other counts: not rewritten
    assert (small_dataset / "manifest.json").read_text() == before
    seg_only = tmp_path / "seg-only"  # missing: the bundled set is written there
    dataset_for(seg_only, "seg", num_pretrain=0, num_seg=2, num_det=0, size=64, workers=1)
    with pytest.raises(FileNotFoundError, match="has no detection tiles"):
        dataset_for(seg_only, "det")


@pytest.mark.parametrize("argv, message", [
    (["--num-seg", "-1"], "--num-seg (config key 'num_seg') must be >= 0, got -1"),
    (["--size", "16"], "--size (config key 'size') must be >= 32, got 16"),
    (["--val-fraction", "1"], "--val-fraction (config key 'val_fraction') must be >= 0 and < 1, got 1.0"),
    (["--workers", "0"], "--workers (config key 'workers') must be >= 1, got 0"),
])
def test_cli_data_bad_value_is_one_line_naming_the_flag(tmp_path, capsys, argv, message):
    from rsscale.scaling.runtime.cli import main

    assert main(["data", "--out", str(tmp_path / "d"), *argv]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error:" in line] == [f"rsscale data: error: {message}"] and "Traceback" not in err
    assert not (tmp_path / "d").exists()  # refused before writing anything


def test_cli_data_printed_config_reads_back_to_itself(tmp_path):
    from rsscale.scaling.runtime.cli import main

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert main(["data", "--out", str(tmp_path / "d"), "--num-seg", "3", "--bands", "4", "--workers", "2", "--scenes", "rich",
                 "--print-config", str(first)]) == 0
    tree = yaml.safe_load(first.read_text())
    assert tree["num_seg"] == 3 and tree["bands"] == 4 and tree["workers"] == 2 and tree["scenes"] == "rich" and tree["size"] == 256
    assert main(["data", "--config", str(first), "--print-config", str(second)]) == 0
    assert yaml.safe_load(second.read_text()) == tree
    assert not (tmp_path / "d").exists()
