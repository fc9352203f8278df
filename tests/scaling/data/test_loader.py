"""Pretraining loader: normalization, DP sharding, corrupt files, multi-band TIFF, DALI, resume.

Every image is one flat colour that encodes its index, so a sample's source file can be read back
from any crop/flip of it and the normalized value is known by hand."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from rsscale.scaling.data import loader as data
from rsscale.scaling.data.loader import IMAGENET_MEAN, IMAGENET_STD, build_pretrain_loader
from rsscale.scaling.data.data import ensure_dataset

HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None


def _colour(i):
    return (10 * i + 5, 250 - 10 * i, 128)


def _write_flat(folder, n, ext="png", size=(20, 28)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full(size + (3,), _colour(i), np.uint8)).save(folder / f"{i:03d}.{ext}")
    return folder


def _ids(batch):
    """Image index of each sample, from its (un-normalized) red channel."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    red = batch[:, 0].mean((1, 2)) * std[0] + mean[0]
    return [round((float(r) * 255 - 5) / 10) for r in red]


def _take(loader, steps):
    return [next(loader) for _ in range(steps)]


def test_batches_are_normalized_crops(tmp_path):
    root = _write_flat(tmp_path / "a" / "b", 3)
    loader = build_pretrain_loader(tmp_path, img_size=16, batch_size=4, seed=0, backend="torch", num_workers=0)
    batch = next(loader)
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
    for img, i in zip(batch, _ids(batch)):
        expected = (torch.tensor(_colour(i)) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        assert torch.allclose(img, expected[:, None, None].expand_as(img), atol=1e-5)
    assert loader.step == 1 and loader.samples == 4 and loader.epoch == pytest.approx(4 / 3)
    assert loader.skipped == 0 and loader.backend == "torch" and root.exists()


def test_augmentation_crops_and_flips():
    """Crops stay inside the image with MAE's area/aspect ranges; flips happen about half the time."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = data.crop_params(rng, 40, 90)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 90
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, :4] = 255  # left half white: a flip moves it right
    mean, std = torch.zeros(3), torch.ones(3)
    flips = [float(data.augment(arr, 8, np.random.default_rng(s), 8, mean, std)[0, :, 0].mean()) < 0.5
             for s in range(40)]
    assert 5 < sum(flips) < 35


@pytest.mark.parametrize("n", [8, 9])
def test_dp_shards_are_disjoint_and_cover_each_epoch(tmp_path, n):
    _write_flat(tmp_path, n)
    per_rank = n // 2
    seen = []
    for rank in range(2):
        loader = build_pretrain_loader(tmp_path, 16, batch_size=per_rank, dp_rank=rank, dp_size=2, seed=3,
                                       backend="torch", num_workers=0)
        epoch0, epoch1 = _ids(next(loader)), _ids(next(loader))
        assert len(set(epoch0)) == per_rank and epoch0 != epoch1  # re-shuffled each epoch
        seen.append(set(epoch0))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 2 * per_rank  # n=8: all files; n=9: one left out this epoch


def test_resume_gives_identical_batches(tmp_path):
    _write_flat(tmp_path, 5, size=(30, 22))
    kw = dict(img_size=12, batch_size=3, dp_rank=1, dp_size=2, seed=7, backend="torch")
    full = _take(build_pretrain_loader(tmp_path, num_workers=0, **kw), 5)
    loader = build_pretrain_loader(tmp_path, num_workers=0, **kw)
    _take(loader, 2)
    state = loader.state_dict()
    resumed = build_pretrain_loader(tmp_path, num_workers=1, **kw)  # worker processes: same stream
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(full[2:], _take(resumed, 3)))
    started = build_pretrain_loader(tmp_path, num_workers=0, start_step=4, **kw)
    assert torch.equal(next(started), full[4])


def _write_corrupt(folder):
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(folder / "truncated.jpg")  # headers intact, scan data cut short
    raw = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(raw[: int(len(raw) * 0.8)])
    (folder / "text.jpg").write_text("not an image")
    png = (folder / "001.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[:-20])
    (folder / "png_named.jpg").write_bytes(png)  # misnamed but whole: readable, kept


def test_corrupt_files_are_skipped_and_counted(tmp_path, capsys):
    _write_flat(tmp_path, 2, "jpg")
    _write_flat(tmp_path, 2, "png")
    _write_corrupt(tmp_path)
    loader = build_pretrain_loader(tmp_path, 16, batch_size=5, backend="torch", num_workers=0)
    assert loader.skipped == 3 and len(loader.files) == 5
    assert "skipped 3 image(s)" in capsys.readouterr().out
    next(loader)
    # Without the up-front check, decode failures at run time are survived and counted too.
    loader = build_pretrain_loader(tmp_path, 16, batch_size=7, backend="torch", num_workers=0, validate=False)
    with pytest.warns(UserWarning, match="unreadable"):
        batch = next(loader)
    assert batch.shape == (7, 3, 16, 16) and loader.decode_failures >= 3 and torch.isfinite(batch).all()


def test_multiband_tiff(tmp_path):
    bands = np.array([1000, 20000, 40000, 60000], np.uint16)
    tifffile.imwrite(tmp_path / "hwc.tif", np.broadcast_to(bands, (18, 24, 4)).copy(), photometric="minisblack",
                     planarconfig="contig")
    tifffile.imwrite(tmp_path / "chw.tiff", np.broadcast_to(bands[:, None, None], (4, 18, 24)).copy(),
                     photometric="minisblack", planarconfig="separate")
    mean, std = data.default_stats(4)
    expected = (torch.tensor(bands / 65535.0, dtype=torch.float32) - torch.tensor(mean)) / torch.tensor(std)
    batch = next(build_pretrain_loader(tmp_path, 8, batch_size=2, in_chans=4, backend="torch", num_workers=0))
    assert batch.shape == (2, 4, 8, 8)
    assert torch.allclose(batch, expected[None, :, None, None].expand_as(batch), atol=1e-4)
    rgb = next(build_pretrain_loader(tmp_path, 8, batch_size=2, in_chans=3, backend="torch", num_workers=0))
    first3 = (torch.tensor(bands[:3] / 65535.0, dtype=torch.float32) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD)
    assert torch.allclose(rgb, first3[None, :, None, None].expand_as(rgb), atol=1e-4)


def test_measure_stats_by_hand(tmp_path):
    """Two flat images of equal size: per band, mean (a + b) / 2 and std |a - b| / 2."""
    for name, value in (("a.png", (0, 100, 255)), ("b.png", (50, 100, 155))):
        Image.fromarray(np.full((6, 9, 3), value, np.uint8)).save(tmp_path / name)
    mean, std = data.measure_stats(tmp_path)
    assert mean == pytest.approx((25 / 255, 100 / 255, 205 / 255)) and std == pytest.approx((25 / 255, 0, 50 / 255))


def test_auto_falls_back_to_torch_with_one_warning(tmp_path, capsys, monkeypatch):
    _write_flat(tmp_path, 2)

    def broken(*args, **kwargs):
        raise RuntimeError("no DALI here\nsecond line")

    monkeypatch.setattr(data, "DaliPretrainLoader", broken)
    loader = build_pretrain_loader(tmp_path, 8, batch_size=2, backend="auto", num_workers=0)
    assert loader.backend == "torch" and next(loader).shape == (2, 3, 8, 8)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "no DALI here" in warnings[0]
    with pytest.raises(RuntimeError):
        build_pretrain_loader(tmp_path, 8, batch_size=2, backend="dali")


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
def test_dali_backend_batches_and_shards(tmp_path):
    _write_flat(tmp_path / "jpg", 8, "png")
    seen = []
    for rank in range(2):
        loader = build_pretrain_loader(tmp_path / "jpg", 16, batch_size=4, dp_rank=rank, dp_size=2, seed=1,
                                       backend="dali", num_workers=1)
        assert loader.backend == "dali"
        batch = next(loader)
        assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
        ids = _ids(batch)
        for img, i in zip(batch, ids):
            expected = (torch.tensor(_colour(i)) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
            assert torch.allclose(img, expected[:, None, None].expand_as(img), atol=0.02)
        seen.append(set(ids))
    assert seen[0] | seen[1] == set(range(8)) and not seen[0] & seen[1]
    bands = np.array([1000, 20000, 40000, 60000], np.uint16)
    (tmp_path / "tif").mkdir()
    tifffile.imwrite(tmp_path / "tif" / "x.tif", np.broadcast_to(bands, (18, 24, 4)).copy(), photometric="minisblack")
    batch = next(build_pretrain_loader(tmp_path / "tif", 8, batch_size=2, in_chans=4, backend="dali", num_workers=1))
    assert batch.shape == (2, 4, 8, 8)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
def test_dali_reproducible_start_and_runtime_fallback(tmp_path, capsys):
    _write_flat(tmp_path, 6)
    a, b = (build_pretrain_loader(tmp_path, 8, 4, seed=2, backend="dali", start_step=3, num_workers=1)
            for _ in range(2))
    assert all(torch.equal(next(a), next(b)) for _ in range(2))  # same (seed, start_step): same stream
    (tmp_path / "x.jpg").write_text("not an image")  # unchecked: DALI fails on it at run time
    loader = build_pretrain_loader(tmp_path, 8, 4, backend="dali", validate=False, num_workers=1)
    batches = _take(loader, 4)  # the torch pipeline also meets the bad file, in a worker process
    assert loader.backend == "torch" and all(x.shape == (4, 3, 8, 8) for x in batches)
    assert loader.decode_failures >= 1
    assert "continuing with the torch DataLoader pipeline" in capsys.readouterr().out


_FALLBACK_TWICE = """
import pathlib, sys
sys.path.insert(0, sys.argv[1])
from test_loader import _take, _write_flat
from rsscale.scaling.data.loader import build_pretrain_loader
for k in range(2):
    folder = pathlib.Path(sys.argv[2]) / str(k)
    folder.mkdir()
    _write_flat(folder, 6)
    (folder / "x.jpg").write_text("not an image")
    loader = build_pretrain_loader(folder, 8, 4, backend="dali", validate=False, num_workers=1)
    assert all(x.shape == (4, 3, 8, 8) for x in _take(loader, 4)) and loader.backend == "torch"
    print("fell back", k, flush=True)
"""


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
def test_the_torch_fallback_after_dali_runs_again_in_the_same_process(tmp_path):
    """A worker forked from a process that ran DALI's threads could wait forever on a lock it
    inherited: the second fallback in one process hung. In a subprocess with a time limit, so a
    hang fails this test instead of the suite."""
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _FALLBACK_TWICE, str(Path(__file__).parent), str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the second fallback did not finish in 120 s: {(e.stdout or b'')[-300:]!r}")
    assert out.returncode == 0 and "fell back 1" in out.stdout, out.stdout[-500:] + out.stderr[-1500:]


def test_bad_arguments_are_rejected(tmp_path):
    _write_flat(tmp_path, 1)
    with pytest.raises(ValueError, match="backend"):
        build_pretrain_loader(tmp_path, 8, 2, backend="jax")
    with pytest.raises(ValueError, match="dp_rank"):
        build_pretrain_loader(tmp_path, 8, 2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="sharded"):
        build_pretrain_loader(tmp_path, 8, 2, dp_rank=1, dp_size=2, backend="torch")
    with pytest.raises(FileNotFoundError):
        build_pretrain_loader(tmp_path / "missing", 8, 2)




# ------------------------------------------------------------------- 16-bit and float imagery
def _loader(folder, **kw):
    from rsscale.scaling.data.loader import build_pretrain_loader

    return build_pretrain_loader(folder, 8, batch_size=2, backend="torch", num_workers=0, **kw)


def test_16bit_png_is_scaled_by_its_bit_depth_not_saturated(tmp_path):
    from rsscale.scaling.data.loader import IMAGENET_MEAN, IMAGENET_STD

    Image.fromarray(np.full((12, 16), 30000, np.uint16)).save(tmp_path / "grey16.png")  # mode I;16
    batch = next(_loader(tmp_path))
    expected = (30000 / 65535 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(batch, expected[None, :, None, None].expand_as(batch), atol=1e-4)


def test_float_tiff_uses_stated_or_measured_statistics_not_a_clamp(tmp_path):
    """Two flat float TIFFs at 2.0 and 6.0 (outside [0, 1]): with no statistics given, per-band
    mean 4 and std 2 are measured, so samples are exactly -1 or +1; stated statistics are used as given."""
    for name, value in (("a.tif", 2.0), ("b.tif", 6.0)):
        tifffile.imwrite(tmp_path / name, np.full((3, 10, 14), value, np.float32), photometric="minisblack", planarconfig="separate")
    batch = next(_loader(tmp_path))
    per_sample = batch.flatten(1)
    assert torch.allclose(per_sample.abs(), torch.ones_like(per_sample), atol=1e-5)
    assert {round(float(v)) for v in per_sample[:, 0]} <= {-1, 1}
    stated = next(_loader(tmp_path, mean=(0.0, 0.0, 0.0), std=(2.0, 2.0, 2.0)))
    assert {round(float(v), 4) for v in stated.flatten()} <= {1.0, 3.0}


def test_band_count_is_checked_up_front_and_grey_tiff_feeds_rgb(tmp_path, capsys):
    grey = tmp_path / "grey"
    grey.mkdir()
    tifffile.imwrite(grey / "one_band.tif", np.full((10, 14), 1000, np.uint16))
    batch = next(_loader(grey))  # in_chans=3: one band repeated, as for grey PNGs
    assert batch.shape == (2, 3, 8, 8) and torch.isfinite(batch).all()
    tifffile.imwrite(grey / "four_band.tif", np.full((10, 14, 4), 1000, np.uint16), photometric="minisblack")
    loader = _loader(grey, in_chans=4)
    out = capsys.readouterr().out
    assert loader.skipped == 1 and loader.files == [str(grey / "four_band.tif")]
    assert f"skipping {grey / 'one_band.tif'}: has 1 band(s), in_chans=4" in out
    os.remove(grey / "four_band.tif")
    with pytest.raises(ValueError, match="one_band.tif: has 1 band"):
        _loader(grey, in_chans=4)


def _png_header_only(path, width, height):
    """A PNG that declares width x height 8-bit grey pixels but carries almost no data."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_absurd_pixel_counts_are_skipped_counted_and_named_before_decoding(tmp_path, capsys):
    from rsscale.scaling.data.loader import MAX_PIXELS

    Image.fromarray(np.full((12, 16, 3), 100, np.uint8)).save(tmp_path / "ok.png")
    _png_header_only(tmp_path / "huge.png", 9000, 9000)  # 81 Mpx > MAX_PIXELS, under PIL's bomb limit
    assert 9000 * 9000 > MAX_PIXELS
    loader = _loader(tmp_path)
    out = capsys.readouterr().out
    assert loader.skipped == 1 and loader.files == [str(tmp_path / "ok.png")]
    assert f"skipping {tmp_path / 'huge.png'}: has 9000 x 9000 = 81,000,000 pixels" in out
    with pytest.raises(ValueError, match=r"png: has .* pixels, more than max_pixels=100 "):
        _loader(tmp_path, max_pixels=100)  # the limit is a parameter; no usable image is an error naming one


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
@pytest.mark.parametrize("kind", ["png", "tif"])
def test_dali_loader_state_resumes_the_identical_stream(tmp_path, kind):
    """Loader level, both DALI paths (decoder; external_source), across an epoch boundary and from
    a state taken before the first batch: the JSON round-tripped state continues the same batches."""
    from rsscale.scaling.data.loader import build_pretrain_loader

    rng = np.random.default_rng(0)
    for i in range(7):
        if kind == "png":
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        else:
            tifffile.imwrite(tmp_path / f"{i}.tif", rng.integers(0, 65535, (30, 40, 4), dtype=np.uint16), photometric="minisblack")
    kw = dict(img_size=8, batch_size=2, seed=3, backend="dali", num_workers=1, in_chans=3 if kind == "png" else 4)
    full = [next(loader) for loader in [build_pretrain_loader(tmp_path, **kw)] for _ in range(6)]
    cut = build_pretrain_loader(tmp_path, **kw)
    at0 = json.loads(json.dumps(cut.state_dict()))
    [next(cut) for _ in range(2)]
    at2 = json.loads(json.dumps(cut.state_dict()))
    for state, first in ((at2, 2), (at0, 0)):
        resumed = build_pretrain_loader(tmp_path, state=state, **kw)
        assert resumed.backend == "dali" and resumed.step == first
        assert all(torch.equal(next(resumed), want) for want in full[first:])
    assert not torch.equal(full[0], full[1])


def test_auto_backend_says_which_and_why(tmp_path, capsys, monkeypatch):
    """`auto` is the default; it names the backend it chose and why, in one line."""
    from rsscale.scaling.data import loader as data
    from rsscale.scaling.train.pretrain import TrainConfig

    assert TrainConfig().data_backend == "auto"
    Image.fromarray(np.full((12, 16, 3), 100, np.uint8)).save(tmp_path / "a.png")
    loader = data.build_pretrain_loader(tmp_path, 8, batch_size=2, num_workers=0)
    lines = [line for line in capsys.readouterr().out.splitlines() if "data backend" in line]
    assert len(lines) == 1
    if HAVE_DALI:
        assert loader.backend == "dali" and "data backend dali (auto: nvidia-dali is installed" in lines[0]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("nvidia") else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # an import of it now fails: "not installed"
    loader = data.build_pretrain_loader(tmp_path, 8, batch_size=2, num_workers=0)
    lines = [line for line in capsys.readouterr().out.splitlines() if "data backend" in line]
    assert loader.backend == "torch" and lines == ["[data] data backend torch (auto: nvidia-dali is not installed)"]
    torch_state = loader.state_dict()
    monkeypatch.undo()
    resumed = data.build_pretrain_loader(tmp_path, 8, batch_size=2, num_workers=0, state=torch_state)
    assert resumed.backend == "torch" and "resuming a stream the torch loader started" in capsys.readouterr().out




@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    ensure_dataset(root, num_pretrain=3, num_seg=2, num_det=2, size=64, workers=1)
    return root


# ------------------------------------------------------------------------- pretrain on a dataset root
def test_pretraining_a_dataset_root_reads_its_pretraining_images(small_dataset):
    from rsscale.scaling.data.loader import build_pretrain_loader, scan_images

    files = scan_images(small_dataset)
    assert len(files) == 3 and all(os.sep + "pretrain" + os.sep in f for f in files)
    loader = build_pretrain_loader(small_dataset, img_size=16, batch_size=1, backend="torch", num_workers=0)
    assert len(loader.files) == 3


def test_pretraining_a_dataset_root_without_pretraining_images_is_refused(tmp_path):
    from rsscale.scaling.data.loader import scan_images

    root = tmp_path / "ft-only"
    ensure_dataset(root, num_pretrain=0, num_seg=2, num_det=0, size=64, workers=1)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{root} has no pretraining images")):
        scan_images(root)
