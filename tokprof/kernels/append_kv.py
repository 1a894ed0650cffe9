"""Write the new tokens' K and V into the paged KV cache, in place.

    k, v (T, Hkv, D); k_cache, v_cache (num_blocks, block_size, Hkv, D); slot_mapping (T,) int32|int64
    token t -> slot s = slot_mapping[t] -> k_cache[s // block_size, s % block_size] = k[t] (same for v)

A negative slot (-1, vLLM's PAD_SLOT_ID) skips the token (padding of a CUDA-graph batch). Valid slots must be
distinct: duplicates (which token lands would be unspecified, as in vLLM's reshape_and_cache) are refused by the
value checks.
k and v may be row slices of a fused qkv projection: heads and head_dim contiguous (strides (*, D, 1)), any token
stride. The caches are contiguous.
Pure data movement (0 FLOP): the roof is HBM bandwidth.
Backends: torch (reference), triton, cuda (`cuda/append_kv.cu`, 16-byte vector copies).
"""

from __future__ import annotations

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
    randn,
    resolve,
    value_checks_apply,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None

INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------------------- torch


def _append_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    num_tokens, hkv, d = k.shape
    k_flat = k_cache.view(-1, hkv, d)  # (num_blocks * block_size, Hkv, D)
    v_flat = v_cache.view(-1, hkv, d)
    slots = slot_mapping.long()
    valid = slots >= 0
    # Without a host sync (a boolean index would read the count back, which a CUDA graph cannot capture): padded
    # tokens are redirected to the first valid token and write its values again, so every duplicate write carries
    # the same data. When no token is valid all writes go to slot 0 with slot 0's own contents (a no-op).
    # (index_select, not x[t]: indexing with a 0-dim tensor would read it back to the host.)
    first = torch.argmax(valid.to(torch.int32)).view(1)  # (1,) first valid token (0 when there is none)
    src = torch.where(valid, torch.arange(num_tokens, device=k.device), first)  # (T,) token whose data is written
    dst = torch.where(valid, slots, slots.index_select(0, first)).clamp_min(0)  # (T,) slot written
    any_valid = valid.any()
    for x, flat in ((k, k_flat), (v, v_flat)):
        values = torch.where(any_valid, x.index_select(0, src), flat.index_select(0, dst))  # (T, Hkv, D)
        flat.index_copy_(0, dst, values)


# -------------------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _append_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k_t, stride_v_t, ROW,
                          BLOCK: tl.constexpr):
        # grid (T, cdiv(ROW, BLOCK)): ROW = Hkv*D elements of one token, copied to row `slot` of the flat caches.
        tok = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        # A negative slot skips the token. (Broadcast the scalar test first: the interpreter rejects scalar & vector.)
        mask = (offs < ROW) & ((tl.zeros([BLOCK], dtype=tl.int64) + slot) >= 0)
        kx = tl.load(k_ptr + tok * stride_k_t + offs, mask=mask)
        vx = tl.load(v_ptr + tok * stride_v_t + offs, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + offs, kx, mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, vx, mask=mask)


def _append_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    num_tokens, hkv, d = k.shape
    row = hkv * d
    block = min(2048, triton.next_power_of_2(row))
    grid = (num_tokens, triton.cdiv(row, block))
    num_warps = 4 if block >= 1024 else 2
    _append_kv_kernel[grid](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), row, BLOCK=block,
                            num_warps=num_warps)


# ---------------------------------------------------------------------------------------------------------- cuda


def _append_kv_cuda(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    num_tokens, hkv, d = k.shape
    row = hkv * d
    esize = k.element_size()
    vec = 16 // esize
    # 16-byte copies need every token row 16-byte aligned: row a multiple of the vector width, aligned bases and
    # token strides.
    vectorised = (row % vec == 0 and all(t.data_ptr() % 16 == 0 for t in (k, v, k_cache, v_cache))
                  and (k.stride(0) * esize) % 16 == 0 and (v.stride(0) * esize) % 16 == 0)
    work = 2 * (row // vec if vectorised else row)  # K and V items of one token
    threads = min(256, 32 * max(1, -(-work // 32)))
    slot_kind = "i32" if slot_mapping.dtype == torch.int32 else "i64"
    name = _cuda.kernel_name(f"append_kv_{'vec' if vectorised else 'scalar'}_{slot_kind}", k.dtype)
    _cuda.launch("append_kv", name, k.device, (num_tokens,), (threads,),
                 (k, v, k_cache, v_cache, slot_mapping, row, k.stride(0), v.stride(0)))


# -------------------------------------------------------------------------------------------------------- public

_IMPLS = {"torch": _append_kv_torch, "triton": _append_kv_triton, "cuda": _append_kv_cuda}


def _check_heads_layout(name: str, t: torch.Tensor) -> None:
    """Heads and head_dim contiguous (strides (*, D, 1)); any token stride, as a slice of a fused qkv row has."""
    _, heads, d = t.shape
    if (heads > 1 and t.stride(1) != d) or (d > 1 and t.stride(2) != 1):
        raise ValueError(f"{name}: expected heads and head_dim contiguous (strides (*, {d}, 1)), got strides "
                         f"{t.stride()} for shape {tuple(t.shape)}; call .contiguous() first")


def _check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Every slot in [0, num_slots) or -1 (skip). Reads min and max back to the host: one device sync per call,
    skipped while a CUDA graph is capturing (a capture cannot sync; the captured call was checked when the same
    code ran eagerly before the capture)."""
    if not value_checks_apply(slot_mapping.device):
        return
    lo, hi = (int(x) for x in torch.aminmax(slot_mapping))
    if lo < -1 or hi >= num_slots:
        bad = lo if lo < -1 else hi
        raise ValueError(f"slot_mapping: expected slots in [0, {num_slots}) (num_blocks * block_size) or -1 to skip "
                         f"a token, got {bad}")
    # Two tokens to one slot race on a GPU (which lands is unspecified): refused, like any other bad slot. Part of
    # the value checks, so a timed call (inside skip_value_checks) holds no extra host sync.
    valid = slot_mapping[slot_mapping >= 0]  # (valid tokens,)
    uniq, counts = torch.unique(valid, return_counts=True)
    if uniq.numel() != valid.numel():
        dup = int(uniq[counts > 1][0])
        raise ValueError(f"slot_mapping: expected distinct slots (a slot written by two tokens is a race), got slot "
                         f"{dup} {int(counts.max())} times")


def append_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor, *, backend: str = "triton") -> None:
    """Write k, v (T, Hkv, D) into k_cache, v_cache (num_blocks, block_size, Hkv, D) at slot_mapping (T,); in place."""
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES)
    num_tokens, hkv, d = k.shape
    if num_tokens == 0:
        raise ValueError("k: expected at least one token (T >= 1), got T=0")
    if hkv == 0 or d == 0:
        raise ValueError(f"k: expected non-zero Hkv and D, got shape {tuple(k.shape)}")
    check_tensor("v", v, shape=(num_tokens, hkv, d), dtypes=FLOAT_DTYPES)
    _check_heads_layout("k", k)
    _check_heads_layout("v", v)
    check_tensor("k_cache", k_cache, shape=(None, None, hkv, d), dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), dtypes=FLOAT_DTYPES, contiguous=True)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if num_slots == 0:
        raise ValueError(f"k_cache: expected at least one block of at least one slot, got shape {tuple(k_cache.shape)}")
    check_tensor("slot_mapping", slot_mapping, shape=(num_tokens,), dtypes=INDEX_DTYPES, contiguous=True)
    check_same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    check_same_dtype(k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    impl = resolve("append_kv", _IMPLS, backend, k.device)
    _check_slots(slot_mapping, num_slots)
    impl(k, v, k_cache, v_cache, slot_mapping)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    t, hkv, d = shape["T"], shape["Hkv"], shape["D"]
    num_blocks, block_size = shape["num_blocks"], shape["block_size"]
    if t > num_blocks * block_size:
        raise ValueError(f"shape: append_kv needs T <= num_blocks * block_size for distinct slots, got T={t} and "
                         f"{num_blocks} * {block_size} slots")
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=device)[:t]  # distinct, scattered
    return {
        "k": randn((t, hkv, d), dtype, device, gen),
        "v": randn((t, hkv, d), dtype, device, gen),
        "k_cache": randn((num_blocks, block_size, hkv, d), dtype, device, gen),
        "v_cache": randn((num_blocks, block_size, hkv, d), dtype, device, gen),
        "slot_mapping": slots.to(torch.int64),
    }


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    t, hkv, d, b = shape["T"], shape["Hkv"], shape["D"], dtype_bytes(dtype)
    flops = 0  # a copy
    min_bytes = 2 * t * hkv * d * b + 2 * t * hkv * d * b + t * 8  # read k, v; write their cache rows; slots int64
    return flops, min_bytes


OP = Op(
    name="append_kv",
    fn=append_kv,
    impls=_IMPLS,
    shape_keys=("T", "Hkv", "D", "block_size", "num_blocks"),
    default_shape={"T": 16, "Hkv": 8, "D": 128, "block_size": 16, "num_blocks": 1024},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula=("flops = 0; bytes = 2*T*Hkv*D*dtype_bytes (read k, v) + 2*T*Hkv*D*dtype_bytes (write the cache "
                  "rows) + 8*T (slot_mapping int64)"),
    description="write k, v (T, Hkv, D) into the paged caches (num_blocks, block_size, Hkv, D) at slot_mapping",
    shape_doc="T tokens, Hkv KV heads, D head_dim, block_size slots per block, num_blocks blocks in the cache",
)
