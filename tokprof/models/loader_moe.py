"""Weights of the MoE / MLA families in tokprof's layout: the Hugging Face tensor names and shapes to expect, and the
fusing and reordering done at load time (tokprof.models.loader calls these for Qwen3-MoE and DeepSeek-V3).

Layout (what the decode step reads):
- routed experts stacked: gate_up (E', 2I, H) = [gate | up] rows, down (E', H, I); E' = num_experts plus
  n_shared_experts, the shared expert (width n_shared * I) split into n_shared experts of width I that every token
  takes with weight 1 (silu(gate) * up is column-wise, so the split is exact);
- MLA: q_b's output rows regrouped as [every head's no-RoPE dims | every head's RoPE dims], so q_nope and q_rope are
  (T, H, d) views with contiguous heads; kv_a_proj_with_mqa split into the latent rows (kv_a) and the RoPE rows
  (k_rope); kv_b_proj split per head into W_UK^T (H, L, nope) and W_UV (H, v, L) for the absorbed form.
- DeepSeek applies RoPE to interleaved pairs (x0, x1), (x2, x3), ... (config rope_interleave, default true);
  transformers computes it as rotate-half on the de-interleaved vector [x0, x2, ..., x1, x3, ...]. Permuting the RoPE
  output rows of q_b and k_rope to that order at load makes tokprof's rotate-half kernel give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprof.models.config import ModelConfig


@dataclass
class MLAWeights:
    q_a: torch.Tensor | None  # (q_lora_rank, H); None without q_lora_rank
    q_a_norm: torch.Tensor | None  # (q_lora_rank,)
    q_b: torch.Tensor  # (heads * (nope + R), q_lora_rank or H): [all heads' nope rows | all heads' rope rows]
    kv_a: torch.Tensor  # (L, H): the latent rows of kv_a_proj_with_mqa
    k_rope: torch.Tensor  # (R, H): its RoPE rows (de-interleaved)
    kv_a_norm: torch.Tensor  # (L,)
    w_uk: torch.Tensor  # (heads, L, nope): W_UK^T, q_latent[h] = w_uk[h] @ q_nope[h]
    w_uv: torch.Tensor  # (heads, v, L): out[h] = w_uv[h] @ latent_out[h]
    o: torch.Tensor  # (H, heads * v)


@dataclass
class MoEWeights:
    router: torch.Tensor  # (E, H)
    gate_up: torch.Tensor  # (E + n_shared, 2I, H)
    down: torch.Tensor  # (E + n_shared, H, I)
    score_bias: torch.Tensor | None = None  # (E,) float32: DeepSeek's e_score_correction_bias (selection only)
    router_bias: torch.Tensor | None = None  # (E,) gpt-oss: added to the router logits
    b_gate_up: torch.Tensor | None = None  # (E, 2I) gpt-oss, [gate | up]
    b_down: torch.Tensor | None = None  # (E, H) gpt-oss


@dataclass
class AttentionExtras:
    """gpt-oss's additions to standard attention."""

    qkv_bias: torch.Tensor  # (q_size + 2*kv_size,)
    o_bias: torch.Tensor  # (H,)
    sinks: torch.Tensor  # (num_heads,) one sink logit per head


def _deinterleave(r: int) -> torch.Tensor:
    return torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])


def hf_moe_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape of the per-layer tensors of a Qwen3-MoE or DeepSeek-V3 checkpoint."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        a = p + "self_attn."
        if cfg.is_mla:
            heads, lat, r = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
            qk = cfg.qk_nope_head_dim + r
            if cfg.q_lora_rank:
                shapes.update({a + "q_a_proj.weight": (cfg.q_lora_rank, h),
                               a + "q_a_layernorm.weight": (cfg.q_lora_rank,),
                               a + "q_b_proj.weight": (heads * qk, cfg.q_lora_rank)})
            else:
                shapes[a + "q_proj.weight"] = (heads * qk, h)
            shapes.update({a + "kv_a_proj_with_mqa.weight": (lat + r, h), a + "kv_a_layernorm.weight": (lat,),
                           a + "kv_b_proj.weight": (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), lat),
                           a + "o_proj.weight": (h, heads * cfg.v_head_dim)})
        else:
            shapes.update({a + "q_proj.weight": (cfg.q_size, h), a + "k_proj.weight": (cfg.kv_size, h),
                           a + "v_proj.weight": (cfg.kv_size, h), a + "o_proj.weight": (h, cfg.q_size)})
            if cfg.attention_bias:
                shapes.update({a + "q_proj.bias": (cfg.q_size,), a + "k_proj.bias": (cfg.kv_size,),
                               a + "v_proj.bias": (cfg.kv_size,), a + "o_proj.bias": (h,)})
            if cfg.attention_sinks:
                shapes[a + "sinks"] = (cfg.num_heads,)
            if cfg.qk_norm:
                shapes[a + "q_norm.weight"] = (cfg.head_dim,)
                shapes[a + "k_norm.weight"] = (cfg.head_dim,)
        m = p + "mlp."
        if not cfg.is_moe_layer(layer):
            i = cfg.intermediate_size
            shapes.update({m + "gate_proj.weight": (i, h), m + "up_proj.weight": (i, h),
                           m + "down_proj.weight": (h, i)})
            continue
        i = cfg.moe_intermediate_size
        if cfg.architecture == "gpt_oss":  # experts stored fused and transposed, gate and up columns interleaved
            e = cfg.num_experts
            shapes.update({m + "router.weight": (e, h), m + "router.bias": (e,),
                           m + "experts.gate_up_proj": (e, h, 2 * i), m + "experts.gate_up_proj_bias": (e, 2 * i),
                           m + "experts.down_proj": (e, i, h), m + "experts.down_proj_bias": (e, h)})
            continue
        shapes[m + "gate.weight"] = (cfg.num_experts, h)
        if cfg.architecture == "deepseek_v3":
            shapes[m + "gate.e_score_correction_bias"] = (cfg.num_experts,)
        for e in range(cfg.num_experts):
            x = f"{m}experts.{e}."
            shapes.update({x + "gate_proj.weight": (i, h), x + "up_proj.weight": (i, h),
                           x + "down_proj.weight": (h, i)})
        if cfg.n_shared_experts:
            s = i * cfg.n_shared_experts
            shapes.update({m + "shared_experts.gate_proj.weight": (s, h), m + "shared_experts.up_proj.weight": (s, h),
                           m + "shared_experts.down_proj.weight": (h, s)})
    return shapes


def fuse_mla(cfg: ModelConfig, flat: dict[str, torch.Tensor], prefix: str, interleaved: bool) -> MLAWeights:
    """MLA weights of one layer from its Hugging Face tensors (popped from `flat`)."""
    heads, lat, r = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    perm = _deinterleave(r) if interleaved else torch.arange(r)
    q_b = flat.pop(prefix + ("q_b_proj.weight" if cfg.q_lora_rank else "q_proj.weight"))
    q_b = q_b.view(heads, nope + r, -1)
    q_b = torch.cat([q_b[:, :nope].reshape(heads * nope, -1),
                     q_b[:, nope:][:, perm.to(q_b.device)].reshape(heads * r, -1)], dim=0)
    kv_a = flat.pop(prefix + "kv_a_proj_with_mqa.weight")
    kv_b = flat.pop(prefix + "kv_b_proj.weight").view(heads, nope + v, lat)
    return MLAWeights(
        q_a=flat.pop(prefix + "q_a_proj.weight", None), q_a_norm=flat.pop(prefix + "q_a_layernorm.weight", None),
        q_b=q_b.contiguous(), kv_a=kv_a[:lat].contiguous(), k_rope=kv_a[lat:][perm.to(kv_a.device)].contiguous(),
        kv_a_norm=flat.pop(prefix + "kv_a_layernorm.weight"),
        w_uk=kv_b[:, :nope].transpose(1, 2).contiguous(), w_uv=kv_b[:, nope:].contiguous(),
        o=flat.pop(prefix + "o_proj.weight").contiguous())


def fuse_gpt_oss_moe(flat: dict[str, torch.Tensor], prefix: str) -> MoEWeights:
    """gpt-oss experts: gate_up_proj (E, H, 2I) with gate in the even columns -> (E, 2I, H) [gate | up] rows."""
    gu = flat.pop(prefix + "experts.gate_up_proj")
    b = flat.pop(prefix + "experts.gate_up_proj_bias")
    return MoEWeights(
        router=flat.pop(prefix + "router.weight").contiguous(), router_bias=flat.pop(prefix + "router.bias"),
        gate_up=torch.cat([gu[:, :, 0::2], gu[:, :, 1::2]], dim=2).transpose(1, 2).contiguous(),
        down=flat.pop(prefix + "experts.down_proj").transpose(1, 2).contiguous(),
        b_gate_up=torch.cat([b[:, 0::2], b[:, 1::2]], dim=1).contiguous(),
        b_down=flat.pop(prefix + "experts.down_proj_bias").contiguous())


def fuse_moe(cfg: ModelConfig, flat: dict[str, torch.Tensor], prefix: str) -> MoEWeights:
    """Stacked expert weights of one MoE layer (routed, then the shared experts split to width I)."""
    if cfg.architecture == "gpt_oss":
        return fuse_gpt_oss_moe(flat, prefix)
    i = cfg.moe_intermediate_size
    gate_up, down = [], []
    for e in range(cfg.num_experts):
        x = f"{prefix}experts.{e}."
        gate_up.append(torch.cat([flat.pop(x + "gate_proj.weight"), flat.pop(x + "up_proj.weight")], dim=0))
        down.append(flat.pop(x + "down_proj.weight"))
    if cfg.n_shared_experts:
        x = prefix + "shared_experts."
        g, u, d = (flat.pop(x + n + "_proj.weight") for n in ("gate", "up", "down"))
        for j in range(cfg.n_shared_experts):
            cols = slice(j * i, (j + 1) * i)
            gate_up.append(torch.cat([g[cols], u[cols]], dim=0))
            down.append(d[:, cols])
    bias = flat.pop(prefix + "gate.e_score_correction_bias", None)
    return MoEWeights(router=flat.pop(prefix + "gate.weight").contiguous(), gate_up=torch.stack(gate_up),
                      down=torch.stack(down), score_bias=None if bias is None else bias.float())


def random_mla(cfg: ModelConfig, normal, norm_weight) -> MLAWeights:  # noqa: ANN001 - the Transformer's samplers
    heads, lat, r, h = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.hidden_size
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    qr = cfg.q_lora_rank
    return MLAWeights(q_a=normal(qr, h) if qr else None, q_a_norm=norm_weight(qr) if qr else None,
                      q_b=normal(heads * (nope + r), qr or h), kv_a=normal(lat, h), k_rope=normal(r, h),
                      kv_a_norm=norm_weight(lat), w_uk=normal(heads, lat, nope), w_uv=normal(heads, v, lat),
                      o=normal(h, heads * v))


def random_moe(cfg: ModelConfig, normal) -> MoEWeights:  # noqa: ANN001
    e, h, i = cfg.num_experts + cfg.n_shared_experts, cfg.hidden_size, cfg.moe_intermediate_size
    bias = normal(cfg.num_experts).float() if cfg.architecture == "deepseek_v3" else None
    oss = cfg.architecture == "gpt_oss"
    return MoEWeights(router=normal(cfg.num_experts, h), gate_up=normal(e, 2 * i, h), down=normal(e, h, i),
                      score_bias=bias, router_bias=normal(e) if oss else None,
                      b_gate_up=normal(e, 2 * i) if oss else None, b_down=normal(e, h) if oss else None)


def random_extras(cfg: ModelConfig, normal) -> AttentionExtras | None:  # noqa: ANN001
    if cfg.architecture != "gpt_oss":
        return None
    return AttentionExtras(qkv_bias=normal(cfg.q_size + 2 * cfg.kv_size), o_bias=normal(cfg.hidden_size),
                           sinks=normal(cfg.num_heads))


def fuse_extras(cfg: ModelConfig, flat: dict[str, torch.Tensor], a: str) -> AttentionExtras | None:
    if cfg.architecture != "gpt_oss":
        return None
    return AttentionExtras(qkv_bias=torch.cat([flat.pop(a + f"{n}_proj.bias") for n in ("q", "k", "v")]),
                           o_bias=flat.pop(a + "o_proj.bias"), sinks=flat.pop(a + "sinks"))


def moe_weight_tensors(w: MLAWeights | MoEWeights | AttentionExtras | None) -> list[torch.Tensor]:
    if w is None:
        return []
    return [t for t in vars(w).values() if isinstance(t, torch.Tensor)]


def hf_moe_state_dict(cfg: ModelConfig, layers: list, per_expert: bool) -> dict[str, torch.Tensor]:
    """The Hugging Face per-layer tensors of `layers` (tokprof LayerWeights): views of tokprof's tensors where the
    layout allows (experts, norms, projections), copies where load time reordered it (MLA's q_b, kv_a and kv_b).

    per_expert: the names save_pretrained writes (experts.{e}.gate_proj.weight, ...); else transformers' in-memory
    modules (experts.gate_up_proj (E, 2I, H), experts.down_proj (E, H, I))."""
    out: dict[str, torch.Tensor] = {}
    e, i = cfg.num_experts, cfg.moe_intermediate_size
    for layer, w in enumerate(layers):
        p = f"model.layers.{layer}."
        a, m = p + "self_attn.", p + "mlp."
        out[p + "input_layernorm.weight"] = w.input_norm
        out[p + "post_attention_layernorm.weight"] = w.post_norm
        if w.mla is not None:
            out.update(_hf_mla(cfg, w.mla, a))
        else:
            q, kv = cfg.q_size, cfg.kv_size
            out.update({a + "q_proj.weight": w.qkv[:q], a + "k_proj.weight": w.qkv[q:q + kv],
                        a + "v_proj.weight": w.qkv[q + kv:], a + "o_proj.weight": w.o})
            if cfg.qk_norm:
                out[a + "q_norm.weight"], out[a + "k_norm.weight"] = w.q_norm, w.k_norm
            if w.extras is not None:
                x = w.extras
                out.update({a + "q_proj.bias": x.qkv_bias[:q], a + "k_proj.bias": x.qkv_bias[q:q + kv],
                            a + "v_proj.bias": x.qkv_bias[q + kv:], a + "o_proj.bias": x.o_bias, a + "sinks": x.sinks})
        if w.moe is not None and cfg.architecture == "gpt_oss":
            gu = w.moe.gate_up  # (E, 2I, H) -> (E, H, 2I) with gate and up interleaved again (a copy)
            out.update({m + "router.weight": w.moe.router, m + "router.bias": w.moe.router_bias,
                        m + "experts.gate_up_proj": torch.stack([gu[:, :i], gu[:, i:]], dim=2).reshape(
                            e, 2 * i, -1).transpose(1, 2),
                        m + "experts.gate_up_proj_bias": torch.stack(
                            [w.moe.b_gate_up[:, :i], w.moe.b_gate_up[:, i:]], dim=2).reshape(e, 2 * i),
                        m + "experts.down_proj": w.moe.down.transpose(1, 2),
                        m + "experts.down_proj_bias": w.moe.b_down})
            continue
        if w.moe is None:
            n = cfg.intermediate_size
            out.update({m + "gate_proj.weight": w.gate_up[:n], m + "up_proj.weight": w.gate_up[n:],
                        m + "down_proj.weight": w.down})
            continue
        out[m + "gate.weight"] = w.moe.router
        if w.moe.score_bias is not None:
            out[m + "gate.e_score_correction_bias"] = w.moe.score_bias
        if per_expert:
            for x in range(e):
                out.update({f"{m}experts.{x}.gate_proj.weight": w.moe.gate_up[x, :i],
                            f"{m}experts.{x}.up_proj.weight": w.moe.gate_up[x, i:],
                            f"{m}experts.{x}.down_proj.weight": w.moe.down[x]})
        else:
            out[m + "experts.gate_up_proj"] = w.moe.gate_up[:e]
            out[m + "experts.down_proj"] = w.moe.down[:e]
        if cfg.n_shared_experts:
            shared = range(e, e + cfg.n_shared_experts)
            out[m + "shared_experts.gate_proj.weight"] = torch.cat([w.moe.gate_up[x, :i] for x in shared])
            out[m + "shared_experts.up_proj.weight"] = torch.cat([w.moe.gate_up[x, i:] for x in shared])
            out[m + "shared_experts.down_proj.weight"] = torch.cat([w.moe.down[x] for x in shared], dim=1)
    return out


def _hf_mla(cfg: ModelConfig, w: MLAWeights, a: str) -> dict[str, torch.Tensor]:
    """MLA tensors back in Hugging Face's layout (interleaved RoPE pairs, rope_interleave true)."""
    heads, nope, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    inverse = torch.argsort(_deinterleave(r)).to(w.q_b.device)
    k = w.q_b.shape[1]
    q_nope = w.q_b[:heads * nope].view(heads, nope, k)
    q_rope = w.q_b[heads * nope:].view(heads, r, k)[:, inverse]
    q_b = torch.cat([q_nope, q_rope], dim=1).reshape(heads * (nope + r), k)
    kv_b = torch.cat([w.w_uk.transpose(1, 2), w.w_uv], dim=1).reshape(-1, w.w_uk.shape[1])  # (H*(nope+v), L)
    out = {a + ("q_b_proj.weight" if w.q_a is not None else "q_proj.weight"): q_b,
           a + "kv_a_proj_with_mqa.weight": torch.cat([w.kv_a, w.k_rope[inverse]]),
           a + "kv_a_layernorm.weight": w.kv_a_norm, a + "kv_b_proj.weight": kv_b, a + "o_proj.weight": w.o}
    if w.q_a is not None:
        out[a + "q_a_proj.weight"], out[a + "q_a_layernorm.weight"] = w.q_a, w.q_a_norm
    return out


def hf_moe_config(cfg: ModelConfig) -> dict[str, object]:
    """The family-specific config.json keys of a Qwen3-MoE or DeepSeek-V3 config."""
    common = {"num_experts_per_tok": cfg.num_experts_per_tok, "moe_intermediate_size": cfg.moe_intermediate_size,
              "norm_topk_prob": cfg.norm_topk_prob}
    if cfg.architecture == "gpt_oss":
        # rope_parameters spelled out: GptOssConfig's default is YaRN, not plain RoPE, when none is given.
        scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else {"rope_type": "default"}
        return {"rope_parameters": {"rope_theta": cfg.rope_theta, **scaling}, "num_local_experts": cfg.num_experts,
                "num_experts_per_tok": cfg.num_experts_per_tok,
                "intermediate_size": cfg.moe_intermediate_size, "sliding_window": cfg.sliding_window,
                "layer_types": list(cfg.layer_types), "attention_bias": True, "swiglu_limit": cfg.swiglu_limit}
    if cfg.architecture == "qwen3_moe":
        return {**common, "num_experts": cfg.num_experts, "decoder_sparse_step": cfg.decoder_sparse_step,
                "mlp_only_layers": list(cfg.mlp_only_layers), "use_sliding_window": False}
    return {**common, "n_routed_experts": cfg.num_experts, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
            "routed_scaling_factor": cfg.routed_scaling_factor, "n_shared_experts": cfg.n_shared_experts,
            "first_k_dense_replace": cfg.first_k_dense_replace, "q_lora_rank": cfg.q_lora_rank or None,
            "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim, "rope_interleave": True,
            "num_key_value_heads": cfg.num_heads}
