"""bench_op / bench_calls / new_run on the CPU, CPU ceilings, and the RunResult file (round trip, rejections)."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from tokprof.kernels import OPS
from tokprof.profiler import bench, ceilings
from tokprof.profiler.bench import bench_calls, bench_op, new_run, parse_shape, plan_calls
from tokprof.profiler.ceilings import cache_key, measure_ceilings
from tokprof.profiler.devices import detect_device
from tokprof.profiler.schema import SCHEMA_VERSION, Ceilings, Failure, load_run, save_run, to_dict

FAST = {"max_time_s": 0.15, "min_time_s": 0.02, "warmup_ms": 2.0}  # short CPU sampling: values, not precision
SHAPE = {"T": 4, "I": 256}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKPROF_CACHE_DIR", str(tmp_path / "cache"))


def test_bench_op_cpu_torch_swiglu():
    m = bench_op("swiglu", SHAPE, "fp32", "torch", "cpu", timing_kwargs=FAST)
    flops, min_bytes = OPS["swiglu"].cost(SHAPE, torch.float32)
    assert (m.op, m.shape, m.dtype, m.backend) == ("swiglu", SHAPE, "fp32", "torch")
    assert m.device == detect_device("cpu").name and m.provenance == "measured"
    assert m.timing.mode == "cpu" and m.timing.timer == "perf_counter" and len(m.timing.samples_us) >= 10
    assert 0 < m.timing.p10_us <= m.timing.median_us <= m.timing.p90_us
    r = m.roofline
    assert (r.flops, r.min_bytes) == (flops, min_bytes) == (5 * 4 * 256, 3 * 4 * 256 * 4)
    assert r.time_us == m.timing.median_us
    assert r.achieved_gbps == pytest.approx(min_bytes / (m.timing.median_us * 1e-6) / 1e9)
    assert r.efficiency_datasheet is None and r.efficiency_measured is None  # a CPU: no spec row, no ceilings
    assert m.energy is None and m.energy_reason.startswith("no energy counter on a cpu") and m.graph_timing is None


def test_bench_op_energy_on_cpu_gives_reason_not_a_number():
    m = bench_op("swiglu", SHAPE, "fp32", "torch", "cpu", energy=True, timing_kwargs=FAST)
    assert m.energy is None and m.energy_reason.startswith("no energy counter on a cpu")


def test_bench_op_with_ceilings_measured_efficiency():
    c = Ceilings(copy_gbps=10.0, gemm_tflops=0.1, gemm_dtype="fp32", copy_bytes=1 << 20, gemm_shape=[64] * 3,
                 device="test", measured_utc="2026-01-01T00:00:00Z")
    m = bench_op("swiglu", SHAPE, "fp32", "torch", "cpu", timing_kwargs=FAST, ceilings=c)
    r = m.roofline
    # t_roof = max(5120 FLOP / 1e11 FLOP/s, 12288 B / 1e10 B/s) = 1.2288 us
    assert r.t_roof_measured_us == pytest.approx(1.2288)
    assert r.efficiency_measured == pytest.approx(1.2288 / m.timing.median_us)
    assert r.bound == "memory"


def test_bench_op_bad_arguments():
    with pytest.raises(ValueError, match="op: expected one of"):
        bench_op("nope", SHAPE, "fp32", "torch", "cpu")
    with pytest.raises(ValueError, match="shape: swiglu takes keys"):
        bench_op("swiglu", {"Q": 1}, "fp32", "torch", "cpu")
    with pytest.raises(ValueError, match="dtype: expected one of"):
        bench_op("swiglu", SHAPE, "int8", "torch", "cpu")
    with pytest.raises(ValueError, match="mode: expected one of"):
        bench_op("swiglu", SHAPE, "fp32", "torch", "cpu", mode="wall")
    with pytest.raises(RuntimeError, match="cannot run swiglu on cpu.*Backends that work here: torch"):
        bench_op("swiglu", SHAPE, "fp32", "cuda", "cpu")


def test_bench_calls_writes_a_valid_file_and_records_failures(tmp_path):
    out = tmp_path / "run.json"
    seen = []
    calls = [("swiglu", {"T": 2, "I": 64}, "fp32", "torch"),
             ("swiglu", {"T": 2, "I": 64}, torch.float32, "torch"),  # the same call again: measured once
             ("swiglu", {"T": 2, "I": 0}, "fp32", "torch"),  # swiglu raises ValueError (I = 0): a Failure
             ("swiglu", {"T": 3, "I": 32}, "fp32", "torch")]  # and the sweep goes on
    kernels, failures = bench_calls(calls, "cpu", timing_kwargs=FAST, out=out, progress=False,
                                    on_result=seen.append)
    assert [k.shape for k in kernels] == [{"T": 2, "I": 64}, {"T": 3, "I": 32}]
    assert len(failures) == 1 and failures[0].shape == {"T": 2, "I": 0}
    assert failures[0].error.startswith("ValueError: gate_up: expected an even, non-zero last dimension")
    assert len(seen) == 3
    run = load_run(out)
    assert [k.shape for k in run.kernels] == [k.shape for k in kernels]
    assert [f.error for f in run.failures] == [f.error for f in failures]
    assert run.provenance.device.kind == "cpu" and run.schema_version == SCHEMA_VERSION


def test_out_of_memory_is_a_failure_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real = bench.timing.measure

    def measure(call, inputs, **kwargs):
        if inputs["gate_up"].shape[0] == 7:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(call, inputs, **kwargs)

    monkeypatch.setattr(bench.timing, "measure", measure)
    calls = [("swiglu", {"T": 7, "I": 64}, "fp32", "torch"), ("swiglu", {"T": 2, "I": 64}, "fp32", "torch")]
    kernels, failures = bench_calls(calls, "cpu", timing_kwargs=FAST, out=tmp_path / "r.json", progress=False)
    assert len(kernels) == 1 and kernels[0].shape["T"] == 2
    assert failures[0].error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 80.00 GiB"
    assert load_run(tmp_path / "r.json").failures[0].shape == {"T": 7, "I": 64}


def test_a_failed_idle_power_read_keeps_the_timings_and_says_why(tmp_path, monkeypatch):
    # NVML present (energy_status None) but its first read fails: the sweep measures time, energy is None with the
    # reason, and the run says so once.
    monkeypatch.setattr(bench.energy_mod, "energy_status", lambda device: None)

    def broken_meter(device):
        raise RuntimeError("NVML: nvmlDeviceGetTotalEnergyConsumption failed (Unknown Error)")

    monkeypatch.setattr(bench.energy_mod, "make_meter", broken_meter)
    run = new_run(["test"], "cpu")
    calls = [("swiglu", {"T": 2, "I": 64}, "fp32", "torch")]
    kernels, failures = bench_calls(calls, "cpu", energy=True, timing_kwargs=FAST, run=run, progress=False)
    assert not failures and kernels[0].timing.median_us > 0 and kernels[0].energy is None
    assert kernels[0].energy_reason == ("idle power measurement failed (RuntimeError: NVML: "
                                        "nvmlDeviceGetTotalEnergyConsumption failed (Unknown Error))")
    assert any(n.startswith("energy not measured: idle power measurement failed") for n in run.notes)


def test_triton_resource_errors_are_failures_and_the_sweep_goes_on(tmp_path, monkeypatch):
    # Triton's OutOfResources (shared memory of a config too big for the GPU) derives from Exception, not
    # RuntimeError: a sweep that caught RuntimeError only would die with a traceback on the first such shape.
    errors = pytest.importorskip("triton.runtime.errors")
    real = bench.bench_op

    def bench_op(op, shape, *args, **kwargs):
        if shape["T"] == 5:
            raise errors.OutOfResources(262144, 232448, "shared memory")
        return real(op, shape, *args, **kwargs)

    monkeypatch.setattr(bench, "bench_op", bench_op)
    calls = [("swiglu", {"T": 5, "I": 64}, "fp32", "torch"), ("swiglu", {"T": 2, "I": 64}, "fp32", "torch")]
    kernels, failures = bench_calls(calls, "cpu", timing_kwargs=FAST, out=tmp_path / "r.json", progress=False)
    assert [k.shape["T"] for k in kernels] == [2]
    assert failures[0].error.startswith("OutOfResources: out of resource: shared memory, Required: 262144")
    assert {RuntimeError, ValueError, MemoryError} <= set(bench.SWEEP_ERRORS)
    assert load_run(tmp_path / "r.json").failures[0].shape == {"T": 5, "I": 64}


def test_ctrl_c_saves_what_was_measured_then_reraises(tmp_path, monkeypatch):
    real = bench.bench_op

    def bench_op_interrupted(op, shape, *args, **kwargs):
        if shape["T"] == 9:
            raise KeyboardInterrupt
        return real(op, shape, *args, **kwargs)

    monkeypatch.setattr(bench, "bench_op", bench_op_interrupted)
    calls = [("swiglu", {"T": 2, "I": 64}, "fp32", "torch"), ("swiglu", {"T": 9, "I": 64}, "fp32", "torch"),
             ("swiglu", {"T": 3, "I": 64}, "fp32", "torch")]
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        bench_calls(calls, "cpu", timing_kwargs=FAST, out=out, progress=False)
    run = load_run(out)
    assert [k.shape["T"] for k in run.kernels] == [2]
    assert run.failures[0].shape["T"] == 9 and "KeyboardInterrupt" in run.failures[0].error
    assert any("interrupted" in n for n in run.notes)
    assert "during the kernel benchmark of swiglu" in run.interrupted and "keeps everything measured" in \
        run.interrupted


def test_new_run_provenance():
    run = new_run(["tokprof", "bench", "--op", "swiglu"], "cpu")
    p = run.provenance
    assert p.command == ["tokprof", "bench", "--op", "swiglu"] and p.host
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", p.timestamp_utc)
    assert p.versions["torch"] == torch.__version__ and p.clocks is None  # no NVML on a CPU
    assert p.device.kind == "cpu" and run.run_id and run.kernels == [] and run.ceilings is None


def test_parse_and_plan():
    assert parse_shape("T=16, I=14336") == {"T": 16, "I": 14336}
    for bad, match in (("T", "k=v pairs"), ("T=x", "T expected a non-negative int"), ("T=1,T=2", "given twice"),
                       ("", "k=v pairs")):
        with pytest.raises(ValueError, match=match):
            parse_shape(bad)
    calls, skipped = plan_calls(["swiglu"], ["torch", "cuda"], ["fp32", "fp16"], [{"T": 2}], "cpu")
    assert calls == [("swiglu", {"T": 2, "I": 14336}, "fp32", "torch"), ("swiglu", {"T": 2, "I": 14336}, "fp16",
                                                                          "torch")]
    assert len(skipped) == 1 and skipped[0].startswith("swiglu cuda:")
    with pytest.raises(ValueError, match=r"shape: unknown key\(s\) \['Z'\]"):
        plan_calls(["swiglu"], ["torch"], ["fp32"], [{"Z": 2}], "cpu")
    with pytest.raises(ValueError, match="nothing to run on cpu"):
        plan_calls(["swiglu"], ["cuda"], ["fp32"], [], "cpu")


# ------------------------------------------------------------------------------------------------------ ceilings


def test_cpu_ceilings_are_positive_plausible_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(ceilings, "CACHE_MAX_NOISE", 1.0)  # the cache mechanics, whatever the noise of a busy CPU
    c = measure_ceilings("cpu", cache=True, copy_buffer_bytes=8 << 20, gemm_n=128,
                         timing_kwargs={"max_time_s": 0.1, "min_time_s": 0.02})
    assert c.gemm_dtype == "fp32" and c.copy_bytes == 16 << 20 and c.gemm_shape == [128, 128, 128]
    assert 0.1 < c.copy_gbps < 2000  # a CPU memory copy: from a slow shared core to HBM-class machines
    assert 1e-6 < c.gemm_tflops < 100  # a 128^3 GEMM on 2 cores shared with 8 busy processes ran at 78 MFLOP/s
    assert c.read_gbps is not None and c.read_gbps > 0.01
    assert "CPU ceilings" in c.note and c.device == detect_device("cpu").name
    path = tmp_path / "cache" / "ceilings" / f"{cache_key(detect_device('cpu'))}.json"
    assert json.loads(path.read_text())["copy_gbps"] == c.copy_gbps
    again = measure_ceilings("cpu", copy_buffer_bytes=8 << 20, gemm_n=128)  # read back, not re-measured
    assert again.copy_gbps == c.copy_gbps and "read from cache" in again.note
    other = measure_ceilings("cpu", copy_buffer_bytes=4 << 20, gemm_n=64,  # other sizes: measured anew
                             timing_kwargs={"max_time_s": 0.05, "min_time_s": 0.01})
    assert other.copy_bytes == 8 << 20 and "read from cache" not in other.note


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKPROF_CACHE_DIR", str(tmp_path / "a"))
    assert ceilings.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("TOKPROF_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert ceilings.cache_dir() == tmp_path / "x" / "tokprof"


def test_gpu_cache_key_needs_uuid_and_driver():
    info = detect_device("cpu")
    gpu = type(info)(kind="cuda", name="NVIDIA H100 80GB HBM3", uuid="GPU-1234", driver="570.1")
    assert cache_key(gpu) == "GPU-1234-driver570.1"
    assert cache_key(type(info)(kind="cuda", name="x", uuid="GPU-1234", driver=None)) is None


@pytest.mark.gpu
def test_gpu_ceilings_near_facts():
    c = measure_ceilings("cuda", cache=False)
    # FACTS.md: H100 ~3.0 TB/s copy and ~800 TFLOP/s bf16; any current datacenter GPU lands in these ranges.
    assert c.gemm_dtype == "bf16" and c.copy_bytes >= 1e9
    assert 300 < c.copy_gbps < 10_000 and 50 < c.gemm_tflops < 3000


# ------------------------------------------------------------------------------------------------ the run file


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run.json"
    bench_calls([("swiglu", {"T": 2, "I": 64}, "fp32", "torch")], "cpu", timing_kwargs=FAST, out=out,
                progress=False)
    return out


def test_round_trip(run_file, tmp_path):
    run = load_run(run_file)
    run.failures.append(Failure(op="swiglu", shape={"T": 1, "I": 1}, dtype="fp16", backend="triton", error="boom"))
    save_run(run, tmp_path / "again.json")
    assert to_dict(load_run(tmp_path / "again.json")) == to_dict(run)


def _broken(run_file, tmp_path, edit):
    data = json.loads(run_file.read_text())
    edit(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["provenance"].pop("host"), r"provenance\.host: missing"),
    (lambda d: d["kernels"][0]["timing"].__setitem__("median_us", "fast"),
     r"kernels\[0\]\.timing\.median_us: expected a number, got str"),
    (lambda d: d["kernels"][0]["shape"].__setitem__("T", 2.5), r"kernels\[0\]\.shape\.T: expected an integer"),
    (lambda d: d.__setitem__("schema_version", SCHEMA_VERSION + 1), "newer than this tokprof reads"),
    (lambda d: d["kernels"][0].__setitem__("provenance", "guessed"), "provenance: expected one of"),
    (lambda d: d["kernels"][0]["roofline"].__setitem__("speed", 1), r"unknown fields \['speed'\]"),
])
def test_malformed_files_are_rejected_with_the_field(run_file, tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        load_run(_broken(run_file, tmp_path, edit))


def test_truncated_file_is_rejected(run_file, tmp_path):
    path = tmp_path / "cut.json"
    text = run_file.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        load_run(path)


def test_noisy_ceilings_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(ceilings, "CACHE_MAX_NOISE", -1.0)  # every measurement is "too noisy"
    c = measure_ceilings("cpu", copy_buffer_bytes=1 << 20, gemm_n=32,
                         timing_kwargs={"max_time_s": 0.05, "min_time_s": 0.01})
    assert c.copy_gbps > 0 and "not cached: noise" in c.note
    assert not (tmp_path / "cache" / "ceilings" / f"{cache_key(detect_device('cpu'))}.json").exists()


def test_corrupt_ceilings_cache_warns_and_remeasures(tmp_path, monkeypatch):
    monkeypatch.setattr(ceilings, "CACHE_MAX_NOISE", 1.0)
    path = tmp_path / "cache" / "ceilings" / f"{cache_key(detect_device('cpu'))}.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"copy_gbps": 1')
    with pytest.warns(UserWarning, match="unreadable ceilings cache entry"):
        c = measure_ceilings("cpu", copy_buffer_bytes=1 << 20, gemm_n=32,
                             timing_kwargs={"max_time_s": 0.05, "min_time_s": 0.01})
    assert c.copy_gbps > 0 and json.loads(path.read_text())["gemm_shape"] == [32, 32, 32]


# ----------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_short_kernel_gets_graph_timing_and_a_datasheet_roofline():
    m = bench_op("swiglu", {"T": 1, "I": 14336}, "bf16", "triton", "cuda")
    assert m.timing.mode == "events" and m.timing.cold_l2
    if m.timing.median_us < bench.SHORT_KERNEL_US:
        assert m.graph_timing is not None and m.graph_timing.mode == "graph"
    if detect_device("cuda").spec_key is not None:
        assert 0 < m.roofline.efficiency_datasheet <= 1.0 and m.roofline.bound == "memory"


@pytest.mark.gpu
def test_gpu_energy_per_call():
    m = bench_op("swiglu", {"T": 64, "I": 14336}, "bf16", "cuda", "cuda", energy=True,
                 energy_kwargs={"window_s": 1.0, "cooldown_s": 0.2})
    if m.energy is None:
        assert m.energy_reason  # NVML present but no counter/power on this board: said, not guessed
    else:
        assert 0 < m.energy.dynamic_j_per_call < m.energy.total_j_per_call < 1.0 and m.energy.calls > 100


def test_energy_path_with_a_replayed_h100_trace():
    # The recorded-behaviour trace of tests/data (synthetic, documented in the file): 3-6 s at ~600 W after 70 W
    # idle. A clock that follows real time from t = 3.2 s puts the kernel window in the busy phase.
    from pathlib import Path

    from tokprof.profiler import energy

    start = time.perf_counter()
    meter = energy.make_meter("cpu", trace=Path(__file__).parent / "data" / "nvml_energy_trace_h100.json",
                              clock=lambda: 3.2 + (time.perf_counter() - start))
    m = bench_op("swiglu", SHAPE, "fp32", "torch", "cpu", energy=True, meter=meter, idle_power_w=70.0,
                 timing_kwargs=FAST, energy_kwargs={"window_s": 0.3, "cooldown_s": 0.0})
    e = m.energy
    assert e is not None and m.energy_reason is None and e.method == "counter" and e.idle_power_w == 70.0
    busy_s_per_call = e.window_s / e.calls
    # ~600 W while busy. The meter waits up to one counter step (<= 100 ms) for the last update and takes that tail
    # off at the idle 70 W, but the trace is still at ~600 W then: up to 530 W x 0.1 s more in the window.
    assert 0.95 * 600 * busy_s_per_call <= e.total_j_per_call <= (605 * e.window_s + 535 * 0.1) / e.calls
    assert e.dynamic_j_per_call == pytest.approx(e.total_j_per_call - 70 * busy_s_per_call, rel=1e-9)


def test_graph_time_is_gated_on_the_modelled_time_not_the_event_time():
    from tokprof.profiler.bench import wants_graph_time
    from tokprof.profiler.devices import load_specs

    h200 = load_specs()["h200"]
    # RMSNorm of one 4096-wide bf16 row: 16 KiB, modelled ~2 us; an event time the host inflated to 25 us must not
    # take away its graph time
    assert wants_graph_time(4 * 4096, 2 * 2 * 4096 + 2 * 4096, h200, "bf16", events_us=25.0)
    # a 4096x14336 bf16 GEMV reads 117 MB: ~30 us at the roof, no graph time even if the events said 9 us
    assert not wants_graph_time(2 * 4096 * 14336, 2 * 4096 * 14336, h200, "bf16", events_us=9.0)
    assert wants_graph_time(0, 1 << 30, None, "bf16", events_us=9.0)  # no datasheet row: the event time decides


def test_idle_power_is_bracketed_after_the_sweep():
    # a replayed NVML trace (idle ~70 W): the second idle reading after the sweep is compared with the first, the
    # run says how far apart they were, and the meter keeps the first (the sweep's calls were computed with it)
    from pathlib import Path

    from tokprof.profiler.energy import EnergyMeter, ManualClock, ReplaySource, measure_idle_power

    trace = Path(__file__).parent / "data" / "nvml_energy_trace_h100.json"
    meter = EnergyMeter(ReplaySource.from_file(trace, clock=ManualClock(0.5)))
    before = measure_idle_power(meter, seconds=1.0)
    run = new_run(["test"], "cpu")
    after = bench._bracket_idle(meter, before, torch.device("cpu"), {"window_s": 0.5}, run)
    assert after == pytest.approx(70.0, rel=0.05) and meter.idle_power_w == before
    assert [n for n in run.notes if n.startswith(f"idle power bracketed: {before:.1f} W before")], run.notes
    assert bench._bracket_idle(meter, 2 * after, torch.device("cpu"), {"window_s": 0.5}, run) is not None
    assert "uncertain" in run.notes[-1]  # 50% apart: flagged


def test_cpu_passes_merge_each_call_and_refuse_nonsense(tmp_path):
    from tokprof.profiler.bench import bench_calls

    calls = [("rms_norm", {"T": 2, "H": 64}, "fp32", "torch"), ("swiglu", {"T": 2, "I": 64}, "fp32", "torch")]
    out = tmp_path / "run.json"
    kernels, failures = bench_calls(calls, "cpu", timing_kwargs={"min_time_s": 0.02, "max_time_s": 0.06},
                                    out=out, progress=False, cpu_passes=3)
    assert not failures and len(kernels) == 2
    for k in kernels:
        assert k.timing.note.startswith("3 passes spread over the sweep") and k.timing.n_samples >= 30
        assert k.roofline.time_us == k.timing.median_us
    from tokprof.profiler.schema import load_run

    saved = load_run(out)
    assert [k.timing.median_us for k in saved.kernels] == [k.timing.median_us for k in kernels]
    with pytest.raises(ValueError, match="cpu_passes: expected a positive int"):
        bench_calls(calls, "cpu", cpu_passes=0)
