"""Multi-head latent attention (DeepSeek-V2/V3 MLA) for decode, in the absorbed form, over a paged latent cache.

    q_latent (B, H, L); q_rope (B, H, R); kv_cache (num_blocks, block_size, L + R); block_table (B, max_blocks)
    int32; seq_lens (B,) int32  ->  out (B, H, L),     L = kv_lora_rank, R = qk_rope_head_dim

Each cached token holds one row shared by every head: its compressed KV c (L values, after kv_a_layernorm) followed
by its rotated RoPE key k_pe (R values). The absorbed form folds W_UK into the query (q_latent = q_nope W_UK per
head) and W_UV into the output projection (applied by the caller to `out`), so that

    score[b, h, t] = scale * (q_latent[b, h] . c_t + q_rope[b, h] . k_pe_t),   out[b, h] = softmax_t(score) @ c_t

equals the unabsorbed attention with k = [c W_UK^T | k_pe] and v = c W_UV^T, up to the final W_UV product.
Token t of sequence b lives at kv_cache[block_table[b, t // block_size], t % block_size]. `scale` is the model's
softmax scale (DeepSeek-V3: (qk_nope_head_dim + qk_rope_head_dim)**-0.5 times YaRN's mscale squared).

Memory-bound like GQA decode with one KV head: 4*L + 2*R FLOP per (head, token) against (L + R) bytes per token
read once for all heads. Backends: torch (reference), triton (all heads of a sequence in one program, sequences
split over context, flash-decoding, like decode_attention). No cuda backend.
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
    check_same_device,
    check_same_dtype,
    check_tensor,
    dtype_bytes,
    make_generator,
    randn,
    resolve,
)
from tokprof.kernels.decode_attention import _check_lengths

# --------------------------------------------------------------------------------------------------------- torch


def _mla_decode_torch(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, kv_lora_rank: int, scale: float) -> torch.Tensor:
    batch, _, rank = q_latent.shape
    block_size = kv_cache.shape[1]
    max_blocks = block_table.shape[1]
    lens = seq_lens.long()
    valid = torch.arange(max_blocks * block_size, device=q_latent.device)[None, :] < lens[:, None]  # (B, T)
    used = torch.arange(max_blocks, device=q_latent.device)[None, :] * block_size < lens[:, None]
    pages = torch.where(used, block_table, torch.zeros_like(block_table)).long()  # never index with stale entries
    rows = kv_cache[pages].reshape(batch, max_blocks * block_size, -1).float()  # (B, T, L + R)
    latent, k_pe = rows[..., :rank], rows[..., rank:]
    scores = (torch.einsum("bhl,btl->bht", q_latent.float(), latent)
              + torch.einsum("bhr,btr->bht", q_rope.float(), k_pe)) * scale  # (B, H, T)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bht,btl->bhl", probs, latent).to(q_latent.dtype)


# -------------------------------------------------------------------------------------------------------- public

_IMPLS: dict[str, Any] = {"torch": _mla_decode_torch}


def _validate(q_latent: Any, q_rope: Any, kv_cache: Any, block_table: Any, seq_lens: Any, kv_lora_rank: Any,
              scale: Any) -> None:
    check_tensor("q_latent", q_latent, ndim=3, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("q_rope", q_rope, ndim=3, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("kv_cache", kv_cache, ndim=3, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), contiguous=True)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), contiguous=True)
    check_same_device(q_latent=q_latent, q_rope=q_rope, kv_cache=kv_cache, block_table=block_table,
                      seq_lens=seq_lens)
    check_same_dtype(q_latent=q_latent, q_rope=q_rope, kv_cache=kv_cache)
    batch, heads, rank = q_latent.shape
    if batch == 0 or heads == 0:
        raise ValueError(f"q_latent: expected a non-empty (B, H, kv_lora_rank), got shape {tuple(q_latent.shape)}")
    if isinstance(kv_lora_rank, bool) or not isinstance(kv_lora_rank, int) or kv_lora_rank < 1:
        raise ValueError(f"kv_lora_rank: expected a positive int, got {kv_lora_rank!r}")
    if rank != kv_lora_rank:
        raise ValueError(f"q_latent: expected last dimension kv_lora_rank={kv_lora_rank}, got shape "
                         f"{tuple(q_latent.shape)}")
    if q_rope.shape[0] != batch or q_rope.shape[1] != heads or q_rope.shape[2] == 0:
        raise ValueError(f"q_rope: expected shape (B={batch}, H={heads}, R) with R >= 1, got {tuple(q_rope.shape)}")
    rope_dim = q_rope.shape[2]
    num_blocks, block_size, row = kv_cache.shape
    if num_blocks == 0 or block_size == 0:
        raise ValueError(f"kv_cache: expected num_blocks, block_size >= 1, got shape {tuple(kv_cache.shape)}")
    if row != rank + rope_dim:
        raise ValueError(f"kv_cache: expected rows of kv_lora_rank + R = {rank} + {rope_dim} = {rank + rope_dim} "
                         f"values (num_blocks, block_size, L + R), got shape {tuple(kv_cache.shape)}")
    check_tensor("block_table", block_table, shape=(batch, None))
    if block_table.shape[1] == 0:
        raise ValueError("block_table: expected at least one page per sequence (max_blocks >= 1), got shape "
                         f"{tuple(block_table.shape)}")
    check_tensor("seq_lens", seq_lens, shape=(batch,))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite number (the model's softmax scale), got {scale!r}")
    _check_lengths(block_table, seq_lens, num_blocks, block_size)


def mla_decode_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                         block_table: torch.Tensor, seq_lens: torch.Tensor, *, kv_lora_rank: int, scale: float,
                         backend: str = "triton") -> torch.Tensor:
    """out (B, H, L) = softmax(scale * (q_latent c^T + q_rope k_pe^T)) c over each sequence's pages of the latent
    cache (absorbed MLA; see the module docstring). Checking seq_lens reads it on the host, except during capture."""
    _validate(q_latent, q_rope, kv_cache, block_table, seq_lens, kv_lora_rank, scale)
    impl = resolve("mla_decode_attention", _IMPLS, backend, q_latent.device)
    return impl(q_latent, q_rope, kv_cache, block_table, seq_lens, kv_lora_rank, float(scale))


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    """A batch whose pages are scattered over the cache (a seeded permutation); every sequence holds `context`."""
    batch, heads, rank, rope_dim = shape["B"], shape["H"], shape["L"], shape["R"]
    context, block_size = shape["context"], shape["block_size"]
    pages_per_seq = cdiv(context, block_size)
    num_blocks = batch * pages_per_seq + 4
    gen = make_generator(device, seed)
    perm = torch.randperm(num_blocks, generator=make_generator("cpu", seed))
    return {
        "q_latent": randn((batch, heads, rank), dtype, device, gen),
        "q_rope": randn((batch, heads, rope_dim), dtype, device, gen),
        "kv_cache": randn((num_blocks, block_size, rank + rope_dim), dtype, device, gen),
        "block_table": perm[: batch * pages_per_seq].view(batch, pages_per_seq).to(torch.int32).to(device),
        "seq_lens": torch.full((batch,), context, dtype=torch.int32, device=device),
        "kv_lora_rank": rank,
        "scale": (128 + rope_dim) ** -0.5,  # DeepSeek-V3's qk_nope_head_dim 128 + rope dim, without YaRN's mscale
    }


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    batch, heads, rank, rope_dim = shape["B"], shape["H"], shape["L"], shape["R"]
    context, block_size, b = shape["context"], shape["block_size"], dtype_bytes(dtype)
    # Per (head, token): q_latent . c and q_rope . k_pe (2*(L + R)), p * c (2*L).
    flops = 2 * batch * heads * context * (2 * rank + rope_dim)
    min_bytes = (
        batch * context * (rank + rope_dim) * b  # each latent row once, shared by all heads
        + batch * heads * (2 * rank + rope_dim) * b  # read q_latent, q_rope; write out
        + batch * cdiv(context, block_size) * 4 + batch * 4  # block_table entries in use, seq_lens
    )
    return flops, min_bytes


OP = Op(
    name="mla_decode_attention",
    fn=mla_decode_attention,
    impls=_IMPLS,
    shape_keys=("B", "H", "L", "R", "context", "block_size"),
    default_shape={"B": 16, "H": 128, "L": 512, "R": 64, "context": 4096, "block_size": 64},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula=("flops = 2*B*H*context*(2*L + R); bytes = B*context*(L + R)*dtype_bytes (latent rows once) "
                  "+ B*H*(2*L + R)*dtype_bytes (q_latent, q_rope, out) + 4*B*ceil(context/block_size) + 4*B"),
    description="absorbed MLA decode: q_latent (B,H,L), q_rope (B,H,R) over a paged latent cache -> (B,H,L)",
    shape_doc="B sequences, H heads, L kv_lora_rank, R rope dims, context tokens each, block_size tokens per page",
)
