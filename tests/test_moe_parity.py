"""tokprof's Transformer against transformers on the MoE/MLA families: the same greedy tokens and logits (1e-4).

Tiny random models made with transformers' own classes (fixed seeds; random norm weights, router weights and
DeepSeek's selection bias so that every weight matters), saved with save_pretrained and loaded by tokprof, on the
CPU in float32:
- Qwen3-MoE: 8 experts, top-2 renormalised, layer 1 dense (mlp_only_layers), q/k norm;
- DeepSeek-V3: MLA with q_lora_rank, interleaved RoPE with YaRN (mscale_all_dim in the softmax scale), a dense first
  layer, one shared expert, sigmoid scoring with grouped top-k (4 groups, 2 kept) and routed scaling;
- gpt-oss: q/k/v/o biases, attention sinks, a sliding layer (window 4, shorter than the prompt) and a full one,
  YaRN (its attention factor folded into the softmax scale), router bias, expert biases and the clamped SwiGLU.
Also: the decode step runs exactly the calls of decode_plan (the e2e loop measures the plan's work), and the routing
histogram the Transformer records is the one transformers' router gives.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import TRITON_DEVICE, requires_triton

from tokprof.kernels import OPS
from tokprof.models.config import ModelConfig
from tokprof.models.plan import decode_plan
from tokprof.models.transformer import Transformer

transformers = pytest.importorskip("transformers")

BATCH, PROMPT, NEW_TOKENS = 2, 5, 4


def _randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("gate.weight"):  # the router: logits spread enough that the choice is clear
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))


def _save(model_cls, cfg, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = model_cls(cfg)
    _randomise(model, seed)
    model.save_pretrained(path)
    return path


def _qwen3_moe(path: Path) -> Path:
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=128, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return _save(transformers.Qwen3MoeForCausalLM, cfg, path, seed=21)


def _deepseek(path: Path) -> Path:
    cfg = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                         "beta_slow": 1},
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return _save(transformers.DeepseekV3ForCausalLM, cfg, path, seed=22)


def _gpt_oss(path: Path) -> Path:
    # A window of 4 tokens: shorter than the prompt, so sliding layers drop keys in prefill and decode.
    cfg = transformers.GptOssConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32},
        initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(23)
    model = transformers.GptOssForCausalLM(cfg)
    _randomise(model, 23)
    gen = torch.Generator().manual_seed(24)
    with torch.no_grad():  # transformers initialises these to zero: random values check that each is applied
        for name, param in model.named_parameters():
            if name.endswith(("_bias", "sinks", "router.weight")):
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_moe")
    return {"qwen3_moe": _qwen3_moe(root / "qwen3_moe"), "deepseek_v3": _deepseek(root / "deepseek_v3"),
            "gpt_oss": _gpt_oss(root / "gpt_oss")}


def _hf_generate(path: Path, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, attention_mask=torch.ones_like(prompt))
    return out.sequences, torch.stack(out.logits, dim=1)


def _check_parity(path: Path, backend: str, seed: int, device: str = "cpu") -> None:
    prompt = torch.randint(0, 256, (BATCH, PROMPT), generator=torch.Generator().manual_seed(seed))
    want_tokens, want_logits = _hf_generate(path, prompt)
    model = Transformer.from_pretrained(path, device=device, dtype=torch.float32, backend=backend)
    tokens, logits = model.generate(prompt, max_new_tokens=NEW_TOKENS, return_logits=True)
    tokens, logits = tokens.cpu(), logits.cpu()
    diff = (logits.double() - want_logits.double()).abs()
    assert diff.max().item() <= 1e-4 + 1e-4 * want_logits.abs().max().item(), (
        f"{path.name}/{backend}: logits differ from transformers by up to {diff.max().item():.3e}")
    assert torch.equal(tokens, want_tokens), f"{path.name}/{backend}: {tokens.tolist()} != {want_tokens.tolist()}"
    assert (want_logits.max(-1).values - want_logits.mean(-1)).min().item() > 0.05  # not a flat, degenerate model


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_parity_torch_backend(checkpoints: dict[str, Path], name: str) -> None:
    _check_parity(checkpoints[name], "torch", seed=30)


_TRITON_OPS = {"qwen3_moe": ("moe_router", "fused_moe"), "gpt_oss": ("moe_router", "fused_moe"),
               "deepseek_v3": ("moe_router", "fused_moe", "mla_decode_attention", "mla_prefill_attention")}


@requires_triton
@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_parity_triton_backend(checkpoints: dict[str, Path], name: str) -> None:
    missing = [op for op in _TRITON_OPS[name] if "triton" not in OPS[op].impls]
    if missing:
        pytest.skip(f"no Triton kernel for {missing} in this branch yet")
    _check_parity(checkpoints[name], "triton", seed=31, device=TRITON_DEVICE)


def test_config_and_bytes_match_the_checkpoint(checkpoints: dict[str, Path]) -> None:
    """from_hf reads the families' spellings; num_params is transformers' own count (the MTP-free model)."""
    for name, path in checkpoints.items():
        cfg = ModelConfig.from_hf(path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        buffers = sum(b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))
        assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) + buffers, name
        model = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch")
        assert model.weight_bytes == cfg.weight_bytes(torch.float32), name
    ds = ModelConfig.from_hf(checkpoints["deepseek_v3"])
    assert (ds.kv_lora_rank, ds.qk_rope_head_dim, ds.head_dim, ds.n_group, ds.topk_group) == (32, 16, 16, 4, 2)
    assert ds.kv_bytes_per_token(torch.float32) == 2 * (32 + 16) * 4  # one latent row per token and layer
    assert [ds.is_moe_layer(i) for i in range(2)] == [False, True]
    qw = ModelConfig.from_hf(checkpoints["qwen3_moe"])
    assert [qw.is_moe_layer(i) for i in range(3)] == [True, False, True] and qw.norm_topk_prob


_SHAPES = {  # each kernel call -> the shape keys of its registry op, as the plans write them
    "embedding": lambda ids, table, **_: {"T": ids.shape[0], "V": table.shape[0], "H": table.shape[1]},
    "rms_norm": lambda x, w, **kw: {"T": x.shape[0], "H": x.shape[1], "residual": int(kw.get("residual") is not None)},
    "linear": lambda x, w, **_: {"M": x.shape[0], "N": w.shape[0], "K": w.shape[1]},
    "batched_linear": lambda x, w, **_: {"M": x.shape[0], "G": x.shape[1], "N": w.shape[1], "K": w.shape[2]},
    "rope": lambda q, k, pos, **_: {"T": q.shape[0], "Hq": q.shape[1], "Hkv": k.shape[1], "D": q.shape[2]},
    "append_kv": lambda k, v, kc, vc, slots, **_: {"T": k.shape[0], "Hkv": k.shape[1], "D": k.shape[2],
                                                   "block_size": kc.shape[1]},
    "append_mla_kv": lambda lat, kr, cache, slots, **_: {"T": lat.shape[0], "L": lat.shape[1], "R": kr.shape[1],
                                                         "block_size": cache.shape[1]},
    "decode_attention": lambda q, kc, vc, table, lens, **kw: {
        "B": q.shape[0], "Hq": q.shape[1], "Hkv": kc.shape[2], "D": q.shape[2], "block_size": kc.shape[1],
        "context": int(lens[0]), **({"sinks": 1} if kw.get("sinks") is not None else {}),
        **({"window": kw["sliding_window"]} if kw.get("sliding_window") else {})},
    "bias_add": lambda x, b, **_: {"T": x.shape[0], "N": x.shape[1]},
    "mla_decode_attention": lambda ql, qr, cache, table, lens, **_: {
        "B": ql.shape[0], "H": ql.shape[1], "L": ql.shape[2], "R": qr.shape[2], "context": int(lens[0]),
        "block_size": cache.shape[1]},
    "moe_router": lambda logits, **kw: {"T": logits.shape[0], "E": logits.shape[1], "k": kw["top_k"],
                                        "n_group": kw["n_group"], "topk_group": kw["topk_group"]},
    "fused_moe": lambda x, gu, down, w, ids, **kw: {
        "T": x.shape[0], "H": x.shape[1], "I": down.shape[2], "E": gu.shape[0], "k": ids.shape[1],
        **({"gpt_oss": 1} if kw.get("activation") == "gpt_oss" else {})},
    "prefill_attention": lambda q, k, v, **kw: {
        "B": q.shape[0], "Hq": q.shape[1], "Hkv": k.shape[1], "S": q.shape[2], "D": q.shape[3], "causal": 1,
        **({"sinks": 1} if kw.get("sinks") is not None else {}),
        **({"window": kw["sliding_window"]} if kw.get("sliding_window") else {})},
    "mla_prefill_attention": lambda ql, qr, kv, **_: {"B": ql.shape[0], "H": ql.shape[1], "S": ql.shape[2],
                                                      "L": ql.shape[3], "R": qr.shape[3], "causal": 1},
    "swiglu": lambda gu, **_: {"T": gu.shape[0], "I": gu.shape[1] // 2},
    "greedy_sample": lambda logits, **_: {"B": logits.shape[0], "V": logits.shape[1]},
}
_LEFT_OUT = {"append_kv": ("num_blocks",), "append_mla_kv": ("num_blocks",), "fused_moe": ("active_experts",)}


def _record_calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    import tokprof.models.moe_layer as ml
    import tokprof.models.transformer as tm

    calls: Counter = Counter()
    for module in (tm, ml):
        for op, shape_of in _SHAPES.items():
            if not hasattr(module, op):
                continue
            def record(*args: object, _op: str = op, _shape: object = shape_of, _fn: object = getattr(module, op),
                       **kwargs: object) -> object:
                calls[(_op, tuple(sorted(_shape(*args, **kwargs).items())))] += 1
                return _fn(*args, **kwargs)
            monkeypatch.setattr(module, op, record)
    return calls


def _plan_counter(plan: list) -> Counter:
    want: Counter = Counter()
    for call in plan:
        shape = {k: v for k, v in call.shape.items() if k not in _LEFT_OUT.get(call.op, ())}
        want[(call.op, tuple(sorted(shape.items())))] += call.count
    return want


@pytest.mark.parametrize("preset,batch", [("tiny-moe", 1), ("tiny-moe", 3), ("tiny-mla", 3), ("tiny-gpt-oss", 2)])
def test_decode_step_runs_exactly_the_plan(monkeypatch: pytest.MonkeyPatch, preset: str, batch: int) -> None:
    """One decode step calls the kernels of decode_plan, shape for shape and count for count (the cache size and
    the modelled number of experts read are left out: properties of the cache and of the routing, not the call)."""
    cfg = ModelConfig.from_name(preset)
    model = Transformer.random(cfg, device="cpu", dtype=torch.float32, seed=0, backend="torch")
    model.prefill(torch.randint(0, cfg.vocab_size, (batch, 21), generator=torch.Generator().manual_seed(1)),
                  max_new_tokens=4)
    calls = _record_calls(monkeypatch)
    model.decode_step()
    assert calls == _plan_counter(decode_plan(cfg, batch, 22, "fp32"))


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-mla", "tiny-gpt-oss"])
def test_prefill_runs_exactly_the_prefill_plan(monkeypatch: pytest.MonkeyPatch, preset: str) -> None:
    """Prefill of 2 prompts of 20 tokens calls the kernels of prefill_plan (MLA's [latent | k_rope] rows are also
    concatenated for mla_prefill_attention, a copy outside the plan)."""
    from tokprof.models.plan import prefill_plan

    cfg = ModelConfig.from_name(preset)
    model = Transformer.random(cfg, device="cpu", dtype=torch.float32, seed=0, backend="torch")
    model.reserve_cache(2, 24)
    calls = _record_calls(monkeypatch)
    model.prefill(torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2)),
                  max_new_tokens=4)
    assert calls == _plan_counter(prefill_plan(cfg, 2, 20, "fp32"))


def test_routing_histogram_matches_transformers_router(checkpoints: dict[str, Path]) -> None:
    """The counts the Transformer records over a prefill are the experts transformers' router picks."""
    path = checkpoints["qwen3_moe"]
    prompt = torch.randint(0, 256, (BATCH, PROMPT), generator=torch.Generator().manual_seed(40))
    model = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch")
    model.record_routing = True
    model.prefill(prompt, max_new_tokens=1)
    got = model.routing_counts()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    seen: list[torch.Tensor] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _i, out: seen.append(out[2]))
             for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        hf(prompt)
    for h in hooks:
        h.remove()
    want = [torch.bincount(ids.reshape(-1), minlength=8).tolist() for ids in seen]
    assert got.tokens == BATCH * PROMPT and got.counts == want
    assert sum(got.counts[0]) == BATCH * PROMPT * 2


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-mla", "tiny-gpt-oss"])
def test_transformers_twin_and_saved_directory_match(preset: str, tmp_path: Path) -> None:
    """The transformers twin of a random tokprof model (the e2e adapter: views of tokprof's weights) and the directory
    save_hf_dir writes (loaded back by tokprof) give the same greedy tokens as the model itself."""
    from tokprof.models.adapters import build_hf_model, save_hf_dir

    cfg = ModelConfig.from_name(preset)
    model = Transformer.random(cfg, device="cpu", dtype=torch.float32, seed=3, backend="torch", std=0.1)
    prompt = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    tokens, logits = model.generate(prompt, max_new_tokens=3, return_logits=True)
    hf = build_hf_model(model)
    with torch.no_grad():
        want = hf(prompt).logits[:, -1]
    torch.testing.assert_close(logits[:, 0], want, rtol=1e-4, atol=1e-4)
    again = Transformer.from_pretrained(save_hf_dir(model, tmp_path / preset), device="cpu", dtype=torch.float32,
                                        backend="torch")
    assert torch.equal(again.generate(prompt, max_new_tokens=3), tokens)
