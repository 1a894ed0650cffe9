"""Scheduler invariants, without a model: no request lost or duplicated, every token sampled once and in order,
block accounting balanced after preemption, prefix blocks shared and freed once."""

from __future__ import annotations

import random

import pytest

from tokprof.serving.blocks import BlockPool, block_hashes
from tokprof.serving.scheduler import Request, Scheduler, SchedulerConfig


def drive(sched: Scheduler, requests: list[Request], seed: int = 0, max_steps: int = 10_000) -> list[int]:
    """Add requests at random steps, run to completion with a fake engine (token = position), checking the
    accounting after every step. Returns the decode batch size of every step."""
    rng = random.Random(seed)
    pending = list(requests)
    batches = []
    for step in range(max_steps):
        while pending and rng.random() < 0.5:
            sched.add(pending.pop(0))
        if not sched.has_work:
            if not pending:
                break
            continue
        plan = sched.schedule()
        ids = [id(c.request) for c in plan.chunks]
        assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
        assert plan.num_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        for c in plan.chunks:
            r = c.request
            assert c.start == r.num_computed and 1 <= c.num_tokens <= r.uncomputed
            assert len(r.blocks) * sched.config.block_size >= c.start + c.num_tokens  # room for the chunk's K/V
        sampled = {c.request.request_id: c.start + c.num_tokens for c in plan.chunks if c.samples}
        sched.update(plan, sampled, float(step))
        sched.pool.check()
        held = sum(len(r.blocks) for r in sched.running)
        if not sched.config.prefix_caching:
            assert held == sched.pool.num_used, "blocks held by requests != blocks in use"
        batches.append(plan.num_decode)
    else:
        raise AssertionError("did not drain")
    return batches


def make_requests(n: int, seed: int, vocab: int = 50, shared_prefix: list[int] | None = None) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = (shared_prefix or []) + [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        out.append(Request(i, prompt, rng.randint(1, 20), 0.0))
    return out


@pytest.mark.parametrize("num_blocks,prefix", [(200, False), (18, False), (18, True), (40, True)])
def test_no_request_lost_or_duplicated_and_blocks_balanced(num_blocks, prefix):
    cfg = SchedulerConfig(num_blocks=num_blocks, block_size=4, max_num_seqs=6, max_num_batched_tokens=24,
                          prefix_caching=prefix)
    sched = Scheduler(cfg)
    reqs = make_requests(30, seed=num_blocks, shared_prefix=[7] * 9 if prefix else None)
    drive(sched, reqs, seed=1)
    assert sorted(r.request_id for r in sched.finished) == list(range(30))
    for r in sched.finished:
        # every output token sampled exactly once, in order: the fake engine samples the position it reached
        assert r.output == list(range(len(r.prompt), len(r.prompt) + r.max_new_tokens)), r.request_id
        assert r.blocks == [] and r.finish_s is not None and len(r.token_times_s) == r.max_new_tokens
    assert sched.pool.num_free == num_blocks  # every block back (free or evictable)
    if num_blocks == 18:
        assert sched.num_preemptions > 0  # the small pool really preempted
        assert any(r.recomputed_tokens > 0 for r in sched.finished)


def test_request_that_cannot_fit_is_refused():
    sched = Scheduler(SchedulerConfig(num_blocks=2, block_size=4))
    with pytest.raises(ValueError, match="do not fit the KV pool"):
        sched.add(Request(0, [1] * 6, 3, 0.0))


def test_prefix_blocks_shared_and_freed_once():
    pool = BlockPool(8, 4, prefix_caching=True)
    tokens = list(range(10))
    a = pool.allocate(3)  # request A: 10 tokens -> 3 blocks, 2 full
    pool.register(a, tokens, 10)
    b = pool.match_prefix(tokens + [99])  # B shares A's two full blocks
    assert b == a[:2] and pool.refcount(a[0]) == 2 and pool.refcount(a[2]) == 1
    pool.release(a)  # A finishes: shared blocks still held by B, A's tail block freed
    assert pool.refcount(a[0]) == 1 and pool.refcount(a[2]) == 0
    pool.check()
    pool.release(b)  # B finishes: the cached blocks become evictable, not free twice
    pool.check()
    assert pool.num_free == 8
    with pytest.raises(RuntimeError, match="double free"):
        pool.release(b)
    c = pool.match_prefix(tokens)  # still cached: a later request hits them
    assert c == a[:2]
    pool.release(c)
    # Evicted only when the free list runs dry, oldest first, and then no longer matched.
    fresh = pool.allocate(8)
    assert sorted(fresh) == list(range(8)) and pool.stats.evicted == 2
    assert pool.match_prefix(tokens) == []
    pool.release(fresh)
    pool.check()


def test_block_hashes_chain_over_the_whole_prefix():
    assert len(block_hashes(list(range(9)), 4)) == 2
    # same second block, different first block: different hash for block 1
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)[1] != block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)[1]


def test_decodes_never_wait_behind_a_long_prefill():
    # one request decoding, then a long prompt arrives: every step still decodes the first request
    sched = Scheduler(SchedulerConfig(num_blocks=100, block_size=4, max_num_seqs=4, max_num_batched_tokens=8))
    sched.add(Request(0, [1, 2], 10, 0.0))
    sched.update(sched.schedule(), {0: 5}, 0.0)
    sched.add(Request(1, list(range(40)), 2, 0.0))
    for step in range(5):
        plan = sched.schedule()
        assert plan.num_decode == 1 and plan.num_prefill_tokens == 7  # the budget's other 7 tokens go to prefill
        sched.update(plan, {c.request.request_id: 5 for c in plan.chunks if c.samples}, float(step))
