"""Decode attention over a paged KV cache: one new query token per sequence attends to that sequence's whole cache.

    q (B, Hq, D); k_cache, v_cache (num_blocks, block_size, Hkv, D); block_table (B, max_blocks) int32;
    seq_lens (B,) int32, 1 <= seq_lens[b] <= max_blocks * block_size  ->  out (B, Hq, D)

Token t of sequence b lives at k_cache[block_table[b, t // block_size], t % block_size]. Grouped-query attention:
query head h reads KV head h // (Hq / Hkv). out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b, scale = D**-0.5 default.

Memory-bound: 4 FLOP per cached element read (2 for q.k, 2 for p.v, per query head of the group) against the K and V
bytes, so the roof is HBM bandwidth and the kernels must read each K/V byte exactly once. Both GPU kernels therefore
give one program (thread block) all query heads of its KV group, and split long sequences across programs
(flash-decoding) when batch x KV heads is too small to fill the GPU; a second small kernel merges the splits.

Backends: torch (reference), triton (tensor-core tiles, the benchmarked one), cuda (`cuda/decode_attention.cu`,
16-byte vector loads and warp reductions on CUDA cores; pages of CUDA_BLOCK_SIZES tokens only).

Validation reads seq_lens (and the used block_table entries) on the host, which synchronises the device; the check is
skipped while a CUDA graph is being captured, and the kernels themselves never synchronise, so a call can be
captured. The implementations in `OP.impls` skip validation entirely (same keyword arguments, no backend).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from tokprof.kernels import _cuda
from tokprof.kernels._common import (
    FLOAT_DTYPES,
    Op,
    cdiv,
    check_same_device,
    check_same_dtype,
    check_sinks_and_window,
    check_tensor,
    dtype_bytes,
    make_generator,
    new_output,
    randn,
    resolve,
    value_checks_apply,
)
from tokprof.kernels.decode_attention_config import (  # re-exported: tests and the probe read them here
    _sm_count,
    _triton_config,
    _triton_ctas_per_sm,
    smem_per_sm,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None

LOG2E = 1.4426950408889634  # kernels work in base 2: exp(x) = exp2(x * log2(e)), and exp2 is one SFU instruction
MAX_SPLITS = 64  # more splits than this only add reduction traffic: 64 x 132 SMs is far past filling an H100
# A split streams at least one 64-token tile: at D=128 in 16-bit that is 32 KB of K and V per KV head against ~1 KB
# of fixed traffic (q, the partial output and its log-sum-exp). 256 left batch 1 / 1k context on 32 programs: a
# quarter of an H100's SMs streaming the whole KV cache.
MIN_TOKENS_PER_SPLIT = 64
TRITON_MAX_HEAD_DIM = 256  # K and V tiles of (BLOCK_N, D_PAD); beyond 256 they no longer fit with pipelining
TRITON_MAX_GROUP = 64  # query heads per KV head held as one (G_PAD, D) fp32 accumulator tile in registers
CUDA_HEAD_DIMS = (64, 128)  # template instances compiled in cuda/decode_attention.cu
CUDA_GROUP_TILES = (1, 2, 4, 8)  # query heads per thread block; larger groups are split over several blocks
# Page sizes compiled into cuda/decode_attention.cu (a template constant: page and row of a token are a shift and a
# mask, and a group's tokens of one step share a page id): 16 is tokprof's and vLLM's default, 32 the other common one.
CUDA_BLOCK_SIZES = (16, 32)
CUDA_THREADS = 128
FP8_KV = torch.float8_e4m3fn  # an fp8 KV cache (append_kv_fp8 writes it), read with per-head k_scale / v_scale
CACHE_DTYPES = (*FLOAT_DTYPES, FP8_KV)
SPLIT_GRANULARITY_CUDA = 64  # a multiple of every CUDA instance's tokens-per-step, so splits start on a step


# --------------------------------------------------------------------------------------------------------- torch


def _decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                            sliding_window: int | None = None) -> torch.Tensor:
    """Plain PyTorch: gather every sequence's pages, softmax in fp32. GQA groups the query heads per KV head, which
    equals repeating K and V Hq/Hkv times without materialising the copies. A sink is one more logit per head in the
    softmax, with no value (transformers' gpt-oss concatenates it and drops its column)."""
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    max_blocks = block_table.shape[1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    lens = seq_lens.long()
    positions = torch.arange(max_blocks * block_size, device=q.device)[None, :]
    valid = positions < lens[:, None]  # (B, T)
    if sliding_window is not None:  # the query sits at position len - 1 and sees keys t > len - 1 - window
        valid &= positions >= lens[:, None] - sliding_window
    # Entries past a sequence's last page may hold anything (serving engines leave them stale): never index with them.
    used = torch.arange(max_blocks, device=q.device)[None, :] * block_size < lens[:, None]  # (B, max_blocks)
    pages = torch.where(used, block_table, torch.zeros_like(block_table)).long()
    k = k_cache[pages].reshape(batch, max_blocks * block_size, num_kv_heads, head_dim).float()  # (B, T, Hkv, D)
    v = v_cache[pages].reshape(batch, max_blocks * block_size, num_kv_heads, head_dim).float()  # (B, T, Hkv, D)
    if k_scale is not None:  # an fp8 cache: per-head scales (Hkv,) back to real values
        k = k * k_scale.float()[None, None, :, None]
    if v_scale is not None:
        v = v * v_scale.float()[None, None, :, None]
    qg = q.float().view(batch, num_kv_heads, group, head_dim)  # (B, Hkv, G, D)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, k) * scale  # (B, Hkv, G, T)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, num_kv_heads, group, 1).expand(batch, -1, -1, -1)  # (B, Hkv, G, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgt,bthd->bhgd", probs, v)  # (B, Hkv, G, D)
    return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)


# ------------------------------------------------------------------------------------------------- split planning


def config_properties(device: torch.device) -> dict[str, Any]:
    """The device properties the decode-attention configs depend on, and the configs they give (for logs)."""
    props = torch.cuda.get_device_properties(device)
    out: dict[str, Any] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                           "multi_processor_count": props.multi_processor_count,
                           "shared_memory_per_multiprocessor": getattr(props, "shared_memory_per_multiprocessor",
                                                                       None),
                           "smem_per_sm_used": smem_per_sm(device),
                           "L2_cache_size": getattr(props, "L2_cache_size", None)}
    for elem_bytes, name in ((2, "bf16"), (4, "fp32")):
        block_n, warps, stages = _triton_config(128, elem_bytes, device)
        out[f"triton_d128_{name}"] = {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages,
                                      "ctas_per_sm": _triton_ctas_per_sm(128, elem_bytes, device)}
    out["splits_b1_ctx1024_hkv8"] = _split_plan(1, 8, 1024, 64, device,
                                                _triton_ctas_per_sm(128, 2, device))
    return out


def _num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                ctas_per_sm: int = 2) -> int:
    """How many programs share one sequence (flash-decoding). Tests monkeypatch this to force either path.

    `num_kv_heads` counts the independent programs per sequence (KV heads, times head chunks in the CUDA kernel);
    `ctas_per_sm` how many of them fit on one SM at once (3 for the Triton kernel's 72 KB on an H100's 228 KB).
    One split when batch x KV heads already fills every SM (e.g. B=64, Hkv=8: 512 >= 3 x 132 on an H100): a split
    only adds the scratch round trip. Otherwise enough splits to fill the SMs, but no split shorter than
    MIN_TOKENS_PER_SPLIT tokens and no more than MAX_SPLITS. On the CPU (Triton's interpreter runs programs one
    after another) splitting gains nothing: 1.
    """
    if device.type != "cuda":
        return 1
    programs = batch * num_kv_heads
    target = max(1, ctas_per_sm) * _sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(cdiv(target, programs), cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))


def _split_plan(batch: int, num_kv_heads: int, max_seq_len: int, granularity: int,
                device: torch.device, ctas_per_sm: int = 2) -> tuple[int, int]:
    """(num_splits, tokens_per_split): splits of whole `granularity`-token steps covering max_seq_len tokens.

    max_seq_len is the capacity of the page table (max_blocks * block_size), known from shapes alone, so sizing
    the grid never reads seq_lens back from the device. Splits past a shorter sequence's end do no work.
    """
    wanted = min(MAX_SPLITS, max(1, int(_num_splits(batch, num_kv_heads, max_seq_len, device, ctas_per_sm))))
    tokens_per_split = cdiv(cdiv(max_seq_len, wanted), granularity) * granularity
    return cdiv(max_seq_len, tokens_per_split), tokens_per_split


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr, ks_ptr, vs_ptr,
        sinks_ptr, scale_log2, group, num_q_heads, num_splits, tokens_per_split, window,
        stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ob, stride_oh,
        PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_SCALED: tl.constexpr,
        HAS_SINKS: tl.constexpr = False, WINDOW: tl.constexpr = False,
    ):
        # grid (B, Hkv, num_splits). One program: all `group` query heads of KV head `kvh` over one token range, so
        # each K/V byte of the range is read once. K and V share strides (same shape, both contiguous).
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + b)
        start = split * tokens_per_split
        end = tl.minimum(seq_len, start + tokens_per_split)
        if WINDOW:
            # gpt-oss sliding window: only the last `window` positions, t >= seq_len - window. The splits share the
            # window (their ranges count from its first token), so no program is spent on tokens before it.
            start = tl.maximum(seq_len - window, 0) + split * tokens_per_split
            end = tl.minimum(seq_len, start + tokens_per_split)

        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        head = kvh * group + g  # (G_PAD,) query heads of this KV group; rows >= group are padding for tl.dot
        g_mask = g < group
        # Masks along D only when D is padded: a mask constant along D keeps the loads 16-byte vectors.
        qd_mask = g_mask[:, None] if D_PAD == HEAD_DIM else g_mask[:, None] & (d < HEAD_DIM)[None, :]
        q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :], mask=qd_mask, other=0.0)
        if KV_SCALED:
            # an fp8 cache: K's per-head scale folds into the softmax scale, V's multiplies p.V (both per tile)
            qk_scale = scale_log2 * tl.load(ks_ptr + kvh)
            v_scale = tl.load(vs_ptr + kvh)
        else:
            qk_scale = scale_log2

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)  # running max of the base-2 scores
        l_i = tl.zeros([G_PAD], tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        n = tl.arange(0, BLOCK_N)
        bt_row = block_table_ptr + b * stride_bt
        # Page ids are loaded one tile ahead by hand: K/V addresses then come from a loop-carried value instead of a
        # load in the same iteration, and Triton's pipeliner multi-buffers the K/V loads (num_stages - 1 tiles in
        # flight). Loaded in the same iteration, it kept one buffer and waited on every tile (seen in the TTGIR of
        # triton 3.9 for sm_90: cp.async wait 0 at the top of the loop, 39 KB of shared memory at any num_stages).
        page_next = tl.load(bt_row + (start + n) // PAGE, mask=start + n < end, other=0)
        for tile in range(start, end, BLOCK_N):
            t = tile + n  # (BLOCK_N,) token positions; the tail of the range is masked
            t_mask = t < end
            page = page_next
            page_next = tl.load(bt_row + (t + BLOCK_N) // PAGE, mask=t + BLOCK_N < end, other=0)
            rows = page.to(tl.int64) * stride_kb + (t % PAGE) * stride_kt + kvh * stride_kh  # (BLOCK_N,)
            kv_mask = t_mask[:, None] if D_PAD == HEAD_DIM else t_mask[:, None] & (d < HEAD_DIM)[None, :]
            k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, D_PAD)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # (G_PAD, BLOCK_N)
            s = tl.where(t_mask[None, :], s, float("-inf"))
            # Every tile holds at least one valid token, so m_new is finite and exp2(-inf - m_new) = 0.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, D_PAD)
            if KV_SCALED:
                pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION) * v_scale
            else:
                pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        # A split past the sequence's end (or before its window) ran no tile (l_i = 0): keep its values finite; the
        # merge skips it (or weighs it 0: its lse is -inf).
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        if HAS_SINKS and not SPLIT:
            # The sink joins the denominator once: exp2(sink - m) next to l_i, rescaled to the larger of the two maxima.
            sink = tl.load(sinks_ptr + head, mask=g_mask, other=0.0).to(tl.float32) * 1.4426950408889634
            m_all = tl.maximum(m_i, sink)
            l_safe = l_i * tl.exp2(m_i - m_all) + tl.exp2(sink - m_all)
            acc = acc * tl.exp2(m_i - m_all)[:, None]
        o = acc / l_safe[:, None]
        if SPLIT:
            # scratch part_o (B, Hq, num_splits, HEAD_DIM), part_lse (B, Hq, num_splits): fp32, lse in base 2
            row = (b * num_q_heads + head) * num_splits + split  # (G_PAD,)
            tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=qd_mask)
            tl.store(part_lse_ptr + row, m_i + tl.log2(l_safe), mask=g_mask)
        else:
            tl.store(out_ptr + b * stride_ob + head[:, None] * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=qd_mask)

    @triton.jit
    def _decode_attention_reduce_kernel(
        part_o_ptr, part_lse_ptr, seq_lens_ptr, out_ptr, sinks_ptr, num_q_heads, num_splits, tokens_per_split,
        stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, HAS_SINKS: tl.constexpr = False,
    ):
        # grid (B, Hq): out[b, h] = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse_s - max lse), over the splits
        # that hold tokens of this sequence (the first cdiv(seq_len, tokens_per_split)).
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + b)
        n_valid = tl.minimum((seq_len + tokens_per_split - 1) // tokens_per_split, num_splits)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, D_PAD)
        s_mask = s < n_valid
        row = (b * num_q_heads + h) * num_splits + s  # (SPLITS_PAD,)
        lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
        # The last valid split always holds a token: the max is finite; masked (and empty) splits weigh 0.
        m = tl.max(lse, 0)
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634  # base 2, like lse
            m = tl.maximum(m, sink)
        w = tl.exp2(lse - m)
        o_mask = s_mask[:, None] & (d < HEAD_DIM)[None, :]
        o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=o_mask, other=0.0)  # (SPLITS_PAD, D_PAD)
        denom = tl.sum(w, 0)
        if HAS_SINKS:
            denom += tl.exp2(sink - m)  # the sink joins the denominator once, with no value
        out = tl.sum(o * w[:, None], 0) / denom
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def _outputs(q: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (B, Hq, D) in q's dtype, and the split-KV scratch: partial outputs (B, Hq, splits, D) and their
    log-sum-exp (B, Hq, splits) in fp32. With one split the kernel writes `out` directly and the scratch is `out`
    itself, never touched."""
    batch, num_q_heads, head_dim = q.shape
    out = new_output((batch, num_q_heads, head_dim), q.dtype, q.device)
    if num_splits == 1:
        return out, out, out
    part_o = new_output((batch, num_q_heads, num_splits, head_dim), torch.float32, q.device)
    part_lse = new_output((batch, num_q_heads, num_splits), torch.float32, q.device)
    return out, part_o, part_lse


def _decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                             seq_lens: torch.Tensor, scale: float | None = None, k_scale: torch.Tensor | None = None,
                             v_scale: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                             sliding_window: int | None = None) -> torch.Tensor:
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if head_dim > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"q: the triton backend supports head dim D <= {TRITON_MAX_HEAD_DIM}, got D={head_dim}; "
                         "use backend='torch'")
    if group > TRITON_MAX_GROUP:
        raise ValueError(f"q: the triton backend supports Hq / Hkv <= {TRITON_MAX_GROUP} query heads per KV head, "
                         f"got {num_q_heads} / {num_kv_heads} = {group}; use backend='torch'")
    scale = head_dim**-0.5 if scale is None else float(scale)
    d_pad = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16
    g_pad = max(16, triton.next_power_of_2(group))
    # sized by q's dtype: an fp8 cache's tiles are converted to it in registers, where the size matters
    block_n, num_warps, num_stages = _triton_config(d_pad, q.element_size(), q.device)
    scaled = k_scale is not None or v_scale is not None
    if scaled and q.dtype == torch.float32:  # fp32 dots on converted fp8 tiles: half the tile, no spills on sm_90
        block_n = max(16, block_n // 2)
    if scaled:  # one (Hkv,) fp32 tensor each, 1.0 where only the other scale was given
        k_scale = k_scale if k_scale is not None else torch.ones(num_kv_heads, device=q.device)
        v_scale = v_scale if v_scale is not None else torch.ones(num_kv_heads, device=q.device)
    capacity = block_table.shape[1] * block_size
    if sliding_window is not None:  # at most `sliding_window` tokens per sequence to split
        capacity = min(capacity, sliding_window)
    num_splits, tokens_per_split = _split_plan(batch, num_kv_heads, capacity, block_n, q.device,
                                               _triton_ctas_per_sm(d_pad, q.element_size(), q.device))
    out, part_o, part_lse = _outputs(q, num_splits)
    # fp32 inputs: "ieee" keeps the dot in full fp32 (the default would round to tf32, ~1e-3 relative error).
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # gpt-oss extras, compiled in only when used: sinks (Hq,) join the softmax denominator; with a sliding window the
    # splits cover only the window (counted from its first token), so the pages before it are never read.
    extras: dict[str, Any] = {}
    if sinks is not None:
        extras["HAS_SINKS"] = True
    if sliding_window is not None:
        extras["WINDOW"] = True
    _decode_attention_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, part_o, part_lse,
        k_scale if scaled else seq_lens, v_scale if scaled else seq_lens,  # unread pointers when not scaled
        sinks if sinks is not None else q,
        scale * LOG2E, group, num_q_heads, num_splits, tokens_per_split, int(sliding_window or 0),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1),
        PAGE=block_size, HEAD_DIM=head_dim, D_PAD=d_pad, G_PAD=g_pad, BLOCK_N=block_n, SPLIT=num_splits > 1,
        DOT_PRECISION=precision, KV_SCALED=scaled, num_warps=num_warps, num_stages=num_stages, **extras,
    )
    if num_splits > 1:
        _decode_attention_reduce_kernel[(batch, num_q_heads)](
            part_o, part_lse, seq_lens, out, sinks if sinks is not None else q, num_q_heads, num_splits,
            tokens_per_split, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, D_PAD=d_pad, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
            **({"HAS_SINKS": True} if sinks is not None else {}),
        )
    return out


# ---------------------------------------------------------------------------------------------------------- cuda


def _decode_attention_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                           sliding_window: int | None = None) -> torch.Tensor:
    if sinks is not None or sliding_window is not None:
        name = "sinks" if sinks is not None else "sliding_window"
        raise ValueError(f"{name}: the cuda backend has no attention sinks or sliding window; use backend='triton' "
                         "or 'torch'")
    if k_scale is not None or v_scale is not None or k_cache.dtype not in FLOAT_DTYPES:
        raise ValueError("k_cache: the cuda backend reads fp32/fp16/bf16 caches without scales; for an fp8 cache "
                         "(k_scale, v_scale) use backend='triton' or 'torch'")
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    max_blocks = block_table.shape[1]
    if head_dim not in CUDA_HEAD_DIMS:
        raise ValueError(f"q: the cuda backend supports head dim D in {list(CUDA_HEAD_DIMS)}, got D={head_dim}; "
                         "use backend='triton' or 'torch'")
    if block_size not in CUDA_BLOCK_SIZES:
        raise ValueError(f"k_cache: the cuda backend supports block_size (tokens per page, k_cache.shape[1]) in "
                         f"{list(CUDA_BLOCK_SIZES)}, got block_size={block_size}; use backend='triton' or 'torch'")
    if batch > 65535:
        raise ValueError(f"q: the cuda backend supports B <= 65535 (grid y), got B={batch}; split the batch")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % 16:
            raise ValueError(f"{name}: the cuda backend needs a 16-byte aligned data pointer for its vector loads, "
                             f"got address {t.data_ptr():#x}; pass a fresh tensor (e.g. .clone())")
    scale = head_dim**-0.5 if scale is None else float(scale)
    # Query heads per block: the smallest compiled tile >= the group, capped at 8 (registers); a group of 16 runs
    # as 2 blocks per KV head, each reading the KV head once (the second read mostly from L2).
    group_tile = next(gt for gt in CUDA_GROUP_TILES if gt >= min(group, CUDA_GROUP_TILES[-1]))
    head_chunks = cdiv(group, group_tile)
    num_splits, tokens_per_split = _split_plan(batch, num_kv_heads * head_chunks, max_blocks * block_size,
                                               SPLIT_GRANULARITY_CUDA, q.device)
    out, part_o, part_lse = _outputs(q, num_splits)
    name = _cuda.kernel_name(f"decode_attn_d{head_dim}_g{group_tile}_b{block_size}", q.dtype)
    _cuda.launch("decode_attention", name, q.device, (num_kv_heads * head_chunks, batch, num_splits),
                 (CUDA_THREADS,),
                 (q, k_cache, v_cache, block_table, seq_lens, out, part_o, part_lse, num_kv_heads, group, block_size,
                  max_blocks, tokens_per_split, num_splits, scale * LOG2E))
    if num_splits > 1:
        _cuda.launch("decode_attention", _cuda.kernel_name("decode_attn_reduce", q.dtype), q.device,
                     (num_q_heads, batch), (CUDA_THREADS,),
                     (part_o, part_lse, seq_lens, out, num_q_heads, head_dim, tokens_per_split, num_splits))
    return out


# -------------------------------------------------------------------------------------------------------- public

_IMPLS = {"torch": _decode_attention_torch, "triton": _decode_attention_triton, "cuda": _decode_attention_cuda}


def _check_lengths(block_table: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """seq_lens within the pages given, and the block_table entries those pages use within the cache.

    Reads device values on the host (one small copy, so a GPU call synchronises here); skipped while a CUDA graph
    is being captured, where a synchronisation would break the capture, and on the meta device (no values).
    """
    if not value_checks_apply(seq_lens.device):
        return
    max_blocks = block_table.shape[1]
    capacity = max_blocks * block_size
    lens = seq_lens.long()
    pages_used = (lens.clamp(min=0) + block_size - 1) // block_size  # (B,)
    used = torch.arange(max_blocks, device=lens.device)[None, :] < pages_used[:, None]  # (B, max_blocks)
    bad_pages = used & ((block_table < 0) | (block_table >= num_blocks))
    lo, hi, n_bad = torch.stack([lens.min(), lens.max(), bad_pages.sum()]).tolist()
    if lo < 1 or hi > capacity:
        b = int(((lens < 1) | (lens > capacity)).nonzero()[0, 0])
        raise ValueError(f"seq_lens: expected 1 <= seq_lens[b] <= max_blocks * block_size = {max_blocks} * "
                         f"{block_size} = {capacity} (the pages block_table gives), got seq_lens[{b}] = "
                         f"{int(lens[b])}")
    if n_bad:
        b, j = (int(i) for i in bad_pages.nonzero()[0])
        raise ValueError(f"block_table: expected page ids in [0, num_blocks={num_blocks}) for the pages seq_lens "
                         f"uses, got block_table[{b}, {j}] = {int(block_table[b, j])}")


def _validate(q: Any, k_cache: Any, v_cache: Any, block_table: Any, seq_lens: Any, scale: Any) -> None:
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=CACHE_DTYPES, contiguous=True)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=CACHE_DTYPES, contiguous=True)
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), contiguous=True)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), contiguous=True)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)
    if k_cache.dtype == FP8_KV:
        check_same_dtype(k_cache=k_cache, v_cache=v_cache)
    else:
        check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    batch, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if batch == 0:
        raise ValueError("q: expected a non-empty batch (B >= 1), got q of shape (0, ...)")
    if num_q_heads == 0 or head_dim == 0:
        raise ValueError(f"q: expected Hq >= 1 and D >= 1 in (B, Hq, D), got shape {tuple(q.shape)}")
    if min(num_blocks, block_size, num_kv_heads) == 0:
        raise ValueError("k_cache: expected num_blocks, block_size and Hkv >= 1 in (num_blocks, block_size, Hkv, D), "
                         f"got shape {tuple(k_cache.shape)}")
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache: expected head dim D={head_dim} (q's last dimension) in (num_blocks, block_size, "
                         f"Hkv, D), got shape {tuple(k_cache.shape)}")
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape))
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q: expected Hq to be a multiple of Hkv = k_cache.shape[2] = {num_kv_heads} "
                         f"(grouped-query attention), got Hq={num_q_heads}")
    check_tensor("block_table", block_table, shape=(batch, None))
    if block_table.shape[1] == 0:
        raise ValueError("block_table: expected at least one page per sequence (max_blocks >= 1), got shape "
                         f"{tuple(block_table.shape)}")
    check_tensor("seq_lens", seq_lens, shape=(batch,))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite number or None (for D**-0.5), got {scale!r}")
    _check_lengths(block_table, seq_lens, num_blocks, block_size)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, *, scale: float | None = None,
                     k_scale: float | torch.Tensor | None = None, v_scale: float | torch.Tensor | None = None,
                     sinks: torch.Tensor | None = None, sliding_window: int | None = None,
                     backend: str = "triton") -> torch.Tensor:
    """out (B, Hq, D) = softmax(scale * q K^T) V per sequence, over that sequence's pages of the KV cache.

    q (B, Hq, D); k_cache, v_cache (num_blocks, block_size, Hkv, D); block_table (B, max_blocks) int32;
    seq_lens (B,) int32 with 1 <= seq_lens[b] <= max_blocks * block_size. Checking seq_lens reads it on the host
    (a device synchronisation), except while a CUDA graph is being captured.
    An fp8 (float8_e4m3fn) cache holds K / k_scale and V / v_scale (append_kv_fp8): k_scale, v_scale are a float
    (per tensor) or an fp32 (Hkv,) tensor (per head), 1.0 when omitted; q and out stay in the model dtype.
    gpt-oss: `sinks` (Hq,) adds exp(sinks[h]) to head h's softmax denominator (a logit with no value);
    `sliding_window` W attends to the last W positions only, t >= seq_lens[b] - W (transformers' mask).
    """
    _validate(q, k_cache, v_cache, block_table, seq_lens, scale)
    check_sinks_and_window(sinks, sliding_window, q.shape[1], q.device)
    impl = resolve("decode_attention", _IMPLS, backend, q.device)
    ks, vs = _kv_scales(k_cache, k_scale, v_scale)
    extras: dict[str, Any] = {}  # only the keywords in use, so implementations keep their original call
    if ks is not None:
        extras.update(k_scale=ks, v_scale=vs)
    if sinks is not None or sliding_window is not None:
        extras.update(sinks=sinks, sliding_window=sliding_window)
    return impl(q, k_cache, v_cache, block_table, seq_lens, scale=scale, **extras)


def _kv_scales(k_cache: torch.Tensor, k_scale: Any, v_scale: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(k_scale, v_scale) as fp32 (Hkv,) tensors, or (None, None) for an unscaled high-precision cache."""
    if k_scale is None and v_scale is None and k_cache.dtype != FP8_KV:
        return None, None
    from tokprof.kernels.append_kv_fp8 import kv_scale_tensor

    hkv = k_cache.shape[2]
    return (kv_scale_tensor("k_scale", 1.0 if k_scale is None else k_scale, hkv, k_cache.device),
            kv_scale_tensor("v_scale", 1.0 if v_scale is None else v_scale, hkv, k_cache.device))


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    """A batch whose pages are scattered over the cache: block ids are a seeded random permutation, as a serving
    engine's allocator leaves them after a while; every sequence holds `context` tokens."""
    batch, context, block_size = shape["B"], shape["context"], shape["block_size"]
    num_kv_heads, head_dim = shape["Hkv"], shape["D"]
    pages_per_seq = cdiv(context, block_size)
    num_blocks = batch * pages_per_seq + 4  # a few spare pages that no sequence uses
    gen = make_generator(device, seed)
    perm = torch.randperm(num_blocks, generator=make_generator("cpu", seed))
    block_table = perm[: batch * pages_per_seq].view(batch, pages_per_seq).to(torch.int32)
    return {
        "q": randn((batch, shape["Hq"], head_dim), dtype, device, gen),
        "k_cache": randn((num_blocks, block_size, num_kv_heads, head_dim), dtype, device, gen),
        "v_cache": randn((num_blocks, block_size, num_kv_heads, head_dim), dtype, device, gen),
        "block_table": block_table.to(device),
        "seq_lens": torch.full((batch,), context, dtype=torch.int32, device=device),
        **_gpt_oss_inputs(shape, device, gen),
    }


def _gpt_oss_inputs(shape: Mapping[str, int], device: torch.device | str, gen: torch.Generator) -> dict[str, Any]:
    """The optional shape keys `sinks` (1: per-head sink logits) and `window` (> 0: sliding window of that many
    positions) as gpt-oss's attention layers call the op; nothing when they are absent or 0."""
    extras: dict[str, Any] = {}
    if shape.get("sinks"):
        extras["sinks"] = randn((shape["Hq"],), torch.float32, device, gen)
    if shape.get("window"):
        extras["sliding_window"] = shape["window"]
    return extras


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    batch, hq, hkv, d = shape["B"], shape["Hq"], shape["Hkv"], shape["D"]
    context, block_size, b = shape["context"], shape["block_size"], dtype_bytes(dtype)
    if shape.get("window"):  # a sliding window reads only its last `window` tokens
        context = min(context, shape["window"])
    # q.K^T and p.V: one multiply-add (2 FLOP) per (query head, token, d) each. Softmax's exp and sums are O(Hq * T)
    # and left out, as in every attention FLOP count.
    flops = 4 * batch * hq * context * d
    min_bytes = (
        2 * batch * context * hkv * d * b  # K and V of every token, once per KV head (a GQA group shares the read)
        + 2 * batch * hq * d * b  # read q, write out
        + batch * cdiv(context, block_size) * 4  # the block_table entries in use (int32)
        + batch * 4  # seq_lens (int32)
        + (4 * hq if shape.get("sinks") else 0)  # fp32 sink logits
    )
    return flops, min_bytes


OP = Op(
    name="decode_attention",
    fn=decode_attention,
    impls=_IMPLS,
    shape_keys=("B", "Hq", "Hkv", "D", "context", "block_size", "window", "sinks"),
    default_shape={"B": 16, "Hq": 32, "Hkv": 8, "D": 128, "context": 4096, "block_size": 16},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula=("flops = 4*B*Hq*context*D; bytes = 2*B*context*Hkv*D*dtype_bytes (K, V once per KV head) "
                  "+ 2*B*Hq*D*dtype_bytes (q, out) + 4*B*ceil(context/block_size) (block_table) + 4*B (seq_lens); "
                  "with window: context -> min(context, window); with sinks: + 4*Hq"),
    description="paged decode attention (GQA), q (B, Hq, D) over a paged KV cache -> (B, Hq, D)",
    shape_doc=("B sequences, Hq query heads, Hkv KV heads, D head dim, context tokens each, block_size tokens per "
               "page; optional window (> 0: sliding window; K/V bytes and FLOPs count min(context, window) tokens, the "
               "pages in use counted as ceil(min(context, window)/block_size)) and sinks (1: gpt-oss sink logits)"),
    extra={"compile_check_shapes": (
        {"B": 1, "Hq": 64, "Hkv": 8, "D": 64, "context": 4096, "block_size": 16, "window": 128, "sinks": 1},
        {"B": 64, "Hq": 64, "Hkv": 8, "D": 64, "context": 4096, "block_size": 16, "window": 128, "sinks": 1},
        {"B": 64, "Hq": 64, "Hkv": 8, "D": 64, "context": 4096, "block_size": 16, "sinks": 1},
    )},
)
