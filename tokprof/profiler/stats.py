"""Statistics over timing samples: outlier removal, summaries and the adaptive stopping rule.

docs/measurement.md, kernel time, rule 5: statistics over every sample (a bounded sample of them is stored); report
median, p10, p90 and the relative noise (standard deviation over mean) after removing outliers outside 1.5x the
interquartile range; stop sampling once at least 10 samples and 0.1 s are in and the noise is <= 0.5%, or at a
timeout (default 5 s), and then say the target was missed.

    kept, n_removed = remove_outliers(samples_us)
    stats = summarize(samples_us, noise_target=0.005)   # median_us, p10_us, p90_us, mean_us, noise, ...
    rule = StopRule()
    while not rule.should_stop(samples_us, elapsed_s): ...

Percentiles interpolate linearly between order statistics (numpy's default), so p10 of 10 samples is not simply
the smallest one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Below this many samples quartiles say nothing about the tails, so nothing is called an outlier.
MIN_SAMPLES_FOR_OUTLIERS = 4


def _as_array(samples: Sequence[float], name: str = "samples") -> np.ndarray:
    values = np.asarray(samples, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{name}: expected a flat sequence of numbers, got an array of shape {values.shape}")
    if values.size and not np.isfinite(values).all():
        bad = values[~np.isfinite(values)][0]
        raise ValueError(f"{name}: expected finite numbers, got {bad!r} among {values.size} samples")
    return values


def iqr_fences(samples: Sequence[float], k: float = 1.5) -> tuple[float, float]:
    """(low, high): values outside [Q1 - k*IQR, Q3 + k*IQR] are outliers."""
    values = _as_array(samples)
    if values.size == 0:
        raise ValueError("samples: expected at least one sample, got none")
    q1, q3 = np.percentile(values, [25.0, 75.0])
    iqr = q3 - q1
    return float(q1 - k * iqr), float(q3 + k * iqr)


def _outlier_mask(values: np.ndarray, k: float) -> np.ndarray:
    """True where a value is kept."""
    if values.size < MIN_SAMPLES_FOR_OUTLIERS:
        return np.ones(values.shape, dtype=bool)
    low, high = iqr_fences(values, k)
    return (values >= low) & (values <= high)


def remove_outliers(samples: Sequence[float], k: float = 1.5) -> tuple[list[float], int]:
    """Drop values outside Tukey's fences [Q1 - k*IQR, Q3 + k*IQR]; returns (kept in original order, n_removed).

    Fewer than 4 samples are returned whole: quartiles of 3 numbers cannot tell a tail from an outlier.
    """
    if not (isinstance(k, (int, float)) and not isinstance(k, bool) and k >= 0 and math.isfinite(k)):
        raise ValueError(f"k: expected a finite number >= 0 (1.5 for Tukey's fences), got {k!r}")
    values = _as_array(samples)
    keep = _outlier_mask(values, float(k))
    return values[keep].tolist(), int(values.size - keep.sum())


def relative_noise(samples: Sequence[float]) -> float:
    """Sample standard deviation over mean (ddof=1); 0.0 when every sample is 0."""
    values = _as_array(samples)
    if values.size < 2:
        raise ValueError(f"samples: expected at least 2 samples to estimate noise, got {values.size}")
    mean = float(values.mean())
    std = float(values.std(ddof=1))
    if mean == 0.0:
        if std == 0.0:
            return 0.0
        raise ValueError("samples: mean is 0 but values differ; relative noise is undefined for signed data")
    return abs(std / mean)


def _check_noise_target(noise_target: Any) -> float:
    if isinstance(noise_target, bool) or not isinstance(noise_target, (int, float)) or not (
            0 < noise_target < 1 and math.isfinite(noise_target)):
        raise ValueError(f"noise_target: expected a fraction in (0, 1) such as 0.005 (0.5%), got {noise_target!r}")
    return float(noise_target)


def summarize(samples_us: Sequence[float], noise_target: float = 0.005) -> dict[str, Any]:
    """Statistics of one sample set, all computed after 1.5x IQR outlier removal.

    Returns dict(median_us, p10_us, p90_us, mean_us, noise, n_outliers, met_noise_target, n_samples, n_kept).
    Needs at least 2 samples (noise is undefined for one); samples must be finite and >= 0 (they are durations).
    """
    target = _check_noise_target(noise_target)
    values = _as_array(samples_us, "samples_us")
    if values.size < 2:
        raise ValueError(f"samples_us: expected at least 2 samples, got {values.size}")
    if (values < 0).any():
        raise ValueError(f"samples_us: durations cannot be negative, got {float(values.min())!r}")
    keep = _outlier_mask(values, 1.5)
    kept = values[keep]
    p10, median, p90 = np.percentile(kept, [10.0, 50.0, 90.0])
    noise = relative_noise(kept)
    return {
        "median_us": float(median),
        "p10_us": float(p10),
        "p90_us": float(p90),
        "mean_us": float(kept.mean()),
        "noise": float(noise),
        "n_outliers": int(values.size - kept.size),
        "met_noise_target": bool(noise <= target),
        "n_samples": int(values.size),
        "n_kept": int(kept.size),
    }


@dataclass(frozen=True)
class StopRule:
    """When to stop sampling (docs/measurement.md rule 5).

    Stop when at least `min_samples` samples and `min_time_s` seconds are in and the noise after outlier removal
    is <= `noise_target`; or, once those minimums are in, when `max_time_s` has passed (the noise target is then
    missed and the Timing says so). The minimums always hold, even past the timeout: statistics over fewer than
    10 samples are not worth reporting, so a kernel that takes 1 s per call still gets 10 samples.
    """

    min_samples: int = 10
    min_time_s: float = 0.1
    max_time_s: float = 5.0
    noise_target: float = 0.005

    def __post_init__(self) -> None:
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int) or self.min_samples < 2:
            raise ValueError(f"min_samples: expected an int >= 2 (noise needs two samples), got {self.min_samples!r}")
        for name in ("min_time_s", "max_time_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a finite number of seconds >= 0, got {value!r}")
        if self.max_time_s < self.min_time_s:
            raise ValueError(f"max_time_s: expected >= min_time_s ({self.min_time_s}), got {self.max_time_s}")
        _check_noise_target(self.noise_target)

    def minimums_met(self, n_samples: int, elapsed_s: float) -> bool:
        return n_samples >= self.min_samples and elapsed_s >= self.min_time_s

    def _noise(self, samples_us: Sequence[float]) -> float:
        values = _as_array(samples_us, "samples_us")
        return relative_noise(values[_outlier_mask(values, 1.5)])

    def should_stop(self, samples_us: Sequence[float], elapsed_s: float) -> bool:
        if not self.minimums_met(len(samples_us), elapsed_s):
            return False
        return elapsed_s >= self.max_time_s or self._noise(samples_us) <= self.noise_target

    def reason(self, samples_us: Sequence[float], elapsed_s: float) -> str:
        """Why sampling stops (or goes on) at this point, in words for Timing.note and logs."""
        n = len(samples_us)
        if not self.minimums_met(n, elapsed_s):
            return (f"continuing: {n} of at least {self.min_samples} samples, {elapsed_s:.3f} s of at least "
                    f"{self.min_time_s:g} s")
        noise = self._noise(samples_us)
        if noise <= self.noise_target:
            return (f"noise target met: {100 * noise:.2f}% <= {100 * self.noise_target:.2f}% after {n} samples "
                    f"in {elapsed_s:.3f} s")
        if elapsed_s >= self.max_time_s:
            return (f"noise target missed: {100 * noise:.2f}% > {100 * self.noise_target:.2f}% at the "
                    f"{self.max_time_s:g} s timeout ({n} samples)")
        return f"continuing: noise {100 * noise:.2f}% > {100 * self.noise_target:.2f}% after {n} samples"


# A RunResult keeps at most this many raw samples per Timing: the statistics are computed over every sample first,
# and a CPU call of a few microseconds can take a million samples in its time budget (a 100 MB file otherwise).
MAX_STORED_SAMPLES = 256


def bounded_sample(samples_us: Sequence[float], k: int = MAX_STORED_SAMPLES) -> list[float]:
    """At most `k` of `samples_us`, evenly spaced in time order (the first and the last always in), so that a drift
    or a throttled stretch stays visible in what is kept. Deterministic: the same samples give the same subset."""
    n = len(samples_us)
    if k < 2:
        raise ValueError(f"k: expected at least 2 samples to keep, got {k!r}")
    if n <= k:
        return [float(v) for v in samples_us]
    return [float(samples_us[round(i * (n - 1) / (k - 1))]) for i in range(k)]

