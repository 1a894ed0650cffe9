"""The simulator on hand-computed traces (a linear step-time model, no overhead), the gap split of L5 on the same
trace, the modelled GPU step time against the roll-up's modelled decode step, and the SLO-rate bisection."""

from __future__ import annotations

import pytest

from tokprof.models import ModelConfig
from tokprof.serving import loadgen
from tokprof.serving.metrics import Slo
from tokprof.serving.scheduler import SchedulerConfig
from tokprof.serving.served import gap_split, max_rate_meeting_slo
from tokprof.serving.simulator import Overhead, simulate
from tokprof.serving.step_time import MeasuredStepTable, ModelledStepTime, StepShape, interp
from tokprof.serving.traffic import Session, Turn, Workload

SLO = Slo(ttft_s=1.0, tpot_s=1.0)
ZERO = Overhead(stated_s=0.0)


class Linear:
    """10 ms per step + 1 ms per token row."""

    provenance = "modelled"

    def step_time_s(self, shape: StepShape) -> float:
        return 0.010 + 0.001 * (shape.num_decode + shape.num_prefill_tokens)

    def describe(self) -> str:
        return "10 ms + 1 ms per token"


def cfg(budget: int = 8) -> SchedulerConfig:
    return SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=budget)


def test_one_request_by_hand():
    wl = Workload([Session(1.0, [Turn([1, 2, 3, 4], 3)])])
    run = simulate(wl, cfg(), Linear(), SLO, overhead=ZERO)
    (r,) = run.requests
    # prefill 4 tokens 14 ms -> first token at 1.014; two decode steps of 11 ms each
    assert r.token_times_s == pytest.approx([1.014, 1.025, 1.036])
    s = run.summary
    assert s.ttft_s["p50"] == pytest.approx(0.014) and s.median_tpot_s == pytest.approx(0.011)
    assert s.e2e_s["p50"] == pytest.approx(0.036) and s.output_tokens_per_s_per_gpu == pytest.approx(3 / 0.036)
    assert s.provenance == "predicted" and s.idle_s == pytest.approx(0.0, abs=1e-12)


def test_join_mid_flight_and_chunked_prefill_by_hand():
    wl = Workload([Session(0.0, [Turn([1, 2, 3, 4], 2)]), Session(0.005, [Turn([5, 6, 7, 8], 2)]),
                   Session(0.1, [Turn(list(range(10)), 1)])])
    run = simulate(wl, cfg(budget=5), Linear(), SLO, overhead=ZERO)
    a, b, c = sorted(run.requests, key=lambda r: r.request_id)
    # step 1 [0, .014]: prefill A. step 2 [.014, .029]: decode A + prefill B (4 tokens), B joined mid-flight.
    # step 3 [.029, .040]: decode B. idle until 0.1. C's 10-token prompt in chunks of 5: 15 ms + 15 ms.
    assert a.token_times_s == pytest.approx([0.014, 0.029])
    assert b.token_times_s == pytest.approx([0.029, 0.040]) and b.first_token_s - b.arrival_s == pytest.approx(0.024)
    assert c.token_times_s == pytest.approx([0.130])
    assert [(s.num_decode, s.num_prefill_tokens) for s in run.steps] == [(0, 4), (1, 4), (1, 0), (0, 5), (0, 5)]
    assert run.summary.idle_s == pytest.approx(0.1 - 0.040)


def test_gap_split_by_hand():
    wl = Workload([Session(0.0, [Turn([1, 2, 3, 4], 2)]), Session(0.005, [Turn([5, 6, 7, 8], 2)])])
    run = simulate(wl, cfg(), Linear(), SLO, overhead=ZERO)
    # L4: a full batch of 2 decodes in 12 ms. Ideal for 4 tokens: 24 ms; served in 40 ms: 16 ms gap.
    # batching: (11 - 6) + (11 - 6) = 10 ms; prefill: 14 + (15 - 11) = 18 ms less 2 first tokens x 6 ms = 6 ms.
    causes = {c.name: c for c in gap_split(run, Linear(), 0.012, 2, 2 / 0.012)}
    assert causes["batching below capacity"].seconds == pytest.approx(0.010)
    assert causes["prefill interference"].seconds == pytest.approx(0.006)
    assert causes["idle between arrivals"].seconds == pytest.approx(0.0, abs=1e-12)
    assert causes["preemption"].seconds == 0.0 and causes["other"].seconds == pytest.approx(0.0, abs=1e-12)
    assert sum(c.share for c in causes.values()) == pytest.approx(1.0)
    gap_tps = 2 / 0.012 - run.summary.output_tokens_per_s_per_gpu
    assert sum(c.tokens_per_s for c in causes.values()) == pytest.approx(gap_tps)


def test_preemption_counted_as_recompute():
    # 3 blocks of 4 tokens: two requests of 4 + 4 tokens cannot both grow; the later one is recomputed
    c = SchedulerConfig(num_blocks=3, block_size=4, max_num_seqs=2, max_num_batched_tokens=16)
    wl = Workload([Session(0.0, [Turn([1, 2, 3, 4], 4)]), Session(0.0, [Turn([5, 6, 7, 8], 4)])])
    run = simulate(wl, c, Linear(), SLO, overhead=ZERO)
    assert run.summary.preemptions >= 1 and sum(s.recompute_tokens for s in run.steps) > 0
    causes = {x.name: x for x in gap_split(run, Linear(), 0.012, 2)}
    assert causes["preemption"].seconds > 0


def test_table_interpolation():
    t = MeasuredStepTable([1, 4], [16, 64], [[0.010, 0.012], [0.016, 0.020]], [16, 64], [0.020, 0.050], "cpu", 3)
    assert t.decode_time_s(1, 16) == pytest.approx(0.010)
    assert t.decode_time_s(2.5, 40) == pytest.approx((0.011 + 0.018) / 2)  # bilinear
    assert t.prefill_time_s(40) == pytest.approx(0.035)
    # mixed: decode + prefill - the fixed cost (decode of 1 row at the smallest context)
    assert t.step_time_s(StepShape(4, 64, 16, 1, 0)) == pytest.approx(0.020 + 0.020 - 0.010)
    assert interp([1, 2], [1.0, 2.0], 4) == pytest.approx(4.0)  # extrapolated from the last two points


def test_table_mixed_steps_from_their_own_measurements():
    """With mixed steps measured (batches 1 and 4 at context 16, with chunks of 16 and 64 tokens), a chunk adds
    mixed - decode at the measured batch, interpolated over batch and chunk size, to a decode step of any shape."""
    t = MeasuredStepTable([1, 4], [16, 64], [[0.010, 0.012], [0.016, 0.020]], [16, 64], [0.020, 0.050], "cpu", 3,
                          mixed_batches=[1, 4], mixed_context=16, mixed_s=[[0.024, 0.055], [0.032, 0.062]])
    # added by a chunk: batch 1: 14 / 45 ms; batch 4: 16 / 46 ms (minus decode(1, 16) = 10, decode(4, 16) = 16)
    assert t.chunk_added_s(1, 16) == pytest.approx(0.014) and t.chunk_added_s(4, 64) == pytest.approx(0.046)
    assert t.chunk_added_s(2.5, 40) == pytest.approx(((0.014 + 0.045) / 2 + (0.016 + 0.046) / 2) / 2)
    assert t.step_time_s(StepShape(4, 64, 16, 1, 0)) == pytest.approx(0.020 + 0.016)
    assert t.step_time_s(StepShape(0, 0, 40, 1, 0)) == pytest.approx(0.035)  # a chunk alone: the prefill row
    assert "mixed steps of batch [1, 4]" in t.describe()
    assert MeasuredStepTable.from_dict(t.to_dict()) == t


def test_speed_trace_windows_and_never_extrapolates():
    from tokprof.serving.probe import SpeedTrace

    trace = SpeedTrace([0.0, 0.1, 0.2, 1.0, 1.1], [1.0, 1.2, 1.4, 0.8, 0.9], window_s=0.15)
    assert trace(0.1) == pytest.approx((1.0 + 1.2 + 1.4) / 3)  # all three within 0.15 s
    assert trace(0.0) == pytest.approx(1.1) and trace(1.05) == pytest.approx(0.85)
    assert trace(0.6) == pytest.approx(1.4)  # no sample within the window: the nearest (0.2 is 0.4 away, 1.0 is 0.4)
    assert trace(0.65) == pytest.approx(0.8)
    assert trace(-5.0) == pytest.approx(1.0) and trace(50.0) == pytest.approx(0.9)  # held, never extrapolated
    summary = trace.summary()
    assert summary["samples"] == 5 and summary["min"] <= summary["p50"] <= summary["max"]
    with pytest.raises(ValueError, match="times_s, ratios"):
        SpeedTrace([0.0], [])
    with pytest.raises(ValueError, match="window_s"):
        SpeedTrace([0.0], [1.0], window_s=0.0)


def test_a_speed_scales_each_step_at_its_start_by_hand():
    """The machine half as fast from 1.02 s on: the prefill step (at 1.0) takes 14 ms, the decode steps after
    1.02 take 22 ms each (11 ms x 2)."""
    wl = Workload([Session(1.0, [Turn([1, 2, 3, 4], 3)])])
    run = simulate(wl, cfg(), Linear(), SLO, overhead=ZERO, speed=lambda t: 2.0 if t >= 1.02 else 1.0)
    (r,) = run.requests
    # first decode step starts at 1.014 (< 1.02): 11 ms; the second at 1.025: 22 ms
    assert r.token_times_s == pytest.approx([1.014, 1.025, 1.047])
    assert "machine's speed" in run.summary.notes[-1]
    steady = simulate(wl, cfg(), Linear(), SLO, overhead=ZERO, speed=lambda t: 1.0)
    assert steady.requests[0].token_times_s == pytest.approx([1.014, 1.025, 1.036])


def test_a_step_after_idle_pays_the_cost_of_waking_by_hand():
    """Two requests, the second arriving at an idle server: its prefill step, 0.964 s after the last step ended,
    takes wake(0.964) = 1.5 x 14 ms; the first request's prefill (after the run's first 1.0 s idle) too; decode
    steps that follow their step back to back pay nothing."""
    from tokprof.serving.wake import WakePenalty

    wake = WakePenalty([0.001, 0.05], [1.2, 1.5])
    wl = Workload([Session(1.0, [Turn([1, 2, 3, 4], 3)]), Session(2.0, [Turn([5, 6, 7, 8], 2)])])
    run = simulate(wl, cfg(), Linear(), SLO, overhead=ZERO, wake=wake)
    a, b = sorted(run.requests, key=lambda r: r.request_id)
    assert a.token_times_s == pytest.approx([1.021, 1.032, 1.043])
    assert b.token_times_s == pytest.approx([2.021, 2.032])
    assert "waking" in run.summary.notes[-1]
    assert wake(0.0) == 1.0 and wake(0.0005) == pytest.approx(1.1) and wake(0.0255) == pytest.approx(1.35)
    assert wake(9.0) == 1.5  # held past the longest gap measured
    with pytest.raises(ValueError, match="gaps_s, factors"):
        WakePenalty([0.05, 0.001], [1.0, 1.0])
    with pytest.raises(ValueError, match="gaps_s, factors"):
        WakePenalty([0.001], [0.0])


def test_measure_wake_penalty_on_a_fake_runner():
    """A runner whose step takes 10 ms, 12 ms after any sleep of 5 ms or more, on a fake clock: factors 1.0 and
    1.2, medians of interleaved rounds, and the step before each timed one is the `before` step."""
    from types import SimpleNamespace

    from tokprof.serving.wake import measure_wake_penalty

    P, D = SimpleNamespace(num_prefill_tokens=64, num_decode=0), SimpleNamespace(num_prefill_tokens=0, num_decode=1)
    now = [0.0]
    slept = [0.0]
    order = []

    class Runner:
        def execute(self, plan):
            order.append(plan)
            now[0] += 0.012 if (plan is P and slept[0] >= 0.005) else 0.010
            slept[0] = 0.0

    def sleep(seconds):
        slept[0] = seconds
        now[0] += seconds

    wake = measure_wake_penalty(Runner(), P, D, gaps_s=[0.001, 0.005], rounds=3, clock=lambda: now[0], sleep=sleep)
    assert wake.factors == pytest.approx([1.0, 1.2]) and wake.gaps_s == [0.001, 0.005]
    assert "64-token prefill step after a 1-row decode step" in wake.how
    timed = [i for i, p in enumerate(order) if p is P][1:]  # after the first call
    assert all(order[i - 1] is D for i in timed)
    with pytest.raises(ValueError, match="gaps_s: expected increasing"):
        measure_wake_penalty(Runner(), P, D, gaps_s=[0.005, 0.001])
    with pytest.raises(ValueError, match="rounds: expected a positive int"):
        measure_wake_penalty(Runner(), P, D, rounds=0)


def test_fast_forward_follows_the_speed():
    inp, out = loadgen.LengthDist.parse("i", "uniform:3:30"), loadgen.LengthDist.parse("o", "uniform:1:40")
    wl = loadgen.poisson(30.0, 40, inp, out, vocab_size=100, seed=5)

    def speed(t: float) -> float:
        return 1.0 + 0.5 * ((t * 3) % 1.0)

    fast = simulate(wl, cfg(16), Linear(), SLO, overhead=ZERO, speed=speed)
    slow = simulate(wl, cfg(16), Linear(), SLO, overhead=ZERO, speed=speed, fast_forward=False)
    assert [t for r in fast.requests for t in r.token_times_s] == \
        pytest.approx([t for r in slow.requests for t in r.token_times_s])


def test_capacity_is_the_simulated_closed_loop_completion_rate():
    """4 clients of 8 in + 8 out, budget 64, by hand: a cycle is one prefill step of 4 x 8 tokens (10 + 32 ms) and
    7 decode steps of 4 rows (14 ms each), 140 ms for 4 requests; with 10 ms of overhead per step, 220 ms."""
    from tokprof.serving.bench import BenchOptions, capacity_per_s

    opts = BenchOptions(max_num_seqs=4, max_num_batched_tokens=64, input_len="8", output_len="8")
    c = SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    assert capacity_per_s(Linear(), opts, c, ZERO) == pytest.approx(4 / 0.140)
    assert capacity_per_s(Linear(), opts, c, Overhead(stated_s=0.010)) == pytest.approx(4 / 0.220)


def test_modelled_step_equals_rollup_modelled_decode_step():
    from tokprof.rollup.project import modelled

    config = ModelConfig.from_name("llama-3.1-8b")
    st = ModelledStepTime(config, "h100", dtype="bf16", efficiency=0.8)
    point = modelled(config, "h100", [8], [1024], "bf16", 0.8)[0]
    kernels_us = point.step_time_us - (point.overhead_time_us or 0.0)  # the roll-up adds its per-step overhead
    assert st.step_time_s(StepShape(8, 1024, 0, 0, 0)) == pytest.approx(kernels_us * 1e-6, rel=1e-9)
    # a prefill chunk adds time, and more than a decode row of the same count costs nothing like it
    assert st.step_time_s(StepShape(8, 1024, 256, 1, 0)) > st.step_time_s(StepShape(8, 1024, 0, 0, 0))


def test_slo_rate_bisection_is_monotone_and_met():
    inp, out = loadgen.LengthDist("fixed", 8), loadgen.LengthDist("fixed", 8)

    def make(rate: float):
        wl = loadgen.poisson(rate, 40, inp, out, vocab_size=100, seed=0)
        return simulate(wl, cfg(16), Linear(), Slo(ttft_s=0.2, tpot_s=0.02), overhead=ZERO)

    rate, run = max_rate_meeting_slo(make, 10.0, iterations=8)
    assert rate is not None and run.summary.slo_met
    from tokprof.serving.served import meets

    assert not meets(make(rate * 1.5), rate * 1.5)


def test_fast_forward_changes_nothing():
    inp, out = loadgen.LengthDist.parse("i", "uniform:3:30"), loadgen.LengthDist.parse("o", "uniform:1:40")
    wl = loadgen.poisson(30.0, 40, inp, out, vocab_size=100, seed=5)
    small = SchedulerConfig(num_blocks=40, block_size=4, max_num_seqs=6, max_num_batched_tokens=16)
    for c in (cfg(16), small):
        fast = simulate(wl, c, Linear(), SLO, overhead=Overhead(stated_s=0.0005))
        slow = simulate(wl, c, Linear(), SLO, overhead=Overhead(stated_s=0.0005), fast_forward=False)
        assert [t for r in fast.requests for t in r.token_times_s] == \
            pytest.approx([t for r in slow.requests for t in r.token_times_s])
        assert [r.request_id for r in fast.requests] == [r.request_id for r in slow.requests]
        assert [(s.num_decode, s.num_prefill_tokens) for s in fast.steps] == \
            [(s.num_decode, s.num_prefill_tokens) for s in slow.steps]
        assert fast.summary.preemptions == slow.summary.preemptions


def test_modelled_step_defaults_to_the_step_model_of_rollup_modelled():
    """No stated efficiency: the step model that `rollup --modelled` and `validate` use, per-step overhead and all,
    so a served prediction and a roll-up point of the same decode step agree."""
    from tokprof.rollup.project import modelled
    from tokprof.rollup.step_model import StepModel

    config = ModelConfig.from_name("llama-3.1-8b")
    st = ModelledStepTime(config, "h100", dtype="bf16")
    point = modelled(config, "h100", [8], [1024], "bf16", step_model=StepModel(execution="graph"))[0]
    assert st.step_time_s(StepShape(8, 1024, 0, 0, 0)) == pytest.approx(point.step_time_us * 1e-6, rel=1e-6)
    assert "step model" in st.describe() and "per-step overhead" in st.describe()
    stated = ModelledStepTime(config, "h100", dtype="bf16", overhead_s=0.0)  # a stated overhead replaces the model's
    assert stated.step_time_s(StepShape(8, 1024, 0, 0, 0)) < st.step_time_s(StepShape(8, 1024, 0, 0, 0))
    with pytest.raises(ValueError, match="overhead_s: expected seconds >= 0"):
        ModelledStepTime(config, "h100", overhead_s=-1.0)
