"""Energy sources behind one interface: the NVML board counter and a replayed trace (for tests without a GPU).

    source = make_source("nvml", device="cuda:0")                         # the board: counter, power, temperature
    source = make_source("replay", trace="tests/data/nvml_energy_trace_h100.json", clock=ManualClock())

A trace holds (timestamp_s, energy_mj[, power_mw, temperature_c]) readings as NVML returned them; `record_trace`
writes one from a real board (`tokprof energy-trace`). The meter that turns readings into windows is in energy.py.
"""

from __future__ import annotations

import abc
import bisect
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokprof.profiler import nvml
from tokprof.profiler.schema import read_json, save_json_atomic
from tokprof.profiler.timing import as_device

TRACE_FORMAT = "tokprof-nvml-trace"
TRACE_COLUMNS = ("timestamp_s", "energy_mj", "power_mw", "temperature_c")


class EnergyWarning(UserWarning):
    """An energy window that could not be measured as asked (e.g. the counter did not move)."""


@dataclass(frozen=True)
class Reading:
    """One look at the board: the clock, the energy counter (mJ), power (mW) and temperature, None where unread."""

    timestamp_s: float
    energy_mj: float | None = None
    power_mw: float | None = None
    temperature_c: int | None = None


class ManualClock:
    """A clock that moves only when told: `clock()` reads it, `clock.sleep(s)` and `clock.advance(s)` move it."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = float(start_s)

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"seconds: expected >= 0, got {seconds!r}")
        self.now_s += seconds

    advance = sleep

    def set(self, now_s: float) -> None:
        self.now_s = float(now_s)


# ------------------------------------------------------------------------------------------------------ sources


def energy_not_asked(device: torch.device) -> str:
    """The reason of an energy figure that nobody asked for: a CPU cannot meter anyway, a GPU could have."""
    return energy_status(device) if device.type != "cuda" else "not asked for (pass energy=True, or --energy)"


def energy_status(device: torch.device | str | int) -> str | None:
    """None when energy can be measured on `device` (counter or power samples), else why not."""
    try:
        dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    except (RuntimeError, TypeError) as err:
        return f"device {device!r} is not a torch device ({err})"
    if dev.type != "cuda":
        return f"no energy counter on a {dev.type} (energy is metered on NVIDIA GPUs through NVML, never estimated)"
    if not torch.cuda.is_available():
        return f"CUDA is not available here (torch {torch.__version__}), so no GPU energy is measured"
    reason = nvml.nvml_status()
    if reason is not None:
        return reason
    handle = nvml.handle(dev)
    if handle is None:
        return f"NVML has no board matching {dev} (CUDA_VISIBLE_DEVICES={nvml.visible_devices()})"
    if nvml.query("nvmlDeviceGetTotalEnergyConsumption", handle) is None and \
            nvml.query("nvmlDeviceGetPowerUsage", handle) is None:
        return "this GPU reports neither the NVML energy counter nor its power draw"
    return None




def check_number(name: str, value: Any, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


class EnergySource(abc.ABC):
    """Where readings come from. `now()` and `sleep()` are the source's own clock, so replays run on virtual time."""

    kind: str = ""

    @abc.abstractmethod
    def now(self) -> float: ...

    @abc.abstractmethod
    def sleep(self, seconds: float) -> None: ...

    @abc.abstractmethod
    def read(self) -> Reading: ...

    @property
    @abc.abstractmethod
    def supports_counter(self) -> bool: ...

    @property
    @abc.abstractmethod
    def supports_power(self) -> bool: ...

    @abc.abstractmethod
    def start_sampling(self, period_s: float) -> None:
        """Begin collecting power samples (a thread on a live board; a replay holds them already)."""

    @abc.abstractmethod
    def stop_sampling(self) -> None:
        """Stop collecting power samples."""

    @abc.abstractmethod
    def samples_between(self, t0_s: float, t1_s: float) -> list[Reading]:
        """Power samples strictly inside (t0_s, t1_s), in time order."""


class NvmlSource(EnergySource):
    """The board behind a torch CUDA device, read through NVML; power sampled by a thread when asked."""

    kind = "nvml"

    def __init__(self, device: torch.device | str | int, *, clock: Callable[[], float] = time.perf_counter) -> None:
        reason = energy_status(device)
        if reason is not None:
            raise RuntimeError(f"no NVML energy source for {device}: {reason}")
        self.device = as_device(device)
        self.handle = nvml.handle(self.device)
        self._clock = clock
        self._counter = nvml.query("nvmlDeviceGetTotalEnergyConsumption", self.handle) is not None
        self._power = nvml.query("nvmlDeviceGetPowerUsage", self.handle) is not None
        self._samples: list[Reading] = []
        self._users = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def now(self) -> float:
        return self._clock()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    @property
    def supports_counter(self) -> bool:
        return self._counter

    @property
    def supports_power(self) -> bool:
        return self._power

    def read(self) -> Reading:
        energy = nvml.query("nvmlDeviceGetTotalEnergyConsumption", self.handle) if self._counter else None
        t = self._clock()  # taken next to the counter read: the pair is what the window subtracts
        power = nvml.query("nvmlDeviceGetPowerUsage", self.handle)
        temp = nvml.query("nvmlDeviceGetTemperature", self.handle, 0)  # 0 = NVML_TEMPERATURE_GPU
        return Reading(t, None if energy is None else float(energy), None if power is None else float(power),
                       None if temp is None else int(temp))

    def _run(self, period_s: float) -> None:
        while not self._stop.is_set():
            power = nvml.query("nvmlDeviceGetPowerUsage", self.handle)
            if power is not None:
                self._samples.append(Reading(self._clock(), power_mw=float(power)))
            self._stop.wait(period_s)

    def start_sampling(self, period_s: float) -> None:
        self._users += 1
        if self._thread is not None:
            return
        self._samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(period_s,), name="tokprof-power-sampler", daemon=True)
        self._thread.start()

    def stop_sampling(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def samples_between(self, t0_s: float, t1_s: float) -> list[Reading]:
        return [r for r in list(self._samples) if t0_s < r.timestamp_s < t1_s]


class ReplaySource(EnergySource):
    """Readings replayed from a recorded trace: `read()` at clock time t returns the last reading at or before t,
    as NVML returns the last update of its counter. The clock is injected (a ManualClock by default, starting at
    the first reading) and so is `sleep`, so tests run windows on virtual time.
    """

    kind = "replay"

    def __init__(self, readings: Sequence[Reading], *, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None, metadata: Mapping[str, Any] | None = None) -> None:
        _check_readings(readings, "readings")
        self.readings = list(readings)
        self.metadata = dict(metadata or {})
        self._times = [r.timestamp_s for r in self.readings]
        if clock is None:
            clock = ManualClock(self._times[0])
        self.clock = clock
        self._sleep = sleep if sleep is not None else getattr(clock, "sleep", time.sleep)

    @classmethod
    def from_file(cls, path: str | Path, *, clock: Callable[[], float] | None = None,
                  sleep: Callable[[float], None] | None = None) -> ReplaySource:
        readings, metadata = load_trace(path)
        return cls(readings, clock=clock, sleep=sleep, metadata=metadata)

    def now(self) -> float:
        return self.clock()

    def sleep(self, seconds: float) -> None:
        self._sleep(seconds)

    @property
    def supports_counter(self) -> bool:
        return all(r.energy_mj is not None for r in self.readings)

    @property
    def supports_power(self) -> bool:
        return all(r.power_mw is not None for r in self.readings)

    def read(self) -> Reading:
        t = self.clock()
        i = bisect.bisect_right(self._times, t) - 1
        if i < 0:
            raise RuntimeError(f"replay clock at {t:.6f} s is before the trace's first reading ({self._times[0]} s)")
        if t > self._times[-1]:
            raise RuntimeError(f"replay clock at {t:.6f} s is past the trace's last reading ({self._times[-1]} s)")
        r = self.readings[i]
        return Reading(t, r.energy_mj, r.power_mw, r.temperature_c)

    def start_sampling(self, period_s: float) -> None:
        """Nothing to start: the trace holds the power readings a sampling thread would have seen."""

    def stop_sampling(self) -> None:
        """Nothing to stop (see start_sampling)."""

    def samples_between(self, t0_s: float, t1_s: float) -> list[Reading]:
        lo = bisect.bisect_right(self._times, t0_s)
        hi = bisect.bisect_left(self._times, t1_s)
        return [r for r in self.readings[lo:hi] if r.power_mw is not None]


def make_source(kind: str, *, device: torch.device | str | int | None = None, trace: str | Path | None = None,
                clock: Callable[[], float] | None = None,
                sleep: Callable[[float], None] | None = None) -> EnergySource:
    """The factory: kind "nvml" (needs `device`) or "replay" (needs `trace`, a recorded trace file)."""
    if kind == "nvml":
        if device is None:
            raise ValueError("device: the nvml source needs a CUDA device such as 'cuda:0', got None")
        return NvmlSource(device, clock=clock or time.perf_counter)
    if kind == "replay":
        if trace is None:
            raise ValueError("trace: the replay source needs a recorded trace file, got None")
        return ReplaySource.from_file(trace, clock=clock, sleep=sleep)
    raise ValueError(f"kind: expected 'nvml' or 'replay', got {kind!r}")


# ------------------------------------------------------------------------------------------------- trace files


def _check_readings(readings: Sequence[Reading], where: str) -> None:
    if len(readings) < 2:
        raise ValueError(f"{where}: expected at least 2 readings, got {len(readings)}")
    for i in range(1, len(readings)):
        a, b = readings[i - 1], readings[i]
        if not b.timestamp_s > a.timestamp_s:
            raise ValueError(f"{where}[{i}]: timestamps must increase, got {b.timestamp_s} after {a.timestamp_s}")
        if a.energy_mj is not None and b.energy_mj is not None and b.energy_mj < a.energy_mj:
            raise ValueError(f"{where}[{i}]: the energy counter must not decrease, got {b.energy_mj} mJ after "
                             f"{a.energy_mj} mJ")


def load_trace(path: str | Path) -> tuple[list[Reading], dict[str, Any]]:
    """Read a trace file: {"format": "tokprof-nvml-trace", "columns": [...], "readings": [[...], ...], ...}."""
    path = Path(path)
    data = read_json(path, "trace")
    if not isinstance(data, dict) or data.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path}: expected a JSON object with format {TRACE_FORMAT!r}")
    columns = data.get("columns")
    if not isinstance(columns, list) or columns[:1] != ["timestamp_s"] or not set(columns) <= set(TRACE_COLUMNS):
        raise ValueError(f"{path}: columns: expected 'timestamp_s' first, then some of {list(TRACE_COLUMNS[1:])}, "
                         f"got {columns!r}")
    rows = data.get("readings")
    if not isinstance(rows, list):
        raise ValueError(f"{path}: readings: expected a list of rows, got {type(rows).__name__}")
    readings = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns) or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
                for v in row):
            raise ValueError(f"{path}: readings[{i}]: expected {len(columns)} numbers or nulls {columns}, got {row!r}")
        values = dict(zip(columns, row, strict=True))
        if values["timestamp_s"] is None:
            raise ValueError(f"{path}: readings[{i}]: timestamp_s is null")
        temp = values.get("temperature_c")
        readings.append(Reading(float(values["timestamp_s"]), values.get("energy_mj"), values.get("power_mw"),
                                None if temp is None else int(temp)))
    _check_readings(readings, f"{path}: readings")
    return readings, dict(data.get("metadata") or {})


def save_trace(readings: Sequence[Reading], path: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Write a trace file that `load_trace` and `ReplaySource.from_file` read (atomically)."""
    _check_readings(readings, "readings")
    rows = [[r.timestamp_s, r.energy_mj, r.power_mw, r.temperature_c] for r in readings]
    return save_json_atomic({"format": TRACE_FORMAT, "version": 1, "metadata": dict(metadata),
                             "columns": list(TRACE_COLUMNS), "readings": rows}, path)


def record_trace(source: EnergySource, duration_s: float, *, poll_s: float = 0.002,
                 workload: Callable[[], None] | None = None) -> list[Reading]:
    """Poll `source` for `duration_s`; keep the readings where the counter or the power changed (the updates).

    With `workload` (a live source only), polling runs in a thread while `workload()` runs here, e.g. idle, then a
    GEMM loop, then idle: `tokprof energy-trace` records a hardware trace to replace the synthetic one in tests.
    """
    check_number("duration_s", duration_s, positive=True)
    out = [source.read()]

    def poll() -> None:
        now_s = out[0].timestamp_s
        while now_s - out[0].timestamp_s < duration_s:
            source.sleep(poll_s)
            r = source.read()
            now_s = r.timestamp_s
            if (r.energy_mj, r.power_mw) != (out[-1].energy_mj, out[-1].power_mw):
                out.append(r)

    if workload is None:
        poll()
        return out
    poller = threading.Thread(target=poll, name="tokprof-trace-recorder", daemon=True)
    poller.start()
    workload()
    poller.join()
    return out


def trace_summary(readings: Sequence[Reading], phases_s: Mapping[str, Sequence[float]] | None = None
                  ) -> dict[str, Any]:
    """What a recorded trace says about the board's meters (first contact with a GPU):

    - `counter_update_s`: median time between changes of the energy counter (its update interval: one kernel call
      is invisible below it, so energy windows must span many updates);
    - per phase (idle before, busy, idle after, when `phases_s` names them as `tokprof energy-trace` does): mean
      power from the counter (energy difference / time) beside the mean of the sampled power readings, whose ratio
      says how far a power-sampling fallback is off on this board.
    """
    _check_readings(readings, "readings")
    changes = [r.timestamp_s for a, r in zip(readings, readings[1:], strict=False)
               if a.energy_mj is not None and r.energy_mj is not None and r.energy_mj != a.energy_mj]
    gaps = sorted(b - a for a, b in zip(changes, changes[1:], strict=False))
    out: dict[str, Any] = {"readings": len(readings), "duration_s": readings[-1].timestamp_s - readings[0].timestamp_s,
                           "counter_updates": len(changes),
                           "counter_update_s": gaps[len(gaps) // 2] if gaps else None, "phases": {}}
    for name, (t0, t1) in (phases_s or {"all": (readings[0].timestamp_s, readings[-1].timestamp_s)}).items():
        inside = [r for r in readings if t0 <= r.timestamp_s <= t1]
        with_energy = [r for r in inside if r.energy_mj is not None]
        counter_w = None
        if len(with_energy) >= 2 and with_energy[-1].timestamp_s > with_energy[0].timestamp_s:
            counter_w = ((with_energy[-1].energy_mj - with_energy[0].energy_mj) / 1000.0
                         / (with_energy[-1].timestamp_s - with_energy[0].timestamp_s))
        powers = [r.power_mw / 1000.0 for r in inside if r.power_mw is not None]
        sampled_w = sum(powers) / len(powers) if powers else None
        temps = [r.temperature_c for r in inside if r.temperature_c is not None]
        out["phases"][name] = {
            "counter_w": counter_w, "sampled_w": sampled_w,
            "sampled_over_counter": sampled_w / counter_w if counter_w and sampled_w is not None else None,
            "temperature_c": [temps[0], temps[-1]] if temps else None}
    return out
