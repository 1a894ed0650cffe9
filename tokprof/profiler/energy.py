"""Energy per kernel call from the NVML energy counter (docs/measurement.md, kernel energy, rules 1-5).

    meter = make_meter("cuda:0")                       # NVML counter; power sampling where the counter is missing
    idle_w = measure_idle_power(meter, seconds=1.0)    # once per run, a sleeping window as long as a kernel window
    ke = measure_kernel_energy(call, inputs, device="cuda:0", meter=meter, idle_power_w=idle_w)
    ke.total_j_per_call, ke.dynamic_j_per_call          # dynamic = total - idle power x time per call

    meter.begin_window("decode"); ...; energy = meter.end_window("decode")   # any block of work

Sources (energy_sources.py) sit behind one interface (`EnergySource`) and a factory (`make_source`): "nvml" reads
the board, "replay" reads a recorded trace of (timestamp_s, energy_mj[, power_mw, temperature_c]) readings as NVML
returned them, with an injected clock, so the tests drive windows through it deterministically without a GPU.

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

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokprof.profiler.energy_sources import (  # noqa: F401 - re-exported: the sources are part of this API
    TRACE_COLUMNS,
    TRACE_FORMAT,
    EnergySource,
    EnergyWarning,
    ManualClock,
    NvmlSource,
    Reading,
    ReplaySource,
    check_number,
    energy_not_asked,
    energy_status,
    load_trace,
    make_source,
    record_trace,
    save_trace,
)
from tokprof.profiler.schema import Energy, KernelEnergy
from tokprof.profiler.timing import CapturedGraph, as_device, capture_graph, check_graph_for, sync

CHUNK_S = 0.02  # back-to-back replays between two syncs in a kernel window (a sync costs ~10 us of idle GPU)


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

    def discard_window(self, name: str) -> None:
        """Forget open window `name` unread (the work inside it failed), so the name can be opened again."""
        if self._open.pop(name, None) is not None and self.method == "sampled":
            self.source.stop_sampling()

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
            if start.energy_mj is None or end.energy_mj is None:  # an NVML read that failed (None), never a number
                raise RuntimeError(f"energy window {name!r}: the NVML energy counter could not be read at its "
                                   f"{'start' if start.energy_mj is None else 'end'}; the window's energy is unknown")
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


# Idle power measured on a live board in this process: torch device -> (W, time.monotonic() of the measurement).
# `tokprof run` measures it once, before the kernel benchmarks, and its end-to-end part reuses it.
_IDLE_MEASURED: dict[str, tuple[float, float]] = {}


def recent_idle_power(device: torch.device | str | int, max_age_s: float = 900.0) -> float | None:
    """The idle power (W) measured on the NVML board of `device` in this process within `max_age_s`, else None."""
    found = _IDLE_MEASURED.get(str(as_device(device)))
    if found is None or time.monotonic() - found[1] > max_age_s:
        return None
    return found[0]


def measure_idle_power(meter: EnergyMeter, seconds: float = 1.0, settle_s: float = 0.0) -> float:
    """Idle power in W over a sleeping window of `seconds` (as long as a kernel window); stored on the meter.

    Measure it once per run, before the kernels and after the GPU has settled: `settle_s` of sleep first (a GPU
    just out of a GEMM draws more than idle power for a while).
    """
    check_number("seconds", seconds, positive=True)
    check_number("settle_s", settle_s)
    sync(meter.device)
    meter.source.sleep(settle_s)
    meter.begin_window("idle")
    meter.source.sleep(seconds)
    window = meter.close_window("idle")
    meter.idle_power_w = window.energy.avg_power_w
    if isinstance(meter.source, NvmlSource):  # a live board (a replayed trace is not this machine's idle power)
        _IDLE_MEASURED[str(meter.device)] = (meter.idle_power_w, time.monotonic())
    return meter.idle_power_w


def measure_kernel_energy(call: Callable[[Any], Any], inputs: Mapping[str, Any], *,
                          device: torch.device | str | int, meter: EnergyMeter, idle_power_w: float,
                          window_s: float = 1.0, cooldown_s: float = 0.5,
                          graph: CapturedGraph | None = None) -> KernelEnergy:
    """Energy per call of `call(inputs)`: back-to-back CUDA graph replays (rotating input copies, as in graph-mode
    timing) for >= `window_s`, sync, divide by the calls. A `cooldown_s` sleep first lets the GPU settle.
    `graph`: a graph already captured by `timing.capture_graph(call, inputs, rotate=True)` (e.g. for graph-mode
    timing), replayed instead of capturing another.

    total_j_per_call = (window energy - idle_power_w x idle tail) / calls
    dynamic_j_per_call = total_j_per_call - idle_power_w x busy time / calls
    On a CPU device the calls run eagerly: that is how replayed traces are driven in tests (the meter's clock
    is the trace's); a live CPU run has no meter (energy_status says why).
    """
    check_number("window_s", window_s, positive=True)
    check_number("cooldown_s", cooldown_s)
    check_number("idle_power_w", idle_power_w)
    device = as_device(device)
    if graph is not None:
        check_graph_for(graph, inputs, rotate=True)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _kernel_energy(call, inputs, device, meter, float(idle_power_w), window_s, cooldown_s, graph)


def _kernel_energy(call: Callable[[Any], Any], inputs: Mapping[str, Any], device: torch.device, meter: EnergyMeter,
                   idle_power_w: float, window_s: float, cooldown_s: float,
                   graph: CapturedGraph | None) -> KernelEnergy:
    call(inputs)  # compile and autotune before the graph is captured
    sync(device)
    if device.type == "cuda":
        if graph is None:
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
    try:
        while True:
            chunk()
            calls += calls_per_chunk
            sync(device)
            if meter.source.now() - begin.timestamp_s >= window_s:
                break
    except BaseException:
        meter.discard_window(label)  # a failed kernel (or Ctrl-C) leaves no window open, no sampler running
        raise
    window = meter.close_window(label)
    busy_s = window.busy_end_s - window.begin.timestamp_s
    busy_j = window.energy.energy_j - idle_power_w * window.tail_s
    total = busy_j / calls
    return KernelEnergy(total_j_per_call=total, dynamic_j_per_call=total - idle_power_w * busy_s / calls,
                        idle_power_w=idle_power_w, calls=calls, window_s=busy_s, method=window.energy.method,
                        temperature_c_start=window.begin.temperature_c, temperature_c_end=window.end.temperature_c)
