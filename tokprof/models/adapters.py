"""Other frameworks' decode loops, measured the way tokprof's own is (tokprof.models.e2e), on the same weights.

    m = measure_transformers(model, batch=8, context=1024, steps=32)   # transformers, manual greedy steps
    m = measure_vllm(model, batch=8, context=1024, steps=32, mode="graph")  # vLLM offline API, when importable

transformers: a Hugging Face model built from the same config whose parameters are views of the tokprof model's
fused weights (no second copy of the weights), SDPA attention, its DynamicCache; prefill with the whole batch, then
`steps` manual greedy steps (forward of one token per sequence, argmax) timed like tokprof's. Eager only.

vLLM: the offline `LLM.generate` API cannot time one step, so a step is the difference of two runs over the same
prompts, (time of 1 + N tokens - time of 1 token) / N, prefix caching off so both runs prefill; each repeat gives one
sample. mode "graph" leaves vLLM's CUDA graphs on, "eager" sets enforce_eager. A random tokprof model is written to a
temporary Hugging Face directory first (vLLM loads from disk).
"""

from __future__ import annotations

import gc
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokprof.kernels._common import dtype_name
from tokprof.models.config import ModelConfig
from tokprof.models.e2e import (
    CPU_WINDOW_S,
    DecodeSession,
    E2EMeasurement,
    check_point,
    device_label,
    measure_session,
    prompt_length,
    random_prompts,
    sync,
)
from tokprof.models.loader import hf_state_dict
from tokprof.profiler.energy_sources import energy_not_asked

_HF_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen3": ("Qwen3ForCausalLM", "qwen3"),
                     "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
                     "deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3"),
                     "gpt_oss": ("GptOssForCausalLM", "gpt_oss")}
_TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json contents for `cfg`, in the rope_theta / rope_scaling spelling every transformers and vLLM reads."""
    arch, model_type = _HF_ARCHITECTURES[cfg.architecture]
    d: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta, "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "attention_bias": False, "hidden_act": "silu", "bos_token_id": None, "eos_token_id": None,
        "pad_token_id": None, "torch_dtype": _TORCH_DTYPE_NAMES[dtype_name(dtype)],
    }
    if cfg.architecture == "llama":
        d["mlp_bias"] = False
    if cfg.architecture in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        from tokprof.models.loader_moe import hf_moe_config

        d.update(hf_moe_config(cfg))
    return d


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise RuntimeError(f"the transformers adapter needs transformers ({err}); pip install 'tokprof[dev]'") from err
    return transformers


def build_hf_model(model: Any) -> torch.nn.Module:
    """A transformers model of `model`'s config whose parameters are views of its weights (no copy), eval mode."""
    transformers = _transformers()
    cfg_dict = hf_config_dict(model.config, model.dtype)
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    with torch.device("meta"):  # no memory: every parameter is replaced by a view of tokprof's weights below
        # gpt-oss has no SDPA path in transformers (its sinks): eager attention there.
        attn = "eager" if model.config.architecture == "gpt_oss" else "sdpa"
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn)
    hf.load_state_dict(hf_state_dict(model.config, model.weights), strict=True, assign=True)
    for p in hf.parameters():
        p.requires_grad_(False)
    # Buffers are not in the state dict (RoPE frequencies): rebuild the rotary module on the device.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg).to(model.device)
    left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"build_hf_model: tensors {left[:3]} were not given values; transformers "
                           f"{transformers.__version__} lays the model out differently than tokprof expects")
    return hf.eval()


def _hf_prefill(hf: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
    out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1), out.past_key_values  # (B,), the framework's cache


def transformers_session(model: Any, batch: int, context: int, steps: int, warmup: int, seed: int,
                         max_prefill_tokens: int = 16384) -> tuple[DecodeSession, int]:
    """Prefill and warm up the transformers twin of `model`; (session, prompt length)."""
    hf = build_hf_model(model)
    prompt_len = prompt_length(context, warmup, steps)
    ids = random_prompts(batch, prompt_len, model.config.vocab_size, seed).to(model.device)
    whole = batch * prompt_len <= max_prefill_tokens
    rows = ids if whole else ids[:1]
    notes = ["transformers: its own modules (SDPA attention, DynamicCache) on tokprof's weights; manual greedy steps"]
    with torch.no_grad():
        _hf_prefill(hf, rows)  # warm-up: library initialisation, cuBLAS handles
        sync(model.device)
        t0 = time.perf_counter()
        tokens, cache = _hf_prefill(hf, rows)
        sync(model.device)
        ttft_ms: float | None = (time.perf_counter() - t0) * 1e3
    if whole:
        notes.append(f"TTFT: prefill of the whole batch ({batch} x {prompt_len} tokens) in one forward")
    else:
        cache.batch_repeat_interleave(batch)
        tokens = tokens.repeat(batch)
        ttft_ms = None
        notes.append(f"{batch} x {prompt_len} tokens exceed {max_prefill_tokens} for one forward: one prompt "
                     "prefilled and its cache repeated to the batch; no TTFT for the batch (None)")
    state = {"tokens": tokens, "cache": cache}

    @torch.no_grad()
    def step() -> None:
        out = hf(input_ids=state["tokens"][:, None], past_key_values=state["cache"], use_cache=True,
                 logits_to_keep=1)
        state["tokens"] = out.logits[:, -1].argmax(-1)

    for _ in range(warmup):
        step()
    start_len, start_tokens = cache.get_seq_length(), state["tokens"]

    def rewind() -> None:
        extra = state["cache"].get_seq_length() - start_len
        if extra > 0:
            state["cache"].crop(-extra)  # a negative count removes that many tokens (transformers 4.x and 5.x)
        state["tokens"] = start_tokens

    return DecodeSession(step=step, rewind=rewind, ttft_ms=ttft_ms, notes=notes), prompt_len


def measure_transformers(model: Any, batch: int, context: int, steps: int = 32, mode: str = "eager", *,
                         warmup: int = 4, seed: int = 0, energy: bool = True, energy_window_s: float = 1.0,
                         meter: Any = None, idle_power_w: float | None = None, profile: bool = True,
                         cpu_window_s: float = CPU_WINDOW_S) -> E2EMeasurement:
    """transformers' decode loop on the weights of tokprof `model`, measured like measure_e2e (eager only)."""
    check_point(batch, context, steps, warmup)
    if mode != "eager":
        raise ValueError(f"mode: the transformers adapter measures eager decoding only, got {mode!r}")
    transformers = _transformers()
    model.free_cache()
    session, prompt_len = transformers_session(model, batch, context, steps, warmup, seed)
    m = measure_session(session, model=model.config.name, framework="transformers", mode="eager",
                        backend=f"transformers-{transformers.__version__}", dtype=dtype_name(model.dtype),
                        batch=batch, context=context, steps=steps, warmup=warmup, prompt_len=prompt_len,
                        device=model.device, energy=energy, energy_window_s=energy_window_s, meter=meter,
                        idle_power_w=idle_power_w, profile=profile, cpu_window_s=cpu_window_s)
    del session
    gc.collect()
    return m


# ---------------------------------------------------------------------------------------------------------- vLLM


def vllm_status() -> str | None:
    """None when vLLM can be imported, else why not (the adapter is then skipped with this message)."""
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        return f"vllm is not importable here ({err}); install vllm on a GPU machine to measure it"
    return None


def save_hf_dir(model: Any, directory: str | Path) -> Path:
    """Write `model` as a Hugging Face directory (config.json + model.safetensors, unfused names)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in hf_state_dict(model.config, model.weights, per_expert=True).items()}
    if model.config.tie_word_embeddings:
        del tensors["lm_head.weight"]  # tied: one tensor on disk, as save_pretrained writes it
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config_dict(model.config, model.dtype), indent=1))
    return directory


def measure_vllm(model: Any, batch: int, context: int, steps: int = 32, mode: str = "graph", *, warmup: int = 4,
                 seed: int = 0, repeats: int = 3, gpu_memory_utilization: float = 0.5, energy: bool = True,
                 meter: Any = None) -> E2EMeasurement:
    """vLLM's offline API on the same weights: per-step time from the difference of a 1-token and a (1+N)-token run."""
    check_point(batch, context, steps, warmup)
    reason = vllm_status()
    if reason is not None:
        raise RuntimeError(reason)
    if model.device.type != "cuda":
        raise RuntimeError(f"vLLM runs on a CUDA GPU; the model is on {model.device}")
    if mode not in ("eager", "graph"):
        raise ValueError(f"mode: expected 'eager' or 'graph', got {mode!r}")
    from vllm import LLM, SamplingParams

    prompt_len = prompt_length(context, 0, steps)  # every run starts from the prompt: no warm-up steps before
    ids = random_prompts(batch, prompt_len, model.config.vocab_size, seed).tolist()
    prompts = [{"prompt_token_ids": row} for row in ids]
    model.free_cache()
    with tempfile.TemporaryDirectory(prefix="tokprof-vllm-") as tmp:
        directory = model.source_dir or save_hf_dir(model, tmp)
        llm = LLM(model=str(directory), dtype=_TORCH_DTYPE_NAMES[dtype_name(model.dtype)],
                  enforce_eager=mode == "eager", max_model_len=prompt_len + steps + 8, max_num_seqs=batch,
                  gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=False,
                  skip_tokenizer_init=True, seed=seed)

        def run(new_tokens: int, engine: Any = llm) -> float:
            params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
            sync(model.device)
            t0 = time.perf_counter()
            engine.generate(prompts, params, use_tqdm=False)
            sync(model.device)
            return time.perf_counter() - t0

        run(1 + warmup)  # warm-up: compilation, graph capture, allocator
        samples_us, firsts = [], []
        for _ in range(repeats):
            t1, tn = run(1), run(1 + steps)
            firsts.append(t1)
            samples_us.append((tn - t1) / steps * 1e6)
        j_per_token, energy_reason = None, energy_not_asked(model.device)
        if energy:
            j_per_token, energy_reason = _vllm_energy(run, steps, batch, model.device, meter)
        del run, llm  # shuts vLLM's engine down and gives its memory back
        gc.collect()
        torch.cuda.empty_cache()
    median_us = float(np.median(samples_us))
    if not (median_us > 0 and math.isfinite(median_us)):
        raise RuntimeError(f"vLLM: the (1+N)-token run was not slower than the 1-token run (median {median_us} us "
                           "per step); use more steps")
    gpu, device_name = device_label(model.device)
    import vllm

    first = prompt_len + 1
    return E2EMeasurement(
        model=model.config.name, gpu=gpu, framework="vllm", mode=mode, backend=f"vllm-{vllm.__version__}",
        dtype=dtype_name(model.dtype), batch=batch, context=context, steps=steps, step_times_us=samples_us,
        median_step_us=median_us, p90_step_us=float(np.percentile(samples_us, 90)),
        tokens_per_s_per_gpu=batch / (median_us * 1e-6), tokens_per_s_per_user=1.0 / (median_us * 1e-6),
        ttft_ms=float(np.median(firsts)) * 1e3, j_per_token=j_per_token, energy_reason=energy_reason,
        gpu_busy_fraction=None, gpu_busy_reason="vLLM runs its engine in another process: torch.profiler here "
        "does not see its kernels", warmup_steps=warmup, prompt_len=prompt_len, context_first=first,
        context_last=prompt_len + steps, device=device_name,
        notes=[f"vLLM offline API: each sample is one run's mean step, (t(1+{steps} tokens) - t(1 token)) / {steps}, "
               f"over {repeats} repeats; prefix caching off; mode {mode} "
               f"({'enforce_eager' if mode == 'eager' else 'its CUDA graphs'})",
               "TTFT: a whole 1-token generate call (prefill + one sampling step + engine overhead)",
               f"the timed steps attend {first}..{prompt_len + steps} KV tokens, centred on the context"])


def _vllm_energy(run: Any, steps: int, batch: int, device: torch.device, meter: Any) -> tuple[float | None, str]:
    from tokprof.profiler.energy import energy_status, make_meter

    reason = energy_status(device)
    if reason is not None:
        return None, reason
    meter = meter if meter is not None else make_meter(device)
    meter.begin_window("vllm_1")
    run(1)
    e1 = meter.end_window("vllm_1")
    meter.begin_window("vllm_n")
    run(1 + steps)
    en = meter.end_window("vllm_n")
    return ((en.energy_j - e1.energy_j) / (batch * steps),
            f"difference of the NVML energy of a (1+{steps})-token and a 1-token run ({en.method}), idle tails "
            "included in both")
