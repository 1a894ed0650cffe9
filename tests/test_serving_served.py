"""L5 served in the iceberg: predicted by the simulator from a run's own end-to-end steps, measured from a
serve-bench document, its gap split, and the stated utilisation kept as an override."""

from __future__ import annotations

import pytest

from tokprof.models.e2e import E2EMeasurement
from tokprof.profiler.schema import DeviceInfo, Provenance, RunResult
from tokprof.rollup.reconcile import reconcile
from tokprof.serving.served import provider, run_step_table

MODEL, GPU, CTX = "llama-3.1-8b", "h100-sxm", 256
STEP_US = {1: 6000.0, 8: 7000.0}


def _run() -> RunResult:
    device = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", spec_key=GPU)
    run = RunResult(provenance=Provenance(host="h", device=device, versions={}, git_sha=None,
                                          timestamp_utc="2026-01-01T00:00:00Z", command=["test"]))
    for batch, step in STEP_US.items():
        run.e2e.append(E2EMeasurement(
            model=MODEL, gpu=GPU, framework="tokprof", mode="eager", backend="triton", dtype="bf16", batch=batch,
            context=CTX, steps=3, step_times_us=[step] * 3, median_step_us=step, p90_step_us=step,
            tokens_per_s_per_gpu=batch / (step * 1e-6), tokens_per_s_per_user=1 / (step * 1e-6),
            ttft_ms=10.0).to_dict())
    return run


def test_step_table_from_the_run():
    table, label = run_step_table(_run(), MODEL, GPU, "bf16")
    assert label == "end to end, tokprof eager" and table.batches == [1, 8] and table.contexts == [CTX]
    assert table.decode_time_s(8, CTX) == pytest.approx(0.007)
    assert table.prefill_time_s(4.5) == pytest.approx(0.0065)  # a chunk of n tokens as a decode of n rows


def test_l5_predicted_with_its_gap_split():
    recs = reconcile(_run(), served=provider())
    rec = next(r for r in recs if r.batch == 8)
    l4, l5 = rec.layer("L4"), rec.layer("L5")
    assert l5.title.startswith("served") and l5.provenance == "modelled" and "simulator" in l5.source
    assert 0 < l5.tokens_per_s_per_gpu < l4.tokens_per_s_per_gpu
    assert l5.step_time_us == pytest.approx(8 / l5.tokens_per_s_per_gpu * 1e6)
    names = [c["name"] for c in l5.causes]
    assert names == ["idle between arrivals", "batching below capacity", "prefill interference", "preemption",
                     "other"]
    assert sum(c["share"] for c in l5.causes) == pytest.approx(1.0)
    assert sum(c["tokens_per_s"] for c in l5.causes) == pytest.approx(l4.tokens_per_s_per_gpu -
                                                                       l5.tokens_per_s_per_gpu, rel=1e-6)
    assert l5.gap_name.startswith("serving: idle between arrivals")
    # the stated utilisation stays the explicit override
    over = next(r for r in reconcile(_run(), 0.5, served=provider()) if r.batch == 8).layer("L5")
    assert over.tokens_per_s_per_gpu == pytest.approx(l4.tokens_per_s_per_gpu * 0.5) and over.causes == []


def test_l5_measured_from_serve_bench():
    summary = {"output_tokens_per_s_per_gpu": 321.0, "slo_met": True}
    bench = {"model": MODEL, "gpu": GPU, "options": {"max_num_seqs": 8}, "slo_text": "TTFT <= 2 s",
             "points": [{"rate_per_s": 1.0, "measured": summary, "causes_measured": []},
                        {"rate_per_s": 3.0, "measured": {**summary, "output_tokens_per_s_per_gpu": 999.0,
                                                          "slo_met": False}}]}
    rec = next(r for r in reconcile(_run(), served=provider(bench)) if r.batch == 8)
    l5 = rec.layer("L5")
    assert l5.provenance == "measured" and l5.tokens_per_s_per_gpu == pytest.approx(321.0)
    assert "1 req/s" in l5.source
    other = next(r for r in reconcile(_run(), served=provider(bench)) if r.batch == 1).layer("L5")
    assert other.provenance == "modelled"  # the bench ran at max_num_seqs 8, not 1: predicted instead
