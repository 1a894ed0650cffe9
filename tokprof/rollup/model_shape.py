"""A model's systems-level shape: the parameter and byte counts the serving-curve model reads, from a ModelConfig.

    shape = ModelShape.from_config(ModelConfig.from_name("deepseek-r1"))
    shape.total_params, shape.active_params       # 671.0e9, 37.6e9 (without the MTP module)

Dense models (Llama, Qwen3) and MoE/MLA models (DeepSeek-V3/R1, Qwen3-MoE: the fields of tokprof.models.config,
n_routed experts `num_experts`, `num_experts_per_tok`, `moe_intermediate_size`, `n_shared_experts`,
`first_k_dense_replace`, `kv_lora_rank`, ...) both map onto the same few numbers, per layer:

  attention    MLA: q_a (h x q_lora) + q_b (q_lora x H (nope + rope)) + kv_a (h x (kv_lora + rope))
               + kv_b (kv_lora x H (nope + v)) + o (H v x h);  GQA: h (Hq + 2 Hkv) d + Hq d h
  KV per token MLA: kv_lora + rope elements (one latent row shared by all heads: tensor parallelism does not split
               it, each TP rank holds the whole cache);  GQA: 2 Hkv d elements (split over min(tp, Hkv) ranks)
  attention    FLOPs per query token per attended token: MLA absorbed (DeepSeek-V2 paper, 'absorbed' decode):
  FLOPs        2 H (2 kv_lora + rope) (scores over kv_lora + rope, values over kv_lora);  GQA: 4 Hq d. Prefill
               runs MLA unabsorbed (per-head keys and values decompressed): 2 H (qk_nope + rope + v)
  MLP          dense layers 3 h I; MoE layers: E routed experts of 3 h I_moe each, top-k per token, and
               n_shared always-on experts of 3 h I_moe

The MTP module (DeepSeek-V3 technical report, arXiv 2412.19437, section 2.2: one extra Transformer block sharing
the embedding and output head; `num_nextn_predict_layers: 1` in deepseek-ai/DeepSeek-R1's config.json) counts as one
more MoE layer when multi-token prediction is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# deepseek-ai/DeepSeek-R1 config.json (huggingface.co/deepseek-ai/DeepSeek-R1/blob/main/config.json), as published:
# the figures tests check ModelShape.from_config against, whichever code path built the config.
DEEPSEEK_R1_HF_CONFIG = {
    "hidden_size": 7168, "num_hidden_layers": 61, "first_k_dense_replace": 3, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "n_shared_experts": 1, "moe_intermediate_size": 2048, "intermediate_size": 18432,
    "num_attention_heads": 128, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 129280, "num_nextn_predict_layers": 1,
}
DEEPSEEK_R1_SOURCE = "huggingface.co/deepseek-ai/DeepSeek-R1 config.json"


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts (not bytes) and per-token figures of one model, as the curve model reads them."""

    name: str
    layers: int
    dense_layers: int  # layers with a dense MLP (all of them for a dense model)
    moe_layers: int
    hidden: int
    heads: int
    attn_params: int  # per layer
    dense_mlp_params: int  # per dense layer
    expert_params: int  # one routed expert, per MoE layer
    n_experts: int  # routed experts per MoE layer (0: dense)
    top_k: int
    shared_params: int  # per MoE layer, the always-on experts
    vocab: int
    kv_elems_per_token: int  # per layer
    kv_split_max: int  # tensor-parallel ranks the KV cache splits over at most (1 for MLA)
    attn_flops_per_ctx: int  # per query token, per attended token, per layer (decode; MLA absorbed)
    prefill_attn_flops_per_ctx: int  # the same in prefill (MLA not absorbed: 2 H (qk_nope + rope + v))
    has_mtp: bool  # the model ships a multi-token-prediction module
    mla: bool

    @property
    def total_params(self) -> int:
        return (self.layers * self.attn_params + self.dense_layers * self.dense_mlp_params
                + self.moe_layers * (self.n_experts * self.expert_params + self.shared_params) + 2 * self.vocab
                * self.hidden)

    @property
    def active_params(self) -> int:
        return (self.layers * self.attn_params + self.dense_layers * self.dense_mlp_params
                + self.moe_layers * (self.top_k * self.expert_params + self.shared_params) + 2 * self.vocab
                * self.hidden)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        """From a tokprof ModelConfig (dense, MoE or MLA); the MoE/MLA fields default to the dense case."""
        g = lambda name, default=0: getattr(cfg, name, default) or default  # noqa: E731 - field or dense default
        h, heads, layers = cfg.hidden_size, cfg.num_heads, cfg.num_layers
        kv_lora = g("kv_lora_rank")
        if kv_lora:
            rope, nope, v, q_lora = g("qk_rope_head_dim"), g("qk_nope_head_dim"), g("v_head_dim"), g("q_lora_rank")
            q = (h * q_lora + q_lora * heads * (nope + rope)) if q_lora else h * heads * (nope + rope)
            attn = q + h * (kv_lora + rope) + kv_lora * heads * (nope + v) + heads * v * h
            kv, split, flops = kv_lora + rope, 1, 2 * heads * (2 * kv_lora + rope)
            pflops = 2 * heads * (nope + rope + v)
        else:
            d, hkv = cfg.head_dim, cfg.num_kv_heads
            attn = h * (heads + 2 * hkv) * d + heads * d * h
            kv, split, flops = 2 * hkv * d, hkv, 4 * heads * d
            pflops = flops
        experts = g("num_experts")
        if experts:
            moe_i = g("moe_intermediate_size")
            first = g("first_k_dense_replace")
            step = g("decoder_sparse_step", 1)
            mlp_only = set(g("mlp_only_layers", ()))
            moe_layers = sum(1 for i in range(layers) if i >= first and i not in mlp_only and (i + 1) % step == 0)
        else:
            moe_i, moe_layers = 0, 0
        arch = g("architecture", "llama")
        return cls(name=cfg.name, layers=layers, dense_layers=layers - moe_layers, moe_layers=moe_layers, hidden=h,
                   heads=heads, attn_params=attn, dense_mlp_params=3 * h * cfg.intermediate_size,
                   expert_params=3 * h * moe_i, n_experts=experts, top_k=g("num_experts_per_tok"),
                   shared_params=g("n_shared_experts") * 3 * h * moe_i, vocab=cfg.vocab_size,
                   kv_elems_per_token=kv, kv_split_max=split, attn_flops_per_ctx=flops,
                   prefill_attn_flops_per_ctx=pflops,
                   has_mtp=arch == "deepseek_v3", mla=bool(kv_lora))


def deepseek_r1_shape() -> ModelShape:
    """DeepSeek-R1 from its published config.json alone (DEEPSEEK_R1_HF_CONFIG), without tokprof's model code."""
    c = DEEPSEEK_R1_HF_CONFIG
    h, heads = c["hidden_size"], c["num_attention_heads"]
    rope, nope, v, q_lora, kv_lora = (c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["v_head_dim"], c["q_lora_rank"],
                                      c["kv_lora_rank"])
    attn = (h * q_lora + q_lora * heads * (nope + rope) + h * (kv_lora + rope) + kv_lora * heads * (nope + v)
            + heads * v * h)
    moe_layers = c["num_hidden_layers"] - c["first_k_dense_replace"]
    return ModelShape(name="deepseek-r1", layers=c["num_hidden_layers"], dense_layers=c["first_k_dense_replace"],
                      moe_layers=moe_layers, hidden=h, heads=heads, attn_params=attn,
                      dense_mlp_params=3 * h * c["intermediate_size"], expert_params=3 * h * c["moe_intermediate_size"],
                      n_experts=c["n_routed_experts"], top_k=c["num_experts_per_tok"],
                      shared_params=c["n_shared_experts"] * 3 * h * c["moe_intermediate_size"], vocab=c["vocab_size"],
                      kv_elems_per_token=kv_lora + rope, kv_split_max=1,
                      attn_flops_per_ctx=2 * heads * (2 * kv_lora + rope),
                      prefill_attn_flops_per_ctx=2 * heads * (nope + rope + v),
                      has_mtp=c["num_nextn_predict_layers"] > 0, mla=True)


def shape_for(model: str) -> tuple[ModelShape, str]:
    """(shape, where it comes from) of a preset or HF config; DeepSeek-R1 from tokprof's config when it has one."""
    from tokprof.models.config import ModelConfig

    try:
        cfg = ModelConfig.from_name(model) if not model.endswith(".json") else ModelConfig.from_hf(model)
    except ValueError:
        if model.lower() in ("deepseek-r1", "deepseek-v3"):
            return deepseek_r1_shape(), DEEPSEEK_R1_SOURCE + " (systems-level figures; no tokprof preset here)"
        raise
    return ModelShape.from_config(cfg), f"tokprof model config {cfg.name} ({getattr(cfg, 'source', 'preset')})"
