"""Tensor and expert parallelism for the MoE / MLA / sliding-window decode plans of tokprof.models.plan_moe.

The calls ONE GPU runs in one decode step, collectives included (op "all_reduce" / "all_gather" / "all_to_all",
shape {"bytes", "world"}, bytes = the nccl-tests message size in the activation dtype):

  tp > 1, ep = 1   attention heads sharded (standard: Hq/tp, KV heads as tokprof.models.tp; MLA: heads/tp in
                   q_b_proj, q_absorb, attention, v_up and o_proj; the low-rank q_a/kv_a/k_rope projections are
                   replicated, and the latent KV cache, one "head", is REPLICATED on every TP rank: each rank appends
                   and reads the whole latent row), o_proj row-parallel + all-reduce of (B, hidden); dense MLPs
                   column/row-parallel + all-reduce; the MoE block TP-sharded: every rank holds every expert with
                   intermediate/tp and the all-reduce follows; LM head vocab-parallel + all-gather of the logits.
  ep > 1, tp = ep  attention as above on the same B tokens; each rank holds E/ep routed experts and runs the
                   B x k / ep token-slots routed to them (uniform routing), the shared experts with intermediate/tp;
                   the tokens are already on every rank, so the combine is the all-reduce of (B, hidden).
  ep > 1, tp = 1,  data-parallel attention across the EP group (as DeepSeek and SGLang serve R1): `batch` is the
  dp_attention    batch OF THIS RANK; attention, dense layers, shared experts and LM head are whole on each rank;
                   the MoE block sends each token's hidden vector to the ranks of its k experts (dispatch all-to-all)
                   and back (combine all-to-all): bytes = batch x top_k x hidden x dtype bytes each, per MoE layer,
                   the send buffer of the rank; (ep-1)/ep of it crosses to other ranks (the nccl-tests alltoall
                   busbw factor), the rest stays local. Each rank runs the B x k token-slots it receives (the
                   group's ep x B x k slots spread evenly) over its E/ep experts, touching the expected distinct
                   local experts (E/ep) x (1 - (1 - k/E)^(ep x B)) under uniform routing.
"""

from __future__ import annotations

import math

from tokprof.kernels._common import cdiv
from tokprof.models.config import ModelConfig
from tokprof.models.plan import PlanBuilder
from tokprof.models.plan_moe import RoutingCounts, expected_experts, router_shape


def check_parallel(c: ModelConfig, tp: int, ep: int, dp_attention: bool) -> None:
    """ValueError unless the MoE/MLA model shards over tp / ep as this module plans it."""
    for name, value in (("tp", tp), ("ep", ep)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if ep > 1:
        if not c.is_moe:
            raise ValueError(f"ep: expert parallelism needs an MoE model, {c.name} has no experts; got ep={ep}")
        if c.num_experts % ep:
            raise ValueError(f"ep: expected a divisor of num_experts {c.num_experts} ({c.name}), got ep={ep}")
        if dp_attention and tp != 1:
            raise ValueError(f"tp: with dp_attention the attention is data-parallel over the EP group; expected "
                             f"tp=1, got tp={tp}")
        if not dp_attention and tp != ep:
            raise ValueError(f"ep: without dp_attention the EP group is the TP group; expected ep == tp={tp}, "
                             f"got ep={ep}")
    elif dp_attention:
        raise ValueError(f"dp_attention: data-parallel attention spreads the batch over an EP group; expected "
                         f"ep > 1, got ep={ep}")
    if tp > 1:
        if c.num_heads % tp:
            raise ValueError(f"tp: expected a divisor of num_heads {c.num_heads} ({c.name}), got tp={tp}")
        if not c.is_mla:
            from tokprof.models.tp import kv_heads_per_gpu

            kv_heads_per_gpu(c, tp)
        if c.intermediate_size % tp:
            raise ValueError(f"tp: expected a divisor of intermediate_size {c.intermediate_size} ({c.name}), "
                             f"got tp={tp}")
        if c.is_moe and c.moe_intermediate_size % tp:
            raise ValueError(f"tp: expected a divisor of moe_intermediate_size {c.moe_intermediate_size} "
                             f"({c.name}), got tp={tp}")


def all_to_all_bytes(tokens: int, hidden: int, top_k: int, elem_bytes: int) -> int:
    """Send-buffer bytes of one dispatch (or combine) all-to-all of a rank: tokens x top_k x hidden x dtype bytes.
    (ep-1)/ep of it goes to other ranks (busbw factor); the systems model's all_to_all_us takes the same figure."""
    return tokens * top_k * hidden * elem_bytes


def local_active_experts(c: ModelConfig, ep: int, group_tokens: int, routing: RoutingCounts | None,
                         moe_layer: int) -> int:
    """Distinct routed experts of ONE rank (E/ep of them) touched by the group's tokens, whole, at least 1."""
    if routing is None:
        routed = expected_experts(c.num_experts, c.num_experts_per_tok, group_tokens)
    else:
        routed = routing.expected_experts(moe_layer, group_tokens)
    local = c.num_experts // ep
    return min(local, max(1, math.floor(routed / ep + 0.5)))


def _attention(b: PlanBuilder, c: ModelConfig, layer: int, tokens: int, context: int, block_size: int,
               tp: int, elem_bytes: int) -> None:
    h = c.hidden_size
    kv_blocks = tokens * cdiv(context, block_size)
    if c.is_mla:
        heads, lat, r = c.num_heads // tp, c.kv_lora_rank, c.qk_rope_head_dim
        q_out = heads * (c.qk_nope_head_dim + r)
        if c.q_lora_rank:
            b.add("linear", "q_a_proj", 1, M=tokens, N=c.q_lora_rank, K=h)
            b.add("rms_norm", "q_a_norm", 1, T=tokens, H=c.q_lora_rank, residual=0)
            b.add("linear", "q_b_proj", 1, M=tokens, N=q_out, K=c.q_lora_rank)
        else:
            b.add("linear", "q_proj", 1, M=tokens, N=q_out, K=h)
        b.add("linear", "kv_a_proj", 1, M=tokens, N=lat, K=h)  # replicated: the latent row is every head's
        b.add("linear", "k_rope_proj", 1, M=tokens, N=r, K=h)
        b.add("rms_norm", "kv_a_norm", 1, T=tokens, H=lat, residual=0)
        b.add("rope", "rope", 1, T=tokens, Hq=heads, Hkv=1, D=r)
        b.add("batched_linear", "q_absorb", 1, M=tokens, G=heads, N=lat, K=c.qk_nope_head_dim)
        b.add("append_mla_kv", "append_kv", 1, T=tokens, L=lat, R=r, block_size=block_size, num_blocks=kv_blocks)
        b.add("mla_decode_attention", "attention", 1, B=tokens, H=heads, L=lat, R=r, context=context,
              block_size=block_size)
        b.add("batched_linear", "v_up", 1, M=tokens, G=heads, N=c.v_head_dim, K=lat)
        b.add("linear", "o_proj", 1, M=tokens, N=h, K=heads * c.v_head_dim)
    else:
        from tokprof.models.tp import kv_heads_per_gpu

        d, hq = c.head_dim, c.num_heads // tp
        hkv = kv_heads_per_gpu(c, tp) if tp > 1 else c.num_kv_heads
        b.add("linear", "qkv_proj", 1, M=tokens, N=(hq + 2 * hkv) * d, K=h)
        if c.attention_bias:
            b.add("bias_add", "qkv_bias", 1, T=tokens, N=(hq + 2 * hkv) * d)
        if c.qk_norm:
            b.add("rms_norm", "q_norm", 1, T=tokens * hq, H=d, residual=0)
            b.add("rms_norm", "k_norm", 1, T=tokens * hkv, H=d, residual=0)
        b.add("rope", "rope", 1, T=tokens, Hq=hq, Hkv=hkv, D=d)
        b.add("append_kv", "append_kv", 1, T=tokens, Hkv=hkv, D=d, block_size=block_size, num_blocks=kv_blocks)
        extra = {}
        if c.attention_sinks:
            extra["sinks"] = 1
        if c.is_sliding_layer(layer):
            extra["window"] = c.sliding_window
        b.add("decode_attention", "attention", 1, B=tokens, Hq=hq, Hkv=hkv, D=d, context=context,
              block_size=block_size, **extra)
        b.add("linear", "o_proj", 1, M=tokens, N=h, K=hq * d)
        if c.attention_bias:
            b.add("bias_add", "o_bias", 1, T=tokens, N=h)
    if tp > 1:
        b.add("all_reduce", "o_proj_all_reduce", 1, bytes=tokens * h * elem_bytes, world=tp)


def _moe(b: PlanBuilder, c: ModelConfig, moe_layer: int, tokens: int, tp: int, ep: int, dp_attention: bool,
         routing: RoutingCounts | None, elem_bytes: int) -> None:
    h, k = c.hidden_size, c.num_experts_per_tok
    b.add("linear", "router", 1, M=tokens, N=c.num_experts, K=h)  # replicated: every rank routes its tokens
    if c.router_bias and c.architecture == "gpt_oss":
        b.add("bias_add", "router_bias", 1, T=tokens, N=c.num_experts)
    b.add("moe_router", "moe_router", 1, **router_shape(c, tokens))
    extra = {"gpt_oss": 1} if c.expert_bias else {}
    if ep == 1:  # TP-sharded experts: all E (+ shared) on every rank with intermediate/tp
        from tokprof.models.plan_moe import active_experts

        touched = active_experts(c, moe_layer, tokens, routing)
        b.add("fused_moe", "experts", 1, T=tokens, E=c.num_experts + c.n_shared_experts,
              k=k + c.n_shared_experts, H=h, I=c.moe_intermediate_size // tp, active_experts=touched, **extra)
    else:
        group_tokens = tokens * ep if dp_attention else tokens
        slots = cdiv(group_tokens * k, ep)  # token-slots this rank's experts run (uniform routing)
        a2a = all_to_all_bytes(tokens, h, k, elem_bytes)
        if dp_attention:
            b.add("all_to_all", "moe_dispatch", 1, bytes=a2a, world=ep)
        local = c.num_experts // ep
        b.add("fused_moe", "experts", 1, T=slots, E=local, k=1, H=h, I=c.moe_intermediate_size,
              active_experts=local_active_experts(c, ep, group_tokens, routing, moe_layer), **extra)
        if c.n_shared_experts:  # every token's shared experts, with intermediate/tp (whole under dp_attention)
            shared_i = c.moe_intermediate_size * c.n_shared_experts // tp
            b.add("linear", "shared_gate_up", 1, M=tokens, N=2 * shared_i, K=h)
            b.add("swiglu", "shared_swiglu", 1, T=tokens, I=shared_i)
            b.add("linear", "shared_down", 1, M=tokens, N=h, K=shared_i)
        if dp_attention:
            b.add("all_to_all", "moe_combine", 1, bytes=a2a, world=ep)
    if tp > 1:
        b.add("all_reduce", "moe_all_reduce", 1, bytes=tokens * h * elem_bytes, world=tp)


def parallel_decode_calls(b: PlanBuilder, c: ModelConfig, batch: int, context: int, block_size: int,
                          routing: RoutingCounts | None, tp: int, ep: int, dp_attention: bool,
                          elem_bytes: int) -> None:
    """The per-GPU calls of one decode step at (tp, ep, dp_attention) into `b` (module docstring); `batch` is
    the TP group's batch, or this rank's batch with dp_attention."""
    check_parallel(c, tp, ep, dp_attention)
    if routing is not None:
        routing.check(c)
    h = c.hidden_size
    b.add("embedding", "embedding", 1, T=batch, V=c.vocab_size, H=h)
    moe_index = 0
    for layer in range(c.num_layers):
        b.add("rms_norm", "input_norm", 1, T=batch, H=h, residual=int(layer > 0))
        _attention(b, c, layer, batch, context, block_size, tp, elem_bytes)
        b.add("rms_norm", "post_attn_norm", 1, T=batch, H=h, residual=1)
        if c.is_moe_layer(layer):
            _moe(b, c, moe_index, batch, tp, ep, dp_attention, routing, elem_bytes)
            moe_index += 1
        else:
            i = c.intermediate_size // tp
            b.add("linear", "gate_up_proj", 1, M=batch, N=2 * i, K=h)
            b.add("swiglu", "swiglu", 1, T=batch, I=i)
            b.add("linear", "down_proj", 1, M=batch, N=h, K=i)
            if tp > 1:
                b.add("all_reduce", "down_proj_all_reduce", 1, bytes=batch * h * elem_bytes, world=tp)
    b.add("rms_norm", "final_norm", 1, T=batch, H=h, residual=1)
    vocab_shard = cdiv(c.vocab_size, tp)
    b.add("linear", "lm_head", 1, M=batch, N=vocab_shard, K=h)
    if tp > 1:
        b.add("all_gather", "logits_all_gather", 1, bytes=batch * vocab_shard * tp * elem_bytes, world=tp)
    b.add("greedy_sample", "sample", 1, B=batch, V=c.vocab_size)


def weight_bytes_per_gpu(c: ModelConfig, dtype: str, tp: int = 1, ep: int = 1, dp_attention: bool = False) -> int:
    """Parameter bytes ONE GPU holds, sharded as the plans above run: ModelConfig.weight_bytes(dtype) (every expert
    resident) less, per layer, the attention heads' share (MLA: q_b, kv_b and o_proj over tp; the low-rank q_a and
    kv_a projections replicated; standard: QKV and O as tokprof.models.tp), the dense MLPs' and shared experts'
    (tp-1)/tp, the routed experts' (ep-1)/ep (ep > 1) or (tp-1)/tp (TP-sharded experts), and the LM head's
    vocab-parallel share; router, norms and embedding replicated. dp_attention: tp is 1, attention whole.
    `dtype` a float dtype or a precision label ("fp8": the weights' format, bytes per parameter its average)."""
    from tokprof.models.config_moe import expert_params

    check_parallel(c, tp, ep, dp_attention)
    h, layers, moe_layers = c.hidden_size, c.num_layers, c.num_moe_layers
    full = c.weight_bytes(dtype)
    # bytes per parameter: the dtype's, or with a low-precision label (tokprof.quant.precision) the model's average
    # in that format (scales included; the embedding and LM head in the activation dtype pull it up slightly)
    elem = full / c.num_params()
    saved = 0  # parameters NOT on this GPU
    if tp > 1:
        if c.is_mla:
            qk = c.qk_nope_head_dim + c.qk_rope_head_dim
            q = (c.q_lora_rank or h) * c.num_heads * qk
            sharded = q + c.kv_lora_rank * c.num_heads * (c.qk_nope_head_dim + c.v_head_dim) \
                + c.num_heads * c.v_head_dim * h
            saved += layers * (sharded - sharded // tp)
        else:
            from tokprof.models.tp import kv_heads_per_gpu

            d = c.head_dim
            whole = 2 * h * c.q_size + 2 * h * c.kv_size
            mine = 2 * h * (c.num_heads // tp) * d + 2 * h * kv_heads_per_gpu(c, tp) * d
            saved += layers * (whole - mine)
        dense_mlp = (layers - moe_layers) * 3 * h * c.intermediate_size
        shared = moe_layers * 3 * h * c.moe_intermediate_size * c.n_shared_experts
        saved += (dense_mlp + shared) - (dense_mlp + shared) // tp
        if not c.tie_word_embeddings:
            saved += (c.vocab_size - cdiv(c.vocab_size, tp)) * h
    if c.is_moe:
        experts = moe_layers * c.num_experts * expert_params(c)
        split = ep if ep > 1 else tp
        saved += experts - experts // split
    return full - round(saved * elem)
