"""What `tokprof compare` compares: one `Observation` per kernel, roll-up point and end-to-end item of a run, with
its time, spread (p10/p90 and relative noise; a point's carries the noise of the kernels it sums), roofline times
and SM clock. tokprof.reports.compare turns pairs of them into verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokprof.profiler.schema import Clocks, KernelMeasurement, RunResult


@dataclass
class Observation:
    """One comparable item of one run: its time with spread, its time at the roof, the SM clock it ran at."""

    kind: str  # "kernel" | "point" | "e2e"
    key: tuple
    label: str
    time_us: float
    p10_us: float | None
    p90_us: float | None
    noise: float | None  # relative standard deviation; None when there are no samples
    t_roof_measured_us: float | None
    t_roof_datasheet_us: float | None
    sm_mhz: float | None
    clock_source: str | None
    run_ref: str


def robust_noise(samples: Sequence[float]) -> float | None:
    """Relative standard deviation after 1.5x IQR outlier removal (the harness's definition); None if < 2 samples."""
    x = np.asarray([s for s in samples if isinstance(s, (int, float)) and math.isfinite(s)], dtype=np.float64)
    if x.size < 2:
        return None
    q1, q3 = np.percentile(x, [25, 75])
    keep = x[(x >= q1 - 1.5 * (q3 - q1)) & (x <= q3 + 1.5 * (q3 - q1))]
    return float(keep.std(ddof=1) / keep.mean()) if keep.size > 1 and keep.mean() > 0 else None


def _clock_of(run: RunResult, clocks: Iterable[Clocks | None] = ()) -> tuple[float | None, str | None]:
    """SM MHz for cycle counts: measured around the call, else the run's snapshot, else the device's max clock."""
    measured = [c.sm_mhz for c in clocks if c is not None and c.sm_mhz]
    if measured:
        return float(sum(measured)) / len(measured), "SM clock read around the measurement (NVML)"
    if run.provenance.clocks is not None and run.provenance.clocks.sm_mhz:
        return float(run.provenance.clocks.sm_mhz), "SM clock of the run's snapshot (NVML)"
    if run.provenance.device.sm_max_mhz:
        return float(run.provenance.device.sm_max_mhz), "max SM clock of the device (spec; not read under load)"
    return None, None


def kernel_key(k: KernelMeasurement) -> tuple:
    return ("kernel", *k.key())


def _kernel_label(k: KernelMeasurement) -> str:
    return f"{k.op} {' '.join(f'{a}={b}' for a, b in k.shape.items())} {k.dtype} {k.backend}"


def _finite_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _finite_or_none(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _positive_or_none(x: Any) -> float | None:
    return float(x) if _finite_positive(x) else None


def _point_spread(p: dict, kernels: dict[tuple, KernelMeasurement]) -> tuple[float | None, float | None,
                                                                              float | None, int, int]:
    """A roll-up point's relative noise, p10 and p90 from the kernels it sums (matched in the same run by op, shape,
    dtype, backend): noise = sum over ops of share x kernel noise (the step's relative noise when the kernels' noise
    moves together, as it does under a shared load; an upper bound otherwise), p10/p90 = the point's step time x
    (the step summed at each kernel's p10 or p90 / the step summed at the kernels' medians). Ops without a kernel
    measurement (modelled collectives) count at their time with no spread. Returns (noise, p10, p90, ops matched,
    ops in all); None for all three when no op matched."""
    ops = [o for o in p.get("ops") or [] if isinstance(o, dict)]
    noise, p10, p90, mid, matched = 0.0, 0.0, 0.0, 0.0, 0
    for o in ops:
        shape = o.get("shape") if isinstance(o.get("shape"), dict) else {}
        k = kernels.get((o.get("op"), tuple(sorted(shape.items())), p.get("dtype"), p.get("backend")))
        count, total, share = o.get("count"), o.get("total_us"), o.get("share")
        if not (_finite_positive(total) and isinstance(count, int) and _finite_or_none(share) is not None):
            return None, None, None, 0, len(ops)
        t = k.timing if k is not None else None
        if t is not None and all(_finite_or_none(x) is not None for x in (t.noise, t.p10_us, t.p90_us)):
            matched += 1
            noise += float(share) * t.noise
            p10 += count * t.p10_us
            p90 += count * t.p90_us
            mid += count * t.median_us
        else:
            p10, p90, mid = p10 + float(total), p90 + float(total), mid + float(total)
    step = p.get("step_time_us")
    if not matched or not (_finite_positive(mid) and _finite_positive(step)):
        return None, None, None, 0, len(ops)
    return noise, step * p10 / mid, step * p90 / mid, matched, len(ops)


def observations(run: RunResult, run_ref: str) -> tuple[dict[tuple, Observation], list[str]]:
    """Every comparable item of `run` by key, and notes about what was left out."""
    out: dict[tuple, Observation] = {}
    notes: list[str] = []
    duplicates = 0
    unusable: list[str] = []  # items whose time is zero, negative or not finite: no ratio can be formed
    for k in run.kernels:
        key = kernel_key(k)
        if key in out:
            duplicates += 1
            continue
        t = k.timing
        if not _finite_positive(t.median_us):
            unusable.append(f"{_kernel_label(k)} (median {t.median_us!r} us)")
            continue
        mhz, source = _clock_of(run, (t.clocks_before, t.clocks_after))
        out[key] = Observation("kernel", key, _kernel_label(k), t.median_us, _finite_or_none(t.p10_us),
                               _finite_or_none(t.p90_us), _finite_or_none(t.noise),
                               _positive_or_none(k.roofline.t_roof_measured_us),
                               _positive_or_none(k.roofline.t_roof_datasheet_us), mhz, source, run_ref)
    by_key = {k.key(): k for k in reversed(run.kernels)}  # the first measurement of a key wins, as above
    run_mhz, run_source = _clock_of(run)
    skipped = 0
    for p in run.rollup:
        if p.get("provenance") != "measured":
            skipped += 1
            continue
        step = p.get("step_time_us")
        label = (f"roll-up {p.get('model')} batch {p.get('batch')} context {p.get('context')} {p.get('dtype')} "
                 f"{p.get('backend')}")
        if not _finite_positive(step):
            if step is not None:  # None: an infeasible point, nothing measured to compare
                unusable.append(f"{label} (step time {step!r} us)")
            continue
        tp = p.get("tp") or 1  # tensor-parallel points of one model are different points
        key = ("point", p.get("model"), p.get("batch"), p.get("context"), p.get("dtype"), p.get("backend"), tp)
        if key in out:
            duplicates += 1
            continue
        ops = p.get("ops") or []
        roofs = {}
        for which in ("measured", "datasheet"):
            effs = [(o.get("total_us"), o.get(f"efficiency_{which}")) for o in ops]
            ok = ops and all(_finite_or_none(t) is not None and _finite_or_none(e) is not None for t, e in effs)
            roof = sum(t * e for t, e in effs) if ok else None  # t_roof per op = efficiency x time
            roofs[which] = roof if _finite_positive(roof) else None
        noise, p10, p90, _, _ = _point_spread(p, by_key)
        out[key] = Observation("point", key, label + (f" tp={tp}" if tp > 1 else ""), float(step), p10, p90,
                               noise, roofs["measured"], roofs["datasheet"], run_mhz, run_source, run_ref)
    if skipped:
        notes.append(f"{run_ref}: {skipped} modelled or projected roll-up point(s) not compared (not measurements)")
    if duplicates:
        notes.append(f"{run_ref}: {duplicates} kernel measurement(s) or roll-up point(s) repeat a key; the first "
                     "of each was used")
    for e in run.e2e:
        samples = [s for s in e.get("step_times_us") or [] if _finite_positive(s)]
        median = e.get("median_step_us")
        label = (f"end to end {e.get('framework')} {e.get('mode')} {e.get('model')} batch {e.get('batch')} "
                 f"context {e.get('context')}")
        if not _finite_positive(median):
            if median is not None:
                unusable.append(f"{label} (median step {median!r} us)")
            continue
        key = ("e2e", e.get("model"), e.get("framework"), e.get("mode"), e.get("backend"), e.get("dtype"),
               e.get("batch"), e.get("context"))
        p10, p90 = (float(np.percentile(samples, 10)), float(np.percentile(samples, 90))) if samples else (None, None)
        out[key] = Observation("e2e", key, label, float(median), p10, p90, robust_noise(samples), None, None,
                               run_mhz, run_source, run_ref)
    if unusable:
        notes.append(f"{run_ref}: {len(unusable)} item(s) with a zero, negative or non-finite time not compared "
                     f"(no ratio can be formed): {'; '.join(unusable[:3])}")
    return out, notes
