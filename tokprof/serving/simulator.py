"""The simulator: the server's scheduler and traffic driver, stepped on a virtual clock whose steps last what a
step-time model says (measured tables interpolated, or modelled for a GPU) plus a per-step host overhead.

Same policy code as the server (tokprof.serving.scheduler), same arrivals (tokprof.serving.traffic), so the only
difference between a simulated and a served run is where step times come from. Sampled tokens are stand-ins (0):
no stop tokens, so outputs never change the schedule (prefix matches of multi-turn sessions depend only on the
sessions' own tokens). Stretches of decode-only steps that nothing can change are fast-forwarded without the
scheduler (same result, tested), so long outputs simulate quickly.

    run = simulate(workload, SchedulerConfig(num_blocks=...), table, slo)   # run.summary.provenance "predicted"
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tokprof.kernels._common import cdiv
from tokprof.serving.engine import ServeRun, check_stalled, step_record
from tokprof.serving.metrics import Slo, StepRecord, summarize
from tokprof.serving.scheduler import Scheduler, SchedulerConfig
from tokprof.serving.step_time import StepShape, StepTimeModel
from tokprof.serving.traffic import Driver, Workload


def _steady(_t_s: float) -> float:
    return 1.0


@dataclass
class Overhead:
    """Per-step host overhead: `stated_s` when given, else `loop_s` (the server loop's host time per step, measured
    with a stub runner: tokprof.serving.loop_overhead), else the scheduler's own host time measured on the
    simulator's calls (schedule() and update() only)."""

    stated_s: float | None = None
    loop_s: float | None = None

    @property
    def fixed_s(self) -> float | None:
        return self.stated_s if self.stated_s is not None else self.loop_s

    def describe(self, measured_s: float | None) -> str:
        if self.stated_s is not None:
            return f"per-step overhead {self.stated_s * 1e6:.0f} us (stated)"
        if self.loop_s is not None:
            return (f"per-step overhead {self.loop_s * 1e6:.0f} us (the server loop's host time per step, measured "
                    "with a stub runner)")
        return f"per-step overhead {0 if measured_s is None else measured_s * 1e6:.0f} us (the scheduler's host " \
               "time, measured on the simulator's own calls)"


def _fast_forward(sched: Scheduler, driver: Driver, step_time: StepTimeModel, now: float, overhead_s: float,
                  steps: list[StepRecord], speed: Callable[[float], float]) -> float:
    """Run the decode-only steps that follow without the scheduler, while nothing can change the batch: nobody
    admitted (nobody waiting, or the batch full), every running request decoding, no arrival due, no request at
    its last token, blocks to spare (no preemption), no prefix cache to update. What schedule() + update() would do,
    step by step, without them."""
    cfg, pool, running = sched.config, sched.pool, sched.running
    admitting = sched.waiting and len(running) < cfg.max_num_seqs  # a waiting request would join the next step
    if cfg.prefix_caching or admitting or not running or len(running) > cfg.max_num_batched_tokens:
        return now
    if any(not (r.output and r.uncomputed == 1) for r in running):
        return now
    k = min(r.max_new_tokens - len(r.output) for r in running) - 1  # the finishing step takes the normal path
    bs = cfg.block_size
    if k <= 0 or sum(cdiv(r.num_computed + k, bs) - len(r.blocks) for r in running) > pool.num_free:
        return now
    nxt = driver.next_arrival_s
    n = len(running)
    for _ in range(k):
        if nxt is not None and nxt <= now:
            break
        lens = [r.num_computed + 1 for r in running]
        ctx_mean, ctx_max = sum(lens) / n, max(lens)
        forward_s = step_time.step_time_s(StepShape(n, ctx_mean, 0, 0, 0, ctx_max)) * speed(now)
        start, now = now, now + forward_s + overhead_s
        for r in running:
            if r.num_computed + 1 > len(r.blocks) * bs:
                r.blocks += pool.allocate(1)
            r.num_computed += 1
            r.output.append(0)
            r.token_times_s.append(now)
        steps.append(StepRecord(start, now, n, 0, 0, ctx_mean, 0, 0, ctx_max))
    return now


def simulate(workload: Workload, config: SchedulerConfig, step_time: StepTimeModel, slo: Slo, *,
             overhead: Overhead | None = None, speed: Callable[[float], float] | None = None,
             wake: Callable[[float], float] | None = None, max_steps: int = 10_000_000,
             fast_forward: bool = True) -> ServeRun:
    """`speed`: the machine's relative slowness over the run's time (tokprof.serving.probe.SpeedTrace): each
    step's forward time is the step-time model's x speed(its start). None: a steady machine (1.0).
    `wake`: the first step after an idle gap of g seconds takes wake(g) x its time (tokprof.serving.wake). None:
    no cost to waking."""
    overhead = overhead or Overhead()
    speed = speed or _steady
    wake = wake or _steady
    busy_until = 0.0  # when the last step (and its update) ended: a step starting later follows an idle gap
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
        fixed = overhead.fixed_s
        forward_s = step_time.step_time_s(StepShape.of(plan)) * speed(start)
        if start > busy_until:
            forward_s *= wake(start - busy_until)
        end = start + forward_s + (fixed if fixed is not None else schedule_s)
        h1 = time.perf_counter()
        finished = sched.update(plan, sampled, end)
        update_s = time.perf_counter() - h1
        host_s += schedule_s + update_s
        now = end + (0.0 if fixed is not None else update_s)
        for req in finished:
            driver.finished(req)
        steps.append(step_record(plan, start, end))
        if fast_forward:
            per_step = overhead.fixed_s if overhead.fixed_s is not None else host_s / len(steps)
            now = _fast_forward(sched, driver, step_time, now, per_step, steps, speed)
        busy_until = now
    sched.pool.check()
    summary = summarize(sched.finished, steps, slo, provenance="predicted",
                        energy_reason="predicted by the simulator: no energy measured")
    measured = host_s / len(steps) if steps else None
    summary.notes.append(f"step times {step_time.describe()}; {overhead.describe(measured)}"
                         + ("" if speed is _steady else "; each step scaled by the machine's speed at its start, "
                            "measured during the server's run")
                         + ("" if wake is _steady else "; a step after an idle gap scaled by the measured cost of "
                            "waking"))
    return ServeRun(summary, sched.finished, steps)
