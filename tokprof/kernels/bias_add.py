"""Bias add after a GEMM: out = x + bias, one bias row broadcast over the tokens (gpt-oss's q/k/v, o and router biases).

    x (T, N) (rows may be strided, the last dimension contiguous), bias (N,)  ->  out (T, N) (new, contiguous)

Memory-bound: one add per element against two elements moved. Backends: torch (reference) and triton.
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
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None


def _bias_add_torch(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return (x.float() + bias.float()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _bias_add_kernel(x_ptr, bias_ptr, out_ptr, N, stride_x, BLOCK: tl.constexpr):
        # grid (T, cdiv(N, BLOCK)): one program per row slice.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + cols, (x + b).to(out_ptr.dtype.element_ty), mask=mask)


def _bias_add_triton(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    t, n = x.shape
    out = new_output((t, n), x.dtype, x.device)
    block = min(1024, triton.next_power_of_2(n))
    _bias_add_kernel[(t, cdiv(n, block))](x, bias, out, n, x.stride(0), BLOCK=block, num_warps=4)
    return out


_IMPLS = {"torch": _bias_add_torch, "triton": _bias_add_triton}


def bias_add(x: torch.Tensor, bias: torch.Tensor, *, backend: str = "triton") -> torch.Tensor:
    """out (T, N) = x + bias for x (T, N) (last dimension contiguous) and bias (N,)."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    t, n = x.shape
    if t == 0 or n == 0:
        raise ValueError(f"x: expected a non-empty (T, N), got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"x: expected a contiguous last dimension, got strides {x.stride()}")
    check_tensor("bias", bias, shape=(n,), dtypes=FLOAT_DTYPES, contiguous=True)
    check_same_dtype(x=x, bias=bias)
    device = check_same_device(x=x, bias=bias)
    return resolve("bias_add", _IMPLS, backend, device)(x, bias)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    return {"x": randn((shape["T"], shape["N"]), dtype, device, gen), "bias": randn((shape["N"],), dtype, device, gen)}


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    t, n = shape["T"], shape["N"]
    return t * n, (2 * t * n + n) * dtype_bytes(dtype)  # read x and bias, write out


OP = Op(
    name="bias_add",
    fn=bias_add,
    impls=_IMPLS,
    shape_keys=("T", "N"),
    default_shape={"T": 16, "N": 5120},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula="flops = T*N; bytes = (2*T*N + N)*dtype_bytes (read x and bias, write out)",
    description="x (T, N) + bias (N,) -> (T, N): the biases of gpt-oss's projections and router",
    shape_doc="T tokens, N features",
)
