"""Paired kernel rounds on the CPU (tokprof.models.e2e_paired) and the L4 prediction made from them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokprof.models.config import ModelConfig
from tokprof.models.e2e import E2EMeasurement, measure_e2e
from tokprof.models.e2e_paired import PairedCall, PairedSequence, paired_kernel_sum_us, robust_mean
from tokprof.models.transformer import Transformer
from tokprof.profiler.overhead import HostWork, Overhead
from tokprof.rollup.step_prediction import predict_step

TINY = ModelConfig.from_name("tiny")


def test_robust_mean_drops_a_preemption_and_keeps_the_skew() -> None:
    skewed = [10.0 + i % 5 for i in range(20)] + [18.0]  # a right tail within 3 IQR stays
    mean, dropped = robust_mean(skewed + [1000.0])
    assert dropped == 1 and mean == pytest.approx(sum(skewed) / 21) and mean > sorted(skewed)[10]
    assert robust_mean([5.0])[0] == 5.0
    with pytest.raises(ValueError, match="samples: expected at least one"):
        robust_mean([])


def test_a_round_runs_every_call_of_the_step_on_its_own_inputs() -> None:
    paired, how = PairedSequence.for_point(TINY, batch=2, context=40, dtype="fp32", backend="torch", block_size=16)
    assert paired is not None, how
    assert "distinct" in how
    for _ in range(3):
        paired.round()
    res = paired.results()
    assert [(c.op, c.count) for c in res] == [(c.op, c.count) for c in paired.calls]
    assert all(c.rounds == 3 and c.samples == 3 * c.count and c.mean_us > 0 for c in res)
    assert paired_kernel_sum_us(res) == pytest.approx(sum(c.count * c.mean_us for c in res))
    assert paired_kernel_sum_us([c.to_dict() for c in res]) == pytest.approx(paired_kernel_sum_us(res))


def test_no_pairing_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokprof.models import e2e_paired

    monkeypatch.setattr(e2e_paired, "PAIRED_MAX_BYTES", 1024)
    paired, why = PairedSequence.for_point(TINY, batch=2, context=40, dtype="fp32", backend="torch", block_size=16)
    assert paired is None and "exceed" in why
    with pytest.raises(ValueError, match="device: paired kernel rounds are the CPU's"):
        PairedSequence([SimpleNamespace(op="rms_norm", shape={}, dtype="fp32", count=1)], "torch", "meta")
    with pytest.raises(RuntimeError, match="no round was run"):
        monkeypatch.setattr(e2e_paired, "PAIRED_MAX_BYTES", 2**30)
        fresh, _ = PairedSequence.for_point(TINY, batch=1, context=40, dtype="fp32", backend="torch", block_size=16)
        fresh.results()


def test_cpu_e2e_repeats_blocks_and_pairs_the_kernel_rounds() -> None:
    model = Transformer.random(TINY, device="cpu", dtype=torch.float32, backend="torch")
    m = measure_e2e(model, batch=2, context=40, steps=4, warmup=2, energy=False, profile=False, cpu_window_s=0.2)
    assert m.blocks > 1 and len(m.step_times_us) == m.steps == 4 * m.blocks
    assert m.paired_kernels is not None and m.paired_reason is None
    assert {c["rounds"] for c in m.paired_kernels} == {4 * m.blocks}
    assert any("paired kernel rounds" in n for n in m.notes)
    back = E2EMeasurement.from_dict(m.to_dict())
    assert back.paired_kernels == m.paired_kernels and back.blocks == m.blocks


def _point(ops: list[tuple[str, int, float]]) -> SimpleNamespace:
    shares = [SimpleNamespace(op=op, count=count, total_us=count * us) for op, count, us in ops]
    return SimpleNamespace(ops=shares, batch=1, tp=1)


def _overhead(host_us: float) -> Overhead:
    hw = HostWork(batch=1, per_step_us=host_us, p10_us=host_us, p90_us=host_us, kernel_calls=3, stub_call_us=0.3,
                  steps=10)
    return Overhead(model="tiny", device="cpu", kind="cpu", backend="torch", dtype="fp32", host_work=[hw],
                    dispatch=[], cpu_other_cores=0.0, notes=[])


def _paired(op: str, count: int, mean_us: float) -> dict:
    return PairedCall(op=op, shape={}, dtype="fp32", count=count, mean_us=mean_us, median_us=mean_us,
                      samples=10 * count, dropped=0, rounds=10).to_dict()


def test_the_cpu_prediction_takes_the_paired_kernel_sum_when_it_is_the_points() -> None:
    point = _point([("linear", 2, 100.0), ("rms_norm", 1, 10.0)])  # kernel phase: 210 us
    paired = [_paired("linear", 2, 120.0), _paired("rms_norm", 1, 15.0)]  # paired: 255 us
    pred, why = predict_step(point, _overhead(50.0), mode="eager", device_kind="cpu", paired=paired)
    assert why is None and pred.step_time_us == pytest.approx(255 + 50) and pred.kernel_sum_us == 255
    assert "10 rounds between the end-to-end blocks" in pred.source
    alone, _ = predict_step(point, _overhead(50.0), mode="eager", device_kind="cpu")
    assert alone.step_time_us == pytest.approx(210 + 50) and "no paired kernel rounds" in alone.source
    other = [_paired("linear", 3, 120.0), _paired("rms_norm", 1, 15.0)]  # another point's calls: not used
    mixed, _ = predict_step(point, _overhead(50.0), mode="eager", device_kind="cpu", paired=other)
    assert mixed.step_time_us == pytest.approx(260) and "not this point's calls" in mixed.source


def test_passes_of_one_point_merge_into_one_record() -> None:
    from tokprof.models.e2e import merge_measurements

    model = Transformer.random(TINY, device="cpu", dtype=torch.float32, backend="torch")
    a = measure_e2e(model, batch=1, context=40, steps=4, warmup=2, energy=False, profile=False, cpu_window_s=0.05)
    b = measure_e2e(model, batch=1, context=40, steps=4, warmup=2, energy=False, profile=False, cpu_window_s=0.05)
    m = merge_measurements([a, b])
    assert m.passes == 2 and m.blocks == a.blocks + b.blocks and m.step_times_us == a.step_times_us + b.step_times_us
    assert m.median_step_us == pytest.approx(float(np.median(a.step_times_us + b.step_times_us)))
    assert m.tokens_per_s_per_gpu == pytest.approx(1 / (m.median_step_us * 1e-6))
    assert {c["rounds"] for c in m.paired_kernels} == {a.paired_kernels[0]["rounds"] + b.paired_kernels[0]["rounds"]}
    assert m.notes[-1].startswith("merged: 2 passes")
    again = merge_measurements([m, a])  # a merged record merges on: the passes add up, one note says so
    assert again.passes == 3 and sum(n.startswith("merged: ") for n in again.notes) == 1
    other = measure_e2e(model, batch=2, context=40, steps=4, warmup=2, energy=False, profile=False, cpu_window_s=0)
    with pytest.raises(ValueError, match="passes of one item"):
        merge_measurements([a, other])
