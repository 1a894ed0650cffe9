"""Kernel time, measured the way MEASUREMENT.md says (kernel time, rules 1-7).

    timing = measure(lambda kw: op.run(kw, "triton"), inputs, device="cuda:0")                # CUDA events
    timing = measure(lambda kw: op.run(kw, "triton"), inputs, device="cuda:0", mode="graph")  # CUDA graph
    timing = measure(lambda kw: op.run(kw, "torch"), inputs, device="cpu")                    # perf_counter_ns

`call(inputs)` runs the kernel once on the tensors of `inputs` (the op's keyword arguments). Every mode:

1. compile and autotune first (one call, then a device-wide sync), then warm up for `warmup_ms` (~25 ms);
2. events mode: before each timed call, zero a flush buffer of 2x the device's L2 (cold L2), then time the call
   with a pair of CUDA events;
3. graph mode: no flush; clone the inputs into ceil(5 * L2 / working_set) + 1 copies, capture one CUDA graph that
   calls the kernel on every copy in turn (checking each copy is touched), time replays with events, divide by
   the calls per replay;
4. keep every sample; stop by `StopRule` (>= 10 samples and >= 0.1 s, noise <= 0.5%, or the 5 s timeout);
5. record NVML clocks before and after, and `throttled` when the SM clock fell below 75% of its max;
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tokprof.profiler import nvml
from tokprof.profiler.schema import Timing
from tokprof.profiler.stats import StopRule, summarize

MODES = ("events", "graph")

FLUSH_L2_FACTOR = 2  # flush buffer = 2x L2 (rule 2)
ROTATION_L2_FACTOR = 5  # graph mode: copies span 5x L2 between two uses of one copy (rule 3)
SHORT_KERNEL_US = 10.0  # below this, event times include launch jitter (rule 4)
# A graph replay at least this long keeps the replay's own launch and event overhead (~a few us) under ~1%.
MIN_REPLAY_US = 500.0
BATCH_S = 0.01  # host time per batch of samples between two device syncs
MAX_BATCH = 4096


# ------------------------------------------------------------------------------------------------ device basics


def as_device(device: torch.device | str | int) -> torch.device:
    """A torch.device with an explicit CUDA index; ValueError for other types, RuntimeError without CUDA."""
    try:
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r} ({err})") from err
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {str(device)!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                               "measure with device='cpu' instead")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def sync(device: torch.device | str | int) -> None:
    """Wait for all work on the whole device (every stream), not one stream; a no-op on the CPU (rule 7)."""
    device = as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_bytes(device: torch.device | str | int) -> int | None:
    """The device's L2 cache size in bytes; None for a CPU device."""
    device = as_device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).L2_cache_size)


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


def flush_bytes(l2_cache_bytes: int) -> int:
    """Size of the cold-L2 flush buffer: twice the L2 (H100 50 MB -> 100 MB, H200 60 MB -> 120 MB)."""
    if isinstance(l2_cache_bytes, bool) or not isinstance(l2_cache_bytes, int) or l2_cache_bytes <= 0:
        raise ValueError(f"l2_cache_bytes: expected a positive int, got {l2_cache_bytes!r}")
    return FLUSH_L2_FACTOR * l2_cache_bytes


def l2_flush_bytes(device: torch.device | str | int) -> int | None:
    """The flush buffer size for `device` (2x its L2), or None on the CPU (no flush there)."""
    l2 = l2_bytes(device)
    return None if l2 is None else flush_bytes(l2)


_flush_buffers: dict[int, torch.Tensor] = {}


def flush_buffer(device: torch.device | str | int) -> torch.Tensor:
    """The cold-L2 flush buffer of `device` (uint8, 2x L2), allocated once per device and reused."""
    device = as_device(device)
    if device.type != "cuda":
        raise ValueError(f"device: the L2 flush buffer exists on CUDA devices only, got {device}")
    size = l2_flush_bytes(device)
    buf = _flush_buffers.get(device.index)
    if buf is None or buf.numel() != size:
        buf = torch.empty(size, dtype=torch.uint8, device=device)
        _flush_buffers[device.index] = buf
    return buf


# ------------------------------------------------------------------------------------------ inputs and rotation


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value)


def working_set_bytes(inputs: Mapping[str, Any]) -> int:
    """Bytes of the distinct tensors in `inputs` (a tensor passed twice counts once; a view counts its elements)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in iter_tensors(inputs):
        nbytes = t.numel() * t.element_size()
        key = (t.data_ptr(), nbytes)
        if nbytes and key not in seen:
            seen.add(key)
            total += nbytes
    return total


def rotation_copies(l2_cache_bytes: int, working_set: int) -> int:
    """Input copies for graph mode: ceil(5 * L2 / working_set) + 1 (MEASUREMENT.md rule 3).

    Between two uses of one copy the kernel then streams >= 5x the L2 through the cache, so no call finds its
    inputs in L2. E.g. L2 50 MiB, working set 16 MiB -> ceil(15.6) + 1 = 17 copies.
    """
    for name, value in (("l2_cache_bytes", l2_cache_bytes), ("working_set", working_set)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int of bytes, got {value!r}")
    return -(-ROTATION_L2_FACTOR * l2_cache_bytes // working_set) + 1


def _clone_tensor(t: torch.Tensor) -> torch.Tensor:
    copy = t.detach().clone(memory_format=torch.preserve_format)
    if copy.stride() != t.stride():  # keep the layout the kernel was given (a strided view stays strided)
        copy = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
        copy.copy_(t.detach())
    return copy


def clone_inputs(inputs: Any) -> Any:
    """A copy of `inputs` with every tensor cloned (same shape, strides, dtype, device, values); others kept."""
    if isinstance(inputs, torch.Tensor):
        return _clone_tensor(inputs)
    if isinstance(inputs, Mapping):
        return {k: clone_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, list):
        return [clone_inputs(v) for v in inputs]
    if isinstance(inputs, tuple):
        return tuple(clone_inputs(v) for v in inputs)
    return inputs


def check_rotation(copies: list[Any], touched: list[int]) -> int:
    """Check graph rotation: every copy called equally often and no two copies sharing memory.

    `touched[i]` counts the calls captured on copies[i]. Returns the number of distinct tensor addresses used.
    RuntimeError otherwise: graph timing that reuses one input finds it in L2 and reports impossible bandwidth.
    """
    if len(touched) != len(copies):
        raise RuntimeError(f"graph rotation: {len(copies)} input copies but call counts for {len(touched)}")
    never = [i for i, n in enumerate(touched) if n == 0]
    if never:
        raise RuntimeError(f"graph rotation: input copies {never[:8]} (of {len(copies)}) were never called")
    if len(set(touched)) != 1:
        raise RuntimeError(f"graph rotation: copies called unevenly (min {min(touched)}, max {max(touched)} calls)")
    owner: dict[int, int] = {}
    for i, copy in enumerate(copies):
        for t in iter_tensors(copy):
            if t.numel() == 0:
                continue
            ptr = t.data_ptr()
            if owner.get(ptr, i) != i:
                raise RuntimeError(f"graph rotation: input copies {owner[ptr]} and {i} share memory at {ptr:#x}; "
                                   "each copy must hold its own tensors")
            owner[ptr] = i
    return len(owner)


@dataclass
class CapturedGraph:
    """One CUDA graph of `calls_per_replay` kernel calls rotating over `copies` input copies."""

    graph: Any  # torch.cuda.CUDAGraph
    calls_per_replay: int
    copies: int
    working_set_bytes: int
    l2_bytes: int
    touched: list[int]
    distinct_input_ptrs: int
    inputs: list[Any] = field(repr=False)  # the copies: they must live as long as the graph that reads them

    def replay(self) -> None:
        self.graph.replay()

    def describe(self) -> str:
        return (f"graph of {self.calls_per_replay} calls over {self.copies} rotating input copies "
                f"({self.working_set_bytes} B each, L2 {self.l2_bytes} B), each copy called "
                f"{self.touched[0]}x per replay")


def _events_time_us(device: torch.device, fn: Callable[[], None], repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(device)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    sync(device)
    return start.elapsed_time(end) * 1000.0 / repeats


def restore_stream(stream: Any) -> None:
    """Make `stream` current again after a CUDA graph capture. A capture that fails makes torch.cuda.graph's
    capture_end raise before it restores the stream it switched to, so later work would run on the capture stream."""
    torch.cuda.set_stream(stream)


def capture_graph(call: Callable[[Any], Any], inputs: Mapping[str, Any], *, device: torch.device | str | int,
                  rotate: bool = True, min_replay_us: float = MIN_REPLAY_US) -> CapturedGraph:
    """Capture `call` over rotating input copies into one CUDA graph (call `call(inputs)` once before: autotune).

    With `rotate`, ceil(5 * L2 / working_set) + 1 copies (the first is `inputs` itself); without, one. The graph
    holds a whole number of passes over the copies, enough that a replay lasts >= `min_replay_us`.
    """
    device = as_device(device)
    if device.type != "cuda":
        raise ValueError(f"device: CUDA graphs need a CUDA device, got {device}")
    ws = working_set_bytes(inputs)
    if ws == 0:
        raise ValueError("inputs: expected at least one non-empty tensor to time, got none")
    l2 = l2_bytes(device)
    n_copies = rotation_copies(l2, ws) if rotate else 1
    copies = [inputs] + [clone_inputs(inputs) for _ in range(n_copies - 1)]
    with torch.cuda.device(device):
        # Warm up on a side stream first, as CUDA-graph capture wants (lazy library handles, workspaces).
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for i in range(min(3, n_copies)):
                call(copies[i])
        torch.cuda.current_stream(device).wait_stream(side)
        state = {"i": 0}

        def one_pass_call() -> None:
            call(copies[state["i"] % n_copies])
            state["i"] += 1

        per_call_us = _events_time_us(device, one_pass_call, min(n_copies, 8))
        passes = max(1, math.ceil(min_replay_us / max(n_copies * per_call_us, 1e-3)))
        touched = [0] * n_copies
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(device)
        try:
            with torch.cuda.graph(graph):
                for _ in range(passes):
                    for i in range(n_copies):
                        touched[i] += 1
                        call(copies[i])
        except RuntimeError as err:
            raise RuntimeError(f"CUDA graph capture of the call failed ({err}); a call that synchronises or "
                               "copies to the host cannot be captured: time it with mode='events'") from err
        finally:
            restore_stream(stream)
        sync(device)
    distinct = check_rotation(copies, touched)
    return CapturedGraph(graph=graph, calls_per_replay=passes * n_copies, copies=n_copies, working_set_bytes=ws,
                         l2_bytes=l2, touched=touched, distinct_input_ptrs=distinct, inputs=copies)


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
                 calls_per_sample: int) -> tuple[list[float], float]:
    """`step(start, end)` records `start`, runs the timed work, records `end`. Returns per-call times in us."""
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
        if checker.done(samples, now - t0):
            return samples, now - t0
        per_step_s = max((now - b0) / batch, 1e-7)
        batch = max(1, min(MAX_BATCH, int(BATCH_S / per_step_s)))


def _timing(samples: list[float], rule: StopRule, elapsed_s: float, *, timer: str, mode: str, cold_l2: bool,
            calls_per_sample: int, notes: list[str]) -> Timing:
    stats = summarize(samples, rule.noise_target)
    return Timing(samples_us=list(samples), timer=timer, mode=mode, cold_l2=cold_l2, median_us=stats["median_us"],
                  p10_us=stats["p10_us"], p90_us=stats["p90_us"], mean_us=stats["mean_us"], noise=stats["noise"],
                  n_outliers=stats["n_outliers"], noise_target=rule.noise_target,
                  met_noise_target=stats["met_noise_target"], calls_per_sample=calls_per_sample,
                  note="; ".join([rule.reason(samples, elapsed_s), *notes]))


def check_graph_for(graph: CapturedGraph, inputs: Mapping[str, Any], rotate: bool) -> None:
    """ValueError unless `graph` was captured over `inputs` (its first copy) with the rotation asked for."""
    if not isinstance(graph, CapturedGraph):
        raise ValueError(f"graph: expected a CapturedGraph from capture_graph, got {type(graph).__name__}")
    if not graph.inputs or graph.inputs[0] is not inputs:
        raise ValueError("graph: expected a graph captured over these inputs (capture_graph(call, inputs, ...)), "
                         "got one captured over other tensors")
    if (graph.copies > 1) != rotate:
        raise ValueError(f"graph: expected a graph {'with' if rotate else 'without'} rotating input copies "
                         f"(cold_l2={rotate}), got one over {graph.copies} cop{'ies' if graph.copies > 1 else 'y'}")


def measure(call: Callable[[Any], Any], inputs: Mapping[str, Any], *, device: torch.device | str | int,
            mode: str = "events", cold_l2: bool = True, warmup_ms: float = 25.0, min_samples: int = 10,
            min_time_s: float = 0.1, max_time_s: float = 5.0, noise_target: float = 0.005,
            graph: CapturedGraph | None = None, cpu_flush_bytes: int = 0) -> Timing:
    """Time `call(inputs)` on `device`; every sample kept, statistics after outlier removal (see module doc).

    `cpu_flush_bytes` (CPU only): bytes written before each timed call, e.g. 2x `cpu_cache_bytes()` so that the
    inputs come from DRAM; 0 (default) writes nothing, so the inputs stay in the caches between calls.

    `graph` (mode "graph" only): a graph already captured by `capture_graph(call, inputs, rotate=cold_l2)`, replayed
    instead of capturing another (a capture of thousands of rotating copies of a tiny input takes seconds).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
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
        flush = torch.empty(cpu_flush_bytes, dtype=torch.uint8) if cpu_flush_bytes else None
        samples, elapsed = _sample_cpu(call, inputs, rule, flush)
        notes = [f"CPU: time.perf_counter_ns around synchronous calls, {cpu_flush_bytes} B written before each "
                 "call (cold caches)" if flush is not None else
                 "CPU: time.perf_counter_ns around synchronous calls, no cache flush (warm caches)"]
        timing = _timing(samples, rule, elapsed, timer="perf_counter", mode="cpu", cold_l2=flush is not None,
                         calls_per_sample=1, notes=notes)
        return timing

    with torch.cuda.device(device):
        call(inputs)  # compile and autotune before anything is timed or captured (rule 1)
        sync(device)
        notes: list[str] = []
        if mode == "events":
            flush = flush_buffer(device) if cold_l2 else None

            def work() -> None:
                if flush is not None:
                    flush.zero_()  # evicts L2: writes 2x its size just before the timed call
                call(inputs)

            def step(start: Any, end: Any) -> None:
                if flush is not None:
                    flush.zero_()
                start.record()
                call(inputs)
                end.record()

            _warm_up(work, device, warmup_ms)
            before = nvml.clocks(device)
            samples, elapsed = _sample_cuda(step, device, rule, 1)
            after = nvml.clocks(device)
            calls_per_sample, timer = 1, "cuda_events"
            if flush is not None:
                notes.append(f"L2 flushed before each call ({flush.numel()} B = 2x L2)")
        else:
            if graph is None:
                graph = capture_graph(call, inputs, device=device, rotate=cold_l2)

            def step(start: Any, end: Any) -> None:
                start.record()
                graph.replay()
                end.record()

            _warm_up(graph.replay, device, warmup_ms)
            before = nvml.clocks(device)
            samples, elapsed = _sample_cuda(step, device, rule, graph.calls_per_replay)
            after = nvml.clocks(device)
            calls_per_sample, timer = graph.calls_per_replay, "cuda_graph"
            notes.append(graph.describe() + ("" if cold_l2 else " (cold_l2=False: one copy, warm L2)"))

    timing = _timing(samples, rule, elapsed, timer=timer, mode=mode, cold_l2=cold_l2,
                     calls_per_sample=calls_per_sample, notes=notes)
    timing.clocks_before, timing.clocks_after = before, after
    timing.throttled = nvml.is_throttled(before, after)
    if timing.throttled:
        timing.note += f"; throttled: SM clock below {nvml.THROTTLE_FRACTION:.0%} of its max"
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
