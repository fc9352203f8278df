"""Results store: concurrent writers lose nothing, the schema round-trips through pandas, and a
killed or failing writer leaves its run marked incomplete."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap

import pytest

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
