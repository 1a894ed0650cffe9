"""tokprof's Transformer against transformers: the same tokens and logits (1e-4) from the same checkpoint.

Tiny random models are built with transformers (fixed seeds, random norm weights so that every weight matters),
saved with save_pretrained (safetensors) and loaded by tokprof from the directory, on the CPU in float32: Llama with
GQA, Llama with tied embeddings and Llama 3.1 ("llama3") rope scaling, and Qwen3 (q/k norm), with the torch backend
and the Triton kernels (interpreter). Head dim 64: the Triton attention kernels take D in {64, 128}.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TRITON_DEVICE, requires_triton

from tokprof.models.kv_cache import PagedKVCache
from tokprof.models.transformer import Transformer

transformers = pytest.importorskip("transformers")

BATCH, PROMPT, NEW_TOKENS = 2, 5, 4


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """HF initialises RMSNorm weights to 1; random values check that tokprof applies every norm weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))


def _save_llama(path: Path, *, heads: int, kv_heads: int, tied: bool, llama3: bool, seed: int) -> Path:
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if llama3:  # a short original context, so the scaling changes most frequencies at these positions
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=64, tie_word_embeddings=tied, max_position_embeddings=128,
        rope_parameters=rope, rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    _randomise_norms(model, seed)
    model.save_pretrained(path)
    return path


def _save_qwen3(path: Path, seed: int) -> Path:
    cfg = transformers.Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=128, rope_parameters={"rope_type": "default",
        "rope_theta": 1000000.0}, rms_norm_eps=1e-6, initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(cfg)
    _randomise_norms(model, seed)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama_gqa": _save_llama(root / "llama_gqa", heads=4, kv_heads=2, tied=False, llama3=False, seed=1),
        "llama_tied_llama3": _save_llama(root / "llama_tied_llama3", heads=2, kv_heads=1, tied=True, llama3=True,
                                         seed=2),
        "qwen3": _save_qwen3(root / "qwen3", seed=3),
    }


def _hf_generate(path: Path, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, attention_mask=torch.ones_like(prompt))
    return out.sequences, torch.stack(out.logits, dim=1)  # (B, S + N), (B, N, V)


def _check_parity(path: Path, backend: str, seed: int, device: str = "cpu") -> None:
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (BATCH, PROMPT), generator=gen)
    want_tokens, want_logits = _hf_generate(path, prompt)
    model = Transformer.from_pretrained(path, device=device, dtype=torch.float32, backend=backend)
    tokens, logits = model.generate(prompt, max_new_tokens=NEW_TOKENS, return_logits=True)
    tokens, logits = tokens.cpu(), logits.cpu()
    assert tokens.shape == (BATCH, PROMPT + NEW_TOKENS)
    assert torch.equal(tokens[:, :PROMPT], prompt), "generate must return the prompt first"
    diff = (logits.double() - want_logits.double()).abs()
    worst = tuple((diff == diff.max()).nonzero()[0].tolist())
    assert diff.max().item() <= 1e-4 + 1e-4 * want_logits.abs().max().item(), (
        f"{path.name}/{backend}: logits differ from transformers by up to {diff.max().item():.3e} "
        f"(mean {diff.mean().item():.3e}); worst (batch, step, vocab) {worst}")
    assert torch.equal(tokens, want_tokens), (
        f"{path.name}/{backend}: tokens {tokens.tolist()} != transformers {want_tokens.tolist()}")
    # The logits are not flat (a degenerate model would pass trivially): the winners stand out.
    assert (want_logits.max(-1).values - want_logits.mean(-1)).min().item() > 0.05


@pytest.mark.parametrize("name", ["llama_gqa", "llama_tied_llama3", "qwen3"])
def test_parity_torch_backend(checkpoints: dict[str, Path], name: str) -> None:
    _check_parity(checkpoints[name], "torch", seed=10)


@requires_triton
@pytest.mark.parametrize("name", ["llama_gqa", "llama_tied_llama3", "qwen3"])
def test_parity_triton_backend(checkpoints: dict[str, Path], name: str) -> None:
    # The interpreter on a CPU-only machine, compiled kernels on the GPU (fp32 dots run "ieee" there, not tf32).
    _check_parity(checkpoints[name], "triton", seed=11, device=TRITON_DEVICE)


def test_batch_rows_independent(checkpoints: dict[str, Path]) -> None:
    """A batch gives each row what that prompt alone gives (the pages of different sequences never mix), also when
    prefill runs in sub-batches."""
    gen = torch.Generator().manual_seed(12)
    prompt = torch.randint(0, 256, (3, 7), generator=gen)
    model = Transformer.from_pretrained(checkpoints["llama_gqa"], device="cpu", dtype=torch.float32, backend="torch")
    together = model.generate(prompt, max_new_tokens=5)
    model.max_prefill_tokens = 7  # one prompt per prefill sub-batch
    chunked = model.generate(prompt, max_new_tokens=5)
    alone = torch.cat([model.generate(prompt[i:i + 1], max_new_tokens=5) for i in range(3)])
    assert torch.equal(together, alone)
    assert torch.equal(chunked, alone)


def test_decode_state_and_cache_limits(checkpoints: dict[str, Path]) -> None:
    model = Transformer.from_pretrained(checkpoints["llama_gqa"], device="cpu", dtype=torch.float32, backend="torch")
    with pytest.raises(RuntimeError, match="prefill"):
        model.decode_step()
    prompt = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(13))
    model.prefill(prompt, max_new_tokens=2)
    # The cache rounds up to whole pages: 3 + 2 tokens -> one page of 16 -> 13 decode steps fit.
    assert model.steps_left == 16 - 3
    for _ in range(13):
        model.decode_step()
    with pytest.raises(RuntimeError, match="KV cache is full"):
        model.decode_step()
    with pytest.raises(RuntimeError, match="CUDA device"):
        model.capture_graph()
    with pytest.raises(ValueError, match="input_ids"):
        model.prefill(torch.tensor([[0, 256]]), max_new_tokens=1)
    with pytest.raises(ValueError, match="input_ids"):
        model.prefill(torch.tensor([0, 1]), max_new_tokens=1)


_SHAPES = {  # each public kernel call -> the shape keys of its registry op, as the plans write them
    "embedding": lambda ids, table, **_: {"T": ids.shape[0], "V": table.shape[0], "H": table.shape[1]},
    "rms_norm": lambda x, w, **kw: {"T": x.shape[0], "H": x.shape[1], "residual": int(kw.get("residual") is not None)},
    "linear": lambda x, w, **_: {"M": x.shape[0], "N": w.shape[0], "K": w.shape[1]},
    "rope": lambda q, k, pos, **_: {"T": q.shape[0], "Hq": q.shape[1], "Hkv": k.shape[1], "D": q.shape[2]},
    "append_kv": lambda k, v, kc, vc, slots, **_: {"T": k.shape[0], "Hkv": k.shape[1], "D": k.shape[2],
                                                   "block_size": kc.shape[1]},
    "decode_attention": lambda q, kc, vc, table, lens, **_: {"B": q.shape[0], "Hq": q.shape[1], "Hkv": kc.shape[2],
                                                             "D": q.shape[2], "context": int(lens[0]),
                                                             "block_size": kc.shape[1]},
    "swiglu": lambda gu, **_: {"T": gu.shape[0], "I": gu.shape[1] // 2},
    "greedy_sample": lambda logits, **_: {"B": logits.shape[0], "V": logits.shape[1]},
}


@pytest.mark.parametrize("qk_norm,batch", [(False, 1), (False, 3), (True, 3)])
def test_decode_step_runs_exactly_the_plan(monkeypatch: pytest.MonkeyPatch, qk_norm: bool, batch: int) -> None:
    """One decode step calls the kernels of decode_plan, shape for shape and count for count, so the kernel sum and
    the end-to-end run measure the same work (append_kv's num_blocks, the cache size, is left out: it changes
    neither the work nor the cost formula)."""
    from collections import Counter

    import tokprof.models.transformer as tm
    from tokprof.models.config import ModelConfig
    from tokprof.models.plan import decode_plan

    cfg = ModelConfig("t", vocab_size=96, hidden_size=32, intermediate_size=40, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=16, qk_norm=qk_norm, architecture="qwen3" if qk_norm else "llama")
    model = Transformer.random(cfg, device="cpu", dtype=torch.float32, seed=0, backend="torch")
    model.prefill(torch.randint(0, 96, (batch, 21), generator=torch.Generator().manual_seed(1)), max_new_tokens=4)
    calls: Counter = Counter()
    for op, shape_of in _SHAPES.items():
        def record(*args: object, _op: str = op, _shape: object = shape_of, _fn: object = getattr(tm, op),
                   **kwargs: object) -> object:
            calls[(_op, tuple(sorted(_shape(*args, **kwargs).items())))] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(tm, op, record)
    model.decode_step()  # the token at position 21: 22 KV tokens attended
    want: Counter = Counter()
    for call in decode_plan(cfg, batch, 22, "fp32"):
        shape = {k: v for k, v in call.shape.items() if not (call.op == "append_kv" and k == "num_blocks")}
        want[(call.op, tuple(sorted(shape.items())))] += call.count
    assert calls == want


def test_paged_cache_layout() -> None:
    """Interleaved pages: page j of sequence b is block j*B + b; slots follow the block table."""
    cache = PagedKVCache.allocate(num_layers=1, batch=3, max_tokens=40, num_kv_heads=2, head_dim=4,
                                  dtype=torch.float32, device="cpu", block_size=16)
    assert cache.block_table.dtype == torch.int32 and cache.block_table.shape == (3, 3)
    assert cache.block_table.tolist() == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert cache.k[0].shape == (9, 16, 2, 4)
    for b in range(3):
        for t in (0, 15, 16, 47):
            want = int(cache.block_table[b, t // 16]) * 16 + t % 16
            assert int(cache.slot_of_position[b, t]) == want
    assert PagedKVCache.bytes_needed(1, 3, 40, 2, 4, torch.float32) == cache.nbytes == 2 * 9 * 16 * 2 * 4 * 4


def test_random_model_is_deterministic_and_on_device() -> None:
    from tokprof.models.config import ModelConfig

    cfg = ModelConfig("t", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, tie_word_embeddings=True, qk_norm=True, architecture="qwen3")
    a = Transformer.random(cfg, device="cpu", dtype=torch.float32, seed=5, backend="torch")
    b = Transformer.random(cfg, device="cpu", dtype=torch.float32, seed=5, backend="torch")
    c = Transformer.random(cfg, device="cpu", dtype=torch.float32, seed=6, backend="torch")
    assert torch.equal(a.weights.layers[1].qkv, b.weights.layers[1].qkv)
    assert not torch.equal(a.weights.layers[1].qkv, c.weights.layers[1].qkv)
    assert a.weights.lm_head is a.weights.embed  # tied
    assert a.weights.layers[0].qkv.shape == (2 * 16 + 2 * 16, 32)
    assert abs(a.weights.layers[0].gate_up.std().item() - 0.02) < 0.004
    assert a.weight_bytes == cfg.weight_bytes(torch.float32)
    prompt = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.generate(prompt, 3), b.generate(prompt, 3))
