"""Statistics of timing samples: outlier removal, percentiles, noise, and the adaptive stop rule (measurement 5)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from tokprof.profiler.stats import StopRule, iqr_fences, relative_noise, remove_outliers, summarize


def quiet_stream(n: int, seed: int, center: float = 100.0, rel_sd: float = 0.001) -> list[float]:
    return (center * (1 + rel_sd * np.random.default_rng(seed).standard_normal(n))).tolist()


# --------------------------------------------------------------------------------------------- outlier removal


def test_outlier_far_above_is_removed_and_order_is_kept():
    # Q1 = 3, Q3 = 7 (linear interpolation over 9 values), IQR = 4: fences [-3, 13].
    samples = [5, 1, 100, 2, 3, 4, 6, 7, 8]
    kept, removed = remove_outliers(samples)
    assert removed == 1
    assert kept == [5, 1, 2, 3, 4, 6, 7, 8]
    assert iqr_fences([1, 2, 3, 4, 5, 6, 7, 8, 100]) == (-3.0, 13.0)


def test_value_on_the_fence_is_kept_and_just_beyond_is_removed():
    assert remove_outliers([1, 2, 3, 4, 5, 6, 7, 8, 13]) == ([1, 2, 3, 4, 5, 6, 7, 8, 13], 0)
    kept, removed = remove_outliers([1, 2, 3, 4, 5, 6, 7, 8, 13.01])
    assert removed == 1 and 13.01 not in kept


def test_outliers_on_both_sides_removed_from_a_random_stream():
    samples = quiet_stream(200, seed=3)
    samples[17] = 400.0  # a preempted sample
    samples[120] = 20.0  # a sample that lost its work (impossible time)
    kept, removed = remove_outliers(samples)
    assert removed >= 2
    assert 400.0 not in kept and 20.0 not in kept
    assert min(kept) > 99.0 and max(kept) < 101.0


def test_few_samples_are_never_trimmed():
    assert remove_outliers([1.0, 1.0, 500.0]) == ([1.0, 1.0, 500.0], 0)


def test_k_sets_the_fence_width():
    samples = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # Q1 = 3, Q3 = 7
    assert remove_outliers(samples, k=0.0) == ([3, 4, 5, 6, 7], 4)
    assert remove_outliers(samples, k=3.0) == (samples, 0)


@pytest.mark.parametrize("bad", [[1.0, float("nan"), 2.0], [1.0, float("inf")]])
def test_non_finite_samples_are_rejected(bad):
    with pytest.raises(ValueError, match="finite"):
        remove_outliers(bad)


def test_bad_k_is_rejected():
    with pytest.raises(ValueError, match="k:"):
        remove_outliers([1, 2, 3, 4], k=-1)


# ---------------------------------------------------------------------------------------------------- summary


def test_summary_percentiles_mean_and_noise_by_hand():
    s = summarize([float(v) for v in range(1, 12)], noise_target=0.005)  # 1..11, nothing is an outlier
    assert s["median_us"] == 6.0
    assert s["p10_us"] == pytest.approx(2.0)  # position 0.1 * 10 = 1 -> the second value
    assert s["p90_us"] == pytest.approx(10.0)
    assert s["mean_us"] == 6.0
    assert s["noise"] == pytest.approx(statistics.stdev(range(1, 12)) / 6.0)  # sqrt(11) / 6
    assert s["n_outliers"] == 0 and s["met_noise_target"] is False


def test_summary_interpolates_between_order_statistics():
    s = summarize([10.0, 20.0, 30.0, 40.0], noise_target=0.5)
    assert s["median_us"] == 25.0
    assert s["p10_us"] == pytest.approx(13.0)  # 10 + 0.3 * (20 - 10)
    assert s["p90_us"] == pytest.approx(37.0)


def test_summary_statistics_come_after_outlier_removal():
    samples = quiet_stream(100, seed=7)
    samples[50] = 1000.0
    raw_noise = np.std(samples, ddof=1) / np.mean(samples)
    s = summarize(samples, noise_target=0.005)
    assert raw_noise > 0.5  # the one outlier alone would miss the target by 100x
    assert s["n_outliers"] >= 1
    assert s["noise"] < 0.005 and s["met_noise_target"] is True
    assert s["mean_us"] == pytest.approx(100.0, rel=1e-3)
    assert s["p90_us"] < 101.0
    assert s["n_samples"] == 100 and s["n_kept"] == 100 - s["n_outliers"]


def test_summary_rejects_too_few_or_negative_samples_and_bad_target():
    with pytest.raises(ValueError, match="at least 2"):
        summarize([5.0])
    with pytest.raises(ValueError, match="negative"):
        summarize([5.0, -1.0, 5.0])
    with pytest.raises(ValueError, match="noise_target"):
        summarize([5.0, 5.0], noise_target=0)


def test_relative_noise_of_constant_and_zero_samples():
    assert relative_noise([3.0, 3.0, 3.0]) == 0.0
    assert relative_noise([0.0, 0.0]) == 0.0
    assert relative_noise([1.0, 3.0]) == pytest.approx(math.sqrt(2) / 2)


# ------------------------------------------------------------------------------------------------- stop rule


def run_rule(rule: StopRule, stream: list[float], dt_s: float) -> int:
    """Feed samples one at a time, each taking dt_s of (virtual) time; the count at which the rule stops."""
    for n in range(1, len(stream) + 1):
        if rule.should_stop(stream[:n], n * dt_s):
            return n
    raise AssertionError(f"the rule never stopped within {len(stream)} samples")


def test_quiet_stream_stops_as_soon_as_the_minimums_are_in():
    rule = StopRule()
    stream = quiet_stream(400, seed=11)  # 0.1% noise
    n = run_rule(rule, stream, dt_s=0.001)
    assert n == 100  # 0.1 s at 1 ms per sample; 10 samples were already in
    assert "met" in rule.reason(stream[:n], n * 0.001)
    assert summarize(stream[:n], rule.noise_target)["met_noise_target"] is True


def test_noisy_stream_runs_to_the_timeout_and_says_so():
    rule = StopRule(max_time_s=2.0)
    stream = (100 * (1 + 0.3 * np.random.default_rng(5).standard_normal(3000))).clip(1).tolist()
    n = run_rule(rule, stream, dt_s=0.001)
    assert n == 2000  # never met 0.5% noise: stopped by the 2 s timeout
    assert "missed" in rule.reason(stream[:n], n * 0.001)
    assert summarize(stream[:n], rule.noise_target)["met_noise_target"] is False


@pytest.mark.parametrize("dt_s", [0.05, 0.5, 30.0])
def test_never_stops_before_ten_samples_even_past_the_timeout(dt_s):
    rule = StopRule()
    stream = quiet_stream(50, seed=2, rel_sd=0.0001)
    assert run_rule(rule, stream, dt_s) == 10


def test_never_stops_before_the_minimum_time():
    rule = StopRule()
    stream = quiet_stream(100, seed=4, rel_sd=0.0001)
    assert run_rule(rule, stream, dt_s=0.005) == 20  # 10 samples are in at 0.05 s; 0.1 s needs 20


def test_reason_while_collecting():
    assert "continuing" in StopRule().reason([1.0] * 3, 0.01)


@pytest.mark.parametrize("kwargs, match", [
    ({"min_samples": 1}, "min_samples"),
    ({"min_time_s": -1}, "min_time_s"),
    ({"min_time_s": 2.0, "max_time_s": 1.0}, "max_time_s"),
    ({"noise_target": 1.5}, "noise_target"),
])
def test_stop_rule_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StopRule(**kwargs)
