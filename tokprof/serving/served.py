"""L5 of the iceberg, "served": what a continuous-batching server delivers under a workload, and why it is below L4.

- measured: from a serve-bench run of tokprof's server (`bench` document) for the point's model, device and batch
  (the server's max_num_seqs): its measured operating point at the highest swept rate that met the SLO;
- predicted: otherwise, the simulator (tokprof.serving.simulator) with step times from the run's own measurements:
  the decode steps measured over the run's batches and contexts (end to end, else the kernel sum), interpolated; a
  prefill chunk of n tokens costed as a decode step of n rows at the smallest measured context (its GEMM rows
  dominate); Poisson arrivals of requests whose context ends at the point's context (prompt = context - output,
  output = min(128, context / 2)), 32 requests, the highest rate that meets the SLO found by bisection.

The L4 -> L5 gap is split into its causes, in seconds of the served run and as shares of the gap:
    idle between arrivals     time with no request in flight
    batching below capacity   decode time beyond what the same tokens cost at the full batch at L4's step time
    prefill interference      the part of steps that prefill chunks cost (new prompts), less L4's time for the
                              first tokens they sample
    preemption                the prefill cost of recomputing preempted requests
    other                     the remainder (scheduler host time, context lengths off the point's), may be < 0
`reconcile(run, served=provider(...))` fills L5 with this; a stated utilisation stays an explicit override.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from tokprof.serving.engine import ServeRun
from tokprof.serving.metrics import Slo
from tokprof.serving.step_time import MeasuredStepTable, StepShape, StepTimeModel

GAP_CAUSES = ("idle between arrivals", "batching below capacity", "prefill interference", "preemption", "other")
DEFAULT_GPU_SLO = Slo(ttft_s=2.0, tpot_s=0.05)


@dataclass
class GapCause:
    name: str
    seconds: float
    share: float | None  # of the whole L4 -> L5 gap in time (sums to 1 over the causes)
    tokens_per_s: float | None  # the share times the gap in tokens/s


@dataclass
class ServedL5:
    tokens_per_s_per_gpu: float | None
    provenance: str | None  # "measured" (the server) or "modelled" (the simulator's prediction)
    source: str
    reason: str | None = None
    rate_per_s: float | None = None
    causes: list[GapCause] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gap_split(run: ServeRun, step_time: StepTimeModel, l4_step_s: float, batch: int,
              l4_tokens_per_s: float | None = None) -> list[GapCause]:
    """Split the served run's time beyond the L4 ideal (its output tokens at batch `batch` and L4's step time) into
    the causes above; each step's measured time is shared out in proportion to the step-time model's parts."""
    s = run.summary
    ideal_s = s.output_tokens * l4_step_s / batch
    idle = s.idle_s
    batching = prefill = preempt = 0.0
    for st in run.steps:
        shape = StepShape.of_record(st)
        total = step_time.step_time_s(shape)
        decode_only = step_time.step_time_s(shape.decode_only()) if st.num_decode else 0.0
        scale = st.time_s / total if total > 0 else 1.0
        pre = max(0.0, total - decode_only) * scale if st.num_prefill_tokens else 0.0
        rec = pre * st.recompute_tokens / st.num_prefill_tokens if st.num_prefill_tokens else 0.0
        preempt += rec
        prefill += pre - rec
        batching += st.time_s - pre - st.num_decode * l4_step_s / batch
    # tokens sampled by prefill chunks (first tokens) count in the ideal too: their share of L4's time is credited
    # back to the prefill that made them, so that with exact step times `other` is 0
    prefill -= (s.output_tokens - sum(st.num_decode for st in run.steps)) * l4_step_s / batch
    gap = s.duration_s - ideal_s
    other = gap - idle - batching - prefill - preempt
    gap_tps = None
    if l4_tokens_per_s is not None:
        gap_tps = l4_tokens_per_s - s.output_tokens_per_s_per_gpu
    out = []
    for name, sec in zip(GAP_CAUSES, (idle, batching, prefill, preempt, other), strict=True):
        share = sec / gap if gap > 0 else None
        out.append(GapCause(name, sec, share, share * gap_tps if share is not None and gap_tps is not None else None))
    return out


# ------------------------------------------------------------------------------------------- from a run's figures


def run_step_table(run: Any, model: str, gpu: str, dtype: str) -> tuple[MeasuredStepTable | None, str]:
    """A decode step table from the run's end-to-end steps (tokprof eager/graph of one mode, the most points),
    else its roll-up points (kernel sums), over the batches x contexts present for every batch."""
    from tokprof.models.e2e import E2EMeasurement
    from tokprof.rollup.records import points_from_run

    groups: dict[str, dict[tuple[int, int], float]] = {}
    for d in run.e2e:
        m = E2EMeasurement.from_dict(d)
        if (m.model, m.gpu, m.dtype) == (model, gpu, dtype):
            groups.setdefault(f"end to end, {m.framework} {m.mode}", {})[(m.batch, m.context)] = m.median_step_us
    for p in points_from_run(run.rollup):
        if (p.model, p.gpu, p.dtype, p.tp) == (model, gpu, dtype, 1) and p.step_time_us:
            groups.setdefault(f"kernel sum ({p.provenance})", {})[(p.batch, p.context)] = p.step_time_us
    if not groups:
        return None, f"no end-to-end or roll-up step time for {model} on {gpu} ({dtype}) to simulate with"
    label, grid = max(groups.items(), key=lambda kv: (kv[0].startswith("end to end"), len(kv[1])))
    batches = sorted({b for b, _ in grid})
    contexts = sorted(c for c in {c for _, c in grid} if all((b, c) in grid for b in batches))
    if not contexts:  # no context measured at every batch: keep the batches of the most common context
        ctx = max({c for _, c in grid}, key=lambda c: sum((b, c) in grid for b in batches))
        batches, contexts = [b for b in batches if (b, ctx) in grid], [ctx]
    decode_s = [[grid[(b, c)] * 1e-6 for c in contexts] for b in batches]
    table = MeasuredStepTable(batches, contexts, decode_s, chunks=list(batches),
                              prefill_s=[row[0] for row in decode_s], device=gpu, repeats=0,
                              notes=[f"decode steps from the run's {label}; a prefill chunk of n tokens costed as a "
                                     "decode step of n rows at the smallest context"])
    return table, label


def meets(run: ServeRun, rate: float | None = None) -> bool:
    """The run met its SLO and kept up with its arrivals: requests finished at >= 95% of the rate they arrived at
    (each measured from its first to its last event), so a finite burst past saturation, whose short queue can
    still meet a TTFT target, does not count."""
    if not run.summary.slo_met:
        return False
    arrivals = sorted(r.arrival_s for r in run.requests)
    finishes = sorted(r.finish_s for r in run.requests)
    if len(arrivals) < 3 or arrivals[-1] <= arrivals[0]:
        return True
    arrival_rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    finish_rate = (len(finishes) - 1) / max(finishes[-1] - finishes[0], 1e-12)
    return finish_rate >= 0.95 * arrival_rate


def max_rate_meeting_slo(make: Callable[[float], ServeRun], hi_rate: float, *,
                         iterations: int = 10) -> tuple[float | None, ServeRun | None]:
    """Bisection on the request rate: the highest rate whose run (from `make(rate)`) meets its SLO at a sustained
    rate (`meets`), with that run. None when even hi_rate / 2^iterations fails."""
    lo, best = 0.0, None
    hi = hi_rate
    run = make(hi)
    if meets(run, hi):  # past the guess: grow it
        for _ in range(8):
            lo, best = hi, run
            hi *= 2
            run = make(hi)
            if not meets(run, hi):
                break
        else:
            return lo, best
    for _ in range(iterations):
        mid = (lo + hi) / 2
        run = make(mid)
        if meets(run, mid):
            lo, best = mid, run
        else:
            hi = mid
    if best is None:
        return None, None
    return lo, best


def predicted_l5(run: Any, model: str, gpu: str, dtype: str, batch: int, context: int, l4_step_us: float, *,
                 slo: Slo | None = None, num_requests: int = 32, seed: int = 0) -> ServedL5:
    """L5 predicted by the simulator from the run's own step times (see the module docstring)."""
    from tokprof.serving import loadgen
    from tokprof.serving.scheduler import SchedulerConfig
    from tokprof.serving.simulator import Overhead, simulate

    table, label = run_step_table(run, model, gpu, dtype)
    if table is None:
        return ServedL5(None, None, "", reason=label)
    cpu = run.provenance.device.kind == "cpu"
    slo = slo or (Slo(ttft_s=10.0, tpot_s=1.0) if cpu else DEFAULT_GPU_SLO)
    out_len = max(1, min(128, context // 2))
    in_len = max(1, context - out_len)
    block = 16
    cfg = SchedulerConfig(num_blocks=batch * (-(-(context + 1) // block)) + batch, block_size=block,
                          max_num_seqs=batch, max_num_batched_tokens=max(512, batch))
    inp, outp = loadgen.LengthDist("fixed", in_len), loadgen.LengthDist("fixed", out_len)
    step_s = l4_step_us * 1e-6
    capacity = batch / (out_len * step_s)  # requests/s if every step were a full-batch decode step at L4

    def make(rate: float) -> ServeRun:
        wl = loadgen.poisson(rate, num_requests, inp, outp, vocab_size=1 << 16, seed=seed)
        return simulate(wl, cfg, table, slo, overhead=Overhead(stated_s=0.0))

    rate, sim = max_rate_meeting_slo(make, capacity, iterations=6)
    src = (f"predicted by the simulator: Poisson arrivals of {in_len}-token prompts and {out_len}-token outputs, "
           f"max {batch} running, at the highest rate meeting {slo.describe()}; step times from the run's {label}")
    if sim is None:
        return ServedL5(None, None, src, reason=f"no request rate meets {slo.describe()} with these step times")
    tps = sim.summary.output_tokens_per_s_per_gpu
    causes = gap_split(sim, table, step_s, batch, batch / step_s)
    return ServedL5(tps, "modelled", src + f" ({rate:.3g} req/s)", rate_per_s=rate, causes=causes)


def measured_l5(bench: Mapping[str, Any], batch: int, l4_step_us: float) -> ServedL5 | None:
    """L5 measured by a serve-bench document whose server ran at max_num_seqs == batch, else None."""
    if bench.get("options", {}).get("max_num_seqs") != batch or not bench.get("points"):
        return None
    table = MeasuredStepTable.from_dict(bench["table"]) if bench.get("table") else None
    ok = [p for p in bench["points"] if p.get("measured") and p["measured"]["slo_met"]]
    if not ok:
        return ServedL5(None, None, "serve-bench (measured)",
                        reason=f"no swept rate met the SLO ({bench.get('slo_text', '')})")
    best = max(ok, key=lambda p: p["rate_per_s"])
    m = best["measured"]
    causes = [GapCause(**c) for c in best.get("causes_measured", [])]
    return ServedL5(m["output_tokens_per_s_per_gpu"], "measured",
                    f"tokprof's server (serve-bench) at {best['rate_per_s']:.3g} req/s, the highest swept rate that "
                    f"met {bench.get('slo_text', 'the SLO')}", rate_per_s=best["rate_per_s"], causes=causes,
                    notes=[] if table is not None else ["no step table: gap causes unsplit"])


def provider(bench: Mapping[str, Any] | None = None, *, slo: Slo | None = None) -> Callable[..., dict[str, Any]]:
    """The hook `tokprof.rollup.reconcile.reconcile(run, served=...)` calls per point:
    (run, key, l4_step_us) -> the L5 fields as a dict (ServedL5.to_dict())."""

    def served(run: Any, key: tuple, l4_step_us: float) -> dict[str, Any]:
        model, gpu, batch, context, dtype, tp = key
        if tp != 1:
            return ServedL5(None, None, "", reason="the served layer is single-GPU (tp = 1)").to_dict()
        if bench is not None and bench.get("model") == model and bench.get("gpu") == gpu:
            found = measured_l5(bench, batch, l4_step_us)
            if found is not None:
                return found.to_dict()
        return predicted_l5(run, model, gpu, dtype, batch, context, l4_step_us, slo=slo).to_dict()

    return served
