"""The mixture-of-experts and latent-attention part of ModelConfig: field checks, parameter counts, YaRN RoPE, the
softmax scale, Hugging Face config.json parsing and the presets of Qwen3-MoE, DeepSeek-V3/R1 and gpt-oss.

Families (transformers' class names; each field keeps the dense default when the family does not use it):

- Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 attention (q/k norm); MoE layers with `num_experts` experts, softmax
  top-`num_experts_per_tok`, renormalised when `norm_topk_prob`; `decoder_sparse_step` / `mlp_only_layers` dense.
- DeepSeek-V3/R1 (DeepseekV3ForCausalLM): MLA (q_lora_rank, kv_lora_rank, qk_nope/qk_rope/v head dims, RoPE on
  the rope dims, interleaved); sigmoid scoring with e_score_correction_bias (selection only), grouped top-k
  (n_group / topk_group), renormalised, times routed_scaling_factor; n_shared_experts; the first
  first_k_dense_replace layers dense; YaRN RoPE whose mscale_all_dim multiplies the softmax scale by mscale^2.
- gpt-oss (GptOssForCausalLM): biases on q/k/v/o, one sink logit per head, layer_types alternating
  sliding_attention (sliding_window tokens) and full_attention; router with a bias, softmax over the top-k logits;
  experts with biases and the clamped SwiGLU (swiglu_limit, swiglu_alpha); YaRN whose attention factor scales
  cos and sin (so q.k by its square).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tokprof.models.config import ModelConfig


def check_moe_fields(c: ModelConfig) -> None:
    """ValueError naming the field when the MoE / MLA / sliding-window fields do not make a model."""
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
                 "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim", "sliding_window"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {value!r} (model {c.name!r})")
    for name in ("n_group", "topk_group", "decoder_sparse_step"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r} (model {c.name!r})")
    if c.num_experts:
        if not 1 <= c.num_experts_per_tok <= c.num_experts:
            raise ValueError(f"num_experts_per_tok: expected 1..num_experts={c.num_experts}, "
                             f"got {c.num_experts_per_tok}")
        if c.moe_intermediate_size <= 0:
            raise ValueError(f"moe_intermediate_size: expected a positive int with num_experts={c.num_experts}, "
                             f"got {c.moe_intermediate_size}")
        if c.router_scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"router_scoring: expected 'softmax' or 'sigmoid', got {c.router_scoring!r}")
        if c.num_experts % c.n_group or c.topk_group > c.n_group:
            raise ValueError(f"n_group/topk_group: expected n_group dividing num_experts={c.num_experts} and "
                             f"topk_group <= n_group, got n_group={c.n_group}, topk_group={c.topk_group}")
        if c.num_experts_per_tok > c.topk_group * (c.num_experts // c.n_group):
            raise ValueError(f"topk_group: the kept groups hold {c.topk_group * (c.num_experts // c.n_group)} "
                             f"experts, fewer than num_experts_per_tok={c.num_experts_per_tok}")
    bad = [i for i in c.mlp_only_layers if not (isinstance(i, int) and 0 <= i < c.num_layers)]
    if bad:
        raise ValueError(f"mlp_only_layers: expected layer indices in [0, {c.num_layers}), got {bad}")
    if c.kv_lora_rank:
        if min(c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) <= 0:
            raise ValueError("qk_nope_head_dim/qk_rope_head_dim/v_head_dim: expected positive ints with MLA "
                             f"(kv_lora_rank={c.kv_lora_rank}), got {c.qk_nope_head_dim}/{c.qk_rope_head_dim}/"
                             f"{c.v_head_dim}")
        if c.head_dim != c.qk_rope_head_dim:
            raise ValueError(f"head_dim: with MLA it is the RoPE dims qk_rope_head_dim={c.qk_rope_head_dim}, "
                             f"got {c.head_dim}")
    if c.layer_types:
        if len(c.layer_types) != c.num_layers or set(c.layer_types) - {"full_attention", "sliding_attention"}:
            raise ValueError(f"layer_types: expected {c.num_layers} entries of 'full_attention' / "
                             f"'sliding_attention', got {list(c.layer_types)}")
        if "sliding_attention" in c.layer_types and c.sliding_window <= 0:
            raise ValueError("sliding_window: expected a positive int with sliding_attention layers, "
                             f"got {c.sliding_window}")
    if c.swiglu_limit < 0 or not math.isfinite(c.swiglu_limit):
        raise ValueError(f"swiglu_limit: expected a finite float >= 0 (0: plain SwiGLU), got {c.swiglu_limit!r}")


# ------------------------------------------------------------------------------------------------- parameter counts

def attention_params(c: ModelConfig) -> int:
    h = c.hidden_size
    if c.is_mla:
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            q = h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * c.num_heads * qk  # q_a, q_a_layernorm, q_b
        else:
            q = h * c.num_heads * qk
        kv = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank  # kv_a_proj_with_mqa, kv_a_layernorm
        kv += c.kv_lora_rank * c.num_heads * (c.qk_nope_head_dim + c.v_head_dim)  # kv_b_proj
        return q + kv + c.num_heads * c.v_head_dim * h  # o_proj
    n = h * (c.q_size + 2 * c.kv_size) + c.q_size * h
    if c.attention_bias:
        n += c.q_size + 2 * c.kv_size + h
    if c.attention_sinks:
        n += c.num_heads
    if c.qk_norm:
        n += 2 * c.head_dim
    return n


def expert_params(c: ModelConfig) -> int:
    """One routed expert: gate, up and down projections (and gpt-oss's biases)."""
    h, i = c.hidden_size, c.moe_intermediate_size
    return 3 * h * i + ((2 * i + h) if c.expert_bias else 0)


def mlp_params(c: ModelConfig, layer: int, experts: int | None) -> int:
    h = c.hidden_size
    if not c.is_moe_layer(layer):
        return 3 * h * c.intermediate_size
    router = c.num_experts * h + (c.num_experts if c.router_bias else 0)
    shared = 3 * h * c.moe_intermediate_size * c.n_shared_experts
    n = c.num_experts if experts is None else experts
    return router + shared + n * expert_params(c)


def quantised_linear_shapes(c: ModelConfig, experts: float | None = None) -> list[tuple[float, int, int]]:
    """(count, N, K) of the weights a low-precision format quantises in an MoE/MLA model, as its plan runs them
    (tokprof.models.plan_moe with tokprof.quant.precision): the attention projections (MLA: q_a/q_b or q, kv_a with
    k_rope, o; kv_b_proj stays in the activation dtype: its absorbed halves run as batched_linear), the dense
    layers' gate-up and down, and every expert's gate-up (2I, H) and down (H, I) - `experts` routed ones per MoE
    layer (None: all), shared ones always. Routers, norms, biases, the embedding and the LM head are not quantised."""
    h, layers = c.hidden_size, c.num_layers
    if c.is_mla:
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        q = ([(layers, c.q_lora_rank, h), (layers, c.num_heads * qk, c.q_lora_rank)] if c.q_lora_rank
             else [(layers, c.num_heads * qk, h)])
        shapes: list[tuple[float, int, int]] = q + [(layers, c.kv_lora_rank + c.qk_rope_head_dim, h),
                                                    (layers, h, c.num_heads * c.v_head_dim)]
    else:
        shapes = [(layers, c.q_size + 2 * c.kv_size, h), (layers, h, c.q_size)]
    moe = c.num_moe_layers
    dense = layers - moe
    if dense:
        shapes += [(dense, 2 * c.intermediate_size, h), (dense, h, c.intermediate_size)]
    if moe:
        i = c.moe_intermediate_size
        per_layer = (c.num_experts if experts is None else experts) + c.n_shared_experts
        shapes += [(moe * per_layer, 2 * i, h), (moe * per_layer, h, i)]
    return shapes


# --------------------------------------------------------------------------------------------------------- RoPE

def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(c: ModelConfig) -> float:
    """transformers' YaRN attention_factor, the factor on cos and sin (1.0 without YaRN)."""
    s = c.rope_scaling or {}
    if s.get("rope_type", s.get("type")) != "yarn":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    factor = float(s["factor"])
    if s.get("mscale") and s.get("mscale_all_dim"):
        return _get_mscale(factor, float(s["mscale"])) / _get_mscale(factor, float(s["mscale_all_dim"]))
    return _get_mscale(factor)


def yarn_inv_freq(c: ModelConfig) -> torch.Tensor:
    """YaRN inverse frequencies (head_dim/2,) float32, computed as transformers' `_compute_yarn_parameters`."""
    s = c.rope_scaling
    d, base, factor = c.head_dim, c.rope_theta, float(s["factor"])
    old_len = float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (d * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, d, 2).to(dtype=torch.float) / d)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # the extrapolation share
    return interpolation * (1 - keep) + extrapolation * keep


def softmax_scale(c: ModelConfig) -> float:
    """The scale on q.k before the softmax, with what transformers folds into it.

    MLA: (qk_nope + qk_rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN. Otherwise head_dim^-0.5,
    times the square of YaRN's attention factor (transformers multiplies cos and sin by it, so a fully rotated
    q.k carries it twice; tokprof's rope kernel does not scale, so the factor moves here)."""
    if c.is_mla:
        scale = (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5
        s = c.rope_scaling or {}
        if s.get("rope_type", s.get("type")) == "yarn" and s.get("mscale_all_dim"):
            m = _get_mscale(float(s["factor"]), float(s["mscale_all_dim"]))
            scale = scale * m * m
        return scale
    return c.head_dim ** -0.5 * yarn_attention_factor(c) ** 2


# ------------------------------------------------------------------------------------------------ from config.json

def _rope(hf: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling")
    if params and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        scaling = dict(scaling)
        if "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type") == "default":
            scaling = None
    return theta, scaling


def from_hf_moe(hf: Mapping[str, Any], arch: str, name: str, source: str) -> ModelConfig:
    """ModelConfig of a Qwen3-MoE, DeepSeek-V3 or gpt-oss config.json (both transformers 4 and 5 spellings)."""
    from tokprof.models.config import ModelConfig

    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"{key}: missing from the Hugging Face config ({source})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: expected 'silu', got {hf.get('hidden_act')!r}")
    theta, scaling = _rope(hf)
    heads = int(hf["num_attention_heads"])
    layers = int(hf["num_hidden_layers"])
    experts = hf.get("num_experts", hf.get("n_routed_experts", hf.get("num_local_experts")))
    common: dict[str, Any] = dict(
        name=name, vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]), num_layers=layers,
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads), rope_theta=theta,
        rope_scaling=scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)), architecture=arch, source=source,
        num_experts=int(experts or 0), num_experts_per_tok=int(hf.get("num_experts_per_tok", 0)))
    if arch == "qwen3_moe":
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window: sliding-window attention is not supported for Qwen3-MoE")
        if hf.get("attention_bias"):
            raise ValueError("attention_bias: expected false for Qwen3-MoE")
        return ModelConfig(
            **common, intermediate_size=int(hf.get("intermediate_size") or hf["moe_intermediate_size"]),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads), qk_norm=True,
            moe_intermediate_size=int(hf["moe_intermediate_size"]), router_scoring="softmax",
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()))
    if arch == "deepseek_v3":
        if hf.get("attention_bias"):
            raise ValueError("attention_bias: expected false for DeepSeek-V3")
        if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(f"scoring_func/topk_method: expected 'sigmoid'/'noaux_tc' (DeepSeek-V3), got "
                             f"{hf.get('scoring_func')!r}/{hf.get('topk_method')!r}")
        if hf.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"moe_layer_freq: expected 1, got {hf.get('moe_layer_freq')!r}")
        cfg = ModelConfig(
            **common, intermediate_size=int(hf["intermediate_size"]), head_dim=int(hf["qk_rope_head_dim"]),
            moe_intermediate_size=int(hf["moe_intermediate_size"]), router_scoring="sigmoid",
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)), n_group=int(hf.get("n_group") or 1),
            topk_group=int(hf.get("topk_group") or 1),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), router_bias=True,
            n_shared_experts=int(hf.get("n_shared_experts") or 0),
            first_k_dense_replace=int(hf.get("first_k_dense_replace", 0)),
            q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=int(hf["kv_lora_rank"]),
            qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
            v_head_dim=int(hf["v_head_dim"]))
        if abs(yarn_attention_factor(cfg) - 1.0) > 1e-12:
            # transformers scales cos/sin by it on the rope dims only; tokprof's kernels do not model that.
            raise ValueError(f"rope_scaling: YaRN attention factor {yarn_attention_factor(cfg)} != 1 (mscale != "
                             "mscale_all_dim) is not supported with MLA")
        return cfg
    # gpt-oss
    types = tuple(hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                            for i in range(layers)])
    return ModelConfig(
        **common, intermediate_size=int(hf["intermediate_size"]),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        moe_intermediate_size=int(hf["intermediate_size"]), router_scoring="softmax", norm_topk_prob=True,
        router_bias=True, expert_bias=True, swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), attention_bias=bool(hf.get("attention_bias", True)),
        attention_sinks=True, sliding_window=int(hf.get("sliding_window") or 0), layer_types=types)


# ----------------------------------------------------------------------------------------------------- presets

def _presets() -> dict[str, ModelConfig]:
    from tokprof.models.config import ModelConfig

    # deepseek-ai/DeepSeek-V3 and deepseek-ai/DeepSeek-R1 config.json on Hugging Face (read 2026-12): same
    # architecture; num_nextn_predict_layers 1 (the MTP module) is not part of the decode model.
    ds_yarn = {"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
               "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}
    deepseek = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_layers=61, num_heads=128,
                    num_kv_heads=128, head_dim=64, rope_theta=10000.0, rope_scaling=ds_yarn, rms_norm_eps=1e-6,
                    max_position_embeddings=163840, architecture="deepseek_v3", num_experts=256,
                    num_experts_per_tok=8, moe_intermediate_size=2048, router_scoring="sigmoid", norm_topk_prob=True,
                    n_group=8, topk_group=4, routed_scaling_factor=2.5, router_bias=True, n_shared_experts=1,
                    first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128)
    # Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B config.json on Hugging Face (read 2026-12).
    qwen = dict(vocab_size=151936, head_dim=128, num_kv_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-6,
                qk_norm=True, max_position_embeddings=40960, architecture="qwen3_moe", num_experts=128,
                num_experts_per_tok=8, router_scoring="softmax", norm_topk_prob=True)
    # openai/gpt-oss-20b and openai/gpt-oss-120b config.json on Hugging Face (read 2026-12).
    oss_yarn = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
    oss = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_heads=64, num_kv_heads=8,
               head_dim=64, rope_theta=150000.0, rope_scaling=oss_yarn, rms_norm_eps=1e-5,
               max_position_embeddings=131072, architecture="gpt_oss", num_experts_per_tok=4,
               moe_intermediate_size=2880, router_scoring="softmax", norm_topk_prob=True, router_bias=True,
               expert_bias=True, swiglu_limit=7.0, swiglu_alpha=1.702, attention_bias=True, attention_sinks=True,
               sliding_window=128)

    def alternating(n: int) -> tuple[str, ...]:
        return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n))

    return {
        "deepseek-v3": ModelConfig("deepseek-v3", **deepseek),
        "deepseek-r1": ModelConfig("deepseek-r1", **deepseek),
        "qwen3-30b-a3b": ModelConfig("qwen3-30b-a3b", hidden_size=2048, intermediate_size=6144, num_layers=48,
                                     num_heads=32, moe_intermediate_size=768, **qwen),
        "qwen3-235b-a22b": ModelConfig("qwen3-235b-a22b", hidden_size=4096, intermediate_size=12288, num_layers=94,
                                       num_heads=64, moe_intermediate_size=1536, **qwen),
        "gpt-oss-20b": ModelConfig("gpt-oss-20b", num_layers=24, num_experts=32, layer_types=alternating(24), **oss),
        "gpt-oss-120b": ModelConfig("gpt-oss-120b", num_layers=36, num_experts=128, layer_types=alternating(36),
                                    **oss),
        # Tiny CPU models of each family (random weights; head dims the Triton attention kernels take).
        "tiny-moe": ModelConfig("tiny-moe", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                qk_norm=True, max_position_embeddings=4096, architecture="qwen3_moe", num_experts=8,
                                num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True),
        "tiny-mla": ModelConfig("tiny-mla", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                                num_heads=4, num_kv_heads=4, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6,
                                max_position_embeddings=4096, architecture="deepseek_v3", num_experts=8,
                                num_experts_per_tok=2, moe_intermediate_size=128, router_scoring="sigmoid",
                                n_group=4, topk_group=2, routed_scaling_factor=2.5, router_bias=True,
                                n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=96, kv_lora_rank=64,
                                qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32),
        "tiny-gpt-oss": ModelConfig("tiny-gpt-oss", vocab_size=512, hidden_size=256, intermediate_size=128,
                                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=150000.0,
                                    rms_norm_eps=1e-5, max_position_embeddings=4096, architecture="gpt_oss",
                                    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                                    router_scoring="softmax", router_bias=True, expert_bias=True, swiglu_limit=7.0,
                                    attention_bias=True, attention_sinks=True, sliding_window=16,
                                    layer_types=alternating(2)),
    }


MOE_PRESETS = _presets()
