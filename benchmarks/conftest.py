"""pytest-benchmark suites for the kernels: regression testing with the standard tool (not part of `pytest`).

    pytest benchmarks --benchmark-autosave                                   # record a baseline (.benchmarks/)
    pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:5%  # fail on a >5% median slow-down

Every benchmark times one kernel call with a device-synchronising target (the call, then a whole-device sync), so
the host clock pytest-benchmark reads covers the GPU work; on a GPU each round starts from a cold L2 (a 2x-L2
flush in the untimed setup, docs/measurement.md rule 2). GPU runs use the ops' default shapes (Llama-3.1-8B decode
for the dense ops, DeepSeek-R1 decode for the MoE/MLA ops) plus the MoE models' decode shapes of MODEL_SHAPES, in
bf16; CPU runs use small shapes in fp32 with the torch backend, so the suite runs anywhere in well under a minute.
These are host-clock regression figures; `tokprof bench` is the tool for event-timed, roofline-placed numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

from tokprof.kernels import OPS
from tokprof.profiler import timing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32

# Small CPU shapes, one per op: enough work to time (tens of us to a few ms), little enough for 2 cores.
CPU_SHAPES: dict[str, dict[str, int]] = {
    "embedding": {"T": 4, "V": 1024, "H": 256},
    "rms_norm": {"T": 4, "H": 1024, "residual": 1},
    "linear": {"M": 4, "N": 256, "K": 256},
    "rope": {"T": 4, "Hq": 8, "Hkv": 2, "D": 64},
    "append_kv": {"T": 4, "Hkv": 2, "D": 64, "block_size": 16, "num_blocks": 16},
    "decode_attention": {"B": 2, "Hq": 8, "Hkv": 2, "D": 64, "context": 256, "block_size": 16},
    "prefill_attention": {"B": 1, "Hq": 4, "Hkv": 2, "S": 128, "D": 64, "causal": 1},
    "swiglu": {"T": 4, "I": 1024},
    "greedy_sample": {"B": 2, "V": 1024},
    "moe_router": {"T": 4, "E": 64, "k": 4, "n_group": 4, "topk_group": 2},
    "fused_moe": {"T": 4, "H": 256, "I": 128, "E": 16, "k": 4},
    "mla_decode_attention": {"B": 2, "H": 4, "L": 128, "R": 32, "context": 256, "block_size": 16},
    "mla_prefill_attention": {"B": 1, "H": 2, "S": 64, "L": 128, "R": 32, "causal": 1},
}

# GPU only: decode shapes of the mixture-of-experts models, on top of each op's default shape. Whole-model head
# counts (one GPU holding every head), except where marked per GPU at tensor parallelism 8. Sources: the models'
# config.json on Hugging Face (deepseek-ai/DeepSeek-R1: hidden 7168, moe_intermediate 2048, 256 routed experts,
# 8 per token, n_group 8, topk_group 4, 128 heads, kv_lora_rank 512, qk_rope_head_dim 64; Qwen/Qwen3-235B-A22B:
# hidden 4096, moe_intermediate 1536, 128 experts, 8 per token, 64 query / 4 KV heads of 128; openai/gpt-oss-120b:
# hidden 2880, intermediate 2880, 128 experts, 4 per token, 64 query / 8 KV heads of 64, sliding window 128).
MODEL_SHAPES: dict[str, list[tuple[str, dict[str, int]]]] = {
    "moe_router": [
        ("deepseek-r1-B64", {"T": 64, "E": 256, "k": 8, "n_group": 8, "topk_group": 4}),
        ("qwen3-235b-B64", {"T": 64, "E": 128, "k": 8, "n_group": 0, "topk_group": 0}),
    ],
    "fused_moe": [
        ("deepseek-r1-B1", {"T": 1, "H": 7168, "I": 2048, "E": 256, "k": 8}),
        ("deepseek-r1-B64", {"T": 64, "H": 7168, "I": 2048, "E": 256, "k": 8}),
        ("qwen3-235b-B16", {"T": 16, "H": 4096, "I": 1536, "E": 128, "k": 8}),
        ("qwen3-235b-B64", {"T": 64, "H": 4096, "I": 1536, "E": 128, "k": 8}),
        ("gpt-oss-120b-B64", {"T": 64, "H": 2880, "I": 2880, "E": 128, "k": 4, "gpt_oss": 1}),
    ],
    "mla_decode_attention": [
        ("deepseek-r1-tp8-B64", {"B": 64, "H": 16, "L": 512, "R": 64, "context": 4096, "block_size": 64}),
        ("deepseek-r1-B64", {"B": 64, "H": 128, "L": 512, "R": 64, "context": 4096, "block_size": 64}),
    ],
    "decode_attention": [
        ("qwen3-235b-B64", {"B": 64, "Hq": 64, "Hkv": 4, "D": 128, "context": 4096, "block_size": 16}),
        ("gpt-oss-120b-sliding-B64", {"B": 64, "Hq": 64, "Hkv": 8, "D": 64, "context": 4096, "block_size": 16,
                                      "window": 128, "sinks": 1}),
        ("gpt-oss-120b-full-B64", {"B": 64, "Hq": 64, "Hkv": 8, "D": 64, "context": 4096, "block_size": 16,
                                   "sinks": 1}),
    ],
}

TARGET_S = 1.0 if DEVICE.type == "cuda" else 0.25  # timed seconds per benchmark
WARMUP_S = 0.025  # docs/measurement.md rule 1: ~25 ms of warm-up after the first (compiling) call


def cases() -> list[Any]:
    """pytest params (op, backend, shape) for every backend that runs on DEVICE; the rest are listed as skips."""
    params = []
    for name, op in OPS.items():
        shapes = [("", op.full_shape(CPU_SHAPES.get(name, {})) if DEVICE.type == "cpu" else dict(op.default_shape))]
        if DEVICE.type == "cuda":
            shapes += [(f"-{label}", op.full_shape(shape)) for label, shape in MODEL_SHAPES.get(name, [])]
        for backend, why_not in op.available_backends(DEVICE).items():
            marks = []
            if why_not is not None:
                marks.append(pytest.mark.skip(reason=why_not))
            elif DEVICE.type == "cpu" and name not in CPU_SHAPES:
                marks.append(pytest.mark.skip(reason=f"no small CPU shape for {name} in benchmarks/conftest.py"))
            elif DTYPE not in op.dtypes:
                marks.append(pytest.mark.skip(reason=f"{name} does not take {DTYPE}"))
            for label, shape in shapes:
                params.append(pytest.param(name, backend, shape, id=f"{name}-{backend}{label}", marks=marks))
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise any benchmark asking for (op, backend, shape) over `cases()`."""
    if {"op", "backend", "shape"} <= set(metafunc.fixturenames):
        metafunc.parametrize("op, backend, shape", cases())


def _rounds(target: Callable[[], None], setup: Callable[[], None] | None) -> tuple[int, int]:
    """(warm-up rounds, timed rounds) so that warm-up lasts ~WARMUP_S and timing ~TARGET_S (5..2000 rounds)."""
    if setup is not None:
        setup()
    t0 = time.perf_counter()
    target()
    per_call_s = max(time.perf_counter() - t0, 1e-6)
    warmup = max(1, min(1000, int(WARMUP_S / per_call_s)))
    return warmup, max(5, min(2000, int(TARGET_S / per_call_s)))


@pytest.fixture
def kernel_benchmark(benchmark: Any) -> Callable[[str, str, Mapping[str, int]], Any]:
    """kernel_benchmark(op, backend, shape): benchmark one call with a synchronising target; returns its output."""

    def run(name: str, backend: str, shape: Mapping[str, int]) -> Any:
        op = OPS[name]
        inputs = op.make_inputs(shape, DTYPE, DEVICE, 0)  # fresh seeded random inputs, never zeros
        out: dict[str, Any] = {}

        def target() -> None:
            out["value"] = op.run(inputs, backend)
            timing.sync(DEVICE)  # the host clock stops only when the device is done

        setup = None
        if DEVICE.type == "cuda":
            flush = timing.flush_buffer(DEVICE)

            def setup() -> None:  # untimed: evict L2 so each round starts cold
                flush.zero_()
                timing.sync(DEVICE)

        target()  # compile / autotune outside the timed rounds
        warmup, rounds = _rounds(target, setup)
        benchmark.group = name
        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=warmup)
        flops, min_bytes = op.cost(shape, DTYPE)
        median_s = benchmark.stats.stats.median
        benchmark.extra_info.update({
            "op": name, "backend": backend, "shape": dict(shape), "dtype": str(DTYPE), "device": str(DEVICE),
            "flops": flops, "min_bytes": min_bytes, "timer": "perf_counter around call + device sync",
            "achieved_gbps_at_median": min_bytes / median_s / 1e9,
            "achieved_tflops_at_median": flops / median_s / 1e12,
        })
        return out["value"]

    return run
