"""The server loop: greedy outputs token-identical to Transformer.generate (fp32, CPU, torch backend), with chunked
prefill, ragged decode batches, preemption and prefix caching in play."""

from __future__ import annotations

import random

import pytest
import torch

from tokprof.models import ModelConfig, Transformer
from tokprof.serving.engine import Server
from tokprof.serving.metrics import Slo
from tokprof.serving.scheduler import SchedulerConfig
from tokprof.serving.traffic import Session, Turn, Workload

SLO = Slo(ttft_s=10.0, tpot_s=1.0)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer.random(ModelConfig.from_name("tiny"), device="cpu", dtype=torch.float32, seed=0,
                              backend="torch", block_size=4)


def expected(model: Transformer, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("cfg", [
    SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=8),  # chunked, ragged
    SchedulerConfig(num_blocks=9, block_size=4, max_num_seqs=4, max_num_batched_tokens=16),  # preemption
], ids=["chunked", "preempting"])
def test_outputs_equal_generate(model, cfg):
    lens, outs = [13, 5, 9, 3], [6, 9, 4, 7]
    ps = prompts(1, lens)
    want = [expected(model, p, n) for p, n in zip(ps, outs, strict=True)]
    wl = Workload([Session(0.001 * i, [Turn(p, n)]) for i, (p, n) in enumerate(zip(ps, outs, strict=True))])
    run = Server(model, cfg).run(wl, SLO)
    got = {r.request_id: r.output for r in run.requests}
    assert [got[i] for i in range(4)] == want
    assert max(s.num_decode for s in run.steps) >= 2  # ragged decode batches really ran
    assert any(s.num_decode and s.num_prefill_tokens for s in run.steps)  # prefill mixed into decode steps
    if cfg.num_blocks == 9:
        assert run.summary.preemptions >= 1


def test_prefix_cache_hits_and_outputs_unchanged(model):
    cfg = SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=32, prefix_caching=True)
    (first, more) = prompts(2, [10, 6])
    wl = Workload([Session(0.0, [Turn(first, 5), Turn(more, 4)], reuse_context=True)])
    run = Server(model, cfg).run(wl, SLO)
    r0, r1 = sorted(run.requests, key=lambda r: r.turn)
    assert r1.prompt == first + r0.output + more
    assert r1.cached_tokens == 12  # (10 + 5 - 1 = 14 tokens cached) -> 3 full blocks of 4
    assert r0.output == expected(model, first, 5)
    assert r1.output == expected(model, r1.prompt, 4)


def test_simulator_schedules_the_server_steps_exactly(model):
    # closed loop (fixed concurrency): arrivals are completions, so the schedule does not depend on step times
    from tokprof.serving import loadgen
    from tokprof.serving.simulator import Overhead, simulate
    from tokprof.serving.step_time import StepShape

    class Unit:
        provenance = "modelled"

        def step_time_s(self, shape: StepShape) -> float:
            return 0.001

        def describe(self) -> str:
            return "1 ms"

    wl = loadgen.concurrency(3, 7, loadgen.LengthDist.parse("i", "uniform:2:12"),
                             loadgen.LengthDist.parse("o", "uniform:1:6"), vocab_size=512, seed=2)
    cfg = SchedulerConfig(num_blocks=10, block_size=4, max_num_seqs=3, max_num_batched_tokens=6)
    served = Server(model, cfg).run(wl, SLO)
    sim = simulate(wl, cfg, Unit(), SLO, overhead=Overhead(stated_s=0.0))
    shape = [(s.num_decode, s.num_prefill_tokens, s.recompute_tokens) for s in served.steps]
    assert shape == [(s.num_decode, s.num_prefill_tokens, s.recompute_tokens) for s in sim.steps]
    assert served.summary.requests == sim.summary.requests == 7
