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
    assert attn.threshold == 0.90 and attn.metric == "bw_fraction"
    assert all("FACTS" not in t.source for t in kernel_targets())
    assert sum(t.op == "linear" for t in kernel_targets()) == 10  # M in {1, 16} x five 8B weight shapes


def test_judge_bandwidth_against_the_measured_ceiling():
    from tokprof.profiler.schema import Ceilings
    from tokprof.targets import bandwidth_ceiling_gbps

    h200 = load_specs()["h200"]  # 4.8 TB/s datasheet; a copy moves ~4.3 TB/s there
    target = next(t for t in kernel_targets() if t.op == "rms_norm")
    c = Ceilings(copy_gbps=4300.0, gemm_tflops=780.0, gemm_dtype="bf16", copy_bytes=1, gemm_shape=[1, 1, 1],
                 device="H200", measured_utc="x", read_gbps=4500.0)
    ceiling = bandwidth_ceiling_gbps(c)
    assert ceiling == 4500.0  # read-only beats the copy: a read-mostly kernel is judged against it
    # 4.1 TB/s is 85% of the datasheet (a miss against 88% of 4.8 TB/s) but 91% of what this card can do: a pass
    ok = judge(target, "triton", measurement(gbps=4100.0, tflops=0.1), h200, ceiling)
    assert ok.passed is True and ok.value == pytest.approx(4100 / 4500)
    assert ok.fraction_of_datasheet == pytest.approx(4100 / 4800)
    miss = judge(target, "triton", measurement(gbps=3800.0, tflops=0.1), h200, ceiling)
    assert miss.passed is False and miss.value == pytest.approx(3800 / 4500)
    unknown = judge(target, "triton", measurement(gbps=2500.0, tflops=0.1), None, None)
    assert unknown.passed is None and "not judged" in unknown.note
    bad = judge(target, "triton", measurement(gbps=9000.0, tflops=0.1, suspicious=True), h200, ceiling)
    assert bad.passed is None and "suspicious" in bad.note
    assert judge(target, "cuda", None, h200, ceiling).passed is None
    c.read_gbps = None  # a cached ceiling from before the read-only figure existed: the copy alone
    assert bandwidth_ceiling_gbps(c) == 4300.0


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
