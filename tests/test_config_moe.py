"""ModelConfig for the MoE / MLA families: presets against the published parameter counts, from_hf on the published
config.json spellings, YaRN and the softmax scale against transformers, byte counts, and the plans' expert model."""

from __future__ import annotations

import math

import pytest
import torch

from tokprof.models import ModelConfig
from tokprof.models.plan import decode_plan, plan_totals, prefill_plan
from tokprof.models.plan_moe import RoutingCounts, expected_experts

transformers = pytest.importorskip("transformers")


# Published totals and active parameters per token (model cards: DeepSeek-V3 671B / 37B; Qwen3-30B-A3B 30.5B / 3.3B;
# Qwen3-235B-A22B 235B / 22B; gpt-oss-120b 116.8B / 5.13B and gpt-oss-20b 20.9B / 3.61B per OpenAI's model card).
# The active figures of DeepSeek and Qwen count the embedding table; OpenAI's do not (nor does active_params).
@pytest.mark.parametrize("name,total_b,active_b,embed_in_active", [
    ("deepseek-v3", 671, 37, True), ("deepseek-r1", 671, 37, True), ("qwen3-30b-a3b", 30.5, 3.3, True),
    ("qwen3-235b-a22b", 235, 22, True), ("gpt-oss-120b", 116.8, 5.13, False), ("gpt-oss-20b", 20.9, 3.61, False)])
def test_presets_match_published_parameter_counts(name, total_b, active_b, embed_in_active):
    cfg = ModelConfig.from_name(name)
    active = cfg.active_params() + (cfg.vocab_size * cfg.hidden_size if embed_in_active else 0)
    assert cfg.num_params() / 1e9 == pytest.approx(total_b, rel=0.012)
    assert active / 1e9 == pytest.approx(active_b, rel=0.03)


def test_deepseek_published_config_json():
    # deepseek-ai/DeepSeek-V3 config.json as published (transformers 4 spelling, "type": "yarn").
    published = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
        "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
        "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-06, "rope_theta": 10000, "rope_scaling": {
            "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": False, "attention_bias": False}
    cfg = ModelConfig.from_hf(published, name="ds")
    ref = ModelConfig.from_name("deepseek-v3")
    for key in ("num_experts", "n_group", "topk_group", "first_k_dense_replace", "kv_lora_rank", "q_lora_rank",
                "qk_rope_head_dim", "routed_scaling_factor", "router_scoring", "n_shared_experts"):
        assert getattr(cfg, key) == getattr(ref, key), key
    assert cfg.num_params() == ref.num_params()
    # MLA: one latent row of 512 + 64 per token and layer: 70,272 bytes per token in bf16 (a dense 128-head cache
    # of K and V at head dim 128+64 / 128 would be 61 x 128 x (192 + 128) x 2 = 4,997,120).
    assert cfg.kv_bytes_per_token(torch.bfloat16) == 61 * 576 * 2 == 70272
    # transformers' own numbers: the softmax scale with mscale^2 and the YaRN frequencies.
    hf = transformers.DeepseekV3Config(**{k: v for k, v in published.items() if k != "architectures"})
    attn = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Attention(hf, 0)
    assert cfg.softmax_scale == pytest.approx(attn.scaling, rel=1e-12)
    rope = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RotaryEmbedding(hf)
    torch.testing.assert_close(cfg.inv_freq(), rope.inv_freq.float(), rtol=1e-6, atol=0)
    assert rope.attention_scaling == 1.0


def test_gpt_oss_published_config_json():
    # openai/gpt-oss-20b config.json as published.
    published = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
        "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
        "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
        "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 12,
        "rope_theta": 150000, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                               "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                               "truncate": False},
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "swiglu_limit": 7.0, "attention_bias": True,
        "tie_word_embeddings": False, "hidden_act": "silu"}
    cfg = ModelConfig.from_hf(published)
    assert cfg.num_params() == ModelConfig.from_name("gpt-oss-20b").num_params()
    assert cfg.is_sliding_layer(0) and not cfg.is_sliding_layer(1) and cfg.attended_tokens(0, 4096) == 128
    # Sliding layers hold at most 128 tokens: 12 layers x 4096 + 12 x 128 rows of 2 x 8 x 64 elements.
    assert cfg.kv_bytes_per_sequence(torch.bfloat16, 4096) == (12 * 4096 + 12 * 128) * 1024 * 2
    assert cfg.kv_bytes_per_token(torch.bfloat16) == 24 * 1024 * 2
    hf = transformers.GptOssConfig(**{k: v for k, v in published.items() if k != "architectures"})
    rope = transformers.models.gpt_oss.modeling_gpt_oss.GptOssRotaryEmbedding(hf)
    torch.testing.assert_close(cfg.inv_freq(), rope.inv_freq.float(), rtol=1e-6, atol=0)
    # transformers scales cos and sin by the attention factor: q.k carries its square, folded into the scale here.
    assert cfg.softmax_scale == pytest.approx(64 ** -0.5 * rope.attention_scaling ** 2, rel=1e-12)


def test_qwen3_moe_published_config_json():
    published = {  # Qwen/Qwen3-30B-A3B config.json as published
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-06, "max_position_embeddings": 40960,
        "tie_word_embeddings": False, "use_sliding_window": False, "attention_bias": False, "hidden_act": "silu"}
    cfg = ModelConfig.from_hf(published)
    assert cfg == ModelConfig.from_name("qwen3-30b-a3b").__class__(**{**ModelConfig.from_name(
        "qwen3-30b-a3b").to_dict(), "name": cfg.name, "mlp_only_layers": (), "layer_types": ()})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # JSON round trip keeps the tuples


def test_bad_moe_fields_are_named():
    base = ModelConfig.from_name("tiny-moe").to_dict()
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_dict({**base, "num_experts_per_tok": 9})
    with pytest.raises(ValueError, match="n_group/topk_group"):
        ModelConfig.from_dict({**base, "n_group": 3})
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_dict({**base, "layer_types": ["full_attention"]})
    with pytest.raises(ValueError, match="scoring_func"):
        ModelConfig.from_hf({"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "scoring_func": "softmax"})


def test_expected_experts_and_decode_weight_bytes():
    assert expected_experts(256, 8, 1) == pytest.approx(8.0)
    assert expected_experts(256, 8, 2) == pytest.approx(256 * (1 - (248 / 256) ** 2))  # 15.75: a little overlap
    assert expected_experts(8, 2, 1000) == pytest.approx(8.0)
    cfg = ModelConfig.from_name("deepseek-v3")
    per_expert = 3 * 7168 * 2048
    full = cfg.decode_weight_bytes(torch.bfloat16)
    one_token = cfg.decode_weight_bytes(torch.bfloat16, experts_touched=8)
    assert full - one_token == 58 * (256 - 8) * per_expert * 2
    # At batch 1 a DeepSeek-V3 step reads about 37B parameters' bytes (the active set plus the embedding-free head).
    assert one_token / 2 == cfg.active_params()
    with pytest.raises(ValueError, match="experts_touched"):
        cfg.decode_weight_bytes(torch.bfloat16, experts_touched=300)


def test_plan_reads_the_experts_the_batch_touches():
    cfg = ModelConfig.from_name("deepseek-r1")
    moe = [c for c in decode_plan(cfg, 1, 1024, "bf16") if c.op == "fused_moe"]
    assert len(moe) == 1 and moe[0].count == 58  # 61 layers, the first 3 dense
    assert moe[0].shape["active_experts"] == 8 + 1 and moe[0].shape["E"] == 257 and moe[0].shape["k"] == 9
    big = [c for c in decode_plan(cfg, 256, 1024, "bf16") if c.op == "fused_moe"][0]
    assert big.shape["active_experts"] == round(expected_experts(256, 8, 256)) + 1 == 257
    # The step's weight bytes at batch 1: the plan's minimum bytes hold the decode weight bytes of 8+1 experts.
    _, min_bytes = plan_totals(decode_plan(cfg, 1, 1024, "bf16"))
    assert min_bytes >= cfg.decode_weight_bytes(torch.bfloat16, experts_touched=8)
    # A measured histogram: all tokens on experts 0..7 of every layer -> 8 (+1 shared) experts at any batch.
    counts = [[100] * 8 + [0] * 248 for _ in range(58)]
    skewed = decode_plan(cfg, 64, 1024, "bf16", routing=RoutingCounts(counts=counts, tokens=100))
    assert [c for c in skewed if c.op == "fused_moe"][0].shape["active_experts"] == 9
    with pytest.raises(ValueError, match="routing: expected 58 MoE layers"):
        decode_plan(cfg, 1, 1024, "bf16", routing=RoutingCounts(counts=counts[:3], tokens=100))
    with pytest.raises(ValueError, match="tp: expected a divisor of num_heads"):  # tp/ep: test_moe_parallel.py
        decode_plan(cfg, 1, 1024, "bf16", tp=3)


def test_plan_mla_and_sliding_windows():
    cfg = ModelConfig.from_name("deepseek-r1")
    plan = decode_plan(cfg, 4, 1000, "bf16")
    attn = [c for c in plan if c.op == "mla_decode_attention"][0]
    assert attn.shape == {"B": 4, "H": 128, "L": 512, "R": 64, "context": 1000, "block_size": 16}
    assert {c.label for c in plan if c.op == "batched_linear"} == {"q_absorb", "v_up"}
    oss = ModelConfig.from_name("gpt-oss-120b")
    attn = sorted((c.shape.get("window", 0), c.count, c.cost()[1]) for c in decode_plan(oss, 2, 4096, "bf16")
                  if c.op == "decode_attention")
    assert [a[:2] for a in attn] == [(0, 18), (128, 18)]  # 18 full layers, 18 sliding ones of window 128
    assert attn[1][2] < attn[0][2] / 20  # a sliding layer reads 128 of the 4096 tokens
    pre = prefill_plan(ModelConfig.from_name("tiny-mla"), 2, 32, "fp32")
    assert any(c.op == "mla_prefill_attention" and c.shape["S"] == 32 for c in pre)
    assert math.isclose(sum(c.count for c in pre if c.op == "fused_moe"), 1)


def test_card_counts_the_experts_one_token_reads_and_the_window():
    from tokprof.profiler.devices import load_specs
    from tokprof.rollup.card import analytic_card

    spec = load_specs()["h200"]
    ds = ModelConfig.from_name("deepseek-r1")
    card = analytic_card(ds, spec, [1024], "bf16")
    assert card["decode_weight_bytes"] == 2 * ds.active_params()  # 8 of 256 routed experts at batch 1
    assert card["batch1"][0]["bytes_per_step"] == card["decode_weight_bytes"] + 1024 * 61 * 576 * 2
    oss = ModelConfig.from_name("gpt-oss-20b")
    card = analytic_card(oss, spec, [8192], "bf16")
    assert card["batch1"][0]["bytes_per_step"] - card["decode_weight_bytes"] == (12 * 8192 + 12 * 128) * 1024 * 2
    dense = ModelConfig.from_name("llama-3.1-8b")
    assert analytic_card(dense, spec, [1], "bf16")["decode_weight_bytes"] == dense.decode_weight_bytes(torch.bfloat16)


def test_capacity_counts_experts_latent_rows_and_windows():
    from tokprof.rollup.capacity import kv_cache_bytes_per_gpu, weight_bytes_per_gpu

    ds = ModelConfig.from_name("deepseek-r1")
    assert weight_bytes_per_gpu(ds, "bf16") == ds.weight_bytes(torch.bfloat16)  # all 256 experts resident
    # 8 sequences of 4096 tokens, one 576-wide latent row per token and layer: 2.30 GB (a dense cache of 128 heads
    # would be ~72x that)
    assert kv_cache_bytes_per_gpu(ds, 8, 4096, "bf16") == 8 * 4096 * 61 * 576 * 2
    oss = ModelConfig.from_name("gpt-oss-120b")
    assert kv_cache_bytes_per_gpu(oss, 1, 4096, "bf16") == (18 * 4096 + 18 * 128) * 2 * 8 * 64 * 2
    with pytest.raises(ValueError, match="tp: expected a divisor of num_heads 128"):
        weight_bytes_per_gpu(ds, "bf16", tp=3)
