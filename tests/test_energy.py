"""The energy meter driven by a replayed NVML counter trace on a controllable clock (docs/measurement.md energy 1-5).

tests/data/nvml_energy_trace_h100.json is synthetic, written from the documented behaviour of an H100 (its metadata
says so): 0-3 s idle at ~70 W, 3-6 s busy at ~600 W, 6-9 s settling; the counter steps every 20-100 ms; the power
column is a 1 s trailing average. The live NVML paths run under the `gpu` marker.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tokprof.profiler import energy
from tokprof.profiler.energy import (
    EnergyMeter,
    EnergyWarning,
    ManualClock,
    Reading,
    ReplaySource,
    load_trace,
    measure_idle_power,
    measure_kernel_energy,
    record_trace,
    save_trace,
    trapezoid_j,
)
from tokprof.profiler.schema import Energy, KernelEnergy

TRACE = Path(__file__).parent / "data" / "nvml_energy_trace_h100.json"


def replay_meter(start_s: float, **kwargs) -> tuple[EnergyMeter, ManualClock]:
    clock = ManualClock(start_s)
    return EnergyMeter(ReplaySource.from_file(TRACE, clock=clock), **kwargs), clock


def row_at(readings: list[Reading], t: float) -> Reading:
    return [r for r in readings if r.timestamp_s <= t][-1]


# -------------------------------------------------------------------------------------------------- the trace


def test_trace_says_it_is_synthetic_and_steps_like_nvml():
    readings, meta = load_trace(TRACE)
    assert meta["synthetic"] is True
    assert "synthetic-from-documented-behaviour" in meta["provenance"] and "NOT recorded" in meta["provenance"]
    steps = [b.timestamp_s - a.timestamp_s for a, b in zip(readings, readings[1:], strict=False)]
    assert min(steps) >= 0.0199 and max(steps) <= 0.1001
    assert all(b.energy_mj > a.energy_mj for a, b in zip(readings, readings[1:], strict=False))


def test_replay_returns_the_last_update_like_nvml():
    readings, _ = load_trace(TRACE)
    clock = ManualClock(0.07)
    source = ReplaySource(readings, clock=clock)
    r = source.read()
    assert r.timestamp_s == 0.07 and r.energy_mj == row_at(readings, 0.07).energy_mj  # the 0.065 s update
    clock.advance(0.05)  # 0.12 s: no update since 0.065 s (a 100 ms step)
    assert source.read().energy_mj == r.energy_mj
    clock.set(-1.0)
    with pytest.raises(RuntimeError, match="before the trace"):
        source.read()
    clock.set(100.0)
    with pytest.raises(RuntimeError, match="past the trace"):
        source.read()


def test_bad_traces_are_rejected(tmp_path):
    good = json.loads(TRACE.read_text())
    bad = dict(good, readings=[[0.0, 10, 70000, 30], [0.1, 5, 70000, 30]])  # the counter went down
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="must not decrease"):
        load_trace(path)
    path.write_text(json.dumps(dict(good, format="something-else")))
    with pytest.raises(ValueError, match="format"):
        load_trace(path)
    path.write_text(json.dumps(dict(good, readings=[[0.0, 1, 2]])))
    with pytest.raises(ValueError, match=r"readings\[0\]"):
        load_trace(path)


def test_record_and_save_trace_round_trip(tmp_path):
    readings, meta = load_trace(TRACE)
    source = ReplaySource(readings, clock=ManualClock(0.0))
    recorded = record_trace(source, 1.0, poll_s=0.001)
    updates = [r for r in readings if r.timestamp_s <= recorded[-1].timestamp_s]
    assert [r.energy_mj for r in recorded] == [r.energy_mj for r in updates]  # every update seen, none invented
    flat = ReplaySource([Reading(t / 10, energy_mj=5.0) for t in range(20)], clock=ManualClock(0.0))
    assert record_trace(flat, 1.0, poll_s=0.01) == [Reading(0.0, energy_mj=5.0)]  # no update: nothing invented
    path = save_trace(recorded, tmp_path / "t.json", {"synthetic": True})
    again, meta_again = load_trace(path)
    assert again == recorded and meta_again == {"synthetic": True}


# ---------------------------------------------------------------------------------------------------- windows


def test_idle_window_energy_and_alignment_to_counter_updates():
    meter, clock = replay_meter(0.5)
    readings = meter.source.readings
    power_w = measure_idle_power(meter, seconds=1.0)
    w = meter.last_window
    assert isinstance(w.energy, Energy) and w.energy.method == "counter"
    # Both ends sit on counter updates (within one 2 ms poll), so the energy is exactly the counter difference.
    begin_row, end_row = row_at(readings, w.begin.timestamp_s), row_at(readings, w.end.timestamp_s)
    assert w.begin.timestamp_s - begin_row.timestamp_s < 0.0021
    assert w.end.timestamp_s - end_row.timestamp_s < 0.0021
    assert w.energy.energy_j == pytest.approx((end_row.energy_mj - begin_row.energy_mj) / 1000.0)
    assert w.energy.time_s >= 1.0
    assert power_w == pytest.approx(70.0, rel=0.01) and meter.idle_power_w == power_w
    assert w.begin.temperature_c == 34


def test_idle_power_waits_for_the_gpu_to_settle_first():
    meter, _ = replay_meter(0.5)
    readings = meter.source.readings
    power_w = measure_idle_power(meter, seconds=1.0, settle_s=0.4)
    w = meter.last_window
    first_update_after_settle = next(r.timestamp_s for r in readings if r.timestamp_s > 0.9)
    assert w.begin.timestamp_s >= first_update_after_settle and w.energy.time_s >= 1.0
    assert power_w == pytest.approx(70.0, rel=0.01)
    with pytest.raises(ValueError, match="settle_s"):
        measure_idle_power(meter, seconds=1.0, settle_s=-0.1)


def test_a_failed_counter_read_is_a_clear_error(monkeypatch):
    # NvmlSource.read gives energy None when an NVML query fails mid-run (a timeout, a lost GPU): a window must say
    # so, not die with a TypeError from None - float.
    meter, clock = replay_meter(0.5, align_to_updates=False)
    meter.begin_window("w")
    clock.advance(0.5)
    monkeypatch.setattr(meter.source, "read", lambda: Reading(clock(), None, None, 40))
    with pytest.raises(RuntimeError, match="energy counter could not be read at its end"):
        meter.end_window("w")


def test_a_failure_inside_an_e2e_energy_window_leaves_the_meter_usable(monkeypatch):
    from tokprof.models import e2e

    monkeypatch.setattr(energy, "energy_status", lambda device: None)  # as on a GPU with NVML
    meter, clock = replay_meter(3.2)  # the trace's busy phase: ~600 W
    steps = {"n": 0, "fail_at": 5}

    def step() -> None:  # 10 ms of decode on the replay clock
        steps["n"] += 1
        clock.advance(0.01)
        if steps["n"] == steps["fail_at"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    session = e2e.DecodeSession(step=step, rewind=lambda: None, ttft_ms=None)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        e2e.energy_per_token(session, 10, 1, 10_000.0, torch.device("cpu"), window_s=0.1, meter=meter)
    assert meter._open == {}  # discarded: the next point can open its window under the same name
    steps["fail_at"] = -1
    j, how = e2e.energy_per_token(session, 10, 1, 10_000.0, torch.device("cpu"), window_s=0.1, meter=meter,
                                  idle_power_w=70.0)
    # ~600 W x 10 ms per step, one token per step; the trace stays busy during the <= 100 ms wait for the counter's
    # next update, which the meter takes off at the 70 W idle: up to (600 - 70) W x 0.1 s more over the 10 tokens.
    assert 0.95 * 6.0 <= j <= 6.0 + 530 * 0.1 / 10 + 0.1, (j, how)
    assert "NVML counter" in how and "after a 0.2 s cool-down" in how


def test_idle_power_is_remembered_for_live_boards_only(monkeypatch):
    import time

    monkeypatch.setattr(energy, "_IDLE_MEASURED", {})
    meter, _ = replay_meter(0.5)
    measure_idle_power(meter, seconds=1.0)
    assert energy._IDLE_MEASURED == {}  # a replayed trace is not this machine's idle power
    assert energy.recent_idle_power("cpu") is None
    energy._IDLE_MEASURED["cpu"] = (71.5, time.monotonic() - 10.0)  # as measure_idle_power records a live board
    assert energy.recent_idle_power("cpu") == 71.5
    assert energy.recent_idle_power("cpu", max_age_s=5.0) is None  # too old: measure again


def test_kernel_energy_refuses_a_graph_of_other_inputs():
    from tokprof.profiler.timing import CapturedGraph

    meter, _ = replay_meter(0.5)
    gen = torch.Generator().manual_seed(3)
    mine, theirs = {"x": torch.randn(8, generator=gen)}, {"x": torch.randn(8, generator=gen)}
    graph = CapturedGraph(graph=None, calls_per_replay=2, copies=2, working_set_bytes=32, l2_bytes=64,
                          touched=[1, 1], distinct_input_ptrs=2, inputs=[theirs, {"x": theirs["x"].clone()}])
    with pytest.raises(ValueError, match="graph: expected a graph captured over these inputs"):
        measure_kernel_energy(lambda kw: None, mine, device="cpu", meter=meter, idle_power_w=70.0, graph=graph)


def test_busy_window_energy():
    meter, clock = replay_meter(3.5)
    meter.begin_window("busy")
    clock.advance(1.0)
    e = meter.end_window("busy")
    assert e.method == "counter"
    assert e.avg_power_w == pytest.approx(600.0, rel=0.01)
    assert e.energy_j == pytest.approx(e.avg_power_w * e.time_s)


def test_unaligned_window_reads_stale_counter_values():
    # Without alignment each end reads the last update. Here the window opens 1 ms after the 0.165 s update and
    # closes 99 ms after the 1.165 s one: 1.098 s of time but only 1.0 s of energy, ~9% low. Alignment fixes it.
    meter, clock = replay_meter(0.166, align_to_updates=False)
    readings = meter.source.readings
    meter.begin_window("idle")
    clock.advance(1.098)
    stale = meter.end_window("idle")
    assert stale.time_s == pytest.approx(1.098)
    assert stale.energy_j == pytest.approx((row_at(readings, 1.264).energy_mj - row_at(readings, 0.166).energy_mj)
                                           / 1000.0)
    assert stale.avg_power_w == pytest.approx(70.0 * 1.0 / 1.098, rel=0.01)
    aligned, clock = replay_meter(0.166)
    aligned.begin_window("idle")
    clock.advance(1.098)
    good = aligned.end_window("idle")
    assert good.avg_power_w == pytest.approx(70.0, rel=0.005)


def test_window_names_are_checked():
    meter, clock = replay_meter(1.0)
    meter.begin_window("a")
    with pytest.raises(ValueError, match="already open"):
        meter.begin_window("a")
    with pytest.raises(ValueError, match="no open energy window 'b'"):
        meter.end_window("b")


def test_zero_counter_reading_warns_and_is_not_reported_as_zero():
    meter, clock = replay_meter(0.07, align_to_updates=False)  # inside the 100 ms step from 0.065 s to 0.165 s
    meter.begin_window("short")
    clock.advance(0.05)
    with pytest.warns(EnergyWarning, match="did not move"):
        e = meter.end_window("short")
    assert e.method == "sampled" and e.energy_j > 0
    assert e.avg_power_w == pytest.approx(70.2, rel=0.01)  # the power readings at both ends, ~70 W


def test_stuck_counter_without_power_is_an_error_not_zero():
    clock = ManualClock(0.0)
    readings = [Reading(t / 10, energy_mj=500.0) for t in range(30)]  # a counter that never moves, no power
    meter = EnergyMeter(ReplaySource(readings, clock=clock), update_timeout_s=0.2)
    meter.begin_window("w")
    clock.advance(1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="unknown"):
            meter.end_window("w")
    assert any(issubclass(c.category, EnergyWarning) for c in caught)


# ------------------------------------------------------------------------------------------ sampled fallback


def test_trapezoid_by_hand():
    assert trapezoid_j([(0.0, 0.0), (2.0, 10.0)]) == 10.0
    assert trapezoid_j([(0.0, 100.0), (1.0, 300.0), (3.0, 300.0)]) == 200.0 + 600.0
    with pytest.raises(ValueError, match="at least 2"):
        trapezoid_j([(0.0, 1.0)])


def power_only_source(clock: ManualClock) -> ReplaySource:
    # No energy column: the counter is unsupported, so the meter falls back to power samples.
    watts = [100, 100, 300, 100, 100]
    return ReplaySource([Reading(float(t), power_mw=w * 1000.0) for t, w in enumerate(watts)], clock=clock)


def test_sampled_fallback_integrates_power_with_the_trapezoid_rule():
    clock = ManualClock(1.0)
    meter = EnergyMeter(power_only_source(clock))
    assert meter.method == "sampled"
    meter.begin_window("w")
    clock.advance(2.0)
    e = meter.end_window("w")
    # points (1 s, 100 W), (2 s, 300 W), (3 s, 100 W): 1 x 200 + 1 x 200 = 400 J
    assert e == Energy(energy_j=400.0, time_s=2.0, avg_power_w=200.0, method="sampled")


def test_sampled_fallback_holds_the_last_reading_at_the_window_edges():
    clock = ManualClock(0.5)
    meter = EnergyMeter(power_only_source(clock))
    meter.begin_window("w")
    clock.advance(2.0)
    e = meter.end_window("w")
    # points (0.5, 100), (1, 100), (2, 300), (2.5, 300): 50 + 200 + 150 = 400 J
    assert e.energy_j == pytest.approx(400.0) and e.time_s == pytest.approx(2.0)


def test_sampled_and_counter_agree_in_a_steady_window():
    counter_meter, clock_a = replay_meter(4.2)
    sampled_meter, clock_b = replay_meter(4.2, method="sampled")
    for meter, clock in ((counter_meter, clock_a), (sampled_meter, clock_b)):
        meter.begin_window("w")
        clock.advance(1.2)
    a, b = counter_meter.end_window("w"), sampled_meter.end_window("w")
    assert (a.method, b.method) == ("counter", "sampled")
    assert b.avg_power_w == pytest.approx(a.avg_power_w, rel=0.02)


def test_counter_method_needs_a_counter():
    with pytest.raises(RuntimeError, match="no energy counter"):
        EnergyMeter(power_only_source(ManualClock(0.0)), method="counter")


# ------------------------------------------------------------------------------------------- kernel energy


def test_kernel_energy_per_call_with_idle_subtraction():
    meter, clock = replay_meter(0.5)
    readings = meter.source.readings
    idle_w = measure_idle_power(meter, seconds=1.0)
    clock.set(2.85)
    calls = []

    def kernel(kw):  # 1 ms of work on the replay clock
        calls.append(clock())
        clock.advance(kw["cost_s"])

    # The trace is busy (600 W) from 3 s to 6 s. The window opens on the first counter update after the compile
    # call and the 0.2 s cool-down; run until 6 s, so that, as on a real board after the closing sync, the GPU is
    # no longer busy while the meter waits for the counter's next update.
    opens_at = next(r.timestamp_s for r in readings if r.timestamp_s > 2.85 + 0.001 + 0.2)
    ke = measure_kernel_energy(kernel, {"cost_s": 0.001}, device="cpu", meter=meter, idle_power_w=idle_w,
                               window_s=6.0 - opens_at, cooldown_s=0.2)
    assert isinstance(ke, KernelEnergy) and ke.method == "counter"
    assert ke.calls == len(calls) - 1  # every call but the first (compile) is in the window
    assert ke.calls == pytest.approx(ke.window_s / 0.001, abs=1) and ke.window_s >= 6.0 - opens_at
    assert ke.total_j_per_call == pytest.approx(0.600, rel=0.005)  # 600 W x 1 ms
    assert ke.dynamic_j_per_call == pytest.approx(0.600 - idle_w * 0.001, rel=0.005)  # minus ~70 W x 1 ms
    assert ke.idle_power_w == idle_w
    w = meter.last_window
    assert w.begin.timestamp_s >= calls[0] + 0.001 + 0.2  # the cool-down came first
    assert ke.temperature_c_start == row_at(readings, w.begin.timestamp_s).temperature_c == 35
    assert ke.temperature_c_end == row_at(readings, w.end.timestamp_s).temperature_c == 49


def test_kernel_energy_rejects_bad_settings():
    meter, _ = replay_meter(0.5)
    with pytest.raises(ValueError, match="window_s"):
        measure_kernel_energy(lambda kw: None, {}, device="cpu", meter=meter, idle_power_w=70.0, window_s=0)
    with pytest.raises(ValueError, match="idle_power_w"):
        measure_kernel_energy(lambda kw: None, {}, device="cpu", meter=meter, idle_power_w=-1.0)


# ------------------------------------------------------------------------------------------------ availability


def test_energy_status_on_cpu_is_a_reason():
    reason = energy.energy_status("cpu")
    assert reason is not None and reason.startswith("no energy counter on a cpu") and "never estimated" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_no_gpu_means_no_meter_and_a_reason():
    reason = energy.energy_status("cuda:0")
    assert reason is not None and "CUDA is not available" in reason
    with pytest.raises(RuntimeError, match="no NVML energy source"):
        energy.make_meter("cuda:0")
    with pytest.raises(RuntimeError, match="no NVML energy source"):
        EnergyMeter("cpu")


def test_factory_builds_a_replay_meter():
    meter = energy.make_meter("cpu", trace=TRACE, clock=ManualClock(1.0))
    assert meter.source.kind == "replay" and meter.method == "counter"
    with pytest.raises(ValueError, match="kind"):
        energy.make_source("rapl")


# -------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_nvml_counter_on_a_real_gpu():
    if energy.energy_status("cuda") is not None:
        pytest.skip(f"no NVML energy here: {energy.energy_status('cuda')}")
    meter = energy.make_meter("cuda")
    idle_w = measure_idle_power(meter, seconds=0.5)
    assert 10.0 < idle_w < 1500.0
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    ke = measure_kernel_energy(lambda kw: kw["a"] @ kw["b"], {"a": a, "b": b}, device="cuda", meter=meter,
                               idle_power_w=idle_w, window_s=0.5, cooldown_s=0.2)
    assert ke.calls > 10 and ke.window_s >= 0.5
    assert ke.total_j_per_call > ke.dynamic_j_per_call > 0
    assert ke.temperature_c_start is not None and ke.temperature_c_end is not None
    if meter.method == "counter":
        assert ke.method == "counter"


@pytest.mark.gpu
def test_nvml_power_sampling_thread_on_a_real_gpu():
    if energy.energy_status("cuda") is not None:
        pytest.skip(f"no NVML energy here: {energy.energy_status('cuda')}")
    meter = energy.make_meter("cuda", method="sampled", sample_period_s=0.01)
    meter.begin_window("idle")
    meter.source.sleep(0.3)
    e = meter.end_window("idle")
    assert e.method == "sampled" and 10.0 < e.avg_power_w < 1500.0
    assert len(meter.source.samples_between(meter.last_window.begin.timestamp_s,
                                            meter.last_window.end.timestamp_s)) >= 10


def test_trace_summary_reads_the_counter_interval_and_phase_powers():
    from tokprof.profiler.energy_sources import trace_summary

    readings = [Reading(t / 100.0, energy_mj=70.0 * 1000 * (t // 10) / 10, power_mw=70_000.0, temperature_c=34)
                for t in range(100)]  # 70 W idle; the counter moves every 0.1 s
    summary = trace_summary(readings)
    assert summary["counter_update_s"] == pytest.approx(0.1)
    phase = summary["phases"]["all"]
    assert phase["counter_w"] == pytest.approx(70.0, rel=0.15) and phase["sampled_w"] == pytest.approx(70.0)
    readings_h100, meta = load_trace(TRACE)
    named = trace_summary(readings_h100, {"idle": (0.0, 2.5), "busy": (3.2, 5.8)})
    assert named["phases"]["busy"]["counter_w"] > 5 * named["phases"]["idle"]["counter_w"]
