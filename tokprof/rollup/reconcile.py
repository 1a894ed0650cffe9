"""The iceberg: from the datasheet roofline down to what users get, layer by layer, for each measured point.

    recs = reconcile(load_run("run.json"), utilisation=0.6)
    recs[0].layers[2].tokens_per_s_per_gpu, recs[0].bottom_up_error_pct, recs[0].op_inefficiency[0].lost_us

For one (model, GPU, batch, context, dtype) point (docs/design.md, "The iceberg"):

    L0 datasheet roofline   sum over the decode plan of count x max(flops / peak FLOP/s, bytes / peak HBM B/s)
    L1 measured roofline    the same at the copy bandwidth and GEMM FLOP/s measured in the run
    L2 kernel sum           the roll-up point: sum of count x measured time per call (bottom-up)
    L3 end to end, graphs   tokprof's decode loop with the step captured in a CUDA graph (measured)
    L4 end to end, eager    tokprof eager, else a framework (vLLM, transformers) (measured)
    L5 served               a continuous-batching server (tokprof.serving: measured, else simulated) when
                            `served` is given; L4 (else L3) x a utilisation the user states overrides it

Each layer: tokens/s per GPU (batch / step time), $/M tokens (the point's $/GPU-hour), J/token. The gap from one
known layer to the next known one is named after the layers it crosses; each loss's share is of the sum of the
losses, so the shares add up to 100%. The reconciliation cannot contradict itself silently: a layer faster than the
known layer above it is `inverted`, has no share, and is flagged (`flags`) with its likely cause (INVERSION_CAUSES);
a CPU run that other processes competed with is `reliable = False` with the reason, so none of its gaps is a
finding. Inside L1 -> L2, each op's lost time (measured - time at the measured roof) and its share of the ops'
losses (adding up to 100%); an op faster than its roof is not a negative loss but a flag (`finding = False`), and
`op_gains_us` / `op_unexplained_us` say what separates the losses from the gap.

L4 (eager; and L3, graphs, on a GPU) also gets `predicted_step_time_us`: the kernel sum plus the overheads the
run measured (tokprof.rollup.step_prediction, tokprof.profiler.overhead), computed from the roll-up point and the
overhead record only, and `prediction_error_pct` against the measured step. Bottom-up error, signed, in tokens/s:
(L2 - L3) / L3 x 100 (against L4 when no graph run; positive = the kernel sum promises more than the loop gives).
J/token at L0/L1 is modelled at the GPU's TDP for the roofline time (an upper bound for that time); at L5 the idle
share of the time is charged at the datasheet idle power.

Tensor-parallel points (tp > 1, one GPU's step of a group of tp) get one more layer, and every layer's tokens/s per
GPU is batch / step time / tp (J/token counts the tp GPUs):

    L1i interconnect roof   L1 (else L0) + the plan's collectives at the link roof (bytes x busbw factor / link
                            bandwidth per direction, no latency): the gap above it is "interconnect (all-reduce)"

and the gap L1i -> L2 is the kernels' and the collectives' inefficiency (op_inefficiency lists the collectives
too, against their link roof). tp = 1 points have no L1i layer; end-to-end layers (L3, L4) are single-GPU runs, so
a tp > 1 point has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tokprof.profiler.schema import Ceilings, RunResult, from_dict, to_dict
from tokprof.rollup.reconcile_checks import check_op_invariants, contention_note, flag_inversions


def modelled_gap(name: str) -> str:
    """A modelled L2 is the roofline at a stated efficiency: its gap is that assumption, not a measured loss
    ("kernel inefficiency" -> "assumed kernel efficiency (modelled)")."""
    return f"assumed {name.replace('inefficiency', 'efficiency')} (modelled)"


LAYERS = (
    ("L0", "datasheet roofline", None),
    ("L1", "measured roofline", "hardware derate"),
    ("L2", "kernel sum (bottom-up)", "kernel inefficiency"),
    ("L3", "end to end, CUDA graphs", "launch gaps and synchronisation"),
    ("L4", "end to end, eager or a framework", "host and framework overhead"),
    ("L5", "served at the stated utilisation", "idle capacity"),
)
# The interconnect layer of tensor-parallel points, inserted after L1; the kernel-sum gap then holds collectives too.
INTERCONNECT_LAYER = ("L1i", "interconnect at the link roof", "interconnect (all-reduce)")
TP_L2_GAP = "kernel and collective inefficiency"
L4_PREFERENCE = ("tokprof", "vllm", "transformers")


def layer_defs(tp: int) -> tuple[tuple[str, str, str | None], ...]:
    """(name, title, gap name) of each layer of a point at tensor-parallel degree `tp`, top to bottom."""
    if tp == 1:
        return LAYERS
    l2 = LAYERS[2]
    return (*LAYERS[:2], INTERCONNECT_LAYER, (l2[0], l2[1], TP_L2_GAP), *LAYERS[3:])


@dataclass
class Layer:
    name: str  # "L0" .. "L5"
    title: str
    tokens_per_s_per_gpu: float | None
    step_time_us: float | None = None
    usd_per_million_tokens: float | None = None
    j_per_token: float | None = None
    provenance: str | None = None  # "measured" | "modelled" | "projected"; None when the layer is unknown
    source: str = ""  # what the figure was computed from
    reason: str | None = None  # why tokens/s (or another figure) is None
    gap_name: str | None = None  # the gap from the previous known layer to this one
    gap_tokens_per_s: float | None = None  # previous known layer's tokens/s minus this one's
    gap_share: float | None = None  # of the sum of the losses (positive gaps) from the first to the last known layer
    # A layer faster than the known layer above it: flagged with the likely cause, never a loss or a share.
    inverted: bool = False
    flag: str | None = None
    # L3/L4: the step the bottom-up model predicts (kernel sum + modelled overheads), computed from the roll-up point
    # and the run's overhead micro-benchmark only, never from the end-to-end measurement it is held against.
    predicted_step_time_us: float | None = None
    predicted_tokens_per_s_per_gpu: float | None = None
    prediction_source: str | None = None  # how, or why there is none
    prediction_error_pct: float | None = None  # (predicted / measured step time - 1) x 100, once both are known
    causes: list[dict[str, Any]] = field(default_factory=list)  # L5: the L4 -> L5 gap by cause (tokprof.serving)


@dataclass
class OpInefficiency:
    op: str
    label: str
    count: int
    time_us_measured: float  # per step: count x measured time per call
    time_us_at_roof: float  # per step: count x time at the measured roof
    lost_us: float  # signed: negative when the op ran faster than its measured roof
    share_of_L1_L2_gap: float | None  # noqa: N815 - the contract's key; of the sum of the positive losses
    finding: bool = True  # False for an op faster than its roof (a measurement to check, not a loss)


@dataclass
class Reconciliation:
    model: str
    gpu: str
    batch: int
    context: int
    dtype: str
    utilisation: float | None  # None: L5 not applied (and the notes say so)
    layers: list[Layer]
    op_inefficiency: list[OpInefficiency] = field(default_factory=list)
    bottom_up_error_pct: float | None = None  # signed, tokens/s: (L2 - L3) / L3 x 100, else against L4
    bottom_up_error_against: str | None = None  # "L3" | "L4"
    energy_error_pct: float | None = None  # (L2 J/token - end-to-end J/token) / end-to-end x 100
    tp: int = 1  # tensor-parallel GPUs; tp > 1 adds the L1i interconnect layer
    notes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # contradictions (inverted layers, ops above their roof), causes
    reliable: bool = True  # False when another process competed for the CPU: figures measured, gaps not findings
    unreliable_reason: str | None = None
    op_gains_us: float = 0.0  # sum of |lost| of the ops faster than their roof (not findings)
    op_unexplained_us: float | None = None  # the L1 -> L2 gap less the ops' net loss (another plan, rounding)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Reconciliation:
        return from_dict(cls, dict(d), "Reconciliation")

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)


# ------------------------------------------------------------------------------------------------- the roofs


def _config(run: RunResult, model: str) -> tuple[Any, str | None]:
    """(ModelConfig or None, why None) of `model`: the run's own config, else a preset of that name."""
    from tokprof.models.config import PRESETS, ModelConfig

    if run.model is not None and run.model.get("name") == model:
        return ModelConfig.from_dict(run.model), None
    if model.lower() in PRESETS:
        return ModelConfig.from_name(model), None
    return None, f"model {model!r} is neither the run's model nor a preset: no plan to bound"


def _roof_step_us(config: Any, batch: int, context: int, dtype: str, tp: int = 1, *, spec: Any = None,
                  ceilings: Ceilings | None = None) -> tuple[float, list[str]]:
    """Sum over the decode plan's kernels (one GPU's at tp > 1) of count x roof time per call (datasheet `spec` or
    measured `ceilings`)."""
    from tokprof.profiler.roofline import roofline
    from tokprof.rollup.interconnect import tp_step

    total_us, notes = 0.0, set()
    for call in tp_step(config, batch, context, dtype, tp)[0]:
        flops, min_bytes = call.cost()
        # Only the roof times are read; the nominal 1 us time never enters them.
        r = roofline(flops, min_bytes, 1.0, spec=spec, ceilings=ceilings, dtype=dtype)
        t = r.t_roof_datasheet_us if spec is not None else r.t_roof_measured_us
        total_us += call.count * t
        if "compute term omitted" in r.note:
            notes.add(f"{call.op}: compute term omitted (no {dtype} FLOP/s peak), memory term only")
    return total_us, sorted(notes)


def _collectives_roof_us(config: Any, batch: int, context: int, dtype: str, tp: int,
                         spec: Any) -> tuple[float | None, str]:
    """(sum over the plan's collectives of count x time at the link roof, what it was computed from), or (None,
    why) when the spec row has no interconnect figure."""
    from tokprof.profiler.collectives import interconnect
    from tokprof.rollup.interconnect import link_roof_us, tp_step

    link = interconnect(spec) if spec is not None else None
    if link is None:
        return None, (f"no interconnect figure for {spec.key} in the spec table" if spec is not None else
                      "no spec row for this device (a CPU or an unknown GPU): no interconnect roof")
    total = sum(c.count * link_roof_us(c, link) for c in tp_step(config, batch, context, dtype, tp)[1])
    return total, f"{link.gbps_per_direction:g} GB/s {link.kind} per direction ({link.source})"


def _op_inefficiency(point: Any, ceilings: Ceilings, l1_l2_gap_us: float, link: Any = None) -> list[OpInefficiency]:
    from tokprof.models.plan import COLLECTIVE_OPS, op_cost
    from tokprof.profiler.roofline import roofline
    from tokprof.rollup.interconnect import link_roof_us

    out = []
    for o in point.ops:
        if o.op in COLLECTIVE_OPS:  # against the link roof, when the link is known
            roof_us = link_roof_us(o, link) if o.shape else None
            if roof_us is None:
                continue
        elif o.shape:
            flops, min_bytes = op_cost(o.op, o.shape, point.dtype)
            roof_us = roofline(flops, min_bytes, o.time_us, spec=None, ceilings=ceilings,
                               dtype=point.dtype).t_roof_measured_us
        elif o.efficiency_measured is not None:
            roof_us = o.efficiency_measured * o.time_us  # efficiency = t_roof / t
        else:
            continue
        at_roof = o.count * roof_us
        lost = o.total_us - at_roof
        out.append(OpInefficiency(op=o.op, label=o.label, count=o.count, time_us_measured=o.total_us,
                                  time_us_at_roof=at_roof, lost_us=lost, share_of_L1_L2_gap=None, finding=lost > 0))
    # Shares of the losses, which add up to 100%: an op faster than its roof is not a negative loss but a flag.
    losses = sum(x.lost_us for x in out if x.finding)
    if l1_l2_gap_us > 0 and losses > 0:
        for x in out:
            x.share_of_L1_L2_gap = x.lost_us / losses if x.finding else None
    return sorted(out, key=lambda x: -x.lost_us)


# ------------------------------------------------------------------------------------------------ one point


def _usd(point: Any, tps: float | None) -> float | None:
    from tokprof.rollup.economics import cost_per_million_tokens

    if point is None or point.usd_per_gpu_hour is None or not tps:
        return None
    return cost_per_million_tokens(point.usd_per_gpu_hour, tps)


def _pick_l4(e2e: list[Any], framework: str | None) -> Any:
    candidates = [m for m in e2e if not (m.framework == "tokprof" and m.mode == "graph")]
    order = (framework,) if framework else L4_PREFERENCE
    for fw in order:
        hits = [m for m in candidates if m.framework == fw]
        if hits:
            return sorted(hits, key=lambda m: m.mode != "eager")[0]  # eager first
    return None


def _reconcile_point(run: RunResult, key: tuple[str, str, int, int, str, int], point: Any, e2e: list[Any],
                     run_gpu: str, utilisation: float | None, l4_framework: str | None,
                     served: Any = None) -> Reconciliation:
    from tokprof.profiler.devices import load_specs, match_spec

    model, gpu, batch, context, dtype, tp = key
    notes: list[str] = []
    defs = layer_defs(tp)
    layers = {name: Layer(name=name, title=title, tokens_per_s_per_gpu=None) for name, title, _ in defs}
    config, why_no_config = _config(run, model)
    specs = load_specs()
    spec = specs.get(gpu) or specs.get(match_spec(gpu, specs) or "")
    tdp_w = spec.tdp_w if spec is not None else None

    def fill(name: str, step_us: float, provenance: str, source: str, j: float | None = None,
             j_reason: str | None = None) -> None:
        layer = layers[name]
        layer.step_time_us, layer.tokens_per_s_per_gpu = step_us, batch / (step_us * 1e-6) / tp
        layer.usd_per_million_tokens = _usd(point, layer.tokens_per_s_per_gpu)
        layer.j_per_token, layer.provenance, layer.source = j, provenance, source
        if j is None and j_reason:
            layer.reason = f"J/token: {j_reason}"

    def tdp_j(step_us: float) -> tuple[float | None, str | None]:
        if tdp_w is None:
            return None, f"no TDP for {gpu} in the spec table"
        return tdp_w * tp * step_us * 1e-6 / batch, None

    # L0 and L1: the plan at datasheet peaks and at the run's measured ceilings.
    if config is None:
        layers["L0"].reason = layers["L1"].reason = why_no_config
    else:
        if spec is None:
            layers["L0"].reason = f"no datasheet row for {gpu!r} in the spec table (a CPU or an unknown GPU)"
        else:
            step, more = _roof_step_us(config, batch, context, dtype, tp, spec=spec)
            fill("L0", step, "modelled", f"decode plan at {spec.key} datasheet peaks; J/token at TDP", *tdp_j(step))
            notes += [f"L0 {n}" for n in more]
        if run.ceilings is None:
            layers["L1"].reason = "no ceilings measured in this run"
        elif gpu != run_gpu:
            layers["L1"].reason = f"the run's ceilings were measured on {run_gpu}, not {gpu}"
        else:
            step, more = _roof_step_us(config, batch, context, dtype, tp, ceilings=run.ceilings)
            fill("L1", step, "modelled", f"decode plan at the ceilings measured on {run.ceilings.device} "
                 f"({run.ceilings.bandwidth_gbps:.0f} GB/s memory, {run.ceilings.gemm_tflops:.1f} TFLOP/s "
                 f"{run.ceilings.gemm_dtype} GEMM); J/token at TDP", *tdp_j(step))
            notes += [f"L1 {n}" for n in more]
    if tp > 1:
        _interconnect_layer(layers, config, why_no_config, (batch, context, dtype, tp), spec, fill, tdp_j, notes)

    # L2: the roll-up point.
    if point is None:
        layers["L2"].reason = "no roll-up point for this (model, GPU, batch, context, dtype) in the run"
    else:
        fill("L2", point.step_time_us, point.provenance, f"kernel sum, backend {point.backend}" + (
             f", plus the collectives ({point.collective_provenance})" if point.collective_time_us is not None
             else f"; collectives unknown ({point.collective_reason}): kernels only" if tp > 1 else ""),
             point.j_per_token_total, point.energy_reason)

    # L3 and L4: end-to-end measurements.
    backend = point.backend if point is not None else None
    graphs = [m for m in e2e if m.framework == "tokprof" and m.mode == "graph"]
    graphs = sorted(graphs, key=lambda m: m.backend != backend)  # the roll-up's backend first
    l3 = graphs[0] if graphs else None
    l4 = _pick_l4(e2e, l4_framework)
    for name, m in (("L3", l3), ("L4", l4)):
        if m is None and tp > 1:
            layers[name].reason = f"end-to-end runs are single-GPU: none at tp={tp}"
            continue
        if m is None:
            layers[name].reason = ("no tokprof CUDA-graph end-to-end run for this point" if name == "L3" else
                                   f"no eager or framework end-to-end run for this point"
                                   f"{f' (framework {l4_framework})' if l4_framework else ''}")
            continue
        fill(name, m.median_step_us, m.provenance, f"{m.framework} {m.mode} ({m.backend}), median of {m.steps} "
             "steps", m.j_per_token, m.energy_reason)
    _predict(layers, run, point, l4, batch, tp)
    others = [m for m in e2e if m is not l3 and m is not l4]
    for m in others:
        notes.append(f"also measured: {m.framework} {m.mode} ({m.backend}) {m.tokens_per_s_per_gpu:.4g} tokens/s")

    # L5: served at a stated utilisation.
    base = layers["L4"] if layers["L4"].tokens_per_s_per_gpu is not None else layers["L3"]
    below = next((layers[n] for n in ("L4", "L3", "L2") if layers[n].step_time_us is not None), None)
    if utilisation is None and served is not None and below is not None:
        _served_layer(layers["L5"], served(run, key, below.step_time_us), fill, batch, tp)
    elif utilisation is None:
        layers["L5"].reason = "no utilisation stated: not applied (pass --utilisation, e.g. 0.6)"
        notes.append("L5 not applied: no utilisation was stated")
    elif base.tokens_per_s_per_gpu is None:
        layers["L5"].reason = "no end-to-end layer to apply the utilisation to"
    else:
        step = base.step_time_us / utilisation
        idle_w = spec.idle_w if spec is not None else None
        j = j_reason = None
        if base.j_per_token is None:
            j_reason = f"{base.name} has no J/token"
        elif idle_w is None:
            j_reason = f"no idle power for {gpu} in the spec table"
        else:
            j = base.j_per_token + idle_w * tp * (step - base.step_time_us) * 1e-6 / batch
        fill("L5", step, "modelled", f"{base.name} x utilisation {utilisation:g} (stated); idle time at the "
             "datasheet idle power", j, j_reason)

    ordered = [layers[name] for name, _, _ in defs]
    _gaps(ordered, defs)
    if layers["L5"].causes and layers["L5"].gap_name:
        layers["L5"].gap_name = "serving: " + ", ".join(c["name"] for c in layers["L5"].causes)
    contention = contention_note(run)
    if tp > 1 and layers["L1"].tokens_per_s_per_gpu is None and layers["L1i"].tokens_per_s_per_gpu is not None:
        # L1i stands on L0 here: the gap above it is the interconnect alone, the derate falls in the next gap
        layers["L1i"].gap_name = INTERCONNECT_LAYER[2]
        if layers["L2"].gap_name is not None:
            layers["L2"].gap_name = f"{LAYERS[1][2]} + " + (modelled_gap(TP_L2_GAP)
                                                            if layers["L2"].provenance == "modelled" else TP_L2_GAP)
    rec = Reconciliation(model=model, gpu=gpu, batch=batch, context=context, dtype=dtype, utilisation=utilisation,
                         layers=ordered, tp=tp, notes=notes)
    if contention is not None:
        rec.reliable = False
        rec.unreliable_reason = (f"{contention}: the CPU was shared while it measured, so its figures are "
                                 "unreliable and no gap between them is a finding")
    l1, l2 = layers["L1"], layers["L2"]
    if point is not None and l1.step_time_us is not None and run.ceilings is not None:
        # at tp > 1 the ops are measured against L1i (kernels at the measured roof + collectives at the link roof)
        with_colls = tp > 1 and layers["L1i"].step_time_us is not None and point.collective_time_us is not None
        roof = layers["L1i"] if with_colls else l1
        link = None
        if roof is not l1:
            from tokprof.profiler.collectives import interconnect

            link = interconnect(spec)
        rec.op_inefficiency = _op_inefficiency(point, run.ceilings, l2.step_time_us - roof.step_time_us, link)
        roof_sum = sum(o.time_us_at_roof for o in rec.op_inefficiency)
        if abs(roof_sum - roof.step_time_us) > 1e-3 * roof.step_time_us:
            notes.append(f"the roll-up's ops sum to {roof_sum:.4g} us at the roof, the plan to "
                         f"{roof.step_time_us:.4g} us: the point was built from another plan (block size?)")
        check_op_invariants(rec, l2.step_time_us - roof.step_time_us, roof.name)
    against = layers["L3"] if layers["L3"].tokens_per_s_per_gpu is not None else None
    if against is None and l4 is not None and l4.framework == "tokprof":
        against = layers["L4"]
    if l2.tokens_per_s_per_gpu is not None and against is not None:
        rec.bottom_up_error_pct = (l2.tokens_per_s_per_gpu - against.tokens_per_s_per_gpu) / \
            against.tokens_per_s_per_gpu * 100
        rec.bottom_up_error_against = against.name
        if l2.j_per_token is not None and against.j_per_token is not None:
            rec.energy_error_pct = (l2.j_per_token - against.j_per_token) / against.j_per_token * 100
    flag_inversions(rec, contention)
    return rec


def _predict(layers: dict[str, Layer], run: RunResult, point: Any, l4: Any, batch: int, tp: int) -> None:
    """L4 (eager; and L3, graphs, on a GPU): the step the kernel sum and the measured overheads predict. Reads the
    roll-up point and run.overhead only; the measured step is compared afterwards."""
    from tokprof.rollup.step_prediction import predict_step

    kind = run.provenance.device.kind
    for name, mode in [("L4", "eager")] + ([("L3", "graph")] if kind == "cuda" else []):
        layer = layers[name]
        if name == "L4" and l4 is not None and l4.framework != "tokprof":
            layer.prediction_source = f"no prediction: L4 is {l4.framework}, not tokprof's loop of these kernels"
            continue
        paired = l4.paired_kernels if name == "L4" and l4 is not None and l4.mode == "eager" else None
        pred, why = predict_step(point, run.overhead, mode=mode, device_kind=kind, paired=paired)
        if pred is None:
            layer.prediction_source = f"no prediction: {why}"
            continue
        layer.predicted_step_time_us = pred.step_time_us
        layer.predicted_tokens_per_s_per_gpu = batch / (pred.step_time_us * 1e-6) / tp
        layer.prediction_source = f"modelled: {pred.source}"
        if layer.step_time_us:
            layer.prediction_error_pct = (pred.step_time_us / layer.step_time_us - 1) * 100


def _interconnect_layer(layers: dict[str, Layer], config: Any, why_no_config: str | None,
                        where: tuple[int, int, str, int], spec: Any, fill: Any, tdp_j: Any, notes: list[str]) -> None:
    """L1i: the layer above (L1, else L0) plus the plan's collectives at the link roof."""
    batch, context, dtype, tp = where
    layer = layers["L1i"]
    base = layers["L1"] if layers["L1"].step_time_us is not None else layers["L0"]
    if config is None:
        layer.reason = why_no_config
        return
    if base.step_time_us is None:
        layer.reason = "neither L0 nor L1 is known: no roof to add the collectives to"
        return
    coll_us, what = _collectives_roof_us(config, batch, context, dtype, tp, spec)
    if coll_us is None:
        layer.reason = what
        return
    step = base.step_time_us + coll_us
    fill("L1i", step, "modelled", f"{base.name} + the plan's collectives at the link roof, {what}, no latency "
         "(modelled); J/token at TDP", *tdp_j(step))
    notes.append(f"L1i: {coll_us:.4g} us of collectives per step at the link roof on top of {base.name} "
                 f"({coll_us / step:.1%} of the step there); tensor parallel over {tp} GPUs, tokens/s per GPU = "
                 f"batch / step time / {tp}")


def _served_layer(layer: Layer, s: Mapping[str, Any], fill: Any, batch: int, tp: int) -> None:
    """L5 from a served run or the simulator (tokprof.serving.served.provider builds `s`)."""
    layer.title = "served (continuous batching)"
    if s.get("tokens_per_s_per_gpu") is None:
        layer.reason = s.get("reason") or "no served figure"
        return
    fill("L5", batch / (s["tokens_per_s_per_gpu"] * tp) * 1e6, s["provenance"], s["source"], None,
         "not metered for the served run")
    layer.causes = list(s.get("causes") or [])


def _gaps(layers: list[Layer], defs: tuple[tuple[str, str, str | None], ...] = LAYERS) -> None:
    """Name each gap between consecutive known layers and its share of the whole first -> last gap."""
    gap_names = {name: gap for name, _, gap in defs}
    known = [layer for layer in layers if layer.tokens_per_s_per_gpu is not None]
    if len(known) < 2:
        return
    order = [layer.name for layer in layers]
    for prev, cur in zip(known, known[1:], strict=False):
        crossed = order[order.index(prev.name) + 1:order.index(cur.name) + 1]
        # a modelled L2 is the roofline at a stated efficiency: its gap is that assumption, not a measured loss
        cur.gap_name = " + ".join(modelled_gap(gap_names[n]) if n == "L2" and cur.provenance == "modelled"
                                  else gap_names[n] for n in crossed)
        cur.gap_tokens_per_s = prev.tokens_per_s_per_gpu - cur.tokens_per_s_per_gpu
        cur.inverted = cur.gap_tokens_per_s < 0
    # Shares of the losses: they add up to 100% of the tokens/s lost; an inverted layer's gain is flagged apart
    # (without inversions the losses are the whole first -> last gap, as before).
    losses = sum(layer.gap_tokens_per_s for layer in known[1:] if layer.gap_tokens_per_s > 0)
    for cur in known[1:]:
        cur.gap_share = cur.gap_tokens_per_s / losses if losses and not cur.inverted else None


# --------------------------------------------------------------------------------------------------- the run


def reconcile(run: RunResult, utilisation: float | None = None, *,
              l4_framework: str | None = None, served: Any = None) -> list[Reconciliation]:
    """One Reconciliation per (model, GPU, batch, context, dtype, tp) present in the run's roll-up or end-to-end
    sections (end-to-end runs are tp = 1); `utilisation` in (0, 1] applies L5; `l4_framework` picks L4 (default:
    tokprof eager, vllm, transformers, the first measured). `served` (tokprof.serving.served.provider()) fills L5
    from a served run or the simulator; a stated utilisation overrides it."""
    from tokprof.models.e2e import FRAMEWORKS, E2EMeasurement
    from tokprof.rollup.bottom_up import run_gpu_name
    from tokprof.rollup.records import points_from_run

    if utilisation is not None and (isinstance(utilisation, bool) or not isinstance(utilisation, (int, float))
                                    or not 0 < utilisation <= 1):
        raise ValueError(f"utilisation: expected a fraction in (0, 1] (the duty cycle served), got {utilisation!r}")
    if l4_framework is not None and l4_framework not in FRAMEWORKS:
        raise ValueError(f"l4_framework: expected one of {list(FRAMEWORKS)}, got {l4_framework!r}")
    points = [p for p in points_from_run(run.rollup) if p.infeasible_reason is None]  # no step time to reconcile
    e2e = [E2EMeasurement.from_dict(d) for d in run.e2e]
    keys: dict[tuple[str, str, int, int, str, int], None] = {}
    for x in [*points, *e2e]:
        keys[(x.model, x.gpu, x.batch, x.context, x.dtype, getattr(x, "tp", 1))] = None
    run_gpu = run_gpu_name(run)
    out = []
    for key in keys:
        # end-to-end measurements are single-GPU runs: they belong to the tp = 1 key
        same = [m for m in e2e if (m.model, m.gpu, m.batch, m.context, m.dtype, 1) == key]
        candidates = [p for p in points if (p.model, p.gpu, p.batch, p.context, p.dtype, p.tp) == key]
        backends = {m.backend for m in same if m.framework == "tokprof"}
        # The point of the backend the end-to-end run used, else a measured one, else any.
        candidates.sort(key=lambda p: (p.backend not in backends, p.provenance != "measured"))
        point = candidates[0] if candidates else None
        rec = _reconcile_point(run, key, point, same, run_gpu, utilisation, l4_framework, served)
        if len(candidates) > 1:
            rec.notes.append(f"{len(candidates)} roll-up points for this key; used backend {point.backend} "
                             f"({point.provenance})")
        out.append(rec)
    return out


def waterfall_rows(rec: Reconciliation) -> list[dict[str, Any]]:
    """The table `tokprof reconcile` prints: one row per layer, figures formatted, None as '-' with the reason."""
    rows = []
    for layer in rec.layers:
        def fmt(x: float | None, spec: str) -> str:  # one number format for every table (reports/document.num)
            from tokprof.reports.document import num, pct

            return "-" if x is None else (pct(x) if spec.endswith("%") else num(x))
        rows.append({
            "layer": f"{layer.name} {layer.title}",
            "tokens/s/GPU": fmt(layer.tokens_per_s_per_gpu, ",.4g"),
            "step us": fmt(layer.step_time_us, ",.4g"),
            "$/M tokens": fmt(layer.usd_per_million_tokens, ",.4g"),
            "J/token": fmt(layer.j_per_token, ".4g"),
            "gap": "" if layer.gap_name is None else
                   f"INVERTED: {fmt(-layer.gap_tokens_per_s, ',.4g')} faster than the layer above (see flags)"
                   if layer.inverted else
                   f"{layer.gap_name}: {fmt(layer.gap_tokens_per_s, ',.4g')} ({fmt(layer.gap_share, '.1%')})",
            "predicted": fmt(layer.predicted_tokens_per_s_per_gpu, ",.4g") + (
                "" if layer.prediction_error_pct is None else f" ({layer.prediction_error_pct:+.1f}% step)"),
            "provenance / why": layer.provenance if layer.tokens_per_s_per_gpu is not None else (layer.reason or ""),
        })
    return rows
