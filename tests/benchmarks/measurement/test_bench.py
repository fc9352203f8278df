"""`rsscale bench` (benchmarks/measurement/bench.py) and its results store: the store is checked
before measuring, and a measurement whose final write fails is kept beside the store."""

from __future__ import annotations

import json
import sqlite3

import pytest

from rsscale.scaling.runtime.cli import main as cli


def _one_error_line(capsys, *needles):
    """The command wrote one 'error:' line naming every needle, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err
    assert "Traceback" not in err


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
