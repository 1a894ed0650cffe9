"""Tokens/s and cost on a GPU you did not measure: projected from a measured run, or modelled from specs alone.

    points = project(run, "b200")             # each op's measured efficiency on the source GPU, on B200's roofline
    points = modelled(cfg, "h200", [1, 64], [8192], efficiency=0.8)  # datasheet roofline x a stated efficiency

For one kernel call of `flops` and `min_bytes` on a GPU with datasheet peaks:

    t_roof = max(flops / peak_flops(dtype), min_bytes / peak_hbm_bandwidth)
    projected time = t_roof(target) / efficiency_datasheet(measured on the source GPU)
    modelled time  = t_roof(gpu) / stated efficiency

The step time is the sum over the decode plan of count x time; points are labelled `projected` or `modelled`.
Energy is not carried across GPUs: J/token is None, and the reason gives the TDP x step-time upper bound.

With tensor parallelism (`tp` > 1) the plan is one GPU's (tokprof.models.tp) and its collectives are timed from the
GPU's interconnect spec at a stated efficiency (tokprof.rollup.interconnect, labelled modelled): the step time is
kernels + count x collective time, tokens/s per GPU divides by tp.
"""

from __future__ import annotations

from collections.abc import Mapping

from tokprof.models.config import ModelConfig
from tokprof.models.plan import COLLECTIVE_OPS, DEFAULT_BLOCK_SIZE, KernelCall
from tokprof.profiler.devices import GpuSpec, load_specs, match_spec
from tokprof.profiler.schema import KernelMeasurement, RunResult
from tokprof.quant.precision import check_supported, math_dtype, parse_precision
from tokprof.rollup.economics import PriceOptions, check_positive
from tokprof.rollup.interconnect import CollectiveOptions, interconnect_spec, time_collectives, tp_step
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


def _tdp_bound(spec: GpuSpec, step_us: float, batch: int, tp: int = 1) -> str:
    if spec.tdp_w is None:
        return f"{spec.key} has no TDP in the spec table, so no upper bound either"
    gpus = f" on each of {tp} GPUs" if tp > 1 else ""
    return (f"upper bound at TDP ({spec.tdp_w:.0f} W for the whole step{gpus}): "
            f"{spec.tdp_w * tp * step_us * 1e-6 / batch:.3g} J/token")


def _check_tp(tp: int) -> int:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp: expected a positive int (GPUs of the tensor-parallel group), got {tp!r}")
    return tp


def _with_collectives(ops: list[OpShare], collectives: list[KernelCall], target: GpuSpec,
                      options: CollectiveOptions) -> tuple[dict, list[str]]:
    """Add the modelled collectives' shares to `ops`; (build_point's tp keywords, notes)."""
    spec, named = interconnect_spec(options, target)
    timed = time_collectives(collectives, spec=spec, options=options)
    ops.extend(timed.shares)
    notes = ([f"collectives modelled on the {spec.key} interconnect (named), not {target.key}'s"]
             if named and spec is not None and spec.key != target.key else [])
    return {"collective_provenance": timed.provenance, "collective_reason": timed.reason}, notes + timed.notes


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
             prices: PriceOptions | None = None, block_size: int = DEFAULT_BLOCK_SIZE, tp: int = 1,
             collectives: CollectiveOptions | None = None) -> list[RollupPoint]:
    """Points from the datasheet alone: every call of the plan at `efficiency` (one number or per op) of its roof.

    tp > 1: one GPU's plan of a tensor-parallel group, its collectives modelled from the interconnect spec
    (`collectives`: stated efficiency and latency, or another GPU's link)."""
    spec = resolve_gpu(gpu)
    tp = _check_tp(tp)
    options = collectives or CollectiveOptions()
    batches, contexts = check_sweep(batches, contexts)
    precision = parse_precision(dtype)
    check_supported(precision, spec=spec)  # e.g. W8A8 on a GPU without fp8 tensor cores
    dname = precision.label  # "bf16", or a low-precision label ("fp8", "nvfp4+kv-fp8")
    pricing = (prices or PriceOptions()).for_gpu(spec.key)
    stated = (f"{efficiency:g} for every op" if not isinstance(efficiency, Mapping)
              else ", ".join(f"{op} {e:g}" for op, e in efficiency.items()))
    points = []
    for batch in batches:
        for context in contexts:
            ops = []
            kernels, colls = tp_step(config, batch, context, dname, tp, block_size)
            for call in kernels:
                eff = _efficiency_for(efficiency, call.op)
                t_roof, bound = roof_time_us(*call.cost(), spec, math_dtype(call.op, call.dtype, spec))
                ops.append(_share(call, t_roof / eff, None, eff, bound))
            tp_kw, tp_notes = _with_collectives(ops, colls, spec, options) if tp > 1 else ({}, [])
            step_us = sum(o.total_us for o in ops)
            points.append(build_point(
                model=config.name, gpu=spec.key, batch=batch, context=context, dtype=dname, backend="modelled",
                provenance="modelled", ops=ops, pricing=pricing,
                energy_reason=f"modelled: no energy measured; {_tdp_bound(spec, step_us, batch, tp)}",
                notes=[f"modelled from the {spec.name} datasheet ({spec.source}, {spec.date}) at a stated "
                       f"efficiency of the roofline: {stated}; launch gaps between kernels are not modelled",
                       *tp_notes], tp=tp, **tp_kw))
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
            backend: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE, tp: int | None = None,
            collectives: CollectiveOptions | None = None) -> list[RollupPoint]:
    """Carry each op's measured datasheet-roofline efficiency on the run's GPU to `target_gpu`'s datasheet.

    The sweep is the run's measured roll-up points (or `batches` x `contexts`, whose calls must all be in the run),
    for every dtype and backend measured unless `dtype` / `backend` pick one, at each point's tensor-parallel
    degree (or `tp`). At tp > 1 the collectives are modelled on the target's interconnect (`collectives`): a
    measurement on the run's GPU times another link.
    """
    target = resolve_gpu(target_gpu)
    tp = _check_tp(tp) if tp is not None else None
    options = collectives or CollectiveOptions()
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
        sweep = sorted({(p.batch, p.context, p.dtype, p.backend, tp or p.tp) for p in measured})
    else:
        batches, contexts = check_sweep(batches, contexts)
        kinds = sorted({(k.dtype, k.backend) for k in run.kernels if k.op not in COLLECTIVE_OPS})
        sweep = [(b, c, d, be, tp or 1) for b in batches for c in contexts for d, be in kinds]
    sweep = [s for s in sweep if (dtype is None or s[2] == dtype) and (backend is None or s[3] == backend)]
    if not sweep:
        raise ValueError(f"run: no measurements of dtype {dtype!r} with backend {backend!r} to project")
    pricing = (prices or PriceOptions()).for_gpu(target.key)
    table = _measurements(run)
    points = []
    for batch, context, dname, backend, point_tp in sweep:
        ops = []
        kernels, colls = tp_step(config, batch, context, dname, point_tp, block_size)
        for call in kernels:
            m = table.get((call.op, tuple(sorted(call.shape.items())), call.dtype, backend))
            if m is None:
                raise ValueError(f"run: no measurement of {call.op} {call.shape} {dname} {backend} "
                                 f"(needed for batch {batch}, context {context}); measure it first")
            eff = m.roofline.efficiency_datasheet
            if eff is None:
                raise ValueError(f"run: {call.op} {call.shape} has no datasheet efficiency "
                                 f"({m.roofline.note or 'unknown'}); it cannot be projected")
            t_roof, bound = roof_time_us(*call.cost(), target, math_dtype(call.op, call.dtype, target))
            ops.append(_share(call, t_roof / eff, None, eff, bound))
        tp_kw, tp_notes = _with_collectives(ops, colls, target, options) if point_tp > 1 else ({}, [])
        step_us = sum(o.total_us for o in ops)
        points.append(build_point(
            model=config.name, gpu=target.key, batch=batch, context=context, dtype=dname, backend=backend,
            provenance="projected", ops=ops, pricing=pricing,
            energy_reason=f"projected: energy is not carried across GPUs; "
                          f"{_tdp_bound(target, step_us, batch, point_tp)}",
            notes=[f"projected from {source.spec_key} ({source.name}, run {run.run_id or 'unnamed'}): each op's "
                   f"measured efficiency against the {source.spec_key} datasheet applied to the {target.key} "
                   f"datasheet ({target.source}, {target.date})", *tp_notes], tp=point_tp, **tp_kw))
    return points
