"""The simulator's step table, measured between the server's steps, off the server's clock.

    clock = PausableClock()
    server = Server(model, cfg, clock=clock, sleep=clock.sleep)
    probe = PairedProbe(model, clock, batches=[1, 4, 16], contexts=[16, 64, 256], chunks=[16, 64, 256])
    run = server.run(workload, slo, between_steps=probe.after_step)
    table = probe.table()          # a MeasuredStepTable, measured while the server ran

Why (docs/serving.md, "Validation"): a step table measured before a rate's run and the run itself see different
machines, because a CPU's speed drifts by up to ±15% from one second to the next. The simulator's step times then
miss the server's by the drift, not by anything the simulator leaves out (a run's TPOT errors were +12%, -12%, -6%
and +16% over four rates). So, after every `every`-th step of the server, one synthetic step of the table is timed:
the table's shapes in turn, on a KV pool of its own. Its median per shape becomes the table the simulator uses for
that rate. The probe runs with the server's clock paused, so the server's timeline (arrivals, token times) does
not contain it. Nothing of the server's own step times goes into the table.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tokprof.serving.step_time import MeasuredStepTable, table_blocks, table_from_samples, table_plans

MIN_SAMPLES = 3  # a shape the run left with fewer samples is topped up after it


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
    """One synthetic table step after every `every`-th server step, timed with the clock paused (module doc)."""

    def __init__(self, model: Any, clock: PausableClock, *, batches: Sequence[int], contexts: Sequence[int],
                 chunks: Sequence[int], every: int = 1, seed: int = 0, clock_name: str = "wall") -> None:
        from tokprof.serving.engine import ModelRunner

        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected a positive int (server steps per probe step), got {every!r}")
        self.model, self.clock, self.every, self.clock_name = model, clock, every, clock_name
        self.batches, self.contexts, self.chunks = list(batches), list(contexts), list(chunks)
        server_cache = model.cache
        self.runner = ModelRunner(model, table_blocks(batches, contexts, chunks, model.block_size))
        self.cache = self.runner.cache
        model.cache = server_cache  # the server's pool stays the model's; the probe swaps its own in per step
        self.plans = table_plans(batches, contexts, chunks, block_size=model.block_size,
                                 vocab=model.config.vocab_size, seed=seed)
        self.samples: dict[tuple[str, int, int], list[float]] = {key: [] for key, _ in self.plans}
        self._steps = 0
        self._next = 0
        for _, plan in self.plans:  # first calls (checks, allocations) before the server's clock starts
            self._execute(plan)

    def reset(self) -> None:
        """Forget the samples (the next rate's run starts its own table)."""
        self.samples = {key: [] for key, _ in self.plans}
        self._steps = 0

    def _execute(self, plan: Any) -> float:
        server_cache = self.model.cache
        self.model.cache = self.cache
        try:
            t0 = self.clock.base()
            self.runner.execute(plan)
            return self.clock.base() - t0
        finally:
            self.model.cache = server_cache

    def _probe_one(self) -> None:
        key, plan = self.plans[self._next]
        self._next = (self._next + 1) % len(self.plans)
        with self.clock.paused():
            self.samples[key].append(self._execute(plan))

    def after_step(self) -> None:
        """Called by Server.run after each step: every `every`-th time, time the next shape of the table."""
        self._steps += 1
        if self._steps % self.every == 0:
            self._probe_one()

    def table(self) -> MeasuredStepTable:
        """The median per shape of what was probed during the run; shapes with fewer than MIN_SAMPLES samples are
        topped up now (noted)."""
        topped = 0
        for key, plan in self.plans:
            while len(self.samples[key]) < MIN_SAMPLES:
                self.samples[key].append(self._execute(plan))
                topped += 1
        counts = [len(s) for s in self.samples.values()]
        notes = [f"clock: {self.clock_name}",
                 f"paired: one table step after every {self.every} server step(s), off the server's clock; "
                 f"{min(counts)}-{max(counts)} samples per shape"
                 + (f"; {topped} sample(s) topped up after the run" if topped else "")]
        return table_from_samples(self.samples, batches=self.batches, contexts=self.contexts, chunks=self.chunks,
                                  model=self.model, repeats=min(counts), cpu_load_note=None, notes=notes)
