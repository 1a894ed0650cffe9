"""The server loop's host time per step, measured with a stub runner: what the simulator adds to each step.

    loop_s, note = measure_loop_overhead(server, opts, vocab_size=512)

A step of tokprof's server is schedule() + the runner's forward pass; around it the loop takes arrivals, updates
the requests with the sampled tokens, records the step and hands finished requests back. The step table times the
forward pass alone (runner.execute), so the rest is measured here: the same Server loop over a closed-loop workload
of the bench's lengths (max_num_seqs clients, so the batch stays full and the loop never idles), with the runner
replaced by a stub that samples token 0 for every row that samples. Total loop time / steps, less the stub's own
cost (measured), is the host time per step. Measured on the 2-core CPU it was ~50 us per step (schedule() alone,
as the simulator measured it on its own calls before, ~15 us), 1-2% of a tiny-model step.
"""

from __future__ import annotations

import time
from typing import Any

from tokprof.serving import loadgen
from tokprof.serving.metrics import Slo
from tokprof.serving.scheduler import StepPlan

STUB_REPEATS = 2000  # stub calls timed to take its own cost off


class StubRunner:
    """Stands in for ModelRunner: every row that samples gets token 0, instantly."""

    def execute(self, plan: StepPlan) -> dict[int, int]:
        return {c.request.request_id: 0 for c in plan.chunks if c.samples}


def measure_loop_overhead(server: Any, opts: Any, *, vocab_size: int, requests_per_client: int = 4,
                          seed: int = 0) -> tuple[float, str]:
    """(seconds of host time per step of `server`'s loop, how it was measured); `opts` a BenchOptions (lengths,
    max_num_seqs)."""
    clients = opts.max_num_seqs
    inp = loadgen.LengthDist.parse("input_len", opts.input_len)
    out = loadgen.LengthDist.parse("output_len", opts.output_len)
    wl = loadgen.concurrency(clients, clients * requests_per_client, inp, out, vocab_size=vocab_size, seed=seed)
    stub = StubRunner()
    real = server.runner
    server.runner = stub
    try:
        run = server.run(wl, Slo(ttft_s=1e9, tpot_s=1e9))
    finally:
        server.runner = real
    steps = run.steps
    if len(steps) < 2:
        raise RuntimeError("loop overhead: the stub workload ran fewer than 2 steps")
    span = steps[-1].end_s - steps[0].start_s
    probe_plan = StepPlan([], [])
    t0 = time.perf_counter()
    for _ in range(STUB_REPEATS):
        stub.execute(probe_plan)
    stub_s = (time.perf_counter() - t0) / STUB_REPEATS
    per_step = max(0.0, span / (len(steps) - 1) - stub_s)
    return per_step, (f"the server loop with a stub runner over {len(steps)} steps ({clients} clients, "
                      f"{wl.num_requests} requests): {per_step * 1e6:.0f} us per step")
