"""Plans: the kernel calls of one decode (or prefill) step of a model, deduplicated, with counts.

    plan = decode_plan(ModelConfig.from_name("llama-3.1-8b"), batch=8, context=4096, dtype="bf16")
    flops, min_bytes = plan_totals(plan)

The decode step has exactly the structure the Transformer of tokprof.models runs, so the kernel sum and the
end-to-end run execute the same calls: embedding; per layer input norm (fused residual add from layer 1 on), fused
QKV projection, q/k norm (Qwen3), RoPE, KV append, paged decode attention, O projection, post-attention norm, fused
gate-up projection, SwiGLU, down projection; final norm, LM head, greedy sampling. Calls with the same op, shape
and dtype are merged into one entry (counts added, labels kept), so each distinct call is measured once and its
time multiplied by its count.

With tp > 1, decode_plan is the plan of ONE GPU of a tensor-parallel group (tokprof.models.tp.tp_decode_calls):
sharded heads and MLP columns, plus the collectives (op "all_reduce" / "all_gather", shape {"bytes", "world"}),
which are not kernel-registry ops: plan_totals leaves them out (tokprof.models.tp.tp_totals counts their bytes),
and they are timed by tokprof.profiler.collectives. Prefill plans are single-GPU only.

Mixture-of-experts, latent-attention and sliding-window models (Qwen3-MoE, DeepSeek-V3/R1, gpt-oss) are planned by
tokprof.models.plan_moe (single GPU for now), with the expected number of distinct experts a batch reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tokprof.kernels._common import cdiv, parse_dtype
from tokprof.models.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16  # tokens per KV page, the Transformer's default too
# The collectives of a tensor-parallel plan: KernelCalls with shape {"bytes", "world"}, not kernel-registry ops.
COLLECTIVE_OPS = ("all_reduce", "all_gather", "all_to_all")


@dataclass
class KernelCall:
    """One distinct kernel call of a step: `count` calls per step of `op` at `shape` in `dtype`."""

    op: str
    shape: dict[str, int]
    dtype: str  # "fp32" | "fp16" | "bf16"
    count: int
    labels: list[str] = field(default_factory=list)  # where in the model it runs: "qkv_proj", "o_proj", ...

    def key(self) -> tuple[str, tuple[tuple[str, int], ...], str]:
        return (self.op, tuple(sorted(self.shape.items())), self.dtype)

    @property
    def label(self) -> str:
        return "+".join(self.labels)

    def cost(self) -> tuple[int, int]:
        """(flops, min_bytes) of ONE call, from the op's registry cost formula."""
        return op_cost(self.op, self.shape, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "shape": dict(self.shape), "dtype": self.dtype, "count": self.count,
                "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KernelCall:
        return cls(op=d["op"], shape=dict(d["shape"]), dtype=d["dtype"], count=int(d["count"]),
                   labels=list(d.get("labels", [])))


def op_cost(op: str, shape: Mapping[str, int], dtype: str | torch.dtype) -> tuple[int, int]:
    """(flops, min_bytes) of one call of `op`; ValueError when the op is not in the kernel registry."""
    from tokprof.kernels import OPS

    if op in COLLECTIVE_OPS:
        raise ValueError(f"op: {op!r} is a collective, not a kernel-registry op; time it with "
                         "tokprof.profiler.collectives (tokprof.models.tp.tp_totals counts its message bytes)")
    if op not in OPS:
        raise ValueError(f"op: {op!r} is not in the kernel registry tokprof.kernels.OPS (has {sorted(OPS)})")
    return OPS[op].cost(dict(shape), parse_dtype(dtype))


def plan_totals(plan: list[KernelCall]) -> tuple[int, int]:
    """(flops, min_bytes) of the step's kernels: the sum over entries of count x the call's cost. Collectives (tp > 1
    plans) move their bytes over the interconnect, not through a kernel's HBM roofline: they are left out here."""
    flops = min_bytes = 0
    for call in plan:
        if call.op in COLLECTIVE_OPS:
            continue
        f, b = call.cost()
        flops += call.count * f
        min_bytes += call.count * b
    return flops, min_bytes


class PlanBuilder:
    """Collects calls in step order and merges repeats of the same (op, shape, dtype): counts added, labels kept.
    Used by the plans here and the tensor-parallel plans of tp.py."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.calls: dict[tuple[Any, ...], KernelCall] = {}

    def add(self, op: str, label: str, count: int = 1, **shape: int) -> None:
        call = KernelCall(op=op, shape=dict(shape), dtype=self.dtype, count=count, labels=[label])
        key = call.key()
        if key in self.calls:
            merged = self.calls[key]
            merged.count += count
            if label not in merged.labels:
                merged.labels.append(label)
        else:
            self.calls[key] = call

    def plan(self) -> list[KernelCall]:
        return list(self.calls.values())


def _check_args(config: ModelConfig, batch: int, tokens: int, tokens_name: str, tp: int, block_size: int,
                tp_supported: bool) -> None:
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config: expected a ModelConfig (ModelConfig.from_name or from_hf), got "
                         f"{type(config).__name__}")
    for name, value in (("batch", batch), (tokens_name, tokens), ("block_size", block_size), ("tp", tp)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if tokens > config.max_position_embeddings:
        raise ValueError(f"{tokens_name}: expected at most the model's max_position_embeddings "
                         f"{config.max_position_embeddings} ({config.name}), got {tokens}")
    if tp != 1 and not tp_supported:
        raise ValueError(f"tp: prefill plans are single-GPU (tp=1); tensor-parallel plans cover the decode step "
                         f"(decode_plan(..., tp=N), tokprof.models.tp), got tp={tp}")


def _layer_calls(b: PlanBuilder, config: ModelConfig, tokens: int, attention: tuple[str, dict[str, int]],
                 kv_blocks: int, block_size: int) -> None:
    """All layers for `tokens` tokens in flight; `attention` is the attention op and its shape."""
    h, d = config.hidden_size, config.head_dim
    hq, hkv = config.num_heads, config.num_kv_heads
    layers = config.num_layers
    # layer 0 normalises the embedding output; from layer 1 on the norm also adds the residual stream
    b.add("rms_norm", "input_norm", 1, T=tokens, H=h, residual=0)
    if layers > 1:
        b.add("rms_norm", "input_norm", layers - 1, T=tokens, H=h, residual=1)
    b.add("linear", "qkv_proj", layers, M=tokens, N=config.q_size + 2 * config.kv_size, K=h)
    if config.qk_norm:  # Qwen3: RMSNorm over head_dim on every q head and k head, before RoPE
        b.add("rms_norm", "q_norm", layers, T=tokens * hq, H=d, residual=0)
        b.add("rms_norm", "k_norm", layers, T=tokens * hkv, H=d, residual=0)
    b.add("rope", "rope", layers, T=tokens, Hq=hq, Hkv=hkv, D=d)
    b.add("append_kv", "append_kv", layers, T=tokens, Hkv=hkv, D=d, block_size=block_size, num_blocks=kv_blocks)
    op, shape = attention
    b.add(op, "attention", layers, **shape)
    b.add("linear", "o_proj", layers, M=tokens, N=h, K=config.q_size)
    b.add("rms_norm", "post_attn_norm", layers, T=tokens, H=h, residual=1)
    b.add("linear", "gate_up_proj", layers, M=tokens, N=2 * config.intermediate_size, K=h)
    b.add("swiglu", "swiglu", layers, T=tokens, I=config.intermediate_size)
    b.add("linear", "down_proj", layers, M=tokens, N=h, K=config.intermediate_size)


def _head_calls(b: PlanBuilder, config: ModelConfig, rows: int) -> None:
    b.add("rms_norm", "final_norm", 1, T=rows, H=config.hidden_size, residual=1)
    b.add("linear", "lm_head", 1, M=rows, N=config.vocab_size, K=config.hidden_size)
    b.add("greedy_sample", "sample", 1, B=rows, V=config.vocab_size)


def _is_moe_family(config: ModelConfig) -> bool:
    return config.is_moe or config.is_mla or bool(config.layer_types) or config.attention_sinks


def decode_plan(config: ModelConfig, batch: int, context: int, dtype: str | torch.dtype, tp: int = 1,
                block_size: int = DEFAULT_BLOCK_SIZE, *, weight_format: str | None = None,
                kv_dtype: str | None = None, routing: Any = None, ep: int = 1,
                dp_attention: bool = False) -> list[KernelCall]:
    """The kernel calls of one decode step: `batch` sequences each attending `context` KV tokens (the new one
    included), in step order, deduplicated.

    tp > 1: the calls of ONE GPU of `tp` (tokprof.models.tp.tp_decode_calls), its collectives included; ValueError
    when the model does not shard evenly over `tp` GPUs.
    MoE / MLA / sliding-window models: tokprof.models.plan_moe (single GPU; weights in any format, the experts'
    format in fused_moe's `wfmt` key; an fp8 KV cache for standard attention only); `routing` a measured
    plan_moe.RoutingCounts, else uniform routing decides how many experts fused_moe reads. tp / ep > 1 and
    dp_attention: the calls of one GPU with its all-reduces and all-to-alls (tokprof.models.plan_moe_parallel).
    Low precision (tokprof.quant.precision): `dtype` may be a precision label ("fp8", "nvfp4", "mxfp4+kv-fp8"), or
    `weight_format` / `kv_dtype` name the format of the linear weights and of the KV cache; the linears become the
    format's ops (linear_fp8, ...; the LM head stays in the activation dtype) and an fp8 cache's append and
    attention become append_kv_fp8 / decode_attention_fp8kv, each costed in that format's bytes."""
    from tokprof.quant.precision import apply_precision, parse_precision

    precision = parse_precision(dtype, weight_format=weight_format, kv_dtype=kv_dtype)
    _check_args(config, batch, context, "context", tp, block_size, tp_supported=True)
    if (ep != 1 or dp_attention) and not config.is_moe:
        from tokprof.models.plan_moe_parallel import check_parallel

        check_parallel(config, tp, ep, dp_attention)  # raises: expert parallelism needs experts
    if _is_moe_family(config):
        from tokprof.models import plan_moe

        plan_moe.check_supported(config, tp, precision)
        b = PlanBuilder(precision.activation)
        if tp > 1 or ep > 1 or dp_attention:
            from tokprof.models.plan_moe_parallel import parallel_decode_calls

            parallel_decode_calls(b, config, batch, context, block_size, routing, tp, ep, dp_attention,
                                  parse_dtype(precision.activation).itemsize)
            return apply_precision(b.plan(), precision)
        b.add("embedding", "embedding", 1, T=batch, V=config.vocab_size, H=config.hidden_size)
        plan_moe.moe_decode_calls(b, config, batch, context, block_size, routing)
        _head_calls(b, config, batch)
        return apply_precision(b.plan(), precision)
    if tp > 1:
        from tokprof.models.tp import tp_decode_calls  # tp.py builds on this module: imported when asked for

        return apply_precision(tp_decode_calls(config, batch, context, precision.activation, tp, block_size),
                               precision)
    b = PlanBuilder(precision.activation)
    b.add("embedding", "embedding", 1, T=batch, V=config.vocab_size, H=config.hidden_size)
    attention = ("decode_attention", {"B": batch, "Hq": config.num_heads, "Hkv": config.num_kv_heads,
                                      "D": config.head_dim, "context": context, "block_size": block_size})
    _layer_calls(b, config, batch, attention, batch * cdiv(context, block_size), block_size)
    _head_calls(b, config, batch)
    return apply_precision(b.plan(), precision)


def prefill_plan(config: ModelConfig, batch: int, prompt_len: int, dtype: str | torch.dtype, tp: int = 1,
                 block_size: int = DEFAULT_BLOCK_SIZE, *, weight_format: str | None = None,
                 kv_dtype: str | None = None, routing: Any = None) -> list[KernelCall]:
    """The kernel calls of prefilling `batch` prompts of `prompt_len` tokens each, deduplicated.

    Every prompt token runs through the layers (T = batch * prompt_len); only the last position of each sequence
    goes through the final norm, the LM head and sampling, since the other positions' logits are never used.
    """
    from tokprof.quant.precision import apply_precision, parse_precision

    precision = parse_precision(dtype, weight_format=weight_format, kv_dtype=kv_dtype)
    _check_args(config, batch, prompt_len, "prompt_len", tp, block_size, tp_supported=False)
    tokens = batch * prompt_len
    b = PlanBuilder(precision.activation)
    b.add("embedding", "embedding", 1, T=tokens, V=config.vocab_size, H=config.hidden_size)
    if _is_moe_family(config):
        from tokprof.models import plan_moe

        plan_moe.check_supported(config, tp, precision)
        plan_moe.moe_prefill_calls(b, config, batch, prompt_len, block_size, routing)
        _head_calls(b, config, batch)
        return apply_precision(b.plan(), precision)
    attention = ("prefill_attention", {"B": batch, "Hq": config.num_heads, "Hkv": config.num_kv_heads,
                                       "S": prompt_len, "D": config.head_dim, "causal": 1})
    _layer_calls(b, config, tokens, attention, batch * cdiv(prompt_len, block_size), block_size)
    _head_calls(b, config, batch)
    return apply_precision(b.plan(), precision)


def plan_table(plan: list[KernelCall]) -> list[dict[str, Any]]:
    """One row per entry with its per-call and per-step cost: for printing and for reports. A collective's row has
    no kernel cost (flops and min_bytes 0) and its message size in `message_bytes`."""
    rows = []
    for call in plan:
        if call.op in COLLECTIVE_OPS:
            rows.append({**call.to_dict(), "label": call.label, "flops": 0, "min_bytes": 0, "step_flops": 0,
                         "step_min_bytes": 0, "message_bytes": call.shape["bytes"]})
            continue
        flops, min_bytes = call.cost()
        rows.append({**call.to_dict(), "label": call.label, "flops": flops, "min_bytes": min_bytes,
                     "step_flops": call.count * flops, "step_min_bytes": call.count * min_bytes})
    return rows
