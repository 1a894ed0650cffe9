"""Kernel micro-benchmarks: one call measured (time, roofline, energy), and sweeps saved as they go.

    m = bench_op("swiglu", {"T": 16, "I": 14336}, "bf16", "triton", "cuda")          # KernelMeasurement
    run = new_run(sys.argv, "cuda")                                                 # RunResult with provenance
    kernels, failures = bench_calls([("swiglu", {"T": 1}, "bf16", "cuda"), ...], "cuda", out="run.json", run=run)

Each call gets fresh seeded random inputs from `OPS[op].make_inputs` (never zeros), is timed by `timing.measure`
(events with cold L2, or graph replays; perf_counter on the CPU), and is placed on the roofline from `OPS[op].cost`
against the datasheet row of the GPU and the ceilings measured in the run. On a GPU, a call faster than
SHORT_KERNEL_US in events mode is also timed in graph mode (events include launch jitter at that scale); the
event time stays the headline figure and `graph_timing` sits beside it. Energy per call comes from
`energy.measure_kernel_energy` where NVML can measure it; otherwise `energy_reason` says why.

`bench_calls` saves the RunResult atomically after every call, records a shape that fails (out of memory, a
kernel error) as a `Failure` and goes on, and on Ctrl-C saves what was measured before re-raising.
"""

from __future__ import annotations

import functools
import gc
import socket
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from tokprof.kernels import OPS
from tokprof.kernels._common import BACKENDS, Op, dtype_name, parse_dtype, skip_value_checks
from tokprof.profiler import energy as energy_mod
from tokprof.profiler import nvml, timing
from tokprof.profiler.devices import GpuSpec, detect_device, git_sha, spec_for, versions
from tokprof.profiler.roofline import roofline
from tokprof.profiler.schema import (
    Ceilings,
    Failure,
    KernelMeasurement,
    Provenance,
    RunResult,
    Timing,
    mark_interrupted,
    save_run,
)
from tokprof.quant.precision import math_dtype

SHORT_KERNEL_US = timing.SHORT_KERNEL_US  # below this, event times carry launch jitter: graph time goes beside
# Stated assumptions of the graph-time gate (wants_graph_time): a short kernel reaches about this fraction of its
# datasheet roof, plus a launch of this many us.
GRAPH_GATE_EFFICIENCY = 0.8
GRAPH_GATE_LAUNCH_US = 2.0
MODES = ("events", "graph")
AUTO = "auto"  # spec=AUTO: the spec-table row of the device, None for a CPU or an unknown GPU

Call = tuple[str, Mapping[str, int], Any, str]  # (op, shape, dtype, backend)
# Settle time before an idle-power window: a GPU just out of the ceilings' GEMM still draws above idle (a hot GPU
# also leaks more), which biases dynamic energy low and can push it to <= 0.
IDLE_SETTLE_S = 3.0
# Idle power is bracketed (before and after the sweep); a difference above this share says the card's idle state
# moved during the run, and dynamic energy is uncertain by about that much.
IDLE_DRIFT_WARN = 0.10


def _sweep_errors() -> tuple[type[BaseException], ...]:
    """What a failing kernel call raises, recorded as a Failure so that a sweep goes on: RuntimeError (CUDA errors,
    torch.OutOfMemoryError; the cuda backend wraps NVRTC's CompileException in one), ValueError (arguments),
    MemoryError (CuPy's out of memory), ArithmeticError (a shape that divides by zero in an input's set-up), and
    where importable Triton's compile and resource errors (TritonError:
    OutOfResources, CompilationError, PTXASError), which derive from Exception only."""
    errors: list[type[BaseException]] = [RuntimeError, ValueError, MemoryError, ArithmeticError]
    try:
        from triton.errors import TritonError

        errors.append(TritonError)
    except ImportError:  # no triton (or one older than triton.errors): its backend is reported unavailable anyway
        pass
    return tuple(errors)


SWEEP_ERRORS = _sweep_errors()
# Failures of a measurement step (graph capture, energy window) after the call itself ran: the event timing stands.
# ValueError is not among them: a bad argument (e.g. energy_kwargs) is the caller's to fix.
STEP_ERRORS = tuple(e for e in SWEEP_ERRORS if e is not ValueError)


def get_op(op: str) -> Op:
    if op not in OPS:
        raise ValueError(f"op: expected one of {sorted(OPS)}, got {op!r}")
    return OPS[op]


@functools.lru_cache(maxsize=16)
def _device_name(device: str) -> str:
    return detect_device(device).name


def _resolve_spec(spec: GpuSpec | None | str, device: torch.device) -> GpuSpec | None:
    if spec != AUTO:
        return spec  # a GpuSpec, or None: no datasheet roofline
    if device.type != "cuda":
        return None
    return spec_for(detect_device(device))


def _free(device: torch.device) -> None:
    """Give back what a failed call left allocated, so the next shape starts from a clean allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def wants_graph_time(flops: int, min_bytes: int, spec: GpuSpec | None, dtype: str, events_us: float) -> bool:
    """Whether a call also gets a graph-mode time: when its modelled time (datasheet roof / GRAPH_GATE_EFFICIENCY
    + a launch) is under SHORT_KERNEL_US, or, with no datasheet row, when its event time is. Gating on the event
    time alone missed short kernels whose event time the host had inflated past the threshold."""
    if spec is not None and spec.hbm_tbps:
        t_mem = min_bytes / (spec.hbm_tbps * 1e12) * 1e6
        peak = spec.peak_tflops(dtype)
        t_compute = flops / (peak * 1e12) * 1e6 if peak else 0.0
        return max(t_mem, t_compute) / GRAPH_GATE_EFFICIENCY + GRAPH_GATE_LAUNCH_US < SHORT_KERNEL_US
    return events_us < SHORT_KERNEL_US


def _run_op(rec: Op, backend: str, inputs: dict[str, Any]) -> Any:
    # The value checks (host reads of seq_lens, slots, token ids) ran once before timing: a timed call holds no
    # host synchronisation that the kernel itself does not need.
    with skip_value_checks():
        return rec.run(inputs, backend)


def bench_op(op: str, shape: Mapping[str, int], dtype: str | torch.dtype, backend: str,
             device: str | torch.device, *, mode: str = "events", energy: bool = False, meter: Any = None,
             idle_power_w: float | None = None, seed: int = 0, timing_kwargs: dict[str, Any] | None = None,
             spec: GpuSpec | None | str = AUTO, ceilings: Ceilings | None = None,
             energy_kwargs: dict[str, Any] | None = None, prior: Timing | None = None,
             prior_passes: int = 1) -> KernelMeasurement:
    """Measure one kernel call: timing, roofline and (with `energy=True`) energy per call.

    `prior`: the same call's timing from the `prior_passes` earlier passes of a sweep (bench_calls' `cpu_passes`),
    merged with this pass's (timing.merge_timings) before the roofline is computed.

    `shape` may be partial (the op's default fills the rest); `dtype` "fp32" | "fp16" | "bf16" or a torch dtype;
    `spec` AUTO looks the device up in the spec table, None means no datasheet figures; `timing_kwargs` go to
    `timing.measure` (min_samples, min_time_s, max_time_s, noise_target, warmup_ms, cold_l2); `energy_kwargs` to
    `energy.measure_kernel_energy` (window_s, cooldown_s); a `meter` passed in is used whatever the device (a replay
    meter drives the energy path on the CPU). Raises ValueError for bad arguments and RuntimeError
    when the backend cannot run on `device` (saying which backends can).
    """
    rec = get_op(op)
    full_shape = rec.full_shape(shape)
    torch_dtype = parse_dtype(dtype)
    dname = dtype_name(torch_dtype)
    if torch_dtype not in rec.dtypes:
        raise ValueError(f"dtype: {op} takes {[dtype_name(d) for d in rec.dtypes]}, got {dname!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    dev = torch.device(device)
    why_not = rec.available_backends(dev)[backend]
    if why_not is not None:
        usable = [b for b, r in rec.available_backends(dev).items() if r is None]
        raise RuntimeError(f"backend={backend!r} cannot run {op} on {dev}: {why_not}. "
                           f"Backends that work here: {', '.join(usable)}")
    datasheet = _resolve_spec(spec, dev)

    inputs = rec.make_inputs(full_shape, torch_dtype, dev, seed)  # fresh seeded random tensors, never zeros
    rec.run(inputs, backend)  # once with every argument check, value checks included
    call: Callable[[dict[str, Any]], Any] = functools.partial(_run_op, rec, backend)
    kwargs = dict(timing_kwargs or {})
    flops, min_bytes = rec.cost(full_shape, torch_dtype)
    graph_kwargs = {k: v for k, v in kwargs.items() if k not in ("flush", "host_behind")}
    if mode == "graph":
        kwargs = graph_kwargs | {"bytes_touched": int(min_bytes)}
    measured = timing.measure(call, inputs, device=dev, mode=mode, **kwargs)
    if prior is not None:
        measured = timing.merge_timings([prior, measured], [prior_passes, 1])
    graph_timing = None
    graph_failed = ""
    # One capture of the rotating copies serves the graph-mode timing and the energy window.
    captured: timing.CapturedGraph | None = None
    gate_dtype = math_dtype(op, dname, datasheet)  # the roof of the op's math dtype (fp8 for W8A8, ...)
    if dev.type == "cuda" and mode == "events" and wants_graph_time(flops, min_bytes, datasheet, gate_dtype,
                                                                    measured.median_us):
        cold_l2 = kwargs.get("cold_l2", True)
        try:
            captured = timing.capture_graph(call, inputs, device=dev, rotate=cold_l2, bytes_touched=int(min_bytes))
            graph_timing = timing.measure(call, inputs, device=dev, mode="graph", graph=captured, **graph_kwargs)
        except STEP_ERRORS as err:  # e.g. a call that syncs with the host cannot be captured: keep the event time
            graph_failed = f"graph-mode timing failed ({type(err).__name__}: {err}); only the event time is known"
            captured = None
        if graph_failed:
            _free(dev)  # outside the except block: its traceback no longer pins the failed capture's tensors
        if captured is not None and not cold_l2:
            captured = None  # one warm copy: the energy window needs the rotating copies

    best = graph_timing if graph_timing is not None else measured  # KernelMeasurement.best_timing
    # the roof of the op's math dtype: fp8 for W8A8, fp4 for MXFP4/NVFP4 where the GPU has FP4 tensor cores
    point = roofline(int(flops), int(min_bytes), best.median_us, spec=datasheet, ceilings=ceilings,
                     dtype=math_dtype(op, dname, datasheet))
    if graph_timing is not None:
        extra = (f"graph-mode median {graph_timing.median_us:.3f} us beside the events median "
                 f"{measured.median_us:.3f} us; the roofline and the kernel sum use the graph time (no launch "
                 "jitter, no host time)")
        point.note = f"{point.note}; {extra}" if point.note else extra

    if graph_failed:
        point.note = f"{point.note}; {graph_failed}" if point.note else graph_failed
    if dev.type == "cpu":
        flushed = int(kwargs.get("cpu_flush_bytes", 0) or 0)
        explain_cache(point, timing.working_set_bytes(inputs) if not flushed else None,
                      "the call alone, repeated" if not flushed else f"{flushed} B written before each call")

    kernel_energy = None
    energy_reason: str | None = energy_mod.energy_not_asked(dev)
    if energy:
        # A meter handed in is used as is (e.g. a replayed NVML trace); otherwise NVML must be able to measure here.
        energy_reason = None if meter is not None else energy_mod.energy_status(dev)
        if energy_reason is None:
            if meter is None:
                meter = energy_mod.make_meter(dev)
            if idle_power_w is None:  # an idle window as long as the kernel window (docs/measurement.md, energy 3)
                idle_power_w = energy_mod.measure_idle_power(meter, (energy_kwargs or {}).get("window_s", 1.0),
                                                             settle_s=IDLE_SETTLE_S if dev.type == "cuda" else 0.0)
            try:
                kernel_energy = energy_mod.measure_kernel_energy(call, inputs, device=dev, meter=meter,
                                                                 idle_power_w=idle_power_w, graph=captured,
                                                                 **(energy_kwargs or {}))
            except STEP_ERRORS as err:  # graph capture, a counter that never moved: the timing still stands
                energy_reason = f"energy measurement failed ({type(err).__name__}: {err})"
            if kernel_energy is None:
                captured = None
                _free(dev)  # outside the except block (see above)
    del inputs, captured
    return KernelMeasurement(op=op, shape=full_shape, dtype=dname, backend=backend, device=_device_name(str(dev)),
                             timing=measured, roofline=point, energy=kernel_energy, energy_reason=energy_reason,
                             graph_timing=graph_timing)


def explain_cache(point: Any, resident_bytes: int | None, how: str) -> None:
    """CPU: a call above the measured DRAM copy ceiling is explained by the cache only when its data can sit there.

    `resident_bytes`: what stays cached between timed calls (the call's working set when repeated alone, the whole
    sequence's when timed round-robin; None after a flush). Within the last-level cache, reading above the DRAM
    ceiling is the cache's bandwidth: not suspicious, and the note says so; beyond it (or after a flush), the
    inputs came from DRAM, so the figure stays `suspicious` (a byte-count or timing error) and the note says why."""
    eff = point.efficiency_measured
    if eff is None or eff <= 1.0:
        return
    llc = timing.cpu_cache_bytes()
    if resident_bytes is not None and llc is not None and resident_bytes <= llc:
        point.suspicious = (point.efficiency_datasheet or 0.0) > 1.0
        point.note += (f"; {eff:.0%} of the DRAM copy ceiling explained by the cache: timed as {how}, "
                       f"{resident_bytes / 2**20:.2f} MiB stay in the {llc / 2**20:.0f} MiB last-level cache")
    else:
        why = ("the last-level cache size is unknown" if llc is None else "the caches were flushed" if
               resident_bytes is None else f"{resident_bytes / 2**20:.1f} MiB exceed the {llc / 2**20:.0f} MiB LLC")
        point.suspicious = True
        point.note += f"; {eff:.0%} of the DRAM copy ceiling and {why} (timed as {how}): not a cache effect"


def bench_sequence(calls: Sequence[Call], device: str | torch.device = "cpu", *, seed: int = 0,
                   timing_kwargs: dict[str, Any] | None = None, ceilings: Ceilings | None = None,
                   keep: Callable[[Call], bool] | None = None,
                   prior: Mapping[tuple[Any, ...], tuple[Timing, int]] | None = None
                   ) -> tuple[list[KernelMeasurement], list[Failure]]:
    """CPU: measure the calls of one decode step round-robin (timing.measure_sequence), so that each call meets the
    caches the other calls of the step leave; returns (measurements of the calls `keep` accepts, failures).

    A call that fails its first run is a Failure and leaves the sequence. `timing_kwargs` as for bench_op
    (min_samples, min_time_s, max_time_s, noise_target; warm-up and flush options do not apply). `prior`: by
    KernelMeasurement.key(), a call's timing from earlier passes and how many passes it holds, merged with this
    pass's (timing.merge_timings)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        raise ValueError(f"device: sequence timing is for the CPU, got {dev}")
    normalised = [_normalise(c, i) for i, c in enumerate(calls)]
    seq: list[tuple[Callable[[Any], Any], dict[str, Any]]] = []
    kept_calls: list[tuple[str, dict[str, int], str, str]] = []
    failures: list[Failure] = []
    for op, shape, dname, backend in normalised:
        rec = get_op(op)
        try:
            inputs = rec.make_inputs(shape, parse_dtype(dname), dev, seed)
            rec.run(inputs, backend)  # once with every argument check
        except SWEEP_ERRORS as err:
            failures.append(Failure(op=op, shape=shape, dtype=dname, backend=backend,
                                    error=f"{type(err).__name__}: {err}"))
            continue
        seq.append((functools.partial(rec.run, backend=backend), inputs))
        kept_calls.append((op, shape, dname, backend))
    if not seq:
        return [], failures
    kw = {k: v for k, v in (timing_kwargs or {}).items()
          if k in ("min_samples", "min_time_s", "max_time_s", "noise_target")}
    with skip_value_checks():  # once around the sequence, as the eager loop enters it once per step
        timings = timing.measure_sequence(seq, device=dev, **kw)
    resident = sum(timing.working_set_bytes(inputs) for _, inputs in seq)
    out: list[KernelMeasurement] = []
    for (op, shape, dname, backend), measured in zip(kept_calls, timings, strict=True):
        if keep is not None and not keep((op, shape, dname, backend)):
            continue
        earlier = (prior or {}).get((op, tuple(sorted(shape.items())), dname, backend))
        if earlier is not None:
            measured = timing.merge_timings([earlier[0], measured], [earlier[1], 1])
        flops, min_bytes = get_op(op).cost(shape, parse_dtype(dname))
        point = roofline(int(flops), int(min_bytes), measured.median_us, spec=None, ceilings=ceilings,
                         dtype=math_dtype(op, dname, None))
        explain_cache(point, resident, f"one of the {len(seq)} calls of a step, round-robin")
        out.append(KernelMeasurement(op=op, shape=shape, dtype=dname, backend=backend, device=_device_name(str(dev)),
                                     timing=measured, roofline=point, energy=None,
                                     energy_reason=energy_mod.energy_not_asked(dev)))
    return out, failures


# -------------------------------------------------------------------------------------------------------- runs


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_run(command: Sequence[str], device: str | torch.device) -> RunResult:
    """An empty RunResult whose provenance (host, device, versions, git sha, time, command, clocks) is filled."""
    dev = torch.device(device)
    stamp = utc_now()
    provenance = Provenance(host=socket.gethostname(), device=detect_device(dev), versions=versions(),
                            git_sha=git_sha(), timestamp_utc=stamp, command=[str(c) for c in command],
                            clocks=nvml.clocks(dev))
    run_id = f"{stamp.replace('-', '').replace(':', '')}-{uuid.uuid4().hex[:8]}"
    return RunResult(provenance=provenance, run_id=run_id)


def call_key(op: str, shape: Mapping[str, int], dtype: str, backend: str, device: str,
             mode: str) -> tuple[Any, ...]:
    return (op, tuple(sorted(shape.items())), dtype, backend, device, mode)


def _normalise(call: Any, index: int) -> tuple[str, dict[str, int], str, str]:
    if not isinstance(call, (tuple, list)) or len(call) != 4:
        raise ValueError(f"calls[{index}]: expected (op, shape, dtype, backend), got {call!r}")
    op, shape, dtype, backend = call
    rec = get_op(op)
    return op, rec.full_shape(shape), dtype_name(parse_dtype(dtype)), backend


def _describe(op: str, shape: Mapping[str, int], dtype: str, backend: str) -> str:
    return f"{op} {','.join(f'{k}={v}' for k, v in shape.items())} {dtype} {backend}"


def parse_shape(text: str) -> dict[str, int]:
    """'T=16,I=14336' -> {'T': 16, 'I': 14336}; ValueError naming what is wrong."""
    shape: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"shape: expected k=v pairs separated by commas such as T=16,I=14336, got {text!r}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"shape: {key} expected a non-negative int, got {value!r} in {text!r}") from None
        if number < 0:
            raise ValueError(f"shape: {key} expected a non-negative int, got {number} in {text!r}")
        if key in shape:
            raise ValueError(f"shape: key {key!r} given twice in {text!r}")
        shape[key] = number
    if not shape:
        raise ValueError(f"shape: expected k=v pairs such as T=16,I=14336, got {text!r}")
    return shape


# Shape keys that divide (block_size, heads) or size the cache: 0 is refused up front (a ZeroDivisionError in the
# inputs' set-up otherwise); other zeros reach the op, whose own check records a Failure.
POSITIVE_SHAPE_KEYS = ("block_size", "num_blocks", "Hq", "Hkv", "D")


def plan_calls(ops: Sequence[str], backends: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Mapping[str, int]],
               device: str | torch.device) -> tuple[list[Call], list[str]]:
    """The checked cross product of ops x shapes x dtypes x backends, and the combinations skipped (with why).

    ValueError for an unknown op, backend or dtype, or a shape key that none of the ops takes. Each op takes the
    keys it knows from each shape (its default shape fills the rest). A backend that cannot run an op here, or a
    dtype the op does not take, is skipped with the reason; ValueError when nothing at all is left to run.
    """
    if not ops:
        raise ValueError(f"op: expected at least one of {sorted(OPS)}, got none")
    recs = [get_op(op) for op in ops]
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    dnames = [dtype_name(parse_dtype(d)) for d in dtypes]
    known = {k for rec in recs for k in rec.shape_keys}
    for shape in shapes:
        unknown = sorted(set(shape) - known)
        if unknown:
            takes = "; ".join(f"{rec.name}: {', '.join(rec.shape_keys)}" for rec in recs)
            raise ValueError(f"shape: unknown key(s) {unknown}; the ops take ({takes})")
    for shape in shapes:
        for key in POSITIVE_SHAPE_KEYS:
            if shape.get(key) == 0:  # a divisor or a tensor dimension of the inputs: 0 can never be measured
                raise ValueError(f"shape: {key} expected a positive int, got 0")
    dev = torch.device(device)
    calls: list[Call] = []
    skipped: list[str] = []
    for rec in recs:
        available = rec.available_backends(dev)
        op_shapes = [{k: v for k, v in s.items() if k in rec.shape_keys} for s in shapes] or [{}]
        for backend in backends:
            if available[backend] is not None:
                skipped.append(f"{rec.name} {backend}: {available[backend]}")
                continue
            for dname in dnames:
                if parse_dtype(dname) not in rec.dtypes:
                    skipped.append(f"{rec.name} {dname}: {rec.name} takes {[dtype_name(d) for d in rec.dtypes]}")
                    continue
                calls.extend((rec.name, rec.full_shape(s), dname, backend) for s in op_shapes)
    skipped = list(dict.fromkeys(skipped))
    if not calls:
        raise ValueError(f"nothing to run on {dev}: " + "; ".join(skipped))
    return calls, skipped


def bench_calls(calls: Sequence[Call], device: str | torch.device = "cuda", *, mode: str = "events",
                energy: bool = False, seed: int = 0, timing_kwargs: dict[str, Any] | None = None,
                energy_kwargs: dict[str, Any] | None = None, spec: GpuSpec | None | str = AUTO,
                ceilings: Ceilings | None = None, out: str | Path | None = None, run: RunResult | None = None,
                cache: dict[tuple[Any, ...], KernelMeasurement | Failure] | None = None,
                on_result: Callable[[KernelMeasurement | Failure], None] | None = None,
                progress: bool = True, cpu_passes: int = 1) -> tuple[list[KernelMeasurement], list[Failure]]:
    """Measure every (op, shape, dtype, backend) call, once each; return (measurements, failures).

    `cpu_passes` > 1 (CPU only): the sweep is made that many times, each pass with 1/cpu_passes of the timing
    budget (min_time_s, max_time_s), and each call's passes are merged (timing.merge_timings): a CPU whose speed
    drifts for seconds at a time then moves one pass of a call, not its median (docs/measurement.md, "CPU runs").

    With `out`, the RunResult (`run`, or a new one) is saved atomically after every call, so an interrupted or
    crashed sweep leaves a valid file. A call that raises RuntimeError (out of memory included) or ValueError is
    recorded as a Failure with its error text and the sweep goes on; KeyboardInterrupt saves, then re-raises.
    `cache` (shared across sweeps of one run) maps a call's key to its result so nothing is measured twice.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    if isinstance(cpu_passes, bool) or not isinstance(cpu_passes, int) or cpu_passes < 1:
        raise ValueError(f"cpu_passes: expected a positive int, got {cpu_passes!r}")
    passes = cpu_passes if dev.type == "cpu" else 1
    if passes > 1:
        timing_kwargs = timing.per_pass(timing_kwargs, passes)
    normalised = [_normalise(c, i) for i, c in enumerate(calls)]
    if out is not None and run is None:
        run = new_run(sys.argv, dev)
    if run is not None and ceilings is not None and run.ceilings is None:
        run.ceilings = ceilings
    datasheet = _resolve_spec(spec, dev)
    cache = {} if cache is None else cache

    def save() -> None:
        if out is not None and run is not None:
            save_run(run, out)

    meter = None
    idle_power_w = None
    energy_failed: str | None = None  # why energy was asked for but could not be measured for any call
    if energy and energy_mod.energy_status(dev) is None:
        try:
            meter = energy_mod.make_meter(dev)
            # Once per run, a sleeping window as long as a kernel window (docs/measurement.md, kernel energy 3), after
            # the GPU has settled.
            idle_power_w = energy_mod.measure_idle_power(meter, (energy_kwargs or {}).get("window_s", 1.0),
                                                         settle_s=IDLE_SETTLE_S if dev.type == "cuda" else 0.0)
        except STEP_ERRORS as err:  # a failed NVML read: the timings still stand, energy is None with the reason
            energy, meter, energy_failed = False, None, f"idle power measurement failed ({type(err).__name__}: {err})"
        if run is not None:
            run.notes.append(f"energy not measured: {energy_failed}" if energy_failed else
                             f"idle power {idle_power_w:.1f} W (measured, once for this run); dynamic energy per "
                             "call = total - idle power x time per call")

    kernels: list[KernelMeasurement] = []
    failures: list[Failure] = []
    console = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("bench", total=len(normalised))
        for op, shape, dname, backend in normalised:
            key = call_key(op, shape, dname, backend, str(dev), mode)
            label = _describe(op, shape, dname, backend)
            bar.update(task, description=label)
            if key in cache:
                bar.advance(task)
                continue
            result: KernelMeasurement | Failure
            try:
                result = bench_op(op, shape, dname, backend, dev, mode=mode, energy=energy, meter=meter,
                                  idle_power_w=idle_power_w, seed=seed, timing_kwargs=timing_kwargs,
                                  spec=datasheet, ceilings=ceilings, energy_kwargs=energy_kwargs)
            except KeyboardInterrupt:
                failure = Failure(op=op, shape=shape, dtype=dname, backend=backend,
                                  error="interrupted (KeyboardInterrupt) before this call finished")
                failures.append(failure)
                if run is not None:
                    run.failures.append(failure)
                    run.notes.append(f"interrupted at {label}: the calls after it were not measured")
                    mark_interrupted(run, f"the kernel benchmark of {label}")
                save()
                raise
            except SWEEP_ERRORS as err:  # torch.OutOfMemoryError is a RuntimeError; Triton's errors are not
                result = Failure(op=op, shape=shape, dtype=dname, backend=backend,
                                 error=f"{type(err).__name__}: {err}")
            if isinstance(result, Failure):
                _free(dev)  # after the except block: its traceback held the failed call's tensors until now
            elif energy_failed:
                result.energy_reason = energy_failed
            cache[key] = result
            if isinstance(result, Failure):
                failures.append(result)
                if run is not None:
                    run.failures.append(result)
            else:
                kernels.append(result)
                if run is not None:
                    run.kernels.append(result)
            save()
            if on_result is not None:
                on_result(result)
            bar.advance(task)
        if passes > 1 and kernels:
            _more_passes(kernels, passes, dev, seed, timing_kwargs, datasheet, ceilings, run, cache, mode, save,
                         bar, task)
    if meter is not None and idle_power_w is not None and kernels:
        _bracket_idle(meter, idle_power_w, dev, energy_kwargs, run)
        save()
    return kernels, failures


def _more_passes(kernels: list[KernelMeasurement], passes: int, dev: torch.device, seed: int,
                 timing_kwargs: dict[str, Any], datasheet: GpuSpec | None, ceilings: Ceilings | None,
                 run: RunResult | None, cache: dict[tuple[Any, ...], Any], mode: str, save: Callable[[], None],
                 bar: Progress, task: Any) -> None:
    """Passes 2..`passes` of a CPU sweep (bench_calls): each kernel measured again and merged with its earlier
    passes, in place in `kernels`, `run.kernels` and `cache`; saved after every call. Interrupted, each kernel keeps
    the passes it has (its note says how many)."""
    bar.update(task, total=len(kernels) * passes)
    held = [1] * len(kernels)  # passes each kernel's timing holds
    for p in range(2, passes + 1):
        for i, k in enumerate(kernels):
            bar.update(task, description=f"{_describe(k.op, k.shape, k.dtype, k.backend)} (pass {p})")
            try:
                again = bench_op(k.op, k.shape, k.dtype, k.backend, dev, mode=mode, seed=seed,
                                 timing_kwargs=timing_kwargs, spec=datasheet, ceilings=ceilings, prior=k.timing,
                                 prior_passes=held[i])
            except KeyboardInterrupt:
                if run is not None:
                    run.notes.append(f"interrupted in pass {p} of {passes}: each kernel keeps the passes it finished")
                    mark_interrupted(run, f"pass {p} of the kernel benchmark")
                save()
                raise
            except SWEEP_ERRORS as err:  # measured before, failed now: keep the passes it has, say so
                k.timing.note += f"; pass {p} failed ({type(err).__name__}: {err})"
                continue
            held[i] += 1
            if run is not None:
                run.kernels = [again if x is k else x for x in run.kernels]
            cache[call_key(k.op, k.shape, k.dtype, k.backend, str(dev), mode)] = again
            kernels[i] = again
            save()
            bar.advance(task)


def _bracket_idle(meter: Any, before_w: float, dev: torch.device, energy_kwargs: dict[str, Any] | None,
                  run: RunResult | None) -> float | None:
    """Idle power again after the sweep (after a settle), so the run says whether the idle baseline it subtracted
    held; returns the second reading (None when it failed: the first one stands)."""
    try:
        after_w = energy_mod.measure_idle_power(meter, (energy_kwargs or {}).get("window_s", 1.0),
                                                settle_s=IDLE_SETTLE_S if dev.type == "cuda" else 0.0)
    except STEP_ERRORS as err:
        if run is not None:
            run.notes.append(f"idle power after the sweep not measured ({type(err).__name__}: {err})")
        return None
    meter.idle_power_w = before_w  # the sweep's calls were computed against the first reading: keep it
    drift = abs(after_w - before_w) / before_w if before_w > 0 else 0.0
    if run is not None:
        run.notes.append(f"idle power bracketed: {before_w:.1f} W before the kernels, {after_w:.1f} W after "
                         f"({drift:.1%} apart)" + (f"; above {IDLE_DRIFT_WARN:.0%}: dynamic energy per call is "
                                                  "uncertain by about that share of idle power x time"
                                                  if drift > IDLE_DRIFT_WARN else ""))
    return after_w
