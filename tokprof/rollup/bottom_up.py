"""Bottom-up roll-up: measure each distinct kernel call of the decode plans once, then compose every sweep point.

    points, run = bottom_up(ModelConfig.from_name("llama-3.1-8b"), [1, 8, 64], [1024, 8192], "triton", "cuda",
                            dtype="bf16", out="run.json")

For each (batch, context) the decode plan lists its calls with counts; across the whole sweep each distinct
(op, shape, dtype, backend) on this device is measured once with the harness (tokprof.profiler.bench), and calls
already in `run` are reused. Then, per point:

    step time     = sum over the plan of count x median time per call          (the "kernel sum", layer L2)
    J/token       = sum of count x energy per call / batch                      (total and dynamic, when measured)

and the economics of tokprof.rollup.economics. A point whose calls failed (out of memory, ...) is left out, and the
run's notes say which call failed.

Tensor parallelism (`tp` > 1): the plans are one GPU's of the group (tokprof.models.tp); only their kernel calls
are measured here, and the collectives are split off and timed by tokprof.rollup.interconnect: the run's own
collective measurements (`tokprof bench --op all_reduce --world-size N`) where it has the same size, else modelled
from the interconnect of the run's GPU, or of `collectives.interconnect_gpu` when named (a CPU has none: without a
named GPU the collective time of a CPU point is None with the reason, and its step counts the kernels only).

    step time     = kernel sum + sum over collectives of count x time           (per GPU)
    tokens/s/GPU  = batch / step time / tp,  J/token = tp x kernel energy per GPU step / batch
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokprof.models.config import ModelConfig
from tokprof.models.plan import COLLECTIVE_OPS, DEFAULT_BLOCK_SIZE, KernelCall
from tokprof.profiler.devices import GpuSpec, load_specs
from tokprof.profiler.schema import Ceilings, Failure, KernelMeasurement, RunResult, save_run
from tokprof.quant.precision import parse_precision
from tokprof.rollup.economics import PriceOptions
from tokprof.rollup.interconnect import (
    CollectiveOptions,
    TimedCollectives,
    interconnect_spec,
    time_collectives,
    tp_step,
)
from tokprof.rollup.records import OpShare, RollupPoint, build_point, check_sweep, merge_points

AUTO = "auto"

Key = tuple[str, tuple[tuple[str, int], ...], str, str]  # (op, sorted shape items, dtype, backend)


def _key(call: KernelCall, backend: str) -> Key:
    return (call.op, tuple(sorted(call.shape.items())), call.dtype, backend)


def run_gpu_name(run: RunResult) -> str:
    """The spec-table key of the run's device, else its name (the CPU model for a CPU run)."""
    info = run.provenance.device
    return info.spec_key or info.name


def _step_energy(calls: list[tuple[KernelCall, KernelMeasurement]]) -> tuple[float | None, float | None, str | None]:
    missing = {call.label or call.op: m.energy_reason or "no energy measured" for call, m in calls if m.energy is None}
    if missing:  # one reason for all (a CPU, not asked for) stands alone; else the first call without energy
        reasons = set(missing.values())
        name, reason = next(iter(missing.items()))
        return None, None, reason if len(reasons) == 1 and len(missing) == len(calls) else f"{name}: {reason}"
    total = sum(call.count * m.energy.total_j_per_call for call, m in calls)
    dynamic = sum(call.count * m.energy.dynamic_j_per_call for call, m in calls)
    return total, dynamic, None


def _check_tp(tp: int) -> int:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp: expected a positive int (GPUs of the tensor-parallel group), got {tp!r}")
    return tp


def _run_collectives(run: RunResult, collectives: list[KernelCall], options: CollectiveOptions) -> TimedCollectives:
    """Time one step's collectives: the run's measurements on its own device, else modelled from its spec row or
    from the named interconnect GPU (then the run's own measurements, of another link, are not used)."""
    info = run.provenance.device
    own: GpuSpec | None = load_specs().get(info.spec_key) if info.spec_key else None
    spec, named = interconnect_spec(options, own)
    use_own = not named or (own is not None and spec is not None and spec.key == own.key)
    measured = [k for k in run.kernels if k.op in COLLECTIVE_OPS and k.device == info.name] if use_own else []
    timed = time_collectives(collectives, spec=spec, options=options, measurements=measured)
    if named and not use_own and timed.reason is None:
        timed.notes.insert(0, f"collectives modelled on the {spec.key} interconnect (named), not on {info.name}")
    return timed


def rollup_points(config: ModelConfig, batches: Sequence[int], contexts: Sequence[int], run: RunResult, *,
                  backend: str, dtype: str | torch.dtype = "bf16", prices: PriceOptions | None = None,
                  block_size: int = DEFAULT_BLOCK_SIZE, tp: int = 1,
                  collectives: CollectiveOptions | None = None) -> tuple[list[RollupPoint], list[str]]:
    """Measured points from the kernel measurements already in `run` (nothing is measured here).

    Returns (points, notes): a point with an unmeasured or failed call is left out and a note says why. tp > 1:
    one GPU's kernels from the run, its collectives measured in the run or modelled (see the module docstring)."""
    batches, contexts = check_sweep(batches, contexts)
    tp = _check_tp(tp)
    options = collectives or CollectiveOptions()
    dname = parse_precision(dtype).label  # a float dtype or a low-precision label (tokprof.quant.precision)
    gpu = run_gpu_name(run)
    device_name = run.provenance.device.name
    measured: dict[Key, KernelMeasurement] = {k.key(): k for k in run.kernels if k.device == device_name}
    failed: dict[Key, Failure] = {(f.op, tuple(sorted(f.shape.items())), f.dtype, f.backend): f
                                  for f in run.failures}
    pricing = (prices or PriceOptions()).for_gpu(gpu)
    points: list[RollupPoint] = []
    notes: list[str] = []
    for batch in batches:
        for context in contexts:
            plan, colls = tp_step(config, batch, context, dname, tp, block_size)
            pairs: list[tuple[KernelCall, KernelMeasurement]] = []
            missing = []
            for call in plan:
                m = measured.get(_key(call, backend))
                if m is None:
                    f = failed.get(_key(call, backend))
                    missing.append(f"{call.op} {call.shape}: " + (f.error if f else "not measured in this run"))
                else:
                    pairs.append((call, m))
            if missing:
                notes.append(f"batch {batch} context {context}: no roll-up point, {len(missing)} call(s) "
                             f"without a measurement: {'; '.join(missing)}")
                continue
            ops = [OpShare(op=c.op, label=c.label, count=c.count, time_us=m.time_us, total_us=c.count * m.time_us,
                           share=0.0, efficiency_measured=m.roofline.efficiency_measured,
                           efficiency_datasheet=m.roofline.efficiency_datasheet, bound=m.roofline.bound,
                           shape=dict(c.shape)) for c, m in pairs]
            j_total, j_dynamic, reason = _step_energy(pairs)
            timers = sorted({f"{m.best_timing.timer}/{m.best_timing.mode}" for _, m in pairs})
            graphed = sum(m.graph_timing is not None for _, m in pairs)
            point_notes = [f"kernel sum of {len(pairs)} distinct calls measured on {device_name} "
                           f"(timer/mode {', '.join(timers)}"
                           + (f"; {graphed} short call(s) at their graph-mode time" if graphed else "") + ")"]
            missed = [c.op for c, m in pairs if not m.best_timing.met_noise_target]
            if missed:
                point_notes.append(f"noise target missed for {len(missed)} call(s): {', '.join(sorted(set(missed)))}")
            if j_total is not None:
                point_notes.append("J/token from measured kernel energy: total (j_per_token_total) and total minus "
                                   "idle power x time (j_per_token_dynamic)")
            tp_kw: dict[str, Any] = {}
            if tp > 1:
                timed = _run_collectives(run, colls, options)
                ops.extend(timed.shares)
                point_notes.extend(timed.notes)
                tp_kw = {"collective_provenance": timed.provenance, "collective_reason": timed.reason}
                if j_total is not None:
                    point_notes.append(f"J/token counts the measured kernel energy of each of the {tp} GPUs; the "
                                       "collectives' energy is not measured (a lower bound)")
            points.append(build_point(model=config.name, gpu=gpu, batch=batch, context=context, dtype=dname,
                                      backend=backend, provenance="measured", ops=ops, pricing=pricing,
                                      j_per_step_total=j_total, j_per_step_dynamic=j_dynamic, energy_reason=reason,
                                      notes=point_notes, tp=tp, memory=_run_memory(run, config, batch, context,
                                                                                   dname, tp, block_size), **tp_kw))
    return points, notes


CPU_PASSES = 3  # passes over the points of a CPU sweep (_bench_cpu_sequences)


def _bench_cpu_sequences(config: ModelConfig, batches: Sequence[int], contexts: Sequence[int], run: RunResult,
                         todo: list[tuple[Any, ...]], dname: str, tp: int, block_size: int, backend: str, seed: int,
                         timing_kwargs: dict[str, Any] | None, ceilings: Ceilings | None,
                         out: str | Path | None) -> None:
    """CPU: each point's kernel calls timed round-robin in step order; a call shared by points keeps the first
    point's measurement (the others still run in their sequences, so every call meets a whole step's caches).

    In CPU_PASSES passes over the points, each with 1/CPU_PASSES of the timing budget, each call's passes merged
    (timing.merge_timings): a CPU whose speed drifts for seconds at a time then moves one pass of a point, not its
    kernels' medians. Saved after every point of every pass."""
    from tokprof.profiler.bench import bench_sequence
    from tokprof.profiler.timing import per_pass

    kw = per_pass(timing_kwargs, CPU_PASSES)
    wanted = {(op, tuple(sorted(shape.items())), dt, be) for op, shape, dt, be in todo}
    owner: dict[tuple[int, int], set[tuple[Any, ...]]] = {}  # the calls each point measures (first point wins)
    held: dict[tuple[Any, ...], tuple[Any, int]] = {}  # key -> (timing so far, passes it holds)
    for pass_no in range(1, CPU_PASSES + 1):
        for batch in batches:
            for context in contexts:
                plan = tp_step(config, batch, context, dname, tp, block_size)[0]
                calls = [(c.op, c.shape, c.dtype, backend) for c in plan]
                if pass_no == 1:
                    mine = {k for k in ((c[0], tuple(sorted(c[1].items())), c[2], c[3]) for c in calls)
                            if k in wanted}
                    wanted -= mine
                    owner[(batch, context)] = mine
                mine = owner.get((batch, context), set())
                if not mine:
                    continue
                kernels, failures = bench_sequence(calls, run.provenance.device.kind, seed=seed, timing_kwargs=kw,
                                                   ceilings=ceilings, prior=held,
                                                   keep=lambda c, m=mine: (c[0], tuple(sorted(c[1].items())), c[2],
                                                                           c[3]) in m)
                fresh = {k.key(): k for k in kernels}
                for k in kernels:
                    held[k.key()] = (k.timing, held.get(k.key(), (None, 0))[1] + 1)
                if pass_no == 1:
                    run.kernels.extend(kernels)
                    run.failures.extend(f for f in failures if (f.op, tuple(sorted(f.shape.items())), f.dtype,
                                                                 f.backend) in mine)
                else:
                    run.kernels = [fresh.get(k.key(), k) for k in run.kernels]
                if out is not None:
                    save_run(run, out)


def _run_memory(run: RunResult, config: ModelConfig, batch: int, context: int, dtype: str, tp: int,
                block_size: int) -> Any:
    """The point's memory on the run's GPU (its reported memory, else the spec table's; a CPU: capacity unknown).
    The kernels were measured one by one, so a kernel sum exists even for a point whose model and KV cache would not
    fit on the GPU: such a point is infeasible like a modelled one."""
    from tokprof.rollup.capacity import memory_budget

    info = run.provenance.device
    spec = load_specs().get(info.spec_key) if info.spec_key else None
    device_bytes = info.memory_bytes if info.kind == "cuda" else None
    return memory_budget(config, spec, batch, context, dtype, tp, block_size=block_size, capacity_bytes=device_bytes)


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    strip = {"source"}
    return {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}


def bottom_up(config: ModelConfig, batches: Sequence[int], contexts: Sequence[int], backend: str = "triton",
              device: str | torch.device = "cuda", *, dtype: str | torch.dtype = "bf16", mode: str = "events",
              energy: bool = False, timing_kwargs: dict[str, Any] | None = None,
              energy_kwargs: dict[str, Any] | None = None, ceilings: Ceilings | None | str = AUTO,
              prices: PriceOptions | None = None, run: RunResult | None = None, out: str | Path | None = None,
              command: Sequence[str] | None = None, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = 0,
              progress: bool = True, tp: int = 1, collectives: CollectiveOptions | None = None,
              cpu_timing: str = "sequence") -> tuple[list[RollupPoint], RunResult]:
    """Measure the decode plans of the sweep on `device` and roll them up; returns (points, the filled RunResult).

    `ceilings` AUTO measures this machine's copy bandwidth and GEMM FLOP/s (cached per GPU), None skips them (no
    measured-roofline efficiency), or pass a Ceilings. `run` continues an earlier run of the same device and model:
    its measured calls are reused. With `out`, the run is saved after every call and once more at the end.
    `tp` > 1 measures one GPU's kernel calls of a tensor-parallel group; `collectives` says how its collectives
    are timed where the run has no measurement of them (e.g. CollectiveOptions(interconnect_gpu="h100-sxm") on a
    CPU). On a CPU, `cpu_timing` "sequence" (default) times each point's calls round-robin in step order
    (bench.bench_sequence: the cache state of the eager loop), "alone" times each call repeated by itself.
    """
    from tokprof.profiler.bench import bench_calls, new_run

    if cpu_timing not in ("sequence", "alone"):
        raise ValueError(f"cpu_timing: expected 'sequence' or 'alone', got {cpu_timing!r}")
    from tokprof.profiler.ceilings import measure_ceilings

    batches, contexts = check_sweep(batches, contexts)
    tp = _check_tp(tp)
    dname = parse_precision(dtype).label  # a float dtype or a low-precision label (tokprof.quant.precision)
    dev = torch.device(device)
    if run is None:
        run = new_run(list(command) if command is not None else sys.argv, dev)
    model = config.to_dict()
    if run.model is not None and not _same_model(run.model, model):
        raise ValueError(f"run: holds model {run.model.get('name')!r}, not {config.name!r}; one run file holds one "
                         "model, so write this roll-up to another file")
    run.model = model
    if ceilings == AUTO:
        ceilings = run.ceilings if run.ceilings is not None else measure_ceilings(dev)
    if isinstance(ceilings, Ceilings):
        run.ceilings = ceilings

    distinct: dict[Key, KernelCall] = {}
    for batch in batches:
        for context in contexts:
            for call in tp_step(config, batch, context, dname, tp, block_size)[0]:  # kernels; collectives apart
                distinct.setdefault(_key(call, backend), call)
    device_name = run.provenance.device.name
    have = {k.key() for k in run.kernels if k.device == device_name}
    todo = [(c.op, c.shape, c.dtype, backend) for key, c in distinct.items() if key not in have]
    if todo and dev.type == "cpu" and cpu_timing == "sequence":
        _bench_cpu_sequences(config, batches, contexts, run, todo, dname, tp, block_size, backend, seed,
                             timing_kwargs, ceilings if isinstance(ceilings, Ceilings) else None, out)
    elif todo:
        bench_calls(todo, dev, mode=mode, energy=energy, seed=seed, timing_kwargs=timing_kwargs,
                    energy_kwargs=energy_kwargs, ceilings=ceilings if isinstance(ceilings, Ceilings) else None,
                    out=out, run=run, progress=progress)
    points, notes = rollup_points(config, batches, contexts, run, backend=backend, dtype=dname, prices=prices,
                                  block_size=block_size, tp=tp, collectives=collectives)
    merge_points(run.rollup, points)
    run.notes.extend(notes)
    run.notes.append(f"roll-up: {len(points)} point(s) of {config.name}{f' at tp={tp}' if tp > 1 else ''} from "
                     f"{len(distinct)} distinct calls ({len(todo)} measured now, {len(distinct) - len(todo)} reused)")
    if out is not None:
        save_run(run, out)
    return points, run
