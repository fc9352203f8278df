"""Pretraining loader: normalization, DP sharding, corrupt files, multi-band TIFF, DALI, resume.

Every image is one flat colour that encodes its index, so a sample's source file can be read back
from any crop/flip of it and the normalized value is known by hand."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from rsscale.scaling.data import loader as data
from rsscale.scaling.data.loader import IMAGENET_MEAN, IMAGENET_STD, build_pretrain_loader

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
from test_data import _take, _write_flat
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
