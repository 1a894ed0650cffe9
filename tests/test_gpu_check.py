"""scripts/gpu_check.sh in its dry mode on the CPU: every step's command runs (tiny sizes, --device cpu), so a typo
or a renamed option shows here and cannot waste the one GPU call. Also the script's packing: at most 8 files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["env", "install", "props", "timing", "nvml", "gputests", "e2e", "run"]


@pytest.mark.skipif(sys.platform != "linux", reason="the GPU machines run Linux; the script uses GNU tools")
def test_gpu_check_dry_run_runs_every_step_and_packs_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DRY": "1", "OUT": str(out), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "COLUMNS": "80"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for step in STEPS:
        assert re.search(rf"^{step} rc=0 seconds=\d+ limit=\d+", summary, re.M), (step, summary[:3000])
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # what one device call brings back
    assert {"summary.txt", "gpu-check.tgz", "props.json", "timing.json", "nvml.json", "e2e.json"} <= set(files)
    run_files = [f for f in files if f.startswith("run-")]
    assert len(run_files) == 1
    run = json.loads((out / run_files[0]).read_text())
    assert run["provenance"]["git_sha"], "the reference RunResult must carry the sha"
    timing = json.loads((out / "timing.json").read_text())
    assert timing["rows"] and all(r["methods"] and r["host_us_per_call"] > 0 for r in timing["rows"])
    assert "no energy counter" in json.loads((out / "nvml.json").read_text())["reason"]
