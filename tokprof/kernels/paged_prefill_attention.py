"""Paged prefill attention: a chunk of each sequence's prompt attends to its prefix already in the paged KV cache and
to itself (causal), for chunked prefill and prefix caching in a continuous-batching server.

    q (T, Hq, D): the query tokens of B sequences packed one after another; sequence b owns rows
        cu_q_lens[b] .. cu_q_lens[b + 1] - 1 (cu_q_lens (B + 1,) int32, cu_q_lens[0] = 0, non-decreasing);
    k_cache, v_cache (num_blocks, block_size, Hkv, D); block_table (B, max_blocks) int32;
    seq_lens (B,) int32: KV tokens of sequence b in the cache, this chunk included (its K/V appended already),
        so n_b = cu_q_lens[b + 1] - cu_q_lens[b] <= seq_lens[b] <= max_blocks * block_size;
    ->  out (T, Hq, D)

Query i of sequence b (0 <= i < n_b) sits at position p = seq_lens[b] - n_b + i and attends to positions 0 .. p
(causal, the mask aligned at the end of the sequence): out = softmax(scale * q . K[0..p]^T) V[0..p]. Decode attention
is the case n_b = 1; prefill of a whole prompt is the case seq_lens[b] = n_b.

Backends: torch (reference: gathers each sequence's pages, fp32 softmax) and triton (flash-attention forward over
the pages: one program per (sequence, tile of BLOCK_M queries, query head), online softmax in base 2). No cuda
backend. Cost: 4*D FLOP per (query, attended key) pair per query head; every K/V byte of the sequence read once.
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

_LOG2E = 1.4426950408889634
TRITON_MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------------------- torch


def _paged_prefill_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   block_table: torch.Tensor, cu_q_lens: torch.Tensor, seq_lens: torch.Tensor,
                                   scale: float | None = None) -> torch.Tensor:
    """Per sequence: gather its pages, scores in fp32 with the end-aligned causal mask, softmax, weighted sum."""
    total, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    scale = d**-0.5 if scale is None else float(scale)
    out = new_output((total, hq, d), q.dtype, q.device)
    starts, lens = cu_q_lens.tolist(), seq_lens.tolist()  # host copies: the reference is not capturable
    for b, seq_len in enumerate(lens):
        q0, q1 = starts[b], starts[b + 1]
        n = q1 - q0
        if n == 0:
            continue
        t = torch.arange(seq_len, device=q.device)
        pages = block_table[b, t // block_size].long()
        k = k_cache[pages, t % block_size].float()  # (L, Hkv, D)
        v = v_cache[pages, t % block_size].float()
        qg = q[q0:q1].float().view(n, hkv, group, d)  # (n, Hkv, G, D)
        scores = torch.einsum("nhgd,lhd->hgnl", qg, k) * scale  # (Hkv, G, n, L)
        pos = torch.arange(seq_len - n, seq_len, device=q.device)  # (n,) absolute positions of the queries
        allowed = t[None, :] <= pos[:, None]  # (n, L)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("hgnl,lhd->nhgd", probs, v)  # (n, Hkv, G, D)
        out[q0:q1] = o.reshape(n, hq, d).to(q.dtype)
    return out


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _paged_prefill_attention_kernel(
        q_ptr, k_ptr, v_ptr, block_table_ptr, cu_ptr, seq_lens_ptr, out_ptr,
        scale_log2, group,
        stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh,
        PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # grid (B, cdiv(max query tokens, BLOCK_M), Hq): one tile of BLOCK_M queries of one head of one sequence.
        b = tl.program_id(0).to(tl.int64)
        tile_m = tl.program_id(1)
        h = tl.program_id(2)
        q_start = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + b)
        prefix = seq_len - q_len  # tokens before the chunk
        kvh = h // group
        m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query index within the chunk
        m_mask = m < q_len
        pos = prefix + m  # absolute positions of the queries
        d = tl.arange(0, D_PAD)
        d_mask = d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, D_PAD)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        # Keys up to the last query of this tile (causal); a tile past the chunk's end runs no iteration.
        end = tl.minimum(seq_len, prefix + (tile_m + 1) * BLOCK_M)
        end = tl.where(tile_m * BLOCK_M < q_len, end, 0)
        n = tl.arange(0, BLOCK_N)
        bt_row = block_table_ptr + b * stride_bt
        for tile in range(0, end, BLOCK_N):
            t = tile + n
            t_mask = t < end
            page = tl.load(bt_row + t // PAGE, mask=t_mask, other=0)
            rows = page.to(tl.int64) * stride_kb + (t % PAGE) * stride_kt + kvh * stride_kh  # (BLOCK_N,)
            kv_mask = t_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, D_PAD)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
            allowed = t_mask[None, :] & (t[None, :] <= pos[:, None])
            s = tl.where(allowed, s, float("-inf"))
            # Token 0 is allowed for every row in the first tile, so m_new is finite from then on.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(out_ptr + (q_start + m)[:, None] * stride_ot + h * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _paged_prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    block_table: torch.Tensor, cu_q_lens: torch.Tensor, seq_lens: torch.Tensor,
                                    scale: float | None = None, max_query_len: int | None = None) -> torch.Tensor:
    total, hq, d = q.shape
    batch = seq_lens.shape[0]
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    if d > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"q: the triton backend supports head dim D <= {TRITON_MAX_HEAD_DIM}, got D={d}; "
                         "use backend='torch'")
    scale = d**-0.5 if scale is None else float(scale)
    if max_query_len is None:  # one host read; a server passes it (it knows its chunk sizes)
        max_query_len = int((cu_q_lens[1:] - cu_q_lens[:-1]).max()) if batch else 0
    out = new_output((total, hq, d), q.dtype, q.device)
    if total == 0 or max_query_len == 0:
        return out
    d_pad = max(16, triton.next_power_of_2(d))
    on_gpu = q.device.type == "cuda"
    # fp32 "ieee" dots hold their operands in registers: 32 x 32 tiles compile without spills on sm_90 (64 x 64
    # spilled ~34 KB per thread, triton 3.9); 16-bit tiles of 64 x 64 use 194 registers and no spill
    wide = q.element_size() < 4
    block_m = (64 if wide else 32) if on_gpu else 16
    block_n = (64 if wide and d_pad <= 128 else 32) if on_gpu else 16
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (batch, cdiv(max_query_len, block_m), hq)
    _paged_prefill_attention_kernel[grid](
        q, k_cache, v_cache, block_table, cu_q_lens, seq_lens, out, scale * _LOG2E, hq // hkv,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1),
        PAGE=block_size, HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision,
        num_warps=4 if q.element_size() < 4 else 8, num_stages=2 if on_gpu else 1,
    )
    return out


# -------------------------------------------------------------------------------------------------------- public

_IMPLS = {"torch": _paged_prefill_attention_torch, "triton": _paged_prefill_attention_triton}


def _check_values(block_table: torch.Tensor, cu_q_lens: torch.Tensor, seq_lens: torch.Tensor, total: int,
                  num_blocks: int, block_size: int) -> None:
    """cu_q_lens from 0 to T, non-decreasing; n_b <= seq_lens[b] <= capacity; used pages inside the cache."""
    if not value_checks_apply(seq_lens.device):
        return
    cu = cu_q_lens.long().cpu()
    lens = seq_lens.long().cpu()
    if int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"cu_q_lens: expected cu_q_lens[0] = 0 and cu_q_lens[-1] = T = {total} (q's rows), got "
                         f"{int(cu[0])} and {int(cu[-1])}")
    n = cu[1:] - cu[:-1]
    if bool((n < 0).any()):
        raise ValueError(f"cu_q_lens: expected non-decreasing offsets, got {cu.tolist()}")
    capacity = block_table.shape[1] * block_size
    bad = (lens < n) | (lens > capacity) | (lens < 1)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"seq_lens: expected max(1, n_b) <= seq_lens[b] <= max_blocks * block_size = {capacity}, "
                         f"n_b the chunk's query tokens; got seq_lens[{b}] = {int(lens[b])} with n_b = {int(n[b])}")
    pages_used = (lens + block_size - 1) // block_size
    used = torch.arange(block_table.shape[1])[None, :] < pages_used[:, None]
    table = block_table.cpu()
    bad_pages = used & ((table < 0) | (table >= num_blocks))
    if bool(bad_pages.any()):
        b, j = (int(i) for i in bad_pages.nonzero()[0])
        raise ValueError(f"block_table: expected page ids in [0, num_blocks={num_blocks}) for the pages seq_lens "
                         f"uses, got block_table[{b}, {j}] = {int(table[b, j])}")


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                            cu_q_lens: torch.Tensor, seq_lens: torch.Tensor, *, scale: float | None = None,
                            max_query_len: int | None = None, backend: str = "triton") -> torch.Tensor:
    """out (T, Hq, D): each sequence's chunk of queries over its prefix in the paged cache and itself (causal).

    See the module docstring for the shapes. `max_query_len` (the largest chunk) sizes the Triton grid without a
    device read-back when given."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), contiguous=True)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), contiguous=True)
    check_tensor("cu_q_lens", cu_q_lens, shape=(seq_lens.shape[0] + 1,), dtypes=(torch.int32,), contiguous=True)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, cu_q_lens=cu_q_lens,
                      seq_lens=seq_lens)
    check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    total, hq, d = q.shape
    num_blocks, block_size, hkv, cache_d = k_cache.shape
    if cache_d != d:
        raise ValueError(f"k_cache: expected head dim D={d} (q's last dimension), got shape {tuple(k_cache.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q: expected Hq to be a multiple of Hkv = k_cache.shape[2] = {hkv}, got Hq={hq}")
    check_tensor("block_table", block_table, shape=(seq_lens.shape[0], None))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite number or None (for D**-0.5), got {scale!r}")
    if max_query_len is not None and (isinstance(max_query_len, bool) or not isinstance(max_query_len, int)
                                      or max_query_len < 0):
        raise ValueError(f"max_query_len: expected a non-negative int or None, got {max_query_len!r}")
    _check_values(block_table, cu_q_lens, seq_lens, total, num_blocks, block_size)
    impl = resolve("paged_prefill_attention", _IMPLS, backend, q.device)
    if backend == "triton":
        return impl(q, k_cache, v_cache, block_table, cu_q_lens, seq_lens, scale=scale, max_query_len=max_query_len)
    return impl(q, k_cache, v_cache, block_table, cu_q_lens, seq_lens, scale=scale)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    """B sequences, each a chunk of `chunk` queries after `context` tokens already cached; pages scattered."""
    batch, chunk, context = shape["B"], shape["chunk"], shape["context"]
    block_size, hkv, d = shape["block_size"], shape["Hkv"], shape["D"]
    seq_len = context + chunk
    pages = cdiv(max(seq_len, 1), block_size)
    num_blocks = batch * pages + 4
    gen = make_generator(device, seed)
    perm = torch.randperm(num_blocks, generator=make_generator("cpu", seed))
    block_table = perm[: batch * pages].view(batch, pages).to(torch.int32)
    cu = torch.arange(batch + 1, dtype=torch.int32) * chunk
    return {
        "q": randn((batch * chunk, shape["Hq"], d), dtype, device, gen),
        "k_cache": randn((num_blocks, block_size, hkv, d), dtype, device, gen),
        "v_cache": randn((num_blocks, block_size, hkv, d), dtype, device, gen),
        "block_table": block_table.to(device),
        "cu_q_lens": cu.to(device),
        "seq_lens": torch.full((batch,), seq_len, dtype=torch.int32, device=device),
        "max_query_len": chunk,
    }


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    batch, hq, hkv, d = shape["B"], shape["Hq"], shape["Hkv"], shape["D"]
    chunk, context, block_size, b = shape["chunk"], shape["context"], shape["block_size"], dtype_bytes(dtype)
    # Query i of a chunk attends to context + i + 1 keys: sum = chunk*context + chunk*(chunk+1)/2 pairs per head.
    pairs = chunk * context + chunk * (chunk + 1) // 2
    flops = 4 * batch * hq * d * pairs
    min_bytes = (
        2 * batch * (context + chunk) * hkv * d * b  # K and V of every token of the sequence, once per KV head
        + 2 * batch * chunk * hq * d * b  # read q, write out
        + batch * cdiv(max(context + chunk, 1), block_size) * 4  # block_table entries in use
        + (2 * batch + 1) * 4  # seq_lens and cu_q_lens
    )
    return flops, min_bytes


OP = Op(
    name="paged_prefill_attention",
    fn=paged_prefill_attention,
    impls=_IMPLS,
    shape_keys=("B", "Hq", "Hkv", "D", "chunk", "context", "block_size"),
    default_shape={"B": 1, "Hq": 32, "Hkv": 8, "D": 128, "chunk": 512, "context": 2048, "block_size": 16},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula=("flops = 4*B*Hq*D*(chunk*context + chunk*(chunk+1)/2); bytes = 2*B*(context+chunk)*Hkv*D*dtype_bytes "
                  "(K, V once per KV head) + 2*B*chunk*Hq*D*dtype_bytes (q, out) + 4*B*ceil((context+chunk)/"
                  "block_size) (block_table) + 4*(2B+1) (seq_lens, cu_q_lens)"),
    description="chunked prefill attention over a paged KV cache (causal, GQA): chunk queries after context cached "
                "tokens -> (B*chunk, Hq, D)",
    shape_doc="B sequences, chunk query tokens each after context cached tokens, Hq/Hkv heads, D head dim, "
              "block_size tokens per page",
)
