"""The KV block pool of a server: blocks handed out per request, reference-counted, freed on completion, and an
optional prefix cache that shares the full blocks of a repeated prompt prefix between requests.

Prefix caching (as vLLM's automatic prefix caching): a full block is named by a hash chained over every token up to
its end, so two requests share block i only when their first (i + 1) * block_size tokens are equal. A cached block
whose last user finishes stays in the cache, evictable: it is reused by a later request with the same prefix, or
taken back (least recently released first) when the free list runs dry. A block is free, evictable or in use (its
refcount counts the requests that hold it), never two of these: `check()` verifies the accounting.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


def block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """The chained hash of every full block of `tokens`: hash i covers tokens[: (i + 1) * block_size]."""
    out, prev = [], 0
    for i in range(len(tokens) // block_size):
        prev = hash((prev, tuple(tokens[i * block_size:(i + 1) * block_size])))
        out.append(prev)
    return out


@dataclass
class BlockStats:
    allocated: int = 0  # blocks handed out fresh (from the free list or by eviction)
    evicted: int = 0  # cached blocks taken back for a new use
    prefix_hit_blocks: int = 0  # blocks reused from the prefix cache


class BlockPool:
    """`num_blocks` blocks of `block_size` tokens; block ids are what a block table holds."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = False) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self._ref = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no request holds, oldest first
        self._hash_of: dict[int, int] = {}  # block -> its prefix hash (cached blocks only)
        self._block_of: dict[int, int] = {}  # prefix hash -> block
        self.stats = BlockStats()

    # --------------------------------------------------------------------------------------------- accounting

    @property
    def num_free(self) -> int:
        """Blocks a new allocation can take: free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def refcount(self, block: int) -> int:
        return self._ref[block]

    def check(self) -> None:
        """Raise AssertionError unless every block is exactly one of free, evictable, in use."""
        free, evictable = set(self._free), set(self._evictable)
        used = {b for b in range(self.num_blocks) if self._ref[b] > 0}
        assert len(free) == len(self._free), "a block is twice on the free list"
        assert not free & evictable and not free & used and not evictable & used, "a block is in two states"
        assert len(free) + len(evictable) + len(used) == self.num_blocks, "a block is lost"
        assert all(self._ref[b] == 0 for b in free | evictable), "a free block has a holder"
        assert all(b in self._hash_of for b in evictable), "an evictable block is not cached"

    # ----------------------------------------------------------------------------------------------- requests

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (refcount 1): from the free list, else by evicting the oldest cached blocks."""
        if n > self.num_free:
            raise RuntimeError(f"allocate: {n} blocks wanted, {self.num_free} free; check can_allocate first")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
                self.stats.evicted += 1
            self._ref[block] = 1
            out.append(block)
        self.stats.allocated += n
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; a block nobody holds goes back (evictable when cached, else free).

        Released in reverse, so that the tail of a sequence, the least shareable part, is evicted first."""
        for block in reversed(blocks):
            if self._ref[block] <= 0:
                raise RuntimeError(f"release: block {block} is not held (double free)")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ------------------------------------------------------------------------------------------- prefix cache

    def match_prefix(self, tokens: Sequence[int]) -> list[int]:
        """The cached blocks of the longest cached prefix of `tokens`, each taken (refcount + 1).

        At most len(tokens) - 1 tokens are matched: the last token must run through the model to give logits."""
        if not self.prefix_caching:
            return []
        hashes = block_hashes(tokens[: max(0, len(tokens) - 1)], self.block_size)
        out = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            out.append(block)
        self.stats.prefix_hit_blocks += len(out)
        return out

    def register(self, blocks: Sequence[int], tokens: Sequence[int], computed: int) -> None:
        """Cache the full blocks among the first `computed` tokens (their K/V are written) of a request."""
        if not self.prefix_caching:
            return
        for i, h in enumerate(block_hashes(tokens[:computed], self.block_size)):
            block = blocks[i]
            if block in self._hash_of:
                continue
            if h in self._block_of:  # the same prefix cached in another block (computed twice): keep the first
                continue
            self._hash_of[block] = h
            self._block_of[h] = block
