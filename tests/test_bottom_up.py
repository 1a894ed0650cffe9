"""The bottom-up roll-up measured on the CPU: tiny preset, torch backend, short timing budgets, end to end."""

from __future__ import annotations

import pytest

from tokprof import rollup
from tokprof.models import ModelConfig, decode_plan
from tokprof.profiler.schema import load_run
from tokprof.rollup import PriceOptions

# a few samples per call: these tests check the composition, not the CPU's speed
FAST = {"min_samples": 3, "min_time_s": 0.0, "max_time_s": 0.02, "warmup_ms": 0.0}
BATCHES, CONTEXTS = [1, 3], [16, 40]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("bottom_up") / "run.json"
    cfg = ModelConfig.from_name("tiny")
    points, run = rollup.bottom_up(cfg, BATCHES, CONTEXTS, "torch", "cpu", dtype="fp32", timing_kwargs=FAST,
                                   ceilings=None, prices=PriceOptions(usd_per_gpu_hour=2.0), out=out,
                                   command=["test"], progress=False)
    return cfg, points, run, out


def test_every_distinct_call_is_measured_once(measured):
    cfg, _, run, _ = measured
    distinct = {(c.op, tuple(sorted(c.shape.items()))) for b in BATCHES for ctx in CONTEXTS
                for c in decode_plan(cfg, b, ctx, "fp32")}
    keys = [(k.op, tuple(sorted(k.shape.items()))) for k in run.kernels]
    assert len(keys) == len(set(keys)) == len(distinct) and set(keys) == distinct
    assert not run.failures
    assert all(k.backend == "torch" and k.dtype == "fp32" and k.timing.timer == "perf_counter" for k in run.kernels)


def test_points_are_the_kernel_sum(measured):
    cfg, points, run, _ = measured
    assert [(p.batch, p.context) for p in points] == [(b, c) for b in BATCHES for c in CONTEXTS]
    times = {(k.op, tuple(sorted(k.shape.items()))): k.timing.median_us for k in run.kernels}
    for p in points:
        plan = decode_plan(cfg, p.batch, p.context, "fp32")
        step_us = sum(c.count * times[(c.op, tuple(sorted(c.shape.items())))] for c in plan)
        assert p.step_time_us == pytest.approx(step_us, rel=1e-12)
        assert p.tokens_per_s_per_gpu == pytest.approx(p.batch / (step_us * 1e-6))
        assert p.tokens_per_s_per_user == pytest.approx(1 / (step_us * 1e-6))
        assert p.usd_per_million_tokens == pytest.approx(2.0 / (p.tokens_per_s_per_gpu * 3600) * 1e6)
        assert p.provenance == "measured" and p.backend == "torch" and p.model == "tiny"
        assert p.gpu == run.provenance.device.cpu_model or p.gpu == run.provenance.device.name
        assert p.j_per_token_total is None and p.energy_reason.startswith("no energy counter on a cpu")
        assert len(p.ops) == len(plan) and sum(o.share for o in p.ops) == pytest.approx(1.0)
        assert all(o.efficiency_datasheet is None for o in p.ops)  # a CPU has no datasheet row
        assert p.tokens_per_s_per_mw is None  # no all-in kW for a CPU, and none invented


def test_the_run_file_holds_the_rollup_and_loads(measured):
    cfg, points, run, out = measured
    loaded = load_run(out)
    assert loaded.model == cfg.to_dict()
    assert rollup.points_from_run(loaded.rollup) == points
    assert len(loaded.kernels) == len(run.kernels)
    assert any("roll-up: 4 point(s) of tiny" in n for n in loaded.notes)


def test_a_second_sweep_reuses_the_measured_calls(measured):
    cfg, points, run, _ = measured
    before = len(run.kernels)
    more, run2 = rollup.bottom_up(cfg, [3], [40], "torch", "cpu", dtype="fp32", timing_kwargs=FAST, ceilings=None,
                                  run=run, progress=False)
    assert run2 is run and len(run.kernels) == before  # nothing new measured
    assert len(run.rollup) == 4  # the re-rolled point replaced its earlier self
    assert more[0].step_time_us == points[-1].step_time_us
    assert "0 measured now, " in run.notes[-1]
    with pytest.raises(ValueError, match="run: holds model 'tiny', not 'qwen3-8b'"):
        rollup.bottom_up(ModelConfig.from_name("qwen3-8b"), [1], [16], "torch", "cpu", dtype="fp32", run=run,
                         ceilings=None, progress=False)


def test_rollup_points_leave_out_points_with_unmeasured_calls(measured):
    cfg, _, run, _ = measured
    points, notes = rollup.rollup_points(cfg, [1, 2], [16], run, backend="torch", dtype="fp32")
    assert [(p.batch, p.context) for p in points] == [(1, 16)]
    assert len(notes) == 1 and notes[0].startswith("batch 2 context 16: no roll-up point")
    assert "not measured in this run" in notes[0]


def test_a_failed_call_is_named_in_the_notes(measured):
    import copy

    from tokprof.profiler.schema import Failure

    cfg, _, run, _ = measured
    run = copy.deepcopy(run)
    attention = next(c for c in decode_plan(cfg, 3, 40, "fp32") if c.op == "decode_attention")
    run.kernels = [k for k in run.kernels if not (k.op == "decode_attention" and k.shape == attention.shape)]
    run.failures.append(Failure(op="decode_attention", shape=attention.shape, dtype="fp32", backend="torch",
                                error="RuntimeError: CUDA out of memory"))
    points, notes = rollup.rollup_points(cfg, [1, 3], [40], run, backend="torch", dtype="fp32")
    assert [p.batch for p in points] == [1]
    assert "batch 3 context 40" in notes[0] and "CUDA out of memory" in notes[0]
