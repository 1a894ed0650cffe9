"""Where a measured kernel call sits against the roofline (docs/measurement.md, "Roofline").

For a call of `flops` and `min_bytes` (each input read once, each output written once) that took `time_us`:

    achieved GB/s     = min_bytes / time_s / 1e9          (GB = 1e9 bytes, never GiB)
    achieved TFLOP/s  = flops / time_s / 1e12
    intensity         = flops / min_bytes                 (FLOP per byte)
    t_roof            = max(flops / peak_flops, min_bytes / peak_bw)
    efficiency        = t_roof / time                     (1.0 = on the roof)

twice: against the datasheet (the spec-table row of this GPU, FLOP/s for the call's dtype) and against the ceilings
measured in the same run (the larger of copy and read-only bandwidth; GEMM FLOP/s, which only bounds calls of the
GEMM's dtype). A call above 100% of a ceiling is flagged `suspicious`: a byte-count or timing bug, never a result.

    roofline(flops=5 * 16 * 14336, min_bytes=3 * 16 * 14336 * 2, time_us=2.1, spec=spec, ceilings=c, dtype="bf16")
"""

from __future__ import annotations

import math

from tokprof.profiler.devices import GpuSpec
from tokprof.profiler.schema import Ceilings, Roofline

ROOFLINE_DTYPES = ("bf16", "fp16", "fp8", "fp32", "fp4", "fp6", "int8")  # the math dtype of the call (its roof)


def _t_roof_us(flops: int, min_bytes: int, peak_tflops: float | None, peak_gbps: float | None,
               what: str) -> tuple[float | None, str | None, list[str]]:
    """(time at the roof in us, bound, notes) for one set of peaks; None where the peaks cannot bound the call."""
    notes: list[str] = []
    if peak_gbps is None:
        return None, None, [f"{what}: no memory bandwidth peak"]
    t_mem_us = min_bytes / (peak_gbps * 1e9) * 1e6
    if flops == 0:
        return t_mem_us, "memory", notes
    if peak_tflops is None:
        # Without a compute peak only the memory term is known: t_roof is then a lower bound of the true roof, so
        # efficiency is a lower bound too (never inflated), and the bound cannot be named.
        notes.append(f"{what}: compute term omitted (no FLOP/s peak for this dtype); efficiency counts memory only")
        return t_mem_us, None, notes
    t_compute_us = flops / (peak_tflops * 1e12) * 1e6
    bound = "compute" if t_compute_us > t_mem_us else "memory"
    return max(t_compute_us, t_mem_us), bound, notes


def roofline(flops: int, min_bytes: int, time_us: float, *, spec: GpuSpec | None, ceilings: Ceilings | None,
             dtype: str) -> Roofline:
    """The roofline record of one measured call; see the module docstring for every formula."""
    if isinstance(flops, bool) or not isinstance(flops, int) or flops < 0:
        raise ValueError(f"flops: expected a non-negative int, got {flops!r}")
    if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes <= 0:
        raise ValueError(f"min_bytes: expected a positive int (every call moves bytes), got {min_bytes!r}")
    if not isinstance(time_us, (int, float)) or not math.isfinite(time_us) or time_us <= 0:
        raise ValueError(f"time_us: expected a positive finite number, got {time_us!r}")
    if dtype not in ROOFLINE_DTYPES:
        raise ValueError(f"dtype: expected one of {list(ROOFLINE_DTYPES)}, got {dtype!r}")

    time_s = time_us * 1e-6
    notes: list[str] = []

    t_sheet_us = bound_sheet = None
    if spec is None:
        notes.append("datasheet: no spec-table row for this device (unknown GPU or a CPU)")
    else:
        peak_gbps = spec.hbm_tbps * 1e3 if spec.hbm_tbps is not None else None
        t_sheet_us, bound_sheet, more = _t_roof_us(flops, min_bytes, spec.peak_tflops(dtype), peak_gbps,
                                                   f"datasheet ({spec.key})")
        notes += more

    t_meas_us = bound_meas = None
    if ceilings is None:
        notes.append("measured: no ceilings measured in this run")
    else:
        # The measured GEMM ceiling bounds only calls of its own dtype (a bf16 GEMM says nothing about fp32 FLOP/s).
        gemm_tflops = ceilings.gemm_tflops if ceilings.gemm_dtype == dtype else None
        what = "measured" if gemm_tflops is not None or flops == 0 else f"measured ({ceilings.gemm_dtype} GEMM only)"
        t_meas_us, bound_meas, more = _t_roof_us(flops, min_bytes, gemm_tflops, ceilings.bandwidth_gbps, what)
        notes += more

    eff_sheet = t_sheet_us / time_us if t_sheet_us is not None else None
    eff_meas = t_meas_us / time_us if t_meas_us is not None else None
    suspicious = False
    if eff_meas is not None and eff_meas > 1.0:
        suspicious = True
        notes.append(f"suspicious: {eff_meas:.0%} of the measured ceiling (above 100%): check the byte count "
                     "or the timing")
    if eff_sheet is not None and eff_sheet > 1.0:
        suspicious = True
        notes.append(f"suspicious: {eff_sheet:.0%} of the datasheet peak (above 100%): check the byte count "
                     "or the timing")

    return Roofline(
        flops=flops,
        min_bytes=min_bytes,
        time_us=float(time_us),
        achieved_gbps=min_bytes / time_s / 1e9,
        achieved_tflops=flops / time_s / 1e12,
        intensity_flop_per_byte=flops / min_bytes,
        bound=bound_meas or bound_sheet,  # this machine's ridge point first, the datasheet's where it is unknown
        t_roof_datasheet_us=t_sheet_us,
        efficiency_datasheet=eff_sheet,
        t_roof_measured_us=t_meas_us,
        efficiency_measured=eff_meas,
        suspicious=suspicious,
        note="; ".join(notes),
    )
