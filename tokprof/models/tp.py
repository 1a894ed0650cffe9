"""Tensor parallelism: the per-GPU kernel calls of one decode step sharded over `tp` GPUs, with its collectives.

    calls = tp_decode_calls(ModelConfig.from_name("llama-3.1-70b"), batch=8, context=4096, dtype="bf16", tp=4)
    kernels, collectives = split_collectives(calls)

Megatron-style sharding of the decode step of tokprof.models.plan (same ops, same order), as vLLM runs it:

  QKV projection       column-parallel: N = (Hq/tp + 2 * Hkv_gpu) * D on each GPU
  q/k norm, RoPE,      per-GPU heads: Hq/tp query heads, Hkv_gpu KV heads
  KV append, attention
  O projection         row-parallel: K = q_size/tp, then an all-reduce of the (B, hidden) partial sums
  gate-up projection   column-parallel: N = 2 * intermediate/tp
  SwiGLU               T = B, I = intermediate/tp
  down projection      row-parallel: K = intermediate/tp, then an all-reduce of the (B, hidden) partial sums
  norms                replicated (every GPU normalises the whole hidden vector after the all-reduce)
  LM head              vocab-parallel: N = ceil(vocab/tp), then an all-gather of the logits
  greedy sampling      replicated over the gathered (B, vocab) logits
  embedding            replicated (default: every GPU holds the table and reads the B rows of the step's tokens);
                       vocab_parallel_embedding=True shards it as Megatron and vLLM do and adds the all-reduce of
                       the (B, hidden) looked-up rows they pay for it

KV heads: with Hkv >= tp each GPU holds Hkv/tp of them (tp must divide Hkv); with Hkv < tp each KV head is
replicated on tp/Hkv GPUs, so each GPU holds exactly one (tp must be a multiple of Hkv), as vLLM does.

Collectives are KernelCalls too: op "all_reduce" / "all_gather", shape {"bytes", "world"} with `bytes` the
nccl-tests message size (the all-reduce buffer; the all-gather's whole gathered output), in the model's dtype. They
are not kernel-registry ops: time them with tokprof.profiler.collectives (measured, or modelled from the spec
table's interconnect), never with the kernel bench.
"""

from __future__ import annotations

import torch

from tokprof.kernels._common import cdiv, dtype_name, parse_dtype
from tokprof.models.config import ModelConfig
from tokprof.models.plan import COLLECTIVE_OPS, DEFAULT_BLOCK_SIZE, KernelCall, PlanBuilder


def kv_heads_per_gpu(config: ModelConfig, tp: int) -> int:
    """KV heads each GPU holds: Hkv/tp, or 1 (a replica) when there are fewer KV heads than GPUs."""
    hkv = config.num_kv_heads
    if hkv >= tp:
        if hkv % tp:
            raise ValueError(f"tp: expected a divisor of num_kv_heads {hkv} (or a multiple of it, to replicate KV "
                             f"heads) for {config.name}, got tp={tp}")
        return hkv // tp
    if tp % hkv:
        raise ValueError(f"tp: with fewer KV heads ({hkv}) than GPUs each KV head is replicated, so tp must be a "
                         f"multiple of num_kv_heads {hkv} ({config.name}), got tp={tp}")
    return 1


def check_tp(config: ModelConfig, tp: int) -> None:
    """ValueError unless `config` shards evenly over `tp` GPUs (heads, KV heads, intermediate size)."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp <= 0:
        raise ValueError(f"tp: expected a positive int, got {tp!r}")
    if tp > 1 and (config.is_moe or config.is_mla or config.layer_types or config.attention_sinks):
        from tokprof.models.plan_moe_parallel import check_parallel

        check_parallel(config, tp, 1, False)  # the MoE/MLA sharding rules (heads, KV heads, expert intermediate)
        return
    if config.num_heads % tp:
        raise ValueError(f"tp: expected a divisor of num_heads {config.num_heads} (num_kv_heads "
                         f"{config.num_kv_heads}) for {config.name}, got tp={tp}")
    kv_heads_per_gpu(config, tp)
    if config.intermediate_size % tp:
        raise ValueError(f"tp: expected a divisor of intermediate_size {config.intermediate_size} for "
                         f"{config.name}, got tp={tp}")


def tp_decode_calls(config: ModelConfig, batch: int, context: int, dtype: str | torch.dtype, tp: int,
                    block_size: int = DEFAULT_BLOCK_SIZE, *,
                    vocab_parallel_embedding: bool = False) -> list[KernelCall]:
    """The kernel calls and collectives ONE GPU of `tp` runs in one decode step (see the module docstring).

    `batch` sequences each attend `context` KV tokens (the new one included). With tp=1 the kernel calls are those
    of tokprof.models.plan.decode_plan and there is no collective. Deduplicated: equal (op, shape, dtype) calls
    are one entry whose count adds up (the O and down all-reduces share a shape: one entry, count 2 x layers).
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config: expected a ModelConfig (ModelConfig.from_name or from_hf), got "
                         f"{type(config).__name__}")
    for name, value in (("batch", batch), ("context", context), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if context > config.max_position_embeddings:
        raise ValueError(f"context: expected at most the model's max_position_embeddings "
                         f"{config.max_position_embeddings} ({config.name}), got {context}")
    check_tp(config, tp)
    if config.is_moe or config.is_mla or config.layer_types or config.attention_sinks:
        from tokprof.models.plan import decode_plan  # MoE/MLA: tokprof.models.plan_moe_parallel's sharding

        return decode_plan(config, batch, context, dtype, tp=tp, block_size=block_size)
    torch_dtype = parse_dtype(dtype)
    elem_bytes = torch_dtype.itemsize
    c = PlanBuilder(dtype_name(torch_dtype))

    h, d, layers = config.hidden_size, config.head_dim, config.num_layers
    hq = config.num_heads // tp
    hkv = kv_heads_per_gpu(config, tp)
    inter = config.intermediate_size // tp
    # Every GPU holds an equal shard of ceil(V/tp) rows (vLLM also rounds the padded vocabulary up to a multiple
    # of 64); the padded rows are computed and discarded.
    vocab_shard = cdiv(config.vocab_size, tp)
    partial_sums = batch * h * elem_bytes  # bytes of one (B, hidden) tensor in the model's dtype

    if vocab_parallel_embedding and tp > 1:
        c.add("embedding", "embedding", 1, T=batch, V=vocab_shard, H=h)
        c.add("all_reduce", "embed_all_reduce", 1, bytes=partial_sums, world=tp)
    else:
        c.add("embedding", "embedding", 1, T=batch, V=config.vocab_size, H=h)

    c.add("rms_norm", "input_norm", 1, T=batch, H=h, residual=0)
    if layers > 1:
        c.add("rms_norm", "input_norm", layers - 1, T=batch, H=h, residual=1)
    c.add("linear", "qkv_proj", layers, M=batch, N=(hq + 2 * hkv) * d, K=h)
    if config.qk_norm:
        c.add("rms_norm", "q_norm", layers, T=batch * hq, H=d, residual=0)
        c.add("rms_norm", "k_norm", layers, T=batch * hkv, H=d, residual=0)
    c.add("rope", "rope", layers, T=batch, Hq=hq, Hkv=hkv, D=d)
    c.add("append_kv", "append_kv", layers, T=batch, Hkv=hkv, D=d, block_size=block_size,
          num_blocks=batch * cdiv(context, block_size))
    c.add("decode_attention", "attention", layers, B=batch, Hq=hq, Hkv=hkv, D=d, context=context,
          block_size=block_size)
    c.add("linear", "o_proj", layers, M=batch, N=h, K=hq * d)
    if tp > 1:
        c.add("all_reduce", "o_proj_all_reduce", layers, bytes=partial_sums, world=tp)
    c.add("rms_norm", "post_attn_norm", layers, T=batch, H=h, residual=1)
    c.add("linear", "gate_up_proj", layers, M=batch, N=2 * inter, K=h)
    c.add("swiglu", "swiglu", layers, T=batch, I=inter)
    c.add("linear", "down_proj", layers, M=batch, N=h, K=inter)
    if tp > 1:
        c.add("all_reduce", "down_proj_all_reduce", layers, bytes=partial_sums, world=tp)

    c.add("rms_norm", "final_norm", 1, T=batch, H=h, residual=1)
    c.add("linear", "lm_head", 1, M=batch, N=vocab_shard, K=h)
    if tp > 1:
        c.add("all_gather", "logits_all_gather", 1, bytes=batch * vocab_shard * tp * elem_bytes, world=tp)
    c.add("greedy_sample", "sample", 1, B=batch, V=config.vocab_size)
    return c.plan()


def is_collective(call: KernelCall) -> bool:
    return call.op in COLLECTIVE_OPS


def split_collectives(calls: list[KernelCall]) -> tuple[list[KernelCall], list[KernelCall]]:
    """(kernel calls, collectives): the first go to the kernel bench, the second to tokprof.profiler.collectives."""
    return [c for c in calls if not is_collective(c)], [c for c in calls if is_collective(c)]


def tp_totals(calls: list[KernelCall]) -> dict[str, int]:
    """Per-GPU step totals: kernel flops and min_bytes (registry cost formulas) and the collectives' message
    bytes (nccl-tests sizes) and count. KernelCall.cost() refuses collectives, which are not registry ops."""
    kernels, collectives = split_collectives(calls)
    flops = min_bytes = 0
    for call in kernels:
        f, b = call.cost()
        flops += call.count * f
        min_bytes += call.count * b
    return {"flops": flops, "min_bytes": min_bytes,
            "collective_bytes": sum(c.count * c.shape["bytes"] for c in collectives),
            "collectives": sum(c.count for c in collectives)}


def weight_bytes_per_gpu(calls: list[KernelCall]) -> int:
    """Bytes of the linear weights one GPU reads per step: sum over linear calls of count x N x K x dtype bytes."""
    total = 0
    for call in calls:
        if call.op == "linear":
            total += call.count * call.shape["N"] * call.shape["K"] * parse_dtype(call.dtype).itemsize
    return total
