"""SwiGLU activation of the MLP: out = silu(gate) * up, with gate and up packed side by side.

    gate_up (T, 2*I) = [gate | up]  ->  out (T, I)

Memory-bound: 5 FLOP per output element against 3 elements moved, so the roof is HBM bandwidth.
Backends: torch (reference), triton, cuda (`cuda/swiglu.cu`, 16-byte vector loads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tokprof.kernels import _cuda
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

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None


# --------------------------------------------------------------------------------------------------------- torch


def _swiglu_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _swiglu_kernel(gate_up_ptr, out_ptr, inter, stride_gu_row, stride_out_row, BLOCK_I: tl.constexpr):
        # grid (T, cdiv(I, BLOCK_I)): one program per row slice; gate at column c, up at column I + c (I = inter).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        mask = cols < inter
        gate = tl.load(gate_up_ptr + row * stride_gu_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * stride_gu_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _swiglu_triton(gate_up: torch.Tensor) -> torch.Tensor:
    num_tokens, two_i = gate_up.shape
    inter = two_i // 2
    out = new_output((num_tokens, inter), gate_up.dtype, gate_up.device)
    block_i = min(1024, triton.next_power_of_2(inter))
    grid = (num_tokens, triton.cdiv(inter, block_i))
    _swiglu_kernel[grid](gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK_I=block_i)
    return out


# ---------------------------------------------------------------------------------------------------------- cuda


def _swiglu_cuda(gate_up: torch.Tensor) -> torch.Tensor:
    num_tokens, two_i = gate_up.shape
    inter = two_i // 2
    out = new_output((num_tokens, inter), gate_up.dtype, gate_up.device)
    vec = 16 // gate_up.element_size()
    # The vector path needs every row start 16-byte aligned: I a multiple of the vector width, aligned bases.
    vectorised = inter % vec == 0 and gate_up.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0
    work = num_tokens * inter // (vec if vectorised else 1)
    threads = 256
    sm_count = torch.cuda.get_device_properties(gate_up.device).multi_processor_count
    blocks = max(1, min(cdiv(work, threads), sm_count * 8))  # grid-stride beyond ~8 blocks per SM
    name = _cuda.kernel_name("swiglu_vec" if vectorised else "swiglu_scalar", gate_up.dtype)
    _cuda.launch("swiglu", name, gate_up.device, (blocks,), (threads,), (gate_up, out, num_tokens, inter))
    return out


# -------------------------------------------------------------------------------------------------------- public

_IMPLS = {"torch": _swiglu_torch, "triton": _swiglu_triton, "cuda": _swiglu_cuda}


def swiglu(gate_up: torch.Tensor, *, backend: str = "triton") -> torch.Tensor:
    """out (T, I) = silu(gate_up[:, :I]) * gate_up[:, I:], for gate_up (T, 2*I)."""
    check_tensor("gate_up", gate_up, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    num_tokens, two_i = gate_up.shape
    if num_tokens == 0:
        raise ValueError("gate_up: expected at least one token (T >= 1), got T=0")
    if two_i == 0 or two_i % 2:
        raise ValueError(f"gate_up: expected an even, non-zero last dimension 2*I, got {two_i}")
    impl = resolve("swiglu", _IMPLS, backend, gate_up.device)
    return impl(gate_up)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    return {"gate_up": randn((shape["T"], 2 * shape["I"]), dtype, device, gen)}


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    t, i, b = shape["T"], shape["I"], dtype_bytes(dtype)
    flops = 5 * t * i  # per output: exp, add, divide (sigmoid), two multiplies
    min_bytes = (2 * t * i + t * i) * b  # read gate_up (T, 2I), write out (T, I)
    return flops, min_bytes


OP = Op(
    name="swiglu",
    fn=swiglu,
    impls=_IMPLS,
    shape_keys=("T", "I"),
    default_shape={"T": 16, "I": 14336},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula="flops = 5*T*I; bytes = 3*T*I*dtype_bytes (read gate_up (T,2I), write out (T,I))",
    description="silu(gate) * up, gate_up (T, 2I) -> (T, I)",
    shape_doc="T tokens, I intermediate size",
)
