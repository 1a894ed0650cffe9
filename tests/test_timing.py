"""Kernel timing: the CPU timer on work of known cost, cold-L2 sizing, graph rotation, NVML as found.

GPU-only paths (CUDA events, CUDA graphs, NVML clocks) are marked `gpu` and run when a GPU is lent.
"""

from __future__ import annotations

import contextlib
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tokprof.profiler import graphs, nvml, timing
from tokprof.profiler.schema import Clocks, Timing
from tokprof.profiler.timing import (
    check_rotation,
    clone_inputs,
    flush_bytes,
    measure,
    rotation_copies,
    working_set_bytes,
)

HAS_GPU = torch.cuda.is_available()
MIB = 1 << 20


def spin(n: int) -> int:
    """Pure-Python work whose cost is linear in n."""
    total = 0
    for i in range(n):
        total += i * i
    return total


# ---------------------------------------------------------------------------------------------------- CPU timer


def test_cpu_timer_measures_a_2ms_sleep():
    t = measure(lambda kw: time.sleep(kw["seconds"]), {"seconds": 0.002}, device="cpu", max_time_s=0.3,
                noise_target=0.5)
    assert isinstance(t, Timing)
    assert (t.mode, t.timer, t.cold_l2, t.calls_per_sample) == ("cpu", "perf_counter", False, 1)
    # sleep never returns early; on a shared 2-core machine it may overshoot by a few hundred microseconds
    assert 1990.0 <= t.median_us <= 3000.0, t.median_us
    assert t.p10_us <= t.median_us <= t.p90_us
    assert t.clocks_before is None and t.clocks_after is None and t.throttled is None


def test_cpu_timer_sees_doubled_work_as_about_twice_the_time():
    # Other processes share these cores: alternate the two measurements and compare the fastest tenth (p10) of
    # each, the samples least disturbed by contention.
    fastest: dict[int, float] = {}
    for _ in range(3):
        for n in (20_000, 40_000):
            t = measure(lambda kw: spin(kw["n"]), {"n": n}, device="cpu", max_time_s=0.3, noise_target=0.5)
            fastest[n] = min(fastest.get(n, float("inf")), t.p10_us)
    ratio = fastest[40_000] / fastest[20_000]
    assert 1.6 <= ratio <= 2.5, fastest


def test_every_sample_is_kept_and_compile_and_warmup_are_not_timed():
    calls = []

    def call(kw):
        calls.append(time.perf_counter())
        time.sleep(0.001)

    t = measure(call, {}, device="cpu", warmup_ms=25.0, max_time_s=0.3, noise_target=0.5)
    assert len(t.samples_us) >= 10
    # the first call (compile) and >= 25 ms of warm-up calls (about 20 at 1 ms each) are not samples
    untimed = len(calls) - len(t.samples_us)
    assert untimed >= 1 + 10, untimed
    assert sum(t.samples_us) / 1e6 >= 0.09  # the samples cover at least the 0.1 s minimum (less loop overhead)


def test_quiet_enough_stream_stops_at_the_minimums():
    t = measure(lambda kw: time.sleep(0.001), {}, device="cpu", noise_target=0.9, max_time_s=5.0)
    assert t.met_noise_target is True
    assert "met" in t.note
    assert sum(t.samples_us) / 1e6 < 1.0  # stopped near 0.1 s, far before the 5 s timeout


def test_unreachable_noise_target_runs_to_the_timeout_and_says_so():
    t0 = time.perf_counter()
    t = measure(lambda kw: spin(200), {}, device="cpu", noise_target=1e-9, max_time_s=0.25, warmup_ms=0.0)
    wall = time.perf_counter() - t0
    assert t.met_noise_target is False
    assert "missed" in t.note
    assert 0.25 <= wall < 2.0
    assert t.noise_target == 1e-9


def test_timing_round_trips_through_the_schema():
    from tokprof.profiler.schema import from_dict, to_dict

    t = measure(lambda kw: spin(100), {}, device="cpu", max_time_s=0.15, noise_target=0.5, warmup_ms=1.0)
    assert from_dict(Timing, to_dict(t)) == t


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        measure(lambda kw: None, {}, device="cpu", mode="cupti")
    with pytest.raises(ValueError, match="min_samples"):
        measure(lambda kw: None, {}, device="cpu", min_samples=1)
    with pytest.raises(ValueError, match="inputs"):
        measure(lambda kw: None, [1, 2], device="cpu")
    with pytest.raises(ValueError, match="device"):
        measure(lambda kw: None, {}, device="tpu")


def test_a_captured_graph_is_checked_before_it_is_reused():
    gen = torch.Generator().manual_seed(11)
    inputs = {"x": torch.randn(4, generator=gen)}
    other = {"x": torch.randn(4, generator=gen)}
    g = timing.CapturedGraph(graph=None, calls_per_replay=4, copies=2, working_set_bytes=16, l2_bytes=64,
                             touched=[2, 2], distinct_input_ptrs=2, inputs=[inputs, clone_inputs(inputs)])
    timing.check_graph_for(g, inputs, rotate=True)  # the graph of these inputs, rotating: accepted
    with pytest.raises(ValueError, match="captured over other tensors"):
        timing.check_graph_for(g, other, rotate=True)
    with pytest.raises(ValueError, match="cold_l2=False"):
        timing.check_graph_for(g, inputs, rotate=False)
    with pytest.raises(ValueError, match="CapturedGraph"):
        timing.check_graph_for(object(), inputs, rotate=True)
    with pytest.raises(ValueError, match="mode='graph' only"):
        measure(lambda kw: None, inputs, device="cpu", mode="events", graph=g)


@pytest.mark.skipif(HAS_GPU, reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_says_what_works():
    with pytest.raises(RuntimeError, match="device='cpu'"):
        measure(lambda kw: None, {}, device="cuda")


# ------------------------------------------------------------------------------------------- cold L2 / rotation


def test_flush_buffer_is_twice_the_l2():
    assert flush_bytes(50 * MIB) == 100 * MIB  # H100
    assert flush_bytes(60 * MIB) == 120 * MIB  # H200
    assert timing.l2_flush_bytes("cpu") is None
    with pytest.raises(ValueError, match="l2_cache_bytes"):
        flush_bytes(0)


def test_flush_size_comes_from_the_device_properties(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(L2_cache_size=50 * MIB))
    assert timing.l2_bytes("cuda:0") == 50 * MIB
    assert timing.l2_flush_bytes("cuda:0") == 100 * MIB


@pytest.mark.parametrize("l2, ws, copies", [
    (50 * MIB, 16 * MIB, 17),  # ceil(250 / 16) + 1
    (50 * MIB, 50 * MIB, 6),
    (50 * MIB, 250 * MIB, 2),  # the working set alone is 5x L2: one extra copy
    (50 * MIB, 1000 * MIB, 2),
    (100, 7, 73),  # ceil(500 / 7) = 72
    (60 * MIB, 128 * 1024, 2401),
])
def test_rotation_copies_formula(l2, ws, copies):
    assert rotation_copies(l2, ws) == copies


def test_rotation_copies_rejects_an_empty_working_set():
    with pytest.raises(ValueError, match="working_set"):
        rotation_copies(50 * MIB, 0)


def test_working_set_counts_each_tensor_once():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=gen)  # 8192 B
    b = torch.randn(10, generator=gen, dtype=torch.float64)  # 80 B
    inputs = {"a": a, "b": b, "again": a, "nested": [a, (b,)], "eps": 1e-6}
    assert working_set_bytes(inputs) == 8192 + 80
    assert working_set_bytes({"view": a[:, :16]}) == 64 * 16 * 4  # a view counts the elements it spans


def test_clone_inputs_copies_every_tensor_and_keeps_layout():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(8, 6, generator=gen)
    inputs = {"x": base.t(), "w": torch.randn(6, generator=gen), "scale": 0.5, "pair": [torch.arange(3), None]}
    copy = clone_inputs(inputs)
    assert copy["scale"] == 0.5 and copy["pair"][1] is None
    for orig, dup in ((inputs["x"], copy["x"]), (inputs["w"], copy["w"]), (inputs["pair"][0], copy["pair"][0])):
        assert dup.data_ptr() != orig.data_ptr()
        assert dup.stride() == orig.stride() and torch.equal(dup, orig)
    assert copy["x"].stride() == (1, 6)  # a transposed input stays transposed


def test_check_rotation_accepts_distinct_evenly_used_copies():
    gen = torch.Generator().manual_seed(2)
    inputs = {"a": torch.randn(4, generator=gen), "b": torch.randn(5, generator=gen)}
    copies = [inputs] + [clone_inputs(inputs) for _ in range(3)]
    assert check_rotation(copies, [2, 2, 2, 2]) == 8  # 4 copies x 2 tensors, all at distinct addresses


def test_check_rotation_rejects_an_untouched_copy_shared_memory_and_uneven_use():
    gen = torch.Generator().manual_seed(3)
    inputs = {"a": torch.randn(4, generator=gen)}
    copies = [inputs, clone_inputs(inputs), clone_inputs(inputs)]
    with pytest.raises(RuntimeError, match="never called"):
        check_rotation(copies, [1, 0, 1])
    with pytest.raises(RuntimeError, match="unevenly"):
        check_rotation(copies, [2, 1, 1])
    with pytest.raises(RuntimeError, match="share memory"):
        check_rotation([inputs, {"a": inputs["a"]}], [1, 1])  # "copies" that reuse one input


def test_sync_waits_for_the_whole_device_not_one_stream(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append(device))
    timing.sync("cuda:1")
    timing.sync("cpu")  # nothing to wait for on the CPU
    assert seen == [torch.device("cuda", 1)]


def test_a_failed_graph_capture_gives_the_callers_stream_back(monkeypatch):
    # torch.cuda.graph switches to its capture stream on entry; when the capture breaks, its __exit__ raises from
    # capture_end before switching back. capture_graph must make the caller's stream current again itself, or every
    # later measurement of the sweep runs on the capture stream.
    caller, capture = SimpleNamespace(wait_stream=lambda s: None), SimpleNamespace(wait_stream=lambda s: None)
    state = {"current": caller}

    class BrokenCapture:
        def __init__(self, graph):
            pass

        def __enter__(self):
            state["current"] = capture

        def __exit__(self, *exc):
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(L2_cache_size=4096))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: SimpleNamespace(wait_stream=lambda s: None))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: state.update(current=s))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", BrokenCapture)
    monkeypatch.setattr(graphs, "_events_time_us", lambda device, fn, repeats: 1.0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 1 << 31))
    inputs = {"x": torch.ones(256)}  # 1 KiB: ceil(5 * 4 KiB / 1 KiB) + 1 = 21 copies
    with pytest.raises(RuntimeError, match="CUDA graph capture of the call failed"):
        timing.capture_graph(lambda kw: kw["x"] * 2, inputs, device="cuda:0")
    assert state["current"] is caller


# ------------------------------------------------------------------------------------------------------- NVML


def test_tokprof_never_changes_clocks_or_limits():
    # docs/measurement.md rule 6: measure the card as found. No NVML setter or reset appears in the profiler.
    from pathlib import Path

    import tokprof.profiler

    root = Path(tokprof.profiler.__file__).parent
    for name in ("nvml.py", "timing.py", "energy.py"):
        text = (root / name).read_text()
        for forbidden in ("nvmlDeviceSet", "nvmlDeviceReset", "nvmlDeviceClear"):
            assert forbidden not in text, f"{name} calls {forbidden}"


@pytest.fixture
def fresh_nvml():
    nvml.reset()
    yield
    nvml.reset()


@pytest.mark.skipif(HAS_GPU, reason="checks the message on a machine without the NVIDIA driver")
def test_nvml_status_says_the_library_is_missing(fresh_nvml):
    reason = nvml.nvml_status()
    assert reason is not None and "NVML library" in reason and "driver" in reason
    assert nvml.clocks("cuda:0") is None and nvml.max_sm_clock_mhz("cuda:0") is None
    assert nvml.handle("cuda:0") is None and nvml.device_uuid(0) is None


def test_nvml_status_without_the_package(monkeypatch, fresh_nvml):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    reason = nvml.nvml_status()
    assert reason is not None and "nvidia-ml-py" in reason
    assert nvml.clocks("cuda:0") is None


def test_cpu_device_has_no_clocks():
    assert nvml.clocks("cpu") is None
    assert nvml.handle("cpu") is None


@pytest.mark.parametrize("sm, expect", [(1400, True), (1485, False), (1980, False)])
def test_throttled_below_75_percent_of_max(sm, expect):
    snap = Clocks(sm_mhz=sm, sm_max_mhz=1980)  # 75% of 1980 MHz = 1485 MHz
    assert nvml.is_throttled(snap, Clocks(sm_mhz=1980, sm_max_mhz=1980)) is expect
    assert nvml.is_throttled(Clocks(sm_mhz=1980, sm_max_mhz=1980), snap) is expect


def test_throttled_unknown_without_clocks():
    assert nvml.is_throttled(None, None) is None
    assert nvml.is_throttled(Clocks(), Clocks(sm_mhz=1000)) is None
    assert nvml.is_throttled(None, Clocks(sm_mhz=1000, sm_max_mhz=1980)) is True


@pytest.mark.parametrize("env, expect", [
    ("0,2", ["0", "2"]),
    ("GPU-8ff8d0c7-8d30-8e55-0980-ac69fc03a6b8,1", ["GPU-8ff8d0c7-8d30-8e55-0980-ac69fc03a6b8", "1"]),
    ("", []),
    ("1,bogus,2", ["1"]),  # CUDA ignores everything from the first invalid entry on
])
def test_visible_devices_parsing(env, expect):
    assert nvml.visible_devices(env) == expect


def test_nvml_finds_the_board_by_uuid_and_reads_watts(monkeypatch, fresh_nvml):
    # A fake pynvml: torch's cuda:0 is NVML's board "GPU-<uuid>" whatever the NVML index; NVML reports mW.
    class NVMLError(Exception):
        pass

    uuid = "8ff8d0c7-8d30-8e55-0980-ac69fc03a6b8"

    def by_uuid(text):
        if text != f"GPU-{uuid}":
            raise NVMLError("not found")
        return "board"

    fake = SimpleNamespace(
        NVMLError=NVMLError, NVMLError_LibraryNotFound=type("NotFound", (NVMLError,), {}), nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByUUID=by_uuid,
        nvmlDeviceGetHandleByIndex=lambda i: f"index {i}", NVML_CLOCK_SM=0, NVML_CLOCK_MEM=2, NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetClockInfo=lambda h, clock: {0: 1755, 2: 2619}[clock], nvmlDeviceGetMaxClockInfo=lambda h, c: 1980,
        nvmlDeviceGetTemperature=lambda h, sensor: 41, nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetPowerUsage=lambda h: 123_456)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=uuid))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert nvml.handle("cuda:0") == "board"
    assert nvml.clocks("cuda:0") == Clocks(sm_mhz=1755, mem_mhz=2619, sm_max_mhz=1980, temperature_c=41,
                                           power_limit_w=700.0, power_w=123.456)


def test_visible_devices_unset(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert nvml.visible_devices() is None


# -------------------------------------------------------------------------------------------------------- GPU


def _copy_inputs(n_bytes: int, seed: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n_bytes // 4, device="cuda", generator=gen)
    return {"x": x, "out": torch.empty_like(x)}


def _copy(kw: dict) -> None:
    kw["out"].copy_(kw["x"])


@pytest.mark.gpu
def test_events_time_a_large_copy_below_the_bandwidth_limit():
    inputs = _copy_inputs(256 * MIB, seed=0)
    t = measure(_copy, inputs, device="cuda", mode="events", max_time_s=2.0)
    assert (t.mode, t.timer, t.cold_l2) == ("events", "cuda_events", True)
    assert len(t.samples_us) >= 10 and "L2 flushed" in t.note
    tbps = 2 * 256 * MIB / (t.median_us * 1e-6) / 1e12  # read + written
    assert 0.3 < tbps < 8.0, tbps  # under any HBM of today (B200 8 TB/s)
    if nvml.nvml_status() is None:
        assert t.clocks_before is not None and t.clocks_before.sm_max_mhz
        assert t.throttled is not None


@pytest.mark.gpu
def test_graph_mode_rotates_copies_and_agrees_with_events_on_a_large_kernel():
    inputs = _copy_inputs(64 * MIB, seed=1)
    l2 = timing.l2_bytes("cuda")
    captured = timing.capture_graph(_copy, inputs, device="cuda", rotate=True)
    assert captured.copies == rotation_copies(l2, 128 * MIB)
    assert captured.distinct_input_ptrs == 2 * captured.copies  # every copy its own x and out
    assert len(set(captured.touched)) == 1 and captured.touched[0] >= 1
    g = measure(_copy, inputs, device="cuda", mode="graph", max_time_s=2.0)
    e = measure(_copy, inputs, device="cuda", mode="events", max_time_s=2.0)
    assert g.timer == "cuda_graph" and g.calls_per_sample % captured.copies == 0
    assert g.median_us == pytest.approx(e.median_us, rel=0.25)


@pytest.mark.gpu
def test_graph_mode_cold_is_not_faster_than_warm_on_an_l2_sized_input():
    inputs = _copy_inputs(4 * MIB, seed=2)  # fits in L2: warm replays would hit the cache
    cold = measure(_copy, inputs, device="cuda", mode="graph", cold_l2=True, max_time_s=1.0)
    warm = measure(_copy, inputs, device="cuda", mode="graph", cold_l2=False, max_time_s=1.0)
    assert cold.median_us >= 0.95 * warm.median_us
    assert "rotating input copies" in cold.note


@pytest.mark.gpu
def test_short_kernel_note_in_events_mode():
    inputs = _copy_inputs(64 * 1024, seed=3)
    t = measure(_copy, inputs, device="cuda", mode="events", max_time_s=1.0)
    if t.median_us < timing.SHORT_KERNEL_US:
        assert "launch jitter" in t.note


# ------------------------------------------------------------------------------ first GPU contact: rotation, host


def test_rotation_is_sized_by_bytes_touched_and_capped():
    l2 = 60 << 20  # an H200's 60 MiB
    # RMSNorm of one 4096-wide bf16 row touches 16 KiB: uncapped that is ~19k copies, each a launch in the capture
    assert timing.rotation_copies(l2, 16 << 10) == 19201
    assert timing.rotation_copies(l2, 16 << 10, max_copies=256) == 256
    assert not timing.rotation_spans_l2(l2, 16 << 10, 256)
    assert timing.rotation_spans_l2(l2, 16 << 20, timing.rotation_copies(l2, 16 << 20))
    # a decode call whose KV cache is allocated for 4 GiB but reads 64 MiB: the rotation follows the 64 MiB
    assert timing.graph_copies(l2, 4 << 30, 64 << 20, free_bytes=100 << 30) == 6
    # free memory caps it: a quarter of 20 GiB holds one 4 GiB working set only
    assert timing.graph_copies(l2, 4 << 30, 64 << 20, free_bytes=20 << 30) == 1
    with pytest.raises(ValueError, match="max_copies"):
        timing.rotation_copies(l2, 1024, max_copies=0)


def test_host_time_and_sleep_cycles():
    inputs = {"x": torch.randn(64)}
    host_us = timing.host_time_us(lambda kw: kw["x"] * 2, inputs, torch.device("cpu"))
    assert 0 < host_us < 1e5
    assert timing.sleep_cycles(50.0, 1980) == 99000  # 50 us at 1980 MHz
    assert timing.sleep_cycles(50.0, None) == 100000  # unknown clock: 2 GHz, a slower card only sleeps longer


def test_measure_refuses_an_unknown_flush():
    with pytest.raises(ValueError, match="flush"):
        timing.measure(lambda kw: None, {"x": torch.ones(4)}, device="cpu", flush="zero")


def test_kernel_time_is_the_graph_time_where_one_was_taken():
    from tokprof.profiler.schema import KernelMeasurement, Roofline, Timing

    def t(median, mode):
        return Timing(samples_us=[median], timer="x", mode=mode, cold_l2=True, median_us=median, p10_us=median,
                      p90_us=median, mean_us=median, noise=0.0, n_outliers=0, noise_target=0.005,
                      met_noise_target=True)

    roof = Roofline(flops=0, min_bytes=1, time_us=9.0, achieved_tflops=0.0, achieved_gbps=0.0,
                    intensity_flop_per_byte=0.0, bound=None)
    m = KernelMeasurement(op="rms_norm", shape={"T": 1}, dtype="bf16", backend="triton", device="GPU",
                          timing=t(9.0, "events"), roofline=roof)
    assert m.time_us == 9.0
    m.graph_timing = t(3.5, "graph")  # events carried launch jitter: the graph replay is the better-founded time
    assert m.time_us == 3.5 and m.best_timing.mode == "graph"


def test_clock_reasons_decode_and_sampler(monkeypatch):
    assert nvml.decode_clock_reasons(0x1 | 0x4) == ["gpu_idle", "sw_power_cap"]
    assert nvml.decode_clock_reasons(0x10000) == ["0x10000"]
    snaps = iter([Clocks(sm_mhz=1980, sm_max_mhz=1980), Clocks(sm_mhz=1900, sm_max_mhz=1980)])
    reasons = iter([[], ["sw_power_cap"]])
    monkeypatch.setattr(nvml, "clocks", lambda device: next(snaps))
    monkeypatch.setattr(nvml, "clock_reasons", lambda device: next(reasons))
    sampler = nvml.ClockSampler("cuda:0")
    sampler.sample(force=True)
    assert sampler.throttled() is False
    sampler.sample(force=True)
    # the clock stayed above 75% of its max, but the card reported a power-cap slowdown inside the window
    assert sampler.throttled() is True and sampler.sm_mhz_min == 1900
    assert nvml.ClockSampler("cuda:0").throttled() is None  # never sampled: unknown


def test_passes_merge_with_their_weights():
    from tokprof.profiler.stats import MAX_STORED_SAMPLES

    a, b = _fixed(10.0, 600), _fixed(20.0, 600)
    even = timing.merge_timings([a, b])
    assert even.n_samples == 1200 and len(even.samples_us) <= MAX_STORED_SAMPLES + 2
    assert sum(s == 10.0 for s in even.samples_us) == sum(s == 20.0 for s in even.samples_us)
    assert even.note.startswith("2 passes spread over the sweep")
    weighted = timing.merge_timings([even, _fixed(30.0, 600)], [2, 1])  # the first part holds two passes
    counts = {v: sum(s == v for s in weighted.samples_us) for v in (10.0, 20.0, 30.0)}
    assert max(counts.values()) - min(counts.values()) <= 2  # a third each
    assert weighted.note.startswith("3 passes") and weighted.median_us == 20.0
    with pytest.raises(ValueError, match="weights: expected one positive int per part"):
        timing.merge_timings([a, b], [1])
    assert timing.merge_timings([a]) is a


def _fixed(value: float, n: int):
    from tokprof.profiler.schema import Timing

    return Timing(samples_us=[value] * min(n, 256), n_samples=n, timer="perf_counter", mode="cpu", cold_l2=False,
                  median_us=value, p10_us=value, p90_us=value, mean_us=value, noise=0.0, n_outliers=0,
                  noise_target=0.005, met_noise_target=True, note="one pass")
