"""Run history: every run recorded in one SQLite database, for trends and for `tokprof compare --against`.

    history = History()                        # TOKPROF_HISTORY_DB, else $XDG_DATA_HOME/tokprof/history.db,
                                               # else ~/.local/share/tokprof/history.db
    history.record_run(run, "run.json")        # True when added, False when that run_id is already recorded
    history.kernel_trends(gpu="h100", op="linear")

The database holds the whole RunResult JSON of each run plus indexed rows per kernel and per roll-up point.
Concurrent writers and killed processes never corrupt it: WAL journal, a busy timeout, one BEGIN IMMEDIATE
transaction per run (all of a run's rows or none), and idempotent inserts keyed on run_id. A file that is not a
tokprof history (corrupt, another program's, a newer schema) raises HistoryDatabaseError naming the path and what
to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tokprof.profiler.schema import RunResult, run_from_dict

APPLICATION_ID = 0x746B7066  # "tkpf" in the SQLite header: tells a tokprof history from any other database
SCHEMA_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
SPARK = "▁▂▃▄▅▆▇█"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, timestamp_utc TEXT NOT NULL, recorded_utc TEXT NOT NULL, device TEXT NOT NULL,
    device_kind TEXT NOT NULL, spec_key TEXT, model TEXT, git_sha TEXT, tokprof_version TEXT, source TEXT,
    run_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_by_device ON runs(device, timestamp_utc);
CREATE TABLE IF NOT EXISTS kernels (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, op TEXT NOT NULL, shape TEXT NOT NULL,
    dtype TEXT NOT NULL, backend TEXT NOT NULL, device TEXT NOT NULL, median_us REAL NOT NULL, p10_us REAL,
    p90_us REAL, noise REAL, efficiency_measured REAL, efficiency_datasheet REAL, achieved_gbps REAL,
    achieved_tflops REAL, provenance TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS kernels_by_key ON kernels(op, shape, dtype, backend, device);
CREATE TABLE IF NOT EXISTS points (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, model TEXT, gpu TEXT, batch INTEGER,
    context INTEGER, dtype TEXT, backend TEXT, provenance TEXT, step_time_us REAL, tokens_per_s_per_gpu REAL,
    tokens_per_s_per_user REAL, usd_per_million_tokens REAL, j_per_token_total REAL);
CREATE INDEX IF NOT EXISTS points_by_key ON points(model, gpu, batch, context);
"""


class HistoryDatabaseError(ValueError):
    """The history database cannot be used (corrupt, not tokprof's, too new, locked too long)."""


def default_db_path() -> Path:
    """TOKPROF_HISTORY_DB, else $XDG_DATA_HOME/tokprof/history.db, else ~/.local/share/tokprof/history.db."""
    explicit = os.environ.get("TOKPROF_HISTORY_DB")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "tokprof" / "history.db"


def run_id_of(run: RunResult) -> str:
    """The run's id, or a stable one from its content (so re-recording the same file stays idempotent)."""
    if run.run_id:
        return run.run_id
    text = json.dumps(run.to_dict(), sort_keys=True)
    return "sha256-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def model_of(run: RunResult) -> str | None:
    if run.model and run.model.get("name"):
        return str(run.model["name"])
    for section in (run.rollup, run.e2e, run.reconciliation):
        for rec in section:
            if rec.get("model"):
                return str(rec["model"])
    return None


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi <= lo:
        return SPARK[3] * len(values)
    return "".join(SPARK[round((v - lo) / (hi - lo) * (len(SPARK) - 1))] for v in values)


@dataclass
class RunRow:
    run_id: str
    timestamp_utc: str
    recorded_utc: str
    device: str
    spec_key: str | None
    model: str | None
    git_sha: str | None
    source: str | None
    kernels: int
    points: int


@dataclass
class Trend:
    """One item across recorded runs, oldest first."""

    item: str
    device: str
    metric: str
    higher_is_better: bool
    values: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    timestamps: list[str] = field(default_factory=list)

    @property
    def last(self) -> float:
        return self.values[-1]

    @property
    def best(self) -> float:
        return max(self.values) if self.higher_is_better else min(self.values)

    @property
    def delta_vs_previous(self) -> float | None:
        return self.values[-1] / self.values[-2] - 1.0 if len(self.values) > 1 and self.values[-2] else None

    @property
    def delta_vs_best(self) -> float | None:
        return self.last / self.best - 1.0 if self.best else None

    @property
    def spark(self) -> str:
        return sparkline(self.values)


class History:
    """One SQLite history database; every call opens its own connection (safe across threads and processes)."""

    def __init__(self, path: str | Path | None = None, *, timeout_s: float = 30.0) -> None:
        self.path = Path(path).expanduser() if path is not None else default_db_path()
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = timeout_s

    # ------------------------------------------------------------------------------------------- connection

    def _fail(self, what: str, err: BaseException) -> HistoryDatabaseError:
        text = str(err)
        if "locked" in text or "busy" in text:
            advice = (f"another process held the database for more than {self.timeout_s:.0f} s; retry, or use "
                      "another file with --db / TOKPROF_HISTORY_DB")
        else:
            advice = (f"the file is corrupt or not a tokprof history database: move it aside (e.g. mv {self.path} "
                      f"{self.path}.bad) so that tokprof starts a new one, or choose another file with --db or "
                      "TOKPROF_HISTORY_DB")
        return HistoryDatabaseError(f"history database {self.path}: {what} failed ({text}); {advice}")

    def check(self, write: bool = False) -> None:
        """Raise HistoryDatabaseError now (before a long run, not after it) when the file cannot serve: not a SQLite
        database, another program's database, a newer schema, or (`write`) a file or folder this process cannot
        write (the schema read through a read-only connection); every connection checks the header too."""
        try:
            with self.path.open("rb") as fh:
                head = fh.read(100)
        except FileNotFoundError:
            head = None
        except IsADirectoryError as err:
            raise HistoryDatabaseError(f"history database {self.path}: is a folder, not a file; choose a file with "
                                       "--db or TOKPROF_HISTORY_DB") from err
        except OSError as err:
            raise HistoryDatabaseError(f"history database {self.path}: cannot read it ({err.strerror}); check the "
                                       "path and its permissions, or choose another with --db") from err
        if head and head[:len(SQLITE_MAGIC)] != SQLITE_MAGIC:
            raise self._fail("opening", sqlite3.DatabaseError("file is not a database (no SQLite header)"))
        if write and head:
            self._check_schema_read_only()
        if write:
            self._check_writable(exists=head is not None)

    def _check_schema_read_only(self) -> None:
        """Another program's database or a newer tokprof's, refused before a run that would record into it. Read
        through SQLite (read-only), not from the file header: in WAL mode the header lags the last transactions."""
        try:
            con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=self.timeout_s)
            try:
                app_id = con.execute("PRAGMA application_id").fetchone()[0]
                version = con.execute("PRAGMA user_version").fetchone()[0]
                tables = con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:
            return  # corrupt or locked: the connection that writes says which, with its advice
        if app_id != APPLICATION_ID and (app_id != 0 or tables > 0):
            raise HistoryDatabaseError(f"history database {self.path}: an SQLite database of another program "
                                       f"(application_id {app_id:#x}, not tokprof's {APPLICATION_ID:#x}); choose "
                                       "another file with --db or TOKPROF_HISTORY_DB")
        if version > SCHEMA_VERSION:
            raise HistoryDatabaseError(f"history database {self.path}: schema version {version} is newer than this "
                                       f"tokprof reads ({SCHEMA_VERSION}); upgrade tokprof or use another --db")

    def _check_writable(self, exists: bool) -> None:
        """The file (and its folder: SQLite writes -wal and -shm files beside it), or the nearest folder above a
        file still to be made, must be writable by this process."""
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        problem = None
        if not folder.is_dir():
            problem = f"{folder} is not a folder"
        elif exists and not os.access(self.path, os.W_OK):
            problem = "the file is not writable by this user"
        elif not os.access(folder, os.W_OK | os.X_OK):
            problem = f"the folder {folder} is not writable by this user"
        if problem:
            raise HistoryDatabaseError(f"history database {self.path}: cannot record runs there ({problem}); fix "
                                       "its permissions or choose another file with --db or TOKPROF_HISTORY_DB")

    @contextlib.contextmanager
    def _connect(self, what: str, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection with WAL, a busy timeout and the schema checked; `write` runs one BEGIN IMMEDIATE
        transaction (committed on success, rolled back on any error)."""
        self.check()
        if not write and not self.path.exists():
            raise HistoryDatabaseError(f"history database {self.path}: does not exist yet; record a run first "
                                       "(`tokprof history --record RUN.json`) or choose another with --db")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None)
        except sqlite3.Error as err:
            raise self._fail("opening", err) from err
        try:
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            self._retry_locked(lambda: con.execute("PRAGMA journal_mode = WAL").fetchone())
            con.execute("PRAGMA synchronous = FULL")
            con.execute("PRAGMA foreign_keys = ON")
            if write:
                con.execute("BEGIN IMMEDIATE")
                try:
                    self._ensure_schema(con)
                    yield con
                    con.execute("COMMIT")
                except BaseException:
                    if con.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                        con.execute("ROLLBACK")
                    raise
            else:
                self._ensure_schema(con, create=False)
                yield con
        except sqlite3.DatabaseError as err:
            raise self._fail(what, err) from err
        finally:
            con.close()

    def _retry_locked(self, fn: Any) -> Any:
        """Switching to WAL needs an exclusive lock that the busy handler does not always wait for: retry it."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _ensure_schema(self, con: sqlite3.Connection, create: bool = True) -> None:
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        version = con.execute("PRAGMA user_version").fetchone()[0]
        tables = con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id == 0 and tables == 0:
            if not create:
                raise HistoryDatabaseError(f"history database {self.path}: empty (no run recorded yet); record a "
                                           "run first (`tokprof history --record RUN.json`)")
            con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            return
        if app_id != APPLICATION_ID:
            raise HistoryDatabaseError(f"history database {self.path}: an SQLite database of another program "
                                       f"(application_id {app_id:#x}, not tokprof's {APPLICATION_ID:#x}); choose "
                                       "another file with --db or TOKPROF_HISTORY_DB")
        if version > SCHEMA_VERSION:
            raise HistoryDatabaseError(f"history database {self.path}: schema version {version} is newer than this "
                                       f"tokprof reads ({SCHEMA_VERSION}); upgrade tokprof or use another --db")

    # ----------------------------------------------------------------------------------------------- writes

    def record_run(self, run: RunResult, source: str | Path | None = None) -> bool:
        """Store `run` (whole JSON + indexed rows) in one transaction; False when its run_id is already there."""
        run_id = run_id_of(run)
        device = run.provenance.device
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._connect(f"recording run {run_id}", write=True) as con:
            cur = con.execute(
                "INSERT OR IGNORE INTO runs (run_id, timestamp_utc, recorded_utc, device, device_kind, spec_key, "
                "model, git_sha, tokprof_version, source, run_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, run.provenance.timestamp_utc, now, device.name, device.kind, device.spec_key, model_of(run),
                 run.provenance.git_sha, run.provenance.versions.get("tokprof"),
                 str(Path(source).resolve()) if source is not None else None,
                 json.dumps(run.to_dict(), allow_nan=False)))
            if cur.rowcount == 0:
                return False
            con.executemany(
                "INSERT INTO kernels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, k.op, json.dumps(k.shape, sort_keys=True), k.dtype, k.backend, k.device, k.timing.median_us,
                  k.timing.p10_us, k.timing.p90_us, k.timing.noise, k.roofline.efficiency_measured,
                  k.roofline.efficiency_datasheet, k.roofline.achieved_gbps, k.roofline.achieved_tflops,
                  k.provenance) for k in run.kernels])
            con.executemany(
                "INSERT INTO points VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, p.get("model"), p.get("gpu"), p.get("batch"), p.get("context"), p.get("dtype"),
                  p.get("backend"), p.get("provenance"), p.get("step_time_us"), p.get("tokens_per_s_per_gpu"),
                  p.get("tokens_per_s_per_user"), p.get("usd_per_million_tokens"), p.get("j_per_token_total"))
                 for p in run.rollup])
        return True

    # ------------------------------------------------------------------------------------------------ reads

    @staticmethod
    def _filters(gpu: str | None, model: str | None, prefix: str = "r") -> tuple[str, list[Any]]:
        clauses, args = [], []
        if gpu:
            clauses.append(f"(lower({prefix}.device) LIKE ? OR lower(coalesce({prefix}.spec_key, '')) LIKE ?)")
            args += [f"%{gpu.lower()}%"] * 2
        if model:
            clauses.append(f"lower(coalesce({prefix}.model, '')) LIKE ?")
            args.append(f"%{model.lower()}%")
        return (" AND ".join(clauses) or "1"), args

    def runs(self, gpu: str | None = None, model: str | None = None) -> list[RunRow]:
        where, args = self._filters(gpu, model)
        with self._connect("listing runs") as con:
            rows = con.execute(
                "SELECT r.run_id, r.timestamp_utc, r.recorded_utc, r.device, r.spec_key, r.model, r.git_sha, "
                "r.source, (SELECT count(*) FROM kernels k WHERE k.run_id = r.run_id), "
                "(SELECT count(*) FROM points p WHERE p.run_id = r.run_id) "
                f"FROM runs r WHERE {where} ORDER BY r.timestamp_utc, r.rowid", args).fetchall()
        return [RunRow(*row) for row in rows]

    def load(self, run_id: str) -> RunResult:
        with self._connect(f"loading run {run_id}") as con:
            row = con.execute("SELECT run_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise ValueError(f"run_id: no run {run_id!r} in history database {self.path}")
        return run_from_dict(json.loads(row[0]), f"{self.path}:{run_id}")

    def runs_for_device(self, device: str) -> list[tuple[str, str | None, RunResult]]:
        """(run_id, source file, run) of every run recorded on exactly `device`, oldest first."""
        with self._connect(f"loading runs of {device!r}") as con:
            rows = con.execute("SELECT run_id, source, run_json FROM runs WHERE device = ? "
                               "ORDER BY timestamp_utc, rowid", (device,)).fetchall()
        return [(rid, src, run_from_dict(json.loads(text), f"{self.path}:{rid}")) for rid, src, text in rows]

    def kernel_trends(self, gpu: str | None = None, op: str | None = None, model: str | None = None) -> list[Trend]:
        """Median time per (op, shape, dtype, backend, device) across recorded runs, oldest first."""
        where, args = self._filters(gpu, model)
        if op:
            where += " AND k.op = ?"
            args.append(op)
        with self._connect("reading kernel trends") as con:
            rows = con.execute(
                "SELECT k.op, k.shape, k.dtype, k.backend, k.device, k.median_us, r.run_id, r.timestamp_utc "
                f"FROM kernels k JOIN runs r ON r.run_id = k.run_id WHERE {where} "
                "ORDER BY k.op, k.shape, k.dtype, k.backend, k.device, r.timestamp_utc, r.rowid", args).fetchall()
        trends: dict[tuple, Trend] = {}
        for op_, shape, dtype, backend, device, median, run_id, ts in rows:
            shape_text = " ".join(f"{a}={b}" for a, b in json.loads(shape).items())
            t = trends.setdefault((op_, shape, dtype, backend, device),
                                  Trend(f"{op_} {shape_text} {dtype} {backend}", device, "median us", False))
            t.values.append(median)
            t.run_ids.append(run_id)
            t.timestamps.append(ts)
        return list(trends.values())

    def point_trends(self, gpu: str | None = None, model: str | None = None) -> list[Trend]:
        """Tokens/s per GPU per measured (model, GPU, batch, context, dtype, backend) across runs, oldest first."""
        where, args = self._filters(gpu, model)
        with self._connect("reading roll-up trends") as con:
            rows = con.execute(
                "SELECT p.model, p.gpu, p.batch, p.context, p.dtype, p.backend, p.tokens_per_s_per_gpu, r.run_id, "
                f"r.timestamp_utc, r.device FROM points p JOIN runs r ON r.run_id = p.run_id WHERE {where} "
                "AND p.provenance = 'measured' AND p.tokens_per_s_per_gpu IS NOT NULL "
                "ORDER BY p.model, p.gpu, p.batch, p.context, p.dtype, p.backend, r.timestamp_utc, r.rowid",
                args).fetchall()
        trends: dict[tuple, Trend] = {}
        for model_, gpu_, batch, context, dtype, backend, tps, run_id, ts, device in rows:
            t = trends.setdefault((model_, gpu_, batch, context, dtype, backend),
                                  Trend(f"{model_} batch {batch} context {context} {dtype} {backend}", device,
                                        "tokens/s per GPU", True))
            t.values.append(tps)
            t.run_ids.append(run_id)
            t.timestamps.append(ts)
        return list(trends.values())


def record_run(run: RunResult, path: str | Path | None = None, db: str | Path | None = None) -> bool:
    """Record `run` (read from `path`) in the history database `db` (default: default_db_path())."""
    return History(db).record_run(run, path)
