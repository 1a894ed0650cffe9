"""`tokprof compare`: verdicts on synthetic runs, exit codes, cross-generation comparison, --against history."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from make_fixtures import timing_from_samples
from typer.testing import CliRunner

from tokprof.cli import app
from tokprof.profiler.bench import bench_calls, new_run
from tokprof.profiler.cpu_load import CpuLoad
from tokprof.profiler.schema import RunResult, load_run, save_run
from tokprof.reports.compare import (
    AMBIGUOUS,
    FAST,
    SAME,
    SLOW,
    CompareInputError,
    compare_runs,
    parse_threshold,
    range_overlap,
    verdict,
)
from tokprof.reports.history import History

DATA = Path(__file__).resolve().parent / "data"
H100, H200 = DATA / "run_h100.json", DATA / "run_h200.json"
ATTN_8K = ("decode_attention", 8192)


@pytest.fixture(scope="module")
def h100() -> RunResult:
    return load_run(H100)


def resampled(run: RunResult, seed: int, factors: dict[int, float] | None = None, noise: float = 0.003,
              run_id: str = "resampled") -> RunResult:
    """A copy of `run` whose kernels get fresh samples (relative noise `noise`) around median x factor[index]."""
    rng = np.random.default_rng(seed)
    out = copy.deepcopy(run)
    out.run_id = run_id
    for i, k in enumerate(out.kernels):
        center = run.kernels[i].timing.median_us * (factors or {}).get(i, 1.0)
        timing = timing_from_samples(list(center * (1.0 + noise * rng.standard_normal(15))))
        timing.clocks_before, timing.clocks_after = k.timing.clocks_before, k.timing.clocks_after
        k.timing = timing
    return out


def kernel_rows(result, index: int, run: RunResult):
    k = run.kernels[index]
    label_start = f"{k.op} {' '.join(f'{a}={b}' for a, b in k.shape.items())} {k.dtype}"
    return [r for r in result.rows if r.kind == "kernel" and r.item.startswith(label_start)]


def test_matching_covers_kernels_points_and_e2e(h100):
    a, b = resampled(h100, seed=1, run_id="a"), resampled(h100, seed=2, run_id="b")
    result = compare_runs(a, b, threshold=0.05)
    assert result.exit_code == 0
    assert not result.cross_generation
    assert {r.verdict for r in result.rows} == {SAME}
    kinds = {r.kind for r in result.rows}
    assert kinds == {"kernel", "point", "e2e"}
    assert len([r for r in result.rows if r.kind == "kernel"]) == len(h100.kernels)
    assert {r.metric for r in result.rows} == {"time us"}


def _real_cpu_run(run_id: str) -> RunResult:
    """A real, short CPU benchmark of small shapes (perf_counter timing): the kind of run CI compares."""
    calls = [("swiglu", {"T": 4, "I": 256}, "fp32", "torch"), ("swiglu", {"T": 16, "I": 512}, "fp32", "torch"),
             ("rms_norm", {"T": 4, "H": 256}, "fp32", "torch"), ("rms_norm", {"T": 16, "H": 1024}, "fp32", "torch"),
             ("linear", {"M": 1, "N": 256, "K": 256}, "fp32", "torch"),
             ("linear", {"M": 4, "N": 512, "K": 256}, "fp32", "torch")]
    run = new_run(["tokprof", "bench"], "cpu")
    run.run_id = run_id
    meter = CpuLoad.start()
    bench_calls(calls, "cpu", timing_kwargs={"min_time_s": 0.02, "max_time_s": 0.1}, run=run, progress=False)
    run.notes.append(meter.stop().note())  # as `tokprof bench` does on a CPU: says when the CPU was shared
    return run


def test_aa_pair_of_real_measurements_is_never_slow():
    # Identical code measured twice back to back on this (possibly shared) CPU: the gate must not cry wolf.
    # SAME or AMBIGUOUS are honest answers here; SLOW (exit 1) or FAST on identical code is not.
    a, b = _real_cpu_run("a"), _real_cpu_run("b")
    assert len(a.kernels) == len(b.kernels) == 6
    result = compare_runs(a, b, threshold=0.05)
    assert result.exit_code == 0, result.to_markdown()
    assert {r.verdict for r in result.rows} <= {SAME, AMBIGUOUS}, result.to_markdown()
    assert result.drift is not None and result.drift.kernels == 6


def test_ten_percent_slowdown_is_slow(h100):
    base = resampled(h100, seed=3)
    new = resampled(h100, seed=4, factors={6: 1.10})  # kernel 6: decode_attention batch 1 context 1024
    result = compare_runs(base, new, threshold=0.05)
    (row,) = kernel_rows(result, 6, h100)
    assert row.verdict == SLOW
    assert row.delta == pytest.approx(0.10, abs=0.01)
    assert row.overlap == 0.0
    assert result.exit_code == 1
    assert sum(r.verdict == SLOW for r in result.rows) == 1
    md = result.to_markdown()
    assert md.startswith("### tokprof compare: FAIL: 1 SLOW")
    assert "| **SLOW** | kernel | decode_attention B=1" in md


def test_ten_percent_speedup_is_fast_and_passes(h100):
    result = compare_runs(resampled(h100, seed=5), resampled(h100, seed=6, factors={3: 0.90}), threshold=0.05)
    (row,) = kernel_rows(result, 3, h100)
    assert row.verdict == FAST
    assert result.exit_code == 0


def test_change_inside_threshold_or_noise_is_same(h100):
    base = resampled(h100, seed=7)
    result = compare_runs(base, resampled(h100, seed=8, factors={3: 1.03}), threshold=0.05)
    assert kernel_rows(result, 3, h100)[0].verdict == SAME
    assert result.exit_code == 0
    # 5.5% slower with 6% noise on both sides and a 2% threshold: inside the noise, so SAME.
    noisy_base = resampled(h100, seed=9, noise=0.06)
    noisy_new = resampled(h100, seed=10, noise=0.06, factors={3: 1.055})
    row = kernel_rows(compare_runs(noisy_base, noisy_new, threshold=0.02), 3, h100)[0]
    assert row.tolerance >= max(noisy_base.kernels[3].timing.noise, noisy_new.kernels[3].timing.noise)
    assert abs(row.delta) <= row.tolerance
    assert row.verdict == SAME


def test_overlapping_samples_are_ambiguous(h100):
    rng = np.random.default_rng(11)
    base, new = resampled(h100, seed=12), resampled(h100, seed=13)
    center = h100.kernels[3].timing.median_us
    spread = center * rng.uniform(0.82, 1.18, 40)  # wide, flat sample sets: noise ~10%, p10-p90 ~ +-14%
    base.kernels[3].timing = timing_from_samples(list(spread))
    new.kernels[3].timing = timing_from_samples(list(spread * 1.12))
    result = compare_runs(base, new, threshold=0.05)
    (row,) = kernel_rows(result, 3, h100)
    assert abs(row.delta) > row.tolerance, (row.delta, row.tolerance)
    assert row.overlap > 0.5
    assert row.verdict == AMBIGUOUS
    assert result.exit_code == 0


def test_overlap_and_verdict_rules():
    assert range_overlap((0.0, 10.0), (5.0, 15.0)) == pytest.approx(0.5)
    assert range_overlap((0.0, 10.0), (2.0, 3.0)) == pytest.approx(1.0)
    assert range_overlap((0.0, 1.0), (2.0, 3.0)) == 0.0
    assert range_overlap((5.0, 5.0), (4.0, 6.0)) == 1.0
    assert verdict(0.04, 0.05, None, higher_is_better=False) == SAME
    assert verdict(0.08, 0.05, 0.2, higher_is_better=False) == SLOW
    assert verdict(0.08, 0.05, 0.6, higher_is_better=False) == AMBIGUOUS
    assert verdict(0.08, 0.05, 0.2, higher_is_better=True) == FAST
    assert verdict(-0.08, 0.05, None, higher_is_better=True) == SLOW


def test_parse_threshold():
    assert parse_threshold("5%") == pytest.approx(0.05)
    assert parse_threshold("2.5") == pytest.approx(0.025)
    for bad in ("abc", "-1%", "150%", "nan"):
        with pytest.raises(ValueError, match="threshold"):
            parse_threshold(bad)


def test_nothing_in_common_is_unusable(h100):
    other = copy.deepcopy(h100)
    other.rollup, other.e2e = [], []
    for k in other.kernels:
        k.backend = "cuda"
    with pytest.raises(CompareInputError, match="nothing to compare"):
        compare_runs(h100, other)


def test_cross_generation_uses_efficiency_and_cycles():
    h100, h200 = load_run(H100), load_run(H200)
    result = compare_runs(h100, h200, threshold=0.05)
    assert result.cross_generation
    assert {r.metric for r in result.rows} == {"efficiency (measured roofline)", "SM cycles"}
    slow_kernels = sorted(r.item.split(" ")[0] + " " + r.item.split("context=")[1].split(" ")[0]
                          for r in result.rows if r.kind == "kernel" and r.verdict == SLOW)
    assert slow_kernels == ["decode_attention 8192"] * 3  # the injected regression, and nothing else
    for r in result.rows:
        if r.kind == "kernel" and r.gating and "context=8192" not in r.item:
            assert r.verdict == SAME, r
        if r.metric == "SM cycles":
            assert not r.gating
    assert result.exit_code == 1
    # Cycles = median time x SM clock read around the call (1755 MHz on the H100 fixture, 1785 on the H200).
    k = h100.kernels[3]
    row = next(r for r in result.rows if r.metric == "SM cycles" and r.item.startswith("linear M=1 N=6144"))
    assert row.base == pytest.approx(k.timing.median_us * 1755)
    assert row.new == pytest.approx(h200.kernels[3].timing.median_us * 1785)
    md = result.to_markdown()
    assert "Cross-generation comparison" in md and "raw times are NOT compared" in md
    assert "roofline efficiency" in md and "SM cycles" in md
    assert "SM clock read around the measurement" in md


def test_cross_generation_without_clocks_uses_the_labelled_max_clock():
    h100, h200 = load_run(H100), load_run(H200)
    for run in (h100, h200):
        run.provenance.clocks = None
        for k in run.kernels:
            k.timing.clocks_before = k.timing.clocks_after = None
    result = compare_runs(h100, h200)
    row = next(r for r in result.rows if r.metric == "SM cycles" and r.kind == "kernel")
    assert "1980 -> 1980 MHz" in row.note
    assert "max SM clock of the device (spec; not read under load)" in result.to_markdown()


def _invoke(args):
    return CliRunner().invoke(app, ["compare", *map(str, args)])


def test_cli_exit_codes(h100, tmp_path):
    base = save_run(resampled(h100, seed=20, run_id="base"), tmp_path / "base.json")
    same = save_run(resampled(h100, seed=21, run_id="same"), tmp_path / "same.json")
    slow = save_run(resampled(h100, seed=22, factors={10: 1.10}, run_id="slow"), tmp_path / "slow.json")
    result = _invoke([base, same])
    assert result.exit_code == 0, result.output
    assert "tokprof compare: PASS" in result.output
    result = _invoke([base, slow, "--threshold", "5%", "-o", tmp_path / "summary.md"])
    assert result.exit_code == 1, result.output
    assert (tmp_path / "summary.md").read_text().startswith("### tokprof compare: FAIL: 1 SLOW")
    # A 10% slowdown under a 15% threshold is SAME.
    assert _invoke([base, slow, "--threshold", "15"]).exit_code == 0
    truncated = tmp_path / "truncated.json"
    truncated.write_text(base.read_text()[:500])
    assert _invoke([base, truncated]).exit_code == 2
    assert _invoke([base, tmp_path / "missing.json"]).exit_code == 2
    assert _invoke([base]).exit_code == 2
    assert _invoke([base, same, "--threshold", "fast"]).exit_code == 2


def test_cli_against_history(h100, tmp_path):
    db = tmp_path / "history.db"
    old = resampled(h100, seed=30, run_id="old")
    later = resampled(h100, seed=31, factors={10: 1.10}, run_id="later")
    later.provenance.timestamp_utc = "2026-02-01T00:00:00Z"
    for run in (old, later):
        result = CliRunner().invoke(app, ["history", "--db", str(db), "--record", str(save_run(
            run, tmp_path / f"{run.run_id}.json"))])
        assert result.exit_code == 0, result.output
    new = save_run(resampled(h100, seed=32, run_id="new"), tmp_path / "new.json")
    # Against the last run (10% slower on kernel 10), the new one is FAST there and passes.
    result = _invoke(["--against", "last", new, "--db", db])
    assert result.exit_code == 0, result.output
    assert "last recorded: later" in result.output and "**FAST**" in result.output
    # Against the best per item (the old run), it is SAME everywhere.
    result = _invoke(["--against", "best", new, "--db", db])
    assert result.exit_code == 0, result.output
    assert "**FAST**" not in result.output and "**SLOW**" not in result.output
    regressed = save_run(resampled(h100, seed=33, factors={10: 1.10}, run_id="regressed"), tmp_path / "reg.json")
    result = _invoke(["--against", "best", regressed, "--db", db, "--record"])
    assert result.exit_code == 1, result.output
    assert "base: old" in result.output
    assert [r.run_id for r in History(db).runs()] == ["old", "regressed", "later"]  # --record added it
    # With --against, exactly one file; a device never recorded is unusable input.
    assert _invoke(["--against", "best", new, new, "--db", db]).exit_code == 2
    assert _invoke(["--against", "best", H200, "--db", db]).exit_code == 2


def test_a_points_tolerance_carries_the_noise_of_its_kernels(h100):
    # Each kernel's own noise is 15%: the step summing them is as uncertain, so a point 12% slower is not SLOW.
    base = resampled(h100, seed=40, noise=0.15)
    new = resampled(h100, seed=41, noise=0.15)
    point = next(i for i, p in enumerate(new.rollup) if p["provenance"] == "measured")
    new.rollup[point]["step_time_us"] *= 1.12
    result = compare_runs(base, new, threshold=0.05)
    row = next(r for r in result.rows if r.kind == "point" and r.new != r.base)
    assert row.delta == pytest.approx(0.12)
    shares = [(o["share"], o) for o in base.rollup[point]["ops"]]
    noise = {k.key(): k.timing.noise for k in base.kernels}
    expected = sum(sh * noise[(o["op"], tuple(sorted(o["shape"].items())), "bf16", "triton")] for sh, o in shares)
    assert row.tolerance >= expected > 0.10  # sum of share x noise
    assert row.verdict in (SAME, AMBIGUOUS) and result.exit_code == 0
    # The same +12% with quiet kernels (0.3% noise) and nothing else moving is a regression.
    quiet_base, quiet_new = resampled(h100, seed=42), resampled(h100, seed=43)
    quiet_new.rollup[point]["step_time_us"] *= 1.12
    result = compare_runs(quiet_base, quiet_new, threshold=0.05)
    row = next(r for r in result.rows if r.kind == "point" and r.new != r.base)
    assert row.verdict == SLOW and row.tolerance == pytest.approx(0.05) and result.exit_code == 1


def test_a_uniform_shift_of_the_whole_run_is_drift_not_n_regressions(h100):
    base = resampled(h100, seed=50)
    new = resampled(h100, seed=51, factors={i: 1.10 for i in range(len(h100.kernels))})
    result = compare_runs(base, new, threshold=0.05)
    assert result.drift is not None and result.drift.delta == pytest.approx(0.10, abs=0.01)
    kernel_verdicts = {r.verdict for r in result.rows if r.kind == "kernel"}
    assert kernel_verdicts == {AMBIGUOUS} and result.exit_code == 0
    md = result.to_markdown()
    assert "Whole-run drift: +10" in md and "within the whole run's drift" in md
    # One kernel 15% slower beyond the same uniform shift is still a regression.
    factors = {i: 1.10 for i in range(len(h100.kernels))}
    factors[6] = 1.10 * 1.15
    result = compare_runs(base, resampled(h100, seed=52, factors=factors), threshold=0.05)
    assert [r.item.split(" ")[0] for r in result.rows if r.verdict == SLOW] == ["decode_attention"]
    assert result.exit_code == 1


def test_between_run_scatter_widens_the_tolerance(h100):
    # Kernels scattered by ~+-6% between runs (no common shift): a kernel 7% off is inside the between-run noise.
    rng = np.random.default_rng(60)
    factors = {i: float(np.exp(0.06 * rng.standard_normal())) for i in range(len(h100.kernels))}
    result = compare_runs(resampled(h100, seed=61), resampled(h100, seed=62, factors=factors), threshold=0.05)
    assert result.drift.sigma == pytest.approx(0.06, rel=0.5)
    # kernels and the points they sum; end-to-end items have their own drift (another phase of the run)
    assert all(r.tolerance >= 2 * result.drift.sigma for r in result.rows if r.gating and r.kind != "e2e")


def test_zero_and_non_finite_times_are_not_compared_and_never_divide_by_zero(h100):
    base, new = resampled(h100, seed=70), resampled(h100, seed=71)
    base.kernels[0].timing.median_us = 0.0
    new.kernels[1].timing.median_us = float("nan")
    result = compare_runs(base, new)
    assert len([r for r in result.rows if r.kind == "kernel"]) == len(h100.kernels) - 2
    assert any("zero, negative or non-finite" in n for n in result.notes)


def test_verdicts_say_when_a_run_was_made_on_a_shared_cpu(h100):
    base, new = resampled(h100, seed=80), resampled(h100, seed=81, factors={6: 1.10})
    new.notes.append("other processes kept 1.20 of 2 cores busy over the 30 s run (tokprof 0.9): the CPU was shared, "
                     "so these CPU figures are slower and noisier than on an idle CPU")
    new.kernels[2].timing.throttled = True
    result = compare_runs(base, new)
    assert any("new was made on a shared CPU" in c for c in result.conditions)
    assert any("throttled GPU" in c for c in result.conditions)
    (row,) = kernel_rows(result, 6, h100)
    assert row.verdict == AMBIGUOUS and "shared CPU" in row.note and result.exit_code == 0
    assert "**Conditions:**" in result.to_markdown()
    # A throttled GPU alone keeps the verdict and says so on the row.
    new.notes.pop()
    (row,) = kernel_rows(compare_runs(base, new), 6, h100)
    assert row.verdict == SLOW and "throttled GPU" in row.note


def test_a_cpu_change_below_the_timer_resolution_is_never_slow():
    # identical code, idle 2-core VM: linear 18.8 us -> 41.3 us between two runs (thread-pool wake-ups). Below
    # CPU_RESOLUTION_US in absolute terms: AMBIGUOUS with the reason; a 200 us change on a 1 ms call stays SLOW.
    from tokprof.reports import compare as cmp

    def obs(t, ref):
        return cmp.Observation("kernel", ("k",), "linear M=1", t, t * 0.98, t * 1.02, 0.01, None, None, None, None,
                               ref)

    small = cmp._finish({"k": obs(18.8, "a")}, {"k": obs(41.3, "b")}, [], base_ref="a", new_ref="b",
                        base_device="AMD EPYC", new_device="AMD EPYC", threshold=0.05, cpu=True)
    assert small.rows[0].verdict == AMBIGUOUS and "resolution" in small.rows[0].note and small.exit_code == 0
    big = cmp._finish({"k": obs(1000.0, "a")}, {"k": obs(1200.0, "b")}, [], base_ref="a", new_ref="b",
                      base_device="AMD EPYC", new_device="AMD EPYC", threshold=0.05, cpu=True)
    assert big.rows[0].verdict == SLOW and big.exit_code == 1
    gpu = cmp._finish({"k": obs(18.8, "a")}, {"k": obs(41.3, "b")}, [], base_ref="a", new_ref="b",
                      base_device="H100", new_device="H100", threshold=0.05, cpu=False)
    assert gpu.rows[0].verdict == SLOW  # a GPU's event times resolve microseconds
