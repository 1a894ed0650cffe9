"""The CPU-load meter of CPU runs: /proc/stat parsing, other processes' cores, the note."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tokprof.profiler.cpu_load import CpuLoad, CpuLoadResult, busy_cpu_s

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")


def test_busy_seconds_parse_the_aggregate_line(tmp_path):
    stat = tmp_path / "stat"
    tick = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice: idle and iowait are not busy
    stat.write_text(f"cpu  {tick} {tick} {tick} {100 * tick} {7 * tick} {tick} {tick} {tick} 0 0\ncpu0 1 2 3\n")
    assert busy_cpu_s(stat) == pytest.approx(6.0)
    stat.write_text("intr 1 2 3\n")
    assert busy_cpu_s(stat) is None
    assert busy_cpu_s(tmp_path / "missing") is None


def test_note_says_when_the_cpu_was_shared():
    idle = CpuLoadResult(wall_s=30.0, cores=2, self_cores=1.9, other_cores=0.02)
    assert not idle.contended and "0.02 of 2 cores" in idle.note() and "shared" not in idle.note()
    busy = CpuLoadResult(wall_s=30.0, cores=2, self_cores=1.1, other_cores=0.9)
    assert busy.contended and "the CPU was shared" in busy.note()
    unknown = CpuLoadResult(wall_s=30.0, cores=2, self_cores=1.0, other_cores=None)
    assert not unknown.contended and "unknown" in unknown.note()
    # A phase of a few ms (a cached ceiling): one tick of another process reads as 12 cores, within the resolution.
    blink = CpuLoadResult(wall_s=0.0015, cores=2, self_cores=0.0, other_cores=12.34)
    assert blink.resolution_cores > 12.34 and not blink.contended
    assert CpuLoadResult(wall_s=2.0, cores=2, self_cores=1.0, other_cores=0.9).contended


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@linux_only
def test_a_busy_process_that_is_not_ours_counts_as_other_cores():
    meter = CpuLoad.start()
    # A spinning process we have not waited for: its CPU time is not in our os.times() (children count once they
    # are reaped, as the Triton and nvcc compilers are: those are ours).
    proc = subprocess.Popen([sys.executable, "-c", "import time\nend = time.perf_counter() + 0.6\n"
                             "while time.perf_counter() < end: pass"])
    time.sleep(1.0)  # the parent sleeps: its own CPU time stays near zero
    result = meter.stop()
    proc.wait()
    assert result.self_cores < 0.2
    assert result.other_cores is not None and result.other_cores > 0.3, result


@linux_only
def test_own_work_is_not_counted_as_other():
    meter = CpuLoad.start()
    _spin(0.5)
    result = meter.stop()
    assert result.self_cores > 0.5
    # Ours and the others' together cannot exceed the machine: our spinning is not counted twice (a busy neighbour
    # may still fill the other cores).
    assert result.other_cores is not None and result.other_cores + result.self_cores <= result.cores + 0.1
