"""Dynamic FP8 activation quantisation, the step before a W8A8 GEMM: x (M, K) -> e4m3 (M, K) and fp32 scales.

    x (M, K) fp32|fp16|bf16, group 0 | 128  ->  x_q float8_e4m3fn (M, K), x_scale fp32 (M,) | (M, ceil(K/group))

group 0: one scale per token (row), amax(row) / 448 (the per-token scheme of W8A8 with per-tensor weights);
group 128: one scale per 128 columns of a row (DeepSeek-V3's 1x128 activation tiles, paired with 128x128 weight
tiles). x ~ x_q * scale. Memory-bound: reads x once and writes one byte per element plus the scales.
Backends: torch (tokprof.quant.formats.quantize_fp8_rows: the reference) and triton (one program per row and
group: amax, then scale and cast, in one pass over the group's tile for groups, two passes over the row for tokens).
"""

from __future__ import annotations

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
)
from tokprof.quant.formats import FP8, FP8_E4M3_MAX, quantize_fp8_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None

GROUPS = (0, 128)


def _quantize_fp8_torch(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8_rows(x, group)


if triton is not None:

    @triton.jit
    def round_to_e4m3(x):
        # fp32 -> the nearest e4m3 value (ties to even), still in fp32, for |x| <= 448. The cast to fp8 that follows
        # is then exact. On a GPU the cast alone rounds correctly (cvt.rn); Triton's CPU interpreter does not (it
        # rounds 124 to 64 and ties away from even, seen in triton 3.9), so the kernels round first, which costs
        # a few ALU ops per element in a memory-bound kernel and makes both paths agree bit for bit.
        bits = x.to(tl.int32, bitcast=True)
        exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3's smallest normal exponent is -6 (subnormals below)
        ulp = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits: spacing 2^(exp - 3)
        t = x / ulp  # exact (a power of two), |t| < 16
        return ((t + 12582912.0) - 12582912.0) * ulp  # 1.5 * 2^23: fp32 addition rounds t to an integer, ties even

    @triton.jit
    def _quantize_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, SPAN, FP8_MAX: tl.constexpr,
                             BLOCK: tl.constexpr):
        # grid (M, cdiv(K, SPAN)): program (m, g) quantises columns [g*SPAN, min((g+1)*SPAN, K)) of row m with one
        # scale; SPAN is the group (128) or K (per token).
        m = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        start = g * SPAN
        end = tl.minimum(start + SPAN, K)
        offs = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(start, end, BLOCK):
            x = tl.load(x_ptr + m * stride_xm + k + offs, mask=k + offs < end, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        row_max = tl.max(amax, 0)
        scale = tl.where(row_max > 0.0, row_max / FP8_MAX, 1.0)
        tl.store(s_ptr + m * stride_sm + g, scale)
        for k in range(start, end, BLOCK):
            x = tl.load(x_ptr + m * stride_xm + k + offs, mask=k + offs < end, other=0.0).to(tl.float32)
            q = round_to_e4m3(tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX))
            tl.store(q_ptr + m * stride_qm + k + offs, q.to(q_ptr.dtype.element_ty), mask=k + offs < end)


def _quantize_fp8_triton(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    span = group or k
    q = new_output((m, k), FP8, x.device)
    scale = new_output((m, cdiv(k, span)), torch.float32, x.device)
    block = 128 if group else min(1024, triton.next_power_of_2(k))
    _quantize_fp8_kernel[(m, cdiv(k, span))](x, q, scale, k, x.stride(0), q.stride(0), scale.stride(0), span,
                                             FP8_MAX=FP8_E4M3_MAX, BLOCK=block, num_warps=4)
    return q, scale.view(m) if group == 0 else scale  # (M, 1) -> (M,); a view, no indexing kernel


_IMPLS = {"torch": _quantize_fp8_torch, "triton": _quantize_fp8_triton}


def quantize_fp8(x: torch.Tensor, *, group: int = 0, backend: str = "triton") -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q (M, K) float8_e4m3fn, x_scale fp32 (M,) for group=0 or (M, ceil(K/group))), x ~ x_q * scale."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x: expected a non-empty (M, K), got {tuple(x.shape)}")
    if group not in GROUPS:
        raise ValueError(f"group: expected one of {list(GROUPS)} (0 = one scale per token), got {group!r}")
    return resolve("quantize_fp8", _IMPLS, backend, x.device)(x, group)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    return {"x": randn((shape["T"], shape["K"]), dtype, device, make_generator(device, seed)), "group": shape["group"]}


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    t, k, group = shape["T"], shape["K"], shape["group"]
    scales = t * (cdiv(k, group) if group else 1)
    # ~3 FLOP per element (abs-max, divide, clamp) are not tensor-core work; the count stays 0 like a copy's
    return 0, t * k * dtype_bytes(dtype) + t * k + 4 * scales  # read x, write e4m3 values and fp32 scales


OP = Op(
    name="quantize_fp8",
    fn=quantize_fp8,
    impls=_IMPLS,
    shape_keys=("T", "K", "group"),
    default_shape={"T": 16, "K": 4096, "group": 0},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula="flops = 0; bytes = T*K*dtype_bytes (read x) + T*K (write e4m3) + 4*T*(group ? ceil(K/group) : 1)",
    description="dynamic fp8 e4m3 activation quantisation, per token (group=0) or per 128-group",
    shape_doc="T tokens, K features, group 0 (per token) or 128",
)
