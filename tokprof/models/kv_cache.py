"""A paged KV cache: preallocated pages per layer, a block table per sequence and a precomputed slot map.

    cache = PagedKVCache.allocate(num_layers=32, batch=8, max_tokens=1100, num_kv_heads=8, head_dim=128,
                                  dtype=torch.bfloat16, device="cuda", block_size=16)
    cache.k[layer], cache.v[layer]     # (num_blocks, block_size, Hkv, D)
    cache.block_table                  # (B, max_blocks) int32: page j of sequence b
    cache.slot_of_position             # (B, max_blocks * block_size + 1) int64: flat slot of each position

Token t of sequence b lives at k[layer][block_table[b, t // block_size], t % block_size], i.e. at the flat slot
block_table[b, t // block_size] * block_size + t % block_size, which is what `append_kv` takes.

Pages are handed out interleaved (page j of sequence b is block j * B + b), so a sequence's pages are never
contiguous in memory and every kernel really follows the block table, as under a serving engine's allocator.
The slot map is precomputed so that a decode step finds its write slots with one gather on the device (no host
arithmetic, no sync: the step stays capturable in a CUDA graph). Its last column is a spare that holds a valid slot,
so the gather for the step after the last one stays in bounds; the host refuses to run that step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprof.kernels._common import cdiv, dtype_bytes


@dataclass
class PagedKVCache:
    k: list[torch.Tensor]  # per layer (num_blocks, block_size, Hkv, D); MLA: (num_blocks, block_size, 1, L + R)
    v: list[torch.Tensor]  # per layer (num_blocks, block_size, Hkv, D); empty for MLA
    block_table: torch.Tensor  # (B, max_blocks) int32
    slot_of_position: torch.Tensor  # (B, max_blocks * block_size + 1) int64
    block_size: int
    capacity_tokens: int  # positions per sequence that fit: max_blocks * block_size

    @property
    def batch(self) -> int:
        return int(self.block_table.shape[0])

    @property
    def num_blocks(self) -> int:
        return int(self.k[0].shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @staticmethod
    def bytes_needed(num_layers: int, batch: int, max_tokens: int, num_kv_heads: int, head_dim: int,
                     dtype: torch.dtype, block_size: int = 16) -> int:
        """Bytes of the K and V pages `allocate` would take (the block table and slot map are negligible)."""
        blocks = batch * cdiv(max_tokens, block_size)
        return 2 * num_layers * blocks * block_size * num_kv_heads * head_dim * dtype_bytes(dtype)

    @classmethod
    def allocate(cls, *, num_layers: int, batch: int, max_tokens: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, block_size: int = 16,
                 values: bool = True) -> PagedKVCache:
        """values=False: keys only, no v pages (MLA's latent cache: one row of kv_lora_rank + rope dims per token,
        num_kv_heads=1, head_dim = that width; `k[layer]` holds it)."""
        for name, value in (("num_layers", num_layers), ("batch", batch), ("max_tokens", max_tokens),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        device = torch.device(device)
        max_blocks = cdiv(max_tokens, block_size)
        num_blocks = batch * max_blocks
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # Zero-filled, not empty: a kernel that read a page it should not would see zeros, never stale NaN/inf.
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)] if values else []
        # Interleaved pages: page j of sequence b is block j * B + b.
        seq = torch.arange(batch, dtype=torch.int64)
        page = torch.arange(max_blocks, dtype=torch.int64)
        table = page[None, :] * batch + seq[:, None]  # (B, max_blocks)
        capacity = max_blocks * block_size
        pos = torch.arange(capacity, dtype=torch.int64)
        slots = table.gather(1, (pos // block_size)[None, :].expand(batch, -1)) * block_size + pos % block_size
        spare = slots[:, -1:]  # a valid slot, only ever gathered for a step the host refuses to run
        slot_of_position = torch.cat([slots, spare], dim=1)  # (B, capacity + 1)
        return cls(k=k, v=v, block_table=table.to(torch.int32).to(device),
                   slot_of_position=slot_of_position.to(device), block_size=block_size, capacity_tokens=capacity)

    def fits(self, batch: int, max_tokens: int) -> bool:
        """Whether this cache can hold `batch` sequences of `max_tokens` positions without reallocating."""
        return batch == self.batch and max_tokens <= self.capacity_tokens
