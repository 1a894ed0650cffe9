"""`tokprof compare`: the regression gate between two runs (docs/measurement.md, "Regression verdicts").

    result = compare_runs(load_run("base.json"), load_run("new.json"), threshold=0.05)
    print(result.to_markdown()); sys.exit(result.exit_code)        # 1 when anything gating is SLOW, else 0

What is compared, item by item (matched by key; items in only one run are counted, not judged):
  kernels          by (op, shape, dtype, backend): median time, samples' p10-p90, relative noise
  roll-up points   measured ones only, by (model, batch, context, dtype, backend, tp): step time; its noise is the
                   sum of its kernels' noise weighted by their share of the step, its p10-p90 the step at the
                   kernels' p10/p90 (an op without a kernel measurement, a modelled collective, adds no spread)
  end to end       by (model, framework, mode, backend, dtype, batch, context): median step time over its samples;
                   gating for tokprof's own loop only (transformers or vLLM time their code, not tokprof's)
Items whose time is zero, negative or not finite are left out with a note (no ratio can be formed).

Verdict per item, with delta = new / base - 1 of the metric:
  SAME       |delta| <= tolerance = max(noise_base, noise_new, threshold, 2 x between-run scatter)
  AMBIGUOUS  otherwise, when the two sample sets overlap heavily (p10-p90 ranges overlapping by more than 50% of
             the narrower range), when the change is within the whole run's drift, or when either run was measured
             on a shared CPU (RunResult.cpu_load, else its note): a co-tenant's time slice moves a whole sampling
             window, so it is no evidence about the code
  FAST/SLOW  otherwise, by the sign of delta (for efficiency, higher is better)
Between-run drift: within-run noise does not see what moves between two runs (clocks, caches, co-tenants). The
median kernel's change is the run's drift (a uniform shift of the whole run is drift, reported once, not N
regressions) and the robust scatter of the kernels' changes around it (1.4826 x MAD of the log ratios, >= 5
kernels) is the between-run noise. A SLOW or FAST verdict needs the change beyond the tolerance both as measured and
after the drift is taken out. The summary says when a run was made on a shared CPU or a throttled GPU.

Across GPU generations (different device names) raw time says nothing about the code, so kernels and roll-up points
are compared by roofline efficiency (time at each GPU's own roof / time; the measured roof when both runs have
it, else the datasheet one), which gates, and by time in SM cycles (time x SM clock), which is informational:
cycles of a memory-bound kernel also move with each GPU's bytes per cycle. End-to-end items then have cycles only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokprof.profiler.schema import RunResult, load_run
from tokprof.reports.observations import Observation, observations

SAME, FAST, SLOW, AMBIGUOUS = "SAME", "FAST", "SLOW", "AMBIGUOUS"
OVERLAP_LIMIT = 0.5  # p10-p90 overlap, as a fraction of the narrower range, above which a change is AMBIGUOUS
DEFAULT_THRESHOLD = 0.05


class CompareInputError(ValueError):
    """Unusable input: a bad file, or two runs with nothing in common (exit status 2)."""


def parse_threshold(text: str) -> float:
    """'5%' or '5' -> 0.05 (a bare number is a percentage too); ValueError on anything else."""
    raw = str(text).strip().rstrip("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"threshold: expected a percentage such as 5% or 2.5, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or value >= 100:
        raise ValueError(f"threshold: expected a percentage in [0, 100), got {text!r}")
    return value / 100.0


# ------------------------------------------------------------------------------------------------------ verdicts


def range_overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Length of the intersection of two [lo, hi] ranges over the narrower one's length (1.0 when one holds the
    other). A zero-width range counts as fully overlapping when it lies inside the other, else 0."""
    (a_lo, a_hi), (b_lo, b_hi) = sorted(a), sorted(b)
    inter = min(a_hi, b_hi) - max(a_lo, b_lo)
    narrow = min(a_hi - a_lo, b_hi - b_lo)
    if narrow <= 0:
        return 1.0 if inter >= 0 else 0.0
    return max(inter, 0.0) / narrow


def verdict(delta: float, tolerance: float, overlap: float | None, higher_is_better: bool,
            drift: float | None = None) -> str:
    """SAME inside the tolerance; AMBIGUOUS when the sample sets overlap heavily or when the change is explained by
    the whole run's drift `drift` (new / base - 1 of the median item); else FAST or SLOW, which needs the change to
    exceed the tolerance both as measured and after removing the drift, in the same direction."""
    if abs(delta) <= tolerance:
        return SAME
    if overlap is not None and overlap > OVERLAP_LIMIT:
        return AMBIGUOUS
    if drift is not None:
        adjusted = (1.0 + delta) / (1.0 + drift) - 1.0
        if abs(adjusted) <= tolerance or (adjusted > 0) != (delta > 0):
            return AMBIGUOUS
    worse = delta < 0 if higher_is_better else delta > 0
    return SLOW if worse else FAST


@dataclass
class Row:
    kind: str
    item: str
    metric: str
    base: float
    new: float
    delta: float  # new / base - 1
    tolerance: float
    overlap: float | None
    verdict: str
    gating: bool
    base_ref: str
    note: str = ""
    higher_is_better: bool = False
    noises: tuple = ()
    key: tuple = ()  # the item's key (tokprof.reports.observations)
    confirmed_delta: float | None = None  # the change re-measured here (tokprof.reports.confirm), when it was


def _row(kind: str, item: str, metric: str, base: float, new: float, ranges: tuple | None, noises: tuple,
         threshold: float, higher_is_better: bool, gating: bool, base_ref: str, note: str = "",
         key: tuple = ()) -> Row:
    delta = new / base - 1.0  # observations() keeps only positive, finite times and roofs
    tolerance = max([threshold, *[n for n in noises if n is not None]])
    overlap = range_overlap(*ranges) if ranges is not None else None
    return Row(kind, item, metric, base, new, delta, tolerance, overlap,
               verdict(delta, tolerance, overlap, higher_is_better), gating, base_ref, note, higher_is_better,
               noises, key)


# Between-run drift: the median kernel's log ratio (new / base) and the robust scatter of the kernels around it.
DRIFT_MIN_KERNELS = 3  # fewer matched kernels: no run-level drift estimate
SCATTER_MIN_KERNELS = 5  # fewer: no between-run scatter in the tolerance
SCATTER_SIGMAS = 2.0  # tolerance term: this many robust standard deviations of the kernels' log ratios


@dataclass
class Drift:
    """How the whole new run moved against the base: the median over gating kernel rows of new / base (as a
    change, `delta`), and the scatter of the kernels' changes around it (`sigma`, 1.4826 x the median absolute
    deviation of the log ratios; None with fewer than SCATTER_MIN_KERNELS kernels)."""

    delta: float
    sigma: float | None
    kernels: int


def estimate_drift(rows: Sequence[Row], kind: str = "kernel") -> Drift | None:
    """Run-level drift from the gating rows of `kind` (None with fewer than DRIFT_MIN_KERNELS). The median is robust:
    a few regressed items do not move it, a uniform shift of the machine (clocks, co-tenants, thermals) does.
    Kernels (and the roll-up points they sum) and end-to-end items are measured in different phases of a run, tens
    of seconds apart, so each kind has its own drift: on a CPU one phase of a run can run 10-15% slow throughout."""
    # In time terms: an efficiency (higher is better) ratio is the inverse of the time ratio.
    logs = np.array([math.log(r.new / r.base) * (-1.0 if r.higher_is_better else 1.0)
                     for r in rows if r.kind == kind and r.gating and r.base > 0 and r.new > 0])
    if logs.size < DRIFT_MIN_KERNELS:
        return None
    center = float(np.median(logs))
    sigma = float(1.4826 * np.median(np.abs(logs - center))) if logs.size >= SCATTER_MIN_KERNELS else None
    return Drift(math.exp(center) - 1.0, sigma, int(logs.size))


def apply_drift(rows: list[Row], drift: Drift | None, kinds: Sequence[str] = ("kernel", "point")) -> None:
    """Re-judge the gating rows of `kinds` with the between-run drift: the tolerance gains SCATTER_SIGMAS x the
    scatter (between-run noise that each item's own within-run noise does not see), and a change explained by the
    whole phase's shift is AMBIGUOUS, not FAST or SLOW."""
    if drift is None:
        return
    for r in rows:
        if not r.gating or r.kind not in kinds:
            continue
        if drift.sigma is not None:
            r.tolerance = max(r.tolerance, SCATTER_SIGMAS * drift.sigma)
        # Efficiency is higher-is-better: a run whose times grew by d has efficiencies shrunk by 1/(1+d).
        d = 1.0 / (1.0 + drift.delta) - 1.0 if r.higher_is_better else drift.delta
        r.verdict = verdict(r.delta, r.tolerance, r.overlap, r.higher_is_better, d)
        if r.verdict == AMBIGUOUS and abs(r.delta) > r.tolerance and (r.overlap is None or
                                                                       r.overlap <= OVERLAP_LIMIT):
            what = "end-to-end phase" if kinds == ("e2e",) else "whole run"
            r.note = (r.note + "; " if r.note else "") + f"within the {what}'s drift of {drift.delta:+.1%}"


def _ranges(b: Observation, n: Observation, fb: Any = None, fn: Any = None) -> tuple | None:
    """The two p10-p90 time ranges, each mapped through its run's transform (fb, fn) when given."""
    if None in (b.p10_us, b.p90_us, n.p10_us, n.p90_us):
        return None
    fb, fn = fb or (lambda x: x), fn or (lambda x: x)
    return ((fb(b.p10_us), fb(b.p90_us)), (fn(n.p10_us), fn(n.p90_us)))


def compare_rows(base: dict[tuple, Observation], new: dict[tuple, Observation], *, cross_generation: bool,
                 threshold: float) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    no_clock = 0
    for key, n in new.items():
        b = base.get(key)
        if b is None:
            continue
        noises = (b.noise, n.noise)
        # Another framework's end-to-end time (transformers, vLLM) measures its code, not tokprof's: informational.
        gates = not (n.kind == "e2e" and len(key) > 2 and key[2] != "tokprof")
        if not cross_generation:
            rows.append(_row(n.kind, n.label, "time us", b.time_us, n.time_us, _ranges(b, n), noises, threshold,
                             False, gates, b.run_ref,
                             note="" if gates else "another framework's code: informational", key=key))
            continue
        if n.kind != "e2e":
            which = "measured" if b.t_roof_measured_us and n.t_roof_measured_us else "datasheet"
            rb, rn = getattr(b, f"t_roof_{which}_us"), getattr(n, f"t_roof_{which}_us")
            if rb and rn:
                # efficiency = t_roof / time, so a p10-p90 time range maps to a t_roof/p90 - t_roof/p10 range.
                spread = _ranges(b, n, lambda x, r=rb: r / x, lambda x, r=rn: r / x)
                rows.append(_row(n.kind, n.label, f"efficiency ({which} roofline)", rb / b.time_us, rn / n.time_us,
                                 spread, noises, threshold, True, True, b.run_ref, key=key))
            else:
                notes.append(f"{n.label}: no roofline time in one of the runs, efficiency not compared")
        if b.sm_mhz and n.sm_mhz:
            # cycles = time_us x MHz (1e-6 s x 1e6 /s = 1 cycle per us-MHz)
            spread = _ranges(b, n, lambda x, c=b.sm_mhz: x * c, lambda x, c=n.sm_mhz: x * c)
            rows.append(_row(n.kind, n.label, "SM cycles", b.time_us * b.sm_mhz, n.time_us * n.sm_mhz, spread,
                             noises, threshold, False, False, b.run_ref,
                             f"clocks {b.sm_mhz:.0f} -> {n.sm_mhz:.0f} MHz", key=key))
        else:
            no_clock += 1
    if no_clock:
        notes.append(f"{no_clock} item(s) without a known SM clock in one run: cycles not compared for them")
    return rows, notes


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class Comparison:
    base_ref: str
    new_ref: str
    base_device: str
    new_device: str
    cross_generation: bool
    threshold: float
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_new: list[str] = field(default_factory=list)
    clock_sources: list[str] = field(default_factory=list)
    drift: Drift | None = None
    conditions: list[str] = field(default_factory=list)  # runs made on a shared CPU or a throttled GPU
    e2e_drift: Drift | None = None  # the end-to-end items' own drift (another phase of the runs)

    def counts(self, gating: bool = True) -> dict[str, int]:
        out = {v: 0 for v in (SLOW, AMBIGUOUS, FAST, SAME)}
        for r in self.rows:
            if r.gating == gating:
                out[r.verdict] += 1
        return out

    @property
    def exit_code(self) -> int:
        return 1 if any(r.gating and r.verdict == SLOW for r in self.rows) else 0

    def to_markdown(self) -> str:
        return summary_markdown(self)


def _fmt(value: float) -> str:
    from tokprof.reports.document import num  # one number format in every table

    return num(value)


def _table(rows: list[Row]) -> list[str]:
    lines = ["| verdict | kind | item | metric | base | new | delta | tolerance | p10-p90 overlap | gates |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        overlap = f"{r.overlap:.0%}" if r.overlap is not None else "n/a (no samples)"
        item = r.item + (f" ({r.note})" if r.note else "")
        lines.append(f"| **{r.verdict}** | {r.kind} | {item} | {r.metric} | {_fmt(r.base)} | {_fmt(r.new)} | "
                     f"{r.delta:+.1%} | {r.tolerance:.1%} | {overlap} | {'yes' if r.gating else 'no (info)'} |")
    return lines


def summary_markdown(c: Comparison) -> str:
    """A markdown summary for a CI comment: verdict line, rule, changed rows, SAME rows folded away."""
    counts = c.counts()
    status = f"FAIL: {counts[SLOW]} SLOW" if c.exit_code else "PASS"
    lines = [f"### tokprof compare: {status}", "",
             f"**Base:** {c.base_ref} on {c.base_device}  ",
             f"**New:** {c.new_ref} on {c.new_device}", "",
             "Gating items: " + ", ".join(f"{v} {n}" for v, n in counts.items()) + ".", "",
             f"Rule: SAME when \\|delta\\| <= tolerance = max(noise base, noise new, threshold {c.threshold:.1%}"
             f", {SCATTER_SIGMAS:g} x the between-run scatter of the kernels); otherwise FAST or SLOW, except "
             f"AMBIGUOUS when the p10-p90 ranges of the two sample sets overlap by more than {OVERLAP_LIMIT:.0%} of "
             "the narrower range, or when the change is within the whole run's drift (the median kernel's change). "
             "Noise: relative standard deviation after 1.5x IQR outlier removal; a roll-up point's is the sum of "
             "its kernels' noise weighted by their share of the step. delta = new / base - 1. Exit status 1 when a "
             "gating item is SLOW."]
    if c.drift is not None:
        scatter = f"{c.drift.sigma:.1%}" if c.drift.sigma is not None else "n/a (under 5 kernels)"
        lines += ["", f"**Whole-run drift: {c.drift.delta:+.1%}** (median change over {c.drift.kernels} kernels; "
                  f"scatter around it {scatter})."]
        if abs(c.drift.delta) > c.threshold:
            lines.append("The whole new run moved: a machine-level shift (clocks, co-tenants, thermals) or a change "
                         "that slows every kernel alike. Items within it are AMBIGUOUS, not SLOW; re-measure both "
                         "builds interleaved on a quiet machine to tell which.")
    if c.e2e_drift is not None:
        lines += ["", f"End-to-end drift: {c.e2e_drift.delta:+.1%} (median change over {c.e2e_drift.kernels} "
                  "end-to-end items, measured in another phase of the runs; judged like the kernels' drift)."]
    if c.conditions:
        lines += ["", "**Conditions:** " + "; ".join(c.conditions) + ". Figures made on a shared CPU or a "
                  "throttled GPU are slower and noisier than the code: a change measured on a shared CPU is "
                  "AMBIGUOUS, never SLOW or FAST; treat changes on a throttled GPU as weak."]
    if c.cross_generation:
        lines += ["", f"**Cross-generation comparison ({c.base_device} -> {c.new_device}): raw times are NOT "
                  "compared.** Kernels and roll-up points are compared by roofline efficiency (time at each GPU's "
                  "own roof / measured time), which gates, and by time in SM cycles (time x SM clock), which is "
                  "informational because a memory-bound kernel's cycles also follow each GPU's bytes per cycle. "
                  "End-to-end items have cycles only."]
        if c.clock_sources:
            lines.append("Clocks used for cycles: " + "; ".join(c.clock_sources) + ".")
    order = {SLOW: 0, AMBIGUOUS: 1, FAST: 2, SAME: 3}
    changed = sorted((r for r in c.rows if r.gating and r.verdict != SAME),
                     key=lambda r: (order[r.verdict], -abs(r.delta)))
    lines += ["", *_table(changed)] if changed else ["", "No gating item changed beyond its tolerance."]
    same = [r for r in c.rows if r.gating and r.verdict == SAME]
    if same:
        lines += ["", f"<details><summary>{len(same)} SAME item(s)</summary>", "", *_table(same), "", "</details>"]
    info = sorted((r for r in c.rows if not r.gating), key=lambda r: (order[r.verdict], -abs(r.delta)))
    if info:
        tally = ", ".join(f"{v} {n}" for v, n in c.counts(gating=False).items() if n)
        lines += ["", f"<details><summary>{len(info)} informational row(s), SM cycles: {tally}</summary>", "",
                  *_table(info), "", "</details>"]
    if c.only_in_base or c.only_in_new:
        lines += ["", f"Not compared: {len(c.only_in_base)} item(s) only in base, {len(c.only_in_new)} only in new"
                  + (f" (e.g. {', '.join((c.only_in_base + c.only_in_new)[:3])})" if c.only_in_base or c.only_in_new
                     else "") + "."]
    lines += [f"Note: {n}" for n in c.notes]
    return "\n".join(lines) + "\n"


def _device(run: RunResult) -> str:
    return run.provenance.device.name


SHARED_CPU_NOTE = "the CPU was shared"  # cpu_load.CpuLoadResult.note() of a contended run (runs without cpu_load)


def shared_cpu(run: RunResult) -> bool:
    """Whether `run` says it was measured on a CPU that other processes kept busy (RunResult.cpu_load when the run
    has it, else the note tokprof run and bench write)."""
    load = getattr(run, "cpu_load", None)
    if isinstance(load, dict) and "contended" in load:
        return bool(load.get("contended"))
    return any(SHARED_CPU_NOTE in n for n in run.notes)


def cpu_run(run: RunResult) -> bool:
    return run.provenance.device.kind == "cpu"


# A CPU call's time moves by tens of us between runs of identical code with no co-tenant at all: the torch thread
# pool's workers sleep or spin, the scheduler places them differently. Seen on an idle 2-core VM: linear M=1 N=256
# K=256 fp32 at 18.8 us in one run and 41.3 us in the next, p10-p90 ranges apart. A change smaller than this in
# absolute time is below a CPU run's resolution: AMBIGUOUS, never SLOW or FAST.
CPU_RESOLUTION_US = 30.0
# An end-to-end point on a CPU also moves between processes of identical code: in A/A pairs on an idle 2-core VM
# tokprof's batch-4 context-512 eager step was 9.4% slower in one process than in the other, in all three of its
# passes and again (+11%) when re-measured in a third process against other points (memory placement of a
# process's KV cache and weights, which no measurement inside one process sees). A CPU end-to-end change smaller
# than this is AMBIGUOUS, never SLOW or FAST.
CPU_E2E_PROCESS_NOISE = 0.15


def run_conditions(run: RunResult, ref: str) -> list[str]:
    """Why `run`'s figures may be off: made on a shared CPU (RunResult.cpu_load, else its notes) or on a GPU whose
    clock fell during a measurement (throttled timings)."""
    out = []
    if shared_cpu(run):
        note = next((n for n in run.notes if SHARED_CPU_NOTE in n), None)
        out.append(f"{ref} was made on a shared CPU" + (f" ({note.split(':')[0]})" if note else ""))
    throttled = sum(1 for k in run.kernels if k.timing.throttled)
    if throttled:
        out.append(f"{ref}: {throttled} kernel measurement(s) ran on a throttled GPU (SM clock below 75% of max)")
    return out


def _finish(base_obs: dict, new_obs: dict, notes: list[str], *, base_ref: str, new_ref: str, base_device: str,
            new_device: str, threshold: float, conditions: Sequence[str] = (), shared: bool = False,
            cpu: bool = False) -> Comparison:
    """`conditions`: what may be off in either run (said in the summary and on changed rows); `shared`: either run
    was measured on a shared CPU, where a time slice lost to another process moves a whole sampling window, so a
    change beyond the tolerance is AMBIGUOUS (a co-tenant's share is not the code's), never FAST or SLOW."""
    cross = base_device != new_device
    rows, more = compare_rows(base_obs, new_obs, cross_generation=cross, threshold=threshold)
    drift = estimate_drift(rows)
    apply_drift(rows, drift)
    e2e_drift = estimate_drift(rows, "e2e")
    apply_drift(rows, e2e_drift, kinds=("e2e",))
    for r in rows:
        if r.gating and r.verdict in (SLOW, FAST) and cpu and r.metric == "time us" and (
                abs(r.new - r.base) < CPU_RESOLUTION_US):
            r.verdict = AMBIGUOUS
            r.note = (r.note + "; " if r.note else "") + (
                f"a change of {abs(r.new - r.base):.1f} us, below a CPU run's resolution of {CPU_RESOLUTION_US:g} us "
                "(thread-pool wake-ups, placement): re-measure both builds interleaved to tell")
        elif r.gating and r.verdict in (SLOW, FAST) and cpu and r.kind == "e2e" and abs(r.delta) < \
                CPU_E2E_PROCESS_NOISE:
            r.verdict = AMBIGUOUS
            r.note = (r.note + "; " if r.note else "") + (
                f"a change of {r.delta:+.1%}, within the {CPU_E2E_PROCESS_NOISE:.0%} a CPU end-to-end point moves "
                "between processes of identical code")
        elif r.gating and r.verdict in (SLOW, FAST) and shared:
            r.verdict = AMBIGUOUS
            r.note = (r.note + "; " if r.note else "") + "measured on a shared CPU: re-run on an idle one to tell"
        elif r.gating and r.verdict in (SLOW, FAST) and conditions:
            r.note = (r.note + "; " if r.note else "") + "throttled GPU: see the conditions"
    if not rows:
        raise CompareInputError(f"nothing to compare: {base_ref} and {new_ref} have no kernel, measured roll-up "
                                "point or end-to-end item in common (matched by op, shape, dtype, backend; by "
                                "model, batch, context, dtype, backend)")
    by_run: dict[str, set[str]] = {}
    for o in [*base_obs.values(), *new_obs.values()]:
        if cross and o.clock_source:
            by_run.setdefault(o.run_ref, set()).add(o.clock_source)
    sources = [f"{ref}: {' / '.join(sorted(found))}" for ref, found in by_run.items()]
    return Comparison(base_ref, new_ref, base_device, new_device, cross, threshold, rows, notes + more,
                      [o.label for k, o in base_obs.items() if k not in new_obs],
                      [o.label for k, o in new_obs.items() if k not in base_obs], sources, drift, list(conditions),
                      e2e_drift)


def compare_runs(base: RunResult, new: RunResult, *, threshold: float = DEFAULT_THRESHOLD, base_ref: str = "base",
                 new_ref: str = "new") -> Comparison:
    """Compare `new` against `base`; CompareInputError when nothing matches."""
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise ValueError(f"threshold: expected a fraction in [0, 1), got {threshold!r}")
    base_obs, notes_b = observations(base, base_ref)
    new_obs, notes_n = observations(new, new_ref)
    return _finish(base_obs, new_obs, notes_b + notes_n, base_ref=base_ref, new_ref=new_ref,
                   base_device=_device(base), new_device=_device(new), threshold=threshold,
                   conditions=run_conditions(base, base_ref) + run_conditions(new, new_ref),
                   shared=shared_cpu(base) or shared_cpu(new), cpu=cpu_run(base) or cpu_run(new))


def run_ref(run: RunResult, path: str | Path | None) -> str:
    return f"{run.run_id or 'no run_id'}" + (f" ({Path(path).name})" if path else "")


def compare_files(base_path: str | Path, new_path: str | Path, *, threshold: float = DEFAULT_THRESHOLD) -> Comparison:
    try:
        base, new = load_run(base_path), load_run(new_path)
    except ValueError as err:
        raise CompareInputError(str(err)) from err
    return compare_runs(base, new, threshold=threshold, base_ref=run_ref(base, base_path),
                        new_ref=run_ref(new, new_path))


def compare_against_history(new: RunResult, new_path: str | Path | None, history: Any, against: str, *,
                            threshold: float = DEFAULT_THRESHOLD) -> Comparison:
    """Compare `new` with recorded runs on the same device: the last one, or per item the best (fastest) one."""
    if against not in ("best", "last"):
        raise ValueError(f"against: expected 'best' or 'last', got {against!r}")
    device = _device(new)
    recorded = [(rid, src, run) for rid, src, run in history.runs_for_device(device)
                if not new.run_id or rid != new.run_id]
    if not recorded:
        raise CompareInputError(f"history {history.path}: no recorded run on device {device!r} other than this one "
                                "to compare against (record runs with `tokprof history --record RUN.json`)")
    new_ref = run_ref(new, new_path)
    if against == "last":
        rid, src, base = recorded[-1]  # runs_for_device is ordered oldest -> newest
        return compare_runs(base, new, threshold=threshold, base_ref=f"last recorded: {run_ref(base, src)}",
                            new_ref=new_ref)
    best: dict[tuple, Observation] = {}
    notes: list[str] = []
    for _, src, run in recorded:
        obs, _ = observations(run, run_ref(run, src))
        for key, o in obs.items():
            if key not in best or o.time_us < best[key].time_us:
                best[key] = o
    new_obs, notes_n = observations(new, new_ref)
    notes.append(f"base: per item, the fastest of {len(recorded)} recorded run(s) on {device}; each row's base run "
                 "is in the table")
    conditions = [c for _, src, run in recorded for c in run_conditions(run, run_ref(run, src))]
    comparison = _finish(best, new_obs, notes + notes_n, base_ref=f"best of {len(recorded)} recorded run(s)",
                         new_ref=new_ref, base_device=device, new_device=device, threshold=threshold,
                         conditions=conditions + run_conditions(new, new_ref),
                         shared=shared_cpu(new) or any(shared_cpu(run) for _, _, run in recorded),
                         cpu=cpu_run(new))
    for r in comparison.rows:
        r.note = (r.note + "; " if r.note else "") + f"base: {r.base_ref}"
    return comparison
