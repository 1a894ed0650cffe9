"""The simulator: the server's scheduler and traffic driver, stepped on a virtual clock whose steps last what a
step-time model says (measured tables interpolated, or modelled for a GPU) plus a per-step host overhead.

Same policy code as the server (tokprof.serving.scheduler), same arrivals (tokprof.serving.traffic), so the only
difference between a simulated and a served run is where step times come from. Sampled tokens are stand-ins (0):
no stop tokens, so outputs never change the schedule (prefix matches of multi-turn sessions depend only on the
sessions' own tokens).

    run = simulate(workload, SchedulerConfig(num_blocks=...), table, slo)   # run.summary.provenance "predicted"
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tokprof.serving.engine import ServeRun, check_stalled, step_record
from tokprof.serving.metrics import Slo, StepRecord, summarize
from tokprof.serving.scheduler import Scheduler, SchedulerConfig
from tokprof.serving.step_time import StepShape, StepTimeModel
from tokprof.serving.traffic import Driver, Workload


@dataclass
class Overhead:
    """Per-step host overhead: `stated_s` when given, else the scheduler's own measured host time per step."""

    stated_s: float | None = None

    def describe(self, measured_s: float | None) -> str:
        if self.stated_s is not None:
            return f"per-step overhead {self.stated_s * 1e6:.0f} us (stated)"
        return f"per-step overhead {0 if measured_s is None else measured_s * 1e6:.0f} us (the scheduler's host " \
               "time, measured on the simulator's own calls)"


def simulate(workload: Workload, config: SchedulerConfig, step_time: StepTimeModel, slo: Slo, *,
             overhead: Overhead | None = None, max_steps: int = 10_000_000) -> ServeRun:
    overhead = overhead or Overhead()
    sched = Scheduler(config)
    driver = Driver(workload)
    steps: list[StepRecord] = []
    now = 0.0
    host_s = 0.0
    while not driver.exhausted:
        for req in driver.due(now):
            sched.add(req)
        if not sched.has_work:
            nxt = driver.next_arrival_s
            if nxt is not None:
                now = max(now, nxt)
            continue
        if len(steps) >= max_steps:
            raise RuntimeError(f"simulate: more than max_steps={max_steps} steps; the workload does not drain")
        h0 = time.perf_counter()
        plan = sched.schedule()
        check_stalled(plan, sched)
        sampled = {c.request.request_id: 0 for c in plan.chunks if c.samples}
        schedule_s = time.perf_counter() - h0
        start = now
        # as the server: the step runs from before schedule() to the end of the forward pass; update() follows
        end = start + step_time.step_time_s(StepShape.of(plan)) + (
            overhead.stated_s if overhead.stated_s is not None else schedule_s)
        h1 = time.perf_counter()
        finished = sched.update(plan, sampled, end)
        update_s = time.perf_counter() - h1
        host_s += schedule_s + update_s
        now = end + (0.0 if overhead.stated_s is not None else update_s)
        for req in finished:
            driver.finished(req)
        steps.append(step_record(plan, start, end))
    sched.pool.check()
    summary = summarize(sched.finished, steps, slo, provenance="predicted",
                        energy_reason="predicted by the simulator: no energy measured")
    measured = host_s / len(steps) if steps else None
    summary.notes.append(f"step times {step_time.describe()}; {overhead.describe(measured)}")
    return ServeRun(summary, sched.finished, steps)
