"""Kernel time, measured the way docs/measurement.md says (kernel time, rules 1-7).

    timing = measure(lambda kw: op.run(kw, "triton"), inputs, device="cuda:0")                # CUDA events
    timing = measure(lambda kw: op.run(kw, "triton"), inputs, device="cuda:0", mode="graph")  # CUDA graph
    timing = measure(lambda kw: op.run(kw, "torch"), inputs, device="cpu")                    # perf_counter_ns

`call(inputs)` runs the kernel once on the tensors of `inputs` (the op's keyword arguments). Every mode:

1. compile and autotune first (one call, then a device-wide sync), then warm up for `warmup_ms` (~25 ms);
2. events mode: before each timed call, flush a buffer of 2x the device's L2 (cold L2; by reading it, so no dirty
   lines are left for the timed kernel to write back), then queue a sleep kernel that outlasts the host's work for
   the call (its checks, allocations and launches: `host_us_per_call`), then time the call with a pair of CUDA
   events: the start event fires after the whole call is queued, so the events time GPU work only;
3. graph mode: no flush; clone the inputs into ceil(5 * L2 / bytes touched per call) + 1 copies (at most
   MAX_ROTATION_COPIES, and a quarter of the free memory: tokprof.profiler.graphs), capture one CUDA graph that
   calls the kernel on every copy in turn (checking each copy is touched), time replays with events, divide by
   the calls per replay; a capped rotation that spans less than 5x the L2 is said in the note (cold_l2 False);
4. summarise every sample (store a bounded sample of them); stop by `StopRule` (>= 10 samples and >= 0.1 s,
   noise <= 0.5%, or the 5 s timeout);
5. record NVML clocks before and after, sample clocks and clock-event reasons between sample batches, and flag
   `throttled` when the SM clock fell below 75% of its max or a slowdown reason (power cap, thermal) was seen;
6. synchronise the whole device before reading a host clock.

On a CPU device any mode times synchronous calls with `time.perf_counter_ns` (mode "cpu"); `flush_bytes` > 0
writes a buffer of that size before each timed call (2x the last-level cache: inputs come from DRAM, as in a step
whose working set exceeds the LLC). `measure_sequence` times the calls of one decode step round-robin instead
(mode "sequence"): each call then finds the caches (data and code) as the other calls of the step leave them,
which is the state it meets inside the eager loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from tokprof.profiler import nvml
from tokprof.profiler.cuda_basics import (  # noqa: F401  (re-exported: the timing API callers and tests use)
    FLUSH_L2_FACTOR,
    as_device,
    flush_buffer,
    flush_bytes,
    iter_tensors,
    l2_bytes,
    l2_flush_bytes,
    sync,
    working_set_bytes,
)
from tokprof.profiler.graphs import (  # noqa: F401  (re-exported)
    MAX_ROTATION_COPIES,
    MIN_REPLAY_US,
    ROTATION_L2_FACTOR,
    CapturedGraph,
    capture_graph,
    check_graph_for,
    check_rotation,
    clone_inputs,
    graph_copies,
    restore_stream,
    rotation_copies,
    rotation_spans_l2,
)
from tokprof.profiler.schema import Timing
from tokprof.profiler.stats import StopRule, bounded_sample, summarize

MODES = ("events", "graph")
SHORT_KERNEL_US = 10.0  # below this, event times include launch jitter (rule 4)
# Events mode: a sleep kernel queued after the flush keeps the GPU busy while the host validates, allocates and
# launches the timed call, so the start event fires after the launch is queued: host time stays out of the window.
# The sleep lasts HOST_BEHIND_FACTOR x the host time of one call + HOST_BEHIND_MARGIN_US.
HOST_BEHIND_FACTOR = 2.0
HOST_BEHIND_MARGIN_US = 10.0
FLUSHES = ("read", "write")
BATCH_S = 0.01  # host time per batch of samples between two device syncs
MAX_BATCH = 4096


# ------------------------------------------------------------------------------------------------ CPU caches


def cpu_cache_bytes(level: int | None = None, root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Size in bytes of CPU 0's data or unified cache at `level` (None: the last level), read from Linux sysfs
    (`index*/level`, `type`, `size` such as "32768K"); None where sysfs does not say (not Linux, a container
    without it)."""
    from pathlib import Path

    found: dict[int, int] = {}
    try:
        for index in sorted(Path(root).glob("index*")):
            if (index / "type").read_text().strip() == "Instruction":
                continue
            lvl = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            found[lvl] = int(text.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return None
    if not found:
        return None
    return found.get(max(found) if level is None else level)


# ------------------------------------------------------------------------------------------------------ sampling


def _check_inputs(inputs: Any, device: torch.device) -> None:
    if not isinstance(inputs, Mapping):
        raise ValueError(f"inputs: expected a dict of the op's keyword arguments, got {type(inputs).__name__}")
    for name, value in inputs.items():
        for t in iter_tensors(value):
            if t.device.type != device.type or (device.type == "cuda" and t.device.index != device.index):
                raise ValueError(f"inputs[{name!r}]: expected tensors on {device}, got one on {t.device}")


def _warm_up(step: Callable[[], None], device: torch.device, warmup_ms: float) -> None:
    """Run `step` for about `warmup_ms` of wall time (after compilation), syncing before each clock read."""
    if warmup_ms <= 0:
        return
    t0 = time.perf_counter()
    n = 1
    while True:
        for _ in range(n):
            step()
        sync(device)
        if time.perf_counter() - t0 >= warmup_ms / 1000.0:
            return
        n = min(2 * n, MAX_BATCH)


class _Checker:
    """Evaluates the stop rule on a geometric schedule, so long runs do not re-sort every sample each time."""

    def __init__(self, rule: StopRule) -> None:
        self.rule = rule
        self.next_check_s = 0.0

    def done(self, samples: list[float], elapsed_s: float) -> bool:
        if not self.rule.minimums_met(len(samples), elapsed_s):
            return False
        if elapsed_s < self.next_check_s and elapsed_s < self.rule.max_time_s:
            return False
        if self.rule.should_stop(samples, elapsed_s):
            return True
        self.next_check_s = min(elapsed_s + max(BATCH_S, 0.1 * elapsed_s), self.rule.max_time_s)
        return False


def _sample_cpu(call: Callable[[Any], Any], inputs: Any, rule: StopRule,
                flush: torch.Tensor | None = None) -> tuple[list[float], float]:
    checker = _Checker(rule)
    samples: list[float] = []
    t0 = time.perf_counter()
    while True:
        if flush is not None:
            flush.fill_(len(samples) & 0xFF)  # writes every line: evicts the caches before the timed call
        start_ns = time.perf_counter_ns()
        call(inputs)
        end_ns = time.perf_counter_ns()
        samples.append((end_ns - start_ns) / 1000.0)
        elapsed = time.perf_counter() - t0
        if checker.done(samples, elapsed):
            return samples, elapsed


def _sample_cuda(step: Callable[[Any, Any], None], device: torch.device, rule: StopRule,
                 calls_per_sample: int, sampler: nvml.ClockSampler | None = None) -> tuple[list[float], float]:
    """`step(start, end)` records `start`, runs the timed work, records `end`. Returns per-call times in us.
    `sampler` reads the clocks and their event reasons between batches (rule 6, during the window)."""
    checker = _Checker(rule)
    pool: list[tuple[Any, Any]] = []
    samples: list[float] = []
    batch = 1
    sync(device)
    t0 = time.perf_counter()
    while True:
        while len(pool) < batch:
            pool.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
        b0 = time.perf_counter()
        for i in range(batch):
            step(*pool[i])
        sync(device)
        now = time.perf_counter()
        samples.extend(s.elapsed_time(e) * 1000.0 / calls_per_sample for s, e in pool[:batch])
        if sampler is not None:
            sampler.sample()
        if checker.done(samples, now - t0):
            return samples, now - t0
        per_step_s = max((now - b0) / batch, 1e-7)
        batch = max(1, min(MAX_BATCH, int(BATCH_S / per_step_s)))


def _timing(samples: list[float], rule: StopRule, elapsed_s: float, *, timer: str, mode: str, cold_l2: bool,
            calls_per_sample: int, notes: list[str]) -> Timing:
    stats = summarize(samples, rule.noise_target)
    return Timing(samples_us=bounded_sample(samples), n_samples=len(samples), timer=timer, mode=mode,
                  cold_l2=cold_l2, median_us=stats["median_us"],
                  p10_us=stats["p10_us"], p90_us=stats["p90_us"], mean_us=stats["mean_us"], noise=stats["noise"],
                  n_outliers=stats["n_outliers"], noise_target=rule.noise_target,
                  met_noise_target=stats["met_noise_target"], calls_per_sample=calls_per_sample,
                  note="; ".join([rule.reason(samples, elapsed_s), *notes]))


def per_pass(timing_kwargs: Mapping[str, Any] | None, passes: int) -> dict[str, Any]:
    """`timing_kwargs` with the sampling budget (min_time_s, max_time_s; measure's defaults where absent) split over
    `passes` passes."""
    kw = dict(timing_kwargs or {})
    for name, default in (("min_time_s", 0.1), ("max_time_s", 5.0)):
        kw[name] = kw.get(name, default) / passes
    return kw


def merge_timings(parts: Sequence[Timing], weights: Sequence[int] | None = None) -> Timing:
    """One Timing from the measurements of one call in several passes spread over a sweep (CPU: a machine whose
    speed drifts for seconds at a time moves one pass, not the call's median). `weights`: passes each part holds
    (1 each by default; a part merged before holds several). Each part gives a share of MAX_STORED_SAMPLES stored
    samples in proportion to its weight, evenly spaced in time; the statistics are over those together."""
    from tokprof.profiler.stats import MAX_STORED_SAMPLES

    if not parts:
        raise ValueError("parts: expected at least one Timing, got none")
    weights = list(weights) if weights is not None else [1] * len(parts)
    if len(weights) != len(parts) or any(w < 1 for w in weights):
        raise ValueError(f"weights: expected one positive int per part, got {weights!r}")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    samples: list[float] = []
    for t, w in zip(parts, weights, strict=True):
        share = max(2, round(MAX_STORED_SAMPLES * w / sum(weights)))
        samples += bounded_sample(t.samples_us, share) if len(t.samples_us) > share else list(t.samples_us)
    stats = summarize(samples, first.noise_target)
    passes = sum(weights)
    note = (f"{passes} passes spread over the sweep, statistics over their stored samples; first: "
            f"{first.note.split('; first: ')[-1]}")
    return Timing(samples_us=samples, n_samples=sum(t.n_samples or len(t.samples_us) for t in parts),
                  timer=first.timer, mode=first.mode, cold_l2=first.cold_l2, median_us=stats["median_us"],
                  p10_us=stats["p10_us"], p90_us=stats["p90_us"], mean_us=stats["mean_us"], noise=stats["noise"],
                  n_outliers=stats["n_outliers"], noise_target=first.noise_target,
                  met_noise_target=stats["met_noise_target"], calls_per_sample=first.calls_per_sample, note=note)


def host_time_us(call: Callable[[Any], Any], inputs: Any, device: torch.device, repeats: int = 16) -> float:
    """Median host time of one call in us: the wrapper's checks, allocations and kernel launches, not the GPU's
    work (no sync inside the window; the device is synchronised after)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        call(inputs)
        times.append((time.perf_counter_ns() - t0) / 1000.0)
    sync(device)
    times.sort()
    return times[len(times) // 2]


def sleep_cycles(sleep_us: float, sm_clock_mhz: int | None) -> int:
    """Clock cycles for torch.cuda._sleep to last about `sleep_us` (at the max SM clock, 2 GHz when unknown: a
    slower clock only sleeps longer, which is harmless)."""
    return max(1, int(sleep_us * (sm_clock_mhz or 2000)))


def _flush_fn(device: torch.device, flush: str) -> Callable[[], None]:
    buf = flush_buffer(device)
    if flush == "write":
        return buf.zero_  # writes 2x the L2: evicts it, but leaves ~one L2 of dirty lines for the next kernel
    words = buf.view(torch.int32)  # read-only: a max over 2x the L2 leaves clean lines only
    out = torch.empty((), dtype=torch.int32, device=device)
    return lambda: torch.amax(words, dim=0, out=out)


def measure(call: Callable[[Any], Any], inputs: Mapping[str, Any], *, device: torch.device | str | int,
            mode: str = "events", cold_l2: bool = True, warmup_ms: float = 25.0, min_samples: int = 10,
            min_time_s: float = 0.1, max_time_s: float = 5.0, noise_target: float = 0.005,
            graph: CapturedGraph | None = None, flush: str = "read", host_behind: bool = True,
            bytes_touched: int | None = None, cpu_flush_bytes: int = 0) -> Timing:
    """Time `call(inputs)` on `device`; every sample kept, statistics after outlier removal (see module doc).

    `graph` (mode "graph" only): a graph already captured by `capture_graph(call, inputs, rotate=cold_l2)`, replayed
    instead of capturing another (a capture of thousands of rotating copies of a tiny input takes seconds).
    Events mode: `flush` "read" (default: evicts L2 leaving clean lines) or "write" (zeroes the buffer: the next
    kernel pays to write ~one L2 of dirty lines back); `host_behind` queues a sleep kernel after the flush that
    outlasts the host's work for the call, so the events time GPU work only (host_us_per_call records that work).
    `bytes_touched` (graph mode): what one call reads and writes, to size the rotation (capture_graph).
    `cpu_flush_bytes` (CPU only): bytes written before each timed call, e.g. 2x `cpu_cache_bytes()` so that the
    inputs come from DRAM; 0 (default) writes nothing, so the inputs stay in the caches between calls.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if flush not in FLUSHES:
        raise ValueError(f"flush: expected one of {list(FLUSHES)}, got {flush!r}")
    if graph is not None:
        if mode != "graph":
            raise ValueError(f"graph: a captured graph is replayed in mode='graph' only, got mode={mode!r}")
        check_graph_for(graph, inputs, cold_l2)
    if not callable(call):
        raise ValueError(f"call: expected a callable taking the inputs dict, got {type(call).__name__}")
    if isinstance(warmup_ms, bool) or not isinstance(warmup_ms, (int, float)) or not (
            warmup_ms >= 0 and math.isfinite(warmup_ms)):
        raise ValueError(f"warmup_ms: expected a finite number of milliseconds >= 0, got {warmup_ms!r}")
    rule = StopRule(min_samples=min_samples, min_time_s=min_time_s, max_time_s=max_time_s, noise_target=noise_target)
    device = as_device(device)
    _check_inputs(inputs, device)

    if isinstance(cpu_flush_bytes, bool) or not isinstance(cpu_flush_bytes, int) or cpu_flush_bytes < 0:
        raise ValueError(f"cpu_flush_bytes: expected an int >= 0 (bytes written before each call), "
                         f"got {cpu_flush_bytes!r}")

    if device.type == "cpu":
        call(inputs)  # first call: lazy initialisation, Triton interpreter set-up
        _warm_up(lambda: call(inputs), device, warmup_ms)
        cpu_flush = torch.empty(cpu_flush_bytes, dtype=torch.uint8) if cpu_flush_bytes else None
        samples, elapsed = _sample_cpu(call, inputs, rule, cpu_flush)
        notes = [f"CPU: time.perf_counter_ns around synchronous calls, {cpu_flush_bytes} B written before each "
                 "call (cold caches)" if cpu_flush is not None else
                 "CPU: time.perf_counter_ns around synchronous calls, no cache flush (warm caches)"]
        timing = _timing(samples, rule, elapsed, timer="perf_counter", mode="cpu", cold_l2=cpu_flush is not None,
                         calls_per_sample=1, notes=notes)
        return timing

    with torch.cuda.device(device):
        call(inputs)  # compile and autotune before anything is timed or captured (rule 1)
        sync(device)
        notes: list[str] = []
        sampler = nvml.ClockSampler(device)
        host_us = None
        timed_cold = cold_l2
        if mode == "events":
            flush_call = _flush_fn(device, flush) if cold_l2 else None
            host_us = host_time_us(call, inputs, device)
            cycles = (sleep_cycles(HOST_BEHIND_FACTOR * host_us + HOST_BEHIND_MARGIN_US, nvml.max_sm_clock_mhz(device))
                      if host_behind else 0)

            def work() -> None:
                if flush_call is not None:
                    flush_call()
                call(inputs)

            def step(start: Any, end: Any) -> None:
                if flush_call is not None:
                    flush_call()
                if cycles:
                    torch.cuda._sleep(cycles)  # the GPU waits here while the host queues the call
                start.record()
                call(inputs)
                end.record()

            _warm_up(work, device, warmup_ms)
            before = nvml.clocks(device)
            sampler.sample(force=True)
            samples, elapsed = _sample_cuda(step, device, rule, 1, sampler)
            after = nvml.clocks(device)
            calls_per_sample, timer = 1, "cuda_events"
            if flush_call is not None:
                notes.append(f"L2 flushed ({flush}) before each call ({l2_flush_bytes(device)} B = 2x L2)")
            notes.append(f"host {host_us:.1f} us per call" + (
                f", kept off the timed window by a {HOST_BEHIND_FACTOR * host_us + HOST_BEHIND_MARGIN_US:.0f} us "
                "sleep kernel after the flush" if cycles else " (inside the timed window: host_behind=False)"))
        else:
            if graph is None:
                graph = capture_graph(call, inputs, device=device, rotate=cold_l2, bytes_touched=bytes_touched)
            timed_cold = cold_l2 and graph.spans_l2

            def step(start: Any, end: Any) -> None:
                start.record()
                graph.replay()
                end.record()

            _warm_up(graph.replay, device, warmup_ms)
            before = nvml.clocks(device)
            sampler.sample(force=True)
            samples, elapsed = _sample_cuda(step, device, rule, graph.calls_per_replay, sampler)
            after = nvml.clocks(device)
            calls_per_sample, timer = graph.calls_per_replay, "cuda_graph"
            notes.append(graph.describe() + ("" if cold_l2 else " (cold_l2=False: one copy, warm L2)"))
        sampler.sample(force=True)

    timing = _timing(samples, rule, elapsed, timer=timer, mode=mode, cold_l2=timed_cold,
                     calls_per_sample=calls_per_sample, notes=notes)
    timing.clocks_before, timing.clocks_after = before, after
    timing.host_us_per_call = host_us
    timing.flush = flush if (mode == "events" and cold_l2) else None
    timing.clock_reasons = sorted(sampler.reasons)
    timing.sm_mhz_min = sampler.sm_mhz_min
    edges = nvml.is_throttled(before, after)
    during = sampler.throttled()
    timing.throttled = None if edges is None and during is None else bool(edges or during)
    if sampler.reasons & nvml.SLOWDOWN_REASONS:
        timing.note += f"; clock-event reasons during the window: {', '.join(sorted(sampler.reasons))}"
    if timing.throttled:
        timing.note += (f"; throttled: SM clock below {nvml.THROTTLE_FRACTION:.0%} of its max (lowest seen "
                        f"{timing.sm_mhz_min} MHz) or a slowdown reason during the window")
    if timing.throttled is None:
        timing.note += f"; clocks unknown ({nvml.nvml_status() or 'NVML has no handle for this device'})"
    if mode == "events" and timing.median_us < SHORT_KERNEL_US:
        timing.note += (f"; median {timing.median_us:.2f} us < {SHORT_KERNEL_US:g} us: CUDA event times include "
                        "launch jitter, read the graph-mode time beside this one")
    return timing


# ---------------------------------------------------------------------------------------------- CPU sequences


def measure_sequence(calls: list[tuple[Callable[[Any], Any], Mapping[str, Any]]], *, device: torch.device | str,
                     warmup_rounds: int = 3, min_samples: int = 10, min_time_s: float = 0.1, max_time_s: float = 5.0,
                     noise_target: float = 0.005) -> list[Timing]:
    """Time the calls of one step round-robin on the CPU: each round runs every `(call, inputs)` once in order,
    timing each with perf_counter_ns. A call then meets the caches (data, instructions, branch predictors) as the
    calls before it in the step leave them, not warmed by a repeat of itself: the state of the eager loop.

    Rounds go on until every call meets the stop rule (>= `min_samples`, noise <= `noise_target`) or the budget
    `max_time_s` x the number of calls is spent; `min_time_s` x calls is the least time spent. Returns one Timing per
    call (mode "sequence"), in the order given.
    """
    device = as_device(device)
    if device.type != "cpu":
        raise ValueError(f"device: sequence timing is the CPU's (a GPU times kernels with events), got {device}")
    if not calls:
        raise ValueError("calls: expected at least one (call, inputs) pair, got none")
    for i, pair in enumerate(calls):
        if not (isinstance(pair, tuple) and len(pair) == 2 and callable(pair[0])):
            raise ValueError(f"calls[{i}]: expected a (callable, inputs dict) pair, got {type(pair).__name__}")
        _check_inputs(pair[1], device)
    n = len(calls)
    rule = StopRule(min_samples=min_samples, min_time_s=min_time_s * n, max_time_s=max_time_s * n,
                    noise_target=noise_target)
    for call, inputs in calls:
        call(inputs)  # first call: lazy initialisation
    for _ in range(max(0, warmup_rounds)):
        for call, inputs in calls:
            call(inputs)
    samples: list[list[float]] = [[] for _ in calls]
    t0 = time.perf_counter()
    checked_at = 0.0
    while True:
        for i, (call, inputs) in enumerate(calls):
            start_ns = time.perf_counter_ns()
            call(inputs)
            samples[i].append((time.perf_counter_ns() - start_ns) / 1000.0)
        elapsed = time.perf_counter() - t0
        if not rule.minimums_met(len(samples[0]), elapsed):
            continue
        if elapsed >= rule.max_time_s:
            break
        if elapsed - checked_at >= max(BATCH_S, 0.1 * elapsed):  # re-sort the samples on a geometric schedule
            checked_at = elapsed
            if all(rule.should_stop(s, elapsed) for s in samples):
                break
    note = f"CPU sequence: round-robin over the {n} calls of one step, {len(samples[0])} rounds"
    return [_timing(s, rule, elapsed, timer="perf_counter", mode="sequence", cold_l2=False, calls_per_sample=1,
                    notes=[note]) for s in samples]
