"""A runnable Llama / Qwen3 / Qwen3-MoE / DeepSeek-V3 / gpt-oss decoder built only from tokprof's kernels, with a
paged KV cache and greedy decoding (MoE blocks and MLA attention in tokprof.models.moe_layer).

    model = Transformer.from_pretrained("path/to/hf_dir", device="cuda", dtype=torch.bfloat16, backend="triton")
    model = Transformer.random(ModelConfig.from_name("llama-3.1-8b"), device="cuda", dtype=torch.bfloat16, seed=0)
    tokens = model.generate(input_ids, max_new_tokens=32)   # (B, S + 32), prompt first, as transformers returns

One decode step runs exactly the kernel calls of tokprof.models.plan.decode_plan, in that order (embedding; per
layer input norm, fused QKV GEMM, q/k norm for Qwen3, RoPE, KV append, paged decode attention, O GEMM, post-attention
norm, fused gate-up GEMM, SwiGLU, down GEMM; final norm, LM head, greedy sampling), so the bottom-up kernel sum and
the end-to-end run measure the same work. Outside the plan each step also runs four tiny bookkeeping kernels that
advance its state on the device (copy the sampled token into the input buffer, advance positions and sequence
lengths, gather the next write slots); they belong to the L2 -> L3 gap and are counted there. For Qwen3 at batch > 1
the q and k heads are also copied to contiguous rows before their norm (rms_norm takes contiguous rows only).
MoE/MLA/gpt-oss layers follow tokprof.models.plan_moe: the router GEMM, moe_router and fused_moe (DeepSeek's shared
experts appended to the routed ids and weights by two small concatenations outside the plan), the absorbed MLA calls
over a paged latent cache (one row of kv_lora_rank + rope dims per token and layer, no values), gpt-oss's bias adds,
sinks and sliding windows (its sliding layers keep every token in the cache and attend the window). With
`record_routing` each MoE layer adds its tokens per expert to a histogram on the device (`routing_counts()`), which
decode_plan(..., routing=) takes in place of uniform routing.

The decode step is capturable in a CUDA graph: static shapes, a preallocated cache and state buffers updated in
place on the device, no host synchronisation inside the step (`capture_graph`). The public kernels validate token
ids and KV slots with a device read-back; the first eager step of a batch runs those checks, later steps and the
capture skip them (`skip_value_checks`), so neither eager nor graph timings hold host synchronisations.

Batches of equal-length prompts only (no padding): every sequence of a batch sits at the same position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tokprof.kernels import (
    append_kv,
    bias_add,
    decode_attention,
    embedding,
    greedy_sample,
    linear,
    prefill_attention,
    rms_norm,
    rope,
    swiglu,
)
from tokprof.kernels._common import check_backend, parse_dtype, skip_value_checks
from tokprof.kernels.append_kv_fp8 import append_kv_fp8
from tokprof.kernels.linear_w4a16 import linear_w4a16
from tokprof.kernels.linear_w8a8 import linear_w8a8
from tokprof.kernels.quantize_fp8 import quantize_fp8
from tokprof.models.config import ModelConfig
from tokprof.models.kv_cache import PagedKVCache
from tokprof.models.loader import LayerWeights, ModelWeights, load_pretrained
from tokprof.models.loader_moe import moe_weight_tensors, random_extras, random_mla, random_moe
from tokprof.models.moe_layer import (
    MLAAttend,
    SharedExperts,
    mla_attention,
    mla_decode_attend,
    mla_prefill_attend,
    moe_mlp,
)
from tokprof.models.plan import DEFAULT_BLOCK_SIZE  # the plans' page size: both sides measure the same calls
from tokprof.models.plan_moe import RoutingCounts
from tokprof.profiler.timing import restore_stream
from tokprof.quant.formats import QuantizedWeight, quantize_weight
from tokprof.quant.precision import Precision, parse_precision

# Prefill runs in sub-batches of whole prompts of at most this many tokens, so that activations stay small
# (Llama-3.1-8B gate-up output at 16k tokens: 16384 x 28672 x 2 bytes = 0.9 GiB).
DEFAULT_PREFILL_TOKENS = 16384

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DecodeSnapshot:
    """A copy of the decode state (see Transformer.snapshot / restore)."""

    tokens: torch.Tensor  # (B,) int64
    positions: torch.Tensor  # (B,) int64
    seq_lens: torch.Tensor  # (B,) int32
    slots: torch.Tensor  # (B,) int64
    steps_left: int


class Transformer:
    """Weights, a paged KV cache and the decode state of one batch; runs prefill and decode with one backend."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, *, backend: str = "triton",
                 block_size: int = DEFAULT_BLOCK_SIZE, max_prefill_tokens: int = DEFAULT_PREFILL_TOKENS) -> None:
        self.config = config
        self.weights = weights
        self.backend = check_backend(backend)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size: expected a positive int (tokens per KV page), got {block_size!r}")
        self.block_size = block_size
        self.max_prefill_tokens = max_prefill_tokens
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.inv_freq = config.inv_freq().to(self.device)  # (D/2,) fp32, Llama 3.1 scaling applied
        self.source_dir: Path | None = None  # the Hugging Face directory the weights came from, if any
        self.cache: PagedKVCache | None = None
        # Decode state of the current batch, updated in place by every step (device tensors, static addresses).
        self._tokens: torch.Tensor | None = None  # (B,) int64: the token each sequence feeds next
        self._positions: torch.Tensor | None = None  # (B,) int64: the position of that token
        self._seq_lens: torch.Tensor | None = None  # (B,) int32: KV tokens attended, that token included
        self._slots: torch.Tensor | None = None  # (B,) int64: the flat KV slot that token is written to
        self._steps_left = 0  # host-side count of decode steps the cache still holds (no device read-back)
        self._decode_checked = False  # whether a decode step of this batch ran with the value checks
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_out: tuple[torch.Tensor, torch.Tensor] | None = None
        if config.architecture == "gpt_oss" and (config.swiglu_limit, config.swiglu_alpha) != (7.0, 1.702):
            raise ValueError(f"swiglu_limit/swiglu_alpha: fused_moe's gpt_oss activation is gpt-oss's (7.0, 1.702), "
                             f"got ({config.swiglu_limit}, {config.swiglu_alpha})")
        self._shared = SharedExperts(config, self.device)
        # Routing histogram of a real run (record_routing=True): per MoE layer, tokens per expert, on the device.
        self.record_routing = False
        self._routing: list[torch.Tensor] = []
        self._routed_tokens = torch.zeros((), dtype=torch.int64, device=self.device)  # tokens routed per MoE layer
        self.precision: Precision = parse_precision(self.dtype)  # quantize() changes it
        self.kv_scale = 1.0  # per-tensor e4m3 KV scale of an fp8 cache (vLLM's default without calibration)

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cuda",
                        dtype: torch.dtype | str = torch.bfloat16, backend: str = "triton",
                        block_size: int = DEFAULT_BLOCK_SIZE) -> Transformer:
        """Load a local Hugging Face directory (config.json + safetensors, sharded or not); never downloads."""
        config, weights = load_pretrained(directory, torch.device(device), parse_dtype(dtype))
        model = cls(config, weights, backend=backend, block_size=block_size)
        model.source_dir = Path(directory)
        return model

    @classmethod
    def random(cls, config: ModelConfig, device: torch.device | str = "cuda", dtype: torch.dtype | str = torch.bfloat16,
               seed: int = 0, backend: str = "triton", block_size: int = DEFAULT_BLOCK_SIZE,
               std: float = 0.02) -> Transformer:
        """Random weights drawn directly on `device` (normal, std 0.02 as Llama's initializer; norm weights near 1).

        Never zeros (a GEMM on zeros runs faster than on data) and never a download."""
        device, dtype = torch.device(device), parse_dtype(dtype)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

        def normal(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(std)

        def norm_weight(size: int) -> torch.Tensor:
            return torch.randn((size,), generator=gen, device=device, dtype=dtype).mul_(0.1).add_(1.0)

        c = config
        layers = [LayerWeights(
            input_norm=norm_weight(c.hidden_size),
            qkv=None if c.is_mla else normal(c.q_size + 2 * c.kv_size, c.hidden_size),
            o=None if c.is_mla else normal(c.hidden_size, c.q_size),
            post_norm=norm_weight(c.hidden_size),
            gate_up=None if c.is_moe_layer(i) else normal(2 * c.intermediate_size, c.hidden_size),
            down=None if c.is_moe_layer(i) else normal(c.hidden_size, c.intermediate_size),
            q_norm=norm_weight(c.head_dim) if c.qk_norm else None,
            k_norm=norm_weight(c.head_dim) if c.qk_norm else None,
            mla=random_mla(c, normal, norm_weight) if c.is_mla else None,
            moe=random_moe(c, normal) if c.is_moe_layer(i) else None,
            extras=random_extras(c, normal),
        ) for i in range(c.num_layers)]
        embed = normal(c.vocab_size, c.hidden_size)
        lm_head = embed if c.tie_word_embeddings else normal(c.vocab_size, c.hidden_size)
        weights = ModelWeights(embed=embed, layers=layers, final_norm=norm_weight(c.hidden_size), lm_head=lm_head)
        return cls(config, weights, backend=backend, block_size=block_size)

    def quantize(self, dtype: str, kv_dtype: str | None = None) -> Transformer:
        """Quantise the layers' linear weights in place to a low-precision format (tokprof.quant.precision label:
        "fp8", "fp8-block", "mxfp4", "nvfp4", "int4", optionally "+kv-fp8") and/or switch to an fp8 KV cache. The
        embedding and the LM head stay in the model dtype (as the published checkpoints keep them)."""
        precision = parse_precision(dtype, kv_dtype=kv_dtype, activation=self.precision.activation)
        c = self.config
        if (c.is_moe or c.is_mla or c.attention_sinks) and (precision.weight_format or precision.kv_dtype):
            raise ValueError(f"dtype: running MoE/MLA models ({c.name}) with low-precision weights or KV caches is "
                             f"not supported yet (--dtype/--kv-dtype {precision.label!r}); `tokprof rollup --modelled` "
                             "models them, or run in fp32, fp16 or bf16")
        if self.precision.weight_format is not None and precision.weight_format != self.precision.weight_format:
            raise ValueError(f"dtype: the weights are already {self.precision.weight_format}; quantise a fresh model")
        if precision.weight_format is not None and self.precision.weight_format is None:
            for lw in self.weights.layers:
                for name in ("qkv", "o", "gate_up", "down"):
                    setattr(lw, name, quantize_weight(getattr(lw, name), precision.weight_format))
        self.precision = precision
        self.release_graph()
        self.cache = None  # the next prefill allocates the cache in the new KV dtype
        return self

    def _linear(self, x: torch.Tensor, w: torch.Tensor | QuantizedWeight) -> torch.Tensor:
        """x @ w.T with w in the model dtype or quantised (W8A8: the activations quantised per token or group)."""
        if not isinstance(w, QuantizedWeight):
            return linear(x, w, backend=self.backend)
        if w.format in ("fp8", "fp8-block"):
            x_q, x_scale = quantize_fp8(x, group=128 if w.format == "fp8-block" else 0, backend=self.backend)
            return linear_w8a8(x_q, x_scale, w, out_dtype=x.dtype, backend=self.backend)
        return linear_w4a16(x, w, backend=self.backend)

    @property
    def weight_bytes(self) -> int:
        w = self.weights
        tensors = [w.embed, w.final_norm] + ([] if w.lm_head is w.embed else [w.lm_head])
        total = 0
        for lw in w.layers:
            for t in (lw.input_norm, lw.qkv, lw.o, lw.post_norm, lw.gate_up, lw.down, lw.q_norm, lw.k_norm):
                if isinstance(t, QuantizedWeight):
                    total += t.nbytes()
                elif t is not None:
                    tensors.append(t)
            tensors += moe_weight_tensors(lw.mla) + moe_weight_tensors(lw.moe) + moe_weight_tensors(lw.extras)
        return total + sum(t.numel() * t.element_size() for t in tensors)

    # ----------------------------------------------------------------------------------------------- the layers

    def _layer(self, index: int, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
               slots: torch.Tensor, attend: Attend, attend_mla: MLAAttend | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer over T tokens: x (T, H), residual (T, H) or None (layer 0) -> (x, residual) (T, H)."""
        cfg, w, be = self.config, self.weights.layers[index], self.backend
        eps = cfg.rms_norm_eps
        if residual is None:  # layer 0: the embedding output starts the residual stream
            h = rms_norm(x, w.input_norm, eps=eps, backend=be)
            residual = x
        else:
            h, residual = rms_norm(x, w.input_norm, eps=eps, residual=residual, backend=be)
        if w.mla is not None:
            o = mla_attention(cfg, w.mla, h, positions, self.inv_freq, eps, attend_mla, be)  # (T, H)
        else:
            o = self._attention(index, h, positions, slots, attend)
        h, residual = rms_norm(o, w.post_norm, eps=eps, residual=residual, backend=be)
        if w.moe is not None:
            x, ids = moe_mlp(cfg, w.moe, h, self._shared, be)  # (T, H)
            if self.record_routing:
                self._record(index, ids)
            return x, residual
        gate_up = self._linear(h, w.gate_up)  # (T, 2*I)
        x = self._linear(swiglu(gate_up, backend=be), w.down)  # (T, H)
        return x, residual

    def _attention(self, index: int, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                   attend: Attend) -> torch.Tensor:
        """Standard attention (fused QKV, q/k norm, RoPE, KV append, attention, O): h (T, H) -> (T, H)."""
        cfg, w, be = self.config, self.weights.layers[index], self.backend
        eps, hq, hkv, d = cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = self._linear(h, w.qkv)  # (T, q_size + 2*kv_size)
        if w.extras is not None:  # gpt-oss: q/k/v biases
            qkv = bias_add(qkv, w.extras.qkv_bias, backend=be)
        t = qkv.shape[0]
        q_size, kv_size = cfg.q_size, cfg.kv_size
        # Row slices of the fused output: heads and head_dim contiguous, token stride q_size + 2*kv_size.
        q = qkv[:, :q_size].view(t, hq, d)
        k = qkv[:, q_size:q_size + kv_size].view(t, hkv, d)
        v = qkv[:, q_size + kv_size:].view(t, hkv, d)
        if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim per head, before RoPE (rows copied first when T > 1)
            q = rms_norm(q.contiguous().view(t * hq, d), w.q_norm, eps=eps, backend=be).view(t, hq, d)
            k = rms_norm(k.contiguous().view(t * hkv, d), w.k_norm, eps=eps, backend=be).view(t, hkv, d)
        q, k = rope(q, k, positions, inv_freq=self.inv_freq, backend=be)  # (T, Hq, D), (T, Hkv, D)
        if self.precision.kv_dtype == "fp8":  # quantise on append (static per-tensor scale)
            append_kv_fp8(k, v, self.cache.k[index], self.cache.v[index], slots, k_scale=self.kv_scale,
                          v_scale=self.kv_scale, backend=be)
        else:
            append_kv(k, v, self.cache.k[index], self.cache.v[index], slots, backend=be)
        attn = attend(index, q, k, v)  # (T, q_size)
        o = self._linear(attn, w.o)  # (T, H)
        return o if w.extras is None else bias_add(o, w.extras.o_bias, backend=be)

    def _attention_options(self, index: int) -> dict[str, object]:
        """gpt-oss: the softmax scale (YaRN's attention factor folded in), the sinks and, on a sliding layer, the
        window. Other models: none (the kernels' defaults)."""
        extras = self.weights.layers[index].extras
        if extras is None:
            return {}
        window = self.config.sliding_window if self.config.is_sliding_layer(index) else None
        return {"scale": self.config.softmax_scale, "sinks": extras.sinks, "sliding_window": window}

    def _record(self, index: int, ids: torch.Tensor) -> None:
        """Add the tokens per expert of MoE layer `index` to the routing histogram (device ops, no host sync)."""
        moe_index = sum(1 for i in range(index) if self.weights.layers[i].moe is not None)
        if len(self._routing) <= moe_index:
            self._routing.append(torch.zeros(self.config.num_experts, dtype=torch.int64, device=self.device))
        flat = ids.reshape(-1).long()
        # scatter_add, not bincount (which reads the largest id back to the host): capturable in a CUDA graph
        self._routing[moe_index].scatter_add_(0, flat, torch.ones_like(flat))
        if moe_index == 0:
            self._routed_tokens.add_(ids.shape[0])

    def routing_counts(self) -> RoutingCounts:
        """The routing histogram recorded since record_routing was set (tokprof.models.plan_moe.RoutingCounts)."""
        tokens = int(self._routed_tokens)
        if not self._routing or tokens == 0:
            raise RuntimeError("routing_counts: nothing recorded; set model.record_routing = True and run the model")
        return RoutingCounts(counts=[r.tolist() for r in self._routing], tokens=tokens)

    def _head(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm, LM head and greedy sampling: x, residual (B, H) -> (tokens (B,) int64, logits (B, V))."""
        be = self.backend
        h, _ = rms_norm(x, self.weights.final_norm, eps=self.config.rms_norm_eps, residual=residual, backend=be)
        logits = linear(h, self.weights.lm_head, backend=be)  # (B, V) in the model dtype
        return greedy_sample(logits, backend=be), logits

    # ---------------------------------------------------------------------------------------------------- prefill

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompts (B, S) through the model, fill the KV cache, and set up decoding of up to
        `max_new_tokens` tokens. Returns the first new token (B,) int64 and its logits (B, V).

        Prompts run in sub-batches of at most `max_prefill_tokens` tokens (whole prompts; at least one)."""
        ids = self._check_prompt(input_ids)
        batch, seq = ids.shape
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
        self.release_graph()
        self.reserve_cache(batch, seq + max_new_tokens)
        rows = max(1, min(batch, self.max_prefill_tokens // seq))
        firsts, all_logits = [], []
        for start in range(0, batch, rows):
            tokens, logits = self._prefill_rows(ids[start:start + rows], start)
            firsts.append(tokens)
            all_logits.append(logits)
        first = torch.cat(firsts) if len(firsts) > 1 else firsts[0]
        logits = torch.cat(all_logits) if len(all_logits) > 1 else all_logits[0]
        # Decode state: the first new token sits at position `seq`.
        self._tokens = first.clone()
        self._positions = torch.full((batch,), seq, dtype=torch.int64, device=self.device)
        self._seq_lens = torch.full((batch,), seq + 1, dtype=torch.int32, device=self.device)
        self._slots = self.cache.slot_of_position[:, seq].clone()  # own memory: gather writes it
        self._steps_left = self.cache.capacity_tokens - seq
        self._decode_checked = False
        return first, logits

    def _check_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected a (B, S) tensor of token ids (equal-length prompts), got {got}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids: expected dtype int64 or int32, got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids: expected B >= 1 prompts of S >= 1 tokens, got shape {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids: expected ids in [0, {self.config.vocab_size}) (vocab_size), "
                             f"got {lo if lo < 0 else hi}")
        return input_ids.to(device=self.device, dtype=torch.int64).contiguous()

    def _prefill_rows(self, ids: torch.Tensor, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill sequences first_row .. first_row + b - 1 with prompts ids (b, S); returns (tokens (b,), logits)."""
        b, s = ids.shape
        cfg = self.config
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        positions = torch.arange(s, device=self.device, dtype=torch.int64).repeat(b)  # (b*S,)
        slots = self.cache.slot_of_position[first_row:first_row + b, :s].reshape(-1)  # (b*S,)

        def attend(_: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # (b*S, H, D) -> (b, H, S, D), the layout of prefill_attention; then back to (b*S, Hq*D).
            q4 = q.view(b, s, hq, d).transpose(1, 2).contiguous()
            k4 = k.view(b, s, hkv, d).transpose(1, 2).contiguous()
            v4 = v.view(b, s, hkv, d).transpose(1, 2).contiguous()
            out = prefill_attention(q4, k4, v4, causal=True, backend=self.backend,
                                    **self._attention_options(_))  # (b, Hq, S, D)
            return out.transpose(1, 2).reshape(b * s, hq * d)

        x = embedding(ids.reshape(-1), self.weights.embed, backend=self.backend)  # (b*S, H)
        residual = None
        for index in range(cfg.num_layers):
            attend_mla = (mla_prefill_attend(self._latent_cache(index), slots, b, s, cfg, self.backend)
                          if cfg.is_mla else None)
            x, residual = self._layer(index, x, residual, positions, slots, attend, attend_mla)
        # Only the last position of each prompt needs logits.
        x_last = x.view(b, s, -1)[:, -1].contiguous()  # (b, H)
        res_last = residual.view(b, s, -1)[:, -1].contiguous()
        return self._head(x_last, res_last)

    # ----------------------------------------------------------------------------------------------------- decode

    def _decode_body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step on the state buffers, then advance the state in place. No host sync, static shapes."""
        cache = self.cache

        def attend(index: int, q: torch.Tensor, _k: torch.Tensor, _v: torch.Tensor) -> torch.Tensor:
            scales = ({"k_scale": self.kv_scale, "v_scale": self.kv_scale} if self.precision.kv_dtype == "fp8"
                      else {})
            out = decode_attention(q, cache.k[index], cache.v[index], cache.block_table, self._seq_lens,
                                   backend=self.backend, **scales, **self._attention_options(index))  # (B, Hq, D)
            return out.view(out.shape[0], -1)

        x = embedding(self._tokens, self.weights.embed, backend=self.backend)  # (B, H)
        residual = None
        for index in range(self.config.num_layers):
            attend_mla = (mla_decode_attend(self._latent_cache(index), cache.block_table, self._seq_lens, self._slots,
                                            self.config, self.backend) if self.config.is_mla else None)
            x, residual = self._layer(index, x, residual, self._positions, self._slots, attend, attend_mla)
        tokens, logits = self._head(x, residual)  # (B,) int64, (B, V)
        # Bookkeeping for the next step (4 small kernels, outside the plan): all on the device.
        self._tokens.copy_(tokens)
        self._positions.add_(1)
        self._seq_lens.add_(1)
        torch.gather(cache.slot_of_position, 1, self._positions[:, None], out=self._slots[:, None])
        return tokens, logits

    @torch.no_grad()
    def force_next_tokens(self, tokens: torch.Tensor) -> None:
        """Teacher forcing: the next decode step feeds `tokens` (B,) instead of its own greedy choice (accuracy
        comparisons feed a quantised model the reference's tokens, so every step's logits compare like for like)."""
        if self._tokens is None:
            raise RuntimeError("force_next_tokens: no batch is set up; call prefill first")
        check = tokens.to(device=self.device, dtype=torch.int64).view(-1)
        if check.shape != self._tokens.shape:
            raise ValueError(f"tokens: expected shape {tuple(self._tokens.shape)}, got {tuple(tokens.shape)}")
        self._tokens.copy_(check)

    def decode_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One greedy decode step for the whole batch: (tokens (B,) int64, logits (B, V)).

        Replays the captured CUDA graph when there is one; its outputs are then static buffers that the next step
        overwrites (clone what you keep)."""
        if self._tokens is None:
            raise RuntimeError("decode_step: no batch is set up; call prefill(input_ids, max_new_tokens) first")
        if self._steps_left <= 0:
            raise RuntimeError(f"decode_step: the KV cache is full ({self.cache.capacity_tokens} positions per "
                               "sequence); prefill again with a larger max_new_tokens")
        self._steps_left -= 1
        if self._graph is not None:
            self._graph.replay()
            return self._graph_out
        if not self._decode_checked:  # the first step of a batch runs every check, host read-backs included
            self._decode_checked = True
            return self._decode_body()
        # Later steps only advance state the model built itself (slots within the preallocated pages, counted on
        # the host by _steps_left): no value check, so an eager step holds no host synchronisation either.
        with skip_value_checks():
            return self._decode_body()

    @property
    def steps_left(self) -> int:
        return self._steps_left

    def snapshot(self) -> DecodeSnapshot:
        """The decode state now (device copies), to rewind to with `restore`."""
        if self._tokens is None:
            raise RuntimeError("snapshot: no batch is set up; call prefill(input_ids, max_new_tokens) first")
        return DecodeSnapshot(self._tokens.clone(), self._positions.clone(), self._seq_lens.clone(),
                              self._slots.clone(), self._steps_left)

    def restore(self, snap: DecodeSnapshot) -> None:
        """Rewind the decode state to `snap`, in place (a captured graph stays valid; no host sync).

        The steps after the snapshot run again over the same positions, overwriting their KV slots: how an
        end-to-end measurement repeats one context range (for the energy window and the profiler) without drifting
        to longer contexts."""
        if self._tokens is None or snap.tokens.shape != self._tokens.shape:
            raise ValueError("snap: expected a snapshot of the batch set up now (same batch size), taken after the "
                             "last prefill")
        self._tokens.copy_(snap.tokens)
        self._positions.copy_(snap.positions)
        self._seq_lens.copy_(snap.seq_lens)
        self._slots.copy_(snap.slots)
        self._steps_left = snap.steps_left

    def _latent_cache(self, index: int) -> torch.Tensor:
        """MLA: layer `index`'s latent cache (num_blocks, block_size, kv_lora_rank + qk_rope_head_dim), a view."""
        k = self.cache.k[index]
        return k.view(k.shape[0], k.shape[1], k.shape[3])

    def reserve_cache(self, batch: int, max_tokens: int) -> None:
        """Have a KV cache for `batch` sequences of up to `max_tokens` tokens: the one there if it fits (and is not
        over twice the size), else a new zero-filled one. `prefill` calls it; call it first to keep the allocation
        out of a timed prefill (a server allocates its KV cache once, at start-up)."""
        if self.cache is None or not self.cache.fits(batch, max_tokens) or self.cache.capacity_tokens > 2 * max_tokens:
            self.cache = None  # free the old pages before taking new ones
            c = self.config
            mla = c.is_mla  # one latent row per token, no separate values
            self.cache = PagedKVCache.allocate(
                num_layers=c.num_layers, batch=batch, max_tokens=max_tokens,
                num_kv_heads=1 if mla else c.num_kv_heads,
                head_dim=c.kv_lora_rank + c.qk_rope_head_dim if mla else c.head_dim,
                dtype=torch.float8_e4m3fn if self.precision.kv_dtype == "fp8" else self.dtype,
                device=self.device, block_size=self.block_size, values=not mla)

    def free_cache(self) -> None:
        """Give the KV cache and the decode state back (the weights stay)."""
        self.release_graph()
        self.cache = None
        self._tokens = self._positions = self._seq_lens = self._slots = None
        self._steps_left = 0

    @property
    def graph_captured(self) -> bool:
        return self._graph is not None

    @torch.no_grad()
    def capture_graph(self, warmup_steps: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Capture one decode step in a CUDA graph; later decode_step() calls replay it.

        Runs `warmup_steps` real eager steps first, on a side stream as torch requires (they compile and autotune
        the kernels and pass their eager checks); returns their (tokens, logits) so a caller can keep them."""
        if self.device.type != "cuda":
            raise RuntimeError(f"capture_graph: CUDA graphs need a CUDA device, the model is on {self.device}; "
                               "decode eagerly (mode='eager') on the CPU")
        if self._tokens is None:
            raise RuntimeError("capture_graph: call prefill(input_ids, max_new_tokens) first")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps: expected at least 1 (kernels must compile before a capture), "
                             f"got {warmup_steps}")
        self.release_graph()
        if self._steps_left < warmup_steps + 1:
            raise RuntimeError(f"capture_graph: the KV cache holds {self._steps_left} more steps, the warm-up needs "
                               f"{warmup_steps} and the graph at least 1; prefill with a larger max_new_tokens")
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        warm = []
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                warm.append(self.decode_step())
        stream = torch.cuda.current_stream(self.device)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self._decode_body()  # recorded, not run: the state does not advance during the capture
        finally:
            restore_stream(stream)  # a failed capture leaves the capture stream current otherwise
        self._graph, self._graph_out = graph, out
        return warm

    def release_graph(self) -> None:
        self._graph = None
        self._graph_out = None

    # --------------------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, use_graph: bool = False,
                 return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding: input_ids (B, S) -> (B, S + max_new_tokens), prompt first (as transformers returns).

        return_logits: also the logits of every new token, (B, max_new_tokens, V) in the model dtype.
        use_graph: replay a CUDA graph of the decode step after two eager warm-up steps (GPU only)."""
        first, first_logits = self.prefill(input_ids, max_new_tokens)
        tokens, logits = [first], [first_logits]
        remaining = max_new_tokens - 1
        if use_graph and remaining > 2:
            for t, lg in self.capture_graph(warmup_steps=2):
                tokens.append(t)
                logits.append(lg)
            remaining -= 2
        for _ in range(remaining):
            t, lg = self.decode_step()
            if self._graph is not None:  # static graph buffers: keep copies
                t, lg = t.clone(), lg.clone()
            tokens.append(t)
            logits.append(lg)
        self.release_graph()
        out = torch.cat([input_ids.to(device=self.device, dtype=torch.int64), torch.stack(tokens, dim=1)], dim=1)
        return (out, torch.stack(logits, dim=1)) if return_logits else out
