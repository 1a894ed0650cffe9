"""Token embedding lookup: one row of the embedding table per token.

    token_ids (T,) int32/int64, table (V, H)  ->  out (T, H) = table[token_ids]

Pure data movement (0 FLOP): T rows of H elements read and written, plus the ids, so the roof is HBM bandwidth.
Only the T rows named by the ids are read, never the whole (V, H) table; that is why a decode step's weight bytes
count the LM head but not the embedding table.
Backends: torch (reference), triton. An id outside [0, V) is a ValueError: the check reads the ids on the host
(a device sync), so it is skipped while a CUDA graph is being captured, where a sync is not allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tokprof.kernels._common import (
    FLOAT_DTYPES,
    Op,
    check_tensor,
    dtype_bytes,
    make_generator,
    new_output,
    randn,
    resolve,
    value_checks_apply,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None

ID_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)

# --------------------------------------------------------------------------------------------------------- torch


def _embedding_torch(token_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, token_ids)


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _embedding_kernel(ids_ptr, table_ptr, out_ptr, H, stride_table_row, stride_out_row, BLOCK_H: tl.constexpr):
        # grid (T, cdiv(H, BLOCK_H)): program (t, j) copies columns [j*BLOCK_H, (j+1)*BLOCK_H) of row ids[t].
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = cols < H
        row = tl.load(ids_ptr + t).to(tl.int64)  # int64: V * H can pass 2**31 (128256 x 8192 for Llama-3.1-70B)
        vals = tl.load(table_ptr + row * stride_table_row + cols, mask=mask)
        tl.store(out_ptr + t * stride_out_row + cols, vals, mask=mask)


def _embedding_triton(token_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    num_tokens = token_ids.shape[0]
    hidden = table.shape[1]
    out = new_output((num_tokens, hidden), table.dtype, table.device)
    block_h = min(1024, triton.next_power_of_2(hidden))
    grid = (num_tokens, triton.cdiv(hidden, block_h))
    _embedding_kernel[grid](token_ids, table, out, hidden, table.stride(0), out.stride(0), BLOCK_H=block_h)
    return out


# -------------------------------------------------------------------------------------------------------- public

_IMPLS = {"torch": _embedding_torch, "triton": _embedding_triton}


def embedding(token_ids: torch.Tensor, table: torch.Tensor, *, backend: str = "triton") -> torch.Tensor:
    """out (T, H) = table[token_ids] for token_ids (T,) int32/int64 and table (V, H)."""
    check_tensor("token_ids", token_ids, ndim=1, dtypes=ID_DTYPES, contiguous=True)
    check_tensor("table", table, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True, device=token_ids.device)
    if token_ids.shape[0] == 0:
        raise ValueError("token_ids: expected at least one token (T >= 1), got T=0")
    vocab, hidden = table.shape
    if vocab == 0 or hidden == 0:
        raise ValueError(f"table: expected a non-empty (V, H) table, got shape {tuple(table.shape)}")
    if value_checks_apply(token_ids.device):
        low, high = torch.stack(torch.aminmax(token_ids)).tolist()  # one device-to-host copy, one sync
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"token_ids: expected ids in [0, {vocab}) (the table has V={vocab} rows), got {bad}")
    impl = resolve("embedding", _IMPLS, backend, table.device)
    return impl(token_ids, table)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    ids = torch.randint(0, shape["V"], (shape["T"],), generator=gen, device=device, dtype=torch.int64)
    return {"token_ids": ids, "table": randn((shape["V"], shape["H"]), dtype, device, gen)}


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    t, h, b = shape["T"], shape["H"], dtype_bytes(dtype)
    flops = 0  # a gather: no arithmetic
    min_bytes = t * h * b + t * h * b + t * 8  # read T rows of the table, write out (T, H), read int64 ids (T,)
    return flops, min_bytes


OP = Op(
    name="embedding",
    fn=embedding,
    impls=_IMPLS,
    shape_keys=("T", "V", "H"),
    default_shape={"T": 16, "V": 128256, "H": 4096},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula="flops = 0; bytes = 2*T*H*dtype_bytes + 8*T (read T table rows, write out (T,H), read int64 ids)",
    description="table[token_ids], token_ids (T,) int, table (V, H) -> (T, H)",
    shape_doc="T tokens, V vocabulary size, H hidden size",
)
