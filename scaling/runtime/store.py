"""Results store: one SQLite file that every part of rsscale writes its runs and metrics to.

    store = ResultsStore()                       # $RSSCALE_RESULTS or reports/results.db
    with store.run(kind="bench", preset="tiny", params=216640, layout=dict(tp=1, pp=1, dp=1, sp=False),
                   micro_batch=8, global_batch=32, precision="fp32", kernels="torch", config={}) as run:
        run.log("images_per_s", 812.0)
        run.log_many(("loss", v, s) for s, v in enumerate(losses))
    store.runs()                                 # pandas DataFrame, one row per run
    store.metrics(kind="bench", name="images_per_s")   # metrics joined with their run's columns

Why it is safe with several writers (ranks, parallel jobs): WAL journal, a busy timeout, every
write is one short transaction retried while the database is locked. A run row is inserted as
'running' before any metric and set 'complete' (or 'failed' on an exception, 'interrupted' on Ctrl-C
or SIGTERM) only when its block ends, so a killed process leaves a run that reports list as
incomplete, never a half-written one. A file written before 'interrupted' existed is migrated when
opened for writing (SQLite cannot alter a CHECK constraint: the runs table is copied once).
Writing uses only the standard library; reading returns pandas DataFrames.

Opening checks the file: a corrupt file or a database without our tables is a StoreError (a
ValueError whose one line names the file), as is every later database error. A store opened with
`readonly=True` (what `rsscale report` does) is read through SQLite's read-only mode and never
written: no schema statements, no journal-mode switch; on read-only media (the folder cannot be
written, so SQLite could not make its WAL index) it is opened as immutable.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from contextlib import contextmanager
from datetime import datetime, timezone

DEFAULT_PATH = os.path.join("reports", "results.db")
ENV_VAR = "RSSCALE_RESULTS"
KINDS = ("pretrain", "bench", "finetune", "kernel", "profile", "calibration", "study")
STATUSES = ("running", "complete", "failed", "interrupted")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    preset TEXT,
    params INTEGER,
    tp INTEGER, pp INTEGER, dp INTEGER, sp INTEGER,
    micro_batch INTEGER, global_batch INTEGER,
    precision TEXT, kernels TEXT,
    device TEXT, device_count INTEGER,
    torch_version TEXT, triton_version TEXT, mcore_version TEXT,
    git_commit TEXT, host TEXT, pid INTEGER,
    started TEXT NOT NULL, finished TEXT,
    status TEXT NOT NULL CHECK (status IN ('running', 'complete', 'failed', 'interrupted')),
    config TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    name TEXT NOT NULL,
    value REAL,
    step INTEGER,
    tags TEXT
);
CREATE INDEX IF NOT EXISTS metrics_run_name ON metrics(run_id, name);
"""

RUN_COLUMNS = ("kind", "preset", "params", "tp", "pp", "dp", "sp", "micro_batch", "global_batch",
               "precision", "kernels", "device", "device_count", "torch_version", "triton_version",
               "mcore_version", "git_commit", "host", "pid", "started", "finished", "status", "config")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """HEAD of the checkout this package lives in (+ '-dirty' with uncommitted changes)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo where there is one (platform.processor() says only 'x86_64')."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine() or "unknown")


def environment() -> dict:
    """Device and software versions of this process. torch is consulted only when the caller has
    already imported it (the store itself never needs torch)."""
    env = dict(device=cpu_name(),
               device_count=int(os.environ.get("WORLD_SIZE", "1")),
               torch_version=_version("torch"), triton_version=_version("triton"),
               mcore_version=_version("megatron-core"), git_commit=git_commit(),
               host=socket.gethostname(), pid=os.getpid())
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            env["device_count"] = torch.distributed.get_world_size()
    return env


class StoreError(ValueError):
    """A results-store file that cannot be opened, read or written; the message is one line naming it."""


def _is_locked(err: sqlite3.OperationalError) -> bool:
    msg = str(err).lower()
    return "locked" in msg or "busy" in msg


def resolve_path(path: str | os.PathLike | None = None) -> str:
    """The store file a command uses: the given path, else $RSSCALE_RESULTS, else reports/results.db."""
    return os.fspath(path or os.environ.get(ENV_VAR) or DEFAULT_PATH)


class ResultsStore:
    """Handle on one results file; cheap to create, opens a short connection per transaction."""

    def __init__(self, path: str | os.PathLike | None = None, timeout_s: float = 60.0, readonly: bool = False):
        self.path = resolve_path(path)
        self.timeout_s, self.readonly = timeout_s, readonly
        folder = os.path.dirname(os.path.abspath(self.path))
        if readonly:
            if not os.path.isfile(self.path):
                raise FileNotFoundError(f"no results store at {self.path}")
            self._immutable = not os.access(folder, os.W_OK)  # read-only media: no WAL index can be made
            self._check_schema()
            return
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise StoreError(f"results store {self.path}: cannot create its folder ({err.strerror})") from None
        self._transaction(_create_or_migrate)
        self._check_schema()

    def _check_schema(self) -> None:
        """StoreError unless the file holds the runs and metrics tables with their columns."""
        def columns(db, table):
            return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}

        def check(db):
            return {t: cols - columns(db, t) for t, cols in (("runs", set(RUN_COLUMNS) | {"id"}),
                                                              ("metrics", {"run_id", "name", "value", "step", "tags"}))}

        missing = {t: sorted(c) for t, c in self._with_db(check).items() if c}
        if missing:
            raise StoreError(f"results store {self.path} is not an rsscale results store (missing: "
                             + "; ".join(f"{t}.{', '.join(c)}" for t, c in missing.items()) + ")")

    def _with_db(self, work):
        """work(db) on a fresh connection; sqlite errors become one-line StoreErrors naming the file."""
        try:
            db = self._connect()
            try:
                return work(db)
            finally:
                db.close()
        except sqlite3.Error as err:
            raise self._error(err) from None

    def _error(self, err: sqlite3.Error) -> StoreError:
        what = "read" if self.readonly else "open or write"
        return StoreError(f"results store {self.path}: cannot {what} it ({' '.join(str(err).split())})")

    # -- writing ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:  # SQLite's read-only mode: no schema, journal or WAL switch can happen
            uri = f"file:{urllib.parse.quote(os.path.abspath(self.path))}?mode=ro" + ("&immutable=1" if self._immutable else "")
            db = sqlite3.connect(uri, uri=True, timeout=self.timeout_s, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            return db
        db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    def _transaction(self, work):
        """Run work(db) inside one IMMEDIATE transaction, retrying while the file is locked."""
        deadline = time.monotonic() + self.timeout_s
        delay = 0.01
        while True:
            try:
                db = self._connect()
                try:
                    db.execute("BEGIN IMMEDIATE")
                    result = work(db)
                    db.execute("COMMIT")
                    return result
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                finally:
                    db.close()
            except sqlite3.OperationalError as err:
                if not _is_locked(err) or time.monotonic() > deadline:
                    raise self._error(err) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            except sqlite3.Error as err:
                raise self._error(err) from None

    def start_run(self, kind: str, preset: str | None = None, params: int | None = None,
                  layout: dict | None = None, micro_batch: int | None = None,
                  global_batch: int | None = None, precision: str | None = None,
                  kernels: str | None = None, config: dict | None = None, **environment_overrides) -> "Run":
        """Insert a run row with status 'running'; prefer the `run(...)` context manager."""
        if kind not in KINDS:
            raise ValueError(f"run kind must be one of {', '.join(KINDS)}, not {kind!r}")
        layout = dict(layout or {})
        unknown = set(layout) - {"tp", "pp", "dp", "sp"}
        if unknown:
            raise ValueError(f"layout keys must be tp, pp, dp, sp; got unexpected {sorted(unknown)}")
        env = environment()
        bad = set(environment_overrides) - set(env)
        if bad:
            raise ValueError(f"unknown run fields {sorted(bad)}; overridable: {', '.join(env)}")
        env.update(environment_overrides)
        row = dict(kind=kind, preset=preset, params=None if params is None else int(params),
                   tp=layout.get("tp"), pp=layout.get("pp"), dp=layout.get("dp"),
                   sp=None if layout.get("sp") is None else int(bool(layout["sp"])),
                   micro_batch=micro_batch, global_batch=global_batch, precision=precision,
                   kernels=kernels, **env, started=_now(), finished=None, status="running",
                   config=json.dumps(config or {}, default=str, sort_keys=True))
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        run_id = self._transaction(lambda db: db.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})",
                                                         tuple(row.values())).lastrowid)
        return Run(self, run_id)

    @contextmanager
    def run(self, kind: str, enabled: bool = True, **fields):
        """Context manager around start_run: 'complete' when the block ends, 'interrupted' on Ctrl-C
        or SIGTERM (KeyboardInterrupt), 'failed' when it raises anything else. enabled=False (e.g. on
        ranks other than 0) yields a run that records nothing."""
        if not enabled:
            yield NullRun()
            return
        run = self.start_run(kind, **fields)
        try:
            yield run
        except KeyboardInterrupt:
            run.finish("interrupted")
            raise
        except BaseException:
            run.finish("failed")
            raise
        run.finish("complete")

    # -- reading ---------------------------------------------------------------------------

    def _read(self, sql: str, params: tuple = ()):
        import pandas as pd

        try:
            return self._with_db(lambda db: pd.read_sql_query(sql, db, params=params))
        except pd.errors.DatabaseError as err:  # pandas wraps sqlite errors in its own type
            raise StoreError(f"results store {self.path}: cannot read it ({' '.join(str(err).split())})") from None

    def runs(self, kind: str | None = None, status: str | None = None):
        """One row per run; `config` parsed into a dict, `sp` as bool, `incomplete` = not complete."""
        where, params = _where(kind=kind, status=status)
        df = self._read(f"SELECT * FROM runs{where} ORDER BY id", params)
        df["config"] = [json.loads(c) if isinstance(c, str) else {} for c in df["config"]]
        return _derived(df)

    def metrics(self, kind: str | None = None, name: str | None = None, run_id: int | None = None,
                status: str | None = None):
        """Metric rows joined with their run's columns; each tag becomes a column (prefixed with
        'tag_' where it would shadow a column). `tags` keeps the parsed dict too."""
        import pandas as pd

        where, params = _where(**{"r.kind": kind, "m.name": name, "m.run_id": run_id, "r.status": status})
        run_cols = ", ".join(f"r.{c}" for c in RUN_COLUMNS if c != "config")
        df = self._read(f"SELECT m.run_id, m.name, m.value, m.step, m.tags, {run_cols} FROM metrics m "
                        f"JOIN runs r ON r.id = m.run_id{where} ORDER BY m.run_id, m.id", params)
        df["tags"] = [json.loads(t) if isinstance(t, str) else {} for t in df["tags"]]
        tags = pd.DataFrame(list(df["tags"]), index=df.index)
        df = _derived(df)
        taken, names = set(df.columns), []
        for c in tags.columns:  # a tag that shadows a column gets tag_ prefixes until it is free
            while c in taken:
                c = f"tag_{c}"
                while c in tags.columns:
                    c = f"tag_{c}"
            taken.add(c)
            names.append(c)
        tags.columns = names
        return pd.concat([df, tags], axis=1)


def _create_or_migrate(db) -> None:
    """Create the tables if missing; a runs table whose CHECK predates a status is rebuilt with the
    current one (the documented SQLite way: new table, copy, drop, rename; ids and metrics kept)."""
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            db.execute(stmt)
    sql = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'runs'").fetchone()[0]
    if all(f"'{s}'" in sql for s in STATUSES):
        return
    have = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    if not set(RUN_COLUMNS) <= have:
        return  # not our table: _check_schema names what is missing
    seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'runs'").fetchone()
    cols = ", ".join(("id",) + RUN_COLUMNS)
    create = SCHEMA.split(";")[0].replace("CREATE TABLE IF NOT EXISTS runs", "CREATE TABLE runs_new")
    db.execute(create)
    db.execute(f"INSERT INTO runs_new ({cols}) SELECT {cols} FROM runs")
    db.execute("DROP TABLE runs")
    db.execute("ALTER TABLE runs_new RENAME TO runs")
    if seq:  # AUTOINCREMENT never reuses an id, even of a deleted run
        db.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'runs'", (seq[0],))


def _derived(df):
    """`sp` back to bool, and `incomplete`: a run still 'running' (or killed), 'failed' or 'interrupted'."""
    df["sp"] = df["sp"].map(lambda v: None if v is None or v != v else bool(v))
    df["incomplete"] = df["status"] != "complete"
    return df


def _where(**filters) -> tuple[str, tuple]:
    parts = [(col, val) for col, val in filters.items() if val is not None]
    if not parts:
        return "", ()
    return " WHERE " + " AND ".join(f"{col} = ?" for col, _ in parts), tuple(v for _, v in parts)


def _metric_row(run_id: int, name: str, value, step, tags: dict) -> tuple:
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric name must be a non-empty string, got {name!r}")
    return (run_id, name, None if value is None else float(value), None if step is None else int(step),
            json.dumps(tags, default=str, sort_keys=True) if tags else None)


class Run:
    """A started run; each log call is its own transaction."""

    def __init__(self, store: ResultsStore, run_id: int):
        self.store, self.id = store, run_id

    def log(self, name: str, value: float, step: int | None = None, **tags) -> None:
        row = _metric_row(self.id, name, value, step, tags)
        self.store._transaction(lambda db: db.execute(
            "INSERT INTO metrics (run_id, name, value, step, tags) VALUES (?, ?, ?, ?, ?)", row))

    def log_many(self, records) -> None:
        """Many metrics in one transaction: records of (name, value), (name, value, step) or
        (name, value, step, tags_dict), e.g. a whole loss curve."""
        rows = []
        for rec in records:
            name, value, step, tags = (tuple(rec) + (None, None))[:4]
            rows.append(_metric_row(self.id, name, value, step, tags or {}))
        self.store._transaction(lambda db: db.executemany(
            "INSERT INTO metrics (run_id, name, value, step, tags) VALUES (?, ?, ?, ?, ?)", rows))

    def update(self, **fields) -> None:
        """Correct run columns known only later (e.g. device_count after process groups exist)."""
        bad = set(fields) - (set(RUN_COLUMNS) - {"status", "started", "finished"})
        if bad:
            raise ValueError(f"cannot update run fields {sorted(bad)}")
        if "config" in fields:
            fields["config"] = json.dumps(fields["config"], default=str, sort_keys=True)
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.store._transaction(lambda db: db.execute(f"UPDATE runs SET {sets} WHERE id = ?",
                                                      (*fields.values(), self.id)))

    def finish(self, status: str = "complete") -> None:
        if status not in STATUSES[1:]:
            raise ValueError(f"a run finishes as {', '.join(map(repr, STATUSES[1:]))}, not {status!r}")
        self.store._transaction(lambda db: db.execute("UPDATE runs SET status = ?, finished = ? WHERE id = ?",
                                                      (status, _now(), self.id)))


class NullRun:
    """Stands in for a Run on processes that must not write (ranks other than 0)."""

    id = None

    def log(self, *args, **kwargs) -> None:
        pass

    def log_many(self, records) -> None:
        pass

    def update(self, **fields) -> None:
        pass
