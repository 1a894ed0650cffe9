"""The MoE block and the absorbed MLA attention of tokprof's Transformer, built only from tokprof's kernels.

MoE block (Qwen3-MoE, DeepSeek-V3), T tokens:  router GEMM (T, E) -> moe_router (top-k weights and ids, on the
device; no host sync, no data-dependent shape) -> fused_moe over the stacked experts. Shared experts are experts
E .. E + n_shared - 1 of the stack that every token takes with weight 1: their ids and weights are appended to the
router's (two small concatenations outside the plan, like the decode loop's bookkeeping kernels).

MLA attention (DeepSeek-V3), absorbed form, T tokens (see tokprof.models.loader_moe for the weight layout):
q_a GEMM, q_a norm, q_b GEMM -> q_nope (T, H, nope), q_rope (T, H, R) views; kv_a GEMM (latent) and k_rope GEMM,
kv_a norm; RoPE on q_rope and the one shared k_rope "head"; q_latent = W_UK^T q_nope per head (batched_linear);
the row [latent | k_rope] appended to the paged latent cache; attention over latent rows (decode: paged
mla_decode_attention; prefill: mla_prefill_attention on the prompt's rows); W_UV per head; O GEMM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokprof.kernels import (
    append_mla_kv,
    batched_linear,
    bias_add,
    fused_moe,
    linear,
    mla_decode_attention,
    mla_prefill_attention,
    moe_router,
    rms_norm,
    rope,
)
from tokprof.models.config import ModelConfig
from tokprof.models.loader_moe import MLAWeights, MoEWeights

# attend(q_latent (T, H, L), q_rope (T, H, R), latent (T, L), k_rope (T, R)) -> (T, H, L)
MLAAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SharedExperts:
    """The constant ids (E .. E+n-1) and weights (1.0) of the shared experts, per token count (made once each)."""

    def __init__(self, cfg: ModelConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self._by_tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, tokens: int, ids_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = tokens
        if key not in self._by_tokens:
            n, e = self.cfg.n_shared_experts, self.cfg.num_experts
            ids = torch.arange(e, e + n, device=self.device, dtype=ids_dtype).expand(tokens, n).contiguous()
            self._by_tokens[key] = (ids, torch.ones((tokens, n), device=self.device, dtype=torch.float32))
        return self._by_tokens[key]


def moe_mlp(cfg: ModelConfig, w: MoEWeights, h: torch.Tensor, shared: SharedExperts, backend: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """h (T, H) -> (out (T, H), routed topk_ids (T, k))."""
    logits = linear(h, w.router, backend=backend)  # (T, E)
    if w.router_bias is not None:  # gpt-oss: a bias on the logits (selection and weights)
        logits = bias_add(logits, w.router_bias, backend=backend)
    weights, ids = moe_router(logits, top_k=cfg.num_experts_per_tok, scoring=cfg.router_scoring,
                              n_group=cfg.n_group, topk_group=cfg.topk_group, bias=w.score_bias,
                              renormalize=cfg.norm_topk_prob, routed_scaling=cfg.routed_scaling_factor,
                              backend=backend)  # (T, k) float32, (T, k) int
    routed_ids = ids
    if cfg.n_shared_experts:
        shared_ids, shared_w = shared.get(h.shape[0], ids.dtype)
        ids = torch.cat([ids, shared_ids], dim=1)  # (T, k + n_shared)
        weights = torch.cat([weights, shared_w], dim=1)
    oss = cfg.architecture == "gpt_oss"
    out = fused_moe(h, w.gate_up, w.down, weights, ids, activation="gpt_oss" if oss else "silu",
                    b_gate_up=w.b_gate_up, b_down=w.b_down, backend=backend)  # (T, H)
    return out, routed_ids


def mla_attention(cfg: ModelConfig, w: MLAWeights, h: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, eps: float, attend: MLAAttend, backend: str) -> torch.Tensor:
    """h (T, H) normed hidden states -> the attention output after o_proj (T, H)."""
    t = h.shape[0]
    heads, nope, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    if w.q_a is not None:
        q_a = rms_norm(linear(h, w.q_a, backend=backend), w.q_a_norm, eps=eps, backend=backend)  # (T, q_lora_rank)
        q = linear(q_a, w.q_b, backend=backend)  # (T, heads * (nope + R)): [nope of all heads | rope of all heads]
    else:
        q = linear(h, w.q_b, backend=backend)
    q_nope = q[:, :heads * nope].view(t, heads, nope)  # views, heads contiguous
    q_rope = q[:, heads * nope:].view(t, heads, r)
    latent = rms_norm(linear(h, w.kv_a, backend=backend), w.kv_a_norm, eps=eps, backend=backend)  # (T, L)
    k_rope = linear(h, w.k_rope, backend=backend).view(t, 1, r)  # (T, 1, R): one key head shared by all heads
    q_rope, k_rope = rope(q_rope, k_rope, positions, inv_freq=inv_freq, backend=backend)
    q_latent = batched_linear(q_nope, w.w_uk, backend=backend)  # (T, heads, L)
    out = attend(q_latent, q_rope, latent, k_rope.view(t, r))  # (T, heads, L)
    v = batched_linear(out, w.w_uv, backend=backend)  # (T, heads, v)
    return linear(v.view(t, -1), w.o, backend=backend)  # (T, H)


def mla_decode_attend(cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, slots: torch.Tensor,
                      cfg: ModelConfig, backend: str) -> MLAAttend:
    """Decode: append the new rows to the paged latent cache (num_blocks, block_size, L + R), attend over it."""
    def attend(q_latent: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
               k_rope: torch.Tensor) -> torch.Tensor:
        append_mla_kv(latent, k_rope, cache, slots, backend=backend)
        return mla_decode_attention(q_latent, q_rope, cache, block_table, seq_lens, kv_lora_rank=cfg.kv_lora_rank,
                                    scale=cfg.softmax_scale, backend=backend)
    return attend


def mla_prefill_attend(cache: torch.Tensor, slots: torch.Tensor, batch: int, seq: int, cfg: ModelConfig,
                       backend: str) -> MLAAttend:
    """Prefill of `batch` prompts of `seq` tokens: fill the cache, attend causally over the prompt's rows."""
    def attend(q_latent: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
               k_rope: torch.Tensor) -> torch.Tensor:
        append_mla_kv(latent, k_rope, cache, slots, backend=backend)
        heads, lat, r = q_latent.shape[1], q_latent.shape[2], q_rope.shape[2]
        ql = q_latent.view(batch, seq, heads, lat).transpose(1, 2).contiguous()  # (b, H, S, L)
        qr = q_rope.view(batch, seq, heads, r).transpose(1, 2).contiguous()  # (b, H, S, R)
        kv = torch.cat([latent, k_rope], dim=1).view(batch, seq, lat + r)  # (b, S, L + R)
        out = mla_prefill_attention(ql, qr, kv, kv_lora_rank=lat, scale=cfg.softmax_scale, causal=True,
                                    backend=backend)  # (b, H, S, L)
        return out.transpose(1, 2).reshape(batch * seq, heads, lat)
    return attend
