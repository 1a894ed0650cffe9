"""Loading Hugging Face directories: fused layout, sharded checkpoints, and clear errors for broken ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tokprof.models.loader import check_checkpoint, hf_state_dict, load_pretrained, read_config
from tokprof.models.transformer import Transformer

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _llama(seed: int = 0, tied: bool = False) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=None,
                                   eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("hf") / "llama"
    model = _llama(seed=3)
    model.save_pretrained(path)
    return path, model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_fused_layout_matches_checkpoint(saved: tuple[Path, torch.nn.Module]) -> None:
    path, hf = saved
    cfg, w = load_pretrained(path, device="cpu", dtype=torch.float32)
    sd = hf.state_dict()
    layer = hf.model.layers[1]
    want_qkv = torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                          layer.self_attn.v_proj.weight])
    assert torch.equal(w.layers[1].qkv, want_qkv)
    assert torch.equal(w.layers[1].gate_up, torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]))
    assert w.layers[1].qkv.shape == (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size) == (64 + 2 * 32, 32)
    # And back: the HF view of the fused weights is the original state dict, tensor for tensor.
    back = hf_state_dict(cfg, w)
    assert set(back) == set(sd)
    for name, tensor in sd.items():
        assert torch.equal(back[name], tensor), name


def test_dtype_conversion(saved: tuple[Path, torch.nn.Module]) -> None:
    path, hf = saved
    _, w = load_pretrained(path, device="cpu", dtype=torch.float16)
    assert w.embed.dtype == torch.float16
    assert torch.equal(w.embed, hf.model.embed_tokens.weight.half())


def test_sharded_checkpoint_loads_the_same(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, hf = saved
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    prompt = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(1))
    a = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch").generate(prompt, 3)
    b = Transformer.from_pretrained(sharded, device="cpu", dtype=torch.float32, backend="torch").generate(prompt, 3)
    assert torch.equal(a, b)
    # A shard gone: the error names the shard and a tensor it holds.
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    (sharded / shard).unlink()
    with pytest.raises(ValueError, match=rf"shard '{shard}' \(holding tensor '[^']+'\) is missing"):
        load_pretrained(sharded, device="cpu", dtype=torch.float32)


def test_tied_embeddings_share_one_tensor(tmp_path: Path) -> None:
    _llama(seed=4, tied=True).save_pretrained(tmp_path / "tied")
    _, w = load_pretrained(tmp_path / "tied", device="cpu", dtype=torch.float32)
    assert w.lm_head is w.embed


def test_missing_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json: not found in"):
        Transformer.from_pretrained(tmp_path / "empty", device="cpu", dtype=torch.float32, backend="torch")
    with pytest.raises(ValueError, match="not a directory"):
        read_config(tmp_path / "nowhere")


def test_unsupported_architecture(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    d = _copy(saved[0], tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"architectures: expected one of .*LlamaForCausalLM.*GPT2LMHeadModel"):
        load_pretrained(d, device="cpu", dtype=torch.float32)


def test_shape_mismatch_names_tensor_expected_and_got(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    d = _copy(saved[0], tmp_path / "bad_shape")
    tensors = safetensors_torch.load_file(d / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)  # expected (2 heads * 16, 32)
    safetensors_torch.save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.self_attn.k_proj.weight' in model.safetensors: "
                                         r"expected shape \(32, 32\) \(from config.json\), got \(8, 32\)"):
        load_pretrained(d, device="cpu", dtype=torch.float32)


def test_missing_and_unexpected_tensors(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    d = _copy(saved[0], tmp_path / "missing")
    tensors = safetensors_torch.load_file(d / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    safetensors_torch.save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight'\] missing from the checkpoint"):
        check_checkpoint(d, read_config(d))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, 32)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    safetensors_torch.save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model.layers.0.self_attn.q_proj.bias'\]"):
        check_checkpoint(d, read_config(d))


def test_no_safetensors(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    d = tmp_path / "bin_only"
    d.mkdir()
    shutil.copy(saved[0] / "config.json", d / "config.json")
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*.safetensors file .*pytorch_model.bin.*safetensors only"):
        load_pretrained(d, device="cpu", dtype=torch.float32)
