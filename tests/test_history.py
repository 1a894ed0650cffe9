"""Run history (SQLite): round trip, idempotence, trends, concurrent writers, a killed writer, corrupt files."""

from __future__ import annotations

import copy
import json
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokprof.cli import app
from tokprof.profiler.schema import RunResult, load_run, run_from_dict
from tokprof.reports.history import History, HistoryDatabaseError, default_db_path, sparkline

DATA = Path(__file__).resolve().parent / "data"
H100, H200 = DATA / "run_h100.json", DATA / "run_h200.json"


@pytest.fixture(scope="module")
def h100() -> RunResult:
    return load_run(H100)


def small_run_dict(run: RunResult, run_id: str, kernels: int = 3) -> dict:
    """A light copy of `run` (a few kernels, one roll-up point) under a new run_id, as a JSON-ready dict."""
    data = run.to_dict()
    data.update(run_id=run_id, kernels=data["kernels"][:kernels], rollup=data["rollup"][:1], e2e=[],
                reconciliation=[])
    return data


def integrity(path: Path) -> str:
    con = sqlite3.connect(path)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def test_round_trip_and_idempotent_reinsert(tmp_path, h100):
    hist = History(tmp_path / "h.db")
    h200 = load_run(H200)
    assert hist.record_run(h100, H100) is True
    assert hist.record_run(h200, H200) is True
    assert hist.record_run(h100, H100) is False  # same run_id: nothing added
    runs = hist.runs()
    assert [r.run_id for r in runs] == ["fixture-h100-0001", "fixture-h200-0001"]  # oldest first
    assert (runs[0].kernels, runs[0].points) == (len(h100.kernels), len(h100.rollup))
    assert runs[0].device == "NVIDIA H100 80GB HBM3" and runs[0].model == "llama-3.1-8b"
    assert runs[0].source == str(H100.resolve())
    assert hist.load("fixture-h100-0001").to_dict() == h100.to_dict()
    assert [rid for rid, _, _ in hist.runs_for_device("NVIDIA H200")] == ["fixture-h200-0001"]
    assert [r.run_id for r in hist.runs(gpu="h200")] == ["fixture-h200-0001"]
    assert [r.run_id for r in hist.runs(gpu="H100-SXM")] == ["fixture-h100-0001"]  # spec key matches too
    assert hist.runs(model="qwen") == []
    con = sqlite3.connect(hist.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT count(*) FROM kernels").fetchone()[0] == len(h100.kernels) + len(h200.kernels)
    con.close()
    with pytest.raises(ValueError, match="no run 'nope'"):
        hist.load("nope")


def test_run_without_id_gets_a_stable_one(tmp_path, h100):
    run = run_from_dict(small_run_dict(h100, ""))
    hist = History(tmp_path / "h.db")
    assert hist.record_run(run) is True
    assert hist.record_run(copy.deepcopy(run)) is False
    (row,) = hist.runs()
    assert row.run_id.startswith("sha256-")


def test_trends_show_change_and_sparkline(tmp_path, h100):
    hist = History(tmp_path / "h.db")
    first = run_from_dict(small_run_dict(h100, "first"))
    second = run_from_dict(small_run_dict(h100, "second"))
    second.provenance.timestamp_utc = "2026-03-01T00:00:00Z"
    second.kernels[2].timing.median_us *= 1.10  # rms_norm T=1 H=4096 residual=1
    second.rollup[0]["tokens_per_s_per_gpu"] *= 0.5
    hist.record_run(second)  # recorded first, but newer: trends follow the run's timestamp
    hist.record_run(first)
    (trend,) = [t for t in hist.kernel_trends(op="rms_norm") if "residual=1" in t.item]
    assert trend.run_ids == ["first", "second"]
    assert trend.delta_vs_previous == pytest.approx(0.10)
    assert trend.best == trend.values[0] and trend.delta_vs_best == pytest.approx(0.10)
    assert trend.spark == "▁█"
    (points,) = hist.point_trends(model="llama")
    assert points.higher_is_better and points.delta_vs_previous == pytest.approx(-0.5)
    assert sparkline([1.0, 2.0, 3.0, 4.0]) == "▁▃▆█"  # round((v - lo) / (hi - lo) * 7)
    assert sparkline([2.0, 2.0]) == "▄▄"


def _writer(db: str, payloads: list[str]) -> None:
    hist = History(db)
    for text in payloads:
        hist.record_run(run_from_dict(json.loads(text)))


def test_concurrent_writers_lose_nothing(tmp_path, h100):
    db = tmp_path / "h.db"
    shared = json.dumps(small_run_dict(h100, "shared"))
    jobs = [[json.dumps(small_run_dict(h100, f"p{p}-r{i}")) for i in range(4)] + [shared] for p in range(4)]
    ctx = multiprocessing.get_context("spawn")  # children never inherit the parent's torch threads
    procs = [ctx.Process(target=_writer, args=(str(db), job)) for job in jobs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    runs = History(db).runs()
    assert sorted(r.run_id for r in runs) == sorted([f"p{p}-r{i}" for p in range(4) for i in range(4)] + ["shared"])
    assert all(r.kernels == 3 and r.points == 1 for r in runs)
    assert integrity(db) == "ok"


def _killed_writer(db: str, payload: str, ready) -> None:
    hist = History(db)
    run = run_from_dict(json.loads(payload))
    with hist._connect("test: a write that never commits", write=True) as con:
        con.execute("INSERT INTO runs (run_id, timestamp_utc, recorded_utc, device, device_kind, run_json) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (run.run_id, "t", "t", "d", "cuda", payload))
        ready.set()
        multiprocessing.Event().wait(60)  # killed here, inside the open transaction


def test_killed_writer_leaves_a_usable_database(tmp_path, h100):
    db = tmp_path / "h.db"
    hist = History(db)
    hist.record_run(run_from_dict(small_run_dict(h100, "before")))
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_killed_writer, args=(str(db), json.dumps(small_run_dict(h100, "killed")), ready))
    proc.start()
    assert ready.wait(60), "the writer never reached its open transaction"
    proc.kill()
    proc.join(timeout=30)
    assert [r.run_id for r in hist.runs()] == ["before"]
    assert hist.record_run(run_from_dict(small_run_dict(h100, "after"))) is True
    assert [r.run_id for r in hist.runs()] == ["before", "after"]
    assert integrity(db) == "ok"


@pytest.mark.parametrize("content", [b"this is not a database at all\n" * 50,
                                     b"SQLite format 3\x00" + bytes(range(256)) * 40])
def test_corrupt_file_is_reported_clearly(tmp_path, h100, content):
    db = tmp_path / "h.db"
    db.write_bytes(content)
    with pytest.raises(HistoryDatabaseError) as info:
        History(db).runs()
    assert str(db) in str(info.value) and "move it aside" in str(info.value)
    with pytest.raises(HistoryDatabaseError, match="move it aside"):
        History(db).record_run(h100)
    assert db.read_bytes() == content  # never "repaired" behind the user's back
    result = CliRunner().invoke(app, ["history", "--db", str(db)])
    assert result.exit_code == 2
    assert "h.db" in result.output


def test_another_programs_database_is_refused(tmp_path, h100):
    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE things (x)")
    con.commit()
    con.close()
    with pytest.raises(HistoryDatabaseError, match="another program"):
        History(db).record_run(h100)


def test_default_path_follows_env(monkeypatch, tmp_path):
    monkeypatch.delenv("TOKPROF_HISTORY_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "tokprof" / "history.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / ".local" / "share" / "tokprof" / "history.db"
    monkeypatch.setenv("TOKPROF_HISTORY_DB", str(tmp_path / "x.db"))
    assert default_db_path() == tmp_path / "x.db"
    assert History().path == tmp_path / "x.db"


def test_cli_history_lists_runs_and_trends(tmp_path):
    db = tmp_path / "h.db"
    runner = CliRunner()
    result = runner.invoke(app, ["history", "--db", str(db)])
    assert result.exit_code == 0 and "no history yet" in result.output
    result = runner.invoke(app, ["history", "--db", str(db), "--record", str(H100), "--record", str(H200),
                                 "--op", "swiglu"])
    assert result.exit_code == 0, result.output
    assert "recorded:" in result.output and "fixture-h100-0001" in result.output
    assert "fixture-h200-0001" in result.output and "kernel trends: swiglu" in result.output
    result = runner.invoke(app, ["history", "--db", str(db), "--gpu", "h200"])
    assert "fixture-h200-0001" in result.output and "fixture-h100-0001" not in result.output
