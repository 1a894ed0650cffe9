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
from tokprof.kernels.decode_attention import LOG2E, _check_lengths, _outputs, _split_plan

try:
    import triton
    import triton.language as tl

    from tokprof.kernels.decode_attention import _decode_attention_reduce_kernel  # the same split merge
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None

TRITON_MAX_RANK = 1024  # a (BLOCK_H, L) fp32 accumulator in registers; DeepSeek's 512 fits
MLA_MAX_SPLITS = 16  # the split merge loads (splits, L) fp32 per head: 16 x 512 fits in registers, 64 x 512 spills

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


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _mla_decode_kernel(
        q_latent_ptr, q_rope_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
        scale_log2, num_heads, num_splits, tokens_per_split,
        stride_qlb, stride_qlh, stride_qrb, stride_qrh, stride_kvb, stride_kvt, stride_bt, stride_ob, stride_oh,
        PAGE: tl.constexpr, RANK: tl.constexpr, L_PAD: tl.constexpr, ROPE: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # grid (B, cdiv(H, BLOCK_H), num_splits). One program: BLOCK_H heads over one token range. Each latent row
        # is loaded once per program and serves both as the key (with its k_pe) and as the value.
        b = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + b)
        start = split * tokens_per_split
        end = tl.minimum(seq_len, start + tokens_per_split)

        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = h < num_heads
        dl = tl.arange(0, L_PAD)
        dr = tl.arange(0, R_PAD)
        l_ok = dl < RANK
        r_ok = dr < ROPE
        q_l = tl.load(q_latent_ptr + b * stride_qlb + h[:, None] * stride_qlh + dl[None, :],
                      mask=h_ok[:, None] & l_ok[None, :], other=0.0)  # (BLOCK_H, L_PAD)
        q_r = tl.load(q_rope_ptr + b * stride_qrb + h[:, None] * stride_qrh + dr[None, :],
                      mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_H, R_PAD)

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, L_PAD], tl.float32)
        n = tl.arange(0, BLOCK_N)
        bt_row = block_table_ptr + b * stride_bt
        page_next = tl.load(bt_row + (start + n) // PAGE, mask=start + n < end, other=0)  # one tile ahead
        for tile in range(start, end, BLOCK_N):
            t = tile + n
            t_mask = t < end
            page = page_next
            page_next = tl.load(bt_row + (t + BLOCK_N) // PAGE, mask=t + BLOCK_N < end, other=0)
            rows = page.to(tl.int64) * stride_kvb + (t % PAGE) * stride_kvt  # (BLOCK_N,)
            c = tl.load(kv_ptr + rows[:, None] + dl[None, :], mask=t_mask[:, None] & l_ok[None, :],
                        other=0.0)  # (BLOCK_N, L_PAD) latent rows
            k_pe = tl.load(kv_ptr + rows[:, None] + RANK + dr[None, :], mask=t_mask[:, None] & r_ok[None, :],
                           other=0.0)  # (BLOCK_N, R_PAD)
            s = tl.dot(q_l, tl.trans(c), input_precision=DOT_PRECISION)
            s = tl.dot(q_r, tl.trans(k_pe), s, input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_H, BLOCK_N)
            s = tl.where(t_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # every tile holds a valid token: finite
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # a split past the sequence's end ran no tile
        o = acc / l_safe[:, None]
        o_mask = h_ok[:, None] & l_ok[None, :]
        if SPLIT:
            # scratch part_o (B, H, num_splits, RANK), part_lse (B, H, num_splits), fp32, lse in base 2: the layout
            # decode_attention's merge kernel reads.
            row = (b * num_heads + h) * num_splits + split
            tl.store(part_o_ptr + row[:, None] * RANK + dl[None, :], o, mask=o_mask)
            tl.store(part_lse_ptr + row, m_i + tl.log2(l_safe), mask=h_ok)
        else:
            tl.store(out_ptr + b * stride_ob + h[:, None] * stride_oh + dl[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=o_mask)


def _mla_config(rank_pad: int, rope_pad: int, elem_bytes: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps, num_stages) by rule. A (BLOCK_H, L) fp32 accumulator lives in registers, so
    heads come 16 at a time (32 KB at L = 512: 64 floats per thread on 4 warps... 32 on 8); the latent tile is
    BLOCK_N x (L + R), 36 KB at 32 tokens of DeepSeek's 576 16-bit values. Chosen by rule, not yet tuned by
    measurement. On the CPU interpreter: 16 x 16 tiles, so tiny tests cover several tiles and tails."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    # tl.arange needs a power of two: the largest tile of at most ~32 KB (+ the rope part), 32 tokens at 512 + 64
    block_n = max(16, min(64, triton.next_power_of_2(32768 // (rank_pad * elem_bytes) + 1) // 2))
    return 16, block_n, 8, 2


def _mla_decode_triton(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                       block_table: torch.Tensor, seq_lens: torch.Tensor, kv_lora_rank: int,
                       scale: float) -> torch.Tensor:
    batch, heads, rank = q_latent.shape
    rope_dim = q_rope.shape[2]
    block_size = kv_cache.shape[1]
    if rank > TRITON_MAX_RANK:
        raise ValueError(f"kv_lora_rank: the triton backend supports kv_lora_rank <= {TRITON_MAX_RANK}, got {rank}; "
                         "use backend='torch'")
    l_pad = max(16, triton.next_power_of_2(rank))
    r_pad = max(16, triton.next_power_of_2(rope_dim))
    block_h, block_n, num_warps, num_stages = _mla_config(l_pad, r_pad, q_latent.element_size(), q_latent.device)
    head_blocks = cdiv(heads, block_h)
    capacity = block_table.shape[1] * block_size
    num_splits, tokens_per_split = _split_plan(batch, head_blocks, capacity, block_n, q_latent.device)
    if num_splits > MLA_MAX_SPLITS:  # the merge holds (splits, L) fp32 in registers: 64 x 512 spilled on sm_90
        tokens_per_split = cdiv(cdiv(capacity, MLA_MAX_SPLITS), block_n) * block_n
        num_splits = cdiv(capacity, tokens_per_split)
    out, part_o, part_lse = _outputs(q_latent, num_splits)
    precision = "ieee" if q_latent.dtype == torch.float32 else "tf32"
    _mla_decode_kernel[(batch, head_blocks, num_splits)](
        q_latent, q_rope, kv_cache, block_table, seq_lens, out, part_o, part_lse,
        scale * LOG2E, heads, num_splits, tokens_per_split,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1), kv_cache.stride(0),
        kv_cache.stride(1), block_table.stride(0), out.stride(0), out.stride(1),
        PAGE=block_size, RANK=rank, L_PAD=l_pad, ROPE=rope_dim, R_PAD=r_pad, BLOCK_H=block_h, BLOCK_N=block_n,
        SPLIT=num_splits > 1, DOT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_attention_reduce_kernel[(batch, heads)](
            part_o, part_lse, seq_lens, out, part_lse, heads, num_splits, tokens_per_split, out.stride(0),
            out.stride(1), HEAD_DIM=rank, D_PAD=l_pad, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out


# -------------------------------------------------------------------------------------------------------- public

_IMPLS: dict[str, Any] = {"torch": _mla_decode_torch, "triton": _mla_decode_triton}


def _validate(q_latent: Any, q_rope: Any, kv_cache: Any, block_table: Any, seq_lens: Any, kv_lora_rank: Any,
              scale: Any) -> None:
    # The queries may be strided views (the absorbed q_latent usually comes out of a per-head bmm as (H, B, L)
    # transposed): only their last dimension must be contiguous.
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope)):
        check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES)
        if t.stride(2) != 1 and t.shape[2] > 1:
            raise ValueError(f"{name}: expected a contiguous last dimension (stride 1), got strides {t.stride()} for "
                             f"shape {tuple(t.shape)}; call .contiguous() first")
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
    cache (absorbed MLA; see the module docstring). q_latent and q_rope may be strided views with a contiguous last
    dimension. Checking seq_lens reads it on the host, except during capture."""
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
    extra={"compile_check_shapes": (
        {"B": 1, "H": 16},  # DeepSeek-R1 at TP 8 (16 heads per GPU), batch 1: split over context
        {"B": 256, "H": 128},  # 2048 programs: one pass, no split
    )},
)
