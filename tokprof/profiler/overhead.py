"""What the eager decode loop pays beyond its kernels, measured by a micro-benchmark of its own.

    oh = measure_overhead(ModelConfig.from_name("tiny"), [1, 4], "cpu", dtype="fp32", backend="torch")
    oh.host_work_us(4), oh.dispatch_us("linear")
    run.overhead = oh.to_dict()                       # recorded in the RunResult (docs/run-result.md, "overhead")

Two terms, both measured on this device:

1. Per-step host work: tokprof's own Transformer decode step (tokprof.models.transformer) with every kernel call
   replaced by a stub that hands back the output recorded in a real step. What remains is what the loop runs besides
   the plan's kernels: the layer loop and its closures, the views and slices of the fused QKV output, `no_grad` and
   the value-check switch, and the four bookkeeping ops that advance the decode state (copy the sampled tokens, add 1
   to positions and sequence lengths, gather the next KV slots). The stubs' own call cost (measured: a call that
   returns the next recorded output) is taken off, since each real kernel call's Python call is inside its measured
   kernel time. The step runs on a narrowed copy of the model (hidden, intermediate and vocabulary sizes 64; the same
   layers, heads, head_dim and q/k norms), whose host work is the same: nothing in it depends on those sizes, and a
   large model's weights are not allocated a second time.
2. Per-call dispatch, by op: host time of one call of the op's public function (argument checks, the backend's
   Python, torch's op dispatch; value checks skipped as in the timed loop). On the CPU it is timed at the narrowed
   model's batch-1 shapes, where the arithmetic is negligible, so it is the fixed cost in every call; on a GPU, at
   the model's own batch-1 shapes (already compiled), timed on the host without waiting for the GPU: what the host
   spends issuing each call.

How tokprof.rollup.step_prediction uses them: on the CPU every op runs synchronously and its measured time already
holds its dispatch, so an eager step = kernel sum + host work; on a GPU the host issues calls while the GPU runs
them, so an eager step = the larger of the GPU's kernel sum and the host's dispatch sum + host work.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from tokprof.profiler.schema import from_dict, to_dict

NARROW_SIZE = 64  # hidden, intermediate and vocabulary sizes of the narrowed model of the host-work benchmark
HOST_STEPS = 100  # stubbed decode steps timed per batch
DISPATCH_CALLS = 200  # calls timed per op
STUB_CALLS = 20000  # stub calls timed to measure the stub's own cost


@dataclass
class HostWork:
    """Host work of one eager decode step at `batch`, kernels excluded (measured)."""

    batch: int
    per_step_us: float  # median over the steps, the stubs' cost taken off
    p10_us: float
    p90_us: float
    kernel_calls: int  # kernel calls per step, each replaced by a stub
    stub_call_us: float  # the cost of one stub call, taken off per kernel call
    steps: int


@dataclass
class DispatchCost:
    """Host time of one call of `op` at a shape where compute is negligible (CPU) or the host does not wait (GPU)."""

    op: str
    shape: dict[str, int]
    per_call_us: float  # median
    p10_us: float
    p90_us: float
    calls: int


@dataclass
class Overhead:
    """The eager loop's costs beyond the kernels, for one model on one device (module docstring)."""

    model: str
    device: str  # device name (the GPU, or the CPU model)
    kind: str  # "cpu" | "cuda"
    backend: str
    dtype: str
    host_work: list[HostWork]
    dispatch: list[DispatchCost]
    cpu_other_cores: float | None = None  # mean cores other processes kept busy meanwhile (CPU); None: unknown
    provenance: str = "measured"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Overhead:
        return from_dict(cls, dict(d), "Overhead")

    def host_work_us(self, batch: int) -> float | None:
        """Host work per step at `batch`; the nearest measured batch's where `batch` was not measured (it hardly
        depends on batch: the bookkeeping ops are (batch,)-sized); None when nothing was measured."""
        if not self.host_work:
            return None
        return min(self.host_work, key=lambda h: (abs(h.batch - batch), h.batch)).per_step_us

    def dispatch_us(self, op: str) -> float | None:
        return next((d.per_call_us for d in self.dispatch if d.op == op), None)


def _narrow(config: Any) -> Any:
    """The same layers, heads, head_dim and norms at hidden/intermediate/vocab NARROW_SIZE (see the module doc)."""
    return dataclasses.replace(config, name=f"{config.name} (narrowed)", hidden_size=NARROW_SIZE,
                               intermediate_size=NARROW_SIZE, vocab_size=NARROW_SIZE)


def _kernel_names() -> list[str]:
    """The kernel functions the Transformer module calls by name: the ones a stub replaces."""
    from tokprof.kernels import OPS
    from tokprof.models import transformer

    return [name for name in OPS if callable(getattr(transformer, name, None))]


@contextmanager
def _patched(functions: Mapping[str, Callable[..., Any]]) -> Iterator[None]:
    from tokprof.models import transformer

    saved = {name: getattr(transformer, name) for name in functions}
    try:
        for name, fn in functions.items():
            setattr(transformer, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(transformer, name, fn)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stub_call_us(chunks: int = 20) -> float:
    """One call of a stub that returns the next recorded output (what each kernel call becomes): the fastest of
    `chunks` chunks of calls, since a fixed cost is what is wanted and a chunk that another process interrupted is
    only slower."""
    per_chunk = STUB_CALLS // chunks
    outputs = [None] * per_chunk
    best = float("inf")
    for _ in range(chunks):
        it = iter(outputs)

        def stub(*_args: Any, _it: Iterator[Any] = it, **_kwargs: Any) -> Any:
            return next(_it)

        t0 = time.perf_counter_ns()
        for _ in range(per_chunk):
            stub(1, 2, backend="x")
        best = min(best, (time.perf_counter_ns() - t0) / 1e3 / per_chunk)
    return best


def measure_host_work(config: Any, batch: int, device: torch.device | str, dtype: torch.dtype,
                      steps: int = HOST_STEPS) -> HostWork:
    """Host work of one eager decode step of tokprof's Transformer at `batch` (module docstring, term 1)."""
    from tokprof.models.transformer import Transformer

    dev = torch.device(device)
    model = Transformer.random(_narrow(config), device=dev, dtype=dtype, backend="torch")
    prompt = torch.randint(0, NARROW_SIZE, (batch, 8), generator=torch.Generator().manual_seed(0))
    model.prefill(prompt, max_new_tokens=steps + 8)
    for _ in range(3):  # the first step runs the value checks; later ones skip them, as in the timed loop
        model.decode_step()
    snap = model.snapshot()
    recorded: list[Any] = []
    names = _kernel_names()
    real = {name: getattr(__import__("tokprof.models.transformer", fromlist=[name]), name) for name in names}

    def recorder(fn: Callable[..., Any]) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            recorded.append(out)
            return out
        return record

    with _patched({name: recorder(fn) for name, fn in real.items()}):
        model.decode_step()
    state: dict[str, Iterator[Any]] = {"it": iter(recorded)}

    def stub(*_args: Any, **_kwargs: Any) -> Any:
        return next(state["it"])

    times: list[float] = []
    with _patched(dict.fromkeys(names, stub)):
        for _ in range(steps):
            model.restore(snap)
            state["it"] = iter(recorded)
            _sync(dev)
            t0 = time.perf_counter_ns()
            model.decode_step()
            times.append((time.perf_counter_ns() - t0) / 1e3)  # host time: the step's launches, not their GPU time
            _sync(dev)
    stub_us = _stub_call_us()
    calls = len(recorded)
    off = calls * stub_us
    times.sort()
    q = statistics.quantiles(times, n=10)
    return HostWork(batch=batch, per_step_us=max(statistics.median(times) - off, 0.0), p10_us=max(q[0] - off, 0.0),
                    p90_us=max(q[-1] - off, 0.0), kernel_calls=calls, stub_call_us=stub_us, steps=steps)


def measure_dispatch(config: Any, device: torch.device | str, dtype: str, backend: str,
                     calls: int = DISPATCH_CALLS, context: int = 16) -> list[DispatchCost]:
    """Host time per call of each op of the decode plan (module docstring, term 2). On a GPU the plan's batch-1
    calls at `context` (the sweep's shortest: its kernels are compiled already); on the CPU the narrowed model's at
    context 16."""
    from tokprof.kernels import OPS
    from tokprof.kernels._common import parse_dtype, skip_value_checks
    from tokprof.models.plan import COLLECTIVE_OPS, decode_plan

    dev = torch.device(device)
    plan_config = _narrow(config) if dev.type == "cpu" else config
    out: list[DispatchCost] = []
    seen: set[str] = set()
    for call in decode_plan(plan_config, 1, 16 if dev.type == "cpu" else context, dtype):
        if call.op in seen or call.op in COLLECTIVE_OPS or call.op not in OPS:
            continue
        seen.add(call.op)
        rec = OPS[call.op]
        shape = rec.full_shape(call.shape)
        inputs = rec.make_inputs(shape, parse_dtype(dtype), dev, 0)
        rec.run(inputs, backend)  # every argument check once, and a compilation where there is one
        times: list[float] = []
        with skip_value_checks():
            for _ in range(10):
                rec.run(inputs, backend)
            _sync(dev)
            for i in range(calls):
                t0 = time.perf_counter_ns()
                rec.run(inputs, backend)
                times.append((time.perf_counter_ns() - t0) / 1e3)
                if i % 64 == 63:
                    _sync(dev)  # outside the timed calls: the GPU's queue never fills
        _sync(dev)
        q = statistics.quantiles(times, n=10)
        out.append(DispatchCost(op=call.op, shape=dict(shape), per_call_us=statistics.median(times), p10_us=q[0],
                                p90_us=q[-1], calls=calls))
    return out


def measure_overhead(config: Any, batches: Sequence[int], device: torch.device | str, *, dtype: str,
                     backend: str, steps: int = HOST_STEPS, calls: int = DISPATCH_CALLS,
                     context: int = 16) -> Overhead:
    """Host work per step at each of `batches` and dispatch per call of each op, on `device` (module docstring)."""
    from tokprof.kernels._common import dtype_name, parse_dtype
    from tokprof.profiler.cpu_load import CpuLoad
    from tokprof.profiler.devices import detect_device

    dev = torch.device(device)
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"batches: expected a non-empty list of positive ints, got {list(batches)!r}")
    torch_dtype = parse_dtype(dtype)
    meter = CpuLoad.start()
    with torch.no_grad():
        host = [measure_host_work(config, b, dev, torch_dtype, steps) for b in sorted(set(batches))]
        dispatch = measure_dispatch(config, dev, dtype_name(torch_dtype), backend, calls, context)
    load = meter.stop() if dev.type == "cpu" else None
    notes = [f"host work: tokprof's decode step with its {host[0].kernel_calls} kernel calls stubbed, on a narrowed "
             f"copy of {config.name} (hidden/intermediate/vocab {NARROW_SIZE}), {steps} steps per batch",
             f"dispatch: {calls} calls per op, host time, "
             + ("narrowed batch-1 shapes (compute negligible)" if dev.type == "cpu" else
                "the model's batch-1 shapes, without waiting for the GPU")]
    if load is not None:
        notes.append(load.note())
    return Overhead(model=config.name, device=detect_device(dev).name, kind=dev.type, backend=backend,
                    dtype=dtype_name(torch_dtype), host_work=host, dispatch=dispatch,
                    cpu_other_cores=load.other_cores if load is not None else None, notes=notes)
