"""Energy per kernel call from the NVML energy counter (MEASUREMENT.md, kernel energy, rules 1-5).

    meter = make_meter("cuda:0")                       # NVML counter; power sampling where the counter is missing
    idle_w = measure_idle_power(meter, seconds=1.0)    # once per run, a sleeping window as long as a kernel window
    ke = measure_kernel_energy(call, inputs, device="cuda:0", meter=meter, idle_power_w=idle_w)
    ke.total_j_per_call, ke.dynamic_j_per_call          # dynamic = total - idle power x time per call

    meter.begin_window("decode"); ...; energy = meter.end_window("decode")   # any block of work

Sources sit behind one interface (`EnergySource`) and a factory (`make_source`): "nvml" reads the board, "replay"
reads a recorded trace of (timestamp_s, energy_mj[, power_mw, temperature_c]) readings as NVML returned them, with an
injected clock, so the tests drive windows through it deterministically on a machine without a GPU.

Why the meter works as it does:
- The counter (nvmlDeviceGetTotalEnergyConsumption, mJ since driver load) updates only every ~10-100 ms, so one
  call is invisible: a kernel window replays its CUDA graph back to back for >= 1 s, then divides by the calls.
- A reading taken at an arbitrary instant is up to one update stale, an error of up to ~10% at 1 s. With
  `align_to_updates` (default) a window starts and ends on counter updates: after the device sync the meter polls
  until the counter moves. The wait at the end is idle time, which `measure_kernel_energy` takes off using the
  measured idle power.
- A counter that did not move over a window is never reported as 0 J: an EnergyWarning, then the power readings
  integrated (method "sampled"), or a RuntimeError where there are none.
- Power samples (nvmlDeviceGetPowerUsage) are a ~1 s average on A100/H100: a fallback only, marked "sampled".
"""

from __future__ import annotations

import abc
import bisect
import contextlib
import json
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokprof.profiler import nvml
from tokprof.profiler.schema import Energy, KernelEnergy, save_json_atomic
from tokprof.profiler.timing import as_device, capture_graph, sync

TRACE_FORMAT = "tokprof-nvml-trace"
TRACE_COLUMNS = ("timestamp_s", "energy_mj", "power_mw", "temperature_c")
CHUNK_S = 0.02  # back-to-back replays between two syncs in a kernel window (a sync costs ~10 us of idle GPU)


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
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the trace ({err})") from err
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
    _check_number("duration_s", duration_s, positive=True)
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


# -------------------------------------------------------------------------------------------------------- meter


def trapezoid_j(points: Sequence[tuple[float, float]]) -> float:
    """Energy in J of (time_s, power_w) points by the trapezoid rule; points must be in time order."""
    if len(points) < 2:
        raise ValueError(f"points: expected at least 2 (time_s, power_w) points, got {len(points)}")
    total = 0.0
    for (t0, p0), (t1, p1) in zip(points, points[1:], strict=False):
        if t1 < t0:
            raise ValueError(f"points: expected time order, got {t1} s after {t0} s")
        total += 0.5 * (p0 + p1) * (t1 - t0)
    return total


@dataclass
class Window:
    """A closed window: its Energy and the readings at both ends."""

    name: str
    energy: Energy
    begin: Reading
    end: Reading
    busy_end_s: float  # the clock right after the closing sync, before waiting for the counter's next update

    @property
    def tail_s(self) -> float:
        """Idle time at the end of the window spent waiting for the counter to update."""
        return max(0.0, self.end.timestamp_s - self.busy_end_s)


class EnergyMeter:
    """`begin_window(name)` / `end_window(name) -> Energy`, syncing the device at both ends.

    EnergyMeter("cuda:0") reads that GPU through NVML (RuntimeError with the reason where it cannot);
    EnergyMeter(source, device=...) reads any EnergySource (a ReplaySource in tests) and syncs `device`.
    method: "counter" (NVML total energy), "sampled" (power samples, trapezoid), or "auto" (counter where supported).
    Several windows may be open at once under different names.
    """

    def __init__(self, source: EnergySource | torch.device | str | int, *,
                 device: torch.device | str | int | None = None, method: str = "auto",
                 align_to_updates: bool = True, update_timeout_s: float = 0.5, poll_s: float = 0.002,
                 sample_period_s: float = 0.02) -> None:
        if not isinstance(source, EnergySource):
            if device is None:
                device = source
            source = NvmlSource(source)
        if device is None:
            device = source.device if isinstance(source, NvmlSource) else "cpu"
        if method not in ("auto", "counter", "sampled"):
            raise ValueError(f"method: expected 'auto', 'counter' or 'sampled', got {method!r}")
        if method == "auto":
            method = "counter" if source.supports_counter else "sampled"
        if method == "counter" and not source.supports_counter:
            raise RuntimeError("method='counter': this source has no energy counter; use method='sampled'")
        if method == "sampled" and not source.supports_power:
            raise RuntimeError("method='sampled': this source reports no power; energy cannot be measured here")
        for name, value in (("update_timeout_s", update_timeout_s), ("poll_s", poll_s),
                            ("sample_period_s", sample_period_s)):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")
        self.source = source
        self.device = as_device(device)
        self.method = method
        self.align_to_updates = align_to_updates
        self.update_timeout_s = update_timeout_s
        self.poll_s = poll_s
        self.sample_period_s = sample_period_s
        self.idle_power_w: float | None = None  # set by measure_idle_power
        self.last_window: Window | None = None
        self._open: dict[str, Reading] = {}

    def _next_update(self, reading: Reading) -> Reading:
        """Poll until the counter moves past `reading` (or the timeout passes); the first changed reading."""
        while True:
            self.source.sleep(self.poll_s)
            latest = self.source.read()
            if latest.energy_mj != reading.energy_mj or \
                    latest.timestamp_s - reading.timestamp_s >= self.update_timeout_s:
                return latest

    def begin_window(self, name: str) -> Reading:
        """Open window `name` (sync first); returns the reading it starts from."""
        if name in self._open:
            raise ValueError(f"name: an energy window {name!r} is already open")
        sync(self.device)
        start = self.source.read()
        if self.method == "counter" and self.align_to_updates:
            start = self._next_update(start)
        if self.method == "sampled":
            self.source.start_sampling(self.sample_period_s)
        self._open[name] = start
        return start

    def end_window(self, name: str) -> Energy:
        """Close window `name` (sync first) and return its Energy."""
        return self.close_window(name).energy

    def close_window(self, name: str) -> Window:
        """Close window `name`; the Window also holds both end readings (temperature) and the idle tail."""
        if name not in self._open:
            raise ValueError(f"name: no open energy window {name!r} (open: {sorted(self._open)})")
        start = self._open.pop(name)
        sync(self.device)
        busy_end_s = self.source.now()
        end = self.source.read()
        if self.method == "counter" and self.align_to_updates:
            end = self._next_update(end)
        if self.method == "sampled":
            self.source.stop_sampling()
        time_s = end.timestamp_s - start.timestamp_s
        if not time_s > 0:
            raise RuntimeError(f"energy window {name!r}: no time passed between its readings ({time_s} s)")
        if self.method == "counter":
            delta_mj = end.energy_mj - start.energy_mj
            if delta_mj < 0:
                raise RuntimeError(f"energy window {name!r}: the NVML counter went backwards ({delta_mj} mJ): was the "
                                   "driver reloaded? Measure the window again")
            if delta_mj > 0:
                joules = delta_mj / 1000.0
                window = Window(name, Energy(joules, time_s, joules / time_s, "counter"), start, end, busy_end_s)
                self.last_window = window
                return window
            warnings.warn(EnergyWarning(
                f"energy window {name!r}: the NVML energy counter did not move over {time_s:.3f} s (it updates "
                "every ~10-100 ms; windows should last >= 1 s); not reporting 0 J: integrating power readings "
                "instead (method 'sampled')"), stacklevel=2)
        points = [(r.timestamp_s, r.power_mw / 1000.0)
                  for r in [start, *self.source.samples_between(start.timestamp_s, end.timestamp_s), end]
                  if r.power_mw is not None]
        if len(points) < 2:
            raise RuntimeError(f"energy window {name!r}: no energy counter movement and fewer than 2 power readings "
                               f"over {time_s:.3f} s: the window's energy is unknown")
        joules = trapezoid_j(points)
        window = Window(name, Energy(joules, time_s, joules / time_s, "sampled"), start, end, busy_end_s)
        self.last_window = window
        return window


def energy_status(device: torch.device | str | int) -> str | None:
    """None when energy can be measured on `device` (counter or power samples), else why not."""
    try:
        dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    except (RuntimeError, TypeError) as err:
        return f"device {device!r} is not a torch device ({err})"
    if dev.type != "cuda":
        return (f"energy is measured on NVIDIA GPUs through NVML; this is a {dev.type} run, so energy is None "
                "(never estimated)")
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


def make_meter(device: torch.device | str | int, *, method: str = "auto", trace: str | Path | None = None,
               clock: Callable[[], float] | None = None, **meter_kwargs: Any) -> EnergyMeter:
    """An EnergyMeter on the NVML board of `device`, or on a recorded `trace` (then the device only syncs).

    RuntimeError with the reason (energy_status) where there is no NVML: callers record energy None and the reason.
    """
    if trace is not None:
        return EnergyMeter(make_source("replay", trace=trace, clock=clock), device=device, method=method,
                           **meter_kwargs)
    return EnergyMeter(make_source("nvml", device=device, clock=clock), device=device, method=method, **meter_kwargs)


# ---------------------------------------------------------------------------------------------- kernel energy


def measure_idle_power(meter: EnergyMeter, seconds: float = 1.0) -> float:
    """Idle power in W over a sleeping window of `seconds` (as long as a kernel window); stored on the meter.

    Measure it once per run, before the kernels and after the GPU has settled.
    """
    _check_number("seconds", seconds, positive=True)
    meter.begin_window("idle")
    meter.source.sleep(seconds)
    window = meter.close_window("idle")
    meter.idle_power_w = window.energy.avg_power_w
    return meter.idle_power_w


def measure_kernel_energy(call: Callable[[Any], Any], inputs: Mapping[str, Any], *,
                          device: torch.device | str | int, meter: EnergyMeter, idle_power_w: float,
                          window_s: float = 1.0, cooldown_s: float = 0.5) -> KernelEnergy:
    """Energy per call of `call(inputs)`: back-to-back CUDA graph replays (rotating input copies, as in graph-mode
    timing) for >= `window_s`, sync, divide by the calls. A `cooldown_s` sleep first lets the GPU settle.

    total_j_per_call = (window energy - idle_power_w x idle tail) / calls
    dynamic_j_per_call = total_j_per_call - idle_power_w x busy time / calls
    On a CPU device the calls run eagerly: that is how replayed traces are driven in tests (the meter's clock
    is the trace's); a live CPU run has no meter (energy_status says why).
    """
    _check_number("window_s", window_s, positive=True)
    _check_number("cooldown_s", cooldown_s)
    _check_number("idle_power_w", idle_power_w)
    device = as_device(device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _kernel_energy(call, inputs, device, meter, float(idle_power_w), window_s, cooldown_s)


def _check_number(name: str, value: Any, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def _kernel_energy(call: Callable[[Any], Any], inputs: Mapping[str, Any], device: torch.device, meter: EnergyMeter,
                   idle_power_w: float, window_s: float, cooldown_s: float) -> KernelEnergy:
    call(inputs)  # compile and autotune before the graph is captured
    sync(device)
    if device.type == "cuda":
        graph = capture_graph(call, inputs, device=device, rotate=True)
        graph.replay()  # the first replay uploads the graph; time the second
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        sync(device)
        replays = max(1, math.ceil(CHUNK_S * 1000.0 / max(start.elapsed_time(end), 1e-3)))
        calls_per_chunk = replays * graph.calls_per_replay

        def chunk() -> None:
            for _ in range(replays):
                graph.replay()
    else:
        calls_per_chunk = 1

        def chunk() -> None:
            call(inputs)

    meter.source.sleep(cooldown_s)  # a hot GPU leaks more power and biases the next window (rule 4)
    label = f"kernel-{id(call):x}"
    begin = meter.begin_window(label)
    calls = 0
    while True:
        chunk()
        calls += calls_per_chunk
        sync(device)
        if meter.source.now() - begin.timestamp_s >= window_s:
            break
    window = meter.close_window(label)
    busy_s = window.busy_end_s - window.begin.timestamp_s
    busy_j = window.energy.energy_j - idle_power_w * window.tail_s
    total = busy_j / calls
    return KernelEnergy(total_j_per_call=total, dynamic_j_per_call=total - idle_power_w * busy_s / calls,
                        idle_power_w=idle_power_w, calls=calls, window_s=busy_s, method=window.energy.method,
                        temperature_c_start=window.begin.temperature_c, temperature_c_end=window.end.temperature_c)
