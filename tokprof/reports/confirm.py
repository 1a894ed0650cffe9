"""Re-measure what a comparison did not call SAME, interleaved with anchor kernels, before a SLOW verdict stands.

    comparison = compare_files("base.json", "new.json")
    notes = confirm_comparison(comparison, load_run("new.json"))   # on the machine and checkout of the new run

Why (docs/measurement.md, "Regression verdicts"): between two runs a machine's speed moves, and not uniformly. On an
idle 2-core VM one kernel measured +77% in an A/A pair (linear M=1 N=1024 K=256, 43 -> 76 us) while the run as a
whole moved +4%: a slow second that landed in that kernel's sampling window. Within-run noise cannot see it and the
run-level drift averages it away. A real regression, though, persists when the kernel is measured again; an
excursion does not.

How: each flagged kernel (a gating kernel row that is not SAME, and the kernels that carry >= 5% of a flagged
roll-up point) is measured again now with the installed code, together with up to ANCHORS anchor kernels (gating
SAME rows whose change is closest to the run's drift), interleaved so that all of them see the same machine:

  kernels timed alone (bench, GPU events or graphs, CPU calls):  CONFIRM_ROUNDS rounds, each timing the flagged
      kernels and the anchors for `window_s` each, one after the other; per round ratio = flagged / geometric mean
      of the anchors; the median over rounds
  kernels timed in a step's sequence (a CPU `tokprof run`):  the sequence of the first roll-up point holding the
      kernel, round-robin again (timing.measure_sequence) for SEQUENCE_S; its anchors are the other SAME kernels
      of that sequence, measured in the same rounds

The confirmed change is ratio_now / ratio_base - 1, with ratio_base = the flagged kernel's base time / the geometric
mean of the anchors' base times: the machine's speed now cancels in the ratio. Within the row's tolerance: SAME
("re-measured"); beyond it in the direction first seen: the verdict stands (confirmed); beyond it the other way:
AMBIGUOUS. A re-measurement never escalates a verdict: an AMBIGUOUS row stays AMBIGUOUS at worst. A flagged roll-up
point is judged again by its ops' changes weighted by their share of the step, the
re-measured kernels' changes confirmed. A flagged end-to-end item (tokprof's loop or transformers', on the run's
model with random weights: timing does not depend on their values) is measured again E2E_ROUNDS times, each round
also measuring up to E2E_ANCHORS SAME end-to-end items, and judged by the same ratio.

Re-measuring is only meaningful where the new run was made: the same device (by name) and, when both are known,
the same commit as this checkout. Otherwise nothing is re-measured and a note says why.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tokprof.profiler.schema import KernelMeasurement, RunResult
from tokprof.reports.compare import AMBIGUOUS, CPU_E2E_PROCESS_NOISE, FAST, SAME, SLOW, Comparison, Row

CONFIRM_ROUNDS = 7
CONFIRM_WINDOW_S = 0.05  # per kernel per round
ANCHORS = 3
E2E_ROUNDS = 3
E2E_WINDOW_S = 0.3  # seconds of timed steps per end-to-end item per round
E2E_ANCHORS = 2
SEQUENCE_S = 2.0  # a step's sequence timed again for this long
MAX_FLAGGED = 24  # kernels re-measured at most (the largest changes first); the rest keep their verdicts
POINT_SHARE = 0.05  # a flagged point's kernels with at least this share of its step are re-measured


def why_not_confirmable(c: Comparison, new: RunResult) -> str | None:
    """None when the flagged kernels of `new` can be measured again here; else why not."""
    from tokprof.profiler.devices import detect_device, git_sha

    if c.cross_generation:
        return "a cross-generation comparison: raw times of another GPU cannot be measured here"
    info = new.provenance.device
    try:
        here = detect_device(torch.device(info.kind)).name
    except (RuntimeError, ValueError) as err:
        return f"the new run's device ({info.name}) is not available here ({err})"
    if here != info.name:
        return f"the new run was made on {info.name}, this machine has {here}"
    now, then = git_sha(), new.provenance.git_sha
    if now and then and now.removesuffix("+dirty") != then.removesuffix("+dirty"):
        return f"the new run was made at commit {then[:12]}, this checkout is at {now[:12]}"
    return None


def _log_change(r: Row) -> float:
    return math.log(r.new / r.base)


def _choose(c: Comparison, new: RunResult) -> tuple[list[Row], list[Row], dict[tuple, Row]]:
    """(flagged kernel rows, anchor rows, every gating kernel time row by key)."""
    rows = {r.key: r for r in c.rows if r.gating and r.kind == "kernel" and r.metric == "time us" and r.key}
    flagged = {k: r for k, r in rows.items() if r.verdict != SAME}
    points = measured_points(new)
    for r in c.rows:
        if r.gating and r.kind == "point" and r.metric == "time us" and r.verdict != SAME and r.key in points:
            for key, share in point_kernels(points[r.key]):
                if share >= POINT_SHARE and key in rows:
                    flagged.setdefault(key, rows[key])
    chosen = sorted(flagged.values(), key=lambda r: -abs(r.delta))[:MAX_FLAGGED]
    center = math.log(1.0 + c.drift.delta) if c.drift is not None else 0.0
    anchors = sorted((r for k, r in rows.items() if k not in flagged and r.verdict == SAME),
                     key=lambda r: abs(_log_change(r) - center))
    return chosen, anchors, rows


def measured_points(run: RunResult) -> dict[tuple, dict[str, Any]]:
    """The run's measured roll-up points by comparison key, in the run's order."""
    return {p_key(p): p for p in run.rollup if p.get("provenance") == "measured"}


def p_key(p: dict[str, Any]) -> tuple:
    """A roll-up point's comparison key (tokprof.reports.observations)."""
    return ("point", p.get("model"), p.get("batch"), p.get("context"), p.get("dtype"), p.get("backend"),
            p.get("tp") or 1)


def point_kernels(p: dict[str, Any]) -> list[tuple[tuple, float]]:
    """(kernel comparison key, share of the step) for each op of roll-up point `p`."""
    out = []
    for o in p.get("ops") or []:
        shape = o.get("shape") if isinstance(o.get("shape"), dict) else {}
        out.append((("kernel", o.get("op"), tuple(sorted(shape.items())), p.get("dtype"), p.get("backend")),
                    float(o.get("share") or 0.0)))
    return out


def _inputs(key: tuple, device: torch.device) -> tuple[Any, Any]:
    """(call, inputs) of the kernel with comparison key ("kernel", op, shape items, dtype, backend)."""
    from tokprof.kernels._common import parse_dtype
    from tokprof.profiler.bench import _run_op, get_op

    _, op, shape, dtype, backend = key
    rec = get_op(op)
    inputs = rec.make_inputs(rec.full_shape(dict(shape)), parse_dtype(dtype), device, 0)
    rec.run(inputs, backend)  # every argument check once, a compilation where there is one
    return functools.partial(_run_op, rec, backend), inputs


def _alone_rounds(kernels: Sequence[KernelMeasurement], device: torch.device, rounds: int,
                  window_s: float) -> list[list[float]]:
    """Per kernel, its median time in each of `rounds` rounds; the kernels one after the other in each round."""
    from tokprof.kernels._common import skip_value_checks
    from tokprof.profiler import timing

    prepared = [_inputs(("kernel", *k.key()), device) for k in kernels]
    flush = 2 * (timing.cpu_cache_bytes() or 0) if device.type == "cpu" else 0
    out: list[list[float]] = [[] for _ in kernels]
    with skip_value_checks():
        for _ in range(rounds):
            for i, (k, (call, inputs)) in enumerate(zip(kernels, prepared, strict=True)):
                t = timing.measure(call, inputs, device=device, mode="graph" if k.timing.mode == "graph" else
                                   "events", cold_l2=k.timing.cold_l2, warmup_ms=5.0, min_samples=5,
                                   min_time_s=window_s, max_time_s=window_s,
                                   cpu_flush_bytes=flush if k.timing.cold_l2 else 0)
                out[i].append(t.median_us)
    return out


def _sequence_times(point: dict[str, Any], device: torch.device, rounds: int) -> dict[tuple, float]:
    """The point's calls round-robin again (timing.measure_sequence): median per kernel key."""
    from tokprof.kernels._common import skip_value_checks
    from tokprof.profiler import timing

    keys = [key for key, _ in point_kernels(point)]
    seq = [_inputs(key, device) for key in keys]
    per_call_s = SEQUENCE_S / len(seq)  # measure_sequence's budgets are per call
    with skip_value_checks():
        timings = timing.measure_sequence(seq, device=device, min_samples=rounds, min_time_s=per_call_s,
                                          max_time_s=per_call_s)
    return {key: t.median_us for key, t in zip(keys, timings, strict=True)}


def _judge(r: Row, change: float, how: str) -> None:
    """Re-judge row `r` by its confirmed change (module docstring). A SAME row (re-measured as a part of a flagged
    point) keeps its verdict: its change only feeds the point's."""
    first = r.verdict
    r.confirmed_delta = change
    if first == SAME:
        r.note = (r.note + "; " if r.note else "") + f"re-measured {how} for its point: {change:+.1%}"
        return
    if abs(change) <= r.tolerance:
        r.verdict = SAME
        word = f"not confirmed ({first} before)"
    elif r.kind == "e2e" and abs(change) < CPU_E2E_PROCESS_NOISE and first == AMBIGUOUS:
        word = "still within a CPU end-to-end point's between-process noise"
    elif (change > 0) == (r.delta > 0):
        # never escalated: an AMBIGUOUS row (overlapping samples, within the drift, below a CPU's resolution)
        # stays AMBIGUOUS; a re-measurement only confirms or withdraws a verdict
        word = "confirmed" if first in (SLOW, FAST) else f"still {first}"
    else:
        r.verdict = AMBIGUOUS
        word = f"the other way when re-measured ({first} before)"
    r.note = (r.note + "; " if r.note else "") + f"re-measured {how}: {change:+.1%} against the base, {word}"


def _geomean(xs: Sequence[float]) -> float:
    return float(math.exp(np.mean(np.log(xs))))


def confirm_comparison(c: Comparison, new: RunResult, *, rounds: int = CONFIRM_ROUNDS,
                       window_s: float = CONFIRM_WINDOW_S) -> list[str]:
    """Re-measure `c`'s flagged kernels of `new` here and re-judge them and the flagged roll-up points (module
    docstring); returns notes (also appended to c.notes). Nothing is measured when nothing is flagged."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds: expected a positive int, got {rounds!r}")
    if not (isinstance(window_s, (int, float)) and 0 < window_s <= 10):
        raise ValueError(f"window_s: expected seconds in (0, 10], got {window_s!r}")
    flagged_points = [r for r in c.rows if r.gating and r.kind == "point" and r.verdict != SAME]
    if not any(r.gating and r.kind in ("kernel", "e2e") and r.verdict != SAME for r in c.rows) and not flagged_points:
        return []
    notes: list[str] = []
    why = why_not_confirmable(c, new)
    if why is not None:
        notes.append(f"flagged items not re-measured: {why}")
        c.notes.extend(notes)
        return notes
    chosen, anchors, rows = _choose(c, new)
    device = torch.device(new.provenance.device.kind)
    by_key = {("kernel", *k.key()): k for k in reversed(new.kernels)}
    alone = [r for r in chosen if by_key.get(r.key) is not None and by_key[r.key].timing.mode != "sequence"]
    in_seq = [r for r in chosen if by_key.get(r.key) is not None and by_key[r.key].timing.mode == "sequence"]
    confirmed: dict[tuple, float] = {}
    if alone:
        picks = [a for a in anchors if by_key.get(a.key) is not None and by_key[a.key].timing.mode != "sequence"]
        picks = picks[:ANCHORS]
        if not picks:
            notes.append(f"{len(alone)} flagged kernel(s) not re-measured: no SAME kernel to anchor them")
        else:
            times = _alone_rounds([by_key[r.key] for r in alone + picks], device, rounds, window_s)
            anchor_now = [_geomean([times[len(alone) + j][i] for j in range(len(picks))]) for i in range(rounds)]
            anchor_base = _geomean([a.base for a in picks])
            for i, r in enumerate(alone):
                now = float(np.median([times[i][n] / anchor_now[n] for n in range(rounds)]))
                confirmed[r.key] = now / (r.base / anchor_base) - 1.0
                _judge(r, confirmed[r.key], f"alone, interleaved with {len(picks)} anchor kernel(s) over {rounds} "
                                            "rounds")
    if in_seq:
        for r in in_seq:
            point = next((p for p in measured_points(new).values() if r.key in dict(point_kernels(p))), None)
            if point is None:
                notes.append(f"{r.item}: not re-measured, no roll-up point of the run holds it")
                continue
            mates = [rows[k] for k, _ in point_kernels(point) if k in rows and k != r.key
                     and rows[k].verdict == SAME and k not in {x.key for x in chosen}]
            if not mates:
                notes.append(f"{r.item}: not re-measured, no SAME kernel in its step's sequence to anchor it")
                continue
            times = _sequence_times(point, device, rounds)
            anchor_now = _geomean([times[m.key] for m in mates])
            anchor_base = _geomean([m.base for m in mates])
            confirmed[r.key] = (times[r.key] / anchor_now) / (r.base / anchor_base) - 1.0
            _judge(r, confirmed[r.key], f"in its step's sequence (batch {point.get('batch')}, context "
                                        f"{point.get('context')}), against {len(mates)} SAME kernel(s) of it")
    points = measured_points(new)
    for r in flagged_points:
        p = points.get(r.key)
        parts = point_kernels(p) if p is not None else []
        if not parts or not any(k in confirmed for k, _ in parts):
            continue
        change = sum(share * confirmed.get(k, rows[k].delta if k in rows else 0.0) for k, share in parts)
        _judge(r, change, "from its kernels' changes (the re-measured ones confirmed), weighted by their share "
                          "of the step")
    e2e_done = _confirm_e2e(c, new, notes)
    if confirmed or e2e_done:
        notes.append(f"re-measured here {len(confirmed)} flagged kernel(s) and {e2e_done} end-to-end item(s) before "
                     "judging (docs/measurement.md, 'Regression verdicts')")
    c.notes.extend(notes)
    return notes


def _e2e_record(new: RunResult, key: tuple) -> dict[str, Any] | None:
    from tokprof.models.e2e import e2e_key

    return next((e for e in new.e2e if ("e2e", *e2e_key(e)) == key), None)


def _e2e_now(model: Any, rec: dict[str, Any]) -> float:
    """The median step of end-to-end item `rec` measured again now, for E2E_WINDOW_S (no energy, no profile)."""
    from tokprof.models.e2e import measure_e2e

    block = int(rec["context_last"]) - int(rec["context_first"]) + 1
    kw = {"steps": block, "warmup": int(rec.get("warmup_steps") or 2), "energy": False, "profile": False,
          "cpu_window_s": E2E_WINDOW_S}
    if rec["framework"] == "transformers":
        from tokprof.models.adapters import measure_transformers

        return measure_transformers(model, rec["batch"], rec["context"], **kw).median_step_us
    return measure_e2e(model, rec["batch"], rec["context"], mode=rec["mode"], **kw).median_step_us


def _confirm_e2e(c: Comparison, new: RunResult, notes: list[str]) -> int:
    """Re-measure the flagged end-to-end items of tokprof and transformers against SAME ones; returns how many."""
    rows = [r for r in c.rows if r.gating and r.kind == "e2e" and r.metric == "time us" and r.key]
    flagged = [r for r in rows if r.verdict != SAME and (_e2e_record(new, r.key) or {}).get("framework")
               in ("tokprof", "transformers")]
    if not flagged:
        return 0
    center = math.log(1.0 + c.e2e_drift.delta) if c.e2e_drift is not None else 0.0
    anchors = sorted((r for r in rows if r.verdict == SAME and (_e2e_record(new, r.key) or {}).get("framework")
                      in ("tokprof", "transformers")), key=lambda r: abs(_log_change(r) - center))[:E2E_ANCHORS]
    if not anchors:
        notes.append(f"{len(flagged)} flagged end-to-end item(s) not re-measured: no SAME end-to-end item to anchor")
        return 0
    if not new.model:
        notes.append("flagged end-to-end items not re-measured: the new run records no model")
        return 0
    from tokprof.models.config import ModelConfig
    from tokprof.models.transformer import Transformer

    first = _e2e_record(new, flagged[0].key)
    backend = next((e["backend"] for e in new.e2e if e["framework"] == "tokprof"), "torch")
    model = Transformer.random(ModelConfig.from_dict(new.model), device=new.provenance.device.kind,
                               dtype=first["dtype"], backend=backend)
    times: dict[tuple, list[float]] = {r.key: [] for r in flagged + anchors}
    for _ in range(E2E_ROUNDS):
        for r in flagged + anchors:
            times[r.key].append(_e2e_now(model, _e2e_record(new, r.key)))
    anchor_base = _geomean([a.base for a in anchors])
    for r in flagged:
        ratios = [times[r.key][i] / _geomean([times[a.key][i] for a in anchors]) for i in range(E2E_ROUNDS)]
        change = float(np.median(ratios)) / (r.base / anchor_base) - 1.0
        _judge(r, change, f"end to end, interleaved with {len(anchors)} SAME end-to-end item(s) over {E2E_ROUNDS} "
                          "rounds")
    return len(flagged)

