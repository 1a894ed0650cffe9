"""Load a local Hugging Face model directory (config.json + safetensors) into tokprof's fused weight layout.

    config, weights = load_pretrained("path/to/hf_dir", device="cuda", dtype=torch.bfloat16)

Supported: LlamaForCausalLM (incl. Llama 3.1 rope scaling and tied embeddings), Qwen3ForCausalLM (dense, with
q/k norm), Qwen3MoeForCausalLM and DeepseekV3ForCausalLM (tokprof.models.loader_moe: stacked experts, MLA weights in
the absorbed layout), a single `*.safetensors` file or shards listed in `model.safetensors.index.json`. Never
downloads.

At load time q, k and v are fused into one (q_size + 2*kv_size, H) weight and gate, up into one (2*I, H) weight,
which is the layout the decode step's single QKV and gate-up GEMMs read (see the decode step in tokprof.models.plan).
Every check runs on the tensor headers before any data is read, so a bad checkpoint fails in a second, naming the
tensor, the file, the expected and the found shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tokprof.models.config import ModelConfig
from tokprof.models.loader_moe import (
    AttentionExtras,
    MLAWeights,
    MoEWeights,
    fuse_extras,
    fuse_mla,
    fuse_moe,
    hf_moe_shapes,
    hf_moe_state_dict,
)

try:
    from safetensors import safe_open
except ImportError:  # pragma: no cover - safetensors ships with the GPU image and the dev extra
    safe_open = None

# Tensors some checkpoints carry that tokprof recomputes (RoPE frequencies come from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (H,)
    qkv: torch.Tensor | None  # (q_size + 2*kv_size, H): [q | k | v] rows; None with MLA
    o: torch.Tensor | None  # (H, q_size); None with MLA
    post_norm: torch.Tensor  # (H,)
    gate_up: torch.Tensor | None  # (2*I, H): [gate | up] rows; None on an MoE layer
    down: torch.Tensor | None  # (H, I); None on an MoE layer
    q_norm: torch.Tensor | None = None  # (D,) Qwen3 only
    k_norm: torch.Tensor | None = None  # (D,) Qwen3 only
    mla: MLAWeights | None = None  # DeepSeek-V3's latent attention
    moe: MoEWeights | None = None  # an MoE layer's router and stacked experts
    extras: AttentionExtras | None = None  # gpt-oss: q/k/v/o biases and attention sinks


@dataclass
class ModelWeights:
    embed: torch.Tensor  # (V, H)
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # (H,)
    lm_head: torch.Tensor  # (V, H); the embedding tensor itself when the embeddings are tied


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> expected shape for `cfg` (lm_head only when the embeddings are not tied)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    if cfg.architecture in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        shapes.update(hf_moe_shapes(cfg))
        return shapes
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.q_size, h),
            p + "self_attn.k_proj.weight": (cfg.kv_size, h),
            p + "self_attn.v_proj.weight": (cfg.kv_size, h),
            p + "self_attn.o_proj.weight": (h, cfg.q_size),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
    return shapes


def read_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face model directory; ValueError when it is missing or unsupported."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"model_dir: expected a local Hugging Face model directory, got {str(directory)!r} "
                         "(not a directory; tokprof never downloads)")
    if not (path / "config.json").is_file():
        raise ValueError(f"config.json: not found in {path}; expected a Hugging Face model directory holding "
                         "config.json and *.safetensors (as written by save_pretrained)")
    return ModelConfig.from_hf(path / "config.json", name=path.name)


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Hugging Face tensor name -> the safetensors file holding it."""
    if safe_open is None:
        raise RuntimeError("safetensors is not installed: pip install safetensors (a tokprof dependency)")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: expected JSON with a 'weight_map' object, could not read it ({err})") from err
        where: dict[str, Path] = {}
        for name, file in weight_map.items():
            shard = directory / file
            if not shard.is_file():
                raise ValueError(f"{index}: shard {file!r} (holding tensor {name!r}) is missing from {directory}; "
                                 "the download or copy is incomplete")
            where[name] = shard
        return where
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        hint = f" (found {others}: tokprof reads safetensors only; re-save with save_pretrained)" if others else ""
        raise ValueError(f"weights: no *.safetensors file and no model.safetensors.index.json in {directory}{hint}")
    where = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            for name in fh.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                where[name] = file
    return where


def _beyond_layers(name: str, cfg: ModelConfig) -> bool:
    """DeepSeek's checkpoints hold the multi-token-prediction module as layer num_hidden_layers: not loaded."""
    parts = name.split(".")
    return (cfg.architecture == "deepseek_v3" and len(parts) > 2 and parts[:2] == ["model", "layers"]
            and parts[2].isdigit() and int(parts[2]) >= cfg.num_layers)


def check_checkpoint(directory: str | Path, cfg: ModelConfig) -> dict[str, Path]:
    """Check every tensor's presence and shape from the file headers; returns name -> file of what to load."""
    directory = Path(directory)
    where = _tensor_files(directory)
    expected = hf_tensor_shapes(cfg)
    missing = [name for name in expected if name not in where]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"weights: tensor(s) {missing[:3]}{more} missing from the checkpoint in {directory} "
                         f"(expected by the {cfg.architecture} config: {cfg.num_layers} layers"
                         f"{', untied lm_head' if not cfg.tie_word_embeddings else ''})")
    tied_head = "lm_head.weight" if cfg.tie_word_embeddings else None
    unexpected = [n for n in where if n not in expected and n != tied_head and not n.endswith(_IGNORED_SUFFIXES)
                  and not _beyond_layers(n, cfg)]
    if unexpected:
        raise ValueError(f"weights: unexpected tensor(s) {sorted(unexpected)[:3]} in {directory}: this is not a "
                         f"{cfg.architecture} checkpoint tokprof understands (biases, extra heads or other layers)")
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(where[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            for name in names:
                got = tuple(fh.get_slice(name).get_shape())
                if got != expected[name]:
                    raise ValueError(f"weights: tensor {name!r} in {file.name}: expected shape {expected[name]} "
                                     f"(from config.json), got {got}")
    return {name: where[name] for name in expected}


def load_pretrained(directory: str | Path, device: torch.device | str, dtype: torch.dtype
                    ) -> tuple[ModelConfig, ModelWeights]:
    """Read config.json and the safetensors of `directory` onto `device` in `dtype`, q/k/v and gate/up fused."""
    directory = Path(directory)
    cfg = read_config(directory)
    files = check_checkpoint(directory, cfg)
    device = torch.device(device)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    flat: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            for name in names:
                # One tensor at a time through host memory: peak host use is one tensor, not the model.
                flat[name] = fh.get_tensor(name).to(device=device, dtype=dtype)
    interleaved = True
    if cfg.is_mla:  # DeepSeek's RoPE pairs are interleaved unless config.json says otherwise
        interleaved = bool(json.loads((directory / "config.json").read_text()).get("rope_interleave", True))
    return cfg, fuse_hf_weights(cfg, flat, rope_interleave=interleaved)


def fuse_hf_weights(cfg: ModelConfig, flat: dict[str, torch.Tensor], rope_interleave: bool = True) -> ModelWeights:
    """Hugging Face tensors (by name, already on the target device and dtype) -> ModelWeights with fused GEMMs.

    Consumes `flat`: each unfused part is dropped as soon as it is copied, so peak device memory is the model plus
    one layer's parts.
    """
    layers = []
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        if cfg.is_moe or cfg.is_mla:
            layers.append(_fuse_moe_layer(cfg, flat, p, rope_interleave))
            continue
        qkv = torch.cat([flat.pop(p + "self_attn.q_proj.weight"), flat.pop(p + "self_attn.k_proj.weight"),
                         flat.pop(p + "self_attn.v_proj.weight")], dim=0)
        gate_up = torch.cat([flat.pop(p + "mlp.gate_proj.weight"), flat.pop(p + "mlp.up_proj.weight")], dim=0)
        layers.append(LayerWeights(
            input_norm=flat.pop(p + "input_layernorm.weight"),
            qkv=qkv,
            o=flat.pop(p + "self_attn.o_proj.weight").contiguous(),
            post_norm=flat.pop(p + "post_attention_layernorm.weight"),
            gate_up=gate_up,
            down=flat.pop(p + "mlp.down_proj.weight").contiguous(),
            q_norm=flat.pop(p + "self_attn.q_norm.weight", None),
            k_norm=flat.pop(p + "self_attn.k_norm.weight", None),
        ))
    embed = flat.pop("model.embed_tokens.weight").contiguous()
    lm_head = embed if cfg.tie_word_embeddings else flat.pop("lm_head.weight").contiguous()
    return ModelWeights(embed=embed, layers=layers, final_norm=flat.pop("model.norm.weight"), lm_head=lm_head)


def _fuse_moe_layer(cfg: ModelConfig, flat: dict[str, torch.Tensor], p: str, rope_interleave: bool) -> LayerWeights:
    layer = int(p.split(".")[2])
    qkv = o = gate_up = down = mla = moe = None
    if cfg.is_mla:
        mla = fuse_mla(cfg, flat, p + "self_attn.", rope_interleave)
    else:
        qkv = torch.cat([flat.pop(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")], dim=0)
        o = flat.pop(p + "self_attn.o_proj.weight").contiguous()
    extras = fuse_extras(cfg, flat, p + "self_attn.")
    if cfg.is_moe_layer(layer):
        moe = fuse_moe(cfg, flat, p + "mlp.")
    else:
        gate_up = torch.cat([flat.pop(p + "mlp.gate_proj.weight"), flat.pop(p + "mlp.up_proj.weight")], dim=0)
        down = flat.pop(p + "mlp.down_proj.weight").contiguous()
    return LayerWeights(input_norm=flat.pop(p + "input_layernorm.weight"), qkv=qkv, o=o,
                        post_norm=flat.pop(p + "post_attention_layernorm.weight"), gate_up=gate_up, down=down,
                        q_norm=flat.pop(p + "self_attn.q_norm.weight", None),
                        k_norm=flat.pop(p + "self_attn.k_norm.weight", None), mla=mla, moe=moe, extras=extras)


def hf_state_dict(cfg: ModelConfig, weights: ModelWeights, per_expert: bool = False) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of `weights` as views of tokprof's fused tensors (no copy of the weights; MoE/MLA
    models: see loader_moe.hf_moe_state_dict, `per_expert` picks the on-disk expert names)."""
    q, kv, i = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    out = {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.final_norm,
           "lm_head.weight": weights.lm_head}
    if cfg.is_moe or cfg.is_mla:
        out.update(hf_moe_state_dict(cfg, weights.layers, per_expert))
        return out
    for layer, w in enumerate(weights.layers):
        p = f"model.layers.{layer}."
        out.update({
            p + "input_layernorm.weight": w.input_norm,
            # Row slices of a row-major (N, K) matrix are contiguous views.
            p + "self_attn.q_proj.weight": w.qkv[:q],
            p + "self_attn.k_proj.weight": w.qkv[q:q + kv],
            p + "self_attn.v_proj.weight": w.qkv[q + kv:],
            p + "self_attn.o_proj.weight": w.o,
            p + "post_attention_layernorm.weight": w.post_norm,
            p + "mlp.gate_proj.weight": w.gate_up[:i],
            p + "mlp.up_proj.weight": w.gate_up[i:],
            p + "mlp.down_proj.weight": w.down,
        })
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = w.q_norm
            out[p + "self_attn.k_norm.weight"] = w.k_norm
    return out
