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
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokprof.kernels._common import dtype_name, parse_dtype
from tokprof.models.config import ModelConfig
from tokprof.models.plan import DEFAULT_BLOCK_SIZE, KernelCall, decode_plan
from tokprof.profiler.schema import Ceilings, Failure, KernelMeasurement, RunResult, save_run
from tokprof.rollup.economics import PriceOptions
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
    total = dynamic = 0.0
    for call, m in calls:
        if m.energy is None:
            return None, None, f"{call.op} {call.label}: {m.energy_reason or 'no energy measured'}"
        total += call.count * m.energy.total_j_per_call
        dynamic += call.count * m.energy.dynamic_j_per_call
    return total, dynamic, None


def rollup_points(config: ModelConfig, batches: Sequence[int], contexts: Sequence[int], run: RunResult, *,
                  backend: str, dtype: str | torch.dtype = "bf16", prices: PriceOptions | None = None,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[list[RollupPoint], list[str]]:
    """Measured points from the kernel measurements already in `run` (nothing is measured here).

    Returns (points, notes): a point with an unmeasured or failed call is left out and a note says why."""
    batches, contexts = check_sweep(batches, contexts)
    dname = dtype_name(parse_dtype(dtype))
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
            plan = decode_plan(config, batch, context, dname, block_size=block_size)
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
            point_notes = [f"kernel sum of {len(pairs)} distinct calls measured on {device_name} "
                           f"(timer {pairs[0][1].timing.timer}, mode {pairs[0][1].timing.mode})"]
            missed = [c.op for c, m in pairs if not m.timing.met_noise_target]
            if missed:
                point_notes.append(f"noise target missed for {len(missed)} call(s): {', '.join(sorted(set(missed)))}")
            if j_total is not None:
                point_notes.append("J/token from measured kernel energy: total (j_per_token_total) and total minus "
                                   "idle power x time (j_per_token_dynamic)")
            points.append(build_point(model=config.name, gpu=gpu, batch=batch, context=context, dtype=dname,
                                      backend=backend, provenance="measured", ops=ops, pricing=pricing,
                                      j_per_step_total=j_total, j_per_step_dynamic=j_dynamic, energy_reason=reason,
                                      notes=point_notes))
    return points, notes


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    strip = {"source"}
    return {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}


def bottom_up(config: ModelConfig, batches: Sequence[int], contexts: Sequence[int], backend: str = "triton",
              device: str | torch.device = "cuda", *, dtype: str | torch.dtype = "bf16", mode: str = "events",
              energy: bool = False, timing_kwargs: dict[str, Any] | None = None,
              energy_kwargs: dict[str, Any] | None = None, ceilings: Ceilings | None | str = AUTO,
              prices: PriceOptions | None = None, run: RunResult | None = None, out: str | Path | None = None,
              command: Sequence[str] | None = None, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = 0,
              progress: bool = True) -> tuple[list[RollupPoint], RunResult]:
    """Measure the decode plans of the sweep on `device` and roll them up; returns (points, the filled RunResult).

    `ceilings` AUTO measures this machine's copy bandwidth and GEMM FLOP/s (cached per GPU), None skips them (no
    measured-roofline efficiency), or pass a Ceilings. `run` continues an earlier run of the same device and model:
    its measured calls are reused. With `out`, the run is saved after every call and once more at the end.
    """
    from tokprof.profiler.bench import bench_calls, new_run
    from tokprof.profiler.ceilings import measure_ceilings

    batches, contexts = check_sweep(batches, contexts)
    dname = dtype_name(parse_dtype(dtype))
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
            for call in decode_plan(config, batch, context, dname, block_size=block_size):
                distinct.setdefault(_key(call, backend), call)
    device_name = run.provenance.device.name
    have = {k.key() for k in run.kernels if k.device == device_name}
    todo = [(c.op, c.shape, c.dtype, backend) for key, c in distinct.items() if key not in have]
    if todo:
        bench_calls(todo, dev, mode=mode, energy=energy, seed=seed, timing_kwargs=timing_kwargs,
                    energy_kwargs=energy_kwargs, ceilings=ceilings if isinstance(ceilings, Ceilings) else None,
                    out=out, run=run, progress=progress)
    points, notes = rollup_points(config, batches, contexts, run, backend=backend, dtype=dname, prices=prices,
                                  block_size=block_size)
    merge_points(run.rollup, points)
    run.notes.extend(notes)
    run.notes.append(f"roll-up: {len(points)} point(s) of {config.name} from {len(distinct)} distinct calls "
                     f"({len(todo)} measured now, {len(distinct) - len(todo)} reused)")
    if out is not None:
        save_run(run, out)
    return points, run
