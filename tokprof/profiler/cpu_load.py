"""How much of the CPU other processes used while tokprof measured: a CPU run's analogue of the GPU's clocks.

A CPU figure is only a figure of the CPU as it was found. On 2 cores, a second busy process makes every parallel
torch op wait for a scheduler slice (medians jump from ~20 us to 4-16 ms), so a CPU run records the cores that other
processes kept busy over its window and says so when they competed. Linux only (/proc/stat); elsewhere unknown.

    meter = CpuLoad.start()
    ...                                  # measure
    load = meter.stop()                  # load.other_cores: mean cores busy outside this process (None: unknown)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROC_STAT = Path("/proc/stat")
# Mean cores of other processes above which a CPU run says that its figures were taken on a shared CPU.
CONTENDED_CORES = 0.25


def busy_cpu_s(stat: Path = PROC_STAT) -> float | None:
    """Seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal), or None off Linux."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuLoadResult:
    wall_s: float
    cores: int
    self_cores: float  # mean cores this process used
    other_cores: float | None  # mean cores busy outside this process; None where /proc/stat is unreadable

    @property
    def resolution_cores(self) -> float:
        """What /proc/stat's tick granularity allows over this window: two ticks (one at each end) over the wall
        time. A window of a few ms reads 0 or 10+ cores busy; its figure says nothing."""
        return 2.0 / os.sysconf("SC_CLK_TCK") / self.wall_s

    @property
    def contended(self) -> bool:
        return self.other_cores is not None and self.other_cores - self.resolution_cores >= CONTENDED_CORES

    def note(self) -> str:
        if self.other_cores is None:
            return "CPU load of other processes unknown (no /proc/stat)"
        text = (f"other processes kept {self.other_cores:.2f} of {self.cores} cores busy over the "
                f"{self.wall_s:.0f} s run (tokprof {self.self_cores:.2f})")
        if self.contended:
            text += ": the CPU was shared, so these CPU figures are slower and noisier than on an idle CPU"
        return text


    def to_dict(self) -> dict[str, Any]:
        return {"wall_s": self.wall_s, "cores": self.cores, "self_cores": self.self_cores,
                "other_cores": self.other_cores, "contended": self.contended}


def load_record(whole: CpuLoadResult, phases: dict[str, CpuLoadResult]) -> dict[str, Any]:
    """RunResult.cpu_load: the whole run's figures, each phase's (kernels, end to end, overhead...), and `contended`
    when the whole run or any phase was shared (a phase's figures are as unreliable as the run's)."""
    return {**whole.to_dict(), "contended": whole.contended or any(p.contended for p in phases.values()),
            "phases": {name: p.to_dict() for name, p in phases.items()}}


def describe_record(record: dict[str, Any] | None) -> str | None:
    """One line for a contended RunResult.cpu_load (None when it was not contended or is unknown)."""
    if not record or not record.get("contended"):
        return None
    parts = [f"{name} {p.get('other_cores'):.2f}" for name, p in (record.get("phases") or {}).items()
             if isinstance(p, dict) and isinstance(p.get("other_cores"), (int, float))]
    whole = record.get("other_cores")
    return (f"other processes kept {whole:.2f} of {record.get('cores')} cores busy" if isinstance(whole, (int, float))
            else "other processes competed for the cores") + (f" ({', '.join(parts)})" if parts else "")


@dataclass
class CpuLoad:
    wall0_s: float
    busy0_s: float | None
    self0_s: float

    @classmethod
    def start(cls) -> CpuLoad:
        return cls(time.perf_counter(), busy_cpu_s(), _self_cpu_s())

    def stop(self) -> CpuLoadResult:
        wall = max(time.perf_counter() - self.wall0_s, 1e-9)
        mine = _self_cpu_s() - self.self0_s
        busy1 = busy_cpu_s()
        other = None if self.busy0_s is None or busy1 is None else max(0.0, busy1 - self.busy0_s - mine) / wall
        return CpuLoadResult(wall_s=wall, cores=os.cpu_count() or 1, self_cores=mine / wall, other_cores=other)


def _self_cpu_s() -> float:
    t = os.times()  # this process and its waited-for children (the Triton and nvcc compilers run as children)
    return t.user + t.system + t.children_user + t.children_system
