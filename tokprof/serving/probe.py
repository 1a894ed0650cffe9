"""The simulator's step table, measured between the server's steps, off the server's clock.

    clock = PausableClock()
    server = Server(model, cfg, clock=clock, sleep=clock.sleep)
    probe = PairedProbe(model, clock, batches=[1, 4, 16], contexts=[16, 64, 256], chunks=[16, 64, 256])
    run = server.run(workload, slo, between_steps=probe.after_step)
    table = probe.table()          # a MeasuredStepTable, measured while the server ran
    speed = probe.speed_trace()    # the machine's speed over the run: simulate(..., speed=speed)

Why (docs/serving.md, "Validation"): a step table measured before a rate's run and the run itself see different
machines, because a CPU's speed drifts by up to ±15% from one second to the next. The simulator's step times then
miss the server's by the drift, not by anything the simulator leaves out (a run's TPOT errors were +12%, -12%, -6%
and +16% over four rates). So, after every `every`-th step of the server, one synthetic step of the table is timed:
the table's shapes, on a KV pool of its own. Its mean per shape becomes the table the simulator uses for
that rate. The probe runs with the server's clock paused, so the server's timeline (arrivals, token times) does
not contain it. Nothing of the server's own step times goes into the table.

The same samples also say how fast the machine was at each moment of the run: a sample over its shape's mean is
the machine's relative slowness then (`SpeedTrace`). A table of means describes a steady machine; a CPU that runs
10-20% slow for a second pushes a server at 75% load past saturation for that second, and the requests queued then
make the p90 TTFT. Queueing is convex in the step time, so the mean machine under-predicts that tail (by 30-75% in
runs where the machine had such a stretch). The simulator scales each step by the trace at its start time.
"""

from __future__ import annotations

import bisect
import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tokprof.serving.metrics import StepRecord
from tokprof.serving.step_time import (
    MeasuredStepTable,
    brackets,
    context_axis,
    decode_context,
    mixed_grid,
    table_blocks,
    table_from_samples,
    table_plans,
)

MIN_SAMPLES = 3  # a shape the run left with fewer samples is topped up after it
SPEED_WINDOW_S = 0.25  # the speed trace's half-window: ~25-50 probe samples on the CPU (5-10 ms steps)


@dataclass
class SpeedTrace:
    """The machine's relative slowness over a run: at each probe sample's time (seconds on the server's clock from
    the run's start), the sample's time over its shape's mean. `trace(t)` is the mean of the ratios within
    `window_s` of t (the nearest one where none is; never extrapolated). 1.0 = the table's mean machine."""

    times_s: list[float]
    ratios: list[float]
    window_s: float = SPEED_WINDOW_S

    def __post_init__(self) -> None:
        if len(self.times_s) != len(self.ratios) or not self.times_s:
            raise ValueError(f"times_s, ratios: expected two equal, non-empty lists, got {len(self.times_s)} and "
                             f"{len(self.ratios)} values")
        if not self.window_s > 0:
            raise ValueError(f"window_s: expected seconds > 0, got {self.window_s!r}")
        self._sums = [0.0]
        for r in self.ratios:
            self._sums.append(self._sums[-1] + r)

    def __call__(self, t_s: float) -> float:
        ts = self.times_s
        i0 = bisect.bisect_left(ts, t_s - self.window_s)
        i1 = bisect.bisect_right(ts, t_s + self.window_s)
        if i1 <= i0:  # no sample within the window: the nearest one
            i = bisect.bisect_left(ts, t_s)
            i = i - 1 if i == len(ts) or (i > 0 and t_s - ts[i - 1] < ts[i] - t_s) else i
            return self.ratios[i]
        return (self._sums[i1] - self._sums[i0]) / (i1 - i0)

    def summary(self) -> dict[str, Any]:
        """The windowed speed at each sample: its spread over the run (p10/p50/p90, min, max)."""
        windowed = sorted(self(t) for t in self.times_s)
        q = statistics.quantiles(windowed, n=10, method="inclusive") if len(windowed) > 1 else windowed * 9
        return {"samples": len(self.ratios), "window_s": self.window_s, "p10": q[0], "p50": q[4], "p90": q[8],
                "min": windowed[0], "max": windowed[-1]}


class PausableClock:
    """A clock (`base`, seconds) that stands still while paused: `now()` = base() - the time spent paused."""

    def __init__(self, base: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base = base
        self._sleep = sleep
        self.paused_s = 0.0

    def __call__(self) -> float:
        return self.base() - self.paused_s

    def sleep(self, seconds: float) -> None:
        self._sleep(seconds)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = self.base()
        try:
            yield
        finally:
            self.paused_s += self.base() - t0


class PairedProbe:
    """One synthetic table step after every `every`-th server step, timed with the clock paused (module doc).

    Which step: every other probe step is the next shape of the table in turn (every shape gets samples); the
    others are a grid shape that the server's last step reads in the table's interpolation, drawn by its weight.
    So the shapes the server runs at are sampled most, while it runs at them: a short run at saturation (~300
    steps) left ~8 samples per shape in turn alone, and the ±5% noise of its full-batch means moved the
    simulator's service rate, and p90 TTFT past saturation three times that."""

    def __init__(self, model: Any, clock: PausableClock, *, batches: Sequence[int], contexts: Sequence[int],
                 chunks: Sequence[int], every: int = 1, seed: int = 0, clock_name: str = "wall",
                 graphs: bool = False) -> None:
        """`graphs`: decode-only synthetic steps replay CUDA graphs, as the server's do (graphs.py)."""
        from tokprof.serving.engine import ModelRunner, enable_graphs

        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected a positive int (server steps per probe step), got {every!r}")
        self.model, self.clock, self.every, self.clock_name = model, clock, every, clock_name
        self.batches, self.contexts, self.chunks = list(batches), list(contexts), list(chunks)
        server_cache = model.cache
        pool_blocks = table_blocks(batches, contexts, chunks, model.block_size)
        self.runner = ModelRunner(model, pool_blocks, scratch_blocks=1 if graphs else 0)
        self.cache = self.runner.cache
        if graphs:
            enable_graphs(self.runner, max(batches), pool_blocks, capture=True)
        model.cache = server_cache  # the server's pool stays the model's; the probe swaps its own in per step
        self.plans = table_plans(batches, contexts, chunks, block_size=model.block_size,
                                 vocab=model.config.vocab_size, seed=seed)
        self.samples: dict[tuple[str, int, int], list[float]] = {key: [] for key, _ in self.plans}
        self.log: list[tuple[float, tuple[str, int, int], float]] = []  # (server-clock time, shape, seconds)
        self._steps = 0
        self._next = 0
        self._t0 = clock()
        self._plan_of = dict(self.plans)
        self._mixed_batches = mixed_grid(batches, contexts)[0]
        self._rng = random.Random(seed)
        for _, plan in self.plans:  # first calls (checks, allocations) before the server's clock starts
            self._execute(plan)

    def reset(self) -> None:
        """Forget the samples (the next rate's run starts its own table). The speed trace's times are the server's
        (the end of the step each sample follows); without a step record, from here."""
        self.samples = {key: [] for key, _ in self.plans}
        self.log = []
        self._steps = 0
        self._t0 = self.clock()

    def _execute(self, plan: Any) -> float:
        server_cache = self.model.cache
        self.model.cache = self.cache
        try:
            t0 = self.clock.base()
            self.runner.execute(plan)
            return self.clock.base() - t0
        finally:
            self.model.cache = server_cache

    def _draw(self, points: list[tuple[int, float]]) -> int:
        return points[0][0] if len(points) == 1 else self._rng.choices([i for i, _ in points],
                                                                      [w for _, w in points])[0]

    def _shape_read_by(self, step: StepRecord) -> tuple[str, int, int]:
        """A grid shape the table's interpolation reads for `step`, drawn by its weight (mixed steps: the decode
        rows' shapes or the mixed shapes, half and half)."""
        chunk = step.num_prefill_tokens
        if not step.num_decode:
            return ("prefill", self._draw(brackets(self.chunks, chunk)), 0)
        if step.num_prefill_tokens and self._rng.random() < 0.5:
            return ("mixed", self._draw(brackets(self._mixed_batches, step.num_decode)),
                    self._draw(brackets(self.chunks, chunk)))
        ctx = decode_context(step, context_axis(self.model.backend))  # the table's context axis
        return ("decode", self._draw(brackets(self.batches, step.num_decode)),
                self._draw(brackets(self.contexts, ctx)))

    def _probe_one(self, step: StepRecord | None) -> None:
        if step is not None and self._steps % (2 * self.every) == 0 and (step.num_decode or step.num_prefill_tokens):
            key = self._shape_read_by(step)
            plan = self._plan_of[key]
        else:
            key, plan = self.plans[self._next]
            self._next = (self._next + 1) % len(self.plans)
        t_s = step.end_s if step is not None else self.clock() - self._t0  # the server's clock, from its start
        with self.clock.paused():
            seconds = self._execute(plan)
        self.samples[key].append(seconds)
        self.log.append((t_s, key, seconds))

    def after_step(self, step: StepRecord | None = None) -> None:
        """Called by Server.run after each step with its record: every `every`-th time, time a shape of the table
        (the class doc says which)."""
        self._steps += 1
        if self._steps % self.every == 0:
            self._probe_one(step)

    def table(self) -> MeasuredStepTable:
        """The mean per shape of what was probed during the run; shapes with fewer than MIN_SAMPLES samples are
        topped up now (noted)."""
        topped = 0
        for key, plan in self.plans:
            while len(self.samples[key]) < MIN_SAMPLES:
                self.samples[key].append(self._execute(plan))
                topped += 1
        counts = [len(s) for s in self.samples.values()]
        notes = [f"clock: {self.clock_name}",
                 f"paired: one table step after every {self.every} server step(s), off the server's clock, every "
                 "other one a shape the server's last step reads; "
                 f"{min(counts)}-{max(counts)} samples per shape"
                 + (f"; {topped} sample(s) topped up after the run" if topped else "")]
        return table_from_samples(self.samples, batches=self.batches, contexts=self.contexts, chunks=self.chunks,
                                  model=self.model, repeats=min(counts), cpu_load_note=None, notes=notes)

    def speed_trace(self, window_s: float = SPEED_WINDOW_S) -> SpeedTrace | None:
        """The machine's speed over the run (SpeedTrace), from the samples taken during it; None before any."""
        if not self.log:
            return None
        means = {key: statistics.fmean(v) for key, v in self.samples.items() if v}
        return SpeedTrace([t for t, _, _ in self.log], [s / means[key] for _, key, s in self.log], window_s)
