"""Kernel targets: the pass/fail arithmetic (GPU runs produce the measurements)."""

from __future__ import annotations

import pytest

from tokprof.profiler.devices import load_specs
from tokprof.profiler.schema import KernelMeasurement, Roofline, Timing
from tokprof.targets import judge, kernel_targets, main


def measurement(gbps: float, tflops: float, suspicious: bool = False) -> KernelMeasurement:
    timing = Timing([10.0] * 10, "cuda_events", "events", True, 10.0, 10.0, 10.0, 10.0, 0.0, 0, 0.005, True)
    roof = Roofline(1, 1, 10.0, gbps, tflops, 1.0, "memory", suspicious=suspicious, note="x" if suspicious else "")
    return KernelMeasurement("rms_norm", {}, "bf16", "triton", "NVIDIA H100 80GB HBM3", timing, roof)


def test_targets_cover_the_issue():
    names = {t.op for t in kernel_targets()}
    assert names == {"decode_attention", "prefill_attention", "rms_norm", "swiglu", "rope", "linear"}
    attn = next(t for t in kernel_targets() if t.op == "decode_attention")
    assert attn.shape == {"B": 64, "Hq": 32, "Hkv": 8, "D": 128, "context": 4096, "block_size": 16}
    assert attn.threshold == 0.88 and attn.metric == "hbm_fraction"
    assert sum(t.op == "linear" for t in kernel_targets()) == 10  # M in {1, 16} x five 8B weight shapes


def test_judge_bandwidth_against_the_datasheet():
    h100 = load_specs()["h100-sxm"]  # 3.35 TB/s
    target = next(t for t in kernel_targets() if t.op == "rms_norm")
    ok = judge(target, "triton", measurement(gbps=3000.0, tflops=0.1), h100, copy_gbps=3000.0)
    assert ok.passed is True and ok.value == pytest.approx(3000 / 3350)
    assert ok.fraction_of_measured_copy == pytest.approx(1.0)
    miss = judge(target, "triton", measurement(gbps=2500.0, tflops=0.1), h100, copy_gbps=3000.0)
    assert miss.passed is False and miss.value == pytest.approx(2500 / 3350)
    unknown = judge(target, "triton", measurement(gbps=2500.0, tflops=0.1), None, copy_gbps=None)
    assert unknown.passed is None and "not judged" in unknown.note
    bad = judge(target, "triton", measurement(gbps=9000.0, tflops=0.1, suspicious=True), h100, copy_gbps=3000.0)
    assert bad.passed is None and "suspicious" in bad.note
    assert judge(target, "cuda", None, h100, 3000.0).passed is None


def test_judge_tflops():
    target = next(t for t in kernel_targets() if t.op == "prefill_attention")
    assert judge(target, "triton", measurement(1.0, 460.0), None, None).passed is True
    assert judge(target, "triton", measurement(1.0, 440.0), None, None).passed is False


def test_main_refuses_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--device", "cpu"]) == 2
    assert "GPU targets" in capsys.readouterr().err
