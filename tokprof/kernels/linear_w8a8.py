"""FP8 linear (W8A8): out = (x_q * x_scale) @ (w_q * w_scale).T, e4m3 activations and weights, fp32 accumulation.

    x_q (M, K) float8_e4m3fn, x_scale fp32 (M,) [per token] or (M, ceil(K/128)) [per 1x128 group]
    qweight tokprof.quant.QuantizedWeight (N, K) "fp8" (scale ()) or "fp8-block" (scale (ceil(N/128), ceil(K/128)))
    ->  out (M, N) in `out_dtype` (bf16 by default)

The activations come from quantize_fp8 (per token for "fp8", per 128-group for "fp8-block", as DeepSeek-V3 runs).
FP8 tensor cores (sm_89 / sm_90 and later) run at twice the bf16 rate and read half the weight bytes: decode
(skinny M) is bound by the weight bytes, prefill by the fp8 peak (the roofline uses the spec table's fp8 FLOP/s).
Backends: torch (dequantise both to fp32, matmul: the reference) and triton (skinny weight-streaming kernel,
tl.dot on e4m3 tiles; block scales applied per 128-wide K step, per-tensor scales once at the end).
One registry op per format: linear_fp8 and linear_fp8_block.
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
    triton_interpreted,
)
from tokprof.kernels.linear_w4a16 import check_qweight
from tokprof.quant.formats import FP8, WEIGHT_FORMATS, QuantizedWeight, dequantize_fp8_rows, dequantize_weight

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None

W8_FORMATS = ("fp8", "fp8-block")
BLOCK = 128  # the DeepSeek-V3 tile: weight scales per 128 x 128, activation scales per 1 x 128


def _linear_w8a8_torch(x_q: torch.Tensor, x_scale: torch.Tensor, qweight: QuantizedWeight,
                       out_dtype: torch.dtype) -> torch.Tensor:
    x = dequantize_fp8_rows(x_q, x_scale, BLOCK if x_scale.dim() == 2 else 0)  # (M, K) fp32
    return (x @ dequantize_weight(qweight).T).to(out_dtype)


if triton is not None:

    @triton.jit
    def _w8a8_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, M, N, K, stride_xm, stride_xsm, stride_wn, stride_wsn,
                     stride_om, BLOCKWISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        # grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)); out^T tile (BLOCK_N, BLOCK_M) = W (BLOCK_N, K) @ x^T (K, BLOCK_M).
        # BLOCKWISE: BLOCK_K == 128, so each K step is one scale tile: its fp32 partial product is scaled by the
        # weight tile's scale (per 128 rows) and each token's group scale before it is accumulated.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_w = (offs_n % N).to(tl.int64)
        rows_x = (offs_m % M).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            # e4m3 tiles arrive as their bytes (uint8): a masked load fills 0, which is +0.0 in e4m3
            w = tl.load(w_ptr + rows_w[:, None] * stride_wn + (k0 + offs_k)[None, :], mask=k_ok[None, :], other=0)
            x = tl.load(x_ptr + rows_x[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=k_ok[None, :], other=0)
            w = w.to(tl.float8e4nv, bitcast=True)
            x = x.to(tl.float8e4nv, bitcast=True)
            if BLOCKWISE:
                part = tl.dot(w, tl.trans(x))  # (BLOCK_N, BLOCK_M) fp32
                ws = tl.load(ws_ptr + (rows_w // 128) * stride_wsn + k0 // 128)  # (BLOCK_N,)
                xs = tl.load(xs_ptr + rows_x * stride_xsm + k0 // 128)  # (BLOCK_M,)
                acc += part * ws[:, None] * xs[None, :]
            else:
                acc = tl.dot(w, tl.trans(x), acc)
        if not BLOCKWISE:
            acc = acc * tl.load(ws_ptr) * tl.load(xs_ptr + rows_x)[None, :]
        out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
        mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _linear_w8a8_triton(x_q: torch.Tensor, x_scale: torch.Tensor, qweight: QuantizedWeight,
                        out_dtype: torch.dtype) -> torch.Tensor:
    m, k = x_q.shape
    n = qweight.shape[0]
    out = new_output((m, n), out_dtype, x_q.device)
    blockwise = qweight.format == "fp8-block"
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_n = 32 if triton_interpreted() else 64
    block_k = BLOCK if blockwise or not triton_interpreted() else 64
    num_warps, num_stages = (4, 1) if triton_interpreted() else (4, 4)
    grid = (cdiv(n, block_n), cdiv(m, block_m))
    _w8a8_kernel[grid](
        x_q.view(torch.uint8), x_scale, qweight.data.view(torch.uint8), qweight.scale, out, m, n, k, x_q.stride(0),
        x_scale.stride(0), qweight.data.stride(0), qweight.scale.stride(0) if blockwise else 0, out.stride(0),
        BLOCKWISE=blockwise, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


_IMPLS = {"torch": _linear_w8a8_torch, "triton": _linear_w8a8_triton}


def linear_w8a8(x_q: torch.Tensor, x_scale: torch.Tensor, qweight: QuantizedWeight, *,
                out_dtype: torch.dtype = torch.bfloat16, backend: str = "triton") -> torch.Tensor:
    """out (M, N) = dequant(x_q, x_scale) @ dequant(qweight).T; x_q (M, K) e4m3 with per-token scales (M,) for an
    "fp8" weight or per-128-group scales (M, ceil(K/128)) for an "fp8-block" weight."""
    check_tensor("x_q", x_q, ndim=2, dtypes=(FP8,), contiguous=True)
    m, k = x_q.shape
    if m == 0 or k == 0:
        raise ValueError(f"x_q: expected a non-empty (M, K), got {tuple(x_q.shape)}")
    n, _ = check_qweight(qweight, W8_FORMATS, k)
    check_tensor("qweight.data", qweight.data, shape=(n, k), dtypes=(FP8,), contiguous=True)
    want = (m,) if qweight.format == "fp8" else (m, cdiv(k, BLOCK))
    check_tensor("x_scale", x_scale, shape=want, dtypes=(torch.float32,), contiguous=True)
    want_w = () if qweight.format == "fp8" else (cdiv(n, BLOCK), cdiv(k, BLOCK))
    check_tensor("qweight.scale", qweight.scale, shape=want_w, dtypes=(torch.float32,), contiguous=True)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected one of {[str(d) for d in FLOAT_DTYPES]}, got {out_dtype}")
    for name, t in (("x_scale", x_scale), ("qweight", qweight.data)):
        if t.device != x_q.device:
            raise ValueError(f"{name}: expected tensors on {x_q.device} (where x_q is), got {t.device}")
    return resolve("linear_w8a8", _IMPLS, backend, x_q.device)(x_q, x_scale, qweight, out_dtype)


def random_fp8_weight(fmt: str, n: int, k: int, device: torch.device | str, gen: torch.Generator) -> QuantizedWeight:
    """A random e4m3 (N, K) weight with scales making it ~K**-0.5 in size, without a quantisation pass."""
    data = (torch.randn((n, k), generator=gen, device=device) * 64).clamp(-448, 448).to(FP8)
    if fmt == "fp8":
        return QuantizedWeight(fmt, (n, k), data, torch.full((), k ** -0.5 / 64, device=device))
    scale = (torch.rand((cdiv(n, BLOCK), cdiv(k, BLOCK)), generator=gen, device=device) * 0.5 + 0.75) * k ** -0.5 / 64
    return QuantizedWeight(fmt, (n, k), data, scale)


def _make_inputs(fmt: str):  # noqa: ANN202 - a closure per format
    def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str,
                    seed: int) -> dict[str, Any]:
        gen = make_generator(device, seed)
        m, n, k = shape["M"], shape["N"], shape["K"]
        x_q = (randn((m, k), torch.float32, device, gen) * 64).clamp(-448, 448).to(FP8)
        groups = (m,) if fmt == "fp8" else (m, cdiv(k, BLOCK))
        x_scale = torch.rand(groups, generator=gen, device=device) * 0.02 + 0.01
        return {"x_q": x_q, "x_scale": x_scale, "qweight": random_fp8_weight(fmt, n, k, device, gen),
                "out_dtype": dtype}

    return make_inputs


def _cost(fmt: str):  # noqa: ANN202
    def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
        m, n, k = shape["M"], shape["N"], shape["K"]
        x_scales = m * (1 if fmt == "fp8" else cdiv(k, BLOCK))
        min_bytes = WEIGHT_FORMATS[fmt].weight_bytes(n, k) + m * k + 4 * x_scales + m * n * dtype_bytes(dtype)
        return 2 * m * n * k, min_bytes

    return cost


def _op(fmt: str) -> Op:
    spec = WEIGHT_FORMATS[fmt]
    scales = "4 (tensor scale)" if fmt == "fp8" else "4*ceil(N/128)*ceil(K/128) (tile scales)"
    x_scales = "4*M" if fmt == "fp8" else "4*M*ceil(K/128)"
    return Op(
        name=spec.op,
        fn=linear_w8a8,
        impls=_IMPLS,
        shape_keys=("M", "N", "K"),
        default_shape={"M": 16, "N": 4096, "K": 4096},
        make_inputs=_make_inputs(fmt),
        cost=_cost(fmt),
        cost_formula=(f"flops = 2*M*N*K (fp8 math); bytes = N*K + {scales} (e4m3 weight) + M*K + {x_scales} "
                      "(e4m3 activations and scales) + M*N*dtype_bytes (write out)"),
        description=f"W8A8 {spec.description}; dtype is the output's",
        shape_doc="M rows (tokens), N output features, K input features",
        extra={"weight_format": fmt, "base_op": "linear"},
    )


OPS_IN_MODULE = tuple(_op(f) for f in W8_FORMATS)
