"""Results stay small: a bounded sample of raw times per call, a RunResult and a history entry of bounded size."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokprof.profiler.schema import load_run, save_run
from tokprof.profiler.stats import MAX_STORED_SAMPLES, bounded_sample
from tokprof.profiler.timing import measure

DATA = Path(__file__).parent / "data"


def test_bounded_sample_keeps_ends_and_even_steps():
    assert bounded_sample([1.0, 2.0, 3.0], k=4) == [1.0, 2.0, 3.0]  # fewer than k: every sample
    got = bounded_sample([float(i) for i in range(1001)], k=11)
    assert got == [float(i) for i in range(0, 1001, 100)]  # first, last and every 100th between
    with pytest.raises(ValueError, match="k: expected at least 2"):
        bounded_sample([1.0, 2.0], k=1)


def test_a_fast_call_keeps_its_statistics_over_every_sample_but_stores_a_bounded_sample():
    t = measure(lambda kw: None, {}, device="cpu", max_time_s=0.2, noise_target=1e-9, warmup_ms=0.0)
    assert t.n_samples is not None and t.n_samples > 10 * MAX_STORED_SAMPLES  # a no-op: thousands of samples
    assert len(t.samples_us) == MAX_STORED_SAMPLES == 256
    assert t.samples_taken == t.n_samples
    assert str(t.n_samples) in t.note  # the stop rule's reason counts every sample


def test_older_files_with_every_sample_still_load():
    run = load_run(DATA / "run_h100.json")
    k = run.kernels[0]
    assert k.timing.n_samples is None and k.timing.samples_taken == len(k.timing.samples_us) > 0


def test_a_rollup_run_of_many_calls_stays_small_and_so_does_its_history_entry(tmp_path, monkeypatch):
    from tokprof.models.config import ModelConfig
    from tokprof.reports.history import History
    from tokprof.rollup import bottom_up

    monkeypatch.setenv("TOKPROF_CACHE_DIR", str(tmp_path / "cache"))
    # max_time_s 0.2 s: the cheapest calls (embedding, greedy_sample) take tens of thousands of samples each
    points, run = bottom_up(ModelConfig.from_name("tiny"), [1, 2], [16], "torch", "cpu", dtype="fp32",
                            timing_kwargs={"max_time_s": 0.2, "min_time_s": 0.1, "noise_target": 1e-9},
                            ceilings=None, progress=False, command=["test"])
    n = len(run.kernels)
    assert n >= 12 and len(points) == 2
    assert all(len(k.timing.samples_us) <= MAX_STORED_SAMPLES for k in run.kernels)
    # CPU calls are timed round-robin in step order (a few dozen rounds each); give every call the sample count of a
    # fast call timed alone (thousands), so that the bound is what keeps the file small
    fast = measure(lambda kw: None, {}, device="cpu", max_time_s=0.2, noise_target=1e-9, warmup_ms=0.0)
    assert fast.samples_taken > 10 * MAX_STORED_SAMPLES
    for k in run.kernels:
        k.timing = fast
    path = save_run(run, tmp_path / "run.json")
    size = path.stat().st_size
    # ~2.5 KB of stored samples and ~1 KB of statistics and roofline per call: a few hundred KB for a sweep
    assert size < n * 8_000, f"{size} B for {n} calls"
    db = tmp_path / "h.db"
    History(db).record_run(run, path)
    assert db.stat().st_size < 3 * size + 200_000, f"history {db.stat().st_size} B for a {size} B run"
