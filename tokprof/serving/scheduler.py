"""The scheduling policy of the server and of the simulator (one code path for both): continuous batching with
chunked prefill under a token budget, KV blocks per request, preemption by recomputation, optional prefix caching.

Every step (after vLLM's V1 scheduler):
1. Running requests, decodes first, then those in prefill, each in admission order. A request with one uncomputed
   token (the token it sampled last) decodes it; a request still in prefill (or recomputing after a preemption) gets
   a chunk of its uncomputed tokens, up to the token budget left. Blocks for the new tokens are allocated; when none
   are left, the most recently admitted running request not yet scheduled in this step is preempted: its blocks are
   freed and it goes back to the head of the queue, to be recomputed (its prompt and the tokens it generated so far
   prefilled again) when blocks free up.
2. Waiting requests in arrival order while the budget, `max_num_seqs` and the blocks allow: the cached prefix is
   matched (prefix caching), the first chunk scheduled.
The plan lists decodes first, then prefill chunks; the engine packs the rows in that order. A row whose chunk
completes the request's known tokens samples a token (a decode always does; a prefill chunk when it is the last).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokprof.kernels._common import cdiv
from tokprof.serving.blocks import BlockPool


@dataclass(eq=False)  # identity: the scheduler looks requests up in its lists
class Request:
    request_id: int
    prompt: list[int]
    max_new_tokens: int
    arrival_s: float
    session: int = 0
    turn: int = 0
    output: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache (prompt, then generated tokens fed back)
    blocks: list[int] = field(default_factory=list)
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    finish_s: float | None = None
    preemptions: int = 0
    cached_tokens: int = 0  # tokens taken from the prefix cache, over every admission
    recomputed_tokens: int = 0  # tokens prefilled again after preemptions
    recompute_until: int = 0  # tokens below this position are a recomputation (computed before a preemption)
    _registered: int = 0  # full blocks already offered to the prefix cache

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens


@dataclass
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 16  # requests in the running batch at most
    max_num_batched_tokens: int = 256  # the token budget of one step (decode tokens + prefill chunk tokens)
    prefix_caching: bool = False

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")


@dataclass
class Chunk:
    request: Request
    start: int  # num_computed before the step: the position of the chunk's first token
    num_tokens: int
    samples: bool  # whether the row of its last token samples the request's next token


@dataclass
class StepPlan:
    decodes: list[Chunk]  # one token each
    prefills: list[Chunk]
    preempted: list[Request] = field(default_factory=list)

    @property
    def chunks(self) -> list[Chunk]:
        return self.decodes + self.prefills

    @property
    def num_decode(self) -> int:
        return len(self.decodes)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefills)

    @property
    def num_tokens(self) -> int:
        return self.num_decode + self.num_prefill_tokens

    @property
    def decode_context_mean(self) -> float:
        """Mean KV tokens attended per decode row (the token itself included)."""
        return sum(c.start + 1 for c in self.decodes) / len(self.decodes) if self.decodes else 0.0

    @property
    def decode_context_max(self) -> int:
        """The longest KV length of the decode rows (a padded attention kernel costs this for every row)."""
        return max((c.start + 1 for c in self.decodes), default=0)

    @property
    def prefill_context_tokens(self) -> int:
        """Tokens already cached before the prefill chunks (the prefixes the chunks attend to)."""
        return sum(c.start for c in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.pool = BlockPool(config.num_blocks, config.block_size, prefix_caching=config.prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self.num_preemptions = 0

    @property
    def capacity_tokens(self) -> int:
        return self.config.num_blocks * self.config.block_size

    def add(self, request: Request) -> None:
        """Queue a request; refused (ValueError) when it could never fit the whole KV pool alone."""
        need = len(request.prompt) + request.max_new_tokens
        if not request.prompt or request.max_new_tokens < 1:
            raise ValueError(f"request {request.request_id}: expected a non-empty prompt and max_new_tokens >= 1, "
                             f"got {len(request.prompt)} prompt tokens and max_new_tokens={request.max_new_tokens}")
        if need > self.capacity_tokens:
            raise ValueError(f"request {request.request_id}: prompt + max_new_tokens = {need} tokens do not fit the "
                             f"KV pool ({self.capacity_tokens} tokens = {self.config.num_blocks} blocks x "
                             f"{self.config.block_size})")
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------------------------------------- schedule

    def _blocks_needed(self, req: Request, n: int) -> int:
        return max(0, cdiv(req.num_computed + n, self.config.block_size) - len(req.blocks))

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.pool.release(req.blocks)
        req.blocks = []
        req.recomputed_tokens += req.num_computed
        req.recompute_until = max(req.recompute_until, req.num_computed)
        req.num_computed = 0
        req._registered = 0
        req.preemptions += 1
        self.num_preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)
        plan.preempted.append(req)

    def schedule(self) -> StepPlan:
        plan = StepPlan(decodes=[], prefills=[])
        budget = self.config.max_num_batched_tokens
        scheduled: list[Request] = []
        # Decodes first (one token each, so a long prefill never stalls the running batch), then running prefills.
        decoding = [r for r in self.running if r.uncomputed == 1 and r.output]
        prefilling = [r for r in self.running if not (r.uncomputed == 1 and r.output)]
        for req in decoding + prefilling:
            if budget <= 0:
                break
            if req not in self.running:  # preempted earlier in this step
                continue
            n = min(req.uncomputed, budget)
            need = self._blocks_needed(req, n)
            while need > self.pool.num_free:
                # the most recently admitted request not scheduled yet this step; the request itself last
                victims = [r for r in self.running if r is not req and all(r is not s for s in scheduled)]
                self._preempt(victims[-1] if victims else req, plan)
                if not victims:
                    break
            if req not in self.running:
                continue
            req.blocks += self.pool.allocate(need)
            chunk = Chunk(req, req.num_computed, n, samples=req.num_computed + n == req.num_tokens)
            (plan.decodes if req.uncomputed == 1 and req.output else plan.prefills).append(chunk)
            scheduled.append(req)
            budget -= n
        if plan.preempted:  # no admissions in a step that had to preempt: blocks are short
            return plan
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not req.blocks:
                req.blocks = self.pool.match_prefix(req.tokens)
                req.num_computed = len(req.blocks) * self.config.block_size
                req.cached_tokens += req.num_computed
            n = min(req.uncomputed, budget)
            need = self._blocks_needed(req, n)
            if need > self.pool.num_free:
                # leave the prefix hit in place? No: give it back, so that its blocks stay evictable while waiting
                self.pool.release(req.blocks)
                req.cached_tokens -= req.num_computed
                req.blocks, req.num_computed = [], 0
                break
            req.blocks += self.pool.allocate(need)
            self.waiting.popleft()
            self.running.append(req)
            plan.prefills.append(Chunk(req, req.num_computed, n, samples=req.num_computed + n == req.num_tokens))
            budget -= n
        return plan

    # ------------------------------------------------------------------------------------------------ update

    def update(self, plan: StepPlan, sampled: dict[int, int], now_s: float) -> list[Request]:
        """Advance the requests of `plan` after the engine ran it: `sampled` maps request_id -> the token sampled
        for every chunk with samples=True. Returns the requests that finished (their blocks released)."""
        done = []
        for chunk in plan.chunks:
            req = chunk.request
            req.num_computed += chunk.num_tokens
            if self.config.prefix_caching:
                full = req.num_computed // self.config.block_size
                if full > req._registered:
                    self.pool.register(req.blocks, req.tokens, req.num_computed)
                    req._registered = full
            if not chunk.samples:
                continue
            if req.request_id not in sampled:
                raise ValueError(f"sampled: no token for request {req.request_id}, whose chunk samples")
            req.output.append(int(sampled[req.request_id]))
            req.token_times_s.append(now_s)
            if req.first_token_s is None:
                req.first_token_s = now_s
            if req.done:
                req.finish_s = now_s
                self.pool.release(req.blocks)
                req.blocks = []
                self.running.remove(req)
                self.finished.append(req)
                done.append(req)
        return done
