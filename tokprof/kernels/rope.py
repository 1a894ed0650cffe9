"""Rotary position embedding (RoPE), rotate-half convention (GPT-NeoX / Hugging Face Llama), on q and k together.

    q (T, Hq, D), k (T, Hkv, D), positions (T,) int32|int64  ->  (q_rot (T, Hq, D), k_rot (T, Hkv, D))
    out = x * cos + rotate_half(x) * sin,  rotate_half([x1 | x2]) = [-x2 | x1],
    cos, sin = cos(f), sin(f) of f = [freqs | freqs], freqs = positions * inv_freq  (inv_freq (D/2,) float32)

Numerics follow transformers' `LlamaRotaryEmbedding.forward` + `apply_rotary_pos_emb` exactly:
1. inv_freq = 1 / theta ** (arange(0, D, 2) / D) computed in fp32 (HF's default rope init), unless `inv_freq`
   (D/2,) float32 is given (Llama 3.1 scaled variants: ModelConfig.inv_freq());
2. angles in fp32: positions.float() * inv_freq; cos and sin in fp32, then rounded to the model dtype (HF returns
   `cos.to(x.dtype)`);
3. in the model dtype, each product and the sum rounded: out1 = dtype(dtype(x1*c) - dtype(x2*s)),
   out2 = dtype(dtype(x2*c) + dtype(x1*s)). A product of two fp16/bf16 values is exact in fp32, so the kernels
   compute in fp32 and round at the same points, bit-identical to HF up to the last bit of sin/cos.

q and k may be row slices of a fused qkv projection: heads and head_dim contiguous (strides (*, D, 1)), any token
stride. The outputs are new contiguous tensors (not in place).
Memory-bound: 3 FLOP per element (2 multiplies, 1 add; sin/cos not counted) against 2 elements moved.
Backends: torch (reference), triton, cuda (`cuda/rope.cu`, 16-byte vector loads over D, cos/sin in shared memory).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from tokprof.kernels import _cuda
from tokprof.kernels._common import (
    FLOAT_DTYPES,
    Op,
    check_same_device,
    check_same_dtype,
    check_tensor,
    dtype_bytes,
    make_generator,
    new_output,
    randn,
    resolve,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None

INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)


_INV_FREQ_CACHE: dict[tuple[float, int, torch.device], torch.Tensor] = {}


def default_inv_freq(theta: float, head_dim: int, device: torch.device | str) -> torch.Tensor:
    """(head_dim/2,) float32 = 1 / theta ** (arange(0, D, 2) / D), in fp32 as HF's default rope init computes it.

    Cached per (theta, D, device) so a decode step does not rebuild it and a CUDA graph can hold it. It is never
    built during a graph capture: there the kernels that fill it would be recorded, not run.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (float(theta), head_dim, device)
    cached = _INV_FREQ_CACHE.get(key)
    if cached is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"rope: the inv_freq table for theta={theta}, D={head_dim} on {device} is built on the "
                               "first call, which cannot happen inside a CUDA graph capture; call rope once before "
                               "capturing (a warm-up step) or pass inv_freq")
        cached = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        _INV_FREQ_CACHE[key] = cached
    return cached


# --------------------------------------------------------------------------------------------------------- torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2) fp32
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    cos = emb.cos().to(q.dtype)[:, None, :]  # (T, 1, D) in the model dtype, as HF
    sin = emb.sin().to(q.dtype)[:, None, :]
    q_rot = q * cos + _rotate_half(q) * sin
    k_rot = k * cos + _rotate_half(k) * sin
    return q_rot.contiguous(), k_rot.contiguous()


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _rope_heads(x_ptr, out_ptr, stride_x_t, tok, head0, H, c, s, half,
                    HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr):
        # Rotates heads [head0, head0 + BLOCK_HEADS) of token `tok`: x (T, H, D) with token stride stride_x_t,
        # out (T, H, D) contiguous. c, s (BLOCK_HALF,) fp32 already rounded to the dtype.
        dtype = out_ptr.dtype.element_ty
        heads = head0 + tl.arange(0, BLOCK_HEADS)
        mask = (heads[:, None] < H) & (half[None, :] < HALF)
        offs = heads[:, None] * (2 * HALF) + half[None, :]  # (BLOCK_HEADS, BLOCK_HALF) within the token
        x_base = x_ptr + tok * stride_x_t
        x1 = tl.load(x_base + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + offs + HALF, mask=mask, other=0.0).to(tl.float32)
        c2 = c[None, :]
        s2 = s[None, :]
        # Round each product, then the sum, to the dtype: HF's order in the model dtype.
        o1 = (x1 * c2).to(dtype).to(tl.float32) - (x2 * s2).to(dtype).to(tl.float32)
        o2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        out_base = out_ptr + tok * H * (2 * HALF)
        tl.store(out_base + offs, o1.to(dtype), mask=mask)
        tl.store(out_base + offs + HALF, o2.to(dtype), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, pos_ptr, inv_freq_ptr, q_out_ptr, k_out_ptr, Hq, Hkv, stride_q_t, stride_k_t,
                     num_q_blocks, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr):
        # grid (T, num_q_blocks + num_k_blocks): one program per token and block of BLOCK_HEADS heads of q or k.
        tok = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        dtype = q_out_ptr.dtype.element_ty
        half = tl.arange(0, BLOCK_HALF)
        pos = tl.load(pos_ptr + tok).to(tl.float32)
        inv = tl.load(inv_freq_ptr + half, mask=half < HALF, other=0.0)
        ang = pos * inv  # fp32, as HF's positions.float() * inv_freq
        c = tl.cos(ang).to(dtype).to(tl.float32)
        s = tl.sin(ang).to(dtype).to(tl.float32)
        if hb < num_q_blocks:
            _rope_heads(q_ptr, q_out_ptr, stride_q_t, tok, hb * BLOCK_HEADS, Hq, c, s, half,
                        HALF=HALF, BLOCK_HEADS=BLOCK_HEADS)
        else:
            _rope_heads(k_ptr, k_out_ptr, stride_k_t, tok, (hb - num_q_blocks) * BLOCK_HEADS, Hkv, c, s, half,
                        HALF=HALF, BLOCK_HEADS=BLOCK_HEADS)


def _rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, hq, d = q.shape
    hkv = k.shape[1]
    q_out = new_output((num_tokens, hq, d), q.dtype, q.device)
    k_out = new_output((num_tokens, hkv, d), k.dtype, k.device)
    half = d // 2
    block_half = triton.next_power_of_2(half)
    # About 2048 elements (x1 and x2 of BLOCK_HEADS heads) per program: 8 heads at D=128.
    block_heads = max(1, min(triton.next_power_of_2(max(hq, hkv)), 1024 // block_half))
    num_q_blocks = triton.cdiv(hq, block_heads)
    grid = (num_tokens, num_q_blocks + triton.cdiv(hkv, block_heads))
    num_warps = 4 if block_heads * block_half >= 1024 else 2
    _rope_kernel[grid](q, k, positions, inv_freq, q_out, k_out, hq, hkv, q.stride(0), k.stride(0), num_q_blocks,
                       HALF=half, BLOCK_HALF=block_half, BLOCK_HEADS=block_heads, num_warps=num_warps)
    return q_out, k_out


# ---------------------------------------------------------------------------------------------------------- cuda


def _rope_cuda(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, hq, d = q.shape
    hkv = k.shape[1]
    q_out = new_output((num_tokens, hq, d), q.dtype, q.device)
    k_out = new_output((num_tokens, hkv, d), k.dtype, k.device)
    half = d // 2
    esize = q.element_size()
    vec = 16 // esize
    # The vector path needs each half-row 16-byte aligned: D/2 a multiple of the vector width, aligned bases and
    # token strides (a slice of a fused qkv row is aligned when its column offset is).
    vectorised = (half % vec == 0 and all(t.data_ptr() % 16 == 0 for t in (q, k, q_out, k_out))
                  and (q.stride(0) * esize) % 16 == 0 and (k.stride(0) * esize) % 16 == 0)
    work = (hq + hkv) * (half // vec if vectorised else half)  # (head, chunk of the half) items of one token
    threads = min(256, 32 * max(1, -(-work // 32)))
    pos_kind = "i32" if positions.dtype == torch.int32 else "i64"
    name = _cuda.kernel_name(f"rope_{'vec' if vectorised else 'scalar'}_{pos_kind}", q.dtype)
    _cuda.launch("rope", name, q.device, (num_tokens,), (threads,),
                 (q, k, positions, inv_freq, q_out, k_out, hq, hkv, half, q.stride(0), k.stride(0)),
                 shared_mem_bytes=2 * half * 4)  # cos and sin of the token, fp32
    return q_out, k_out


# -------------------------------------------------------------------------------------------------------- public

_IMPLS = {"torch": _rope_torch, "triton": _rope_triton, "cuda": _rope_cuda}


def _check_heads_layout(name: str, t: torch.Tensor) -> None:
    """Heads and head_dim contiguous (strides (*, D, 1)); any token stride, as a slice of a fused qkv row has."""
    _, heads, d = t.shape
    if (heads > 1 and t.stride(1) != d) or (d > 1 and t.stride(2) != 1):
        raise ValueError(f"{name}: expected heads and head_dim contiguous (strides (*, {d}, 1)), got strides "
                         f"{t.stride()} for shape {tuple(t.shape)}; call .contiguous() first")


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *, theta: float = 10000.0,
         inv_freq: torch.Tensor | None = None, backend: str = "triton") -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rot, k_rot): q (T, Hq, D) and k (T, Hkv, D) rotated by position; rounding as HF (module docstring)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    num_tokens, hq, d = q.shape
    if num_tokens == 0:
        raise ValueError("q: expected at least one token (T >= 1), got T=0")
    if d == 0 or d % 2:
        raise ValueError(f"q: expected an even, non-zero head_dim D, got D={d}")
    if hq == 0:
        raise ValueError("q: expected at least one head (Hq >= 1), got Hq=0")
    check_tensor("k", k, shape=(num_tokens, None, d), dtypes=FLOAT_DTYPES)
    if k.shape[1] == 0:
        raise ValueError("k: expected at least one head (Hkv >= 1), got Hkv=0")
    _check_heads_layout("q", q)
    _check_heads_layout("k", k)
    check_tensor("positions", positions, shape=(num_tokens,), dtypes=INDEX_DTYPES, contiguous=True)
    tensors = {"q": q, "k": k, "positions": positions}
    if inv_freq is not None:
        check_tensor("inv_freq", inv_freq, shape=(d // 2,), dtypes=(torch.float32,), contiguous=True)
        tensors["inv_freq"] = inv_freq
    check_same_device(**tensors)
    check_same_dtype(q=q, k=k)
    if inv_freq is None:
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
            raise ValueError(f"theta: expected a positive finite float, got {theta!r}")
        inv_freq = default_inv_freq(float(theta), d, q.device)
    impl = resolve("rope", _IMPLS, backend, q.device)
    return impl(q, k, positions, inv_freq)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    t, hq, hkv, d = shape["T"], shape["Hq"], shape["Hkv"], shape["D"]
    return {
        "q": randn((t, hq, d), dtype, device, gen),
        "k": randn((t, hkv, d), dtype, device, gen),
        "positions": torch.randint(0, 8192, (t,), generator=gen, device=device, dtype=torch.int64),
        "theta": 500000.0,  # Llama 3's base
    }


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    t, hq, hkv, d, b = shape["T"], shape["Hq"], shape["Hkv"], shape["D"], dtype_bytes(dtype)
    elems = t * (hq + hkv) * d
    flops = 3 * elems  # per output element: x*cos, rotate_half(x)*sin, their sum; sin/cos not counted
    min_bytes = 2 * elems * b + t * 8  # read q, k; write q_rot, k_rot; read positions (T,) int64
    return flops, min_bytes


OP = Op(
    name="rope",
    fn=rope,
    impls=_IMPLS,
    shape_keys=("T", "Hq", "Hkv", "D"),
    default_shape={"T": 16, "Hq": 32, "Hkv": 8, "D": 128},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula=("flops = 3*T*(Hq+Hkv)*D (2 multiplies + 1 add per element; sin/cos not counted); "
                  "bytes = 2*T*(Hq+Hkv)*D*dtype_bytes (read q, k; write q_rot, k_rot) + 8*T (positions int64); "
                  "an explicit inv_freq would add 2*D bytes (registry inputs use theta)"),
    description="rotate-half RoPE on q (T, Hq, D) and k (T, Hkv, D), HF Llama rounding order",
    shape_doc="T tokens, Hq query heads, Hkv KV heads, D head_dim (even)",
)
