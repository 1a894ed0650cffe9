"""The cost of waking up: a server's first step after it slept waiting for an arrival is slower than the same step
run back to back, and the simulator's table times steps back to back.

    wake = measure_wake_penalty(server.runner, plan, before)   # a prefill step (the first after idle), after `before`
    wake(0.02)                                      # step time after 20 ms asleep / back to back, e.g. 1.3
    simulate(workload, cfg, table, slo, wake=wake)  # a step that starts after an idle gap is scaled by it

Why: on the 2-core CPU a 64-token prefill step took 1.10x its back-to-back time after a 0.2 ms sleep, 1.23x after
5 ms and 1.6x after 20-50 ms (a one-row decode step 1.4x after 5 ms, 1.7-1.9x after 20-50 ms): caches, TLBs and
the core's clock have moved on while the thread slept. Paired in the server loop, its first steps after idle ran
1.22-1.25x the same steps replayed right after them. The factor is measured after a different step, with and
without the sleep, as in a server (whose step after idle follows another step): only the sleep differs between the
two timings. At a low request rate nearly every request arrives at an idle server, so its TTFT is one such step:
the simulator read p90 TTFT 5-17% low at 0.25 x capacity before this.

The factors are measured, interleaved (each round times a back-to-back step, then one after each gap), medians of
the rounds; between the measured gaps the factor is linear, from 1.0 at no gap, and held past the longest gap.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tokprof.serving.step_time import brackets

WAKE_GAPS_S = (0.001, 0.005, 0.02, 0.05)


@dataclass
class WakePenalty:
    """Step time after sleeping `gaps_s[i]` seconds over the same step back to back: `factors[i]`."""

    gaps_s: list[float]
    factors: list[float]
    how: str = ""

    def __post_init__(self) -> None:
        if not self.gaps_s or len(self.gaps_s) != len(self.factors) or sorted(self.gaps_s) != list(self.gaps_s):
            raise ValueError(f"gaps_s, factors: expected increasing gaps and one factor each, got {self.gaps_s!r} "
                             f"and {self.factors!r}")
        if self.gaps_s[0] <= 0 or any(not f > 0 for f in self.factors):
            raise ValueError(f"gaps_s, factors: expected gaps > 0 s and factors > 0, got {self.gaps_s!r} and "
                             f"{self.factors!r}")

    def __call__(self, gap_s: float) -> float:
        ys = [1.0, *self.factors]
        return sum(ys[i] * w for i, w in brackets([0.0, *self.gaps_s], gap_s))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WakePenalty:
        return cls(list(d["gaps_s"]), list(d["factors"]), d.get("how", ""))


def measure_wake_penalty(runner: Any, plan: Any, before: Any, *, gaps_s: Sequence[float] = WAKE_GAPS_S,
                         rounds: int = 7, clock: Callable[[], float] = time.perf_counter,
                         sleep: Callable[[float], None] = time.sleep) -> WakePenalty:
    """Time `runner.execute(plan)` right after a step `before` and after `before` then a sleep of each of `gaps_s`,
    interleaved over `rounds`. `before` is another step, as in a server (and as in the step table, whose samples
    each follow a server step): after itself, a step finds its own data hot and the factor reads too high."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds: expected a positive int, got {rounds!r}")
    gaps = [float(g) for g in gaps_s]
    if not gaps or any(not g > 0 for g in gaps) or sorted(gaps) != gaps:
        raise ValueError(f"gaps_s: expected increasing sleeps > 0 s, got {list(gaps_s)!r}")

    def timed() -> float:
        t0 = clock()
        runner.execute(plan)
        return clock() - t0

    runner.execute(plan)  # first-call costs
    runner.execute(before)
    hot: list[float] = []
    after: dict[float, list[float]] = {g: [] for g in gaps}
    for _ in range(rounds):
        runner.execute(before)
        hot.append(timed())
        for g in gaps:
            runner.execute(before)  # the same step before, with and without the sleep: only the sleep differs
            sleep(g)
            after[g].append(timed())
    base = statistics.median(hot)
    factors = [statistics.median(after[g]) / base for g in gaps]
    how = (f"{plan.num_prefill_tokens}-token prefill step after a {before.num_decode}-row decode step, median of "
           f"{rounds} interleaved rounds: back to back "
           f"{base * 1e3:.2f} ms; " + ", ".join(f"after {g * 1e3:g} ms asleep x{f:.2f}"
                                                  for g, f in zip(gaps, factors, strict=True)))
    return WakePenalty(gaps, factors, how)
