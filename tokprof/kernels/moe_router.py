"""Mixture-of-experts routing: each token's router logits -> its top-k experts and their combine weights.

    logits (T, E)  ->  topk_weights (T, k) float32, topk_ids (T, k) int32

The three routing rules of the families tokprof models, as transformers implements them:

- Qwen3-MoE (`scoring="softmax"`, `renormalize=norm_topk_prob`): probabilities softmax(logits) over all E experts,
  the k largest kept, divided by their sum when renormalising.
- gpt-oss (`scoring="softmax"`, `renormalize=True`): top-k of the logits, softmax over the k selected. That is the
  same numbers as the Qwen3-MoE rule with renormalisation: softmax is monotonic, so the k largest logits are the k
  largest probabilities, and exp(l_i) / sum_k exp(l_j) is p_i / sum_k p_j.
- DeepSeek-V3 (`scoring="sigmoid"`, `bias=e_score_correction_bias`, `n_group`, `topk_group`,
  `renormalize=norm_topk_prob`, `routed_scaling=routed_scaling_factor`): scores sigmoid(logits); the bias is added
  for the selection only; each of the n_group groups of E / n_group experts scores the sum of its two best biased
  scores, the topk_group best groups stay eligible, the k best biased scores among their experts are chosen; the
  weights are the un-biased scores of the chosen experts, divided by (their sum + 1e-20) when renormalising, times
  routed_scaling.

Grouped selection and the bias apply to either scoring (they act on the selection scores). Experts come out ordered
by decreasing selection score. Ties between selection scores may resolve to either expert, as in torch.topk.

Tiny in bytes and FLOPs (a few per logit); it matters as a launch in the decode step, not as a roof.
Backends: torch (reference, transformers' operations) and triton (one program per block of tokens, top-k by
repeated arg-max in registers). No cuda backend.
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

SCORINGS: tuple[str, ...] = ("softmax", "sigmoid")
RENORM_EPS = 1e-20  # DeepSeek-V3 adds this to the sum of the chosen weights before dividing (transformers does)
TRITON_MAX_EXPERTS = 1024  # one (BLOCK_T, E_PAD) fp32 tile of logits per program


# --------------------------------------------------------------------------------------------------------- torch


def _moe_router_torch(logits: torch.Tensor, top_k: int, scoring: str, n_group: int | None, topk_group: int | None,
                      bias: torch.Tensor | None, renormalize: bool,
                      routed_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = logits.shape
    x = logits.float()
    scores = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)  # (T, E)
    choice = scores if bias is None else scores + bias.float()[None, :]  # selection only
    if n_group is not None and topk_group is not None and topk_group < n_group:
        per_group = num_experts // n_group
        group_scores = choice.view(num_tokens, n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)  # (T, n_group)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1)[1]  # (T, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask[:, :, None].expand(num_tokens, n_group, per_group).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1)[1]  # (T, k), decreasing selection score
    weights = scores.gather(1, ids)  # (T, k) un-biased scores
    if renormalize:
        denom = weights.sum(dim=-1, keepdim=True)
        weights = weights / (denom + RENORM_EPS if scoring == "sigmoid" else denom)
    if routed_scaling != 1.0:
        weights = weights * routed_scaling
    return weights.contiguous(), ids.to(torch.int32).contiguous()


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _moe_router_kernel(
        logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_l, routed_scaling,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, G_PAD: tl.constexpr,
        TOPK_GROUP: tl.constexpr, RENORM: tl.constexpr,
    ):
        # grid (cdiv(T, BLOCK_T),): one program routes BLOCK_T tokens, all E logits of each in one register tile.
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        e = tl.arange(0, E_PAD)
        row_ok = rows < num_tokens
        e_ok = e < num_experts
        x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_l + e[None, :],
                    mask=row_ok[:, None] & e_ok[None, :], other=float("-inf")).to(tl.float32)
        x = tl.where(row_ok[:, None], x, 0.0)  # rows past T: finite (never stored); padded experts stay -inf
        if SIGMOID:
            scores = tl.sigmoid(x)
        else:
            ex = tl.exp(x - tl.max(x, 1)[:, None])  # padding: exp(-inf) = 0
            scores = ex / tl.sum(ex, 1)[:, None]
        choice = scores
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
        choice = tl.where(e_ok[None, :], choice, float("-inf"))
        if N_GROUP > 1:
            # Group of expert e: e // (E / N_GROUP). Group score = sum of the group's two largest choice scores.
            per_group = num_experts // N_GROUP
            grp = e // per_group
            g = tl.arange(0, G_PAD)  # groups >= N_GROUP are padding and never chosen
            group_scores = tl.full([BLOCK_T, G_PAD], float("-inf"), tl.float32)
            for gi in tl.static_range(N_GROUP):
                member = (grp == gi) & e_ok
                c = tl.where(member[None, :], choice, float("-inf"))
                first = tl.max(c, 1)
                first_at = tl.argmax(c, 1)
                second = tl.max(tl.where(e[None, :] == first_at[:, None], float("-inf"), c), 1)
                group_scores = tl.where(g[None, :] == gi, (first + second)[:, None], group_scores)
            keep = tl.zeros([BLOCK_T, E_PAD], tl.int1)
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.argmax(group_scores, 1)  # (BLOCK_T,)
                keep = keep | (grp[None, :] == best[:, None])
                group_scores = tl.where(g[None, :] == best[:, None], float("-inf"), group_scores)
            choice = tl.where(keep, choice, float("-inf"))
        k = tl.arange(0, K_PAD)  # slots >= TOP_K stay 0 and are not stored
        w = tl.zeros([BLOCK_T, K_PAD], tl.float32)
        ids = tl.zeros([BLOCK_T, K_PAD], tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.argmax(choice, 1)  # (BLOCK_T,) lowest index among equal maxima
            hit = e[None, :] == best[:, None]
            wj = tl.sum(tl.where(hit, scores, 0.0), 1)
            w = tl.where(k[None, :] == j, wj[:, None], w)
            ids = tl.where(k[None, :] == j, best.to(tl.int32)[:, None], ids)
            choice = tl.where(hit, float("-inf"), choice)
        if RENORM:
            denom = tl.sum(w, 1)
            if SIGMOID:
                denom = denom + 1e-20
            w = w / denom[:, None]
        w = w * routed_scaling
        out_off = rows.to(tl.int64)[:, None] * TOP_K + k[None, :]
        out_mask = row_ok[:, None] & (k < TOP_K)[None, :]
        tl.store(weights_ptr + out_off, w, mask=out_mask)
        tl.store(ids_ptr + out_off, ids, mask=out_mask)


def _moe_router_triton(logits: torch.Tensor, top_k: int, scoring: str, n_group: int | None, topk_group: int | None,
                       bias: torch.Tensor | None, renormalize: bool,
                       routed_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = logits.shape
    if num_experts > TRITON_MAX_EXPERTS:
        raise ValueError(f"logits: the triton backend takes E <= {TRITON_MAX_EXPERTS} experts, got E={num_experts}; "
                         "use backend='torch'")
    weights = new_output((num_tokens, top_k), torch.float32, logits.device)
    ids = new_output((num_tokens, top_k), torch.int32, logits.device)
    e_pad = max(16, triton.next_power_of_2(num_experts))
    # A (BLOCK_T, E_PAD) fp32 tile of <= 4 KB per program (8 values per thread): the top-k and group passes are
    # unrolled loops over the tile, so a larger one costs registers (255 at 16 x 256 in fp32, triton 3.9 sm_90) and
    # minutes of compile time, for a kernel that reads a few KB.
    block_t = max(1, min(16, 1024 // e_pad))
    grouped = n_group is not None and topk_group is not None and topk_group < n_group
    _moe_router_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, bias if bias is not None else logits, weights, ids, num_tokens, num_experts, logits.stride(0),
        float(routed_scaling),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, BLOCK_T=block_t,
        SIGMOID=scoring == "sigmoid", HAS_BIAS=bias is not None, N_GROUP=n_group if grouped else 1,
        G_PAD=triton.next_power_of_2(n_group) if grouped else 1, TOPK_GROUP=topk_group if grouped else 1,
        RENORM=bool(renormalize),
        num_warps=4,
    )
    return weights, ids


# -------------------------------------------------------------------------------------------------------- public

_IMPLS = {"torch": _moe_router_torch, "triton": _moe_router_triton}


def _validate(logits: Any, top_k: Any, scoring: Any, n_group: Any, topk_group: Any, bias: Any, renormalize: Any,
              routed_scaling: Any) -> None:
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    num_tokens, num_experts = logits.shape
    if num_tokens == 0 or num_experts == 0:
        raise ValueError(f"logits: expected a non-empty (T, E), got shape {tuple(logits.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected an int in [1, E={num_experts}], got {top_k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {list(SCORINGS)}, got {scoring!r}")
    if (n_group is None) != (topk_group is None):
        raise ValueError(f"topk_group: expected n_group and topk_group both set (grouped top-k) or both None, got "
                         f"n_group={n_group!r}, topk_group={topk_group!r}")
    if n_group is not None:
        if isinstance(n_group, bool) or not isinstance(n_group, int) or n_group < 1 or num_experts % n_group:
            raise ValueError(f"n_group: expected a positive int that divides E={num_experts}, got {n_group!r}")
        if n_group > 1 and num_experts // n_group < 2:
            raise ValueError(f"n_group: expected groups of at least 2 experts (the group score sums its top 2), got "
                             f"E={num_experts} in {n_group} groups")
        if isinstance(topk_group, bool) or not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group: expected an int in [1, n_group={n_group}], got {topk_group!r}")
        if top_k > topk_group * (num_experts // n_group):
            raise ValueError(f"top_k: expected at most topk_group * E / n_group = {topk_group} * "
                             f"{num_experts // n_group} experts to choose from, got top_k={top_k}")
    if bias is not None:
        check_tensor("bias", bias, shape=(num_experts,), dtypes=FLOAT_DTYPES, contiguous=True)
        check_same_device(logits=logits, bias=bias)
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize: expected a bool, got {type(renormalize).__name__} {renormalize!r}")
    if (isinstance(routed_scaling, bool) or not isinstance(routed_scaling, (int, float))
            or not math.isfinite(routed_scaling) or routed_scaling <= 0):
        raise ValueError(f"routed_scaling: expected a positive finite number, got {routed_scaling!r}")


def moe_router(logits: torch.Tensor, *, top_k: int, scoring: str = "softmax", n_group: int | None = None,
               topk_group: int | None = None, bias: torch.Tensor | None = None, renormalize: bool = True,
               routed_scaling: float = 1.0, backend: str = "triton") -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights (T, k) float32, topk_ids (T, k) int32) for router logits (T, E); see the module docstring for
    the rules (Qwen3-MoE, gpt-oss: softmax; DeepSeek-V3: sigmoid, bias for selection, grouped top-k, scaling)."""
    _validate(logits, top_k, scoring, n_group, topk_group, bias, renormalize, routed_scaling)
    impl = resolve("moe_router", _IMPLS, backend, logits.device)
    return impl(logits, top_k, scoring, n_group, topk_group, bias, renormalize, float(routed_scaling))


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    """Logits of T tokens over E experts; n_group > 0 makes it DeepSeek-V3's rule (sigmoid, bias, grouped top-k,
    routed_scaling 2.5), n_group = 0 Qwen3-MoE's (softmax, renormalised)."""
    gen = make_generator(device, seed)
    num_experts = shape["E"]
    inputs: dict[str, Any] = {"logits": randn((shape["T"], num_experts), dtype, device, gen), "top_k": shape["k"]}
    if shape["n_group"]:
        inputs.update(scoring="sigmoid", n_group=shape["n_group"], topk_group=shape["topk_group"],
                      bias=randn((num_experts,), torch.float32, device, gen, scale=0.1), routed_scaling=2.5)
    return inputs


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    t, e, k = shape["T"], shape["E"], shape["k"]
    # ~4 FLOP per logit for the scoring (exp or sigmoid, sum, divide, bias add), and one compare per logit per
    # selected expert; the group pass is of the same order and left out.
    flops = t * e * (4 + k)
    min_bytes = t * e * dtype_bytes(dtype) + t * k * (4 + 4) + (4 * e if shape["n_group"] else 0)
    return flops, min_bytes


OP = Op(
    name="moe_router",
    fn=moe_router,
    impls=_IMPLS,
    shape_keys=("T", "E", "k", "n_group", "topk_group"),
    default_shape={"T": 16, "E": 256, "k": 8, "n_group": 8, "topk_group": 4},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula=("flops = T*E*(4 + k); bytes = T*E*dtype_bytes (logits) + 8*T*k (fp32 weights, int32 ids) "
                  "+ 4*E (fp32 bias, grouped rule only)"),
    description="MoE routing: logits (T, E) -> top-k weights (T, k) fp32 and expert ids (T, k) int32",
    shape_doc=("T tokens, E experts, k experts per token; n_group > 0: DeepSeek-V3 rule (sigmoid, bias, keep "
               "topk_group of n_group groups), n_group = 0: softmax top-k renormalised (Qwen3-MoE, gpt-oss)"),
    extra={"compile_check_shapes": (
        {"T": 1}, {"T": 256},  # DeepSeek-V3's rule at decode batch 1 and a larger batch
        {"T": 64, "E": 128, "k": 8, "n_group": 0, "topk_group": 0},  # Qwen3-235B-A22B
        {"T": 64, "E": 32, "k": 4, "n_group": 0, "topk_group": 0},  # gpt-oss-20b
    )},
)
