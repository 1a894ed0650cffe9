"""Write multi-head latent attention's compressed KV into its paged cache: one row per token, shared by all heads.

    latent (T, L) (the kv_a_layernorm output), k_rope (T, R) (the roped key part, shared by the heads),
    kv_cache (num_blocks, block_size, L + R), slot_mapping (T,)  ->  kv_cache[slot] = [latent | k_rope], in place

Token t goes to flat slot s = slot_mapping[t]: kv_cache[s // block_size, s % block_size]. Both inputs may be row
slices (any token stride, the last dimension contiguous). A copy: memory-bound.
Backends: torch (index_copy_, the reference) and triton (one program per token).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tokprof.kernels._common import (
    FLOAT_DTYPES,
    Op,
    check_same_device,
    check_same_dtype,
    check_tensor,
    dtype_bytes,
    make_generator,
    randn,
    resolve,
    value_checks_apply,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None

INDEX_DTYPES = (torch.int32, torch.int64)


def _append_mla_kv_torch(latent: torch.Tensor, k_rope: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    flat = kv_cache.view(-1, kv_cache.shape[-1])  # (num_slots, L + R)
    flat.index_copy_(0, slot_mapping.to(torch.int64), torch.cat([latent, k_rope], dim=1))


if triton is not None:

    @triton.jit
    def _append_mla_kv_kernel(latent_ptr, rope_ptr, cache_ptr, slot_ptr, stride_l_t, stride_r_t, L, R,
                              BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
        # grid (T,): token t's latent row and rope row go to row `slot` of the flat cache (row width L + R).
        tok = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        row = cache_ptr + slot * (L + R)
        offs_l = tl.arange(0, BLOCK_L)
        for start in range(0, L, BLOCK_L):
            mask = (start + offs_l) < L
            x = tl.load(latent_ptr + tok * stride_l_t + start + offs_l, mask=mask)
            tl.store(row + start + offs_l, x, mask=mask)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        xr = tl.load(rope_ptr + tok * stride_r_t + offs_r, mask=mask_r)
        tl.store(row + L + offs_r, xr, mask=mask_r)


def _append_mla_kv_triton(latent: torch.Tensor, k_rope: torch.Tensor, kv_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    t, lat = latent.shape
    r = k_rope.shape[1]
    block_l = min(1024, triton.next_power_of_2(lat))
    _append_mla_kv_kernel[(t,)](latent, k_rope, kv_cache, slot_mapping, latent.stride(0), k_rope.stride(0), lat, r,
                                BLOCK_L=block_l, BLOCK_R=triton.next_power_of_2(r), num_warps=4)


_IMPLS = {"torch": _append_mla_kv_torch, "triton": _append_mla_kv_triton}


def append_mla_kv(latent: torch.Tensor, k_rope: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  *, backend: str = "triton") -> None:
    """kv_cache[slot_mapping[t]] = [latent[t] | k_rope[t]] for latent (T, L), k_rope (T, R) and kv_cache
    (num_blocks, block_size, L + R); in place. Slots must be distinct and in [0, num_blocks * block_size)."""
    check_tensor("latent", latent, ndim=2, dtypes=FLOAT_DTYPES)
    t, lat = latent.shape
    if t == 0 or lat == 0:
        raise ValueError(f"latent: expected a non-empty (T, L), got {tuple(latent.shape)}")
    check_tensor("k_rope", k_rope, ndim=2, dtypes=FLOAT_DTYPES)
    if k_rope.shape[0] != t or k_rope.shape[1] == 0:
        raise ValueError(f"k_rope: expected shape (T={t}, R >= 1), got {tuple(k_rope.shape)}")
    for name, x in (("latent", latent), ("k_rope", k_rope)):
        if x.stride(1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dimension, got strides {x.stride()}")
    r = k_rope.shape[1]
    check_tensor("kv_cache", kv_cache, shape=(None, None, lat + r), dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("slot_mapping", slot_mapping, shape=(t,), dtypes=INDEX_DTYPES, contiguous=True)
    check_same_device(latent=latent, k_rope=k_rope, kv_cache=kv_cache, slot_mapping=slot_mapping)
    check_same_dtype(latent=latent, k_rope=k_rope, kv_cache=kv_cache)
    impl = resolve("append_mla_kv", _IMPLS, backend, latent.device)
    num_slots = kv_cache.shape[0] * kv_cache.shape[1]
    if value_checks_apply(slot_mapping.device):  # one host read-back, skipped in timed and captured calls
        lo, hi = (int(x) for x in torch.aminmax(slot_mapping))
        if lo < 0 or hi >= num_slots:
            raise ValueError(f"slot_mapping: expected slots in [0, {num_slots}) (num_blocks * block_size), "
                             f"got {lo if lo < 0 else hi}")
    impl(latent, k_rope, kv_cache, slot_mapping)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    t, lat, r = shape["T"], shape["L"], shape["R"]
    num_blocks, block_size = shape["num_blocks"], shape["block_size"]
    if t > num_blocks * block_size:
        raise ValueError(f"shape: append_mla_kv needs T <= num_blocks * block_size for distinct slots, got T={t} "
                         f"and {num_blocks} * {block_size} slots")
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=device)[:t]
    return {"latent": randn((t, lat), dtype, device, gen), "k_rope": randn((t, r), dtype, device, gen),
            "kv_cache": randn((num_blocks, block_size, lat + r), dtype, device, gen),
            "slot_mapping": slots.to(torch.int64)}


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    t, lat, r = shape["T"], shape["L"], shape["R"]
    return 0, 2 * t * (lat + r) * dtype_bytes(dtype) + 8 * t  # read the rows, write them; slots int64


OP = Op(
    name="append_mla_kv",
    fn=append_mla_kv,
    impls=_IMPLS,
    shape_keys=("T", "L", "R", "block_size", "num_blocks"),
    default_shape={"T": 16, "L": 512, "R": 64, "block_size": 16, "num_blocks": 1024},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula="flops = 0; bytes = 2*T*(L+R)*dtype_bytes (read latent and k_rope, write the cache rows) + 8*T",
    description="write MLA's compressed KV [latent | k_rope] (one row per token) into the paged cache",
    shape_doc="T tokens, L kv_lora_rank, R qk_rope_head_dim, block_size slots per block, num_blocks blocks",
)
