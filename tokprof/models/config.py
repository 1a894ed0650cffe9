"""Model configurations: a `ModelConfig` dataclass with derived sizes, named presets, and Hugging Face config.json.

    cfg = ModelConfig.from_name("llama-3.1-8b")
    cfg = ModelConfig.from_hf("path/to/config.json")   # or a directory holding it, or a dict

Supported architectures: Llama (LlamaForCausalLM, incl. Llama 3.1 "llama3" rope scaling and tied embeddings),
Qwen3 dense (Qwen3ForCausalLM: per-head RMSNorm on q and k), and the mixture-of-experts families of
tokprof.models.config_moe: Qwen3-MoE (Qwen3MoeForCausalLM), DeepSeek-V3/R1 (DeepseekV3ForCausalLM: multi-head latent
attention, MLA) and gpt-oss (GptOssForCausalLM: attention sinks, sliding-window layers, biases). Every MoE/MLA field
defaults to the dense case (num_experts 0, kv_lora_rank 0, ...). Anything else is refused naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3",
                           "Qwen3MoeForCausalLM": "qwen3_moe", "DeepseekV3ForCausalLM": "deepseek_v3",
                           "GptOssForCausalLM": "gpt_oss"}
LAYER_TYPES = ("full_attention", "sliding_attention")
_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    # Llama 3.1 style: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: Mapping[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    max_position_embeddings: int = 8192
    architecture: str = "llama"  # "llama" | "qwen3" | "qwen3_moe" | "deepseek_v3" | "gpt_oss"
    # --- mixture of experts (num_experts 0: every layer dense, intermediate_size wide)
    num_experts: int = 0  # routed experts per MoE layer
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # one routed (and shared) expert's width
    router_scoring: str = "softmax"  # "softmax" (Qwen3-MoE, gpt-oss) | "sigmoid" (DeepSeek-V3)
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum 1
    n_group: int = 1  # DeepSeek-V3 grouped top-k: experts in n_group groups, the best topk_group groups kept
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # the routed experts' sum is multiplied by this (DeepSeek-V3: 2.5)
    router_bias: bool = False  # a per-expert bias: gpt-oss's router bias, DeepSeek's e_score_correction_bias
    n_shared_experts: int = 0  # always-on experts of width n_shared_experts * moe_intermediate_size
    first_k_dense_replace: int = 0  # the first k layers are dense (DeepSeek-V3: 3)
    decoder_sparse_step: int = 1  # Qwen3-MoE: layer i is MoE when (i + 1) % step == 0
    mlp_only_layers: tuple[int, ...] = ()  # Qwen3-MoE: layers forced dense
    expert_bias: bool = False  # gpt-oss: biases on the experts' gate-up and down projections
    swiglu_limit: float = 0.0  # gpt-oss clamped SwiGLU: gate <= limit, |up| <= limit, (up + 1) * gate * sig(a*gate)
    swiglu_alpha: float = 1.702
    # --- multi-head latent attention (kv_lora_rank 0: standard attention with q/k/v heads)
    q_lora_rank: int = 0  # 0: q projected directly (no low-rank q)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0  # with MLA, head_dim is this (the RoPE dims); RoPE applied interleaved by DeepSeek
    v_head_dim: int = 0
    # --- gpt-oss attention
    attention_bias: bool = False  # biases on q, k, v and o projections
    attention_sinks: bool = False  # one learnt sink logit per head in the softmax denominator
    sliding_window: int = 0  # tokens a sliding layer attends (itself included); 0: none
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" | "sliding_attention"; (): all full
    source: str = field(default="preset", compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r} (model {self.name!r})")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"head_dim: not given and hidden_size {self.hidden_size} is not a multiple of "
                                 f"num_heads {self.num_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim: expected a positive even int, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads {self.num_heads}, got {self.num_kv_heads}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta: expected a positive finite float, got {self.rope_theta!r}")
        if self.architecture not in SUPPORTED_ARCHITECTURES.values():
            raise ValueError(f"architecture: expected one of {sorted(SUPPORTED_ARCHITECTURES.values())}, "
                             f"got {self.architecture!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, self.architecture)
        from tokprof.models.config_moe import check_moe_fields

        check_moe_fields(self)

    # ---------------------------------------------------------------------------------------------- derived sizes

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer` runs routed experts (else a dense MLP of intermediate_size), as transformers decides."""
        return (self.num_experts > 0 and layer >= self.first_k_dense_replace and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def is_sliding_layer(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def attended_tokens(self, layer: int, context: int) -> int:
        """KV tokens `layer` attends at `context` tokens: min(context, sliding_window) on a sliding layer."""
        return min(context, self.sliding_window) if self.is_sliding_layer(layer) else context

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def softmax_scale(self) -> float:
        """The attention softmax scale, as transformers applies it (see config_moe.softmax_scale)."""
        from tokprof.models.config_moe import softmax_scale

        return softmax_scale(self)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    def params_per_layer(self, layer: int | None = None, experts: int | None = None) -> int:
        """Parameters of one decoder layer. Dense models: every layer alike (`layer` ignored). MoE models: `layer`
        picks a dense or an MoE layer (None: the first MoE layer), and `experts` counts that many routed experts of
        it (None: all num_experts; num_experts_per_tok gives the parameters one token is computed with)."""
        from tokprof.models.config_moe import attention_params, mlp_params

        if layer is None:
            layer = next((i for i in range(self.num_layers) if self.is_moe_layer(i)), 0)
        return attention_params(self) + mlp_params(self, layer, experts) + 2 * self.hidden_size

    def _layers_params(self, experts: int | None) -> int:
        if not self.is_moe:
            return self.num_layers * self.params_per_layer()
        return sum(self.params_per_layer(i, experts) for i in range(self.num_layers))

    def num_params(self) -> int:
        """All parameters; the LM head counted once when tied to the embedding. DeepSeek's multi-token-prediction
        module (num_nextn_predict_layers) is not part of the decode model and not counted."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self._layers_params(None) + embed + head + self.hidden_size

    def active_params(self) -> int:
        """Parameters one token is computed with: num_experts_per_tok routed experts per MoE layer (shared experts,
        router and attention always), the LM head, not the embedding table (one row is read). Dense: num_params
        less the untied embedding, i.e. the flop-bearing weights (2 x active_params FLOP per token)."""
        k = self.num_experts_per_tok if self.is_moe else None
        return self._layers_params(k) + self.hidden_size + self.vocab_size * self.hidden_size

    def linear_weight_shapes(self) -> list[tuple[int, int, int]]:
        """(count, N, K) of the layers' linear weights (fused QKV, O, fused gate-up, down): the weights a low-precision
        format quantises. The LM head and the embedding stay in the activation dtype (tokprof.quant.precision)."""
        h, layers = self.hidden_size, self.num_layers
        return [(layers, self.q_size + 2 * self.kv_size, h), (layers, h, self.q_size),
                (layers, 2 * self.intermediate_size, h), (layers, h, self.intermediate_size)]

    def _stored_bytes(self, params: int, dtype: torch.dtype | str, experts: float | None = None) -> int:
        """Bytes of `params` parameters that include every layer's linear weights, in `dtype`: a torch dtype (every
        parameter that size) or a precision label ("bf16", "fp8", "mxfp4", "nvfp4+kv-fp8", ...: the linear weights
        in the format, scales included, the rest in the activation dtype). MoE/MLA models: the attention
        projections, dense MLPs and experts (`experts` routed ones per MoE layer, None: all) in the format
        (tokprof.models.config_moe.quantised_linear_shapes), routers, latent up-projections and the rest not."""
        if isinstance(dtype, torch.dtype):
            return params * torch.empty((), dtype=dtype).element_size()
        from tokprof.quant.formats import WEIGHT_FORMATS
        from tokprof.quant.precision import parse_precision

        precision = parse_precision(dtype)
        elem = _ELEMENT_BYTES[precision.activation]
        if precision.weight_format is None:
            return params * elem
        fmt = WEIGHT_FORMATS[precision.weight_format]
        if self.is_moe or self.is_mla:
            from tokprof.models.config_moe import quantised_linear_shapes

            shapes = quantised_linear_shapes(self, experts)
        else:
            shapes = self.linear_weight_shapes()
        linear_params = round(sum(count * n * k for count, n, k in shapes))
        return round(sum(count * fmt.weight_bytes(n, k) for count, n, k in shapes)) + (params - linear_params) * elem

    def weight_bytes(self, dtype: torch.dtype | str) -> int:
        """Bytes of all weights stored in `dtype` (a torch dtype or a precision label, see _stored_bytes)."""
        return self._stored_bytes(self.num_params(), dtype)

    def decode_weight_bytes(self, dtype: torch.dtype | str, experts_touched: float | None = None,
                            batch: int | None = None) -> int:
        """Weight bytes one decode step reads: every layer, the final norm and the LM head, but of the embedding
        table only the rows of the tokens (counted with activations, not here).

        MoE: `experts_touched` distinct routed experts per MoE layer (None: all num_experts, the bound a large
        batch reaches), or `batch`: the expected number for that many tokens under uniform routing
        (tokprof.models.plan_moe.expected_experts). Dense models ignore both."""
        if batch is not None and experts_touched is None and self.is_moe:
            from tokprof.models.plan_moe import expected_experts

            experts_touched = expected_experts(self.num_experts, self.num_experts_per_tok, batch)
        if experts_touched is not None and not (0 <= experts_touched <= max(self.num_experts, 0)):
            raise ValueError(f"experts_touched: expected a number in [0, num_experts={self.num_experts}], "
                             f"got {experts_touched!r}")
        layers = self._layers_params(None)
        if self.is_moe and experts_touched is not None:
            from tokprof.models.config_moe import expert_params

            layers -= round((self.num_experts - experts_touched) * expert_params(self)) * self.num_moe_layers
        return self._stored_bytes(layers + self.hidden_size + self.vocab_size * self.hidden_size, dtype,
                                  experts_touched if self.is_moe else None)

    def kv_elements_per_token_per_layer(self) -> int:
        """Cache elements one token takes in one layer: K and V heads, or MLA's one compressed latent row
        (kv_lora_rank + qk_rope_head_dim, shared by all heads)."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.kv_size

    def _kv_element_bytes(self, dtype: torch.dtype | str, kv_dtype: str | None = None) -> int:
        if isinstance(dtype, torch.dtype) and kv_dtype is None:
            return torch.empty((), dtype=dtype).element_size()
        from tokprof.quant.precision import parse_precision

        precision = parse_precision(dtype, kv_dtype=kv_dtype)
        return 1 if precision.kv_dtype == "fp8" else _ELEMENT_BYTES[precision.activation]

    def kv_bytes_per_token(self, dtype: torch.dtype | str, *, kv_dtype: str | None = None) -> int:
        """K and V (MLA: the latent row) of one token across all layers: in `dtype`'s element size (a torch dtype),
        or for a precision label one byte per element with an fp8 cache ("...+kv-fp8", or kv_dtype="fp8") and the
        activation dtype's size otherwise ("fp8" alone is W8A8 weights with a bf16 cache). Per-head fp8 scales are
        per layer, not per token, and left out. Sliding-window layers are counted too: this is the marginal cost of
        a token while the context fits the window, an upper bound beyond; capacity of a sliding-window model uses
        kv_bytes_per_sequence, which holds at most sliding_window tokens on those layers."""
        return self.num_layers * self.kv_elements_per_token_per_layer() * self._kv_element_bytes(dtype, kv_dtype)

    def kv_bytes_per_sequence(self, dtype: torch.dtype | str, context: int, *, kv_dtype: str | None = None) -> int:
        """KV bytes one sequence of `context` tokens holds: full layers every token, sliding layers at most
        sliding_window tokens (a serving engine frees what slid out of the window)."""
        tokens = sum(self.attended_tokens(i, context) for i in range(self.num_layers))
        return tokens * self.kv_elements_per_token_per_layer() * self._kv_element_bytes(dtype, kv_dtype)

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies (head_dim/2,) float32, with Llama 3.1 scaling applied when configured."""
        # fp32 throughout, in the order transformers computes it: a float64 version differs by 1 ulp in a third of
        # the Llama 3.1 frequencies, enough to break token-exact parity with transformers.
        d = self.head_dim
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if kind == "yarn":
            from tokprof.models.config_moe import yarn_inv_freq

            return yarn_inv_freq(self)
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d))
        if self.rope_scaling is not None:
            inv = _llama3_scale(inv, self.rope_scaling)
        return inv

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling is not None else None
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["layer_types"] = list(self.layer_types)
        return d

    # ---------------------------------------------------------------------------------------------- constructors

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"model: expected one of {sorted(PRESETS)}, got {name!r}; "
                             "or load a Hugging Face config.json with ModelConfig.from_hf(path)")
        return PRESETS[key]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown fields {unknown}; expected a subset of {sorted(known)}")
        d = dict(d)
        for key in ("mlp_only_layers", "layer_types"):  # JSON lists back to the frozen dataclass's tuples
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_hf(cls, config: str | Path | Mapping[str, Any], name: str | None = None) -> ModelConfig:
        """From a Hugging Face config.json: a path to the file, to its directory, or the parsed dict."""
        source = "dict"
        if not isinstance(config, Mapping):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ValueError(f"config: expected a config.json file or a directory holding one, got {str(config)!r}")
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"config: {path} is not valid JSON: {err}") from err
            source = str(path)
            name = name or path.parent.name
        return _from_hf_dict(config, name or "hf-model", source)


def _check_rope_scaling(scaling: Mapping[str, Any], architecture: str = "llama") -> None:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return
    if kind == "yarn" and architecture in ("deepseek_v3", "gpt_oss"):  # the families whose YaRN tokprof follows
        for key in ("factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise ValueError(f"rope_scaling.{key}: missing from the yarn rope scaling {dict(scaling)}")
        return
    if kind != "llama3":
        raise ValueError(f"rope_scaling.rope_type: expected 'llama3', 'yarn' or 'default', got {kind!r}")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise ValueError(f"rope_scaling.{key}: missing from the llama3 rope scaling {dict(scaling)}")
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"rope_scaling.{key}: expected a positive finite number, got {value!r}")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"rope_scaling: expected high_freq_factor > low_freq_factor, got "
                         f"{scaling['high_freq_factor']!r} and {scaling['low_freq_factor']!r}")


def _llama3_scale(inv_freq: torch.Tensor, s: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling, as in transformers' `_compute_llama3_parameters`."""
    if s.get("rope_type", s.get("type")) == "default":
        return inv_freq
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


MAX_HF_INT = 2**31 - 1  # no real model dimension comes near it; a larger value is a corrupt or hostile file
_HF_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings")


def _check_hf_types(hf: Any, source: str) -> None:
    """ValueError naming the field for a config.json whose values have the wrong type or range, before any is used:
    a top-level list, a size that is not a positive int (a list, a float such as 1e30, 0), settings that are not
    objects. A num_key_value_heads of 0 is refused, never read as "absent" (which would silently mean MHA)."""
    if not isinstance(hf, Mapping):
        raise ValueError(f"config: expected a JSON object (a Hugging Face config.json), got {type(hf).__name__} "
                         f"({source})")
    for key in _HF_INTS:
        value = hf.get(key)
        if value is None and key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            continue  # optional: absent or null means the documented default
        if key not in hf:
            continue  # required keys are reported as missing below
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_HF_INT:
            raise ValueError(f"{key}: expected a positive int up to {MAX_HF_INT}, got {value!r} ({source})")
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], Mapping):
            raise ValueError(f"{key}: expected an object or null, got {hf[key]!r} ({source})")
    if hf.get("architectures") is not None and not (isinstance(hf["architectures"], list) and
                                                     all(isinstance(a, str) for a in hf["architectures"])):
        raise ValueError(f"architectures: expected a list of names, got {hf['architectures']!r} ({source})")
    params = hf.get("rope_parameters") or {}
    for key, value in (("rope_theta", params.get("rope_theta", hf.get("rope_theta"))),
                       ("rms_norm_eps", hf.get("rms_norm_eps"))):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{key}: expected a positive finite number, got {value!r} ({source})")


def _from_hf_dict(hf: Mapping[str, Any], name: str, source: str) -> ModelConfig:
    _check_hf_types(hf, source)
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    arch = None
    for a in archs:
        arch = SUPPORTED_ARCHITECTURES.get(a)
        if arch:
            break
    if arch is None and model_type in SUPPORTED_ARCHITECTURES.values():
        arch = model_type
    if arch is None:
        raise ValueError(f"architectures: expected one of {sorted(SUPPORTED_ARCHITECTURES)} "
                         f"(or model_type llama/qwen3), got architectures={archs!r}, model_type={model_type!r}")
    if arch in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        from tokprof.models.config_moe import from_hf_moe

        return from_hf_moe(hf, arch, name, source)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"{key}: missing from the Hugging Face config ({source})")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("attention_bias/mlp_bias: biases are not supported (expected false)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: expected 'silu', got {hf.get('hidden_act')!r}")
    # Sliding-window layers attend a window, not the whole context: the plans and the Transformer do not model it.
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window: sliding-window attention is not supported (expected false)")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"layer_types: only full_attention layers are supported, got {sorted(layer_types)}")
    # Newer transformers spell RoPE settings as rope_parameters {"rope_theta", "rope_type", ...}.
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    if params and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // heads
    return ModelConfig(
        name=name,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(heads if hf.get("num_key_value_heads") is None else hf["num_key_value_heads"]),
        head_dim=int(head_dim),
        rope_theta=float(theta),
        rope_scaling=dict(scaling) if scaling else None,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=arch == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        architecture=arch,
        source=source,
    )


_LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}

# Published config.json values (Hugging Face model cards of meta-llama and Qwen, read 2026-11).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig("tiny", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                        max_position_embeddings=4096),
    "llama-3.2-1b": ModelConfig("llama-3.2-1b", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                                rope_scaling={**_LLAMA31_SCALING, "factor": 32.0}, rms_norm_eps=1e-5,
                                tie_word_embeddings=True, max_position_embeddings=131072),
    "llama-3.1-8b": ModelConfig("llama-3.1-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                                rope_scaling=_LLAMA31_SCALING, rms_norm_eps=1e-5, max_position_embeddings=131072),
    "llama-3.1-70b": ModelConfig("llama-3.1-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                 num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                                 rope_scaling=_LLAMA31_SCALING, rms_norm_eps=1e-5, max_position_embeddings=131072),
    # Llama 2 and Llama 3 (8B) for the published decode measurements (tokprof/data/published_decode.json):
    # config.json of meta-llama/Llama-2-{7b,13b,70b}-hf and meta-llama/Meta-Llama-3-8B on Hugging Face.
    "llama-2-7b": ModelConfig("llama-2-7b", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                              num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rope_theta=10000.0,
                              rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama-2-13b": ModelConfig("llama-2-13b", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                               num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128, rope_theta=10000.0,
                               rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama-2-70b": ModelConfig("llama-2-70b", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                               num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=10000.0,
                               rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama-3-8b": ModelConfig("llama-3-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                              rms_norm_eps=1e-5, max_position_embeddings=8192),
    "qwen3-8b": ModelConfig("qwen3-8b", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                            num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                            qk_norm=True, max_position_embeddings=40960, architecture="qwen3"),
    "qwen3-32b": ModelConfig("qwen3-32b", vocab_size=151936, hidden_size=5120, intermediate_size=25600,
                             num_layers=64, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
                             rms_norm_eps=1e-6, qk_norm=True, max_position_embeddings=40960, architecture="qwen3"),
}


from tokprof.models.config_moe import MOE_PRESETS  # noqa: E402 - config_moe builds on ModelConfig above

PRESETS.update(MOE_PRESETS)


def with_overrides(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    return replace(cfg, **changes)
