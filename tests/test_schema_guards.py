"""RunResult files that cannot lie or escape: NaN/infinity refused at save and load, free-form sections type-checked,
exclusive saves, stale temporary files of killed saves removed, file names from fields sanitised."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokprof.cli import app
from tokprof.profiler.schema import (
    STALE_TMP_S,
    file_part,
    load_run,
    remove_stale_tmp,
    save_json_atomic,
    save_run,
)

DATA = Path(__file__).resolve().parent / "data"
H100 = DATA / "run_h100.json"


def test_nan_and_infinity_are_refused_at_save_naming_the_field(tmp_path):
    run = load_run(H100)
    run.kernels[3].timing.median_us = float("nan")
    with pytest.raises(ValueError, match=r"RunResult\.kernels\[3\]\.timing\.median_us = nan: expected a finite"):
        save_run(run, tmp_path / "r.json")
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file
    run = load_run(H100)
    run.rollup[0]["step_time_us"] = float("inf")
    with pytest.raises(ValueError, match=r"rollup\[0\]\.step_time_us = inf"):
        save_run(run, tmp_path / "r.json")
    with pytest.raises(ValueError, match=r"x\.json\.a\[1\] = -inf"):
        save_json_atomic({"a": [1.0, float("-inf")]}, tmp_path / "x.json")


def test_nan_and_infinity_are_refused_at_load_naming_the_field(tmp_path):
    data = json.loads(H100.read_text())
    for literal, field in (("NaN", "median_us"), ("Infinity", "p90_us"), ("1e999", "noise")):
        text = json.dumps(data).replace(f'"{field}": {data["kernels"][0]["timing"][field]}',
                                        f'"{field}": {literal}', 1)
        path = tmp_path / f"{literal}.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"kernels\[0\]\.timing\.{field} = .*expected a finite number"):
            load_run(path)
    # compare refuses it as bad input (exit 2), it never says FAST or raises
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "NaN.json"), str(tmp_path / "NaN.json")])
    assert result.exit_code == 2 and "finite" in result.output


def test_free_form_sections_are_type_checked_at_load(tmp_path):
    data = json.loads(H100.read_text())
    data["reconciliation"][0]["batch"] = "1/../../escaped/dir/PWN"
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"reconciliation\[0\]\.batch: expected an integer, got str"):
        load_run(path)
    data = json.loads(H100.read_text())
    data["rollup"][0]["ops"][0]["total_us"] = "12"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"rollup\[0\]\.ops\[0\]\.total_us: expected a number"):
        load_run(path)
    data = json.loads(H100.read_text())
    data["e2e"][0]["model"] = ["tiny"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"e2e\[0\]\.model: expected a string"):
        load_run(path)


def test_report_never_writes_outside_its_folder(tmp_path):
    # Even a run that reaches the renderer with a hostile field cannot name a file outside -o: parts are sanitised.
    assert file_part("1/../../escaped/dir/PWN") == "1-escaped-dir-PWN"
    assert file_part("../..") == "x" and file_part("a b[/]") == "a-b"
    assert "/" not in file_part("/" * 100) and len(file_part("y" * 500)) == 64


def test_exclusive_save_never_replaces_another_file(tmp_path):
    path = save_json_atomic({"a": 1}, tmp_path / "run.json", exclusive=True)
    with pytest.raises(FileExistsError):
        save_json_atomic({"a": 2}, path, exclusive=True)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left behind


def test_stale_temporary_files_of_killed_saves_are_removed(tmp_path):
    stale = tmp_path / ".run-tiny-cpu-1.json.abc123.tmp"
    fresh = tmp_path / ".run-tiny-cpu-2.json.def456.tmp"  # a save in progress in another process
    other = tmp_path / ".notes.tmp"  # not one of ours
    for p in (stale, fresh, other):
        p.write_text("{")
    old = time.time() - STALE_TMP_S - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    assert remove_stale_tmp(tmp_path) == [stale]
    save_json_atomic({"a": 1}, tmp_path / "x.json")  # every save cleans its folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, other.name, "x.json"])


def test_a_failing_write_leaves_no_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        save_json_atomic({"a": 1}, tmp_path / "run.json")
    assert list(tmp_path.iterdir()) == []
