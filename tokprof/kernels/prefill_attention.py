"""Prefill attention: causal (or full) softmax attention of a whole prompt, with grouped-query heads.

    q (B, Hq, S, D); k, v (B, Hkv, S, D)  ->  out (B, Hq, S, D),   Hq % Hkv == 0
    out[b, h, i] = softmax_j(scale * q[b, h, i] . k[b, h // (Hq/Hkv), j]) v[b, h // (Hq/Hkv), j],
    over j <= i when causal (mask aligned at position 0), over all j otherwise.

Compute-bound at prompt lengths that matter: 4*D FLOP per (query, key) pair against O(S*D) bytes, so the roof is
the tensor-core FLOP rate. Backends: torch (reference, explicit fp32 math) and triton (flash-attention forward with
online softmax, after triton's tutorial 06-fused-attention). No cuda backend.
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
    check_sinks_and_window,
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

_LOG2E = 1.4426950408889634  # the kernel works in base 2: exp(x) = exp2(x * log2(e))
# Grid axis 1 holds B * Hq programs and CUDA allows at most 65535 there. (Heads and batch on axes 1 and 2 would lift
# the limit, but that variant spilled 88 B per thread at D=128 causal on sm_80; no real prefill batch comes near.)
_MAX_GRID_Y = 65535

# Head dims the Triton kernel takes: tl.arange needs a power of two, tl.dot an inner size >= 16, and above 256 the
# Q, K and V tiles no longer fit in shared memory at useful block sizes.
TRITON_HEAD_DIMS: tuple[int, ...] = (16, 32, 64, 128, 256)

# The torch reference materialises scores for a chunk of query rows of all heads of one sequence, (Hq, rows, keys)
# in fp32; this bounds that buffer (a full 16k-token score matrix of 32 heads would be 32 GiB).
_TORCH_SCORE_BYTES = 1 << 28


# --------------------------------------------------------------------------------------------------------- torch


def _prefill_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                             sinks: torch.Tensor | None = None, sliding_window: int | None = None) -> torch.Tensor:
    batch, hq, seq, _ = q.shape
    group = hq // k.shape[1]
    out = new_output(tuple(q.shape), q.dtype, q.device)  # (B, Hq, S, D)
    rows = max(1, _TORCH_SCORE_BYTES // (4 * hq * seq))
    for b in range(batch):
        # Query head h reads KV head h // group: repeat each KV head `group` times, in order.
        k_b = k[b].float().repeat_interleave(group, dim=0)  # (Hq, S, D)
        v_b = v[b].float().repeat_interleave(group, dim=0)  # (Hq, S, D)
        for s0 in range(0, seq, rows):
            s1 = min(seq, s0 + rows)
            keys = s1 if causal else seq  # a causal row i never sees keys beyond i < s1
            scores = torch.matmul(q[b, :, s0:s1].float(), k_b[:, :keys].transpose(1, 2)) * scale  # (Hq, rows, keys)
            if causal:
                q_pos = torch.arange(s0, s1, device=q.device)[:, None]
                k_pos = torch.arange(keys, device=q.device)[None, :]
                hidden = k_pos > q_pos
                if sliding_window is not None:  # transformers' sliding_window_overlay: keep k_pos > q_pos - window
                    hidden |= k_pos <= q_pos - sliding_window
                scores.masked_fill_(hidden, float("-inf"))
            if sinks is not None:  # one more logit per head with no value: it only joins the denominator
                sink = sinks.float()[:, None, None].expand(hq, s1 - s0, 1)
                probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
            else:
                probs = torch.softmax(scores, dim=-1)
            out[b, :, s0:s1] = torch.matmul(probs, v_b[:, :keys]).to(q.dtype)
    return out


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, lo, hi, S, qk_scale,
                    BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, TAIL_MASK: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, window, WINDOW_MASK: tl.constexpr):
        # One stage of the KV loop over keys [lo, hi). Blocks strictly below the diagonal need no mask at all; only
        # the diagonal blocks (CAUSAL_MASK) and the last partial block (TAIL_MASK) pay for the masks.
        offs_n0 = tl.arange(0, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + offs_n0
            k_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]  # (D, BLOCK_N) = K^T tile
            v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]  # (BLOCK_N, D)
            if CAUSAL_MASK or TAIL_MASK or WINDOW_MASK:
                kv_ok = offs_n < S
                k = tl.load(k_ptrs, mask=kv_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
            if CAUSAL_MASK:
                keep = (offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < S)
                qk = tl.where(keep, qk, float("-inf"))
            elif TAIL_MASK:
                qk = tl.where(offs_n[None, :] < S, qk, float("-inf"))
            if WINDOW_MASK:  # sliding window: key j visible from row i only if j > i - window
                qk = tl.where(offs_n[None, :] > offs_m[:, None] - window, qk, float("-inf"))
                # A row may see no key of this block yet (all before its window): m_new stays -inf, and the
                # exponentials must use 0 instead of -inf - -inf = NaN.
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(qk - m_use[:, None])
                alpha = tl.math.exp2(m_i - m_use)
            else:
                # Every row keeps at least one key per masked block (its diagonal, or key `lo` < S): m_new is finite.
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                p = tl.math.exp2(qk - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _prefill_attn_kernel(q_ptr, k_ptr, v_ptr, out_ptr, sinks_ptr, qk_scale, S, HQ, GROUP, window,
                             stride_qb, stride_qh, stride_qs,
                             stride_kb, stride_kh, stride_ks,
                             stride_vb, stride_vh, stride_vs,
                             stride_ob, stride_oh, stride_os,
                             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             HAS_SINKS: tl.constexpr = False, WINDOW: tl.constexpr = False):
        # grid (cdiv(S, BLOCK_M), B * Hq): one program per block of BLOCK_M query rows of one query head.
        start_m = tl.program_id(0)
        if CAUSAL:
            # Causal work grows with the row block: launch the longest programs first so the last wave is short.
            start_m = tl.num_programs(0) - 1 - start_m
        bh = tl.program_id(1)
        b = (bh // HQ).to(tl.int64)
        h = bh % HQ
        kvh = (h // GROUP).to(tl.int64)  # GQA: the KV head shared by this query head's group
        h = h.to(tl.int64)
        q_base = q_ptr + b * stride_qb + h * stride_qh
        k_base = k_ptr + b * stride_kb + kvh * stride_kh
        v_base = v_ptr + b * stride_vb + kvh * stride_vh
        o_base = out_ptr + b * stride_ob + h * stride_oh

        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < S
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if WINDOW:
            # Sliding window (causal): rows [diag_lo, diag_lo + BLOCK_M) see keys (i - window, i]; start at the block
            # holding the first row's first visible key, skip everything before it, mask every block read.
            diag_lo = start_m * BLOCK_M
            lo = tl.maximum(diag_lo - window + 1, 0) // BLOCK_N * BLOCK_N
            diag_hi = tl.minimum(diag_lo + BLOCK_M, S)
            acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                                        lo, diag_hi, S, qk_scale, BLOCK_N, True, False, DOT_PRECISION, window, True)
        elif CAUSAL:
            # Off-band: keys [0, start_m*BLOCK_M) are all visible and all < S (BLOCK_M is a multiple of BLOCK_N).
            diag_lo = start_m * BLOCK_M
            acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                                        0, diag_lo, S, qk_scale, BLOCK_N, False, False, DOT_PRECISION, 0, False)
            # On-band: the diagonal block, masked; blocks above it are skipped entirely.
            diag_hi = tl.minimum(diag_lo + BLOCK_M, S)
            acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                                        diag_lo, diag_hi, S, qk_scale, BLOCK_N, True, False, DOT_PRECISION, 0, False)
        else:
            full_hi = (S // BLOCK_N) * BLOCK_N
            acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                                        0, full_hi, S, qk_scale, BLOCK_N, False, False, DOT_PRECISION, 0, False)
            acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                                        full_hi, S, S, qk_scale, BLOCK_N, False, True, DOT_PRECISION, 0, False)
        if HAS_SINKS:  # the head's sink logit joins the denominator (base 2 like m_i), with no value
            sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
            m_all = tl.maximum(m_i, sink)
            rescale = tl.math.exp2(m_i - m_all)
            acc = acc * rescale[:, None]
            l_i = l_i * rescale + tl.math.exp2(sink - m_all)
        if WINDOW:  # padding rows past S may see no key at all (l_i = 0); they are not stored, keep them finite
            l_i = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_i[:, None]
        tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])


def _attn_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by heuristic; BLOCK_M is always a multiple of BLOCK_N.

    No autotuning: the interpreter would run every config, and prompt lengths vary call to call. The 16-bit GPU
    choices are those triton's tutorial 06 autotuner settles on for Hopper (128x64 tiles; 8 warps at D=128) and
    compile for sm_90 without register spills (ptxas via cuobjdump, triton 3.9; on sm_80 the D=64 tiles spill
    16-32 B per thread). fp32 runs its dots as exact fp32 FMAs ("ieee"), which hold the tiles in registers: 32x16
    tiles on 8 warps are the largest found that do not spill at D=128 (64x32 on 4 warps spilled ~1.7 KB per thread
    on sm_90).
    """
    if triton_interpreted():
        # Small tiles so tiny test prompts still cover several row blocks, off-band blocks and split diagonals.
        return 32, 16, 4, 1
    if dtype == torch.float32:
        return (32, 16, 8, 2) if head_dim <= 128 else (16, 16, 4, 2)
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim == 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


def _prefill_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                              sinks: torch.Tensor | None = None, sliding_window: int | None = None) -> torch.Tensor:
    batch, hq, seq, head_dim = q.shape
    group = hq // k.shape[1]
    out = new_output(tuple(q.shape), q.dtype, q.device)  # (B, Hq, S, D)
    block_m, block_n, num_warps, num_stages = _attn_config(head_dim, q.dtype)
    # fp32 inputs would run as tf32 on tensor cores by default (10-bit mantissa); "ieee" keeps fp32 exact.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if batch * hq > _MAX_GRID_Y:
        raise ValueError(f"q: the triton backend takes B * Hq up to {_MAX_GRID_Y} (CUDA's limit on grid axis 1), got "
                         f"B={batch} x Hq={hq} = {batch * hq}; split the batch")
    grid = (triton.cdiv(seq, block_m), batch * hq)
    extras = {}  # gpt-oss's sinks and sliding window, compiled in only when used
    if sinks is not None:
        extras["HAS_SINKS"] = True
    if sliding_window is not None:
        extras["WINDOW"] = True
    _prefill_attn_kernel[grid](
        q, k, v, out, sinks if sinks is not None else q, scale * _LOG2E, seq, hq, group, int(sliding_window or 0),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, DOT_PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages, **extras,
    )
    return out


# -------------------------------------------------------------------------------------------------------- public

_IMPLS = {"torch": _prefill_attention_torch, "triton": _prefill_attention_triton}


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                      scale: float | None = None, sinks: torch.Tensor | None = None,
                      sliding_window: int | None = None, backend: str = "triton") -> torch.Tensor:
    """out (B, Hq, S, D) = softmax(scale * q k^T [causal mask]) v, for q (B, Hq, S, D) and k, v (B, Hkv, S, D).

    Query head h attends with KV head h // (Hq / Hkv). `scale` defaults to D**-0.5.
    gpt-oss: `sinks` (Hq,) adds exp(sinks[h]) to head h's softmax denominator; `sliding_window` W (causal only)
    keeps keys j with i - W < j <= i, as transformers' sliding-window mask does.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, contiguous=True)
    check_same_dtype(q=q, k=k, v=v)
    device = check_same_device(q=q, k=k, v=v)
    batch, hq, seq, head_dim = q.shape
    hkv = k.shape[1]
    if batch == 0 or hq == 0 or seq == 0 or head_dim == 0:
        raise ValueError(f"q: expected a non-empty (B, Hq, S, D) with every size >= 1, got {tuple(q.shape)}")
    if hkv == 0:
        raise ValueError(f"k: expected at least one KV head (Hkv >= 1), got shape {tuple(k.shape)}")
    expected_kv = (batch, hkv, seq, head_dim)
    if tuple(k.shape) != expected_kv:
        raise ValueError(f"k: expected shape (B, Hkv, S, D) = {expected_kv} to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if tuple(v.shape) != expected_kv:
        raise ValueError(f"v: expected shape (B, Hkv, S, D) = {expected_kv} (the shape of k), got {tuple(v.shape)}")
    if hq % hkv:
        raise ValueError(f"k: expected a KV head count Hkv that divides the query heads Hq={hq}, got Hkv={hkv}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
    if scale is None:
        scale = head_dim ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected None or a positive finite float, got {scale!r}")
    check_sinks_and_window(sinks, sliding_window, hq, device)
    if sliding_window is not None and not causal:
        raise ValueError(f"sliding_window: expected None with causal=False (the window is a causal one), got "
                         f"{sliding_window!r}")
    impl = resolve("prefill_attention", _IMPLS, backend, device)
    if backend == "triton" and head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(f"q: the triton backend takes head dim D in {list(TRITON_HEAD_DIMS)} (a power of two), "
                         f"got D={head_dim}; backend='torch' takes any D")
    if sinks is None and sliding_window is None:
        return impl(q, k, v, causal, float(scale))
    return impl(q, k, v, causal, float(scale), sinks, sliding_window)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    b, hq, hkv, s, d = shape["B"], shape["Hq"], shape["Hkv"], shape["S"], shape["D"]
    return {
        "q": randn((b, hq, s, d), dtype, device, gen),
        "k": randn((b, hkv, s, d), dtype, device, gen),
        "v": randn((b, hkv, s, d), dtype, device, gen),
        "causal": bool(shape["causal"]),
        **({"sinks": randn((hq,), torch.float32, device, gen)} if shape.get("sinks") else {}),
        **({"sliding_window": shape["window"]} if shape.get("window") else {}),
    }


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    b, hq, hkv, s, d = shape["B"], shape["Hq"], shape["Hkv"], shape["S"], shape["D"]
    # Per (query, key) pair: q.k (D MACs) and p*v (D MACs), 2 FLOP per MAC = 4*D FLOP. Causal keeps the
    # S*(S+1)/2 pairs on or below the diagonal; the softmax's O(S^2) exp/max/sum work is not counted.
    pairs2 = s * (s + 1) if shape["causal"] else 2 * s * s  # twice the number of pairs (keeps it an integer)
    window = shape.get("window", 0)
    if window and window < s:  # causal sliding window: row i sees min(i + 1, window) keys
        pairs2 = window * (window + 1) + 2 * (s - window) * window
    flops = 2 * b * hq * d * pairs2
    min_bytes = (2 * b * hq * s * d + 2 * b * hkv * s * d) * dtype_bytes(dtype)  # read q, k, v; write out
    if shape.get("sinks"):
        min_bytes += 4 * hq  # fp32 sink logits
    return flops, min_bytes


OP = Op(
    name="prefill_attention",
    fn=prefill_attention,
    impls=_IMPLS,
    shape_keys=("B", "Hq", "Hkv", "S", "D", "causal", "window", "sinks"),
    default_shape={"B": 1, "Hq": 32, "Hkv": 8, "S": 4096, "D": 128, "causal": 1},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula=("flops = 4*B*Hq*D*S*(S+1)/2 causal, 4*B*Hq*S*S*D otherwise (QK^T and PV over the unmasked pairs, "
                  "2 FLOP per MAC); bytes = (2*B*Hq*S*D + 2*B*Hkv*S*D)*dtype_bytes (read q, k, v; write out); with "
                  "window W < S the pairs are W*(W+1)/2 + (S-W)*W; with sinks: + 4*Hq bytes"),
    description="flash-attention forward over a prompt, GQA, causal or full: q (B,Hq,S,D), k/v (B,Hkv,S,D)",
    shape_doc=("B sequences, Hq query heads, Hkv KV heads, S tokens, D head dim, causal 1 or 0; optional window "
               "(> 0, causal only: sliding window, FLOPs over the pairs it keeps) and sinks (1: gpt-oss sink logits)"),
    extra={"compile_check_shapes": (
        {"B": 1, "Hq": 64, "Hkv": 8, "S": 2048, "D": 64, "causal": 1, "window": 128, "sinks": 1},
        {"B": 1, "Hq": 64, "Hkv": 8, "S": 2048, "D": 64, "causal": 1, "sinks": 1},
    )},
)
