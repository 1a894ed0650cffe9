"""Tensor-parallel decode calls: per-GPU shapes, weight bytes against an independent count, the collectives."""

from __future__ import annotations

import random

import pytest

from tokprof.models.config import ModelConfig, with_overrides
from tokprof.models.plan import decode_plan
from tokprof.models.tp import (
    kv_heads_per_gpu,
    split_collectives,
    tp_decode_calls,
    tp_totals,
    weight_bytes_per_gpu,
)


def _by_label(calls):
    out = {}
    for c in calls:
        for label in c.labels:
            out.setdefault(label, []).append(c)
    return out


def _llama8b_linear_weight_elems() -> int:
    """Linear weights of Llama-3.1-8B written out from its published config (hidden 4096, 32 q heads and 8 KV heads
    of 128, intermediate 14336, 32 layers, vocab 128256), independently of ModelConfig's derived sizes."""
    hidden, q, kv, inter, layers, vocab = 4096, 32 * 128, 8 * 128, 14336, 32, 128256
    per_layer = hidden * (q + 2 * kv) + q * hidden + hidden * 2 * inter + inter * hidden
    return layers * per_layer + vocab * hidden


def test_tp1_is_the_single_gpu_plan() -> None:
    cfg = ModelConfig.from_name("qwen3-8b")
    batch, context = random.Random(1).choice([(1, 100), (3, 4097), (8, 2048)])
    a = tp_decode_calls(cfg, batch, context, "bf16", tp=1)
    b = decode_plan(cfg, batch, context, "bf16")
    assert [c.to_dict() for c in a] == [c.to_dict() for c in b]
    assert split_collectives(a)[1] == []


@pytest.mark.parametrize("batch", [1, 8])
def test_tp2_llama8b_weights_halve_and_two_all_reduces_per_layer(batch: int) -> None:
    cfg = ModelConfig.from_name("llama-3.1-8b")
    calls = tp_decode_calls(cfg, batch, 1024, "bf16", tp=2)
    full = _llama8b_linear_weight_elems() * 2  # bf16 bytes
    assert weight_bytes_per_gpu(decode_plan(cfg, batch, 1024, "bf16")) == full
    assert weight_bytes_per_gpu(calls) * 2 == full  # vocab 128256 and every sharded dim are even: exact halves

    labels = _by_label(calls)
    (qkv,) = labels["qkv_proj"]
    assert qkv.shape == {"M": batch, "N": (16 + 2 * 4) * 128, "K": 4096} and qkv.count == 32
    (o,) = labels["o_proj"]
    assert o.shape == {"M": batch, "N": 4096, "K": 2048}
    (gate_up,) = labels["gate_up_proj"]
    assert gate_up.shape == {"M": batch, "N": 14336, "K": 4096}
    (down,) = labels["down_proj"]
    assert down.shape == {"M": batch, "N": 4096, "K": 7168}
    (lm,) = labels["lm_head"]
    assert lm.shape == {"M": batch, "N": 64128, "K": 4096}
    (attn,) = labels["attention"]
    assert (attn.shape["Hq"], attn.shape["Hkv"]) == (16, 4)
    (swiglu,) = labels["swiglu"]
    assert swiglu.shape == {"T": batch, "I": 7168}

    _, collectives = split_collectives(calls)
    reduces = [c for c in collectives if c.op == "all_reduce"]
    assert len(reduces) == 1  # the O and down all-reduces have one shape: one entry
    (ar,) = reduces
    assert ar.shape == {"bytes": batch * 4096 * 2, "world": 2}
    assert ar.count == 2 * 32 and ar.labels == ["o_proj_all_reduce", "down_proj_all_reduce"]
    (ag,) = [c for c in collectives if c.op == "all_gather"]
    assert ag.shape == {"bytes": batch * 128256 * 2, "world": 2} and ag.count == 1
    totals = tp_totals(calls)
    assert totals["collectives"] == 65
    assert totals["collective_bytes"] == 64 * batch * 4096 * 2 + batch * 128256 * 2


def test_replicated_kv_heads_and_padded_vocab() -> None:
    cfg = ModelConfig.from_name("llama-3.1-70b")  # 64 q heads, 8 KV heads
    assert kv_heads_per_gpu(cfg, 8) == 1
    assert kv_heads_per_gpu(cfg, 16) == 1  # 16 GPUs: each KV head replicated twice
    calls = tp_decode_calls(cfg, 4, 512, "fp16", tp=16)
    (attn,) = _by_label(calls)["attention"]
    assert (attn.shape["Hq"], attn.shape["Hkv"]) == (4, 1)
    (qkv,) = _by_label(calls)["qkv_proj"]
    assert qkv.shape["N"] == (4 + 2 * 1) * 128
    # an odd vocabulary: each GPU holds ceil(V / tp) rows, the gather carries the padded logits
    odd = with_overrides(ModelConfig.from_name("tiny"), vocab_size=513)
    calls = tp_decode_calls(odd, 2, 64, "fp32", tp=2)
    (lm,) = _by_label(calls)["lm_head"]
    assert lm.shape["N"] == 257
    (ag,) = _by_label(calls)["logits_all_gather"]
    assert ag.shape["bytes"] == 2 * 257 * 2 * 4
    (sample,) = _by_label(calls)["sample"]
    assert sample.shape == {"B": 2, "V": 513}


def test_qwen3_head_norms_and_vocab_parallel_embedding() -> None:
    cfg = ModelConfig.from_name("qwen3-32b")  # 64 q heads, 8 KV heads, q/k norm
    calls = tp_decode_calls(cfg, 2, 256, "bf16", tp=4, vocab_parallel_embedding=True)
    labels = _by_label(calls)
    assert labels["q_norm"][0].shape == {"T": 2 * 16, "H": 128, "residual": 0}
    assert labels["k_norm"][0].shape == {"T": 2 * 2, "H": 128, "residual": 0}
    assert labels["embedding"][0].shape == {"T": 2, "V": 151936 // 4, "H": 5120}
    (ar,) = [c for c in calls if c.op == "all_reduce"]
    assert ar.count == 2 * 64 + 1 and "embed_all_reduce" in ar.labels


def test_tp_must_divide_the_heads() -> None:
    cfg = ModelConfig.from_name("llama-3.1-8b")
    with pytest.raises(ValueError, match=r"tp: expected a divisor of num_heads 32 \(num_kv_heads 8\).*got tp=3"):
        tp_decode_calls(cfg, 1, 128, "bf16", tp=3)
    with pytest.raises(ValueError, match="tp: with fewer KV heads"):
        tp_decode_calls(with_overrides(cfg, num_kv_heads=4, num_heads=48, head_dim=128), 1, 128, "bf16", tp=6)
    with pytest.raises(ValueError, match="tp: expected a positive int"):
        tp_decode_calls(cfg, 1, 128, "bf16", tp=0)
    with pytest.raises(ValueError, match="context: expected at most"):
        tp_decode_calls(cfg, 1, 10**7, "bf16", tp=2)
