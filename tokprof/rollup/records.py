"""The records of a roll-up: one `RollupPoint` per (model, GPU, batch, context), with its per-op breakdown.

A point is built from the time of one decode step (the sum over the plan of count x time per call), then priced:

    tokens/s per GPU  = batch / step time / tp       tokens/s per user = 1 / step time
    J/token           = step energy x tp / batch     (total, and dynamic = total - idle power x time)
    $/M tokens        = $/GPU-h / (tokens/s per GPU x 3600) x 1e6
    tokens/s per MW   = tokens/s per GPU x 1000 / all-in kW per GPU

With tensor parallelism (tp GPUs serve one batch) the step time and step energy are those of ONE GPU: its kernel
sum plus count x time of its collectives (all-reduces, the logits all-gather), which are op shares too (bound
"interconnect"); a point says where its collective times came from (measured in the run, or modelled from the
interconnect spec) or, when unknown, why, and its step time then counts the kernels only.

Every point says whether its times are `measured`, `modelled` or `projected`, where its price and power came from,
and why a figure is None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokprof.models.plan import COLLECTIVE_OPS
from tokprof.profiler.schema import PROVENANCES, from_dict, to_dict
from tokprof.rollup.economics import (
    Pricing,
    cost_per_million_tokens,
    energy_usd_per_million_tokens,
    tokens_per_s_per_mw,
)


@dataclass
class OpShare:
    """One plan entry's part of the step: `count` calls of `time_us` each."""

    op: str
    label: str  # where in the model: "qkv_proj", "input_norm+post_attn_norm+final_norm", ...
    count: int
    time_us: float  # per call
    total_us: float  # count x time_us
    share: float  # of the step time
    efficiency_measured: float | None = None  # t_roof / t against the ceilings measured in the run
    efficiency_datasheet: float | None = None  # t_roof / t against the datasheet peaks
    bound: str | None = None  # "memory" | "compute" | "interconnect" (collectives) | None when no ceiling is known
    shape: dict[str, int] = field(default_factory=dict)


@dataclass
class RollupPoint:
    model: str
    gpu: str  # spec-table key, else the device name (a CPU model for CPU runs)
    batch: int
    context: int
    dtype: str
    backend: str
    provenance: str  # "measured" | "modelled" | "projected"
    step_time_us: float | None  # None only when the point does not fit in memory (infeasible_reason)
    tokens_per_s_per_gpu: float | None
    tokens_per_s_per_user: float | None
    j_per_token_total: float | None = None
    j_per_token_dynamic: float | None = None
    energy_reason: str | None = None  # why J/token is None, or how a modelled figure was made
    usd_per_gpu_hour: float | None = None
    usd_per_million_tokens: float | None = None
    all_in_kw_per_gpu: float | None = None
    tokens_per_s_per_mw: float | None = None
    energy_usd_per_million_tokens: float | None = None
    price_source: str | None = None
    power_source: str | None = None
    tp: int = 1  # GPUs of the tensor-parallel group: step time and energy per GPU, tokens/s per GPU divided by tp
    kernel_time_us: float | None = None  # tp > 1: the kernels' part of the step (per GPU); None at tp = 1
    collective_time_us: float | None = None  # tp > 1: sum of count x time of the collectives; None: unknown or tp 1
    collective_provenance: str | None = None  # "measured" | "modelled" (modelled when any collective is)
    collective_reason: str | None = None  # why collective_time_us is None at tp > 1
    ops: list[OpShare] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # capacity (tokprof.rollup.capacity): one GPU's memory at this point and the GPU's; None when unknown (a CPU)
    memory_bytes_per_gpu: int | None = None
    memory_capacity_bytes: int | None = None
    # set when the point does not fit ("needs 168 GB ..., has 141 GB"): step time, tokens/s and cost are then None
    infeasible_reason: str | None = None
    # modelled / projected: the step model's per-step overhead (host work, launches, sampling; op "step_overhead"),
    # part of step_time_us; tp > 1: step = kernel_time_us + collective_time_us + overhead_time_us
    overhead_time_us: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @property
    def feasible(self) -> bool:
        return self.infeasible_reason is None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RollupPoint:
        point = from_dict(cls, dict(d), "RollupPoint")
        if point.provenance not in PROVENANCES:
            raise ValueError(f"RollupPoint.provenance: expected one of {PROVENANCES}, got {point.provenance!r}")
        if isinstance(point.tp, bool) or point.tp < 1:
            raise ValueError(f"RollupPoint.tp: expected a positive int, got {point.tp!r}")
        return point

    @property
    def collective_share(self) -> float | None:
        """The collectives' share of the step time (tp > 1 with known collective times), else None."""
        if self.collective_time_us is None or not self.step_time_us:  # None too when infeasible
            return None
        return self.collective_time_us / self.step_time_us


def _tp_figures(tp: int, ops: list[OpShare], step_us: float, collective_provenance: str | None,
                collective_reason: str | None) -> tuple[dict[str, Any], str]:
    """The tensor-parallel fields of a point and the note that explains its step time."""
    colls = [o for o in ops if o.op in COLLECTIVE_OPS]
    # the kernels' part: neither the collectives nor a modelled per-step overhead (op "step_overhead")
    kernel_us = step_us - sum(o.total_us for o in colls) - sum(o.total_us for o in ops if o.op == "step_overhead")
    head = f"tensor parallel over {tp} GPUs: tokens/s per GPU = batch / step time / {tp}; J/token and $/M tokens " \
           f"count the {tp} GPUs; the step time is one GPU's"
    if not colls:
        if collective_reason is None:
            raise ValueError(f"ops: a tp={tp} step has collectives; give their op shares or collective_reason (why "
                             "their time is unknown)")
        return ({"kernel_time_us": kernel_us, "collective_time_us": None, "collective_provenance": None,
                 "collective_reason": collective_reason},
                f"{head}, kernels only: the collectives' time is unknown (collective_reason), so tokens/s is an "
                "upper bound")
    if collective_provenance not in PROVENANCES:
        raise ValueError(f"collective_provenance: expected one of {PROVENANCES}, got {collective_provenance!r}")
    return ({"kernel_time_us": kernel_us, "collective_time_us": sum(o.total_us for o in colls),
             "collective_provenance": collective_provenance, "collective_reason": None},
            f"{head}: kernels (kernel_time_us) + count x time of its collectives (collective_time_us, "
            f"{collective_provenance})")


def build_point(*, model: str, gpu: str, batch: int, context: int, dtype: str, backend: str, provenance: str,
                ops: list[OpShare], pricing: Pricing, j_per_step_total: float | None = None,
                j_per_step_dynamic: float | None = None, energy_reason: str | None = None,
                notes: list[str] | None = None, tp: int = 1, collective_provenance: str | None = None,
                collective_reason: str | None = None, memory: Any = None) -> RollupPoint:
    """A priced point from the step's op shares (their total_us filled) and, where known, the step's energy.

    tp > 1: `ops` are one GPU's (collectives included, op "all_reduce" / "all_gather"), `j_per_step_*` one GPU's
    energy; `collective_provenance` says where the collectives' times came from, or `collective_reason` why they
    are unknown (then `ops` holds no collective and the step counts the kernels only). `memory` (a
    tokprof.rollup.capacity.MemoryBudget) fills the memory fields; a budget that does not fit makes the point
    infeasible (infeasible_point: no step time, tokens/s or cost)."""
    if memory is not None and memory.fits is False:
        return infeasible_point(model=model, gpu=gpu, batch=batch, context=context, dtype=dtype, backend=backend,
                                provenance=provenance, memory=memory, notes=notes, tp=tp)
    if provenance not in PROVENANCES:
        raise ValueError(f"provenance: expected one of {PROVENANCES}, got {provenance!r}")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp: expected a positive int (GPUs of the tensor-parallel group), got {tp!r}")
    if not ops:
        raise ValueError("ops: expected at least one op share in the step, got none")
    step_us = sum(o.total_us for o in ops)
    if not step_us > 0:
        raise ValueError(f"ops: expected a positive step time, got {step_us} us")
    for o in ops:
        o.share = o.total_us / step_us
    step_s = step_us * 1e-6
    tps_gpu = batch / step_s / tp
    notes = list(notes or [])
    tp_fields: dict[str, Any] = {}
    if tp > 1:
        tp_fields, tp_note = _tp_figures(tp, ops, step_us, collective_provenance, collective_reason)
        notes.append(tp_note)

    # per GPU step energy x tp GPUs, over the batch's tokens
    j_total = j_per_step_total * tp / batch if j_per_step_total is not None else None
    j_dyn = j_per_step_dynamic * tp / batch if j_per_step_dynamic is not None else None
    if j_total is None and energy_reason is None:
        energy_reason = "no energy figure for this step"

    usd = cost = None
    if pricing.usd_per_gpu_hour is not None:
        usd = pricing.usd_per_gpu_hour
        cost = cost_per_million_tokens(usd, tps_gpu)
    else:
        notes.append(f"no $/GPU-hour: {pricing.price_reason}")

    kw, power_source = pricing.all_in_kw(gpu_power_w=j_total * tps_gpu if j_total is not None else None)
    per_mw = tokens_per_s_per_mw(tps_gpu, kw) if kw is not None else None
    if kw is None:
        notes.append(f"no all-in kW per GPU: {power_source}")
        power_source = None

    energy_usd = None
    if j_total is not None and pricing.usd_per_kwh is not None:
        energy_usd = energy_usd_per_million_tokens(j_total, pricing.usd_per_kwh, pricing.pue)

    return RollupPoint(model=model, gpu=gpu, batch=batch, context=context, dtype=dtype, backend=backend,
                       provenance=provenance, step_time_us=step_us, tokens_per_s_per_gpu=tps_gpu,
                       tokens_per_s_per_user=1.0 / step_s, j_per_token_total=j_total, j_per_token_dynamic=j_dyn,
                       energy_reason=energy_reason, usd_per_gpu_hour=usd, usd_per_million_tokens=cost,
                       all_in_kw_per_gpu=kw, tokens_per_s_per_mw=per_mw, energy_usd_per_million_tokens=energy_usd,
                       price_source=pricing.price_source if usd is not None else None, power_source=power_source,
                       tp=tp, ops=ops, notes=notes, **tp_fields, **_memory_fields(memory),
                       overhead_time_us=sum(o.total_us for o in ops if o.op == "step_overhead") or None)


def _memory_fields(memory: Any) -> dict[str, Any]:
    if memory is None:
        return {}
    return {"memory_bytes_per_gpu": memory.total_bytes, "memory_capacity_bytes": memory.capacity_bytes}


def infeasible_point(*, model: str, gpu: str, batch: int, context: int, dtype: str, backend: str, provenance: str,
                     memory: Any, notes: list[str] | None = None, tp: int = 1) -> RollupPoint:
    """A point that does not fit in one GPU's memory (`memory`, a MemoryBudget whose fits is False): no step time,
    no tokens/s, no cost; the reason says what it needs and what the GPU has."""
    reason = memory.reason or "does not fit in memory"
    return RollupPoint(model=model, gpu=gpu, batch=batch, context=context, dtype=dtype, backend=backend,
                       provenance=provenance, step_time_us=None, tokens_per_s_per_gpu=None,
                       tokens_per_s_per_user=None, energy_reason=f"infeasible: {reason}", tp=tp,
                       notes=list(notes or []), infeasible_reason=reason, **_memory_fields(memory))


def feasible(points: Sequence[RollupPoint]) -> list[RollupPoint]:
    """The points that fit in memory (an infeasible point has no tokens/s to compare)."""
    return [p for p in points if p.infeasible_reason is None]


def points_from_run(rollup: list[Mapping[str, Any]]) -> list[RollupPoint]:
    """The RollupPoints of a RunResult's `rollup` section."""
    return [RollupPoint.from_dict(d) for d in rollup]


def check_sweep(batches: Sequence[int], contexts: Sequence[int]) -> tuple[list[int], list[int]]:
    """The sweep's batch sizes and contexts as lists of positive ints (duplicates dropped, order kept)."""
    out = []
    for name, values in (("batches", batches), ("contexts", contexts)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"{name}: expected a non-empty list of positive ints, got {values!r}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected positive ints, got {v!r} in {list(values)}")
        out.append(list(dict.fromkeys(values)))
    return out[0], out[1]


def point_identity(d: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two roll-up points the same point: model, GPU, batch, context, dtype, backend, provenance and
    tensor-parallel degree (1 for points written before it existed)."""
    return (*(d.get(k) for k in ("model", "gpu", "batch", "context", "dtype", "backend", "provenance")),
            d.get("tp") or 1)


def merge_points(rollup: list[dict[str, Any]], points: list[RollupPoint]) -> None:
    """Add `points` to a RunResult's rollup section in place, replacing any earlier point of the same identity
    (a re-run of the same sweep updates its points instead of listing them twice)."""
    new = {point_identity(p.to_dict()): p.to_dict() for p in points}
    rollup[:] = [d for d in rollup if point_identity(d) not in new] + list(new.values())
