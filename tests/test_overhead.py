"""The eager loop's overhead micro-benchmark (host work per step, dispatch per op) and the CPU sequence timing:
sane positive values, the stubs put back, the record through the run file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tokprof.kernels as kernels
from tokprof.models import transformer
from tokprof.models.config import ModelConfig
from tokprof.models.plan import decode_plan
from tokprof.profiler import timing
from tokprof.profiler.bench import bench_sequence
from tokprof.profiler.devices import detect_device
from tokprof.profiler.overhead import Overhead, measure_host_work, measure_overhead
from tokprof.profiler.schema import DeviceInfo, Provenance, RunResult, load_run, save_run

TINY = ModelConfig.from_name("tiny")


def test_host_work_stubs_every_kernel_call_of_a_step_and_puts_them_back() -> None:
    hw = measure_host_work(TINY, 2, "cpu", torch.float32, steps=15)
    # The step's kernel calls: embedding, per layer 10 (norm, qkv, rope, append, attention, o, norm, gate-up, swiglu,
    # down), then final norm, LM head and sampling -- the plan's counts summed.
    assert hw.kernel_calls == sum(c.count for c in decode_plan(TINY, 2, 64, "fp32")) == 1 + 10 * 2 + 3
    assert 0 < hw.per_step_us < 1e5 and hw.p10_us <= hw.per_step_us <= hw.p90_us
    assert 0 < hw.stub_call_us < 100
    for name in ("linear", "rms_norm", "decode_attention", "greedy_sample", "embedding"):
        assert getattr(transformer, name) is getattr(kernels, name)  # the real kernels are back


def test_overhead_record_round_trips_through_the_run_file(tmp_path: Path) -> None:
    oh = measure_overhead(TINY, [1, 4], "cpu", dtype="fp32", backend="torch", steps=10, calls=10)
    assert [h.batch for h in oh.host_work] == [1, 4]
    assert {d.op for d in oh.dispatch} == {c.op for c in decode_plan(TINY, 1, 16, "fp32")}
    assert all(d.per_call_us > 0 and d.calls == 10 for d in oh.dispatch)
    assert oh.kind == "cpu" and oh.provenance == "measured" and oh.dtype == "fp32"
    assert oh.host_work_us(4) == oh.host_work[1].per_step_us
    assert oh.host_work_us(3) == oh.host_work[1].per_step_us  # nearest measured batch
    assert oh.dispatch_us("linear") > 0 and oh.dispatch_us("no_such_op") is None
    run = RunResult(provenance=Provenance(host="h", device=detect_device("cpu"), versions={}, git_sha=None,
                                          timestamp_utc="2026-01-01T00:00:00Z", command=["t"]))
    run.overhead = oh.to_dict()
    run.cpu_load = {"other_cores": 0.1, "cores": 2, "contended": False, "phases": {}}
    loaded = load_run(save_run(run, tmp_path / "run.json"))
    assert Overhead.from_dict(loaded.overhead) == oh
    assert loaded.cpu_load == run.cpu_load


def test_overhead_refuses_bad_batches() -> None:
    with pytest.raises(ValueError, match="batches"):
        measure_overhead(TINY, [0], "cpu", dtype="fp32", backend="torch")


def test_sequence_timing_times_every_call_in_order() -> None:
    calls = [("linear", {"M": 1, "N": 64, "K": 64}, "fp32", "torch"),
             ("rms_norm", {"T": 1, "H": 64, "residual": 0}, "fp32", "torch"),
             ("swiglu", {"T": 1, "I": 64}, "fp32", "torch")]
    kws = {"min_samples": 5, "min_time_s": 0.001, "max_time_s": 0.01}
    got, failures = bench_sequence(calls, "cpu", timing_kwargs=kws, keep=lambda c: c[0] != "swiglu")
    assert failures == [] and [k.op for k in got] == ["linear", "rms_norm"]
    for k in got:
        assert k.timing.mode == "sequence" and k.timing.timer == "perf_counter"
        assert len(k.timing.samples_us) >= 5 and k.timing.median_us > 0
        assert k.roofline.time_us == k.timing.median_us
    with pytest.raises(ValueError, match="device"):
        timing.measure_sequence([(lambda kw: None, {})], device="cuda" if torch.cuda.is_available() else "meta")


def test_cpu_flush_writes_before_each_call_and_says_so() -> None:
    t = torch.ones(16)
    cold = timing.measure(lambda kw: kw["x"].sum(), {"x": t}, device="cpu", min_samples=5, min_time_s=0.001,
                          max_time_s=0.01, warmup_ms=0, cpu_flush_bytes=1 << 16)
    assert cold.cold_l2 and "65536 B written before each call" in cold.note
    warm = timing.measure(lambda kw: kw["x"].sum(), {"x": t}, device="cpu", min_samples=5, min_time_s=0.001,
                          max_time_s=0.01, warmup_ms=0)
    assert not warm.cold_l2 and "no cache flush" in warm.note
    with pytest.raises(ValueError, match="cpu_flush_bytes"):
        timing.measure(lambda kw: None, {"x": t}, device="cpu", cpu_flush_bytes=-1)


def test_cpu_cache_sizes_from_sysfs(tmp_path: Path) -> None:
    for i, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "512K"),
                                              (3, "Unified", "32768K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert timing.cpu_cache_bytes(root=str(tmp_path)) == 32 << 20
    assert timing.cpu_cache_bytes(2, root=str(tmp_path)) == 512 << 10
    assert timing.cpu_cache_bytes(root=str(tmp_path / "none")) is None


def test_a_cpu_read_above_the_dram_ceiling_needs_the_cache_to_explain_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokprof.profiler.bench import explain_cache
    from tokprof.profiler.roofline import roofline
    from tokprof.profiler.schema import Ceilings

    monkeypatch.setattr(timing, "cpu_cache_bytes", lambda level=None: 32 << 20)
    ceil = Ceilings(copy_gbps=20.0, gemm_tflops=0.1, gemm_dtype="fp32", copy_bytes=1 << 30, gemm_shape=[1024] * 3,
                    device="cpu", measured_utc="x")
    # 1 MiB in 20 us = 52 GB/s: 262% of a 20 GB/s ceiling
    fast = roofline(0, 1 << 20, 20.0, spec=None, ceilings=ceil, dtype="fp32")
    assert fast.suspicious
    explain_cache(fast, 4 << 20, "one of 3 calls, round-robin")
    assert not fast.suspicious and "explained by the cache" in fast.note
    big = roofline(0, 1 << 20, 20.0, spec=None, ceilings=ceil, dtype="fp32")
    explain_cache(big, 64 << 20, "one of 3 calls, round-robin")
    assert big.suspicious and "exceed the 32 MiB LLC" in big.note
    flushed = roofline(0, 1 << 20, 20.0, spec=None, ceilings=ceil, dtype="fp32")
    explain_cache(flushed, None, "flushed")
    assert flushed.suspicious and "flushed" in flushed.note


def test_device_info_kind_is_what_the_prediction_keys_on() -> None:
    assert DeviceInfo(kind="cpu", name="x").kind == "cpu"
