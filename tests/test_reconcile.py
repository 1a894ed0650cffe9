"""The iceberg arithmetic on a RunResult built by hand: every layer against a hand count, gaps that add up, shares
that sum to 100%, per-op inefficiency that fills the L1 -> L2 gap exactly, and the signed bottom-up error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tokprof.models.config import ModelConfig
from tokprof.models.e2e import E2EMeasurement
from tokprof.models.plan import decode_plan
from tokprof.profiler.devices import load_specs
from tokprof.profiler.schema import Ceilings, DeviceInfo, Provenance, RunResult, load_run, save_run
from tokprof.rollup.reconcile import Reconciliation, reconcile, waterfall_rows
from tokprof.rollup.records import OpShare, RollupPoint

CFG = ModelConfig.from_name("llama-3.1-8b")
BATCH, CONTEXT = 8, 1024
COPY_GBPS, GEMM_TFLOPS = 3000.0, 800.0
USD = 1.30
# Per-op efficiency against the measured roof, different per op so the per-op split is not uniform.
EFF = {"linear": 0.8, "decode_attention": 0.6, "rms_norm": 0.5, "rope": 0.4, "append_kv": 0.3, "swiglu": 0.5,
       "embedding": 0.2, "greedy_sample": 0.25}


def _roof_us(flops: int, min_bytes: int, tflops: float, gbps: float) -> float:
    return max(flops / (tflops * 1e12), min_bytes / (gbps * 1e9)) * 1e6


def _point(batch: int, gpu: str = "h100-sxm", provenance: str = "measured") -> RollupPoint:
    ops = []
    for call in decode_plan(CFG, batch, CONTEXT, "bf16"):
        flops, min_bytes = call.cost()
        t = _roof_us(flops, min_bytes, GEMM_TFLOPS, COPY_GBPS) / EFF[call.op]
        ops.append(OpShare(op=call.op, label=call.label, count=call.count, time_us=t, total_us=call.count * t,
                           share=0.0, shape=dict(call.shape)))
    step = sum(o.total_us for o in ops)
    return RollupPoint(model=CFG.name, gpu=gpu, batch=batch, context=CONTEXT, dtype="bf16", backend="triton",
                       provenance=provenance, step_time_us=step, tokens_per_s_per_gpu=batch / (step * 1e-6),
                       tokens_per_s_per_user=1 / (step * 1e-6), j_per_token_total=0.5, usd_per_gpu_hour=USD,
                       usd_per_million_tokens=USD / (batch / (step * 1e-6) * 3600) * 1e6, ops=ops)


def _e2e(framework: str, mode: str, step_us: float, j: float | None, batch: int = BATCH) -> E2EMeasurement:
    times = [step_us * f for f in (0.99, 1.0, 1.01)]
    return E2EMeasurement(model=CFG.name, gpu="h100-sxm", framework=framework, mode=mode,
                          backend="triton" if framework == "tokprof" else framework, dtype="bf16", batch=batch,
                          context=CONTEXT, steps=3, step_times_us=times, median_step_us=step_us,
                          p90_step_us=times[-1], tokens_per_s_per_gpu=batch / (step_us * 1e-6),
                          tokens_per_s_per_user=1 / (step_us * 1e-6), ttft_ms=50.0, j_per_token=j,
                          energy_reason="measured" if j else "no NVML")


def _run() -> tuple[RunResult, RollupPoint]:
    device = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", spec_key="h100-sxm")
    run = RunResult(provenance=Provenance(host="h", device=device, versions={}, git_sha=None,
                                          timestamp_utc="2026-01-01T00:00:00Z", command=["test"]))
    run.model = CFG.to_dict()
    run.ceilings = Ceilings(copy_gbps=COPY_GBPS, gemm_tflops=GEMM_TFLOPS, gemm_dtype="bf16", copy_bytes=2 << 30,
                            gemm_shape=[8192] * 3, device="NVIDIA H100 80GB HBM3", measured_utc="2026-01-01")
    point = _point(BATCH)
    run.rollup = [point.to_dict(), _point(BATCH, gpu="h200", provenance="projected").to_dict()]
    step = point.step_time_us
    run.e2e = [_e2e("tokprof", "graph", step * 1.04, 0.52).to_dict(),
               _e2e("tokprof", "eager", step * 1.25, 0.6).to_dict(),
               _e2e("transformers", "eager", step * 3.0, None).to_dict(),
               _e2e("tokprof", "eager", 5000.0, None, batch=1).to_dict()]
    return run, point


def _find(recs: list[Reconciliation], gpu: str, batch: int) -> Reconciliation:
    return next(r for r in recs if r.gpu == gpu and r.batch == batch)


def test_layers_against_hand_counts() -> None:
    run, point = _run()
    rec = _find(reconcile(run, utilisation=0.5), "h100-sxm", BATCH)
    spec = load_specs()["h100-sxm"]
    plan = decode_plan(CFG, BATCH, CONTEXT, "bf16")
    l0 = sum(c.count * _roof_us(*c.cost(), spec.bf16_tflops, spec.hbm_tbps * 1e3) for c in plan)
    l1 = sum(c.count * _roof_us(*c.cost(), GEMM_TFLOPS, COPY_GBPS) for c in plan)
    want = {"L0": l0, "L1": l1, "L2": point.step_time_us, "L3": point.step_time_us * 1.04,
            "L4": point.step_time_us * 1.25, "L5": point.step_time_us * 1.25 / 0.5}
    for name, step in want.items():
        layer = rec.layer(name)
        assert layer.step_time_us == pytest.approx(step, rel=1e-9), name
        assert layer.tokens_per_s_per_gpu == pytest.approx(BATCH / (step * 1e-6), rel=1e-9), name
        assert layer.usd_per_million_tokens == pytest.approx(USD / (BATCH / (step * 1e-6) * 3600) * 1e6), name
    # The waterfall falls: datasheet > measured roof > kernel sum > graphs > eager > served.
    tps = [rec.layer(n).tokens_per_s_per_gpu for n in ("L0", "L1", "L2", "L3", "L4", "L5")]
    assert tps == sorted(tps, reverse=True)
    assert [rec.layer(n).provenance for n in ("L0", "L1", "L2", "L3", "L4", "L5")] == \
        ["modelled", "modelled", "measured", "measured", "measured", "modelled"]
    # J/token: TDP x roofline time at L0/L1, measured at L2..L4, L4 plus idle power over the idle half at L5.
    assert rec.layer("L0").j_per_token == pytest.approx(spec.tdp_w * l0 * 1e-6 / BATCH)
    assert rec.layer("L2").j_per_token == 0.5 and rec.layer("L3").j_per_token == 0.52
    step4 = point.step_time_us * 1.25
    assert rec.layer("L5").j_per_token == pytest.approx(0.6 + spec.idle_w * step4 * 1e-6 / BATCH)


def test_gaps_add_up_and_shares_sum_to_one() -> None:
    run, _ = _run()
    rec = _find(reconcile(run, utilisation=0.5), "h100-sxm", BATCH)
    layers = rec.layers
    for prev, cur in zip(layers, layers[1:], strict=False):
        assert cur.gap_tokens_per_s == pytest.approx(prev.tokens_per_s_per_gpu - cur.tokens_per_s_per_gpu)
    assert [layer.gap_name for layer in layers] == [None, "hardware derate", "kernel inefficiency",
                                                    "launch gaps and synchronisation", "host and framework overhead",
                                                    "idle capacity"]
    assert math.isclose(sum(layer.gap_share for layer in layers[1:]), 1.0, rel_tol=1e-12)
    total = layers[0].tokens_per_s_per_gpu - layers[-1].tokens_per_s_per_gpu
    assert layers[2].gap_share == pytest.approx((layers[1].tokens_per_s_per_gpu - layers[2].tokens_per_s_per_gpu)
                                                / total)


def test_op_inefficiency_fills_the_l1_l2_gap() -> None:
    run, point = _run()
    rec = _find(reconcile(run), "h100-sxm", BATCH)
    gap_us = rec.layer("L2").step_time_us - rec.layer("L1").step_time_us
    ops = rec.op_inefficiency
    assert len(ops) == len(point.ops)
    assert sum(o.lost_us for o in ops) == pytest.approx(gap_us, rel=1e-9)
    assert sum(o.share_of_L1_L2_gap for o in ops) == pytest.approx(1.0, rel=1e-9)
    assert [o.lost_us for o in ops] == sorted((o.lost_us for o in ops), reverse=True)
    for o in ops:  # lost = measured x (1 - efficiency)
        share = next(s for s in point.ops if s.op == o.op and s.label == o.label)
        assert o.lost_us == pytest.approx(share.total_us * (1 - EFF[o.op]), rel=1e-9)


def test_bottom_up_error_is_signed_and_against_graphs() -> None:
    run, _ = _run()
    rec = _find(reconcile(run), "h100-sxm", BATCH)
    assert rec.bottom_up_error_against == "L3"
    assert rec.bottom_up_error_pct == pytest.approx(4.0, rel=1e-9)  # the kernel sum promises 4% more tokens/s
    assert rec.energy_error_pct == pytest.approx((0.5 - 0.52) / 0.52 * 100)
    # Without the graph run the error is taken against tokprof eager.
    run.e2e = [d for d in run.e2e if d["mode"] != "graph"]
    rec = _find(reconcile(run), "h100-sxm", BATCH)
    assert rec.bottom_up_error_against == "L4"
    assert rec.bottom_up_error_pct == pytest.approx(25.0, rel=1e-9)
    assert rec.layer("L4").gap_name == "launch gaps and synchronisation + host and framework overhead"
    assert sum(layer.gap_share for layer in rec.layers if layer.gap_share is not None) == pytest.approx(1.0)


def test_l5_not_applied_without_utilisation_and_l4_choice() -> None:
    run, point = _run()
    rec = _find(reconcile(run), "h100-sxm", BATCH)
    assert rec.utilisation is None and rec.layer("L5").tokens_per_s_per_gpu is None
    assert "no utilisation stated" in rec.layer("L5").reason
    assert any("L5 not applied" in n for n in rec.notes)
    assert any("transformers" in n for n in rec.notes)  # the framework not used for L4 is still reported
    rec = _find(reconcile(run, l4_framework="transformers"), "h100-sxm", BATCH)
    assert rec.layer("L4").step_time_us == pytest.approx(point.step_time_us * 3.0)
    for bad in (0, 1.5, -0.2, True):
        with pytest.raises(ValueError, match="utilisation"):
            reconcile(run, utilisation=bad)
    with pytest.raises(ValueError, match="l4_framework"):
        reconcile(run, l4_framework="tensorrt")


def test_points_without_measurements_say_why() -> None:
    run, _ = _run()
    recs = reconcile(run)
    assert {(r.gpu, r.batch) for r in recs} == {("h100-sxm", BATCH), ("h200", BATCH), ("h100-sxm", 1)}
    projected = _find(recs, "h200", BATCH)
    assert projected.layer("L0").tokens_per_s_per_gpu is not None  # the H200 datasheet
    assert "measured on h100-sxm" in projected.layer("L1").reason
    assert projected.layer("L2").provenance == "projected"
    assert projected.layer("L3").tokens_per_s_per_gpu is None and projected.bottom_up_error_pct is None
    e2e_only = _find(recs, "h100-sxm", 1)
    assert "no roll-up point" in e2e_only.layer("L2").reason
    assert e2e_only.layer("L4").tokens_per_s_per_gpu == pytest.approx(1 / 5000e-6)
    assert e2e_only.layer("L4").usd_per_million_tokens is None  # the price comes from the roll-up point
    rows = waterfall_rows(e2e_only)
    assert [r["layer"][:2] for r in rows] == ["L0", "L1", "L2", "L3", "L4", "L5"]
    assert rows[2]["tokens/s/GPU"] == "-" and "no roll-up point" in rows[2]["provenance / why"]


def test_round_trip_through_the_run_file(tmp_path: Path) -> None:
    run, _ = _run()
    recs = reconcile(run, utilisation=0.6)
    run.reconciliation = [r.to_dict() for r in recs]
    loaded = load_run(save_run(run, tmp_path / "run.json"))
    back = [Reconciliation.from_dict(d) for d in loaded.reconciliation]
    assert back == recs
    assert reconcile(loaded, utilisation=0.6) == recs
