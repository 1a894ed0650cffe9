"""The load generator: seeded, distributions within statistical bounds, traces, agentic context reuse."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from tokprof.serving import loadgen
from tokprof.serving.scheduler import Request
from tokprof.serving.traffic import Driver

L = loadgen.LengthDist.parse


def test_seeded_and_reproducible():
    a = loadgen.poisson(5.0, 50, L("x", "uniform:4:64"), L("y", "8"), vocab_size=100, seed=3)
    b = loadgen.poisson(5.0, 50, L("x", "uniform:4:64"), L("y", "8"), vocab_size=100, seed=3)
    c = loadgen.poisson(5.0, 50, L("x", "uniform:4:64"), L("y", "8"), vocab_size=100, seed=4)
    assert [(s.start_s, s.turns[0].input_tokens) for s in a.sessions] == \
        [(s.start_s, s.turns[0].input_tokens) for s in b.sessions]
    assert [s.start_s for s in a.sessions] != [s.start_s for s in c.sessions]


def test_poisson_gaps_exponential():
    # 4000 gaps at 20/s: mean 0.05 s within 4 standard errors (0.05 / sqrt(4000) each), CV near 1
    wl = loadgen.poisson(20.0, 4000, L("x", "4"), L("y", "4"), vocab_size=10, seed=0)
    t = [s.start_s for s in wl.sessions]
    gaps = [b - a for a, b in zip([0.0, *t], t, strict=False)]
    mean = statistics.fmean(gaps)
    assert abs(mean - 0.05) < 4 * 0.05 / math.sqrt(4000)
    assert 0.93 < statistics.pstdev(gaps) / mean < 1.07


@pytest.mark.parametrize("spec,mean,lo,hi", [("uniform:10:30", 20, 10, 30), ("lognormal:100:0.5", 100, 1, None),
                                             ("17", 17, 17, 17)])
def test_length_distributions(spec, mean, lo, hi):
    import random

    dist = L("input_len", spec)
    rng = random.Random(1)
    xs = [dist.sample(rng) for _ in range(5000)]
    assert abs(statistics.fmean(xs) - mean) < 0.03 * mean + 0.5
    assert min(xs) >= lo and (hi is None or max(xs) <= hi)
    if spec.startswith("lognormal"):
        assert 0.45 < statistics.pstdev(xs) / statistics.fmean(xs) < 0.55  # CV 0.5


@pytest.mark.parametrize("bad", ["0", "uniform:5:2", "lognormal:10", "gauss:1:2", "x"])
def test_bad_length_spec_names_the_argument(bad):
    with pytest.raises(ValueError, match="input_len: expected"):
        L("input_len", bad)


def test_concurrency_releases_next_turn_on_finish():
    wl = loadgen.concurrency(2, 5, L("x", "3"), L("y", "2"), vocab_size=10, seed=0)
    assert [len(s.turns) for s in wl.sessions] == [3, 2]
    d = Driver(wl)
    first = d.due(0.0)
    assert len(first) == 2 and d.due(100.0) == []  # closed loop: nothing more until one finishes
    first[0].finish_s = 1.5
    d.finished(first[0])
    nxt = d.due(1.5)
    assert len(nxt) == 1 and nxt[0].session == first[0].session and nxt[0].arrival_s == 1.5


def test_agentic_turn_reuses_previous_context():
    wl = loadgen.agentic(1.0, 1, 3, L("x", "5"), L("y", "2"), L("z", "3"), vocab_size=50, think_s=0.25, seed=0)
    d = Driver(wl)
    (r0,) = d.due(wl.sessions[0].start_s)
    r0.output, r0.finish_s = [1, 2, 3], 2.0
    d.finished(r0)
    assert d.due(2.2) == []
    (r1,) = d.due(2.25)
    assert r1.prompt == r0.prompt + [1, 2, 3] + wl.sessions[0].turns[1].input_tokens and r1.turn == 1


def test_trace_roundtrip_and_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"arrival_s": 0.5, "input_len": 4, "output_len": 2},
            {"arrival_s": 0.1, "input_len": 3, "output_len": 1, "session": "a"},
            {"input_len": 2, "output_len": 1, "session": "a", "think_s": 0.2}]
    path.write_text("# a comment\n" + "\n".join(json.dumps(r) for r in rows) + "\n\n")
    wl = loadgen.read_trace(path, vocab_size=10)
    assert [len(s.turns) for s in wl.sessions] == [1, 2]
    assert wl.sessions[1].reuse_context and wl.sessions[1].think_s == 0.2
    assert [len(t.input_tokens) for t in wl.sessions[1].turns] == [3, 2]
    path.write_text(json.dumps({"arrival_s": 0, "input_len": 0, "output_len": 2}))
    with pytest.raises(ValueError, match="line 1: input_len expected an int >= 1"):
        loadgen.read_trace(path, vocab_size=10)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        loadgen.read_trace(path, vocab_size=10)


def test_requests_carry_arrivals():
    wl = loadgen.poisson(2.0, 3, L("x", "2"), L("y", "1"), vocab_size=10, seed=0)
    reqs = Driver(wl).due(1e9)
    assert all(isinstance(r, Request) for r in reqs)
    assert [r.arrival_s for r in reqs] == [s.start_s for s in wl.sessions]
