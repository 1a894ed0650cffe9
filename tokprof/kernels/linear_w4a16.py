"""Weight-only 4-bit linear (W4A16): out = x @ dequantise(qweight).T, weights in MXFP4, NVFP4 or INT4.

    x (M, K) fp32|fp16|bf16; qweight a tokprof.quant.QuantizedWeight (N, K) in "mxfp4" | "nvfp4" | "int4"
    ->  out (M, N) in x's dtype

Decode GEMMs are weight-bandwidth bound (2*M*N*K FLOP against N*K weights read once per step), so storing weights
in 4 bits (4.25 bits with MX scales, 4.5 NVFP4, ~4.19 INT4 g128) reads ~3.5-3.8x fewer bytes than bf16. The
kernel dequantises in registers inside the GEMM's main loop and multiplies in the activation dtype (bf16 tensor
cores on Hopper; Blackwell's native FP4 tensor cores would also quantise the activations, which this kernel does
not: the roofline bounds it by the format's math dtype, see tokprof.quant.formats.WeightFormat.math_dtype).

Backends: torch (dequantise to fp32, then x.float() @ w.T: the reference) and triton (one skinny kernel: each
program owns BLOCK_N output columns for BLOCK_M rows and streams its packed weight tile once; even and odd K
elements, the low and high nibbles of a byte, each feed one tl.dot against the matching columns of x).
One registry op per format: linear_mxfp4, linear_nvfp4, linear_int4.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from tokprof.kernels._common import (
    FLOAT_DTYPES,
    Op,
    cdiv,
    check_tensor,
    dtype_bytes,
    make_generator,
    new_output,
    randn,
    resolve,
    triton_interpreted,
)
from tokprof.quant.formats import WEIGHT_FORMATS, QuantizedWeight, dequantize_weight

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None

W4_FORMATS = ("mxfp4", "nvfp4", "int4")
_FMT_CODE = {"mxfp4": 0, "nvfp4": 1, "int4": 2}


# --------------------------------------------------------------------------------------------------------- torch


def _linear_w4a16_torch(x: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    return (x.float() @ dequantize_weight(qweight).T).to(x.dtype)  # (M, K) @ (K, N) in fp32


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _fp4_value(code):
        # e2m1 code (0..15) -> value: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0; exponent 0 is
        # subnormal (0 or 0.5)
        c = code.to(tl.int32)
        e = (c >> 1) & 3
        m = (c & 1).to(tl.float32)
        v = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * tl.exp2((e - 1).to(tl.float32)))
        return tl.where((c & 8) != 0, -v, v)

    @triton.jit
    def _w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, ts_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                      stride_om, FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)). Computed transposed as in linear's skinny kernel:
        # out^T tile (BLOCK_N, BLOCK_M) = W tile (BLOCK_N, K) @ x^T (K, BLOCK_M).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_w = (offs_n % N).to(tl.int64)  # wrap-around padding; the store drops it
        rows_x = (offs_m % M).to(tl.int64)
        j = tl.arange(0, BLOCK_K // 2)  # byte j of the tile holds elements 2j (low nibble) and 2j+1 (high)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        if FMT == 1:
            tensor_scale = tl.load(ts_ptr)
        for k0 in range(0, K, BLOCK_K):
            k_even = k0 + 2 * j  # (BLOCK_K/2,)
            ok_even = k_even < K
            ok_odd = k_even + 1 < K
            packed = tl.load(w_ptr + rows_w[:, None] * stride_wn + (k0 // 2 + j)[None, :], mask=ok_even[None, :],
                             other=0)  # (BLOCK_N, BLOCK_K/2) uint8
            group = (k_even // GROUP)[None, :]  # both elements of a byte share a group (GROUP is even)
            s = tl.load(s_ptr + rows_w[:, None] * stride_sn + group, mask=ok_even[None, :], other=0)
            if FMT == 0:  # e8m0: 2^(e - 127)
                scale = tl.exp2(s.to(tl.float32) - 127.0)
            elif FMT == 1:  # e4m3 block scale (passed as its bytes: masked fp8 loads have no `other`) x tensor scale
                scale = s.to(tl.float8e4nv, bitcast=True).to(tl.float32) * tensor_scale
            else:
                scale = s.to(tl.float32)
            lo = packed & 0x0F
            hi = packed >> 4
            if FMT == 2:  # int4: (q - zero) * scale
                zero = tl.load(z_ptr + rows_w[:, None] * stride_sn + group, mask=ok_even[None, :], other=0)
                zf = zero.to(tl.float32)
                w_lo = (lo.to(tl.float32) - zf) * scale
                w_hi = (hi.to(tl.float32) - zf) * scale
            else:
                w_lo = _fp4_value(lo) * scale
                w_hi = _fp4_value(hi) * scale
            x_row = x_ptr + rows_x[:, None] * stride_xm
            x_even = tl.load(x_row + k_even[None, :], mask=ok_even[None, :], other=0.0)  # (BLOCK_M, BLOCK_K/2)
            x_odd = tl.load(x_row + (k_even + 1)[None, :], mask=ok_odd[None, :], other=0.0)
            acc = tl.dot(w_lo.to(x_even.dtype), tl.trans(x_even), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(w_hi.to(x_odd.dtype), tl.trans(x_odd), acc, input_precision=DOT_PRECISION)
        out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]  # (BLOCK_N, BLOCK_M)
        mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _config(m: int, group: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): a 64 x 128 packed tile is 4 KiB per stage, so several
    stages keep HBM busy; BLOCK_K is a multiple of every group size (16, 32, 128)."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    if triton_interpreted():
        return block_m, 32, 128 if group == 128 else 64, 4, 1
    return block_m, 64, 128, 4, 4


def _linear_w4a16_triton(x: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    out = new_output((m, n), x.dtype, x.device)  # (M, N)
    group = WEIGHT_FORMATS[qweight.format].block_k
    block_m, block_n, block_k, num_warps, num_stages = _config(m, group)
    zero = qweight.zero if qweight.zero is not None else qweight.scale
    tensor_scale = qweight.tensor_scale if qweight.tensor_scale is not None else qweight.scale
    grid = (cdiv(n, block_n), cdiv(m, block_m))
    scale = qweight.scale.view(torch.uint8) if qweight.format == "nvfp4" else qweight.scale
    _w4a16_kernel[grid](
        x, qweight.data, scale, zero, tensor_scale, out, m, n, k, x.stride(0), qweight.data.stride(0),
        qweight.scale.stride(0), out.stride(0), FMT=_FMT_CODE[qweight.format], GROUP=group, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


# -------------------------------------------------------------------------------------------------------- public

_IMPLS = {"torch": _linear_w4a16_torch, "triton": _linear_w4a16_triton}


def check_qweight(qweight: Any, formats: tuple[str, ...], k: int) -> tuple[int, int]:
    """Validate a QuantizedWeight for a linear of input width `k`; returns (N, K)."""
    if not isinstance(qweight, QuantizedWeight):
        raise ValueError(f"qweight: expected a tokprof.quant.QuantizedWeight (quantize_weight(w, fmt)), got "
                         f"{type(qweight).__name__}")
    if qweight.format not in formats:
        raise ValueError(f"qweight: expected a weight in one of {list(formats)}, got format {qweight.format!r}")
    n, k_w = qweight.shape
    if k_w != k:
        raise ValueError(f"qweight: expected shape (N, K) with K={k} (the last dimension of x), got {qweight.shape}")
    fmt = WEIGHT_FORMATS[qweight.format]
    if fmt.element_bits == 4:
        k_pad = cdiv(k, fmt.block_k) * fmt.block_k
        check_tensor("qweight.data", qweight.data, shape=(n, k_pad // 2), dtypes=(torch.uint8,), contiguous=True)
        check_tensor("qweight.scale", qweight.scale, shape=(n, k_pad // fmt.block_k), contiguous=True)
    return n, k_w


def linear_w4a16(x: torch.Tensor, qweight: QuantizedWeight, *, backend: str = "triton") -> torch.Tensor:
    """out (M, N) = x @ dequantise(qweight).T for x (M, K) and a 4-bit (N, K) weight (mxfp4, nvfp4 or int4)."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    m, k = x.shape
    if m == 0 or k == 0:
        raise ValueError(f"x: expected a non-empty (M, K), got {tuple(x.shape)}")
    check_qweight(qweight, W4_FORMATS, k)
    if qweight.device != x.device:
        raise ValueError(f"qweight: expected tensors on {x.device} (where x is), got {qweight.device}")
    return resolve("linear_w4a16", _IMPLS, backend, x.device)(x, qweight)


def random_qweight(fmt: str, n: int, k: int, device: torch.device | str, gen: torch.Generator) -> QuantizedWeight:
    """A random (N, K) weight already in `fmt`'s layout, scales chosen so the weights are ~K**-0.5 in size (as an
    initialised layer's): no quantisation pass, no host sync (works on fake tensors for compile checks)."""
    spec = WEIGHT_FORMATS[fmt]
    k_pad = cdiv(k, spec.block_k) * spec.block_k
    groups = k_pad // spec.block_k
    data = torch.randint(0, 256, (n, k_pad // 2), generator=gen, device=device, dtype=torch.uint8)
    target = k ** -0.5
    if fmt == "mxfp4":  # e2m1 values average ~2.6 in magnitude: 2^e ~ target / 2.6, e within +-1 across blocks
        e = torch.randint(-1, 2, (n, groups), generator=gen, device=device) + round(127 + math.log2(target / 2.6))
        return QuantizedWeight(fmt, (n, k), data, e.to(torch.uint8))
    if fmt == "nvfp4":
        block = (torch.rand((n, groups), generator=gen, device=device) * 200 + 100).to(torch.float8_e4m3fn)
        ts = torch.full((), target / 2.6 / 200, device=device)
        return QuantizedWeight(fmt, (n, k), data, block, tensor_scale=ts)
    scale = (torch.rand((n, groups), generator=gen, device=device) * 0.2 + 0.9) * (target / 4)
    zero = torch.randint(6, 10, (n, groups), generator=gen, device=device, dtype=torch.uint8)
    return QuantizedWeight(fmt, (n, k), data, scale.half(), zero=zero)


def _make_inputs(fmt: str):  # noqa: ANN202 - a closure per format
    def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str,
                    seed: int) -> dict[str, Any]:
        gen = make_generator(device, seed)
        m, n, k = shape["M"], shape["N"], shape["K"]
        return {"x": randn((m, k), dtype, device, gen), "qweight": random_qweight(fmt, n, k, device, gen)}

    return make_inputs


def _cost(fmt: str):  # noqa: ANN202
    def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
        m, n, k = shape["M"], shape["N"], shape["K"]
        flops = 2 * m * n * k  # dequantisation (~2-3 ops per weight) is not counted, as in every GEMM FLOP count
        min_bytes = WEIGHT_FORMATS[fmt].weight_bytes(n, k) + (m * k + m * n) * dtype_bytes(dtype)
        return flops, min_bytes

    return cost


def _op(fmt: str) -> Op:
    spec = WEIGHT_FORMATS[fmt]
    return Op(
        name=spec.op,
        fn=linear_w4a16,
        impls=_IMPLS,
        shape_keys=("M", "N", "K"),
        default_shape={"M": 16, "N": 4096, "K": 4096},
        make_inputs=_make_inputs(fmt),
        cost=_cost(fmt),
        cost_formula=(f"flops = 2*M*N*K; bytes = weight_bytes_{fmt}(N, K) (elements {spec.element_bits} bit + "
                      f"{spec.scale_dtype} scale per {spec.block_k} along K"
                      + (" + zero point" if spec.zero_point_bits else "")
                      + (" + fp32 tensor scale" if spec.tensor_scale_bytes else "")
                      + ") + (M*K + M*N)*dtype_bytes (read x, write out)"),
        description=f"x @ dequant(W).T with W in {fmt} ({spec.description}); weight-only, dequantised in-register",
        shape_doc="M rows (tokens), N output features, K input features",
        extra={"weight_format": fmt, "base_op": "linear"},
    )


OPS_IN_MODULE = tuple(_op(f) for f in W4_FORMATS)
