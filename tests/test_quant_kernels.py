"""Quantised kernels against their fp32 dequantise-then-matmul references.

Which path each test runs: `torch` tests run the reference backend on the CPU; `interpreter` tests run the Triton
kernels under Triton's CPU interpreter, which handles float8_e4m3fn and uint8 tensors (loads, tl.dot on e4m3 tiles,
casts) - checked here on every kernel. fp32 activations only in the interpreter (its bf16 tl.dot is wrong); the
compiled kernels for sm_90 are checked by scripts/triton_compile_check.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TRITON_DEVICE, assert_close, requires_triton

from tokprof.kernels import OPS, append_kv_fp8, decode_attention, linear_w4a16, linear_w8a8, quantize_fp8
from tokprof.kernels._common import poisoned_outputs
from tokprof.quant.formats import (
    FP8,
    dequantize_fp8_rows,
    dequantize_weight,
    quantize_fp8_rows,
    quantize_weight,
)

W4 = ("linear_mxfp4", "linear_nvfp4", "linear_int4")
W8 = ("linear_fp8", "linear_fp8_block")
# (M, N, K): decode rows 1 and 5, a 17-row tile tail; N, K not multiples of the tiles (K multiple of 32 for MXFP4's
# block; 200 = K not a multiple of 128 for int4's group and the fp8 tiles)
SHAPES = [(1, 96, 256), (5, 70, 200), (17, 64, 384)]


def _reference(op: str, inputs: dict) -> torch.Tensor:
    if op in W4:
        return inputs["x"].double() @ dequantize_weight(inputs["qweight"]).double().T
    group = 128 if op == "linear_fp8_block" else 0
    x = dequantize_fp8_rows(inputs["x_q"], inputs["x_scale"], group).double()
    return x @ dequantize_weight(inputs["qweight"]).double().T


def _shape(m: int, n: int, k: int, op: str) -> dict[str, int]:
    if op == "linear_mxfp4" and k % 32:
        k = k + 32 - k % 32
    return {"M": m, "N": n, "K": k}


@pytest.mark.parametrize("op", W4 + W8)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_path_matches_dequantised_reference(op: str, shape: tuple[int, int, int]) -> None:
    inputs = OPS[op].make_inputs(_shape(*shape, op), torch.float32, "cpu", 3)
    out = OPS[op].run(inputs, backend="torch")
    assert out.shape == (shape[0], shape[1])
    assert_close(out, _reference(op, inputs), torch.float32)
    assert out.abs().mean() > 0.05  # the inputs make outputs of a useful size, not all zeros


@requires_triton
@pytest.mark.parametrize("op", W4 + W8)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_interpreter_triton_matches_reference(op: str, shape: tuple[int, int, int]) -> None:
    inputs = OPS[op].make_inputs(_shape(*shape, op), torch.float32, TRITON_DEVICE, 3)
    with poisoned_outputs():
        out = OPS[op].run(inputs, backend="triton")
    assert_close(out, _reference(op, inputs), torch.float32)


def test_w4a16_real_quantised_weight_close_to_the_bf16_linear() -> None:
    # a real layer quantised then run: the result tracks the unquantised product within the format's error
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) / 16
    x = torch.randn(4, 256, generator=gen)
    exact = x @ w.T
    for fmt, tol in (("mxfp4", 0.15), ("nvfp4", 0.1), ("int4", 0.1)):
        out = linear_w4a16(x, quantize_weight(w, fmt), backend="torch")
        assert ((out - exact).norm() / exact.norm()).item() < tol, fmt
    xq, xs = quantize_fp8_rows(x, 0)
    out = linear_w8a8(xq, xs, quantize_weight(w, "fp8"), out_dtype=torch.float32, backend="torch")
    assert ((out - exact).norm() / exact.norm()).item() < 0.05


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("group", [0, 128])
def test_quantize_fp8_matches_the_formats_module(backend: str, group: int) -> None:
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(2))
    q, s = quantize_fp8(x, group=group, backend=backend)
    q_ref, s_ref = quantize_fp8_rows(x, group)
    assert torch.allclose(s, s_ref)
    assert torch.equal(q.float(), q_ref.float())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_append_kv_fp8_quantises_into_the_pages(backend: str) -> None:
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(5, 2, 16, generator=gen), torch.randn(5, 2, 16, generator=gen)
    kc = torch.zeros(4, 4, 2, 16, dtype=FP8)
    vc = torch.zeros(4, 4, 2, 16, dtype=FP8)
    slots = torch.tensor([3, 9, -1, 0, 15])
    ks = torch.tensor([0.01, 0.02])
    append_kv_fp8(k, v, kc, vc, slots, k_scale=ks, v_scale=0.01, backend=backend)
    flat_k, flat_v = kc.view(16, 2, 16).float(), vc.view(16, 2, 16).float()
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        assert torch.equal(flat_k[slot], (k[t] / ks[:, None]).clamp(-448, 448).to(FP8).float())
        assert torch.equal(flat_v[slot], (v[t] / 0.01).clamp(-448, 448).to(FP8).float())
    assert flat_k[1].abs().sum() == 0  # untouched slot


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_decode_attention_over_an_fp8_cache(backend: str) -> None:
    shape = {"B": 3, "Hq": 4, "Hkv": 2, "D": 32, "context": 40, "block_size": 16}
    inputs = OPS["decode_attention_fp8kv"].make_inputs(shape, torch.float32, "cpu", 5)
    out = decode_attention(**inputs, backend=backend)
    # reference: dequantise the cache to fp32 and run the fp32 torch path without scales
    ks, vs = inputs["k_scale"], inputs["v_scale"]
    ref_inputs = {**inputs, "k_cache": inputs["k_cache"].float() * ks[:, None],
                  "v_cache": inputs["v_cache"].float() * vs[:, None]}
    del ref_inputs["k_scale"], ref_inputs["v_scale"]
    ref = decode_attention(**ref_inputs, backend="torch")
    assert_close(out, ref, torch.float32)


def test_fp8_cache_refuses_the_cuda_backend_and_bad_scales() -> None:
    shape = {"B": 1, "Hq": 2, "Hkv": 1, "D": 64, "context": 8, "block_size": 16}
    inputs = OPS["decode_attention_fp8kv"].make_inputs(shape, torch.float32, "cpu", 5)
    with pytest.raises(ValueError, match="k_scale: expected shape"):
        decode_attention(**{**inputs, "k_scale": torch.ones(3)}, backend="torch")
    with pytest.raises(ValueError, match="v_scale: expected a positive"):
        decode_attention(**{**inputs, "v_scale": -1.0}, backend="torch")
    assert "cuda" not in OPS["decode_attention_fp8kv"].impls


def test_w4a16_decode_reads_about_4x_fewer_weight_bytes() -> None:
    shape = {"M": 1, "N": 4096, "K": 4096}
    _, bf16 = OPS["linear"].cost(shape, torch.bfloat16)
    for op, ratio in (("linear_mxfp4", 16 / 4.25), ("linear_nvfp4", 16 / 4.5), ("linear_int4", 16 / (4 + 24 / 128)),
                      ("linear_fp8", 2.0)):
        flops, nbytes = OPS[op].cost(shape, torch.bfloat16)
        assert flops == 2 * 4096 * 4096
        assert bf16 / nbytes == pytest.approx(ratio, rel=0.01), op


def test_bad_arguments_name_themselves() -> None:
    x = torch.randn(2, 64)
    qw = quantize_weight(torch.randn(8, 64), "fp8")
    with pytest.raises(ValueError, match="qweight: expected a weight in one of"):
        linear_w4a16(x, qw, backend="torch")
    with pytest.raises(ValueError, match="qweight: expected a tokprof.quant.QuantizedWeight"):
        linear_w4a16(x, torch.randn(8, 64), backend="torch")
    xq, xs = quantize_fp8_rows(x, 0)
    with pytest.raises(ValueError, match="x_scale: expected shape"):
        linear_w8a8(xq, xs[:1], qw, backend="torch")
    with pytest.raises(ValueError, match="group: expected one of"):
        quantize_fp8(x, group=64, backend="torch")
