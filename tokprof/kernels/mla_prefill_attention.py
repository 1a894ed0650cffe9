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

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None

_LOG2E = 1.4426950408889634  # the kernel works in base 2: exp(x) = exp2(x * log2(e))
TRITON_MAX_RANK = 1024  # a (BLOCK_M, L) fp32 accumulator in registers; DeepSeek's 512 fits
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


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _mla_prefill_kernel(
        q_latent_ptr, q_rope_ptr, kv_ptr, out_ptr, scale_log2, S, H,
        stride_qlb, stride_qlh, stride_qls, stride_qrb, stride_qrh, stride_qrs, stride_kvb, stride_kvs,
        stride_ob, stride_oh, stride_os,
        RANK: tl.constexpr, L_PAD: tl.constexpr, ROPE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # grid (cdiv(S, BLOCK_M), B * H): one program per block of query rows of one head. Keys and values are the
        # same latent rows c (plus k_pe for the score); online softmax in base 2.
        start_m = tl.program_id(0)
        if CAUSAL:  # the longest programs first, so the last wave is short
            start_m = tl.num_programs(0) - 1 - start_m
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < S
        dl = tl.arange(0, L_PAD)
        dr = tl.arange(0, R_PAD)
        l_ok = dl < RANK
        r_ok = dr < ROPE
        q_l = tl.load(q_latent_ptr + b * stride_qlb + h * stride_qlh + offs_m[:, None] * stride_qls + dl[None, :],
                      mask=row_ok[:, None] & l_ok[None, :], other=0.0)  # (BLOCK_M, L_PAD)
        q_r = tl.load(q_rope_ptr + b * stride_qrb + h * stride_qrh + offs_m[:, None] * stride_qrs + dr[None, :],
                      mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_M, R_PAD)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, L_PAD], tl.float32)
        kv_base = kv_ptr + b * stride_kvb
        hi = tl.minimum((start_m + 1) * BLOCK_M, S) if CAUSAL else S
        offs_n0 = tl.arange(0, BLOCK_N)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            n_ok = offs_n < S
            c = tl.load(kv_base + offs_n[:, None] * stride_kvs + dl[None, :], mask=n_ok[:, None] & l_ok[None, :],
                        other=0.0)  # (BLOCK_N, L_PAD)
            k_pe = tl.load(kv_base + offs_n[:, None] * stride_kvs + RANK + dr[None, :],
                           mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_N, R_PAD)
            s = tl.dot(q_l, tl.trans(c), input_precision=DOT_PRECISION)
            s = tl.dot(q_r, tl.trans(k_pe), s, input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
            # Key start_n <= every row of the block (start_n < (start_m + 1) * BLOCK_M and keys come in order), so
            # each row sees key 0 in the first block: m_new is finite from the first block on.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PRECISION)
            m_i = m_new
        l_i = tl.where(l_i > 0.0, l_i, 1.0)  # padding rows past S: never stored
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + dl[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & l_ok[None, :])


def _mla_prefill_config(dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by rule: the (BLOCK_M, L) fp32 accumulator and the (BLOCK_M, L + R)
    query tile live in registers, so 32 query rows at L = 512 on 8 warps; not yet tuned by measurement. On the CPU
    interpreter: 16 x 16 tiles, so tiny prompts cover several row blocks and key blocks."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 16, 16, 8, 2
    return 32, 32, 8, 2


def _mla_prefill_triton(q_latent: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int,
                        scale: float, causal: bool) -> torch.Tensor:
    batch, heads, seq, rank = q_latent.shape
    rope_dim = q_rope.shape[3]
    if rank > TRITON_MAX_RANK:
        raise ValueError(f"kv_lora_rank: the triton backend supports kv_lora_rank <= {TRITON_MAX_RANK}, got {rank}; "
                         "use backend='torch'")
    if batch * heads > 65535:
        raise ValueError(f"q_latent: the triton backend takes B * H up to 65535 (CUDA's grid axis 1), got "
                         f"{batch} x {heads}; split the batch")
    out = new_output(tuple(q_latent.shape), q_latent.dtype, q_latent.device)  # (B, H, S, L)
    block_m, block_n, num_warps, num_stages = _mla_prefill_config(q_latent.dtype, q_latent.device)
    precision = "ieee" if q_latent.dtype == torch.float32 else "tf32"
    _mla_prefill_kernel[(triton.cdiv(seq, block_m), batch * heads)](
        q_latent, q_rope, kv, out, scale * _LOG2E, seq, heads,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2), q_rope.stride(0), q_rope.stride(1),
        q_rope.stride(2), kv.stride(0), kv.stride(1), out.stride(0), out.stride(1), out.stride(2),
        RANK=rank, L_PAD=max(16, triton.next_power_of_2(rank)), ROPE=rope_dim,
        R_PAD=max(16, triton.next_power_of_2(rope_dim)), BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
        DOT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )
    return out


# -------------------------------------------------------------------------------------------------------- public

_IMPLS: dict[str, Any] = {"torch": _mla_prefill_torch, "triton": _mla_prefill_triton}


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
