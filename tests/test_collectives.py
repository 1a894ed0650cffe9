"""Collectives: the gloo benchmark with 2 spawned ranks, nccl-tests bandwidth arithmetic, modelled times."""

from __future__ import annotations

import random

import pytest

from tokprof.models.config import ModelConfig
from tokprof.models.tp import tp_decode_calls
from tokprof.profiler.collectives import (
    Link,
    algbw_gbps,
    bench_collectives,
    bus_factor,
    busbw_gbps,
    collective_roofline,
    collective_time_us,
    interconnect,
    message_elems,
    modelled_all_gather_us,
    modelled_all_reduce_us,
    parse_bytes,
    plan_collective_times,
)
from tokprof.profiler.devices import load_specs
from tokprof.profiler.schema import KernelMeasurement

FAST = {"min_samples": 5, "min_time_s": 0.0, "max_time_s": 0.15, "warmup_ms": 2.0}


@pytest.fixture(scope="module")
def gloo_records() -> list[KernelMeasurement]:
    # one spawn of 2 ranks for every case: process start-up is most of the cost on a small CPU
    rng = random.Random(7)
    small = 4 * rng.randint(64, 1024) + 3  # deliberately not a multiple of the element size
    return bench_collectives([("all_reduce", small), ("all_reduce", 1 << 16), ("all_gather", 1 << 16)],
                             world_size=2, device="cpu", timing_kwargs=FAST, seed=rng.randint(0, 1000))


def test_gloo_benchmark_two_ranks(gloo_records: list[KernelMeasurement]) -> None:
    assert [m.op for m in gloo_records] == ["all_reduce", "all_reduce", "all_gather"]
    small = gloo_records[0].shape["bytes"]
    assert small % 4 == 0  # rounded down to whole fp32 elements
    assert [m.shape for m in gloo_records[1:]] == [{"bytes": 65536, "world": 2}] * 2
    for m in gloo_records:
        t, r = m.timing, m.roofline
        assert (m.backend, m.dtype, m.provenance, t.timer, t.mode) == ("gloo", "fp32", "measured", "perf_counter",
                                                                       "cpu")
        assert len(t.samples_us) >= FAST["min_samples"]
        assert t.p10_us <= t.median_us <= t.p90_us and t.median_us > 0
        assert "result checked against a host reference" in t.note
        # nccl-tests: algbw = bytes / time; busbw = algbw x 2(n-1)/n (all_reduce) or (n-1)/n (all_gather)
        nbytes = m.shape["bytes"]
        algbw = nbytes / (t.median_us * 1e-6) / 1e9
        factor = 1.0 if m.op == "all_reduce" else 0.5
        assert r.achieved_gbps == pytest.approx(algbw * factor, rel=1e-12)
        assert r.min_bytes == round(nbytes * factor)
        assert f"algbw {algbw:.3f} GB/s" in r.note
        # the CPU has no interconnect in the spec table: no roof, and the note says why
        assert r.t_roof_datasheet_us is None and r.efficiency_datasheet is None and r.bound is None
        assert "a CPU run (gloo): no interconnect spec" in r.note
        assert m.energy is None and m.energy_reason


def test_measured_collective_replaces_the_modelled_one(gloo_records: list[KernelMeasurement]) -> None:
    spec = load_specs()["h100-sxm"]
    m = gloo_records[1]
    got = collective_time_us("all_reduce", 65536, 2, "fp32", spec=spec, measurements=gloo_records)
    assert (got.provenance, got.time_us) == ("measured", m.timing.median_us)
    other = collective_time_us("all_reduce", 65536, 4, "fp32", spec=spec, measurements=gloo_records)
    assert other.provenance == "modelled"  # a different world size is not the same collective
    assert other.time_us == pytest.approx(modelled_all_reduce_us(65536, 4, spec))
    assert "no measurement of this size" in other.note


def test_bus_factors_and_bandwidths() -> None:
    for n in (2, 4, 8):
        assert bus_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
        assert bus_factor("all_gather", n) == pytest.approx((n - 1) / n)
        assert bus_factor("all_to_all", n) == pytest.approx((n - 1) / n)
    # 1 GB all-reduce over 8 ranks in 4 ms: algbw 250 GB/s, busbw 437.5 GB/s
    assert algbw_gbps(10**9, 4000.0) == pytest.approx(250.0)
    assert busbw_gbps("all_reduce", 10**9, 8, 4000.0) == pytest.approx(437.5)
    assert busbw_gbps("all_gather", 10**9, 8, 4000.0) == pytest.approx(218.75)
    with pytest.raises(ValueError, match="world: expected an int >= 2"):
        bus_factor("all_reduce", 1)
    with pytest.raises(ValueError, match="op: expected one of"):
        bus_factor("broadcast", 2)
    assert message_elems("all_gather", 100, 4, 2) == (12, 96)  # whole shards of 2-byte elements per rank
    assert message_elems("all_reduce", 7, 2, 2) == (3, 6)
    with pytest.raises(ValueError, match="bytes: expected an int >= 8"):
        message_elems("all_gather", 7, 4, 2)
    assert parse_bytes("4k, 1M,3") == [4096, 1 << 20, 3]
    with pytest.raises(ValueError, match="bytes: expected comma-separated sizes"):
        parse_bytes("4q")


def test_modelled_collectives_from_the_spec_table() -> None:
    specs = load_specs()
    h100, l40s = specs["h100-sxm"], specs["l40s"]
    rng = random.Random(3)
    nbytes, world = rng.randint(1, 1 << 24), rng.choice([2, 4, 8])
    # NVLink: 900 GB/s per GPU both directions -> 450 per direction; 10 us stated latency; 0.7 stated efficiency
    expected = 10.0 + nbytes * 2 * (world - 1) / world / (450e9 * 0.7) * 1e6
    assert modelled_all_reduce_us(nbytes, world, h100) == pytest.approx(expected, rel=1e-12)
    expected_ag = 3.0 + nbytes * (world - 1) / world / (450e9 * 0.5) * 1e6
    assert modelled_all_gather_us(nbytes, world, h100, efficiency=0.5, latency_us=3.0) == pytest.approx(
        expected_ag, rel=1e-12)
    # no NVLink on an L40S: PCIe Gen4 x16, 32 GB/s per direction, 25 us stated latency
    assert interconnect(l40s).kind == "pcie"
    assert modelled_all_reduce_us(nbytes, world, l40s) == pytest.approx(
        25.0 + nbytes * 2 * (world - 1) / world / (32e9 * 0.7) * 1e6, rel=1e-12)
    assert interconnect(h100, "pcie").gbps_per_direction == 64.0
    with pytest.raises(ValueError, match="l40s has no nvlink bandwidth"):
        interconnect(l40s, "nvlink")
    assert modelled_all_reduce_us(nbytes, world, None) is None  # a CPU or unknown GPU: unknown, not a guess
    with pytest.raises(ValueError, match="efficiency: expected a fraction"):
        modelled_all_reduce_us(nbytes, world, h100, efficiency=1.5)
    link = Link("nvlink", 100.0, "stated")
    assert modelled_all_reduce_us(10**6, 2, link, efficiency=1.0, latency_us=0.0) == pytest.approx(10.0)


def test_collective_roofline_against_the_link() -> None:
    link = Link("nvlink", 450.0, "h100-sxm")
    # 64 MiB all-reduce over 8 GPUs in 300 us: bus bytes 1.75 x 64 MiB, roof at 450 GB/s
    nbytes = 64 << 20
    r = collective_roofline("all_reduce", nbytes, 8, 2, 300.0, link)
    assert r.min_bytes == round(nbytes * 1.75)
    assert r.t_roof_datasheet_us == pytest.approx(nbytes * 1.75 / 450e9 * 1e6)
    assert r.efficiency_datasheet == pytest.approx(r.t_roof_datasheet_us / 300.0)
    assert r.bound == "interconnect" and not r.suspicious
    assert r.flops == (nbytes // 2) * 7 // 8
    fast = collective_roofline("all_reduce", nbytes, 8, 2, 100.0, link)  # busbw above the link
    assert fast.suspicious and "NVLink SHARP" in fast.note


def test_tp2_plan_communication_is_modelled_then_measured(gloo_records: list[KernelMeasurement]) -> None:
    h100 = load_specs()["h100-sxm"]
    cfg = ModelConfig.from_name("llama-3.1-8b")
    calls = tp_decode_calls(cfg, 8, 1024, "bf16", tp=2)
    times = plan_collective_times(calls, spec=h100)
    assert [(c.op, c.count) for c, _ in times] == [("all_reduce", 64), ("all_gather", 1)]
    assert all(t.provenance == "modelled" for _, t in times)
    step_comm_us = sum(c.count * t.time_us for c, t in times)
    ar = modelled_all_reduce_us(8 * 4096 * 2, 2, h100)
    ag = modelled_all_gather_us(8 * 128256 * 2, 2, h100)
    assert step_comm_us == pytest.approx(64 * ar + ag, rel=1e-12)
    # a run that measured the plan's all-reduce (same bytes, world and dtype) replaces the modelled figure
    m = gloo_records[1]
    fake = KernelMeasurement(op="all_reduce", shape={"bytes": 8 * 4096 * 2, "world": 2}, dtype="bf16",
                             backend="nccl", device="NVIDIA H100 80GB HBM3", timing=m.timing, roofline=m.roofline)
    times = plan_collective_times(calls, spec=h100, measurements=[fake])
    assert [t.provenance for _, t in times] == ["measured", "modelled"]
    assert times[0][1].time_us == m.timing.median_us


@pytest.mark.parametrize(("args", "message"), [
    (["--op", "swiglu,all_reduce"], "collectives (all_reduce, all_gather, all_to_all) are measured on their own"),
    (["--op", "all_reduce", "--shape", "T=4"], "a collective takes bytes=N"),
    (["--op", "all_reduce", "--shape", "bytes=4q"], "bytes: expected comma-separated sizes"),
    (["--op", "all_gather", "--world-size", "1"], "a collective needs at least 2 ranks, got 1"),
    (["--op", "all_reduce", "--dtype", "fp32,bf16"], "one dtype per collective benchmark"),
])
def test_cli_bench_collectives_refuses_bad_arguments(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from tokprof.cli import app

    result = CliRunner().invoke(app, ["bench", *args, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
