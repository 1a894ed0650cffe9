"""Decode and prefill plans: structure, counts, deduplication, and byte/FLOP totals against hand counts.

The hand counts are written out here from the published config numbers of each model (not from ModelConfig's
helpers and not from the plan code): weight bytes + KV bytes read + activations (each op's inputs read once and
outputs written once) + the small index tensors the kernels read (token ids, positions, slots, block tables).
"""

from __future__ import annotations

import math

import pytest
import torch

from tokprof.models import KernelCall, ModelConfig, decode_plan, plan_totals, prefill_plan
from tokprof.models.plan import plan_table

# Published config.json numbers (Hugging Face model cards).
LLAMA_8B = dict(V=128256, H=4096, I=14336, L=32, Hq=32, Hkv=8, D=128, qk_norm=False)
QWEN3_8B = dict(V=151936, H=4096, I=12288, L=36, Hq=32, Hkv=8, D=128, qk_norm=True)


def hand_decode(m: dict, batch: int, context: int, b: int, block_size: int = 16) -> tuple[int, int, int, int]:
    """(weight bytes, KV bytes read, everything else in bytes, FLOPs) of one decode step, by hand."""
    V, H, I, L, Hq, Hkv, D = (m[k] for k in ("V", "H", "I", "L", "Hq", "Hkv", "D"))  # noqa: E741, N806
    q, kv = Hq * D, Hkv * D
    B = batch  # noqa: N806
    # weights read once per step: fused QKV, O, fused gate-up, down, two norms per layer (+ q/k norms for Qwen3);
    # the final norm and the LM head. The embedding table is gathered, only B rows (an activation).
    per_layer = H * (q + 2 * kv) + q * H + 2 * I * H + I * H + 2 * H + (2 * D if m["qk_norm"] else 0)
    weights = (L * per_layer + H + V * H) * b
    kv_read = L * B * context * 2 * kv * b
    act = 0
    act += 2 * B * H * b + 8 * B  # embedding: B rows read, (B, H) written, int64 ids
    norms_plain, norms_residual = 1, 2 * L  # layer-0 input norm; the rest add the residual (input, post-attn, final)
    act += norms_plain * 2 * B * H * b + norms_residual * 4 * B * H * b  # x (+ residual) in, out (+ new residual)
    per_layer_act = (
        B * H * b + B * (q + 2 * kv) * b  # QKV: x in, qkv out
        + 2 * B * (Hq + Hkv) * D * b + 8 * B  # RoPE: q, k in and out, int64 positions
        + 2 * 2 * B * kv * b + 8 * B  # KV append: k, v in, cache rows out, int64 slots
        + 2 * B * q * b + B * math.ceil(context / block_size) * 4 + B * 4  # attention: q in, out; block table, lens
        + B * q * b + B * H * b  # O
        + B * H * b + B * 2 * I * b  # gate-up
        + B * 2 * I * b + B * I * b  # SwiGLU
        + B * I * b + B * H * b  # down
    )
    if m["qk_norm"]:
        per_layer_act += 2 * B * (Hq + Hkv) * D * b  # q/k norms: q and k read, normed q and k written
    act += L * per_layer_act
    act += B * H * b + B * V * b  # LM head: x in, logits out
    act += B * V * b + 8 * B  # greedy sample: logits in, int64 tokens out
    # FLOPs: 2 per weight per token in the linears; attention 4*Hq*context*D per token; element-wise ops
    linear_params = L * (H * (q + 2 * kv) + q * H + 3 * I * H) + V * H
    flops = 2 * B * linear_params + L * 4 * B * Hq * context * D
    flops += norms_plain * 4 * B * H + norms_residual * 5 * B * H  # RMSNorm 4/elt, +1 for the residual add
    flops += L * (3 * B * (Hq + Hkv) * D + 5 * B * I)  # RoPE 3/elt, SwiGLU 5/elt
    if m["qk_norm"]:
        flops += L * 4 * B * (Hq + Hkv) * D
    flops += B * V  # argmax compares
    return weights, kv_read, act, flops


@pytest.mark.parametrize("name,m", [("llama-3.1-8b", LLAMA_8B), ("qwen3-8b", QWEN3_8B)])
@pytest.mark.parametrize("batch,context", [(1, 1024), (64, 8192), (3, 1000)])
@pytest.mark.parametrize("dtype,b", [("bf16", 2), ("fp32", 4)])
def test_decode_totals_match_hand_count(name, m, batch, context, dtype, b):
    cfg = ModelConfig.from_name(name)
    weights, kv_read, act, flops = hand_decode(m, batch, context, b)
    plan_flops, plan_bytes = plan_totals(decode_plan(cfg, batch, context, dtype))
    assert plan_bytes == weights + kv_read + act, (
        f"plan {plan_bytes} B vs hand {weights + kv_read + act} B (diff {plan_bytes - weights - kv_read - act})")
    assert plan_flops == flops, f"plan {plan_flops} FLOP vs hand {flops} (diff {plan_flops - flops})"


def test_llama_8b_batch1_is_weight_bound():
    # Llama-3.1-8B has 8,030,261,248 parameters; a decode step reads all but the embedding table (only B rows of
    # it): ~15.0 GB in bf16. The KV cache adds 128 KiB per token.
    weights, kv_read, act, _ = hand_decode(LLAMA_8B, 1, 1024, 2)
    assert weights == 2 * (8_030_261_248 - 128256 * 4096)
    assert kv_read == 1024 * 131072
    _, plan_bytes = plan_totals(decode_plan(ModelConfig.from_name("llama-3.1-8b"), 1, 1024, "bf16"))
    assert 0.99 < weights / plan_bytes < 1.0


@pytest.mark.parametrize("name,entries", [("llama-3.1-8b", 13), ("qwen3-8b", 15)])
def test_decode_counts_per_op(name, entries):
    cfg = ModelConfig.from_name(name)
    L = cfg.num_layers  # noqa: N806
    plan = decode_plan(cfg, 8, 4096, "bf16")
    assert len(plan) == entries
    by_label = {c.label: c for c in plan}
    assert [c.op for c in plan][:2] == ["embedding", "rms_norm"] and plan[-1].op == "greedy_sample"
    assert by_label["embedding"].count == 1 and by_label["embedding"].shape == {"T": 8, "V": cfg.vocab_size,
                                                                                "H": 4096}
    assert by_label["input_norm"].count == 1 and by_label["input_norm"].shape["residual"] == 0
    merged = by_label["input_norm+post_attn_norm+final_norm"]
    assert merged.count == 2 * L and merged.shape == {"T": 8, "H": 4096, "residual": 1}
    for label in ("qkv_proj", "rope", "append_kv", "attention", "o_proj", "gate_up_proj", "swiglu", "down_proj"):
        assert by_label[label].count == L, label
    assert by_label["qkv_proj"].shape == {"M": 8, "N": 4096 + 2 * 1024, "K": 4096}
    assert by_label["gate_up_proj"].shape == {"M": 8, "N": 2 * cfg.intermediate_size, "K": 4096}
    assert by_label["down_proj"].shape == {"M": 8, "N": 4096, "K": cfg.intermediate_size}
    assert by_label["attention"].shape == {"B": 8, "Hq": 32, "Hkv": 8, "D": 128, "context": 4096, "block_size": 16}
    assert by_label["append_kv"].shape["num_blocks"] == 8 * 256
    assert by_label["lm_head"].count == 1 and by_label["lm_head"].shape == {"M": 8, "N": cfg.vocab_size, "K": 4096}
    assert by_label["sample"].shape == {"B": 8, "V": cfg.vocab_size}
    if cfg.qk_norm:
        assert by_label["q_norm"].shape == {"T": 8 * 32, "H": 128, "residual": 0} and by_label["q_norm"].count == L
        assert by_label["k_norm"].shape == {"T": 8 * 8, "H": 128, "residual": 0} and by_label["k_norm"].count == L
    else:
        assert "q_norm" not in by_label
    assert sum(c.count for c in plan) == 3 + 2 * L + L * (8 + (2 if cfg.qk_norm else 0)) + 1


def test_same_calls_are_merged_with_labels_kept():
    # tiny: QKV is (M, 512, 256) and the LM head too (vocab 512): one entry, counted layers + 1 times.
    cfg = ModelConfig.from_name("tiny")
    plan = decode_plan(cfg, 2, 64, "fp32")
    merged = [c for c in plan if c.op == "linear" and c.shape == {"M": 2, "N": 512, "K": 256}]
    assert len(merged) == 1
    assert merged[0].labels == ["qkv_proj", "lm_head"] and merged[0].count == cfg.num_layers + 1
    assert len({c.key() for c in plan}) == len(plan)


def test_prefill_totals_match_hand_count():
    cfg = ModelConfig.from_name("llama-3.1-8b")
    batch, s = 2, 100
    t = batch * s
    plan = prefill_plan(cfg, batch, s, "bf16")
    by_label = {c.label: c for c in plan}
    assert by_label["attention"].op == "prefill_attention"
    assert by_label["attention"].shape == {"B": 2, "Hq": 32, "Hkv": 8, "S": 100, "D": 128, "causal": 1}
    assert by_label["qkv_proj"].shape["M"] == t and by_label["append_kv"].shape["T"] == t
    assert by_label["append_kv"].shape["num_blocks"] == batch * 7
    assert by_label["lm_head"].shape == {"M": batch, "N": 128256, "K": 4096}  # last position of each sequence only
    assert by_label["final_norm"].shape == {"T": batch, "H": 4096, "residual": 1}
    flops, _ = plan_totals(plan)
    L, H, I, q, kv, V = 32, 4096, 14336, 4096, 1024, 128256  # noqa: E741, N806
    linear = 2 * t * L * (H * (q + 2 * kv) + q * H + 3 * I * H) + 2 * batch * V * H
    attention = L * 2 * batch * 32 * 128 * s * (s + 1)  # 4*D per (query, key) pair on or below the diagonal
    elementwise = (4 * t * H + (2 * L - 1) * 5 * t * H + 5 * batch * H + L * (3 * t * 40 * 128 + 5 * t * I)
                   + batch * V)
    assert flops == linear + attention + elementwise


def test_plan_table_and_round_trip():
    plan = decode_plan(ModelConfig.from_name("tiny"), 1, 16, "fp16")
    rows = plan_table(plan)
    assert sum(r["step_min_bytes"] for r in rows) == plan_totals(plan)[1]
    assert all(r["step_flops"] == r["count"] * r["flops"] for r in rows)
    assert [KernelCall.from_dict(c.to_dict()) for c in plan] == plan
    assert all(c.dtype == "fp16" for c in plan)
    assert decode_plan(ModelConfig.from_name("tiny"), 1, 16, torch.float16) == plan


def test_bad_arguments_are_rejected():
    cfg = ModelConfig.from_name("llama-3.1-8b")
    with pytest.raises(ValueError, match=r"tp: prefill plans are single-GPU \(tp=1\).*got tp=2"):
        prefill_plan(cfg, 1, 1024, "bf16", tp=2)
    with pytest.raises(ValueError, match=r"tp: expected a divisor of num_heads 32.*got tp=3"):
        decode_plan(cfg, 1, 1024, "bf16", tp=3)
    with pytest.raises(ValueError, match="tp: expected a positive int, got 0"):
        decode_plan(cfg, 1, 1024, "bf16", tp=0)
    with pytest.raises(ValueError, match="batch: expected a positive int, got 0"):
        decode_plan(cfg, 0, 1024, "bf16")
    with pytest.raises(ValueError, match="context: expected a positive int"):
        decode_plan(cfg, 1, -5, "bf16")
    with pytest.raises(ValueError, match="context: expected at most the model's max_position_embeddings 131072"):
        decode_plan(cfg, 1, 200_000, "bf16")
    with pytest.raises(ValueError, match="prompt_len: expected a positive int"):
        prefill_plan(cfg, 1, 0, "bf16")
    with pytest.raises(ValueError, match="block_size: expected a positive int"):
        decode_plan(cfg, 1, 10, "bf16", block_size=0)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        decode_plan(cfg, 1, 10, "int8")
    with pytest.raises(ValueError, match="config: expected a ModelConfig"):
        decode_plan({"name": "llama"}, 1, 10, "bf16")
    with pytest.raises(ValueError, match="op: 'nope' is not in the kernel registry"):
        plan_totals([KernelCall("nope", {}, "bf16", 1)])
    with pytest.raises(ValueError, match="op: 'all_reduce' is a collective, not a kernel-registry op"):
        KernelCall("all_reduce", {"bytes": 64, "world": 2}, "bf16", 1).cost()


def test_tp_decode_plan_is_one_gpus_share_with_its_collectives():
    from tokprof.models.tp import tp_decode_calls

    cfg = ModelConfig.from_name("llama-3.1-8b")
    plan = decode_plan(cfg, 4, 2048, "bf16", tp=2)
    assert plan == tp_decode_calls(cfg, 4, 2048, "bf16", tp=2)
    kernels = [c for c in plan if c.op not in ("all_reduce", "all_gather")]
    # the collectives carry no kernel cost: plan_totals is the kernels' sum, half the single GPU's linear FLOPs
    assert plan_totals(plan) == plan_totals(kernels)
    linear = sum(c.count * c.cost()[0] for c in kernels if c.op == "linear")
    single = sum(c.count * c.cost()[0] for c in decode_plan(cfg, 4, 2048, "bf16") if c.op == "linear")
    assert linear * 2 == single
    rows = {r["label"]: r for r in plan_table(plan)}
    ar = rows["o_proj_all_reduce+down_proj_all_reduce"]
    assert (ar["count"], ar["message_bytes"], ar["step_min_bytes"]) == (64, 4 * 4096 * 2, 0)
