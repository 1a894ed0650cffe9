"""The served layer (L5): a continuous-batching server over tokprof's paged KV cache, the load generator that drives
it, a simulator that runs the same scheduler on a virtual clock with step times from measured or modelled tables,
and the L5 layer of the iceberg with its gap split.

    blocks.py      KV block pool: allocation, refcounts, prefix cache (hash chain of full blocks)
    scheduler.py   the policy: continuous batching, chunked prefill under a token budget, preemption (recompute)
    traffic.py     sessions and turns, the driver that releases requests over time (rates, concurrency, agentic)
    loadgen.py     synthetic workloads (seeded lengths and arrivals) and JSONL traces
    engine.py      runs a scheduler step on a Transformer's kernels over one paged block pool; the server loop
    metrics.py     per-request latencies (TTFT, TPOT, ITL, end to end), per-run throughput, goodput under an SLO
    step_time.py   step-time tables: measured on this device (interpolated) or modelled for a GPU
    simulator.py   the same scheduler and driver on a virtual clock
    served.py      the L5 layer from a served run (measured) or a simulation (predicted), and its gap split
    http_client.py the load generator against an OpenAI-compatible HTTP server (vLLM, SGLang) on localhost
    bench.py       the serve-bench sweep: measured vs simulated per request rate, SLO search, cost at the SLO
"""

from __future__ import annotations
