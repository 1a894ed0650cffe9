"""Roofline arithmetic on hand-computed cases: memory- and compute-bound, measured vs datasheet, suspicious calls."""

from __future__ import annotations

import pytest

from tokprof.profiler.devices import GpuSpec, load_specs
from tokprof.profiler.roofline import roofline
from tokprof.profiler.schema import Ceilings

# A made-up GPU with round peaks: 2 TB/s, 100 TFLOP/s bf16, 10 TFLOP/s fp32.
SPEC = GpuSpec(key="round", name="Round GPU", hbm_tbps=2.0, bf16_tflops=100.0, fp16_tflops=100.0, fp8_tflops=None,
               fp32_tflops=10.0, tdp_w=500.0, idle_w=None, memory_gb=80.0, l2_mb=50.0, source="test", date="2026-01-01")
# Measured on it: 1 TB/s copy, 50 TFLOP/s bf16 GEMM.
CEIL = Ceilings(copy_gbps=1000.0, gemm_tflops=50.0, gemm_dtype="bf16", copy_bytes=2 << 30, gemm_shape=[8192] * 3,
                device="Round GPU", measured_utc="2026-01-01T00:00:00Z")


def test_memory_bound_hand_computed():
    # 1 MFLOP over 4 MB: datasheet memory time 4e6 / 2e12 s = 2 us, compute time 1e6 / 1e14 s = 0.01 us.
    r = roofline(1_000_000, 4_000_000, 4.0, spec=SPEC, ceilings=CEIL, dtype="bf16")
    assert r.achieved_gbps == pytest.approx(1000.0)  # 4e6 B / 4e-6 s = 1e12 B/s = 1000 GB/s
    assert r.achieved_tflops == pytest.approx(0.25)
    assert r.intensity_flop_per_byte == pytest.approx(0.25)
    assert r.t_roof_datasheet_us == pytest.approx(2.0) and r.efficiency_datasheet == pytest.approx(0.5)
    assert r.t_roof_measured_us == pytest.approx(4.0) and r.efficiency_measured == pytest.approx(1.0)
    assert r.bound == "memory" and not r.suspicious


def test_compute_bound_gemm():
    n = 1024
    flops, min_bytes = 2 * n**3, 3 * n * n * 2  # bf16 GEMM: read A and B, write C
    # datasheet: 2.147e9 / 1e14 s = 21.47 us > 6.29e6 / 2e12 s = 3.15 us; measured: 2.147e9 / 5e13 s = 42.95 us.
    r = roofline(flops, min_bytes, 85.89934592, spec=SPEC, ceilings=CEIL, dtype="bf16")
    assert r.bound == "compute"
    assert r.t_roof_datasheet_us == pytest.approx(21.47483648)
    assert r.t_roof_measured_us == pytest.approx(42.94967296)
    assert r.efficiency_datasheet == pytest.approx(0.25) and r.efficiency_measured == pytest.approx(0.5)
    assert r.achieved_tflops == pytest.approx(25.0)


def test_above_measured_ceiling_is_suspicious():
    # 4 MB in 3 us = 1333 GB/s, above the measured 1000 GB/s copy ceiling but below the 2 TB/s datasheet.
    r = roofline(0, 4_000_000, 3.0, spec=SPEC, ceilings=CEIL, dtype="fp16")
    assert r.efficiency_measured == pytest.approx(4 / 3) and r.suspicious
    assert "suspicious" in r.note and "measured ceiling" in r.note
    ok = roofline(0, 4_000_000, 4.5, spec=SPEC, ceilings=CEIL, dtype="fp16")
    assert not ok.suspicious and ok.efficiency_measured == pytest.approx(4 / 4.5)


def test_fp32_uses_fp32_peak_and_not_the_bf16_gemm_ceiling():
    # 1e9 FLOP over 1e6 B in fp32: datasheet compute 1e9 / 1e13 s = 100 us (the fp32 peak, not bf16's 10 us).
    r = roofline(1_000_000_000, 1_000_000, 200.0, spec=SPEC, ceilings=CEIL, dtype="fp32")
    assert r.t_roof_datasheet_us == pytest.approx(100.0) and r.efficiency_datasheet == pytest.approx(0.5)
    # The measured GEMM ceiling is bf16: only the memory term (1e6 / 1e12 s = 1 us) bounds an fp32 call.
    assert r.t_roof_measured_us == pytest.approx(1.0) and "compute term omitted" in r.note
    assert r.bound == "compute"  # named from the datasheet, whose two terms are both known


def test_unknown_hardware_gives_none():
    r = roofline(1_000_000, 4_000_000, 4.0, spec=None, ceilings=None, dtype="bf16")
    assert r.t_roof_datasheet_us is None and r.efficiency_datasheet is None
    assert r.t_roof_measured_us is None and r.efficiency_measured is None and r.bound is None
    assert r.achieved_gbps == pytest.approx(1000.0) and not r.suspicious
    assert "no spec-table row" in r.note


def test_missing_fp32_peak_leaves_bound_unknown():
    gb300 = load_specs()["gb300"]  # fp32 null in the table
    r = roofline(10**9, 10**6, 100.0, spec=gb300, ceilings=None, dtype="fp32")
    assert r.bound is None and r.t_roof_datasheet_us == pytest.approx(10**6 / 8e12 * 1e6)
    assert "compute term omitted" in r.note


def test_real_h100_swiglu_point():
    # swiglu T=16, I=14336, bf16: 1,376,256 bytes at 3.35 TB/s = 0.41082 us on the datasheet roof.
    h100 = load_specs()["h100-sxm"]
    r = roofline(5 * 16 * 14336, 3 * 16 * 14336 * 2, 1.0, spec=h100, ceilings=None, dtype="bf16")
    assert r.t_roof_datasheet_us == pytest.approx(1_376_256 / 3.35e12 * 1e6)
    assert r.efficiency_datasheet == pytest.approx(0.410823, rel=1e-5) and r.bound == "memory"


@pytest.mark.parametrize("kwargs, match", [
    ({"flops": -1}, "flops: expected a non-negative int"),
    ({"min_bytes": 0}, "min_bytes: expected a positive int"),
    ({"time_us": 0.0}, "time_us: expected a positive finite number"),
    ({"time_us": float("nan")}, "time_us: expected a positive finite number"),
    ({"dtype": "int4"}, "dtype: expected one of"),
])
def test_bad_arguments(kwargs, match):
    args = {"flops": 1, "min_bytes": 1, "time_us": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        roofline(args["flops"], args["min_bytes"], args["time_us"], spec=SPEC, ceilings=CEIL,
                 dtype=kwargs.get("dtype", "bf16"))
