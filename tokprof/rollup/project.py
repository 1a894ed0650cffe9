"""Tokens/s and cost on a GPU you did not measure: projected from a measured run, or modelled from specs alone.

    points = project(run, "b200")             # each op's measured efficiency on the source GPU, on B200's roofline
    points = modelled(cfg, "h200", [1, 64], [8192])   # the step model (tokprof.rollup.step_model) on the datasheet
    points = modelled(cfg, "h200", [1, 64], [8192], efficiency=0.8)  # a flat stated efficiency instead of its curves

For one kernel call of `flops` and `min_bytes` on a GPU with datasheet peaks:

    t_roof = max(flops / peak_flops(dtype), min_bytes / peak_hbm_bandwidth)
    projected time = t_roof(target) / efficiency_datasheet(measured on the source GPU)
    modelled time  = the step model's op time (latency + roof / efficiency curve), or t_roof / stated efficiency

The step time is the sum over the decode plan of count x time, plus the step model's per-step overhead (host work,
launches, sampling: no kernel measurement holds it); points are labelled `projected` or `modelled`. Every point
knows its memory (tokprof.rollup.capacity); one that does not fit on the GPU is infeasible: tokens/s None, and
`infeasible_reason` says what it needs and what the GPU has.
Energy is not carried across GPUs: J/token is None, and the reason gives the TDP x step-time upper bound.

With tensor parallelism (`tp` > 1) the plan is one GPU's (tokprof.models.tp) and its collectives are timed from the
GPU's interconnect spec by the step model (algorithm by message size and GPU count, labelled modelled): the step
time is kernels + count x collective time + overhead, tokens/s per GPU divides by tp.
"""

from __future__ import annotations

from collections.abc import Mapping

from tokprof.models.config import ModelConfig
from tokprof.models.plan import COLLECTIVE_OPS, DEFAULT_BLOCK_SIZE, KernelCall, decode_plan
from tokprof.models.tp import check_tp
from tokprof.profiler import collectives as coll
from tokprof.profiler.devices import GpuSpec, load_specs, match_spec
from tokprof.profiler.schema import KernelMeasurement, RunResult
from tokprof.quant.precision import check_supported, math_dtype, parse_precision
from tokprof.rollup.capacity import DEFAULT_MEMORY_UTILIZATION, memory_budget
from tokprof.rollup.economics import PriceOptions
from tokprof.rollup.interconnect import CollectiveOptions, tp_step
from tokprof.rollup.records import OpShare, RollupPoint, build_point, check_sweep, infeasible_point, points_from_run
from tokprof.rollup.step_model import StepEstimate, StepModel, reference_step_model

# Short names people type for a spec-table row: "H100" means the SXM part (the HGX boards clouds rent, and the
# part the InferenceX price sheet prices).
GPU_ALIASES = {"h100": "h100-sxm"}

# The flat efficiency tokprof used before the step model (tokprof.rollup.step_model): kept as a named value for
# callers that state it explicitly (modelled(..., efficiency=DEFAULT_EFFICIENCY)); the default is now the step model.
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


def modelled(config: ModelConfig, gpu: str | GpuSpec, batches: list[int], contexts: list[int],
             dtype: str = "bf16", efficiency: float | Mapping[str, float] | None = None, *,
             prices: PriceOptions | None = None, block_size: int = DEFAULT_BLOCK_SIZE, tp: int = 1,
             collectives: CollectiveOptions | None = None, step_model: StepModel | None = None,
             memory_utilization: float = DEFAULT_MEMORY_UTILIZATION, ep: int = 1,
             dp_attention: bool = False) -> list[RollupPoint]:
    """Points from the datasheet alone, timed by the step model (tokprof.rollup.step_model: efficiency curves, the
    per-step overhead, collectives by algorithm); `efficiency` (one number or per op) replaces the op curves with a
    flat fraction of the roof. A point that does not fit in the GPU's memory (tokprof.rollup.capacity) is infeasible:
    no tokens/s, the reason says what it needs.

    tp > 1: one GPU's plan of a tensor-parallel group, its collectives over the GPU's link (or `collectives`'s
    named GPU / link, a stated fixed latency and link efficiency).
    MoE models: ep > 1 splits the routed experts over ep GPUs (tokprof.models.plan_moe_parallel): with ep == tp the
    EP group is the TP group (one batch over tp GPUs); with dp_attention (tp 1) each of the ep GPUs runs its own
    `batch` through attention and exchanges tokens with the dispatch/combine all-to-alls, so tokens/s per GPU is
    that GPU's batch / step time."""
    spec = resolve_gpu(gpu)
    tp = _check_tp(tp)
    check_tp(config, tp)
    if ep != 1 or dp_attention:
        from tokprof.models.plan_moe_parallel import check_parallel

        check_parallel(config, tp, ep, dp_attention)
    ep_note = ([f"expert parallel over {ep} GPUs (routed experts / {ep} per GPU)"
                + (", data-parallel attention: the batch is each GPU's own, tokens/s per GPU = batch / step "
                   "time; dispatch + combine all-to-all of batch x top_k x hidden x dtype bytes per MoE layer, "
                   "(ep-1)/ep of it to other GPUs" if dp_attention else "; the EP group is the TP group")]
               if ep > 1 else [])
    # the step model: the caller's, else one fitted to a shipped reference run of this GPU, else the defaults
    model = _with_collective_options(step_model or reference_step_model(spec.key) or StepModel(), collectives)
    link_spec = _interconnect(collectives, spec)
    batches, contexts = check_sweep(batches, contexts)
    precision = parse_precision(dtype)
    check_supported(precision, spec=spec)  # e.g. W8A8 on a GPU without fp8 tensor cores
    dname = precision.label  # "bf16", or a low-precision label ("fp8", "nvfp4+kv-fp8")
    pricing = (prices or PriceOptions()).for_gpu(spec.key)
    if efficiency is not None:
        model.describe(efficiency)  # validates a flat efficiency up front
    points = []
    for batch in batches:
        for context in contexts:
            memory = memory_budget(config, spec, batch, context, dname, tp, block_size=block_size,
                                   memory_utilization=memory_utilization, ep=ep, dp_attention=dp_attention)
            if memory.fits is False:
                points.append(infeasible_point(model=config.name, gpu=spec.key, batch=batch, context=context,
                                               dtype=dname, backend="modelled", provenance="modelled",
                                               memory=memory, tp=tp))
                continue
            calls = decode_plan(config, batch, context, dname, tp=tp, block_size=block_size, ep=ep,
                                dp_attention=dp_attention)
            est = model.step(calls, spec, dname, efficiency, interconnect=link_spec)
            points.append(build_point(
                model=config.name, gpu=spec.key, batch=batch, context=context, dtype=dname, backend="modelled",
                provenance="modelled", ops=est.shares, pricing=pricing,
                energy_reason=f"modelled: no energy measured; {_tdp_bound(spec, est.step_time_us, batch, tp)}",
                notes=[f"modelled from the {spec.name} datasheet ({spec.source}, {spec.date}); "
                       f"{model.describe(efficiency)}", *_collective_notes(est, spec, link_spec),
                       *ep_note],
                tp=tp, collective_provenance="modelled" if tp > 1 else None, memory=memory))
    return points


def _with_collective_options(model: StepModel, options: CollectiveOptions | None) -> StepModel:
    """The step model with the collective settings of `options` (a stated latency, link efficiency, link)."""
    if options is None:
        return model
    changes: dict = {}
    if options.latency_us is not None:
        changes["collective_latency_us"] = options.latency_us
    if options.efficiency != coll.DEFAULT_EFFICIENCY:
        changes["collective_efficiency"] = options.efficiency
    if options.link != coll.AUTO:
        changes["link"] = options.link
    return model.with_overrides(changes) if changes else model


def _interconnect(options: CollectiveOptions | None, own: GpuSpec) -> GpuSpec:
    if options is None or options.interconnect_gpu is None:
        return own
    return resolve_gpu(options.interconnect_gpu)


def _collective_notes(est: StepEstimate, spec: GpuSpec, link_spec: GpuSpec) -> list[str]:
    if est.link is None:
        return []
    notes = [f"collectives modelled over {est.link.kind} ({est.link.gbps_per_direction:g} GB/s per direction; "
             f"{est.link.source}): " + ", ".join(f"{label} {algo}" for label, algo in est.algorithms.items())]
    if link_spec.key != spec.key:
        notes.append(f"collectives modelled on the {link_spec.key} interconnect (named), not {spec.key}'s")
    return notes


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
            collectives: CollectiveOptions | None = None, step_model: StepModel | None = None,
            memory_utilization: float = DEFAULT_MEMORY_UTILIZATION) -> list[RollupPoint]:
    """Carry each op's measured datasheet-roofline efficiency on the run's GPU to `target_gpu`'s datasheet.

    The sweep is the run's measured roll-up points (or `batches` x `contexts`, whose calls must all be in the run),
    for every dtype and backend measured unless `dtype` / `backend` pick one, at each point's tensor-parallel
    degree (or `tp`). At tp > 1 the collectives are modelled on the target's interconnect (`collectives`): a
    measurement on the run's GPU times another link. The step model (`step_model`) adds the collectives and the
    per-step overhead that no kernel measurement holds; points that do not fit in the target's memory are
    infeasible (no tokens/s, the reason in infeasible_reason).
    """
    target = resolve_gpu(target_gpu)
    tp = _check_tp(tp) if tp is not None else None
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
    model = _with_collective_options(step_model or StepModel(), collectives)
    link_spec = _interconnect(collectives, target)
    points = []
    for batch, context, dname, backend, point_tp in sweep:
        memory = memory_budget(config, target, batch, context, dname, point_tp, block_size=block_size,
                               memory_utilization=memory_utilization)
        if memory.fits is False:
            points.append(infeasible_point(model=config.name, gpu=target.key, batch=batch, context=context,
                                           dtype=dname, backend=backend, provenance="projected", memory=memory,
                                           tp=point_tp))
            continue
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
            t_roof, bound = roof_time_us(*call.cost(), target, math_dtype(call.op, call.dtype, target, call.shape))
            ops.append(_share(call, t_roof / eff, None, eff, bound))
        # collectives and the per-step overhead are not in a kernel measurement: the step model adds them
        est = model.step(colls, target, dname, interconnect=link_spec, extra_kernel_calls=sum(c.count for c in kernels),
                         extra_gpu_time_us=sum(o.total_us for o in ops))
        ops.extend(est.shares)
        step_us = sum(o.total_us for o in ops)
        points.append(build_point(
            model=config.name, gpu=target.key, batch=batch, context=context, dtype=dname, backend=backend,
            provenance="projected", ops=ops, pricing=pricing,
            energy_reason=f"projected: energy is not carried across GPUs; "
                          f"{_tdp_bound(target, step_us, batch, point_tp)}",
            notes=[f"projected from {source.spec_key} ({source.name}, run {run.run_id or 'unnamed'}): each op's "
                   f"measured efficiency against the {source.spec_key} datasheet applied to the {target.key} "
                   f"datasheet ({target.source}, {target.date}); collectives and the per-step overhead from the "
                   f"step model ({model.describe()})", *_collective_notes(est, target, link_spec)],
            tp=point_tp, collective_provenance="modelled" if point_tp > 1 else None, memory=memory))
    return points
