"""Per-head linear: out[m, g] = weight[g] @ x[m, g], one small GEMM per group g (attention head), no bias.

    x (M, G, K) (token-major; the last dimension contiguous, other strides free), weight (G, N, K)  ->  out (M, G, N)

The absorbed form of multi-head latent attention (DeepSeek-V3) needs it twice per layer: the query's no-RoPE part
projected into the latent space, q_latent[t, h] = W_UK[h]^T q_nope[t, h] (K = qk_nope_head_dim, N = kv_lora_rank),
and the attention's latent output projected to the value heads, o[t, h] = W_UV[h] latent[t, h] (K = kv_lora_rank,
N = v_head_dim). x may be a strided view (q_nope is a column slice of the q projection's output), so no copy runs.
In decode M is the batch and the op streams G*N*K weight elements: memory-bound like `linear`.
Backends: torch (einsum, the reference) and triton (one program per (group, N tile, M tile), fp32 accumulation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tokprof.kernels._common import (
    FLOAT_DTYPES,
    Op,
    cdiv,
    check_same_device,
    check_same_dtype,
    check_tensor,
    dtype_bytes,
    make_generator,
    new_output,
    randn,
    resolve,
    triton_interpreted,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None


def _batched_linear_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.einsum("mgk,gnk->mgn", x, weight).contiguous()  # (M, G, K) x (G, N, K) -> (M, G, N)


if triton is not None:

    @triton.jit
    def _batched_linear_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_xg, stride_wg, stride_wn,
                               stride_om, stride_og, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # grid (G, cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)): program (g, n, m) computes out[m tile, g, n tile]; in decode
        # there is one M tile, so every weight element of group g is loaded by exactly one program, once.
        g = tl.program_id(0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        rows_w = (offs_n % N).to(tl.int64)  # wrap-around padding: unmasked row loads, the store drops them
        rows_x = (offs_m % M).to(tl.int64)
        w_ptrs = w_ptr + g * stride_wg + rows_w[:, None] * stride_wn + offs_k[None, :]  # (BLOCK_N, BLOCK_K)
        x_ptrs = x_ptr + g * stride_xg + rows_x[:, None] * stride_xm + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_ok = (k + offs_k) < K
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        out_ptrs = out_ptr + g * stride_og + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _batched_linear_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    m, g, k = x.shape
    n = weight.shape[1]
    out = new_output((m, g, n), x.dtype, x.device)
    if triton_interpreted():
        block_n, block_k, num_warps = 32, 32, 4
    else:
        block_n, block_k, num_warps = 64, 64, 4
    block_m = min(64, max(16, triton.next_power_of_2(m)))  # tl.dot needs >= 16 rows
    grid = (g, cdiv(n, block_n), cdiv(m, block_m))
    _batched_linear_kernel[grid](
        x, weight, out, m, n, k, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        out.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps,
        num_stages=1 if x.device.type != "cuda" else 3)
    return out


_IMPLS = {"torch": _batched_linear_torch, "triton": _batched_linear_triton}


def batched_linear(x: torch.Tensor, weight: torch.Tensor, *, backend: str = "triton") -> torch.Tensor:
    """out (M, G, N): out[m, g] = weight[g] @ x[m, g], for x (M, G, K) with a contiguous last dimension and
    weight (G, N, K) contiguous."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=3, dtypes=FLOAT_DTYPES, contiguous=True)
    check_same_dtype(x=x, weight=weight)
    device = check_same_device(x=x, weight=weight)
    if x.stride(2) != 1:
        raise ValueError(f"x: expected a contiguous last dimension (stride 1), got strides {x.stride()}")
    m, g, k = x.shape
    if min(m, g, k) == 0 or weight.shape[1] == 0:
        raise ValueError(f"x/weight: expected non-empty x (M, G, K) and weight (G, N, K), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] != g or weight.shape[2] != k:
        raise ValueError(f"weight: expected shape (G={g}, N, K={k}) (from x {tuple(x.shape)}), "
                         f"got {tuple(weight.shape)}")
    impl = resolve("batched_linear", _IMPLS, backend, device)
    return impl(x, weight)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    m, g, n, k = shape["M"], shape["G"], shape["N"], shape["K"]
    return {"x": randn((m, g, k), dtype, device, gen),
            "weight": randn((g, n, k), dtype, device, gen, scale=k ** -0.5)}


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    m, g, n, k = shape["M"], shape["G"], shape["N"], shape["K"]
    flops = 2 * m * g * n * k
    min_bytes = g * (m * k + n * k + m * n) * dtype_bytes(dtype)  # read x and weight, write out
    return flops, min_bytes


OP = Op(
    name="batched_linear",
    fn=batched_linear,
    impls=_IMPLS,
    shape_keys=("M", "G", "N", "K"),
    default_shape={"M": 16, "G": 128, "N": 512, "K": 128},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula="flops = 2*M*G*N*K; bytes = G*(M*K + N*K + M*N)*dtype_bytes (read x and weight, write out)",
    description="per-head GEMM out[m, g] = weight[g] @ x[m, g]: MLA's absorbed W_UK and W_UV projections",
    shape_doc="M rows (tokens), G groups (heads), N output and K input features per group",
)
