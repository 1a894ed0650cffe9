"""The throughput-interactivity frontier of a sweep, and the cost per million tokens at a target interactivity.

InferenceX plots tokens/s per GPU (throughput, what the operator sells) against tokens/s per user (interactivity,
what each user sees). Batching trades one for the other; the frontier keeps the points no other point beats on both.

    front = pareto_frontier(points, context=8192)
    at_50 = cost_at_interactivity(points, 50.0, context=8192)   # InteractivityCost, provenance "interpolated"

Points that do not fit in memory are left out (the frontier stops at capacity). Between two frontier points the
throughput is interpolated linearly in interactivity (a batch size between the two
measured ones would land near that line) and labelled `interpolated`; outside the sweep nothing is extrapolated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokprof.rollup.economics import check_positive, cost_per_million_tokens
from tokprof.rollup.records import RollupPoint


def _select(points: list[RollupPoint], context: int | None) -> list[RollupPoint]:
    if not points:
        raise ValueError("points: expected at least one roll-up point, got none")
    contexts = sorted({p.context for p in points})
    if context is None:
        if len(contexts) > 1:
            raise ValueError(f"context: the points span contexts {contexts}; a frontier compares one context, "
                             "pass context=")
        return list(points)
    chosen = [p for p in points if p.context == context]
    if not chosen:
        raise ValueError(f"context: expected one of the sweep's contexts {contexts}, got {context!r}")
    return chosen


def pareto_frontier(points: list[RollupPoint], context: int | None = None) -> list[RollupPoint]:
    """The points not beaten on both tokens/s per GPU and tokens/s per user, by rising interactivity. Points that
    do not fit in memory (infeasible_reason) have no throughput: the frontier stops at capacity."""
    chosen = [p for p in _select(points, context) if p.infeasible_reason is None]
    front = []
    for p in chosen:
        beaten = any(q.tokens_per_s_per_gpu >= p.tokens_per_s_per_gpu
                     and q.tokens_per_s_per_user >= p.tokens_per_s_per_user
                     and (q.tokens_per_s_per_gpu > p.tokens_per_s_per_gpu
                          or q.tokens_per_s_per_user > p.tokens_per_s_per_user)
                     for q in chosen)
        if not beaten:
            front.append(p)
    front.sort(key=lambda p: (p.tokens_per_s_per_user, -p.tokens_per_s_per_gpu))
    return front


@dataclass
class InteractivityCost:
    target_tokens_per_s_per_user: float
    context: int
    tokens_per_s_per_gpu: float | None
    usd_per_gpu_hour: float | None
    usd_per_million_tokens: float | None
    provenance: str | None  # "interpolated" between two frontier points, else the matching point's own provenance
    between: list[int] = field(default_factory=list)  # the batch sizes of the frontier points used
    reason: str | None = None  # why the figures are None


def cost_at_interactivity(points: list[RollupPoint], target_tokens_per_s_per_user: float,
                          context: int | None = None, usd_per_gpu_hour: float | None = None) -> InteractivityCost:
    """Throughput and cost per million tokens on the frontier at a target tokens/s per user.

    The price is `usd_per_gpu_hour` if given, else the points' own (they must agree)."""
    target = check_positive("target_tokens_per_s_per_user", target_tokens_per_s_per_user)
    front = pareto_frontier(points, context)
    if not front:
        ctx = context if context is not None else points[0].context
        return InteractivityCost(target_tokens_per_s_per_user=target, context=ctx, tokens_per_s_per_gpu=None,
                                 usd_per_gpu_hour=usd_per_gpu_hour, usd_per_million_tokens=None, provenance=None,
                                 reason=f"no point of the sweep fits in memory at context {ctx}")
    ctx = front[0].context
    if usd_per_gpu_hour is None:
        prices = {p.usd_per_gpu_hour for p in front}
        if len(prices) > 1:
            raise ValueError(f"points: priced at different $/GPU-h {sorted(p for p in prices if p is not None)}; "
                             "pass usd_per_gpu_hour")
        usd_per_gpu_hour = prices.pop()
    else:
        usd_per_gpu_hour = check_positive("usd_per_gpu_hour", usd_per_gpu_hour)
    result = InteractivityCost(target_tokens_per_s_per_user=target, context=ctx, tokens_per_s_per_gpu=None,
                               usd_per_gpu_hour=usd_per_gpu_hour, usd_per_million_tokens=None, provenance=None)
    low, high = front[0].tokens_per_s_per_user, front[-1].tokens_per_s_per_user
    if not low <= target <= high:
        result.reason = (f"target {target:g} tokens/s per user is outside the sweep's frontier "
                         f"[{low:.4g}, {high:.4g}] at context {ctx}; tokprof does not extrapolate")
        return result
    exact = [p for p in front if p.tokens_per_s_per_user == target]
    if exact:  # a measured (or modelled, projected) point sits on the target: no interpolation
        result.tokens_per_s_per_gpu, result.provenance, result.between = (exact[0].tokens_per_s_per_gpu,
                                                                          exact[0].provenance, [exact[0].batch])
    else:
        a, b = next((a, b) for a, b in zip(front, front[1:], strict=False)
                    if a.tokens_per_s_per_user < target < b.tokens_per_s_per_user)
        w = (target - a.tokens_per_s_per_user) / (b.tokens_per_s_per_user - a.tokens_per_s_per_user)
        result.tokens_per_s_per_gpu = a.tokens_per_s_per_gpu + w * (b.tokens_per_s_per_gpu - a.tokens_per_s_per_gpu)
        result.provenance = "interpolated"
        result.between = [a.batch, b.batch]
    if usd_per_gpu_hour is None:
        result.reason = "no $/GPU-hour on the points; pass usd_per_gpu_hour"
    else:
        result.usd_per_million_tokens = cost_per_million_tokens(usd_per_gpu_hour, result.tokens_per_s_per_gpu)
    return result
