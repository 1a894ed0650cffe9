"""Greedy sampling: the index of the largest logit of each row.

    logits (B, V)  ->  tokens (B,) int64 = argmax over V, ties to the lowest index (as torch.argmax)

Memory-bound: one compare per logit against B*V elements read, so the roof is HBM bandwidth.
The argmax runs on the logits in their own dtype: fp16/bf16 values convert to fp32 exactly, so comparing in fp32
never reorders them. Rows containing NaN are not valid logits; their result is unspecified.
Backends: torch (reference), triton (one program per row, looping over V in blocks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tokprof.kernels import _common
from tokprof.kernels._common import FLOAT_DTYPES, Op, check_tensor, dtype_bytes, make_generator, randn, resolve

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None

# --------------------------------------------------------------------------------------------------------- torch


def _greedy_sample_torch(logits: torch.Tensor) -> torch.Tensor:
    return torch.argmax(logits, dim=-1)


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _greedy_sample_kernel(logits_ptr, out_ptr, V, stride_row, BLOCK_V: tl.constexpr):
        # grid (B,): program b scans row b in blocks of BLOCK_V, keeping the running max and its first index.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_V)
        best = tl.full((), float("-inf"), tl.float32)
        best_idx = tl.full((), 0, tl.int64)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            block_max = tl.max(x, axis=0)
            # the lowest column holding the block max; masked lanes get V, beyond every real column
            block_idx = tl.min(tl.where((x == block_max) & mask, cols, V), axis=0).to(tl.int64)
            # strictly greater: an equal max in a later block keeps the earlier (lower) index
            take = block_max > best
            best_idx = tl.where(take, block_idx, best_idx)
            best = tl.where(take, block_max, best)
        tl.store(out_ptr + row, best_idx)


def _new_index_output(batch: int, device: torch.device) -> torch.Tensor:
    # int64 has no NaN: inside poisoned_outputs() an unwritten index shows as -1 instead.
    if _common._POISON_OUTPUTS:
        return torch.full((batch,), -1, dtype=torch.int64, device=device)
    return torch.empty((batch,), dtype=torch.int64, device=device)


def _greedy_sample_triton(logits: torch.Tensor) -> torch.Tensor:
    batch, vocab = logits.shape
    out = _new_index_output(batch, logits.device)
    block_v = min(4096, triton.next_power_of_2(vocab))
    _greedy_sample_kernel[(batch,)](logits, out, vocab, logits.stride(0), BLOCK_V=block_v)
    return out


# -------------------------------------------------------------------------------------------------------- public

_IMPLS = {"torch": _greedy_sample_torch, "triton": _greedy_sample_triton}


def greedy_sample(logits: torch.Tensor, *, backend: str = "triton") -> torch.Tensor:
    """tokens (B,) int64 = argmax of each row of logits (B, V); ties go to the lowest index."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    batch, vocab = logits.shape
    if batch == 0:
        raise ValueError("logits: expected at least one row (B >= 1), got B=0")
    if vocab == 0:
        raise ValueError("logits: expected a non-empty vocabulary (V >= 1), got V=0")
    impl = resolve("greedy_sample", _IMPLS, backend, logits.device)
    return impl(logits)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    return {"logits": randn((shape["B"], shape["V"]), dtype, device, gen, scale=4.0)}


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    b, v, nbytes = shape["B"], shape["V"], dtype_bytes(dtype)
    flops = b * v  # one compare per logit
    min_bytes = b * v * nbytes + b * 8  # read logits (B, V), write int64 tokens (B,)
    return flops, min_bytes


OP = Op(
    name="greedy_sample",
    fn=greedy_sample,
    impls=_IMPLS,
    shape_keys=("B", "V"),
    default_shape={"B": 16, "V": 128256},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula="flops = B*V (compares); bytes = B*V*dtype_bytes + 8*B (read logits (B,V), write int64 tokens)",
    description="argmax over the vocabulary, logits (B, V) -> tokens (B,) int64 (ties to the lowest index)",
    shape_doc="B rows (sequences), V vocabulary size",
)
