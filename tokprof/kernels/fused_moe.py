"""The routed experts of a mixture-of-experts layer: each token through its k experts' MLPs, combined by weight.

    x (T, H); w_gate_up (E, 2*I, H) = [gate | up] rows; w_down (E, H, I); topk_weights (T, k) float32;
    topk_ids (T, k) int32 or int64  ->  out (T, H)
    out[t] = sum_j topk_weights[t, j] * (w_down[e] @ act(w_gate_up[e] @ x[t] + b_gate_up[e]) + b_down[e]),
             e = topk_ids[t, j]

Activations: "silu" (Qwen3-MoE, DeepSeek-V3): act(g, u) = silu(g) * u. "gpt_oss" (gpt-oss's clamped SwiGLU, as
transformers' GptOssExperts computes it with swiglu_limit 7 and alpha 1.702): g = min(g, 7), u = clamp(u, -7, 7),
act = (u + 1) * g * sigmoid(1.702 g). gpt-oss stores gate and up interleaved (columns 0, 2, 4, ... are gate); the
loader de-interleaves them into our [gate | up] rows. Biases `b_gate_up` (E, 2I) and `b_down` (E, H) are optional
(gpt-oss has both); b_down sits inside the weighted sum, as in transformers.

Decode is memory-bound on the expert weights: a batch of T tokens touches at most min(E, T*k) experts, and a good
kernel reads each touched expert's 3*H*I weights once per call, never the experts no token chose. The Triton path
therefore sorts the (token, slot) pairs by expert, compacts the list of active experts, and launches its grouped
GEMMs over (active expert x row block, N tile) only: the first GEMM writes act(x W_gu^T) per sorted pair, the
second multiplies by W_down, scales by the router weight and writes one row per pair; a sum over the k slots
(in a fixed order, so results are deterministic) gives out.

The intermediate activation is rounded to x's dtype between the two GEMMs in every backend, as a two-GEMM kernel
(and transformers in bf16) does; accumulation is fp32.
"""

from __future__ import annotations

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
    value_checks_apply,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None

ACTIVATIONS: tuple[str, ...] = ("silu", "gpt_oss")
GPT_OSS_LIMIT = 7.0  # gpt-oss config swiglu_limit
GPT_OSS_ALPHA = 1.702  # gpt-oss's sigmoid slope (transformers' GptOssConfig.swiglu_alpha default)


def expected_active_experts(num_tokens: int, num_experts: int, top_k: int) -> int:
    """Distinct experts that T tokens touch under uniform routing, E * (1 - (1 - k/E)^T), rounded (modelled).

    Each token picks k distinct experts, so one given expert is missed by a token with probability 1 - k/E and by
    all T tokens (independently) with probability (1 - k/E)^T. At least min(k, E) for T >= 1, at most min(E, T*k).
    """
    if num_tokens <= 0:
        return 0
    expected = num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)
    return max(min(top_k, num_experts), min(num_experts, num_tokens * top_k, round(expected)))


def _activation_torch(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """gate_up (N, 2I) fp32 -> (N, I) fp32."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    gate = gate.clamp(max=GPT_OSS_LIMIT)
    up = up.clamp(min=-GPT_OSS_LIMIT, max=GPT_OSS_LIMIT)
    return (up + 1.0) * (gate * torch.sigmoid(gate * GPT_OSS_ALPHA))


# --------------------------------------------------------------------------------------------------------- torch


def _fused_moe_torch(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, activation: str, b_gate_up: torch.Tensor | None,
                     b_down: torch.Tensor | None) -> torch.Tensor:
    """Loop over the experts that some token chose (transformers' way): gather their tokens, two GEMMs, scatter-add
    weighted rows into an fp32 accumulator."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1).long()  # (T*k,) pair p = t * k + j
    order = torch.argsort(flat_ids, stable=True)
    experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
    start = 0
    for expert, count in zip(experts.tolist(), counts.tolist(), strict=True):
        pairs = order[start:start + count]
        start += count
        tokens = pairs // top_k
        h = x[tokens].float() @ w_gate_up[expert].float().T  # (n, 2I)
        if b_gate_up is not None:
            h = h + b_gate_up[expert].float()
        a = _activation_torch(h, activation).to(x.dtype).float()  # (n, I), rounded like the kernels' intermediate
        y = a @ w_down[expert].float().T  # (n, H)
        if b_down is not None:
            y = y + b_down[expert].float()
        acc.index_add_(0, tokens, y * topk_weights.reshape(-1)[pairs].float()[:, None])
    return acc.to(x.dtype)


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _moe_gate_up_kernel(
        x_ptr, w_ptr, b_ptr, inter_ptr, sorted_pairs_ptr, block_expert_ptr, block_row_ptr, block_end_ptr,
        num_experts, hidden, inter, top_k,
        stride_x, stride_we, stride_wn, stride_be, stride_inter,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GPT_OSS: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # grid (max row blocks, cdiv(I, BLOCK_N)). Row block `blk` holds up to BLOCK_M sorted (token, slot) pairs of
        # one expert; blocks past the last active expert's have expert id E and exit at once. The program computes
        # columns [n0, n0 + BLOCK_N) of gate and of up for its pairs, applies the activation and writes them to the
        # intermediate (sorted pair, I), in x's dtype.
        blk = tl.program_id(0)
        expert = tl.load(block_expert_ptr + blk)
        if expert >= num_experts:
            return
        row0 = tl.load(block_row_ptr + blk)
        row_end = tl.load(block_end_ptr + blk)
        rows = row0 + tl.arange(0, BLOCK_M)  # positions in the sorted pair list
        row_ok = rows < row_end
        pairs = tl.load(sorted_pairs_ptr + rows, mask=row_ok, other=0)
        tokens = (pairs // top_k).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        k = tl.arange(0, BLOCK_K)
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            kk = k0 + k
            k_ok = kk < hidden
            a = tl.load(x_ptr + tokens[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)  # (BLOCK_M, BLOCK_K)
            w_mask = n_ok[:, None] & k_ok[None, :]
            w_gate = tl.load(w_base + n[:, None] * stride_wn + kk[None, :], mask=w_mask, other=0.0)  # (BN, BK)
            w_up = tl.load(w_base + (inter + n)[:, None] * stride_wn + kk[None, :], mask=w_mask, other=0.0)
            acc_gate = tl.dot(a, tl.trans(w_gate), acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a, tl.trans(w_up), acc_up, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            b_base = b_ptr + expert.to(tl.int64) * stride_be
            acc_gate += tl.load(b_base + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_up += tl.load(b_base + inter + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GPT_OSS:  # gpt-oss's clamped SwiGLU (limit 7, alpha 1.702)
            gate = tl.minimum(acc_gate, 7.0)
            up = tl.minimum(tl.maximum(acc_up, -7.0), 7.0)
            act = (up + 1.0) * (gate * tl.sigmoid(gate * 1.702))
        else:
            act = acc_gate * tl.sigmoid(acc_gate) * acc_up
        tl.store(inter_ptr + rows.to(tl.int64)[:, None] * stride_inter + n[None, :],
                 act.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _moe_down_kernel(
        inter_ptr, w_ptr, b_ptr, weights_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, block_row_ptr,
        block_end_ptr, num_experts, hidden, inter,
        stride_inter, stride_we, stride_wn, stride_be, stride_out,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # grid (max row blocks, cdiv(H, BLOCK_N)): out_pairs[pair, n] = weight[pair] * (act[row] @ W_down[e]^T + b)
        # for the block's pairs, written in fp32 at the pair's own row (t * k + j), so the combine is a plain sum.
        blk = tl.program_id(0)
        expert = tl.load(block_expert_ptr + blk)
        if expert >= num_experts:
            return
        row0 = tl.load(block_row_ptr + blk)
        row_end = tl.load(block_end_ptr + blk)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        pairs = tl.load(sorted_pairs_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        k = tl.arange(0, BLOCK_K)
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            kk = k0 + k
            k_ok = kk < inter
            a = tl.load(inter_ptr + rows.to(tl.int64)[:, None] * stride_inter + kk[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_base + n[:, None] * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)  # (BLOCK_N, BLOCK_K)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + expert.to(tl.int64) * stride_be + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        weight = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + pairs[:, None] * stride_out + n[None, :], acc * weight[:, None],
                 mask=row_ok[:, None] & n_ok[None, :])


def _moe_config(num_pairs: int, num_experts: int, elem_bytes: int,
                device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps), by rule. Decode batches put ~T*k/E pairs on each active expert
    (1-2 for DeepSeek-R1 at B <= 64), so BLOCK_M is tl.dot's minimum of 16 until experts hold more rows; the weight
    tiles (BLOCK_N x BLOCK_K, 16 KB in 16-bit) are what streams from HBM. fp32 runs its dots as exact FMAs from
    registers: half the K step (at BLOCK_K 128 the gate/up kernel with 32 rows spilled 376 B per thread, triton 3.9,
    sm_90). Not yet tuned by measurement. On the CPU interpreter: small tiles that still cover several N tiles and
    K steps of the tiny test shapes."""
    if device.type != "cuda":
        return 16, 32, 32, 4
    rows_per_expert = num_pairs / max(1, min(num_experts, num_pairs))
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 64 else 64
    if elem_bytes == 4:
        return min(block_m, 32), 64, 32, 4
    return block_m, 64, 128, 4


def _route_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Sort the (token, slot) pairs by expert and cut each active expert's pairs into row blocks of block_m.

    Returns sorted_pairs (T*k,) int32 (pair p = t*k + j, grouped by expert), and per row block: its expert (E for
    the unused tail of the grid), its first sorted row and the end of its expert's rows, each (max_blocks,) int32.
    All on the device without a host synchronisation (capturable in a CUDA graph): the grid size max_blocks =
    floor(T*k / block_m) + min(E, T*k) bounds sum_e ceil(count_e / block_m) from shapes alone, and experts that no
    token chose own no block at all.
    """
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = topk_ids.device
    sorted_pairs = torch.argsort(flat, stable=True).to(torch.int32)  # (T*k,)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m  # (E,) row blocks per expert; 0 for an expert no token chose
    block_end_cum = torch.cumsum(blocks, 0)  # (E,)
    pair_start = torch.cumsum(counts, 0) - counts  # (E,) first sorted row of each expert
    max_blocks = num_pairs // block_m + min(num_experts, num_pairs)
    blk = torch.arange(max_blocks, device=device)
    expert = torch.searchsorted(block_end_cum, blk, right=True)  # (max_blocks,) E past the last block
    e_safe = expert.clamp(max=num_experts - 1)
    # gather, not indexing with a tensor: the same on a GPU, and it also runs on fake CUDA tensors (compile check)
    local = blk - (block_end_cum.gather(0, e_safe) - blocks.gather(0, e_safe))  # block index within its expert
    start = pair_start.gather(0, e_safe)
    row0 = start + local * block_m
    row_end = start + counts.gather(0, e_safe)
    return (sorted_pairs, expert.to(torch.int32), row0.to(torch.int32), row_end.to(torch.int32))


def _fused_moe_triton(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, activation: str, b_gate_up: torch.Tensor | None,
                      b_down: torch.Tensor | None) -> torch.Tensor:
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    block_m, block_n, block_k, num_warps = _moe_config(num_pairs, num_experts, x.element_size(), x.device)
    sorted_pairs, block_expert, block_row, block_end = _route_blocks(topk_ids, num_experts, block_m)
    max_blocks = block_expert.numel()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    act = new_output((num_pairs, inter), x.dtype, x.device)  # (sorted pair, I)
    _moe_gate_up_kernel[(max_blocks, triton.cdiv(inter, block_n))](
        x, w_gate_up, b_gate_up if b_gate_up is not None else x, act, sorted_pairs, block_expert, block_row,
        block_end, num_experts, hidden, inter, top_k,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), b_gate_up.stride(0) if b_gate_up is not None else 0,
        act.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GPT_OSS=activation == "gpt_oss",
        HAS_BIAS=b_gate_up is not None, DOT_PRECISION=precision, num_warps=num_warps,
    )
    weights = topk_weights.reshape(-1)  # (T*k,) by pair
    out_pairs = new_output((num_pairs, hidden), torch.float32, x.device)  # (pair, H), fp32 for the combine
    _moe_down_kernel[(max_blocks, triton.cdiv(hidden, block_n))](
        act, w_down, b_down if b_down is not None else x, weights, out_pairs, sorted_pairs, block_expert,
        block_row, block_end, num_experts, hidden, inter,
        act.stride(0), w_down.stride(0), w_down.stride(1), b_down.stride(0) if b_down is not None else 0,
        out_pairs.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=b_down is not None, DOT_PRECISION=precision,
        num_warps=num_warps,
    )
    # The combine: a fixed-order sum over each token's k rows (deterministic, unlike atomics).
    return out_pairs.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


# -------------------------------------------------------------------------------------------------------- public

_IMPLS: dict[str, Any] = {"torch": _fused_moe_torch, "triton": _fused_moe_triton}


def _check_ids(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Expert ids within [0, E): reads them on the host (skipped inside skip_value_checks() and graph capture)."""
    if not value_checks_apply(topk_ids.device) or topk_ids.numel() == 0:
        return
    lo, hi = torch.stack([topk_ids.min(), topk_ids.max()]).long().tolist()
    if lo < 0 or hi >= num_experts:
        bad = ((topk_ids < 0) | (topk_ids >= num_experts)).nonzero()[0]
        t, j = (int(i) for i in bad)
        raise ValueError(f"topk_ids: expected expert ids in [0, E={num_experts}), got topk_ids[{t}, {j}] = "
                         f"{int(topk_ids[t, j])}")


def _validate(x: Any, w_gate_up: Any, w_down: Any, topk_weights: Any, topk_ids: Any, activation: Any,
              b_gate_up: Any, b_down: Any) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("w_gate_up", w_gate_up, ndim=3, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("w_down", w_down, ndim=3, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("topk_weights", topk_weights, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64), contiguous=True)
    check_same_dtype(x=x, w_gate_up=w_gate_up, w_down=w_down)
    check_same_device(x=x, w_gate_up=w_gate_up, w_down=w_down, topk_weights=topk_weights, topk_ids=topk_ids)
    num_tokens, hidden = x.shape
    num_experts, two_i, w_hidden = w_gate_up.shape
    if num_tokens == 0 or hidden == 0:
        raise ValueError(f"x: expected a non-empty (T, H), got shape {tuple(x.shape)}")
    if num_experts == 0 or two_i == 0 or two_i % 2:
        raise ValueError(f"w_gate_up: expected (E, 2*I, H) with E >= 1 and an even, non-zero 2*I, got shape "
                         f"{tuple(w_gate_up.shape)}")
    if w_hidden != hidden:
        raise ValueError(f"w_gate_up: expected hidden size H={hidden} (x's last dimension) in (E, 2*I, H), got "
                         f"shape {tuple(w_gate_up.shape)}")
    check_tensor("w_down", w_down, shape=(num_experts, hidden, two_i // 2))
    if topk_weights.shape[0] != num_tokens or topk_weights.shape[1] == 0:
        raise ValueError(f"topk_weights: expected shape (T={num_tokens}, k) with k >= 1, got "
                         f"{tuple(topk_weights.shape)}")
    check_tensor("topk_ids", topk_ids, shape=tuple(topk_weights.shape))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {list(ACTIVATIONS)}, got {activation!r}")
    if b_gate_up is not None:
        check_tensor("b_gate_up", b_gate_up, shape=(num_experts, two_i), dtypes=FLOAT_DTYPES, contiguous=True)
        check_same_device(x=x, b_gate_up=b_gate_up)
    if b_down is not None:
        check_tensor("b_down", b_down, shape=(num_experts, hidden), dtypes=FLOAT_DTYPES, contiguous=True)
        check_same_device(x=x, b_down=b_down)
    _check_ids(topk_ids, num_experts)


def fused_moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, activation: str = "silu", b_gate_up: torch.Tensor | None = None,
              b_down: torch.Tensor | None = None, backend: str = "triton") -> torch.Tensor:
    """out (T, H) = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]); see the module docstring."""
    _validate(x, w_gate_up, w_down, topk_weights, topk_ids, activation, b_gate_up, b_down)
    impl = resolve("fused_moe", _IMPLS, backend, x.device)
    return impl(x, w_gate_up, w_down, topk_weights, topk_ids, activation, b_gate_up, b_down)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    """T tokens routed to k distinct experts each, touching exactly `active_experts` experts when the key is given
    (a plan's expected count, or a measured one), else the uniform-routing expectation. The touched experts are a
    seeded random subset, dealt round-robin (slot j of token t gets pool[(t*k + j) mod A]): distinct within a token,
    every pool expert used once T*k >= A, and the rows spread evenly over them (balanced routing). Weights scaled by
    1/sqrt(fan-in) so outputs stay O(1) in fp16. gpt_oss = 1 gives the gpt-oss activation and biases.
    Never reads tensor values back (the compile check runs it on fake tensors)."""
    num_tokens, hidden, inter, num_experts, top_k = shape["T"], shape["H"], shape["I"], shape["E"], shape["k"]
    gen = make_generator(device, seed)
    cpu_gen = make_generator("cpu", seed)
    active = shape.get("active_experts") or expected_active_experts(num_tokens, num_experts, top_k)
    active = max(top_k, min(active, num_experts, num_tokens * top_k))
    pool = torch.randperm(num_experts, generator=cpu_gen)[:active]  # the experts this batch touches
    slots = torch.arange(num_tokens * top_k).view(num_tokens, top_k) % active
    ids = pool[slots].to(torch.int32)
    weights = torch.rand(num_tokens, top_k, generator=cpu_gen)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    # Only the touched experts' weights are drawn: the others are never read (by any backend), and left
    # uninitialised they cost no time here nor, on the CPU, resident memory (DeepSeek-R1's 256 experts are 22.5 GB
    # per layer in bf16, of which a batch of 16 reads ~40%).
    w_gate_up = torch.empty((num_experts, 2 * inter, hidden), dtype=dtype, device=device)
    w_gate_up[pool.to(device)] = randn((active, 2 * inter, hidden), dtype, device, gen, scale=hidden**-0.5)
    w_down = torch.empty((num_experts, hidden, inter), dtype=dtype, device=device)
    w_down[pool.to(device)] = randn((active, hidden, inter), dtype, device, gen, scale=inter**-0.5)
    inputs: dict[str, Any] = {
        "x": randn((num_tokens, hidden), dtype, device, gen),
        "w_gate_up": w_gate_up,
        "w_down": w_down,
        "topk_weights": weights.to(device),
        "topk_ids": ids.to(device),
    }
    if shape.get("gpt_oss"):
        inputs.update(activation="gpt_oss", b_gate_up=randn((num_experts, 2 * inter), dtype, device, gen, scale=0.1),
                      b_down=randn((num_experts, hidden), dtype, device, gen, scale=0.1))
    return inputs


# Codes of the shape key `wfmt` (modelled plans only): the experts' weight format, 0 for the activation dtype.
WEIGHT_FORMAT_CODES = ("fp8", "fp8-block", "mxfp4", "nvfp4", "int4")


def weight_format_of(shape: Mapping[str, int]) -> str | None:
    """The experts' weight format a fused_moe shape names (key `wfmt`, 1-based into WEIGHT_FORMAT_CODES), or None."""
    code = shape.get("wfmt", 0)
    if not code:
        return None
    if not 0 < code <= len(WEIGHT_FORMAT_CODES):
        raise ValueError(f"wfmt: expected 0..{len(WEIGHT_FORMAT_CODES)} (0 = activation dtype, else 1-based into "
                         f"{list(WEIGHT_FORMAT_CODES)}), got {code!r}")
    return WEIGHT_FORMAT_CODES[code - 1]


def expert_weight_bytes(hidden: int, inter: int, elem_bytes: int, fmt_name: str | None) -> int:
    """Stored bytes of one expert's gate, up and down projections: in the format (scales included, each matrix
    quantised along its K) or `elem_bytes` per weight."""
    if fmt_name is None:
        return 3 * hidden * inter * elem_bytes
    from tokprof.quant.formats import WEIGHT_FORMATS

    fmt = WEIGHT_FORMATS[fmt_name]
    return fmt.weight_bytes(2 * inter, hidden) + fmt.weight_bytes(hidden, inter)  # w_gate_up (2I, H), w_down (H, I)


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    num_tokens, hidden, inter, num_experts, top_k = shape["T"], shape["H"], shape["I"], shape["E"], shape["k"]
    b = dtype_bytes(dtype)
    fmt_name = weight_format_of(shape)
    # Distinct experts read: the shape key `active_experts` when the caller knows it (a plan's model of the batch,
    # or a measured routing histogram), else the uniform-routing expectation.
    active = shape.get("active_experts") or expected_active_experts(num_tokens, num_experts, top_k)
    pairs = num_tokens * top_k
    # Per (token, slot): gate_up GEMM 2*2I*H, down GEMM 2*H*I, the activation ~5 per I, the weighted combine 2*H.
    flops = pairs * (6 * hidden * inter + 5 * inter + 2 * hidden)
    bias_bytes = (2 * inter + hidden) * b * active if shape.get("gpt_oss") else 0
    min_bytes = (
        expert_weight_bytes(hidden, inter, b, fmt_name) * active  # the touched experts' weights, once each
        + bias_bytes
        + 2 * num_tokens * hidden * b  # read x, write out
        + pairs * (4 + 4)  # topk_weights (fp32) and topk_ids (int32)
    )
    return flops, min_bytes


OP = Op(
    name="fused_moe",
    fn=fused_moe,
    impls=_IMPLS,
    shape_keys=("T", "H", "I", "E", "k", "active_experts", "gpt_oss", "wfmt"),
    default_shape={"T": 16, "H": 7168, "I": 2048, "E": 256, "k": 8},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula=("A = active_experts if given, else round(E*(1-(1-k/E)^T)) (uniform routing, modelled); "
                  "flops = T*k*(6*H*I + 5*I + 2*H); bytes = 3*H*I*A*dtype_bytes (touched experts' weights once) "
                  "[+ (2I+H)*A*dtype_bytes biases if gpt_oss] + 2*T*H*dtype_bytes (x, out) + 8*T*k (router); with wfmt "
                  "(modelled plans) the expert weights are counted in that format, scales included"),
    description="routed experts: x (T, H) through each token's k experts' SwiGLU MLPs, weighted sum -> (T, H)",
    shape_doc=("T tokens, H hidden, I expert intermediate size, E experts, k per token; optional active_experts "
               "(distinct experts the batch touches; default the uniform expectation) and gpt_oss (1: gpt-oss "
               "activation and biases); optional wfmt (modelled only: the experts' weight format, 1-based into "
               "WEIGHT_FORMAT_CODES, whose math dtype bounds the FLOPs)"),
    extra={"compile_check_shapes": (
        {"T": 1}, {"T": 256},  # DeepSeek-R1 decode (the default is T=16), rows per expert 1..8
        {"T": 2048},  # a DeepSeek-R1 prefill chunk: 64 rows per expert, BLOCK_M 32
        {"T": 64, "H": 4096, "I": 1536, "E": 128, "k": 8},  # Qwen3-235B-A22B decode
        {"T": 64, "H": 2880, "I": 2880, "E": 128, "k": 4, "gpt_oss": 1},  # gpt-oss-120b decode
    )},
)
