"""Plans of mixture-of-experts and latent-attention models (Qwen3-MoE, DeepSeek-V3/R1, gpt-oss): the kernel calls of
one decode (or prefill) step, exactly as tokprof's Transformer runs them. tokprof.models.plan.decode_plan and
prefill_plan hand these models over to this module.

Per layer, after the input norm:

- standard attention (Qwen3-MoE, gpt-oss): the dense path (fused QKV GEMM, q/k norm, RoPE, KV append, paged attention,
  O GEMM); gpt-oss adds bias_add after the QKV and O GEMMs and the attention call carries `sinks` and, on a
  sliding layer, `window` (its cost counts min(context, sliding_window) tokens);
- MLA (DeepSeek-V3), absorbed: q_a GEMM, q_a norm, q_b GEMM (or one q GEMM without q_lora_rank), kv_a GEMM (latent)
  and k_rope GEMM, kv_a norm, RoPE on the rope dims (one shared key "head"), the absorbed query
  q_nope . W_UK (batched_linear, per head), the latent row appended to the paged cache (append_mla_kv),
  mla_decode_attention over the latent rows, W_UV (batched_linear), O GEMM;
- then the post-attention norm and the MLP: dense (gate-up GEMM, SwiGLU, down GEMM) on dense layers; on MoE
  layers the router GEMM, moe_router (top-k ids and weights on the device) and fused_moe. Shared experts run
  inside fused_moe as extra experts that every token takes with weight 1 (as SGLang's shared-expert fusion does).

Which experts a decode step reads. fused_moe reads the weights of the experts the batch's tokens chose, each once.
The plan's fused_moe call carries `active_experts`, the expected number of distinct routed experts per layer
(shared ones added), from one of two sources:

- `routing=None`: uniform routing, every token choosing k of the E experts uniformly at random and independently
  of the others: E x (1 - (1 - k/E)^B) for B tokens. An assumption: trained routers are skewed (fewer distinct
  experts at a batch) and correlated across tokens of a sequence.
- `routing=RoutingCounts`: a measured histogram per MoE layer (how often each expert was chosen, over how many
  tokens; Transformer.routing_counts() records it from a real run), giving sum_e 1 - (1 - q_e)^B with q_e the
  fraction of tokens that chose expert e; tokens still independent of each other.

Low-precision weights (tokprof.quant.precision.apply_precision, as for dense plans): the attention and dense-MLP
linears become the format's ops (linear_fp8, linear_nvfp4, ...), fused_moe carries the experts' format in its shape
key `wfmt` (its cost counts the expert weights in that format, its FLOPs meet that format's math roof); routers,
the LM head, the embedding and MLA's absorbed up-projections (batched_linear) stay in the activation dtype.

Expert parallelism (experts split over EP ranks, dispatch/combine all-to-all) is not planned here: the MoE block
is one function (`_moe_mlp`) so that an EP variant can replace its calls with per-rank ones and collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokprof.kernels._common import cdiv
from tokprof.models.config import ModelConfig
from tokprof.models.plan import PlanBuilder


def expected_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts that `tokens` tokens touch when each picks `top_k` of `num_experts` uniformly at
    random, independently: E x (1 - (1 - k/E)^B)."""
    if num_experts <= 0 or not 0 < top_k <= num_experts or tokens < 0:
        raise ValueError(f"num_experts/top_k/tokens: expected 0 < top_k <= num_experts and tokens >= 0, got "
                         f"{num_experts}/{top_k}/{tokens}")
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


@dataclass
class RoutingCounts:
    """A measured routing histogram: for each MoE layer (in layer order) how many of `tokens` tokens chose each
    expert. From Transformer.routing_counts() after a real run; saved as plain lists."""

    counts: list[list[int]]  # per MoE layer, per routed expert: tokens that chose it
    tokens: int  # tokens routed per layer
    source: str = "measured"

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens <= 0:
            raise ValueError(f"tokens: expected a positive int, got {self.tokens!r}")
        for i, row in enumerate(self.counts):
            if any(c < 0 or c > self.tokens for c in row):
                raise ValueError(f"counts[{i}]: expected counts in [0, tokens={self.tokens}], got {row}")

    def expected_experts(self, layer: int, batch: int) -> float:
        """Expected distinct experts of MoE layer `layer` (its index among MoE layers) for `batch` tokens."""
        return sum(1.0 - (1.0 - c / self.tokens) ** batch for c in self.counts[layer])

    def check(self, config: ModelConfig) -> None:
        if len(self.counts) != config.num_moe_layers or any(len(r) != config.num_experts for r in self.counts):
            raise ValueError(f"routing: expected {config.num_moe_layers} MoE layers x {config.num_experts} experts "
                             f"for {config.name}, got {len(self.counts)} layers x "
                             f"{sorted({len(r) for r in self.counts})} experts")

    def to_dict(self) -> dict[str, object]:
        return {"counts": [list(r) for r in self.counts], "tokens": self.tokens, "source": self.source}


def active_experts(config: ModelConfig, moe_layer: int, tokens: int, routing: RoutingCounts | None) -> int:
    """Distinct experts (routed, rounded to the nearest whole expert, plus the shared ones) that fused_moe reads."""
    if routing is None:
        routed = expected_experts(config.num_experts, config.num_experts_per_tok, tokens)
    else:
        routed = routing.expected_experts(moe_layer, tokens)
    routed = min(config.num_experts, max(config.num_experts_per_tok, math.floor(routed + 0.5)))
    return routed + config.n_shared_experts


# ------------------------------------------------------------------------------------------------------ the layers

def _standard_attention(b: PlanBuilder, c: ModelConfig, layer: int, tokens: int, context: int, kv_blocks: int,
                        block_size: int, prefill: tuple[int, int] | None) -> None:
    h, d, hq, hkv = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads
    b.add("linear", "qkv_proj", 1, M=tokens, N=c.q_size + 2 * c.kv_size, K=h)
    if c.attention_bias:
        b.add("bias_add", "qkv_bias", 1, T=tokens, N=c.q_size + 2 * c.kv_size)
    if c.qk_norm:
        b.add("rms_norm", "q_norm", 1, T=tokens * hq, H=d, residual=0)
        b.add("rms_norm", "k_norm", 1, T=tokens * hkv, H=d, residual=0)
    b.add("rope", "rope", 1, T=tokens, Hq=hq, Hkv=hkv, D=d)
    b.add("append_kv", "append_kv", 1, T=tokens, Hkv=hkv, D=d, block_size=block_size, num_blocks=kv_blocks)
    extra = {}  # gpt-oss: sink logits; a sliding layer reads min(context, window) tokens (the op's cost does that)
    if c.attention_sinks:
        extra["sinks"] = 1
    if c.is_sliding_layer(layer):
        extra["window"] = c.sliding_window
    if prefill is None:
        b.add("decode_attention", "attention", 1, B=tokens, Hq=hq, Hkv=hkv, D=d, context=context,
              block_size=block_size, **extra)
    else:
        batch, seq = prefill
        b.add("prefill_attention", "attention", 1, B=batch, Hq=hq, Hkv=hkv, S=seq, D=d, causal=1, **extra)
    b.add("linear", "o_proj", 1, M=tokens, N=h, K=c.q_size)
    if c.attention_bias:
        b.add("bias_add", "o_bias", 1, T=tokens, N=h)


def _mla_attention(b: PlanBuilder, c: ModelConfig, tokens: int, context: int, kv_blocks: int, block_size: int,
                   prefill: tuple[int, int] | None) -> None:
    h, heads, lat, r = c.hidden_size, c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim
    nope, v = c.qk_nope_head_dim, c.v_head_dim
    q_out = heads * (nope + r)
    if c.q_lora_rank:
        b.add("linear", "q_a_proj", 1, M=tokens, N=c.q_lora_rank, K=h)
        b.add("rms_norm", "q_a_norm", 1, T=tokens, H=c.q_lora_rank, residual=0)
        b.add("linear", "q_b_proj", 1, M=tokens, N=q_out, K=c.q_lora_rank)
    else:
        b.add("linear", "q_proj", 1, M=tokens, N=q_out, K=h)
    b.add("linear", "kv_a_proj", 1, M=tokens, N=lat, K=h)
    b.add("linear", "k_rope_proj", 1, M=tokens, N=r, K=h)
    b.add("rms_norm", "kv_a_norm", 1, T=tokens, H=lat, residual=0)
    b.add("rope", "rope", 1, T=tokens, Hq=heads, Hkv=1, D=r)
    b.add("batched_linear", "q_absorb", 1, M=tokens, G=heads, N=lat, K=nope)
    b.add("append_mla_kv", "append_kv", 1, T=tokens, L=lat, R=r, block_size=block_size, num_blocks=kv_blocks)
    if prefill is None:
        b.add("mla_decode_attention", "attention", 1, B=tokens, H=heads, L=lat, R=r, context=context,
              block_size=block_size)
    else:
        batch, seq = prefill
        b.add("mla_prefill_attention", "attention", 1, B=batch, H=heads, S=seq, L=lat, R=r, causal=1)
    b.add("batched_linear", "v_up", 1, M=tokens, G=heads, N=v, K=lat)
    b.add("linear", "o_proj", 1, M=tokens, N=h, K=heads * v)


def router_shape(c: ModelConfig, tokens: int) -> dict[str, int]:
    return {"T": tokens, "E": c.num_experts, "k": c.num_experts_per_tok, "n_group": c.n_group,
            "topk_group": c.topk_group}


def fused_moe_shape(c: ModelConfig, tokens: int, touched: int) -> dict[str, int]:
    """fused_moe over the routed experts plus the shared ones (every token takes those too)."""
    shape = {"T": tokens, "E": c.num_experts + c.n_shared_experts, "k": c.num_experts_per_tok + c.n_shared_experts,
             "H": c.hidden_size, "I": c.moe_intermediate_size, "active_experts": touched}
    if c.expert_bias:  # gpt-oss: clamped SwiGLU and expert biases
        shape["gpt_oss"] = 1
    return shape


def _moe_mlp(b: PlanBuilder, c: ModelConfig, moe_layer: int, tokens: int, routing: RoutingCounts | None) -> None:
    b.add("linear", "router", 1, M=tokens, N=c.num_experts, K=c.hidden_size)
    if c.router_bias and c.architecture == "gpt_oss":  # DeepSeek's bias is moe_router's selection bias instead
        b.add("bias_add", "router_bias", 1, T=tokens, N=c.num_experts)
    b.add("moe_router", "moe_router", 1, **router_shape(c, tokens))
    b.add("fused_moe", "experts", 1, **fused_moe_shape(c, tokens, active_experts(c, moe_layer, tokens, routing)))


def _dense_mlp(b: PlanBuilder, c: ModelConfig, tokens: int) -> None:
    i = c.intermediate_size
    b.add("linear", "gate_up_proj", 1, M=tokens, N=2 * i, K=c.hidden_size)
    b.add("swiglu", "swiglu", 1, T=tokens, I=i)
    b.add("linear", "down_proj", 1, M=tokens, N=c.hidden_size, K=i)


def moe_layer_calls(b: PlanBuilder, c: ModelConfig, tokens: int, context: int, kv_blocks: int, block_size: int,
                    routing: RoutingCounts | None, prefill: tuple[int, int] | None = None) -> None:
    """Every decoder layer of an MoE/MLA model for `tokens` tokens in flight (prefill: (batch, prompt_len))."""
    moe_index = 0
    for layer in range(c.num_layers):
        b.add("rms_norm", "input_norm", 1, T=tokens, H=c.hidden_size, residual=int(layer > 0))
        if c.is_mla:
            _mla_attention(b, c, tokens, context, kv_blocks, block_size, prefill)
        else:
            _standard_attention(b, c, layer, tokens, context, kv_blocks, block_size, prefill)
        b.add("rms_norm", "post_attn_norm", 1, T=tokens, H=c.hidden_size, residual=1)
        if c.is_moe_layer(layer):
            _moe_mlp(b, c, moe_index, tokens, routing)
            moe_index += 1
        else:
            _dense_mlp(b, c, tokens)


def check_supported(c: ModelConfig, tp: int, precision: object = None) -> None:
    """ValueError unless the plan can be built: a KV cache in the activation dtype (weights may be in a
    low-precision format: tokprof.quant.precision.apply_precision rewrites the linears and fused_moe); tp / ep are
    checked by tokprof.models.plan_moe_parallel.check_parallel."""
    # an fp8 cache of standard attention is the dense one (append_kv_fp8, decode_attention_fp8kv); MLA's latent
    # cache and gpt-oss's sinks / sliding windows have no fp8 op yet
    special = c.is_mla or c.attention_sinks or any(c.is_sliding_layer(i) for i in range(c.num_layers))
    if precision is not None and getattr(precision, "kv_dtype", None) and special:
        raise ValueError(f"kv_dtype: an fp8 KV cache of {c.name} is not planned yet (no fp8 form of the MLA latent "
                         f"cache, attention sinks or sliding windows); use --kv-dtype auto, got "
                         f"{getattr(precision, 'label', precision)!r}")


def moe_decode_calls(b: PlanBuilder, c: ModelConfig, batch: int, context: int, block_size: int,
                     routing: RoutingCounts | None) -> None:
    if routing is not None:
        routing.check(c)
    moe_layer_calls(b, c, batch, context, batch * cdiv(context, block_size), block_size, routing)


def moe_prefill_calls(b: PlanBuilder, c: ModelConfig, batch: int, prompt_len: int, block_size: int,
                      routing: RoutingCounts | None) -> None:
    if routing is not None:
        routing.check(c)
    moe_layer_calls(b, c, batch * prompt_len, prompt_len, batch * cdiv(prompt_len, block_size), block_size, routing,
                    prefill=(batch, prompt_len))
