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
@pytest.mark.parametrize("graphs", ["off", "padded"])
def test_outputs_equal_generate(model, cfg, graphs):
    """Greedy outputs token-identical to generate; with graphs="padded" the decode-only steps go through the CUDA
    graphs' padded buffers (dummy rows up to a captured size, their KV in a scratch block), run eagerly here."""
    lens, outs = [13, 5, 9, 3], [6, 9, 4, 7]
    ps = prompts(1, lens)
    want = [expected(model, p, n) for p, n in zip(ps, outs, strict=True)]
    wl = Workload([Session(0.001 * i, [Turn(p, n)]) for i, (p, n) in enumerate(zip(ps, outs, strict=True))])
    server = Server(model, cfg, graphs=graphs)
    padded = []
    if graphs == "padded":
        run_padded = server.runner.graphs.run
        server.runner.graphs.run = lambda plan: padded.append(plan.num_decode) or run_padded(plan)
    run = server.run(wl, SLO)
    got = {r.request_id: r.output for r in run.requests}
    assert [got[i] for i in range(4)] == want
    if graphs == "padded":  # decode steps of 1, 2, 3 rows ran padded to sizes 1, 2 and 4
        assert server.runner.graphs.sizes == [1, 2, 4] and 3 in padded and server.runner.scratch_block == cfg.num_blocks
    assert max(s.num_decode for s in run.steps) >= 2  # ragged decode batches really ran
    assert any(s.num_decode and s.num_prefill_tokens for s in run.steps)  # prefill mixed into decode steps
    if cfg.num_blocks == 9:
        assert run.summary.preemptions >= 1


def test_cuda_graphs_say_what_they_need(model):
    cfg = SchedulerConfig(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        Server(model, cfg, graphs="cuda")
    with pytest.raises(ValueError, match="graphs: expected 'off', 'cuda' or 'padded'"):
        Server(model, cfg, graphs="on")


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


def test_a_paired_probe_leaves_outputs_and_timeline_alone(model):
    """The step table timed between the server's steps (serving/probe.py): its own KV pool, so the outputs stay
    those of generate; off the server's clock, so the steps' recorded times hold no probe time."""
    from tokprof.serving.probe import PairedProbe, PausableClock

    cfg = SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    lens, outs = [13, 5, 9, 3], [6, 9, 4, 7]
    ps = prompts(1, lens)
    want = [expected(model, p, n) for p, n in zip(ps, outs, strict=True)]
    wl = Workload([Session(0.001 * i, [Turn(p, n)]) for i, (p, n) in enumerate(zip(ps, outs, strict=True))])
    clock = PausableClock()
    server = Server(model, cfg, clock=clock, sleep=clock.sleep)
    probe = PairedProbe(model, clock, batches=[1, 4], contexts=[4, 16], chunks=[4, 8], every=1)
    server_cache = model.cache
    run = server.run(wl, SLO, between_steps=probe.after_step)
    assert model.cache is server_cache  # given back after every probe step
    got = {r.request_id: r.output for r in run.requests}
    assert [got[i] for i in range(4)] == want
    probed = sum(len(s) for s in probe.samples.values())
    assert probed == len(run.steps) and clock.paused_s > 0
    busy = sum(s.end_s - s.start_s for s in run.steps)
    assert busy <= run.steps[-1].end_s  # the steps fit in the server's timeline: no probe time inside it
    table = probe.table()
    assert table.batches == [1, 4] and table.chunks == [4, 8] and table.repeats >= 3
    assert all(t > 0 for row in table.decode_s for t in row) and "paired" in table.notes[1]
    assert table.mixed_batches == [1, 4] and all(t > 0 for row in table.mixed_s for t in row)
    # the speed trace: one ratio per probe sample, at its time on the server's clock, within the run
    speed = probe.speed_trace()
    assert len(speed.ratios) == len(run.steps) and all(r > 0 for r in speed.ratios)
    assert speed.times_s == sorted(speed.times_s) and speed.times_s[0] >= 0 and speed.times_s[-1] <= run.steps[-1].end_s
    probe.reset()
    assert not any(probe.samples.values()) and probe.speed_trace() is None
    with pytest.raises(ValueError, match="every: expected a positive int"):
        PairedProbe(model, clock, batches=[1], contexts=[4], chunks=[4], every=0)


def test_the_probe_samples_the_shapes_the_server_reads(model):
    """Every other probe step is a grid shape that the server's last step reads in the table's interpolation,
    drawn by its weight; the others go through the table in turn."""
    from tokprof.serving.metrics import StepRecord
    from tokprof.serving.probe import PairedProbe, PausableClock
    from tokprof.serving.step_time import brackets

    assert brackets([1, 4, 16], 10) == [(1, 0.5), (2, 0.5)]
    assert brackets([1, 4, 16], 0.5) == [(0, 1.0)] and brackets([1, 4, 16], 99) == [(2, 1.0)]
    assert brackets([1, 4, 16], 4) == [(1, 1.0), (2, 0.0)]
    probe = PairedProbe(model, PausableClock(), batches=[1, 4], contexts=[4, 16], chunks=[4, 8], seed=3)
    decode_4_16 = StepRecord(0.0, 0.001, 4, 0, 0, 16.0, 0, 0, 16)  # batch 4 at context 16: one grid shape
    for _ in range(20):
        probe.after_step(decode_4_16)
    assert len(probe.samples[("decode", 1, 1)]) >= 10  # 10 drawn, and once in turn
    assert sum(len(v) for v in probe.samples.values()) == 20
    prefill_6 = StepRecord(0.0, 0.001, 0, 6, 1, 0.0, 0, 0, 0)  # between the chunks of 4 and 8
    probe.reset()
    for _ in range(40):
        probe.after_step(prefill_6)
    drawn = len(probe.samples[("prefill", 0, 0)]) + len(probe.samples[("prefill", 1, 0)])
    assert drawn >= 20 and min(len(probe.samples[("prefill", i, 0)]) for i in (0, 1)) >= 3


def test_a_metered_run_reports_energy_per_token(model):
    """Server.run(meter=...) opens one energy window around the run: energy_j from the meter, J per output token.
    The meter here replays a recorded NVML trace (tests/data) on a clock that moves only when the meter polls, so
    the joules are the trace's, not this CPU's; what is tested is the accounting."""
    from pathlib import Path

    from tokprof.profiler.energy import EnergyMeter
    from tokprof.profiler.energy_sources import ManualClock, ReplaySource

    trace = Path(__file__).parent / "data" / "nvml_energy_trace_h100.json"
    meter = EnergyMeter(ReplaySource.from_file(trace, clock=ManualClock(1.0)), device="cpu")
    cfg = SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    wl = Workload([Session(0.0, [Turn(p, 3)]) for p in prompts(2, [5, 7])])
    run = Server(model, cfg).run(wl, SLO, meter=meter, energy_reason="unused when metered")
    s = run.summary
    assert s.energy_j is not None and s.energy_j > 0 and s.energy_reason is None
    assert s.j_per_token == pytest.approx(s.energy_j / 6)


def test_serve_bench_says_why_a_run_has_no_energy():
    from tokprof.serving.bench import _open_meter

    assert _open_meter("cpu", False) == (None, "a CPU has no energy meter here (NVML meters NVIDIA GPUs only)")
    meter, why = _open_meter("cuda:0", True)
    assert meter is None and "--no-paired" in why  # the probe's steps would sit inside the energy window
    meter, why = _open_meter("cuda:0", False)
    if meter is None:  # no GPU or no NVML here: the reason, never a traceback
        assert why.startswith("no energy meter: ")


def test_a_pausable_clock_stands_still_while_paused():
    from tokprof.serving.probe import PausableClock

    t = [10.0]
    clock = PausableClock(base=lambda: t[0], sleep=lambda s: None)
    assert clock() == 10.0
    with clock.paused():
        t[0] = 13.0
    assert clock() == 10.0 and clock.paused_s == 3.0
    t[0] = 14.5
    assert clock() == 11.5


def test_the_loop_overhead_is_the_server_loop_with_a_stub_runner(model):
    from tokprof.serving.bench import BenchOptions
    from tokprof.serving.loop_overhead import measure_loop_overhead
    from tokprof.serving.simulator import Overhead

    cfg = SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    server = Server(model, cfg)
    real = server.runner
    opts = BenchOptions(max_num_seqs=4, input_len="8", output_len="4")
    per_step, how = measure_loop_overhead(server, opts, vocab_size=512)
    assert server.runner is real  # given back
    assert 0 < per_step < 0.05 and "stub runner" in how and "4 clients, 16 requests" in how
    assert Overhead(loop_s=per_step).fixed_s == per_step and Overhead(stated_s=0.0, loop_s=1.0).fixed_s == 0.0
    assert "stub runner" in Overhead(loop_s=per_step).describe(None)


def test_table_steps_hold_scattered_distinct_blocks():
    from tokprof.serving.step_time import table_blocks, table_plans

    plans = table_plans([1, 4], [16, 40], [8], block_size=4, vocab=512)
    assert [k for k, _ in plans] == [("decode", 0, 0), ("decode", 0, 1), ("decode", 1, 0), ("decode", 1, 1),
                                     ("prefill", 0, 0), ("mixed", 0, 0), ("mixed", 1, 0)]
    _, plan = plans[3]  # batch 4, context 40: 10 blocks each, 40 in all, shuffled
    blocks = [b for c in plan.chunks for b in c.request.blocks]
    assert sorted(blocks) == list(range(40)) and blocks != list(range(40))
    _, mixed = plans[6]  # 4 decode rows at context 16 (4 blocks each, scattered) + a chunk of 8 tokens (2 blocks)
    assert mixed.num_decode == 4 and mixed.num_prefill_tokens == 8
    decode_blocks = [b for c in mixed.decodes for b in c.request.blocks]
    assert sorted(decode_blocks) == list(range(16)) and mixed.prefills[0].request.blocks == [16, 17]
    assert table_blocks([1, 4], [16, 40], [8], 4) == 40


# ----------------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_cuda_graph_server_matches_eager_server() -> None:
    """On a GPU: the server replaying CUDA graphs of its decode steps (padded to captured sizes) samples the same
    tokens as the same server run eagerly, and as generate."""
    gpu_model = Transformer.random(ModelConfig.from_name("tiny"), device="cuda", dtype=torch.bfloat16, seed=0,
                                   backend="triton", block_size=16)
    cfg = SchedulerConfig(num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=64)
    lens, outs = [40, 17, 29, 9, 33], [12, 20, 7, 15, 10]
    ps = prompts(3, lens)
    wl = Workload([Session(0.002 * i, [Turn(p, n)]) for i, (p, n) in enumerate(zip(ps, outs, strict=True))])
    runs = {}
    for graphs in ("off", "cuda"):
        server = Server(gpu_model, cfg, graphs=graphs)
        server.warmup()
        run = server.run(wl, SLO)
        runs[graphs] = {r.request_id: r.output for r in run.requests}
    assert runs["cuda"] == runs["off"]
    want = [expected(gpu_model, p, n) for p, n in zip(ps, outs, strict=True)]
    assert [runs["cuda"][i] for i in range(len(ps))] == want
