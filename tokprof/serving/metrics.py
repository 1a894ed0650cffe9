"""Latency and throughput of a served run: per request TTFT, TPOT, inter-token latencies and end-to-end latency;
per run tokens/s per GPU and per user, percentiles, goodput under an SLO, and the per-step record the L5 gap split
reads. The same summary comes from the server (measured) and from the simulator (predicted).

Definitions (as vLLM's benchmark_serving and DistServe's goodput):
- TTFT: first token time - arrival time (queueing included);
- TPOT: (finish - first token) / (output tokens - 1), per request (None for a 1-token output);
- ITL: gaps between consecutive tokens of a request;
- tokens/s per GPU: output tokens of the run / its duration (first arrival to last finish), one GPU;
- tokens/s per user: the median over requests of 1 / TPOT;
- goodput: requests per second (and their output tokens per second) that met both TTFT <= slo.ttft_s and
  TPOT <= slo.tpot_s; `slo_met`: the run's `slo.percentile` TTFT and TPOT both within the SLO.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tokprof.serving.scheduler import Request

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float
    percentile: float = 90.0

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"slo.{name}: expected a positive number of seconds, got {value!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"slo.percentile: expected a percentile in (0, 100], got {self.percentile!r}")

    def describe(self) -> str:
        return f"TTFT <= {self.ttft_s * 1e3:g} ms and TPOT <= {self.tpot_s * 1e3:g} ms at p{self.percentile:g}"


@dataclass
class RequestMetrics:
    request_id: int
    session: int
    turn: int
    arrival_s: float
    prompt_len: int
    output_len: int
    cached_tokens: int
    preemptions: int
    ttft_s: float
    tpot_s: float | None
    e2e_s: float
    itl_s: list[float]

    @classmethod
    def of(cls, req: Request) -> RequestMetrics:
        if req.first_token_s is None or req.finish_s is None:
            raise ValueError(f"request {req.request_id}: not finished, no latency to report")
        n = len(req.output)
        times = req.token_times_s
        return cls(req.request_id, req.session, req.turn, req.arrival_s, len(req.prompt), n, req.cached_tokens,
                   req.preemptions, req.first_token_s - req.arrival_s,
                   (req.finish_s - req.first_token_s) / (n - 1) if n > 1 else None, req.finish_s - req.arrival_s,
                   [b - a for a, b in zip(times, times[1:], strict=False)])


@dataclass
class StepRecord:
    start_s: float
    end_s: float
    num_decode: int
    num_prefill_tokens: int
    num_prefill_seqs: int
    decode_context_mean: float
    prefill_context_tokens: int
    recompute_tokens: int  # prefill tokens of requests recomputing after a preemption
    decode_context_max: int = 0

    @property
    def time_s(self) -> float:
        return self.end_s - self.start_s


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}


@dataclass
class ServeSummary:
    provenance: str  # "measured" (the server loop) or "predicted" (the simulator)
    requests: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    preemptions: int
    busy_s: float  # time in steps
    idle_s: float  # time with nothing to run (waiting for arrivals)
    steps: int
    output_tokens_per_s_per_gpu: float
    tokens_per_s_per_user: float | None
    request_rate_per_s: float
    ttft_s: dict[str, float | None]
    tpot_s: dict[str, float | None]
    itl_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    median_tpot_s: float | None
    slo: dict[str, float]
    slo_met: bool
    goodput_requests_per_s: float
    goodput_tokens_per_s: float
    mean_decode_batch: float
    energy_j: float | None = None
    j_per_token: float | None = None
    energy_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(requests: Sequence[Request], steps: Sequence[StepRecord], slo: Slo, *, provenance: str,
              energy_j: float | None = None, energy_reason: str | None = None) -> ServeSummary:
    if not requests:
        raise ValueError("requests: expected at least one finished request to summarise, got none")
    rows = [RequestMetrics.of(r) for r in requests]
    start = min(r.arrival_s for r in rows)
    end = max(r.finish_s for r in requests)
    duration = max(end - start, 1e-9)
    out_tokens = sum(r.output_len for r in rows)
    tpots = [r.tpot_s for r in rows if r.tpot_s is not None]
    ttfts = [r.ttft_s for r in rows]
    q = slo.percentile
    ttft_q = float(np.percentile(ttfts, q))
    tpot_q = float(np.percentile(tpots, q)) if tpots else 0.0
    good = [r for r in rows if r.ttft_s <= slo.ttft_s and (r.tpot_s is None or r.tpot_s <= slo.tpot_s)]
    busy = sum(s.time_s for s in steps)
    median_tpot = float(np.median(tpots)) if tpots else None
    decode_steps = [s for s in steps if s.num_decode]
    return ServeSummary(
        provenance=provenance, requests=len(rows), duration_s=duration,
        input_tokens=sum(r.prompt_len for r in rows), output_tokens=out_tokens,
        cached_tokens=sum(r.cached_tokens for r in rows), preemptions=sum(r.preemptions for r in rows),
        busy_s=busy, idle_s=max(0.0, duration - busy), steps=len(steps),
        output_tokens_per_s_per_gpu=out_tokens / duration,
        tokens_per_s_per_user=float(np.median([1.0 / t for t in tpots if t > 0])) if tpots else None,
        request_rate_per_s=len(rows) / duration,
        ttft_s=percentiles(ttfts), tpot_s=percentiles(tpots), itl_s=percentiles([x for r in rows for x in r.itl_s]),
        e2e_s=percentiles([r.e2e_s for r in rows]), median_tpot_s=median_tpot,
        slo={"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "percentile": slo.percentile},
        slo_met=ttft_q <= slo.ttft_s and tpot_q <= slo.tpot_s,
        goodput_requests_per_s=len(good) / duration, goodput_tokens_per_s=sum(r.output_len for r in good) / duration,
        mean_decode_batch=(sum(s.num_decode for s in decode_steps) / len(decode_steps)) if decode_steps else 0.0,
        energy_j=energy_j, j_per_token=energy_j / out_tokens if energy_j is not None else None,
        energy_reason=energy_reason)
