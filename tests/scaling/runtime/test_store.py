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


def _old_store(path):
    """A results file written before the 'interrupted' status existed: runs 1-3, run 3 deleted."""
    import sqlite3

    from rsscale.scaling.runtime import store as S

    old = S.SCHEMA.replace(", 'interrupted'", "")
    assert "'interrupted'" not in old
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(old)
    for i in (1, 2, 3):
        db.execute("INSERT INTO runs (kind, preset, params, started, status, config) VALUES (?, ?, ?, ?, ?, ?)",
                   ("bench", f"p{i}", 100 * i, "2024-01-01T00:00:00.000+00:00", "complete", f'{{"i": {i}}}'))
        db.execute("INSERT INTO metrics (run_id, name, value, step) VALUES (?, 'loss', ?, 0)", (i, i / 10))
    db.execute("DELETE FROM metrics WHERE run_id = 3")
    db.execute("DELETE FROM runs WHERE id = 3")
    db.close()


def test_store_migrates_an_older_file_keeping_runs_metrics_and_ids(tmp_path):
    """Opening a file whose CHECK predates 'interrupted' migrates it: runs, ids and metrics survive,
    'interrupted' can be recorded, and the id of a deleted run is never handed out again."""
    path = str(tmp_path / "old.db")
    _old_store(path)
    store = ResultsStore(path)
    runs = store.runs()
    assert runs["id"].tolist() == [1, 2] and runs["preset"].tolist() == ["p1", "p2"]
    assert runs["params"].tolist() == [100, 200] and runs["config"].tolist() == [{"i": 1}, {"i": 2}]
    m = store.metrics(name="loss")
    assert m["run_id"].tolist() == [1, 2] and m["value"].tolist() == [0.1, 0.2] and m["preset"].tolist() == ["p1", "p2"]
    with pytest.raises(KeyboardInterrupt), store.run(kind="bench", preset="new") as run:
        raise KeyboardInterrupt
    assert run.id == 4  # AUTOINCREMENT: deleted run 3 keeps its id
    assert store.runs()["status"].tolist() == ["complete", "complete", "interrupted"]
    assert ResultsStore(path).runs()["id"].tolist() == [1, 2, 4]  # reopening does not migrate again


def test_finish_defaults_to_complete_and_metrics_filter_by_status(tmp_path):
    """Run.finish() without a status marks the run 'complete'; metrics(status=...) keeps only
    the metrics of runs with that status."""
    store = ResultsStore(tmp_path / "r.db")
    done, failed = store.start_run("bench", preset="a"), store.start_run("bench", preset="b")
    done.log("x", 1.0)
    failed.log("x", 2.0)
    done.finish()
    failed.finish("failed")
    assert store.runs()["status"].tolist() == ["complete", "failed"]
    assert store.metrics(status="complete")["value"].tolist() == [1.0]
    assert store.metrics(status="failed")["run_id"].tolist() == [failed.id]
    assert store.metrics(status="running").empty


def test_store_errors_name_the_file_what_failed_and_the_cause(tmp_path):
    """A file that is not a database, or a read that fails, is a one-line StoreError naming the path,
    whether it was opening/writing or reading, and SQLite's cause."""
    import sqlite3

    from rsscale.scaling.runtime.store import StoreError

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database\n" * 100)
    for readonly, what in ((False, "open or write"), (True, "read")):
        with pytest.raises(StoreError) as err:
            ResultsStore(str(junk), readonly=readonly)
        assert str(err.value) == f"results store {junk}: cannot {what} it (file is not a database)"
    path = str(tmp_path / "r.db")
    store = ResultsStore(path)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TABLE metrics")  # the file changed under an open store
    db.close()
    with pytest.raises(StoreError) as err:
        store.metrics()
    msg = str(err.value)
    assert msg.startswith(f"results store {path}: cannot read it (") and "\n" not in msg
    assert msg.endswith("no such table: metrics)")


def test_unknown_run_field_error_lists_what_can_be_overridden(tmp_path):
    """Passing a run field that does not exist says which environment fields can be overridden."""
    store = ResultsStore(tmp_path / "r.db")
    with pytest.raises(ValueError) as err:
        store.start_run("bench", gpu="x")
    assert str(err.value) == ("unknown run fields ['gpu']; overridable: device, device_count, torch_version, "
                              "triton_version, mcore_version, git_commit, host, pid")


def test_environment_records_megatron_version_and_git_commit(tmp_path, monkeypatch):
    """A run records the megatron-core version and the checkout's commit, and both can be overridden."""
    from rsscale.scaling.runtime import store as S

    versions = {"torch": "1.0", "triton": "2.0", "megatron-core": "9.9.9"}
    monkeypatch.setattr(S, "_version", lambda dist: versions.get(dist))
    monkeypatch.setattr(S, "git_commit", lambda: "0123456789ab-dirty")
    env = S.environment()
    assert (env["mcore_version"], env["git_commit"]) == ("9.9.9", "0123456789ab-dirty")
    store = ResultsStore(tmp_path / "r.db")
    store.start_run("bench")
    store.start_run("bench", mcore_version="0.1", git_commit="abc")
    r = store.runs()
    assert r["mcore_version"].tolist() == ["9.9.9", "0.1"]
    assert r["git_commit"].tolist() == ["0123456789ab-dirty", "abc"]


def test_git_commit_is_head_plus_dirty_for_tracked_changes_only(tmp_path, monkeypatch):
    """git_commit() of a checkout is its 12-digit HEAD, '-dirty' only once a tracked file changed
    (an untracked file does not count); outside a checkout it is None."""
    from rsscale.scaling.runtime import store as S

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setattr(S, "__file__", str(outside / "store.py"))
    assert S.git_commit() is None
    git("init", "-q")
    (tmp_path / "a.txt").write_text("a\n")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    monkeypatch.setattr(S, "__file__", str(tmp_path / "store.py"))
    assert S.git_commit() == head[:12]
    (tmp_path / "untracked.txt").write_text("u\n")
    assert S.git_commit() == head[:12]
    (tmp_path / "a.txt").write_text("changed\n")
    assert S.git_commit() == head[:12] + "-dirty"


def test_git_commit_gives_up_on_a_hung_git(monkeypatch):
    """A git that never answers (e.g. a stuck network checkout) makes git_commit() None after a bounded
    wait instead of hanging the run that records it."""
    from rsscale.scaling.runtime import store as S

    def hung_git(cmd, **kwargs):
        if kwargs.get("timeout") is None:
            pytest.fail(f"{cmd} would wait forever on a hung git")
        assert kwargs["timeout"] <= 60
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(S.subprocess, "run", hung_git)
    assert S.git_commit() is None


def test_cpu_name_is_the_model_name_from_proc_cpuinfo(monkeypatch):
    """cpu_name() is 'CPU ' + the first 'model name' of /proc/cpuinfo (all of it after the first
    colon), else the platform's processor or machine name."""
    import io
    import platform

    from rsscale.scaling.runtime import store as S

    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        model = None
    if model is not None:
        assert S.cpu_name() == "CPU " + model
    info = "processor\t: 0\nmodel name\t: Acme X1: 8 cores @ 2.0GHz \nmodel name\t: Other\n"
    monkeypatch.setattr(S, "open", lambda *a, **k: io.StringIO(info), raising=False)
    assert S.cpu_name() == "CPU Acme X1: 8 cores @ 2.0GHz"

    def no_file(*a, **k):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(S, "open", no_file, raising=False)
    assert S.cpu_name() == "CPU " + (platform.processor() or platform.machine() or "unknown")


def test_failed_migration_leaves_the_file_as_it_was(tmp_path):
    """A migration that fails half-way (a run whose status the current CHECK rejects) is rolled back:
    a one-line StoreError with SQLite's cause, and the file keeps its old table and rows, still readable."""
    import sqlite3

    from rsscale.scaling.runtime import store as S

    path = str(tmp_path / "other.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(S.SCHEMA.replace("'interrupted'", "'aborted'"))
    db.execute("INSERT INTO runs (kind, started, status) VALUES ('bench', '2024-01-01', 'aborted')")
    before = db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    db.close()
    with pytest.raises(S.StoreError) as err:
        ResultsStore(path)
    assert str(err.value).startswith(f"results store {path}: cannot open or write it (CHECK constraint failed")
    db = sqlite3.connect(path, isolation_level=None)
    assert db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall() == before
    db.close()
    assert ResultsStore(path, readonly=True).runs()["status"].tolist() == ["aborted"]


def test_runs_without_sp_keep_it_missing_not_false(tmp_path):
    """A run started without a layout (or without sp in it) has no sp: it reads back as None,
    neither False nor True, while sp=True/False round-trip as bools (runs and metrics alike)."""
    store = ResultsStore(tmp_path / "r.db")
    for layout in (dict(tp=1, sp=True), dict(tp=1, sp=False), dict(tp=1), None):
        store.start_run("bench", layout=layout).log("x", 1.0)
    assert store.runs()["sp"].tolist() == [True, False, None, None]
    assert store.metrics(name="x")["sp"].tolist() == [True, False, None, None]
    only_missing = ResultsStore(tmp_path / "other.db")
    only_missing.start_run("bench")
    assert only_missing.runs()["sp"].tolist() == [None]


def test_environment_takes_device_and_count_from_cuda_and_the_process_group(tmp_path, monkeypatch):
    """With CUDA up, the device is the GPU's name (not the CPU's); with a process group, the count is
    its world size (not $WORLD_SIZE); a run records both."""
    from rsscale.scaling.runtime import store as S

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H100 80GB")
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 8)
    env = S.environment()
    assert (env["device"], env["device_count"]) == ("Fake H100 80GB", 8)
    store = ResultsStore(tmp_path / "r.db")
    store.start_run("bench")
    r = store.runs().iloc[0]
    assert (r["device"], r["device_count"]) == ("Fake H100 80GB", 8)


def test_readonly_store_on_a_writable_folder_sees_rows_written_after_it_opened(tmp_path):
    """Only read-only media make a read-only store immutable: on a writable folder it reads through
    the WAL, so rows another process commits later (WAL not yet checkpointed: that process still
    has the file open) show up in the next read."""
    import sqlite3

    path = str(tmp_path / "r.db")
    writer = ResultsStore(path)
    writer.start_run("bench", preset="early")
    reader = ResultsStore(path, readonly=True)
    assert reader.runs()["preset"].tolist() == ["early"]
    holder = sqlite3.connect(path)  # another process with the file open: no checkpoint on close
    try:
        holder.execute("SELECT count(*) FROM runs").fetchall()
        writer.start_run("bench", preset="late")
        assert os.path.getsize(path + "-wal") > 0
        assert reader.runs()["preset"].tolist() == ["early", "late"]
    finally:
        holder.close()


def test_run_update_stores_config_as_key_sorted_json(tmp_path):
    """A config set by Run.update is stored as the same key-sorted JSON text start_run writes, so equal
    configs are equal text in the file (what SQL comparisons and grouping see)."""
    import json
    import sqlite3

    store = ResultsStore(tmp_path / "r.db")
    first = store.start_run("bench", config={"b": 1, "a": {"d": 2, "c": 3}})
    second = store.start_run("bench")
    second.update(config={"b": 1, "a": {"d": 2, "c": 3}})
    db = sqlite3.connect(store.path)
    try:
        texts = [t for (t,) in db.execute("SELECT config FROM runs ORDER BY id")]
    finally:
        db.close()
    assert texts == ['{"a": {"c": 3, "d": 2}, "b": 1}'] * 2
    assert texts[0] == json.dumps({"a": {"c": 3, "d": 2}, "b": 1}, sort_keys=True) and first.id != second.id
