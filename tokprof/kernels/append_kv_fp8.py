"""Quantise-on-append for an FP8 KV cache: write the new tokens' K and V into e4m3 pages, in place.

    k, v (T, Hkv, D) fp32|fp16|bf16; k_cache, v_cache (num_blocks, block_size, Hkv, D) float8_e4m3fn;
    slot_mapping (T,) int32|int64; k_scale, v_scale fp32 (Hkv,) (per head; a per-tensor scale is Hkv equal values)
    -> k_cache[slot] = e4m3(clamp(k[t] / k_scale, +-448)) (same for v)

The scales are static (calibrated, or 1.0 as vLLM's default for fp8_e4m3): decode_attention(..., k_scale=,
v_scale=) multiplies them back. A negative slot skips the token, as in append_kv. Halves the KV bytes a decode
step reads against bf16. Backends: torch (reference) and triton.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tokprof.kernels._common import (
    FLOAT_DTYPES,
    Op,
    check_same_device,
    check_tensor,
    dtype_bytes,
    make_generator,
    randn,
    resolve,
)
from tokprof.kernels.append_kv import INDEX_DTYPES, _append_kv_torch, _check_heads_layout, _check_slots
from tokprof.quant.formats import FP8, FP8_E4M3_MAX

try:
    import triton
    import triton.language as tl

    from tokprof.kernels.quantize_fp8 import round_to_e4m3
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(T, Hkv, D) -> e4m3 with per-head scales (Hkv,): the values the cache holds."""
    return (x.float() / scale[None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8)


def _append_kv_fp8_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    # the copy runs on the bytes: index_copy_ has no float8 kernel on every backend
    _append_kv_torch(quantize_kv(k, k_scale).view(torch.uint8), quantize_kv(v, v_scale).view(torch.uint8),
                     k_cache.view(torch.uint8), v_cache.view(torch.uint8), slot_mapping)


if triton is not None:

    @triton.jit
    def _append_kv_fp8_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, ks_ptr, vs_ptr, stride_k_t,
                              stride_v_t, ROW, D, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
        # grid (T, cdiv(ROW, BLOCK)): ROW = Hkv*D elements of one token; element i belongs to head i // D
        tok = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        mask = (offs < ROW) & ((tl.zeros([BLOCK], dtype=tl.int64) + slot) >= 0)
        head = offs // D
        ks = tl.load(ks_ptr + head, mask=offs < ROW, other=1.0)
        vs = tl.load(vs_ptr + head, mask=offs < ROW, other=1.0)
        kx = tl.load(k_ptr + tok * stride_k_t + offs, mask=mask, other=0.0).to(tl.float32) / ks
        vx = tl.load(v_ptr + tok * stride_v_t + offs, mask=mask, other=0.0).to(tl.float32) / vs
        kq = round_to_e4m3(tl.minimum(tl.maximum(kx, -FP8_MAX), FP8_MAX))  # exact casts below (see quantize_fp8)
        vq = round_to_e4m3(tl.minimum(tl.maximum(vx, -FP8_MAX), FP8_MAX))
        tl.store(k_cache_ptr + slot * ROW + offs, kq.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, vq.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _append_kv_fp8_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    num_tokens, hkv, d = k.shape
    row = hkv * d
    block = min(2048, triton.next_power_of_2(row))
    _append_kv_fp8_kernel[(num_tokens, triton.cdiv(row, block))](
        k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, k.stride(0), v.stride(0), row, d,
        FP8_MAX=FP8_E4M3_MAX, BLOCK=block, num_warps=4 if block >= 1024 else 2)


_IMPLS = {"torch": _append_kv_fp8_torch, "triton": _append_kv_fp8_triton}


def kv_scale_tensor(name: str, scale: Any, hkv: int, device: torch.device) -> torch.Tensor:
    """A float (per tensor) or an fp32 (Hkv,) tensor (per head) -> fp32 (Hkv,) on `device`."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not scale > 0 or scale == float("inf"):
            raise ValueError(f"{name}: expected a positive finite scale, got {scale!r}")
        return torch.full((hkv,), float(scale), dtype=torch.float32, device=device)
    check_tensor(name, scale, shape=(hkv,), dtypes=(torch.float32,), contiguous=True, device=device)
    return scale


def append_kv_fp8(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, *, k_scale: float | torch.Tensor = 1.0,
                  v_scale: float | torch.Tensor = 1.0, backend: str = "triton") -> None:
    """Quantise k, v (T, Hkv, D) to e4m3 by k_scale, v_scale and write them into the fp8 caches at slot_mapping."""
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES)
    num_tokens, hkv, d = k.shape
    if num_tokens == 0 or hkv == 0 or d == 0:
        raise ValueError(f"k: expected a non-empty (T, Hkv, D), got shape {tuple(k.shape)}")
    check_tensor("v", v, shape=(num_tokens, hkv, d), dtypes=FLOAT_DTYPES)
    _check_heads_layout("k", k)
    _check_heads_layout("v", v)
    check_tensor("k_cache", k_cache, shape=(None, None, hkv, d), dtypes=(FP8,), contiguous=True)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), dtypes=(FP8,), contiguous=True)
    check_tensor("slot_mapping", slot_mapping, shape=(num_tokens,), dtypes=INDEX_DTYPES, contiguous=True)
    device = check_same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    ks, vs = kv_scale_tensor("k_scale", k_scale, hkv, device), kv_scale_tensor("v_scale", v_scale, hkv, device)
    impl = resolve("append_kv_fp8", _IMPLS, backend, device)
    _check_slots(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    impl(k, v, k_cache, v_cache, slot_mapping, ks, vs)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    t, hkv, d = shape["T"], shape["Hkv"], shape["D"]
    num_blocks, block_size = shape["num_blocks"], shape["block_size"]
    if t > num_blocks * block_size:
        raise ValueError(f"shape: append_kv_fp8 needs T <= num_blocks * block_size, got T={t}")
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=device)[:t]
    cache = (num_blocks, block_size, hkv, d)
    return {"k": randn((t, hkv, d), dtype, device, gen), "v": randn((t, hkv, d), dtype, device, gen),
            "k_cache": torch.zeros(cache, dtype=FP8, device=device), "v_cache": torch.zeros(cache, dtype=FP8,
                                                                                            device=device),
            "slot_mapping": slots.to(torch.int64), "k_scale": 4.0 / 448, "v_scale": 4.0 / 448}


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    t, hkv, d = shape["T"], shape["Hkv"], shape["D"]
    # read k, v in the model dtype; write one byte per element; slots int64; the (Hkv,) scales twice
    return 0, 2 * t * hkv * d * dtype_bytes(dtype) + 2 * t * hkv * d + 8 * t + 2 * 4 * hkv


OP = Op(
    name="append_kv_fp8",
    fn=append_kv_fp8,
    impls=_IMPLS,
    shape_keys=("T", "Hkv", "D", "block_size", "num_blocks"),
    default_shape={"T": 16, "Hkv": 8, "D": 128, "block_size": 16, "num_blocks": 1024},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula=("flops = 0; bytes = 2*T*Hkv*D*dtype_bytes (read k, v) + 2*T*Hkv*D (write e4m3 cache rows) "
                  "+ 8*T (slots) + 8*Hkv (scales)"),
    description="quantise k, v to e4m3 (per-head scales) and write them into fp8 paged caches",
    shape_doc="T tokens, Hkv KV heads, D head_dim, block_size slots per block, num_blocks blocks in the cache",
)
