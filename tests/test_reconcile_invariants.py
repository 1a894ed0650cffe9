"""A reconciliation that cannot contradict itself, on runs built by hand: inverted layers flagged with their cause,
op losses as shares that add up, no negative finding, contended CPU runs unreliable; and the L3/L4 predictions,
computed from the kernel sum and the overhead record without the end-to-end figures."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from tokprof.models.config import ModelConfig
from tokprof.models.e2e import E2EMeasurement
from tokprof.models.e2e_command import print_reconciliation
from tokprof.models.plan import decode_plan
from tokprof.profiler.overhead import DispatchCost, HostWork, Overhead
from tokprof.profiler.schema import Ceilings, DeviceInfo, Provenance, RunResult
from tokprof.rollup.reconcile import reconcile
from tokprof.rollup.records import OpShare, RollupPoint
from tokprof.rollup.step_model import StepModel
from tokprof.rollup.step_prediction import GPU_BOOKKEEPING_KERNELS, GPU_TINY_KERNEL_US
from tokprof.runner import prediction_line, prediction_summary

CPU = "AMD EPYC"
TINY = ModelConfig.from_name("tiny")
COPY_GBPS, GEMM_TFLOPS = 20.0, 0.1
HOST_US = 150.0


def _roof_us(call) -> float:
    flops, min_bytes = call.cost()
    return max(flops / (GEMM_TFLOPS * 1e12), min_bytes / (COPY_GBPS * 1e9)) * 1e6


def _point(batch: int, context: int, eff: dict[str, float], gpu: str = CPU) -> RollupPoint:
    """A measured point whose op times are roof / eff[op] (eff > 1: faster than the measured roof)."""
    ops = []
    for call in decode_plan(TINY, batch, context, "fp32"):
        t = _roof_us(call) / eff.get(call.op, 0.5) + 20.0 * (eff.get(call.op, 0.5) <= 1)  # dispatch-bound CPU ops
        ops.append(OpShare(op=call.op, label=call.label, count=call.count, time_us=t, total_us=call.count * t,
                           share=0.0, shape=dict(call.shape)))
    step = sum(o.total_us for o in ops)
    return RollupPoint(model=TINY.name, gpu=gpu, batch=batch, context=context, dtype="fp32", backend="torch",
                       provenance="measured", step_time_us=step, tokens_per_s_per_gpu=batch / (step * 1e-6),
                       tokens_per_s_per_user=1 / (step * 1e-6), ops=ops)


def _e2e(batch: int, context: int, step_us: float, gpu: str = CPU, mode: str = "eager",
         backend: str = "torch") -> E2EMeasurement:
    return E2EMeasurement(model=TINY.name, gpu=gpu, framework="tokprof", mode=mode, backend=backend, dtype="fp32",
                          batch=batch, context=context, steps=3, step_times_us=[step_us] * 3, median_step_us=step_us,
                          p90_step_us=step_us, tokens_per_s_per_gpu=batch / (step_us * 1e-6),
                          tokens_per_s_per_user=1 / (step_us * 1e-6), ttft_ms=1.0)


def _overhead(kind: str = "cpu") -> Overhead:
    return Overhead(model=TINY.name, device=CPU, kind=kind, backend="torch", dtype="fp32",
                    host_work=[HostWork(batch=1, per_step_us=HOST_US, p10_us=140.0, p90_us=160.0, kernel_calls=24,
                                        stub_call_us=0.2, steps=100)],
                    dispatch=[DispatchCost(op=op, shape={}, per_call_us=5.0, p10_us=4.0, p90_us=6.0, calls=100)
                              for op in {c.op for c in decode_plan(TINY, 1, 16, "fp32")}])


def _run(points: list[RollupPoint], e2e: list[E2EMeasurement], kind: str = "cpu",
         cpu_load: dict | None = None) -> RunResult:
    name = CPU if kind == "cpu" else "NVIDIA H100 80GB HBM3"
    device = DeviceInfo(kind=kind, name=name, spec_key=None if kind == "cpu" else "h100-sxm")
    run = RunResult(provenance=Provenance(host="h", device=device, versions={}, git_sha=None,
                                          timestamp_utc="2026-01-01T00:00:00Z", command=["test"]))
    run.model = TINY.to_dict()
    run.ceilings = Ceilings(copy_gbps=COPY_GBPS, gemm_tflops=GEMM_TFLOPS, gemm_dtype="fp32", copy_bytes=1 << 30,
                            gemm_shape=[1024] * 3, device=name, measured_utc="2026-01-01")
    run.rollup = [p.to_dict() for p in points]
    run.e2e = [m.to_dict() for m in e2e]
    run.overhead = _overhead(kind).to_dict()
    run.cpu_load = cpu_load
    return run


# ---------------------------------------------------------------------------------------------------- invariants


def test_l2_beating_l1_is_flagged_with_its_cause_and_never_a_share() -> None:
    # Every op at 150% of its measured roof: the kernel sum beats the measured roofline (the llama-3.2-1b CPU case).
    point = _point(1, 128, dict.fromkeys(("linear", "decode_attention", "rms_norm", "rope", "append_kv", "swiglu",
                                          "embedding", "greedy_sample"), 1.5))
    rec = reconcile(_run([point], [_e2e(1, 128, point.step_time_us * 1.3)]))[0]
    l2 = rec.layer("L2")
    assert l2.tokens_per_s_per_gpu > rec.layer("L1").tokens_per_s_per_gpu
    assert l2.inverted and l2.gap_share is None
    assert l2.flag.startswith("L2 (kernel sum (bottom-up)) is 50.0% faster than L1")
    assert "ceilings were measured low" in l2.flag and "warm caches" in l2.flag
    assert l2.flag in rec.flags
    # No negative share anywhere; the losses' shares add up to 100%.
    shares = [layer.gap_share for layer in rec.layers if layer.gap_share is not None]
    assert all(s > 0 for s in shares) and math.isclose(sum(shares), 1.0, rel_tol=1e-12)
    # Every op ran faster than its roof: none is a finding, none has a share, and a flag says so.
    assert rec.op_inefficiency and not any(o.finding for o in rec.op_inefficiency)
    assert all(o.share_of_L1_L2_gap is None for o in rec.op_inefficiency)
    assert any("faster than their measured roof" in f for f in rec.flags)
    gap = l2.step_time_us - rec.layer("L1").step_time_us
    assert rec.op_gains_us == pytest.approx(-gap, rel=1e-9) and rec.op_unexplained_us == pytest.approx(0, abs=1e-6)


def test_op_losses_are_shares_that_add_up_and_gains_are_said() -> None:
    # Linears faster than the roof (cache-resident), the other ops slower: a positive gap with a negative entry.
    point = _point(4, 512, {"linear": 1.3, "decode_attention": 0.2, "rope": 0.1})
    rec = reconcile(_run([point], []))[0]
    findings = [o for o in rec.op_inefficiency if o.finding]
    others = [o for o in rec.op_inefficiency if not o.finding]
    assert findings and others and all(o.op == "linear" for o in others)
    assert all(o.lost_us > 0 and o.share_of_L1_L2_gap > 0 for o in findings)
    assert sum(o.share_of_L1_L2_gap for o in findings) == pytest.approx(1.0, rel=1e-12)
    assert all(o.share_of_L1_L2_gap is None for o in others)
    gap = rec.layer("L2").step_time_us - rec.layer("L1").step_time_us
    losses = sum(o.lost_us for o in findings)
    assert rec.op_gains_us == pytest.approx(losses - gap, rel=1e-9)
    assert any(n.startswith("op losses inside L1 -> L2") and "less" in n for n in rec.notes)
    assert any("linear" in f and "faster than their measured roof" in f for f in rec.flags)


def test_end_to_end_faster_than_the_kernel_sum_is_flagged(capsys: pytest.CaptureFixture[str]) -> None:
    point = _point(1, 128, {})
    rec = reconcile(_run([point], [_e2e(1, 128, point.step_time_us * 0.5)]))[0]
    l4 = rec.layer("L4")
    assert l4.inverted and l4.gap_share is None and "beats the sum of its own kernels" in l4.flag
    print_reconciliation(Console(file=io.StringIO(), width=80), [rec])  # not a terminal: printed 160 wide
    text = capsys.readouterr().out
    assert "INVERTED" in text and "flag" in text


def test_a_contended_cpu_run_is_unreliable_and_says_why() -> None:
    point = _point(1, 128, {})
    load = {"wall_s": 60.0, "cores": 2, "self_cores": 1.0, "other_cores": 1.4, "contended": True,
            "phases": {"kernels": {"other_cores": 1.2}, "e2e": {"other_cores": 1.6}}}
    run = _run([point], [_e2e(1, 128, point.step_time_us * 1.9)], cpu_load=load)
    rec = reconcile(run)[0]
    assert not rec.reliable and "1.40 of 2 cores" in rec.unreliable_reason and "kernels 1.20" in rec.unreliable_reason
    run.reconciliation = [rec.to_dict()]
    summary = prediction_summary(run)
    assert summary["reliable"] is False and summary["met"] is None
    assert prediction_line(summary).startswith("L4 prediction not judged: other processes kept 1.40")
    idle = _run([point], [_e2e(1, 128, point.step_time_us * 1.9)],
                cpu_load={**load, "other_cores": 0.05, "contended": False, "phases": {}})
    assert reconcile(idle)[0].reliable
    # A file from before cpu_load was recorded: the run's note says the CPU was shared.
    old = _run([point], [], cpu_load=None)
    old.notes = ["other processes kept 0.70 of 2 cores busy over the 42 s run (tokprof 1.06): the CPU was shared, so "
                 "these CPU figures are slower and noisier than on an idle CPU"]
    rec = reconcile(old)[0]
    assert not rec.reliable and rec.unreliable_reason.startswith("other processes kept 0.70 of 2 cores busy over")


# --------------------------------------------------------------------------------------------------- predictions


def test_cpu_eager_prediction_is_kernel_sum_plus_host_work_without_the_e2e() -> None:
    point = _point(1, 128, {})
    predicted = point.step_time_us + HOST_US
    run = _run([point], [_e2e(1, 128, predicted * 1.25)])
    l4 = reconcile(run)[0].layer("L4")
    assert l4.predicted_step_time_us == pytest.approx(predicted, rel=1e-12)
    assert l4.predicted_tokens_per_s_per_gpu == pytest.approx(1 / (predicted * 1e-6))
    assert l4.prediction_error_pct == pytest.approx((1 / 1.25 - 1) * 100)
    assert l4.prediction_source.startswith("modelled: kernel sum (the kernel phase's medians; no paired kernel")
    assert "+ host work per step" in l4.prediction_source
    # The e2e figures are not read: another measured step, or none at all, leaves the prediction as it was.
    for e2e in ([_e2e(1, 128, 1.0)], []):
        other = reconcile(_run([point], e2e))[0].layer("L4")
        assert other.predicted_step_time_us == l4.predicted_step_time_us
    assert reconcile(_run([point], []))[0].layer("L4").prediction_error_pct is None
    # Without an overhead record there is no prediction, and the layer says why.
    bare = _run([point], [])
    bare.overhead = None
    l4 = reconcile(bare)[0].layer("L4")
    assert l4.predicted_step_time_us is None and "no overhead micro-benchmark" in l4.prediction_source


def test_cpu_eager_prediction_takes_the_paired_kernel_rounds_not_the_step_times() -> None:
    """The L4 record's paired kernel rounds (timed between its blocks) are the kernel sum; its step times are not."""
    from tokprof.models.e2e_paired import PairedCall

    point = _point(1, 128, {})
    paired = [PairedCall(op=o.op, shape=o.shape, dtype="fp32", count=o.count, mean_us=o.time_us * 1.2,
                         median_us=o.time_us, samples=10 * o.count, dropped=0, rounds=10).to_dict() for o in point.ops]
    want = point.step_time_us * 1.2 + HOST_US
    for step_us in (1.0, want * 2):
        e2e = _e2e(1, 128, step_us)
        e2e.paired_kernels = paired
        l4 = reconcile(_run([point], [e2e]))[0].layer("L4")
        assert l4.predicted_step_time_us == pytest.approx(want, rel=1e-9)
        assert "timed in 10 rounds between the end-to-end blocks" in l4.prediction_source


def test_gpu_predictions_for_graphs_and_eager() -> None:
    gpu = "h100-sxm"
    point = _point(1, 128, {}, gpu=gpu)
    run = _run([point], [_e2e(1, 128, 5000.0, gpu=gpu, mode="graph"), _e2e(1, 128, 6000.0, gpu=gpu)], kind="cuda")
    rec = reconcile(run)[0]
    calls = sum(o.count for o in point.ops)
    book = GPU_BOOKKEEPING_KERNELS * GPU_TINY_KERNEL_US
    sm = StepModel(execution="graph")  # the step model's graph overhead: per step + per node
    graph = point.step_time_us + book + sm.step_overhead_us["graph"] + (calls + GPU_BOOKKEEPING_KERNELS) * \
        sm.launch_us["graph"]
    assert rec.layer("L3").predicted_step_time_us == pytest.approx(graph, rel=1e-12)
    host = calls * 5.0 + HOST_US
    assert rec.layer("L4").predicted_step_time_us == pytest.approx(max(point.step_time_us + book, host), rel=1e-12)
    assert rec.layer("L4").prediction_error_pct == pytest.approx(
        (rec.layer("L4").predicted_step_time_us / 6000.0 - 1) * 100)
