"""Multi-head latent attention (MLA) over a whole prompt, in the absorbed form: every head attends to one shared
latent row per token.

    q_latent (B, H, S, L); q_rope (B, H, S, R); kv (B, S, L + R) = [c | k_pe]  ->  out (B, H, S, L)
    out[b, h, i] = softmax_j(scale * (q_latent[b, h, i] . c[b, j] + q_rope[b, h, i] . k_pe[b, j])) c[b, j],
    over j <= i when causal (mask aligned at position 0), all j otherwise.

The same arithmetic as mla_decode_attention over contiguous rows (the prompt's own latent rows, before they are
appended to the paged cache). Serving engines often run prefill unabsorbed (up-projecting K and V per head, which
costs fewer FLOPs for long prompts); tokprof's model runs it absorbed so that prefill and decode share one cache
layout and one kernel family. Compute-bound at prompt lengths that matter: 2*(2L + R) FLOP per (head, query, key).

Backends: torch (reference, chunked over query rows) and triton (flash-attention forward with online softmax). No
cuda backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from tokprof.kernels._common import (
    FLOAT_DTYPES,
    Op,
    check_same_device,
    check_same_dtype,
    check_tensor,
    dtype_bytes,
    make_generator,
    new_output,
    randn,
    resolve,
)

_TORCH_SCORE_BYTES = 1 << 28  # bound on the torch reference's fp32 score chunk (H, rows, keys)


# --------------------------------------------------------------------------------------------------------- torch


def _mla_prefill_torch(q_latent: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int,
                       scale: float, causal: bool) -> torch.Tensor:
    batch, heads, seq, rank = q_latent.shape
    out = new_output(tuple(q_latent.shape), q_latent.dtype, q_latent.device)  # (B, H, S, L)
    rows = max(1, _TORCH_SCORE_BYTES // (4 * heads * seq))
    for b in range(batch):
        latent = kv[b, :, :rank].float()  # (S, L)
        k_pe = kv[b, :, rank:].float()  # (S, R)
        for s0 in range(0, seq, rows):
            s1 = min(seq, s0 + rows)
            keys = s1 if causal else seq
            scores = (torch.matmul(q_latent[b, :, s0:s1].float(), latent[:keys].T)
                      + torch.matmul(q_rope[b, :, s0:s1].float(), k_pe[:keys].T)) * scale  # (H, rows, keys)
            if causal:
                q_pos = torch.arange(s0, s1, device=kv.device)[:, None]
                k_pos = torch.arange(keys, device=kv.device)[None, :]
                scores.masked_fill_(k_pos > q_pos, float("-inf"))
            out[b, :, s0:s1] = torch.matmul(torch.softmax(scores, dim=-1), latent[:keys]).to(q_latent.dtype)
    return out


# -------------------------------------------------------------------------------------------------------- public

_IMPLS: dict[str, Any] = {"torch": _mla_prefill_torch}


def mla_prefill_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, *, kv_lora_rank: int,
                          scale: float, causal: bool = True, backend: str = "triton") -> torch.Tensor:
    """out (B, H, S, L): absorbed MLA over a prompt's own latent rows kv (B, S, L + R); see the module docstring."""
    check_tensor("q_latent", q_latent, ndim=4, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("q_rope", q_rope, ndim=4, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("kv", kv, ndim=3, dtypes=FLOAT_DTYPES, contiguous=True)
    check_same_dtype(q_latent=q_latent, q_rope=q_rope, kv=kv)
    device = check_same_device(q_latent=q_latent, q_rope=q_rope, kv=kv)
    batch, heads, seq, rank = q_latent.shape
    if min(batch, heads, seq) == 0:
        raise ValueError(f"q_latent: expected a non-empty (B, H, S, kv_lora_rank), got {tuple(q_latent.shape)}")
    if isinstance(kv_lora_rank, bool) or not isinstance(kv_lora_rank, int) or kv_lora_rank < 1:
        raise ValueError(f"kv_lora_rank: expected a positive int, got {kv_lora_rank!r}")
    if rank != kv_lora_rank:
        raise ValueError(f"q_latent: expected last dimension kv_lora_rank={kv_lora_rank}, got shape "
                         f"{tuple(q_latent.shape)}")
    if tuple(q_rope.shape[:3]) != (batch, heads, seq) or q_rope.shape[3] == 0:
        raise ValueError(f"q_rope: expected shape (B, H, S, R) = ({batch}, {heads}, {seq}, R) with R >= 1, got "
                         f"{tuple(q_rope.shape)}")
    rope_dim = q_rope.shape[3]
    if tuple(kv.shape) != (batch, seq, rank + rope_dim):
        raise ValueError(f"kv: expected shape (B, S, kv_lora_rank + R) = ({batch}, {seq}, {rank + rope_dim}), got "
                         f"{tuple(kv.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite number (the model's softmax scale), got {scale!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
    impl = resolve("mla_prefill_attention", _IMPLS, backend, device)
    return impl(q_latent, q_rope, kv, kv_lora_rank, float(scale), causal)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    batch, heads, seq, rank, rope_dim = shape["B"], shape["H"], shape["S"], shape["L"], shape["R"]
    return {
        "q_latent": randn((batch, heads, seq, rank), dtype, device, gen),
        "q_rope": randn((batch, heads, seq, rope_dim), dtype, device, gen),
        "kv": randn((batch, seq, rank + rope_dim), dtype, device, gen),
        "kv_lora_rank": rank,
        "scale": (128 + rope_dim) ** -0.5,
        "causal": bool(shape["causal"]),
    }


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    batch, heads, seq, rank, rope_dim = shape["B"], shape["H"], shape["S"], shape["L"], shape["R"]
    pairs2 = seq * (seq + 1) if shape["causal"] else 2 * seq * seq  # twice the (query, key) pairs
    flops = batch * heads * (2 * rank + rope_dim) * pairs2  # 2*(2L + R) FLOP per pair
    min_bytes = (batch * heads * seq * (2 * rank + rope_dim) + batch * seq * (rank + rope_dim)) * dtype_bytes(dtype)
    return flops, min_bytes


OP = Op(
    name="mla_prefill_attention",
    fn=mla_prefill_attention,
    impls=_IMPLS,
    shape_keys=("B", "H", "S", "L", "R", "causal"),
    default_shape={"B": 1, "H": 128, "S": 4096, "L": 512, "R": 64, "causal": 1},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula=("flops = 2*B*H*(2L + R)*pairs, pairs = S*(S+1)/2 causal, S*S otherwise; bytes = (B*H*S*(2L + R) "
                  "+ B*S*(L + R))*dtype_bytes (read q_latent, q_rope, kv; write out)"),
    description="absorbed MLA over a prompt: q_latent (B,H,S,L), q_rope (B,H,S,R), kv (B,S,L+R) -> (B,H,S,L)",
    shape_doc="B sequences, H heads, S tokens, L kv_lora_rank, R rope dims, causal 1 or 0",
)
