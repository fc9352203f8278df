"""Results store: concurrent writers lose nothing, the schema round-trips through pandas, and a
killed or failing writer leaves its run marked incomplete."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rsscale.scaling.runtime.store import ResultsStore

LAYOUT = dict(tp=2, pp=1, dp=2, sp=True)


def _writer(path, worker, n_single, n_batch):
    store = ResultsStore(path)
    with store.run(kind="bench", preset="tiny", params=1000 + worker, layout=LAYOUT, micro_batch=2,
                   global_batch=8, precision="fp32", kernels="torch", config=dict(worker=worker)) as run:
        for i in range(n_single):
            run.log("x", worker * 1000 + i, step=i, worker=worker)
        run.log_many(("loss", 1.0 / (s + 1), s) for s in range(n_batch))


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "r.db")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 25, 100)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = ResultsStore(path)
    runs = store.runs()
    assert len(runs) == 4 and (runs["status"] == "complete").all()
    x = store.metrics(name="x")
    assert len(x) == 100
    for w in range(4):
        mine = x[x["worker"] == w]
        assert sorted(mine["value"]) == [w * 1000 + i for i in range(25)]
        assert (mine["params"] == 1000 + w).all()  # joined to the right run
    loss = store.metrics(name="loss")
    assert len(loss) == 400 and loss.groupby("run_id")["step"].nunique().eq(100).all()


def test_schema_round_trip(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    cfg = dict(lr=1.5e-4, layers=[1, 2], name="x")
    with store.run(kind="pretrain", preset="mini", params=12345, layout=LAYOUT, micro_batch=4, global_batch=32,
                   precision="bf16", kernels="triton", config=cfg, device="Fake GPU", device_count=4) as run:
        run.log("mIoU", 41.25, dataset="synthetic", task="seg")
        run.log("loss", 0.5, step=7)
    r = store.runs().iloc[0]
    expect = dict(kind="pretrain", preset="mini", params=12345, tp=2, pp=1, dp=2, sp=True, micro_batch=4,
                  global_batch=32, precision="bf16", kernels="triton", device="Fake GPU", device_count=4,
                  status="complete", incomplete=False, pid=os.getpid())
    assert {k: r[k] for k in expect} == expect
    assert r["config"] == cfg and r["finished"] >= r["started"]
    m = store.metrics(kind="pretrain", name="mIoU").iloc[0]
    assert (m["value"], m["dataset"], m["task"], m["tags"]) == (41.25, "synthetic", "seg", dict(dataset="synthetic", task="seg"))
    assert store.metrics(kind="bench").empty and store.metrics(name="loss")["step"].tolist() == [7]


def test_env_var_sets_default_path(tmp_path, monkeypatch):
    monkeypatch.setenv("RSSCALE_RESULTS", str(tmp_path / "env.db"))
    assert ResultsStore().path == str(tmp_path / "env.db") and (tmp_path / "env.db").exists()


def test_exception_marks_failed_and_disabled_run_writes_nothing(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    with pytest.raises(RuntimeError):
        with store.run(kind="bench", preset="tiny") as run:
            run.log("a", 1.0)
            raise RuntimeError("boom")
    with store.run(kind="bench", enabled=False) as run:
        run.log("a", 2.0)
    runs = store.runs()
    assert runs["status"].tolist() == ["failed"] and runs["incomplete"].all()
    assert store.metrics()["value"].tolist() == [1.0]
    with pytest.raises(ValueError, match="kind"):
        store.start_run("nonsense")


def test_killed_writer_leaves_run_incomplete(tmp_path):
    path = str(tmp_path / "r.db")
    code = textwrap.dedent(f"""
        import sys, time
        from rsscale.scaling.runtime.store import ResultsStore
        with ResultsStore({path!r}).run(kind="pretrain", preset="tiny") as run:
            run.log_many(("loss", 1.0, s) for s in range(10))
            print("logged", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "logged"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    store = ResultsStore(path)
    runs = store.runs()
    assert runs["status"].tolist() == ["running"] and runs["incomplete"].all()
    assert len(store.metrics(name="loss")) == 10




@pytest.mark.parametrize("tags", [
    {"name": "a", "step": 7},                      # the metric's own columns
    {"value": 1, "run_id": 2, "tags": "x"},
    {"incomplete": True, "kind": "k"},             # a derived column and a run column
    {"name": "a", "tag_name": "b"},                # the prefixed name is itself taken
])
def test_store_tags_named_like_columns_never_duplicate_columns(tmp_path, tags):
    store = ResultsStore(str(tmp_path / "r.db"))
    with store.run("bench", preset="tiny") as run:
        run.log_many([("loss", 0.5, 3, tags)])
    df = store.metrics()
    assert df.columns.is_unique, list(df.columns)
    row = df.iloc[0]
    assert (row["name"], row["value"], row["step"], bool(row["incomplete"])) == ("loss", 0.5, 3, False)
    assert row["tags"] == tags
    tag_values = {c: row[c] for c in df.columns if c not in store.metrics(name="none").columns}
    assert sorted(map(str, tag_values.values())) == sorted(map(str, tags.values()))


def test_store_rejects_bad_input_with_one_sentence(tmp_path):
    store = ResultsStore(str(tmp_path / "r.db"))
    with pytest.raises(ValueError, match=r"layout keys must be tp, pp, dp, sp; got unexpected \['ep'\]"):
        store.start_run("bench", layout={"tp": 1, "ep": 2})
    with pytest.raises(ValueError, match=r"unknown run fields \['gpu'\]"):
        store.start_run("bench", gpu="x")
    run = store.start_run("bench", layout={"tp": 2, "sp": 0}, params=12.7, host="h")
    with pytest.raises(ValueError, match="metric name must be a non-empty string, got ''"):
        run.log("", 1.0)
    with pytest.raises(ValueError, match=r"cannot update run fields \['status'\]"):
        run.update(status="complete")
    with pytest.raises(ValueError, match="a run finishes as 'complete', 'failed', 'interrupted', not 'done'"):
        run.finish("done")
    run.log("x", None)
    run.log_many([("y", 2, None), ("z", 3.5, 4, {"k": 1, "path": Path("a") / "b"})])  # non-JSON tag: str
    run.update(device_count=3, config={"b": 1})
    r = store.runs().iloc[0]
    assert (r["tp"], r["sp"], r["params"], r["host"], r["device_count"], r["config"]) == (2, False, 12, "h", 3, {"b": 1})
    assert (r["status"], bool(r["incomplete"]), r["finished"]) == ("running", True, None)
    m = store.metrics()
    assert m["name"].tolist() == ["x", "y", "z"] and m["value"].isna().tolist() == [True, False, False]
    assert m["step"].isna().tolist() == [True, True, False] and m["step"].iloc[2] == 4
    assert m["path"].tolist()[2] == str(Path("a") / "b")
    assert m["k"].tolist()[2] == 1 and store.metrics(name="z", run_id=run.id)["value"].tolist() == [3.5]
    run.finish("failed")
    assert store.runs(status="failed")["id"].tolist() == [run.id] and store.runs(kind="pretrain").empty


def test_store_lock_errors_environment_and_config_values(tmp_path):
    import importlib.metadata
    import sqlite3
    import threading

    from rsscale.scaling.runtime import store as S

    assert S._is_locked(sqlite3.OperationalError("database is locked"))
    assert S._is_locked(sqlite3.OperationalError("database is busy"))
    assert not S._is_locked(sqlite3.OperationalError("no such table: runs"))
    env = S.environment()
    assert env["torch_version"] == torch.__version__
    assert env["triton_version"] == importlib.metadata.version("triton")

    class NoWait(ResultsStore):  # sqlite's own busy wait off: the store's retry loop must wait
        def _connect(self):
            db = super()._connect()
            db.execute("PRAGMA busy_timeout = 0")
            return db

    store = NoWait(str(tmp_path / "r.db"), timeout_s=20.0)
    run = store.start_run("bench", config={"out": Path("runs") / "x"})  # non-JSON config value: str
    holder = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock for a moment
    release = threading.Timer(0.5, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        run.log("x", 1.0)  # retried until the lock is released
    finally:
        release.join()
        holder.close()
    assert store.metrics()["value"].tolist() == [1.0]
    assert store.runs()["config"][0] == {"out": str(Path("runs") / "x")}
