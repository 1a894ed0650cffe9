"""The records of a roll-up: one `RollupPoint` per (model, GPU, batch, context), with its per-op breakdown.

A point is built from the time of one decode step (the sum over the plan of count x time per call), then priced:

    tokens/s per GPU  = batch / step time            tokens/s per user = 1 / step time
    J/token           = step energy / batch          (total, and dynamic = total - idle power x time)
    $/M tokens        = $/GPU-h / (tokens/s per GPU x 3600) x 1e6
    tokens/s per MW   = tokens/s per GPU x 1000 / all-in kW per GPU

Every point says whether its times are `measured`, `modelled` or `projected`, where its price and power came from,
and why a figure is None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    bound: str | None = None  # "memory" | "compute" | None when no ceiling is known
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
    step_time_us: float
    tokens_per_s_per_gpu: float
    tokens_per_s_per_user: float
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
    ops: list[OpShare] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RollupPoint:
        point = from_dict(cls, dict(d), "RollupPoint")
        if point.provenance not in PROVENANCES:
            raise ValueError(f"RollupPoint.provenance: expected one of {PROVENANCES}, got {point.provenance!r}")
        return point


def build_point(*, model: str, gpu: str, batch: int, context: int, dtype: str, backend: str, provenance: str,
                ops: list[OpShare], pricing: Pricing, j_per_step_total: float | None = None,
                j_per_step_dynamic: float | None = None, energy_reason: str | None = None,
                notes: list[str] | None = None) -> RollupPoint:
    """A priced point from the step's op shares (their total_us filled) and, where known, the step's energy."""
    if provenance not in PROVENANCES:
        raise ValueError(f"provenance: expected one of {PROVENANCES}, got {provenance!r}")
    if not ops:
        raise ValueError("ops: expected at least one op share in the step, got none")
    step_us = sum(o.total_us for o in ops)
    if not step_us > 0:
        raise ValueError(f"ops: expected a positive step time, got {step_us} us")
    for o in ops:
        o.share = o.total_us / step_us
    step_s = step_us * 1e-6
    tps_gpu = batch / step_s
    notes = list(notes or [])

    j_total = j_per_step_total / batch if j_per_step_total is not None else None
    j_dyn = j_per_step_dynamic / batch if j_per_step_dynamic is not None else None
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
                       ops=ops, notes=notes)


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
    """What makes two roll-up points the same point: model, GPU, batch, context, dtype, backend, provenance."""
    return tuple(d.get(k) for k in ("model", "gpu", "batch", "context", "dtype", "backend", "provenance"))


def merge_points(rollup: list[dict[str, Any]], points: list[RollupPoint]) -> None:
    """Add `points` to a RunResult's rollup section in place, replacing any earlier point of the same identity
    (a re-run of the same sweep updates its points instead of listing them twice)."""
    new = {point_identity(p.to_dict()): p.to_dict() for p in points}
    rollup[:] = [d for d in rollup if point_identity(d) not in new] + list(new.values())
