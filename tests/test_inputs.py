"""Hostile-but-realistic inputs: numbers that make no sense,
mistyped config files, 16-bit and float imagery, broken or read-only results stores, kernel checks
that could not compare, and DALI's exact resume. Each test failed on the code before its fix."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from rsscale.scaling.runtime.cli import main as cli

HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None


def _one_error_line(capsys, *needles):
    """The command wrote one 'error:' line naming every needle, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err
    assert "Traceback" not in err


# ------------------------------------------------------------------ numbers that make no sense
@pytest.mark.parametrize("argv, flag", [
    (["bench", "--steps", "0", "--no-record"], "--steps"),
    (["bench", "--global-batch", "-8", "--no-record"], "--global-batch"),
    (["profile", "--model", "tiny", "--gpus", "2", "--memory-gb", "-5"], "--memory-gb"),
    (["profile", "--model", "tiny", "--gpus", "2", "--efficiency", "1.5"], "--efficiency"),
    (["finetune", "--task", "seg", "--dataset", "synthetic", "--steps", "0"], "--steps"),
    (["finetune", "--task", "seg", "--dataset", "synthetic", "--log-every", "0"], "--log-every"),
    (["finetune", "--task", "seg", "--dataset", "synthetic", "--lr", "nan"], "--lr"),
])
def test_numeric_flags_out_of_range_are_one_line_errors(argv, flag, capsys):
    assert cli(argv) == 2
    _one_error_line(capsys, flag)


@pytest.mark.parametrize("flags, flag", [
    (dict(steps=0), "--steps"), (dict(steps=-3), "--steps"), (dict(lr=-1.0), "--lr"), (dict(save_every=-1), "--save-every"),
    (dict(in_chans=0), "--in-chans"), (dict(log_every=0), "--log-every"), (dict(lr=float("inf")), "--lr"),
    (dict(min_lr=0.5, lr=0.1), "--min-lr"), (dict(micro_batch=0), "--micro-batch"), (dict(data_backend="jax"), "--data-backend"),
])
def test_pretrain_config_values_are_range_checked(flags, flag):
    from rsscale.scaling.train.pretrain import config_from_args

    with pytest.raises(ValueError, match=f"^{flag} "):
        config_from_args(_args(**flags))


def test_pretrain_steps_zero_exits_nonzero_without_recording(tmp_path):
    cmd = [sys.executable, "-m", "rsscale.scaling.runtime.cli", "pretrain", "--steps", "0", "--data", "random",
           "--out", str(tmp_path / "run"), "--results", str(tmp_path / "r.db")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--steps" in proc.stderr and "must be >= 1" in proc.stderr
    assert not (tmp_path / "r.db").exists()


def _args(**flags):
    ns = argparse.Namespace(config=None, nproc=None)
    for k, v in flags.items():
        setattr(ns, k, v)
    return ns


# ------------------------------------------------------------------------ mistyped config files
@pytest.mark.parametrize("text, key, expected", [
    ("steps: ten\n", "'steps'", "int"),
    ('resume: "no"\n', "'resume'", "true or false"),
    ('parallel: {sp: "false"}\n', "'parallel.sp'", "true or false"),
    ("optim: {lr: [1, 2]}\n", "'optim.lr'", "float"),
    ("parallel: 4\n", "parallel", "mapping"),
    ("model: 12\n", "'model'", "string"),
])
def test_pretrain_config_file_is_type_checked_up_front(tmp_path, text, key, expected):
    from rsscale.scaling.train.pretrain import config_from_args

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        config_from_args(_args(config=str(path)))
    msg = str(err.value)
    assert str(path) in msg and key in msg and expected in msg and "\n" not in msg


def test_pretrain_config_file_values_keep_their_meaning(tmp_path):
    """Real booleans, integral floats and null for an optional value are accepted as such."""
    from rsscale.scaling.train.pretrain import config_from_args

    path = tmp_path / "run.toml"
    path.write_text('steps = 4.0\nresume = false\nresults = "x.db"\n[parallel]\nsp = false\n')
    c = config_from_args(_args(config=str(path)))
    assert (c.steps, c.resume, c.parallel.sp, c.results) == (4, False, False, "x.db")


def test_config_file_booleans_and_repeatable_flags(tmp_path, capsys):
    """bench/profile files: 'record: "no"' is refused; a list feeds a repeatable flag."""
    cfg = tmp_path / "bench.yaml"
    cfg.write_text('record: "no"\n')
    assert cli(["bench", "--config", str(cfg)]) == 2
    _one_error_line(capsys, str(cfg), "record", "true or false")
    prof = tmp_path / "profile.yaml"
    prof.write_text("model: tiny\ngpus: 2\nglobal_batch: 8\nmicro_batch: [2, 4]\ntop: 3\n")
    assert cli(["profile", "--config", str(prof)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if " mb" in line]
    assert rows and all(" mb2 " in r or " mb4 " in r for r in rows)


# ------------------------------------------------------------ kernel checks that could not compare
def _kernel_rec(ms, kernel="layer_norm", impl="triton"):
    return dict(kernel=kernel, impl=impl, shape="M=8 N=40 K=2", dtype="bf16", direction="fwd", ms=ms,
                unit="GB/s", rate=1.0, pct_peak=1.0)


def _results_file(tmp_path, name, records, device="GPU A", raw=None):
    path = tmp_path / name
    path.write_text(raw if raw is not None else json.dumps(dict(meta=dict(device=device, shapes="tiny", dtype="bf16"), records=records)))
    return str(path)


@pytest.mark.parametrize("case, why", [
    ("nan", "not a positive finite number"),
    ("malformed", "is not a results file"),
    ("no_ms", "lacks ms"),
    ("device", "baseline from 'GPU A', current run on 'GPU B'"),
    ("no_triton", "no triton records"),
])
def test_kernel_check_that_could_not_compare_fails_with_its_own_exit_code(tmp_path, capsys, case, why):
    from rsscale.benchmarks.measurement import kernels as kb

    base = _results_file(tmp_path, "base.json", [_kernel_rec(1.0)])
    current = {
        "nan": lambda: _results_file(tmp_path, "cur.json", [_kernel_rec(float("nan"))]),
        "malformed": lambda: _results_file(tmp_path, "cur.json", None, raw='{"records": [ truncated'),
        "no_ms": lambda: _results_file(tmp_path, "cur.json", [{k: v for k, v in _kernel_rec(1.0).items() if k != "ms"}]),
        "device": lambda: _results_file(tmp_path, "cur.json", [_kernel_rec(1.0)], device="GPU B"),
        "no_triton": lambda: _results_file(tmp_path, "cur.json", [_kernel_rec(1.0)]),
    }[case]()
    if case == "no_triton":
        base = _results_file(tmp_path, "base.json", [_kernel_rec(1.0, impl="torch")])
    assert cli(["kernels", "check", "--baseline", base, "--current", current]) == kb.EXIT_CANNOT_COMPARE == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "could not compare" in err and why in err, err
    assert cli(["kernels", "check", "--baseline", base, "--current", current, "--allow-skip"]) == 0
    assert "SKIPPED" in capsys.readouterr().out


def test_kernel_check_device_mismatch_can_be_allowed_and_then_compares(tmp_path, capsys):
    base = _results_file(tmp_path, "base.json", [_kernel_rec(1.0)])
    slow = _results_file(tmp_path, "slow.json", [_kernel_rec(1.5)], device="GPU B")
    assert cli(["kernels", "check", "--baseline", base, "--current", slow, "--allow-device-mismatch"]) == 1
    out = capsys.readouterr().out
    assert "compared anyway" in out and "slower" in out


# -------------------------------------------------------------- broken or read-only results stores
BENCH = ["bench", "--model", "tiny", "--micro-batch", "2", "--global-batch", "2", "--warmup", "0", "--steps", "1", "--peak-tflops", "1"]


@pytest.mark.parametrize("content, why", [
    (b"this is not a database, just bytes " * 200, "file is not a database"),
    ("foreign", "not an rsscale results store"),
])
def test_bench_checks_the_store_before_measuring(tmp_path, capsys, content, why):
    db = tmp_path / "results.db"
    if content == "foreign":
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE runs (x INTEGER)")
    else:
        db.write_bytes(content)
    assert cli(BENCH + ["--results", str(db)]) == 2
    _one_error_line(capsys, str(db), why)
    assert "[bench] step" not in capsys.readouterr().out


def test_bench_keeps_the_measurement_when_the_final_write_fails(tmp_path, capsys, monkeypatch):
    """The store breaks during the measurement: the record lands in a JSON file beside it, named."""
    from rsscale.benchmarks.measurement import bench

    db = tmp_path / "results.db"
    opened = bench.open_store

    def open_then_break(opts):
        store = opened(opts)
        db.write_bytes(b"garbage " * 1000)
        return store

    monkeypatch.setattr(bench, "open_store", open_then_break)
    assert cli(BENCH + ["--results", str(db)]) == 1
    err = capsys.readouterr().err
    saved = [p for p in tmp_path.iterdir() if p.name.startswith("results.db.unrecorded-")]
    assert len(saved) == 1 and str(saved[0]) in err and str(db) in err
    record = json.loads(saved[0].read_text())
    metrics = {m[0]: m[1] for m in record["metrics"]}
    assert metrics["images_per_s"] > 0 and record["run"]["preset"] == "tiny" and record["run"]["kind"] == "bench"


def _store_with_a_run(path):
    from rsscale.scaling.runtime.store import ResultsStore

    store = ResultsStore(path)
    with store.run(kind="bench", preset="tiny", params=1000, layout=dict(tp=1, pp=1, dp=1, sp=False), micro_batch=2,
                   global_batch=2, precision="fp32", kernels="torch") as run:
        run.log("images_per_s", 10.0)
    return store


def test_report_reads_a_store_on_read_only_media_without_writing(tmp_path):
    """`rsscale report` as an unprivileged user on a store whose folder and file are read-only:
    it reports, and the store's bytes (journal mode included) are unchanged, no WAL files made."""
    import shutil
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to run the report as an unprivileged user")
    top = tempfile.mkdtemp(prefix="rsscale-ro-")
    try:
        os.chmod(top, 0o755)
        media, out = os.path.join(top, "media"), os.path.join(top, "out")
        os.makedirs(media)
        os.makedirs(out)
        os.chmod(out, 0o777)
        db = os.path.join(media, "results.db")
        _store_with_a_run(db)
        before = open(db, "rb").read()
        os.chmod(db, 0o444)
        os.chmod(media, 0o555)
        cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-m", "rsscale.scaling.runtime.cli",
               "report", "--results", db, "--out", out, "--name", "ro"]
        env = dict(os.environ, MPLCONFIGDIR=out, HOME=out)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "1 runs" in open(os.path.join(out, "ro", "report.md")).read()
        assert open(db, "rb").read() == before and sorted(os.listdir(media)) == ["results.db"]
    finally:
        os.chmod(os.path.join(top, "media"), 0o755)
        shutil.rmtree(top)


def test_report_on_a_corrupt_store_is_one_line(tmp_path, capsys):
    db = tmp_path / "results.db"
    db.write_bytes(b"\0garbage" * 500)
    assert cli(["report", "--results", str(db), "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, str(db), "cannot read it")


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


# ------------------------------------------------------------------------- DALI's exact resume
@pytest.mark.slow  # three pretraining processes; the DALI state round trip below is the fast check of the same stream
@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
def test_dali_run_killed_and_resumed_logs_the_same_losses(tmp_path):
    """The torch-loader kill/resume check of tests/test_train.py on DALI's CPU pipeline: the
    pipeline's checkpoint saved with the run makes the resumed losses equal the uninterrupted ones."""
    from test_train import killed_and_resumed_losses_agree

    out = killed_and_resumed_losses_agree(tmp_path, "--data-backend", "dali")
    assert "dali pipeline" in out and "reseeded" not in out


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
