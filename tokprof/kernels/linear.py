"""Linear layer without bias: out = x @ weight.T, the GEMMs of a transformer block and the LM head.

    x (M, K), weight (N, K)  ->  out (M, N)

In decode M is the batch (1..64) and the op is memory-bound: 2*M*N*K FLOP against N*K weight elements that must
stream from HBM once per step, so the roof is bandwidth. In prefill M is the number of prompt tokens and the roof
is the tensor cores. Backends: torch (x @ weight.T, cuBLAS on a GPU: the reference) and triton, which has two
kernels: a skinny GEMM for M <= 64 (weight streaming, split-K when the N tiles alone cannot fill the GPU) and a
plain tiled GEMM for larger M. No cuda backend.
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

SKINNY_MAX_M = 64  # up to this many rows the skinny (weight-streaming) kernel runs, above it the tiled GEMM


# --------------------------------------------------------------------------------------------------------- torch


def _linear_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x @ weight.T  # (M, K) @ (K, N) -> (M, N); cuBLAS on a GPU


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _linear_skinny_kernel(x_ptr, w_ptr, out_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_wn, stride_om,
                              stride_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # grid (cdiv(N, BLOCK_N), SPLIT): program (n, s) owns output columns [n*BLOCK_N, +BLOCK_N) for all M rows and
        # reduces over K slice s, so every weight element is loaded by exactly one program, once.
        # Computed transposed, out^T tile (BLOCK_N, BLOCK_M) = W tile (BLOCK_N, K) @ x^T (K, BLOCK_M): the wide
        # weight tile becomes the MMA's M side and the few tokens its N side (BLOCK_M >= 16 for tl.dot).
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        # Padding rows and columns wrap around (% M, % N) instead of being masked, so the loads in the loop stay
        # unmasked and vectorised; the store below drops them.
        rows_w = (offs_n % N).to(tl.int64)
        rows_x = offs_m % M
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        w_ptrs = w_ptr + rows_w[:, None] * stride_wn + (k_start + offs_k)[None, :]  # (BLOCK_N, BLOCK_K)
        x_ptrs = x_ptr + rows_x[:, None] * stride_xm + (k_start + offs_k)[None, :]  # (BLOCK_M, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs)
            else:
                k_ok = (k + offs_k) < k_end
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        out_ptrs = out_ptr + pid_k * stride_split + offs_m[None, :] * stride_om + offs_n[:, None]  # (BLOCK_N, BLOCK_M)
        mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _splitk_reduce_kernel(part_ptr, out_ptr, MN, SPLIT, BLOCK: tl.constexpr):
        # grid (cdiv(M*N, BLOCK),): out (M, N) = sum over s of partials (SPLIT, M, N) fp32, in a fixed order, so the
        # result is deterministic (atomics would add in whatever order the programs finish).
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(SPLIT):
            acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _linear_tiled_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),): one output tile per program. Tiles are visited GROUP_M row
        # tiles at a time, column by column, so the weight tiles a group reads are reused from L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        rows_x = (offs_m % M).to(tl.int64)  # wrap-around padding, as in the skinny kernel
        rows_w = (offs_n % N).to(tl.int64)
        x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
        w_ptrs = w_ptr + rows_w[None, :] * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) = W^T tile
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_ok = (k + offs_k) < K
                x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _skinny_blocks() -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of the skinny kernel, the same for every dtype so `_split_k` can count tiles without it.

    On a GPU a 64 x 128 weight tile is 16 KiB in 16-bit (32 KiB fp32) per pipeline stage: a few stages keep
    enough bytes in flight per SM to cover HBM latency while two or more programs still fit on an SM.
    """
    if triton_interpreted():
        return 32, 32  # tiny tiles: test shapes of a few hundred columns still span several tiles and K blocks
    return 64, 128


def _split_k(M: int, N: int, K: int, device: torch.device | str) -> int:
    """How many slices to split K into for the skinny kernel (1 = no split); tests monkeypatch this.

    A GPU needs a few programs per SM in flight to saturate HBM. When the N tiles alone give fewer than 4 per SM
    (N=4096 gives 64 tiles on an H100's 132 SMs) K is split to make up the difference, keeping at least 4 K blocks
    per slice so each program's load pipeline fills. M does not enter: the weight bytes are the same at any M.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return 1  # the interpreter gains nothing from more programs
    block_n, block_k = _skinny_blocks()
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    n_tiles = cdiv(N, block_n)
    target_programs = 4 * sm_count
    if n_tiles >= target_programs:
        return 1
    return max(1, min(cdiv(target_programs, n_tiles), cdiv(K, block_k) // 4))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would run as tf32 on tensor cores by default (10-bit mantissa); "ieee" matches torch's fp32 matmul.
    return "ieee" if dtype == torch.float32 else "tf32"


def _linear_skinny(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    out = new_output((m, n), x.dtype, x.device)  # (M, N)
    block_n, block_k = _skinny_blocks()
    block_m = max(16, triton.next_power_of_2(m))  # tl.dot needs >= 16; up to 64 rows share one weight tile
    # Normalise the requested split: whole K blocks per slice, no empty slices.
    k_blocks = cdiv(k, block_k)
    split = max(1, min(int(_split_k(m, n, k, x.device)), k_blocks))
    blocks_per_split = cdiv(k_blocks, split)
    split = cdiv(k_blocks, blocks_per_split)
    k_per_split = blocks_per_split * block_k
    if x.device.type != "cuda":
        num_warps, num_stages = 4, 1
    elif x.dtype == torch.float32:
        # fp32 dots run as exact FMAs ("ieee") from registers: 4 warps spilled (up to 2.3 KB per thread on sm_80 at
        # BLOCK_M=64), 8 warps do not.
        num_warps, num_stages = 8, 3
    else:
        num_warps, num_stages = 4, 4
    if split == 1:
        target, stride_split = out, 0
    else:
        target = new_output((split, m, n), torch.float32, x.device)  # fp32 partial sums, (SPLIT, M, N)
        stride_split = target.stride(0)
    grid = (cdiv(n, block_n), split)
    _linear_skinny_kernel[grid](
        x, weight, target, m, n, k, k_per_split, x.stride(0), weight.stride(0), target.stride(-2), stride_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(cdiv(m * n, block),)](target, out, m * n, split, BLOCK=block)
    return out


def _tiled_config(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the tiled GEMM, by heuristic (no autotuning)."""
    if triton_interpreted():
        return 32, 32, 32, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3  # 48 KiB of fp32 tiles per stage would not fit 3 stages at 128 x 128
    return 128, 128, 64, 8, 3


def _linear_tiled(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    out = new_output((m, n), x.dtype, x.device)  # (M, N)
    block_m, block_n, block_k, num_warps, num_stages = _tiled_config(x.dtype)
    grid = (cdiv(m, block_m) * cdiv(n, block_n),)
    _linear_tiled_kernel[grid](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, EVEN_K=k % block_k == 0,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _linear_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.shape[0] <= SKINNY_MAX_M:
        return _linear_skinny(x, weight)
    return _linear_tiled(x, weight)


# -------------------------------------------------------------------------------------------------------- public

_IMPLS = {"torch": _linear_torch, "triton": _linear_triton}


def linear(x: torch.Tensor, weight: torch.Tensor, *, backend: str = "triton") -> torch.Tensor:
    """out (M, N) = x @ weight.T, for x (M, K) and weight (N, K) (the nn.Linear layout, no bias)."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    check_same_dtype(x=x, weight=weight)
    device = check_same_device(x=x, weight=weight)
    m, k = x.shape
    n, k_w = weight.shape
    if m == 0 or k == 0:
        raise ValueError(f"x: expected a non-empty (M, K) with M >= 1 and K >= 1, got {tuple(x.shape)}")
    if n == 0:
        raise ValueError(f"weight: expected a non-empty (N, K) with N >= 1, got {tuple(weight.shape)}")
    if k_w != k:
        raise ValueError(f"weight: expected shape (N, K) with K={k} (the last dimension of x), "
                         f"got {tuple(weight.shape)}")
    impl = resolve("linear", _IMPLS, backend, device)
    return impl(x, weight)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    m, n, k = shape["M"], shape["N"], shape["K"]
    # Weights scaled by K**-0.5, as an initialised layer's are, so outputs stay near unit size in every dtype.
    return {"x": randn((m, k), dtype, device, gen), "weight": randn((n, k), dtype, device, gen, scale=k ** -0.5)}


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    m, n, k = shape["M"], shape["N"], shape["K"]
    flops = 2 * m * n * k  # one multiply and one add per (row, column, k)
    min_bytes = (m * k + n * k + m * n) * dtype_bytes(dtype)  # read x and weight, write out
    return flops, min_bytes


OP = Op(
    name="linear",
    fn=linear,
    impls=_IMPLS,
    shape_keys=("M", "N", "K"),
    default_shape={"M": 16, "N": 4096, "K": 4096},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula="flops = 2*M*N*K; bytes = (M*K + N*K + M*N)*dtype_bytes (read x (M,K) and weight (N,K), write out)",
    description="x @ weight.T, x (M, K), weight (N, K) -> (M, N); skinny split-K kernel for M <= 64",
    shape_doc="M rows (tokens), N output features, K input features",
)
