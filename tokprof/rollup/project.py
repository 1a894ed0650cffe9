"""Tokens/s and cost on a GPU you did not measure: projected from a measured run, or modelled from specs alone.

    points = project(run, "b200")             # each op's measured efficiency on the source GPU, on B200's roofline
    points = modelled(cfg, "h200", [1, 64], [8192], efficiency=0.8)  # datasheet roofline x a stated efficiency

For one kernel call of `flops` and `min_bytes` on a GPU with datasheet peaks:

    t_roof = max(flops / peak_flops(dtype), min_bytes / peak_hbm_bandwidth)
    projected time = t_roof(target) / efficiency_datasheet(measured on the source GPU)
    modelled time  = t_roof(gpu) / stated efficiency

The step time is the sum over the decode plan of count x time; points are labelled `projected` or `modelled`.
Energy is not carried across GPUs: J/token is None, and the reason gives the TDP x step-time upper bound.
"""

from __future__ import annotations

from collections.abc import Mapping

from tokprof.kernels._common import dtype_name, parse_dtype
from tokprof.models.config import ModelConfig
from tokprof.models.plan import DEFAULT_BLOCK_SIZE, KernelCall, decode_plan
from tokprof.profiler.devices import GpuSpec, load_specs, match_spec
from tokprof.profiler.schema import KernelMeasurement, RunResult
from tokprof.rollup.economics import PriceOptions, check_positive
from tokprof.rollup.records import OpShare, RollupPoint, build_point, check_sweep, points_from_run

# Short names people type for a spec-table row: "H100" means the SXM part (the HGX boards clouds rent, and the
# part the InferenceX price sheet prices).
GPU_ALIASES = {"h100": "h100-sxm"}

# A representative stated efficiency for the modelled mode: FACTS.md's best kernels reach ~88-90% of peak
# bandwidth (decode attention, fused norms) and skinny GEMMs ~68-80%; 0.8 sits between. Always printed with results.
DEFAULT_EFFICIENCY = 0.8


def resolve_gpu(gpu: str | GpuSpec, specs: dict[str, GpuSpec] | None = None) -> GpuSpec:
    """A spec-table row from its key ("h200"), a short name ("h100"), or a device name ("NVIDIA H100 80GB HBM3")."""
    if isinstance(gpu, GpuSpec):
        return gpu
    specs = specs if specs is not None else load_specs()
    if not isinstance(gpu, str) or not gpu.strip():
        raise ValueError(f"gpu: expected a spec-table key such as {sorted(specs)[:3]}, got {gpu!r}")
    name = gpu.strip().lower()
    key = name if name in specs else GPU_ALIASES.get(name) or match_spec(gpu, specs)
    if key is None:
        prefixed = [k for k in specs if k.startswith(name + "-")]
        key = prefixed[0] if len(prefixed) == 1 else None
    if key is None or key not in specs:
        raise ValueError(f"gpu: expected one of {sorted(specs)} (tokprof/data/gpus.json), got {gpu!r}")
    return specs[key]


def roof_time_us(flops: int, min_bytes: int, spec: GpuSpec, dtype: str) -> tuple[float, str | None]:
    """(time at the datasheet roof in us, bound) of one call; the bound is None when the dtype's FLOP/s is unknown
    (the time is then the memory term alone, a lower bound)."""
    if spec.hbm_tbps is None:
        raise ValueError(f"gpu: the spec-table row {spec.key!r} has no HBM bandwidth; it cannot bound a kernel")
    t_mem_us = min_bytes / (spec.hbm_tbps * 1e12) * 1e6
    if flops == 0:
        return t_mem_us, "memory"
    peak = spec.peak_tflops(dtype)
    if peak is None:
        return t_mem_us, None
    t_compute_us = flops / (peak * 1e12) * 1e6
    return (t_compute_us, "compute") if t_compute_us > t_mem_us else (t_mem_us, "memory")


def _tdp_bound(spec: GpuSpec, step_us: float, batch: int) -> str:
    if spec.tdp_w is None:
        return f"{spec.key} has no TDP in the spec table, so no upper bound either"
    return (f"upper bound at TDP ({spec.tdp_w:.0f} W for the whole step): "
            f"{spec.tdp_w * step_us * 1e-6 / batch:.3g} J/token")


def _efficiency_for(efficiency: float | Mapping[str, float], op: str) -> float:
    if isinstance(efficiency, Mapping):
        if op not in efficiency:
            raise ValueError(f"efficiency: no entry for op {op!r} (has {sorted(efficiency)}); give every op of the "
                             "plan, or one number")
        value = efficiency[op]
    else:
        value = efficiency
    eff = check_positive(f"efficiency[{op}]" if isinstance(efficiency, Mapping) else "efficiency", value)
    if eff > 1.0:
        raise ValueError(f"efficiency: expected a fraction of the roofline in (0, 1], got {value!r} for {op}")
    return eff


def modelled(config: ModelConfig, gpu: str | GpuSpec, batches: list[int], contexts: list[int],
             dtype: str = "bf16", efficiency: float | Mapping[str, float] = DEFAULT_EFFICIENCY, *,
             prices: PriceOptions | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> list[RollupPoint]:
    """Points from the datasheet alone: every call of the plan at `efficiency` (one number or per op) of its roof."""
    spec = resolve_gpu(gpu)
    batches, contexts = check_sweep(batches, contexts)
    dname = dtype_name(parse_dtype(dtype))
    pricing = (prices or PriceOptions()).for_gpu(spec.key)
    stated = (f"{efficiency:g} for every op" if not isinstance(efficiency, Mapping)
              else ", ".join(f"{op} {e:g}" for op, e in efficiency.items()))
    points = []
    for batch in batches:
        for context in contexts:
            ops = []
            for call in decode_plan(config, batch, context, dname, block_size=block_size):
                eff = _efficiency_for(efficiency, call.op)
                t_roof, bound = roof_time_us(*call.cost(), spec, dname)
                ops.append(_share(call, t_roof / eff, None, eff, bound))
            step_us = sum(o.total_us for o in ops)
            points.append(build_point(
                model=config.name, gpu=spec.key, batch=batch, context=context, dtype=dname, backend="modelled",
                provenance="modelled", ops=ops, pricing=pricing,
                energy_reason=f"modelled: no energy measured; {_tdp_bound(spec, step_us, batch)}",
                notes=[f"modelled from the {spec.name} datasheet ({spec.source}, {spec.date}) at a stated "
                       f"efficiency of the roofline: {stated}; launch gaps between kernels are not modelled"]))
    return points


def _share(call: KernelCall, time_us: float, eff_measured: float | None, eff_datasheet: float | None,
           bound: str | None) -> OpShare:
    return OpShare(op=call.op, label=call.label, count=call.count, time_us=time_us, total_us=call.count * time_us,
                   share=0.0, efficiency_measured=eff_measured, efficiency_datasheet=eff_datasheet, bound=bound,
                   shape=dict(call.shape))


def _measurements(run: RunResult) -> dict[tuple, KernelMeasurement]:
    return {k.key(): k for k in run.kernels}


def project(run: RunResult, target_gpu: str | GpuSpec, *, prices: PriceOptions | None = None,
            batches: list[int] | None = None, contexts: list[int] | None = None, dtype: str | None = None,
            backend: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> list[RollupPoint]:
    """Carry each op's measured datasheet-roofline efficiency on the run's GPU to `target_gpu`'s datasheet.

    The sweep is the run's measured roll-up points (or `batches` x `contexts`, whose calls must all be in the run),
    for every dtype and backend measured unless `dtype` / `backend` pick one.
    """
    target = resolve_gpu(target_gpu)
    if run.model is None:
        raise ValueError("run: has no model section (a kernel-only run); projection needs a roll-up run "
                         "(tokprof rollup ... -o run.json)")
    config = ModelConfig.from_dict(run.model)
    source = run.provenance.device
    if source.spec_key is None:
        raise ValueError(f"run: measured on {source.name!r}, which has no spec-table row, so its kernels have no "
                         "datasheet efficiency to carry; use the modelled mode (modelled(...), --modelled)")
    measured = [p for p in points_from_run(run.rollup) if p.provenance == "measured"]
    if batches is None or contexts is None:
        if not measured:
            raise ValueError("run: has no measured roll-up points; pass batches and contexts")
        sweep = sorted({(p.batch, p.context, p.dtype, p.backend) for p in measured})
    else:
        batches, contexts = check_sweep(batches, contexts)
        kinds = sorted({(k.dtype, k.backend) for k in run.kernels})
        sweep = [(b, c, d, be) for b in batches for c in contexts for d, be in kinds]
    sweep = [s for s in sweep if (dtype is None or s[2] == dtype) and (backend is None or s[3] == backend)]
    if not sweep:
        raise ValueError(f"run: no measurements of dtype {dtype!r} with backend {backend!r} to project")
    pricing = (prices or PriceOptions()).for_gpu(target.key)
    table = _measurements(run)
    points = []
    for batch, context, dname, backend in sweep:
        ops = []
        for call in decode_plan(config, batch, context, dname, block_size=block_size):
            m = table.get((call.op, tuple(sorted(call.shape.items())), dname, backend))
            if m is None:
                raise ValueError(f"run: no measurement of {call.op} {call.shape} {dname} {backend} "
                                 f"(needed for batch {batch}, context {context}); measure it first")
            eff = m.roofline.efficiency_datasheet
            if eff is None:
                raise ValueError(f"run: {call.op} {call.shape} has no datasheet efficiency "
                                 f"({m.roofline.note or 'unknown'}); it cannot be projected")
            t_roof, bound = roof_time_us(*call.cost(), target, dname)
            ops.append(_share(call, t_roof / eff, None, eff, bound))
        step_us = sum(o.total_us for o in ops)
        points.append(build_point(
            model=config.name, gpu=target.key, batch=batch, context=context, dtype=dname, backend=backend,
            provenance="projected", ops=ops, pricing=pricing,
            energy_reason=f"projected: energy is not carried across GPUs; {_tdp_bound(target, step_us, batch)}",
            notes=[f"projected from {source.spec_key} ({source.name}, run {run.run_id or 'unnamed'}): each op's "
                   f"measured efficiency against the {source.spec_key} datasheet applied to the {target.key} "
                   f"datasheet ({target.source}, {target.date})"]))
    return points
