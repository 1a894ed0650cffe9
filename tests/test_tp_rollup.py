"""Tensor-parallel roll-ups (issue 8): a tp=2 plan rolled up with modelled all-reduces, checked by hand; collective
times measured, modelled or unknown (with the reason); the L1i interconnect layer of the iceberg; the report."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from make_fixtures import timing_from_samples
from typer.testing import CliRunner

from tokprof import rollup
from tokprof.cli import app
from tokprof.models import ModelConfig
from tokprof.models.tp import split_collectives, tp_decode_calls
from tokprof.profiler.collectives import collective_roofline, interconnect
from tokprof.profiler.devices import load_specs
from tokprof.profiler.roofline import roofline
from tokprof.profiler.schema import (
    Ceilings,
    DeviceInfo,
    KernelMeasurement,
    Provenance,
    RunResult,
    load_run,
    save_run,
)
from tokprof.reports.render import render_report
from tokprof.rollup import PriceOptions, RollupPoint
from tokprof.rollup.interconnect import CollectiveOptions
from tokprof.rollup.reconcile import reconcile
from tokprof.rollup.step_model import StepModel

CFG = ModelConfig.from_name("llama-3.1-8b")
BATCH, CONTEXT = 8, 1024
H100 = load_specs()["h100-sxm"]
LINK_GBPS = 900.0 / 2  # H100 SXM NVLink: 900 GB/s over all links and both directions, per direction
# The step model without a per-step overhead and with a fixed 10 us per collective (the model these hand computations
# were written for); tests/test_step_model.py checks the overhead and the collective algorithms.
FLAT = StepModel().with_overrides({"step_overhead_us": {"graph": 0.0}, "launch_us": {"graph": 0.0},
                                   "collective_latency_us": 10.0})


def _hand_roof_us(flops: int, min_bytes: int) -> float:
    return max(flops / (H100.bf16_tflops * 1e12), min_bytes / (H100.hbm_tbps * 1e12)) * 1e6


def _hand_collectives_us(batch: int, efficiency: float, latency_us: float) -> tuple[float, float]:
    """(2 x layers all-reduces of the (B, 4096) bf16 partial sums, the logits all-gather), us per step, n = 2."""
    all_reduce = latency_us + batch * 4096 * 2 * (2 * 1 / 2) / (LINK_GBPS * 1e9 * efficiency) * 1e6
    all_gather = latency_us + batch * 128256 * 2 * (1 / 2) / (LINK_GBPS * 1e9 * efficiency) * 1e6
    return 2 * 32 * all_reduce, all_gather


def test_modelled_tp2_llama8b_on_h100_is_kernel_roofs_plus_modelled_all_reduces():
    (p,) = rollup.modelled(CFG, "h100", [BATCH], [CONTEXT], "bf16", 0.8, tp=2, step_model=FLAT)
    kernels, _ = split_collectives(tp_decode_calls(CFG, BATCH, CONTEXT, "bf16", tp=2))
    kernel_us = sum(c.count * _hand_roof_us(*c.cost()) / 0.8 for c in kernels)
    all_reduce_us, all_gather_us = _hand_collectives_us(BATCH, 0.7, 10.0)  # the stated defaults
    step = kernel_us + all_reduce_us + all_gather_us
    assert p.tp == 2 and p.provenance == "modelled" and p.collective_provenance == "modelled"
    assert p.step_time_us == pytest.approx(step, rel=1e-9)
    assert p.kernel_time_us == pytest.approx(kernel_us, rel=1e-9)
    assert p.collective_time_us == pytest.approx(all_reduce_us + all_gather_us, rel=1e-9)
    assert p.collective_share == pytest.approx((all_reduce_us + all_gather_us) / step, rel=1e-9)
    # a replica of 2 GPUs serves batch / step tokens/s: each GPU is credited with half of it
    replica = BATCH / (step * 1e-6)
    assert p.tokens_per_s_per_gpu == pytest.approx(replica / 2, rel=1e-9)
    assert p.tokens_per_s_per_user == pytest.approx(1 / (step * 1e-6), rel=1e-9)
    assert p.usd_per_million_tokens == pytest.approx(1.30 / (replica / 2 * 3600) * 1e6, rel=1e-9)
    assert p.tokens_per_s_per_mw == pytest.approx(replica / 2 * 1000 / 1.73, rel=1e-9)
    assert f"{700 * 2 * step * 1e-6 / BATCH:.3g} J/token" in p.energy_reason  # TDP bound counts both GPUs
    (ar,) = [o for o in p.ops if o.op == "all_reduce"]
    assert (ar.count, ar.bound, ar.shape) == (64, "interconnect", {"bytes": BATCH * 4096 * 2, "world": 2})
    roof = BATCH * 4096 * 2 / (LINK_GBPS * 1e9) * 1e6
    assert ar.efficiency_datasheet == pytest.approx(roof / ar.time_us, rel=1e-9)
    assert sum(o.share for o in p.ops) == pytest.approx(1.0)
    notes = " ".join(p.notes)
    assert "collectives modelled over nvlink (450 GB/s per direction" in notes and "fixed latency" in notes
    assert RollupPoint.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    # stated assumptions of one's own, and tp=1 unchanged: no collective fields, the single-GPU plan
    (q,) = rollup.modelled(CFG, "h100", [BATCH], [CONTEXT], "bf16", 0.8, tp=2, step_model=FLAT,
                           collectives=CollectiveOptions(efficiency=0.5, latency_us=3.0))
    assert q.collective_time_us == pytest.approx(sum(_hand_collectives_us(BATCH, 0.5, 3.0)), rel=1e-9)
    (one,) = rollup.modelled(CFG, "h100", [BATCH], [CONTEXT], "bf16", 0.8, step_model=FLAT)
    assert (one.tp, one.collective_time_us, one.kernel_time_us) == (1, None, None)
    assert not any(o.op == "all_reduce" for o in one.ops)


def _cpu_run(cfg: ModelConfig, batch: int, context: int, tp: int, seed: int) -> RunResult:
    """A CPU run holding a synthetic measurement of every kernel call of one GPU's tp plan (nothing is timed)."""
    rng = random.Random(seed)
    device = DeviceInfo(kind="cpu", name="Test CPU")
    run = RunResult(provenance=Provenance(host="h", device=device, versions={}, git_sha=None,
                                          timestamp_utc="2026-01-01T00:00:00Z", command=["test"]))
    run.model = cfg.to_dict()
    kernels, _ = split_collectives(tp_decode_calls(cfg, batch, context, "fp32", tp=tp))
    for c in kernels:
        t = rng.uniform(5.0, 50.0)
        flops, min_bytes = c.cost()
        run.kernels.append(KernelMeasurement(
            op=c.op, shape=dict(c.shape), dtype="fp32", backend="torch", device=device.name,
            timing=timing_from_samples([t * f for f in (0.99, 1.0, 1.01)], mode="events"),
            roofline=roofline(flops, min_bytes, t, spec=None, ceilings=None, dtype="fp32")))
    return run


def _collective_measurement(op: str, nbytes: int, world: int, time_us: float, backend: str, device: str,
                            dtype: str, link=None) -> KernelMeasurement:
    return KernelMeasurement(op=op, shape={"bytes": nbytes, "world": world}, dtype=dtype, backend=backend,
                             device=device, timing=timing_from_samples([time_us * f for f in (0.98, 1.0, 1.02)]),
                             roofline=collective_roofline(op, nbytes, world, 2 if dtype == "bf16" else 4, time_us,
                                                          link, "a CPU run (gloo): no interconnect spec"))


def test_cpu_tp2_collectives_unknown_named_gpu_modelled_or_measured():
    cfg = ModelConfig.from_name("tiny")
    run = _cpu_run(cfg, 2, 64, 2, seed=11)
    kernel_us = sum(c.count * k.time_us for c in split_collectives(tp_decode_calls(cfg, 2, 64, "fp32", 2))[0]
                    for k in run.kernels if k.key() == (c.op, tuple(sorted(c.shape.items())), "fp32", "torch"))
    prices = PriceOptions(usd_per_gpu_hour=2.0)
    (p,), notes = rollup.rollup_points(cfg, [2], [64], run, backend="torch", dtype="fp32", prices=prices, tp=2)
    assert notes == []
    # no interconnect spec for a CPU: the collective time is unknown, said why, and the step counts kernels only
    assert p.collective_time_us is None and p.collective_provenance is None
    assert "no spec row" in p.collective_reason and "interconnect_gpu" in p.collective_reason
    assert p.step_time_us == pytest.approx(kernel_us, rel=1e-12) and p.kernel_time_us == p.step_time_us
    assert p.tokens_per_s_per_gpu == pytest.approx(2 / (kernel_us * 1e-6) / 2)
    assert any("upper bound" in n for n in p.notes)
    # a GPU named for the modelled collectives
    named = CollectiveOptions(interconnect_gpu="h100-sxm", efficiency=0.6, latency_us=5.0)
    (m,), _ = rollup.rollup_points(cfg, [2], [64], run, backend="torch", dtype="fp32", prices=prices, tp=2,
                                   collectives=named)
    ar = 5.0 + 2 * 256 * 4 / (LINK_GBPS * 1e9 * 0.6) * 1e6  # (B, hidden) fp32 partial sums, busbw factor 1
    ag = 5.0 + 2 * 512 * 4 * 0.5 / (LINK_GBPS * 1e9 * 0.6) * 1e6  # (B, vocab) fp32 logits, factor 1/2
    assert m.collective_provenance == "modelled"
    assert m.collective_time_us == pytest.approx(2 * 2 * ar + ag, rel=1e-9)
    assert m.step_time_us == pytest.approx(kernel_us + 2 * 2 * ar + ag, rel=1e-9)
    assert any("h100-sxm interconnect (named)" in n for n in m.notes)
    # the run's own (gloo) measurements of both sizes: measured, and used instead of any model
    t_ar, t_ag = random.Random(3).uniform(40, 90), random.Random(4).uniform(40, 90)
    run.kernels += [_collective_measurement("all_reduce", 2 * 256 * 4, 2, t_ar, "gloo", "Test CPU", "fp32"),
                    _collective_measurement("all_gather", 2 * 512 * 4, 2, t_ag, "gloo", "Test CPU", "fp32")]
    (g,), _ = rollup.rollup_points(cfg, [2], [64], run, backend="torch", dtype="fp32", prices=prices, tp=2)
    assert g.collective_provenance == "measured"
    assert g.collective_time_us == pytest.approx(4 * t_ar + t_ag, rel=1e-9)
    assert all(o.efficiency_datasheet is None for o in g.ops if o.bound == "interconnect")  # no link on a CPU
    # ... but not where another interconnect is named: gloo on a CPU does not time NVLink
    (n,), _ = rollup.rollup_points(cfg, [2], [64], run, backend="torch", dtype="fp32", prices=prices, tp=2,
                                   collectives=named)
    assert n.collective_provenance == "modelled" and n.collective_time_us == pytest.approx(m.collective_time_us)


def test_bottom_up_at_tp2_measures_only_the_kernel_calls():
    cfg = ModelConfig.from_name("tiny")
    fast = {"min_samples": 3, "min_time_s": 0.0, "max_time_s": 0.02, "warmup_ms": 0.0}
    points, run = rollup.bottom_up(cfg, [2], [32], "torch", "cpu", dtype="fp32", timing_kwargs=fast, ceilings=None,
                                   prices=PriceOptions(usd_per_gpu_hour=2.0), command=["test"], progress=False,
                                   tp=2, collectives=CollectiveOptions(interconnect_gpu="h200"))
    kernels, colls = split_collectives(tp_decode_calls(cfg, 2, 32, "fp32", 2))
    assert {k.key()[:2] for k in run.kernels} == {(c.op, tuple(sorted(c.shape.items()))) for c in kernels}
    assert not any(k.op in ("all_reduce", "all_gather") for k in run.kernels)
    (p,) = points
    assert p.tp == 2 and p.collective_provenance == "modelled" and len(colls) == 2
    assert p.kernel_time_us == pytest.approx(sum(o.total_us for o in p.ops if o.bound != "interconnect"))
    assert run.rollup[0]["tp"] == 2 and "at tp=2" in run.notes[-1]


def _h100_run(points: list[RollupPoint], ceilings: bool = True) -> RunResult:
    device = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", spec_key="h100-sxm")
    run = RunResult(provenance=Provenance(host="h", device=device, versions={}, git_sha=None,
                                          timestamp_utc="2026-01-01T00:00:00Z", command=["test"]))
    run.model = CFG.to_dict()
    if ceilings:
        run.ceilings = Ceilings(copy_gbps=3000.0, gemm_tflops=800.0, gemm_dtype="bf16", copy_bytes=2 << 30,
                                gemm_shape=[8192] * 3, device=device.name, measured_utc="2026-01-01")
    run.rollup = [p.to_dict() for p in points]
    return run


def test_a_measured_tp2_point_projects_with_modelled_collectives_on_the_target(tmp_path: Path):
    run = _h100_run([])
    kernels, _ = split_collectives(tp_decode_calls(CFG, BATCH, CONTEXT, "bf16", tp=2))
    rng = random.Random(7)
    for c in kernels:  # synthetic measurements at 50-90% of the measured roof
        flops, min_bytes = c.cost()
        t = max(flops / 800e12, min_bytes / 3000e9) * 1e6 / rng.uniform(0.5, 0.9)
        run.kernels.append(KernelMeasurement(
            op=c.op, shape=dict(c.shape), dtype="bf16", backend="triton", device=run.provenance.device.name,
            timing=timing_from_samples([t] * 3),
            roofline=roofline(flops, min_bytes, t, spec=H100, ceilings=run.ceilings, dtype="bf16")))
    points, notes = rollup.rollup_points(CFG, [BATCH], [CONTEXT], run, backend="triton", dtype="bf16", tp=2)
    assert notes == [] and points[0].collective_provenance == "modelled"  # no NCCL measurement in the run
    run.rollup = [p.to_dict() for p in points]
    (pj,) = rollup.project(run, "h200", step_model=FLAT)  # the measured point's tp carried over
    h200 = load_specs()["h200"]
    by_key = {k.key(): k for k in run.kernels}
    want = sum(c.count * max(c.cost()[0] / (h200.bf16_tflops * 1e12), c.cost()[1] / (h200.hbm_tbps * 1e12)) * 1e6
               / by_key[(c.op, tuple(sorted(c.shape.items())), "bf16", "triton")].roofline.efficiency_datasheet
               for c in kernels)
    assert (pj.tp, pj.provenance, pj.collective_provenance) == (2, "projected", "modelled")
    assert pj.kernel_time_us == pytest.approx(want, rel=1e-9)
    link = 900.0 / 2  # H200 NVLink, like H100's
    assert pj.collective_time_us == pytest.approx(64 * (10 + BATCH * 4096 * 2 / (link * 1e9 * 0.7) * 1e6)
                                                  + 10 + BATCH * 128256 * 2 * 0.5 / (link * 1e9 * 0.7) * 1e6)
    # the command picks the run's tp when --tp is not given
    path = save_run(run, tmp_path / "run.json")
    result = CliRunner().invoke(app, ["rollup", "--from", str(path), "--gpu", "h200"])
    assert result.exit_code == 0, result.output
    (point,) = json.loads(result.stdout.strip().splitlines()[-1])["points"]
    assert point["tp"] == 2 and point["kernel_time_us"] == pytest.approx(pj.kernel_time_us)


def test_reconcile_tp2_has_the_interconnect_layer_and_shares_sum_to_one():
    (p2,) = rollup.modelled(CFG, "h100", [BATCH], [CONTEXT], "bf16", 0.8, tp=2, step_model=FLAT)
    (p1,) = rollup.modelled(CFG, "h100", [BATCH], [CONTEXT], "bf16", 0.8, step_model=FLAT)
    recs = {r.tp: r for r in reconcile(_h100_run([p1, p2]))}
    assert [layer.name for layer in recs[1].layers] == ["L0", "L1", "L2", "L3", "L4", "L5"]  # tp=1 unchanged
    rec = recs[2]
    assert [layer.name for layer in rec.layers] == ["L0", "L1", "L1i", "L2", "L3", "L4", "L5"]
    kernels, _ = split_collectives(tp_decode_calls(CFG, BATCH, CONTEXT, "bf16", tp=2))
    l1 = sum(c.count * max(c.cost()[0] / 800e12, c.cost()[1] / 3000e9) * 1e6 for c in kernels)
    coll_roof = 64 * BATCH * 4096 * 2 / (LINK_GBPS * 1e9) * 1e6 + BATCH * 128256 * 2 * 0.5 / (LINK_GBPS * 1e9) * 1e6
    want = {"L1": l1, "L1i": l1 + coll_roof, "L2": p2.step_time_us}
    for name, step in want.items():
        layer = rec.layer(name)
        assert layer.step_time_us == pytest.approx(step, rel=1e-9), name
        assert layer.tokens_per_s_per_gpu == pytest.approx(BATCH / (step * 1e-6) / 2, rel=1e-9), name
    assert rec.layer("L1i").provenance == "modelled" and "link roof" in rec.layer("L1i").source
    assert [layer.gap_name for layer in rec.layers[:4]] == [None, "hardware derate", "interconnect (all-reduce)",
                                                            # p2 is modelled: its L2 gap is the stated efficiency
                                                            "assumed kernel and collective efficiency (modelled)"]
    assert math.isclose(sum(layer.gap_share for layer in rec.layers if layer.gap_share is not None), 1.0,
                        rel_tol=1e-12)
    assert "single-GPU" in rec.layer("L3").reason and rec.bottom_up_error_pct is None
    # the L1i -> L2 gap is filled exactly by the kernels' and the collectives' losses
    assert sum(o.lost_us for o in rec.op_inefficiency) == pytest.approx(p2.step_time_us - (l1 + coll_roof))
    (ar,) = [o for o in rec.op_inefficiency if o.op == "all_reduce"]
    assert ar.time_us_at_roof == pytest.approx(64 * BATCH * 4096 * 2 / (LINK_GBPS * 1e9) * 1e6)
    assert not any("another plan" in n for n in rec.notes)
    # without ceilings L1i stands on L0, and its gap is still the interconnect alone
    rec0 = next(r for r in reconcile(_h100_run([p2], ceilings=False)) if r.tp == 2)
    assert rec0.layer("L1i").step_time_us == pytest.approx(rec0.layer("L0").step_time_us + coll_roof, rel=1e-9)
    assert rec0.layer("L1i").gap_name == "interconnect (all-reduce)"
    assert rec0.layer("L2").gap_name == "hardware derate + assumed kernel and collective efficiency (modelled)"


def test_report_of_a_tp2_run_shows_the_interconnect_layer(tmp_path: Path):
    (p2,) = rollup.modelled(CFG, "h100", [BATCH], [CONTEXT], "bf16", 0.8, tp=2, step_model=FLAT)
    run = _h100_run([p2])
    run.reconciliation = [r.to_dict() for r in reconcile(run)]
    link = interconnect(H100)
    run.kernels = [_collective_measurement("all_reduce", 1 << 20, 2, 5.2, "nccl", run.provenance.device.name,
                                           "bf16", link)]
    report = render_report([save_run(run, tmp_path / "run.json")], tmp_path / "out")
    names = [f.name for f in report.figures]
    # no roofline: collectives only
    assert names == ["pareto.png", "op_share_R1.png", "iceberg_R1_b8_c1024_h100-sxm_tp2.png"]
    md = report.markdown.read_text()
    assert "L1i" in md and "interconnect (all-reduce)" in md and "interconnect at the link roof" in md
    assert "llama-3.1-8b on h100-sxm x2 (tp=2), batch 8, context 1024" in md
    assert "## Roofline and kernels" in md and "collectives only: see their table" in md
    row = next(line for line in md.splitlines() if line.startswith("| R1 | all_reduce | 1,048,576 |"))
    busbw = (1 << 20) / 5.2e-6 / 1e9  # factor 2(n-1)/n = 1 at n = 2
    assert f"| {busbw:,.0f} |" in row and f"{busbw / LINK_GBPS * 100:.1f}%" in row
    assert "### Tensor-parallel points: interconnect" in md and "h100-sxm (tp=2)" in md
    tp_row = next(line for line in md.splitlines()
                  if line.startswith("| R1 | modelled | h100-sxm | llama-3.1-8b | 2 |"))
    assert f"{p2.collective_time_us / p2.step_time_us * 100:.1f}%" in tp_row
    assert load_run(tmp_path / "run.json").reconciliation[0]["tp"] == 2


def test_cli_rollup_modelled_70b_tp4_shows_the_all_reduce_share():
    result = CliRunner().invoke(app, ["rollup", "--model", "llama-3.1-70b", "--gpu", "h100", "--modelled", "--tp",
                                      "4", "--batch", "1,64", "--context", "1024"])
    assert result.exit_code == 0, result.output
    assert "tensor parallel over 4 GPUs" in result.stdout and "all-reduce" in result.stdout
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["card"]["tp"] == 4
    for p in doc["points"]:
        assert p["tp"] == 4 and p["collective_provenance"] == "modelled"
        step = p["kernel_time_us"] + p["collective_time_us"] + p["overhead_time_us"]  # the step model's overhead
        assert p["overhead_time_us"] > 100 and step == pytest.approx(p["step_time_us"])
        assert p["tokens_per_s_per_gpu"] == pytest.approx(p["batch"] / (p["step_time_us"] * 1e-6) / 4)
    bad = CliRunner().invoke(app, ["rollup", "--model", "llama-3.1-70b", "--gpu", "h100", "--modelled", "--tp", "3"])
    assert bad.exit_code != 0 and "tp: expected a divisor of num_heads 64" in " ".join(bad.output.split())
