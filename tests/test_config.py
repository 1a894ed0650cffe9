"""ModelConfig: presets, and from_hf on real config.json files written by transformers (both RoPE spellings).

Parameter counts are checked against transformers' own models built from the same config (tiny sizes), so the
count formula is tested against an independent implementation, not against itself.
"""

from __future__ import annotations

import json

import pytest
import torch

from tokprof.models import ModelConfig

transformers = pytest.importorskip("transformers")

LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def _small(**extra):
    return dict(vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, **extra)


def _hf_param_count(model_cls, hf_config) -> int:
    torch.manual_seed(0)
    model = model_cls(hf_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tie", [False, True])
def test_llama_from_saved_config(tmp_path, tie):
    hf = transformers.LlamaConfig(**_small(rope_theta=500000.0, rope_scaling=dict(LLAMA31_SCALING),
                                           max_position_embeddings=131072, tie_word_embeddings=tie,
                                           rms_norm_eps=1e-5))
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf(tmp_path)  # the directory; the file path works too
    assert cfg == ModelConfig.from_hf(tmp_path / "config.json")
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == ("llama", 1000, 128, 352)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 32)
    assert cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 131072
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.rope_scaling["factor"] == 8.0 and cfg.rope_scaling["original_max_position_embeddings"] == 8192
    assert cfg.tie_word_embeddings is tie and not cfg.qk_norm
    assert cfg.num_params() == _hf_param_count(transformers.LlamaForCausalLM, hf)


def test_llama_rope_inv_freq_matches_transformers(tmp_path):
    hf = transformers.LlamaConfig(**_small(rope_theta=500000.0, rope_scaling=dict(LLAMA31_SCALING),
                                           max_position_embeddings=131072))
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf(tmp_path)
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf)
    torch.testing.assert_close(cfg.inv_freq(), rope.inv_freq.float(), rtol=1e-6, atol=0)


def test_llama_old_spelling_rope_theta_and_rope_scaling(tmp_path):
    # The config.json of meta-llama/Llama-3.1-8B as published (transformers 4.x spelling), shortened to 2 layers.
    published = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
        "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(published))
    cfg = ModelConfig.from_hf(tmp_path / "config.json", name="llama-2-layers")
    ref = ModelConfig.from_name("llama-3.1-8b")
    assert cfg.name == "llama-2-layers" and cfg.head_dim == 128 and cfg.rope_theta == 500000.0
    assert dict(cfg.rope_scaling) == dict(ref.rope_scaling)
    assert torch.equal(cfg.inv_freq(), ref.inv_freq())
    assert cfg.params_per_layer() == ref.params_per_layer()


def test_qwen3_from_saved_config_has_qk_norm(tmp_path):
    hf = transformers.Qwen3Config(**_small(head_dim=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                           max_position_embeddings=40960))
    hf.save_pretrained(tmp_path)
    text = json.loads((tmp_path / "config.json").read_text())
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.architecture == "qwen3" and cfg.qk_norm
    assert cfg.head_dim == 64 and cfg.q_size == 256  # head_dim given explicitly, not hidden / heads
    expected_theta = text.get("rope_theta", (text.get("rope_parameters") or {}).get("rope_theta"))
    assert cfg.rope_theta == expected_theta == 1000000.0
    assert cfg.rope_scaling is None
    assert cfg.num_params() == _hf_param_count(transformers.Qwen3ForCausalLM, hf)


def test_rope_parameters_spelling(tmp_path):
    d = {"model_type": "llama", **_small(), "rope_parameters": {"rope_theta": 250000.0, "rope_type": "default"}}
    assert ModelConfig.from_hf(d).rope_theta == 250000.0 and ModelConfig.from_hf(d).rope_scaling is None
    d["rope_parameters"] = {"rope_theta": 500000.0, **LLAMA31_SCALING}
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 8.0 and "rope_theta" not in cfg.rope_scaling


@pytest.mark.parametrize("name,params", [("llama-3.1-8b", 8_030_261_248), ("llama-3.2-1b", 1_235_814_400),
                                         ("llama-3.1-70b", 70_553_706_496), ("qwen3-8b", 8_190_735_360),
                                         ("qwen3-32b", 32_762_123_264)])
def test_preset_parameter_counts(name, params):
    # Published totals: Llama-3.1-8B 8.03e9, Llama-3.2-1B 1.24e9 (tied), Llama-3.1-70B 70.6e9, Qwen3-8B 8.2e9,
    # Qwen3-32B 32.8e9; exact values from safetensors index totals / 2 bytes.
    assert ModelConfig.from_name(name).num_params() == params


def test_presets_and_kv_bytes():
    cfg = ModelConfig.from_name("Llama-3.1-8B")  # case-insensitive
    assert cfg.kv_bytes_per_token(torch.bfloat16) == 2 * 32 * 8 * 128 * 2  # 128 KiB
    assert cfg.weight_bytes(torch.bfloat16) == 2 * 8_030_261_248
    tiny = ModelConfig.from_name("tiny")
    assert tiny.num_params() < 2_000_000
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_configs_are_rejected(tmp_path):
    base = {"model_type": "llama", **_small()}
    with pytest.raises(ValueError, match="architectures: expected one of"):
        ModelConfig.from_hf({**base, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    bad = dict(base)
    del bad["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size: missing"):
        ModelConfig.from_hf(bad)
    with pytest.raises(ValueError, match="attention_bias/mlp_bias"):
        ModelConfig.from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="hidden_act: expected 'silu'"):
        ModelConfig.from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="num_kv_heads: expected a divisor of num_heads 4"):
        ModelConfig.from_hf({**base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="rope_scaling.rope_type: expected 'llama3'"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="use_sliding_window: sliding-window attention is not supported"):
        ModelConfig.from_hf({**base, "model_type": "qwen3", "use_sliding_window": True})
    with pytest.raises(ValueError, match="layer_types: only full_attention"):
        ModelConfig.from_hf({**base, "layer_types": ["full_attention", "sliding_attention"]})
    with pytest.raises(ValueError, match="config: expected a config.json file"):
        ModelConfig.from_hf(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="model: expected one of"):
        ModelConfig.from_name("gpt-5")
    with pytest.raises(ValueError, match="vocab_size: expected a positive int"):
        ModelConfig.from_hf({**base, "vocab_size": 0})
