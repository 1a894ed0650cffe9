"""The shipped reference RunResults (tokprof/data/reference/<gpu>/*.json): real GPU runs with full provenance.

Each file must load under the current schema, come from the GPU its folder names, carry the command, versions, git
sha and timestamp that made it, hold no synthetic data, and feed the report, compare and the CPU run's projection.
With no reference committed yet (no GPU was lent to the sessions so far), every test here skips with that reason,
and a file committed later is checked the moment it lands.
"""

from __future__ import annotations

import pytest

from tokprof.profiler.schema import load_run
from tokprof.reports.compare import compare_runs
from tokprof.reports.render import render_report
from tokprof.rollup import project
from tokprof.runner import OTHER_GPUS, REFERENCE_DIR

FILES = sorted(REFERENCE_DIR.glob("*/*.json")) if REFERENCE_DIR.is_dir() else []
needs_files = pytest.mark.skipif(not FILES, reason=f"no reference RunResult committed under {REFERENCE_DIR} yet")
per_file = pytest.mark.parametrize("path", FILES or [None], ids=lambda p: f"{p.parent.name}/{p.name}" if p else "none")


@needs_files
@per_file
def test_reference_is_a_real_run_of_its_gpu_with_provenance(path):
    run = load_run(path)
    p = run.provenance
    assert p.device.kind == "cuda", f"{path}: a reference must come from a GPU, got a {p.device.kind} run"
    assert p.device.spec_key == path.parent.name, f"{path}: measured on {p.device.spec_key}, filed under another GPU"
    assert any("tokprof" in part for part in p.command), f"{path}: no tokprof command in {p.command}"
    assert p.git_sha and p.timestamp_utc and p.versions.get("torch") and p.versions.get("driver"), p
    assert not any("SYNTHETIC" in n for n in run.notes), f"{path}: a test fixture is not reference data"
    assert run.kernels and all(k.provenance == "measured" for k in run.kernels)
    assert run.ceilings is not None and run.model is not None


@needs_files
@per_file
def test_reference_feeds_report_compare_and_projection(path, tmp_path):
    run = load_run(path)
    report = render_report([path], tmp_path / "report")
    assert report.html.stat().st_size > 10_000 and report.figures
    same = compare_runs(run, run)
    assert same.exit_code == 0 and not same.counts()["SLOW"]
    for gpu in OTHER_GPUS:
        points = project(run, gpu)
        assert points and all(pt.provenance == "projected" for pt in points)
