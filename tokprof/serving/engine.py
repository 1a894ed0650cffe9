"""The server: a continuous-batching loop that runs the scheduler's steps on a Transformer's own kernels over one
paged KV block pool, in real time, and records every request's token times.

One step is one forward pass over all the rows the scheduler planned: the decode rows (one token per running
request, ragged context lengths) and the prefill chunks, packed into T rows. Every layer runs the Transformer's own
`_layer` (the same norm, fused QKV, RoPE, KV append, O, gate-up, SwiGLU and down kernels as `generate`); attention
is one `decode_attention` call over the decode rows (per-sequence seq_lens and block tables) and one
`paged_prefill_attention` call over the chunks (each chunk against its cached prefix and itself). The rows that
sample (decodes, last chunks) go through the final norm, LM head and greedy sampling. Greedy outputs are therefore
those of `Transformer.generate` for the same prompts (tested, fp32 on the CPU).

The server takes over the model's KV cache (`model.cache`); `generate` allocates a new one when called afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokprof.kernels import decode_attention, embedding, paged_prefill_attention
from tokprof.kernels._common import skip_value_checks
from tokprof.models.kv_cache import PagedKVCache
from tokprof.models.transformer import Transformer
from tokprof.serving.metrics import ServeSummary, Slo, StepRecord, summarize
from tokprof.serving.scheduler import Request, Scheduler, SchedulerConfig, StepPlan
from tokprof.serving.traffic import Driver, Workload


class ThreadCpuClock:
    """A clock that advances with this thread's CPU time, and jumps over sleeps: on a CPU shared with other
    processes, a server measured on it sees every step take what it takes on a core of its own (the waits for a
    scheduler slice left out), and arrivals keep their spacing. Needs one intra-op torch thread (all the work on
    the calling thread). Figures measured on it say "clock: thread CPU time"."""

    name = "thread CPU time"

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.thread_time() + self.offset_s

    def sleep(self, seconds: float) -> None:
        self.offset_s += max(0.0, seconds)


class ModelRunner:
    """Executes StepPlans on `model` over a pool of `num_blocks` KV blocks (per layer, K and V), plus
    `scratch_blocks` blocks no plan names (block `num_blocks` is where padded decode rows write: graphs.py).
    With `graphs` set (tokprof.serving.graphs.DecodeGraphs), decode-only steps go through it."""

    def __init__(self, model: Transformer, num_blocks: int, scratch_blocks: int = 0) -> None:
        self.model = model
        cfg = model.config
        self.scratch_block = num_blocks if scratch_blocks else None
        self.graphs: Any = None
        num_blocks += scratch_blocks
        shape = (num_blocks, model.block_size, cfg.num_kv_heads, cfg.head_dim)
        k = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.num_layers)]
        v = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.num_layers)]
        # Only k and v are read by the layers; the block tables are the scheduler's, built per step. The cache's
        # own table holds no sequence (batch 0), so `generate` after a server never takes it for its own.
        empty = torch.zeros((0, 1), dtype=torch.int32, device=model.device)
        model.free_cache()
        model.cache = PagedKVCache(k=k, v=v, block_table=empty, slot_of_position=empty.long(),
                                   block_size=model.block_size, capacity_tokens=num_blocks * model.block_size)
        self.cache = model.cache
        self._checked = False

    def _table(self, chunks: list, width: int) -> torch.Tensor:
        table = torch.zeros((len(chunks), width), dtype=torch.int32)
        for i, c in enumerate(chunks):
            table[i, :len(c.request.blocks)] = torch.tensor(c.request.blocks, dtype=torch.int32)
        return table.to(self.model.device)

    @torch.no_grad()
    def execute(self, plan: StepPlan) -> dict[int, int]:
        """Run one step; returns request_id -> the token sampled for every chunk that samples."""
        if self.graphs is not None and self._checked:
            sampled = self.graphs.run(plan)
            if sampled is not None:
                return sampled
        model, device, bs = self.model, self.model.device, self.model.block_size
        cfg, be = model.config, model.backend
        chunks = plan.chunks
        ids, positions, slots = [], [], []
        for c in chunks:
            toks = c.request.tokens[c.start:c.start + c.num_tokens]
            blocks = c.request.blocks
            for p in range(c.start, c.start + c.num_tokens):
                slots.append(blocks[p // bs] * bs + p % bs)
            ids += toks
            positions += range(c.start, c.start + c.num_tokens)
        n_dec, decs, pres = plan.num_decode, plan.decodes, plan.prefills
        ids_t = torch.tensor(ids, dtype=torch.int64, device=device)  # (T,)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=device)  # (T,)
        slots_t = torch.tensor(slots, dtype=torch.int64, device=device)  # (T,)
        if decs:
            table_d = self._table(decs, max(len(c.request.blocks) for c in decs))  # (n_dec, max blocks)
            lens_d = torch.tensor([c.start + 1 for c in decs], dtype=torch.int32, device=device)
        if pres:
            table_p = self._table(pres, max(len(c.request.blocks) for c in pres))  # (n_pre, max blocks)
            cu = [0]
            for c in pres:
                cu.append(cu[-1] + c.num_tokens)
            cu_t = torch.tensor(cu, dtype=torch.int32, device=device)  # (n_pre + 1,)
            lens_p = torch.tensor([c.start + c.num_tokens for c in pres], dtype=torch.int32, device=device)
            max_q = max(c.num_tokens for c in pres)
        hq, d = cfg.num_heads, cfg.head_dim

        def attend(index: int, q: torch.Tensor, _k: torch.Tensor, _v: torch.Tensor) -> torch.Tensor:
            # q (T, Hq, D): decode rows first, then the chunks' rows
            outs = []
            if decs:
                outs.append(decode_attention(q[:n_dec].contiguous(), self.cache.k[index], self.cache.v[index],
                                             table_d, lens_d, backend=be))  # (n_dec, Hq, D)
            if pres:
                outs.append(paged_prefill_attention(q[n_dec:].contiguous(), self.cache.k[index], self.cache.v[index],
                                                    table_p, cu_t, lens_p, max_query_len=max_q,
                                                    backend=be))  # (T - n_dec, Hq, D)
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            return out.reshape(out.shape[0], hq * d)

        def forward() -> dict[int, int]:
            x = embedding(ids_t, model.weights.embed, backend=be)  # (T, H)
            residual = None
            for index in range(cfg.num_layers):
                x, residual = model._layer(index, x, residual, pos_t, slots_t, attend)
            rows, owners, row = [], [], 0
            for c in chunks:
                row += c.num_tokens
                if c.samples:
                    rows.append(row - 1)
                    owners.append(c.request.request_id)
            if not rows:
                return {}
            sel = torch.tensor(rows, dtype=torch.int64, device=device)
            tokens, _ = model._head(x.index_select(0, sel).contiguous(), residual.index_select(0, sel).contiguous())
            return dict(zip(owners, tokens.tolist(), strict=True))

        if not self._checked:  # the first step runs every kernel check; later ones skip the host read-backs
            self._checked = True
            return forward()
        with skip_value_checks():
            return forward()


def enable_graphs(runner: ModelRunner, max_batch: int, max_blocks: int, *, capture: bool) -> None:
    """Decode-only steps of `runner` through padded buffers (CUDA graphs when `capture`): graphs.py. The runner's
    first step still runs eagerly with every check."""
    from tokprof.serving.graphs import DecodeGraphs

    runner.graphs = DecodeGraphs(runner, max_batch=max_batch, max_blocks=max_blocks, capture=capture)


def step_record(plan: StepPlan, start_s: float, end_s: float) -> StepRecord:
    recompute = sum(max(0, min(c.start + c.num_tokens, c.request.recompute_until) - c.start) for c in plan.prefills)
    return StepRecord(start_s, end_s, plan.num_decode, plan.num_prefill_tokens, len(plan.prefills),
                      plan.decode_context_mean, plan.prefill_context_tokens, recompute, plan.decode_context_max)


@dataclass
class ServeRun:
    summary: ServeSummary
    requests: list[Request]
    steps: list[StepRecord]


def check_stalled(plan: StepPlan, sched: Scheduler) -> None:
    if plan.empty and not plan.preempted:
        raise RuntimeError(f"scheduler: no progress with {len(sched.waiting)} waiting and {len(sched.running)} "
                           f"running requests and {sched.pool.num_free} free blocks")


class Server:
    """The continuous-batching server loop on the wall clock."""

    def __init__(self, model: Transformer, config: SchedulerConfig, *,
                 clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
                 graphs: str = "off") -> None:
        """`graphs`: "cuda" replays CUDA graphs of the decode-only steps, padded to captured batch sizes (GPU,
        triton or cuda backend: tokprof.serving.graphs); "padded" runs the same padded forward eagerly (how a CPU
        checks the padding); "off" runs every step eagerly as planned."""
        if config.block_size != model.block_size:
            raise ValueError(f"config.block_size: expected the model's KV page size {model.block_size}, got "
                             f"{config.block_size}")
        if graphs not in ("off", "cuda", "padded"):
            raise ValueError(f"graphs: expected 'off', 'cuda' or 'padded', got {graphs!r}")
        self.model = model
        self.config = config
        self.clock = clock
        self.sleep = sleep
        self.runner = ModelRunner(model, config.num_blocks, scratch_blocks=0 if graphs == "off" else 1)
        if graphs != "off":
            enable_graphs(self.runner, config.max_num_seqs, config.num_blocks, capture=graphs == "cuda")

    def warmup(self, prompt_len: int = 8, steps: int = 3) -> None:
        """A throwaway request through prefill and a few decode steps (first-call costs out of the timed run)."""
        sched = Scheduler(self.config)
        sched.add(Request(-1, list(range(min(prompt_len, self.model.config.vocab_size))), steps, 0.0))
        while sched.has_work:
            plan = sched.schedule()
            sched.update(plan, self.runner.execute(plan), 0.0)
        sched.pool.check()

    def run(self, workload: Workload, slo: Slo, *, meter: object | None = None,
            energy_reason: str | None = None,
            between_steps: Callable[[StepRecord], None] | None = None) -> ServeRun:
        """Serve `workload` in real time. `meter`: an EnergyMeter (begin_window/end_window) to meter the run.
        `between_steps`: called after each step with its record, e.g. tokprof.serving.probe.PairedProbe.after_step
        (which pauses the server's clock while it runs)."""
        sched = Scheduler(self.config)
        driver = Driver(workload)
        steps: list[StepRecord] = []
        if meter is not None:
            meter.begin_window("serve")
        t0 = self.clock()

        def now() -> float:
            return self.clock() - t0

        while not driver.exhausted:
            for req in driver.due(now()):
                sched.add(req)
            if not sched.has_work:
                nxt = driver.next_arrival_s
                if nxt is not None:
                    self.sleep(max(0.0, nxt - now()))
                continue
            start = now()
            plan = sched.schedule()
            check_stalled(plan, sched)
            sampled = self.runner.execute(plan) if not plan.empty else {}
            end = now()
            for req in sched.update(plan, sampled, end):
                driver.finished(req)
            steps.append(step_record(plan, start, end))
            if between_steps is not None:
                between_steps(steps[-1])
        energy_j = None
        if meter is not None:
            energy_j = meter.end_window("serve").energy_j
        sched.pool.check()
        summary = summarize(sched.finished, steps, slo, provenance="measured", energy_j=energy_j,
                            energy_reason=None if energy_j is not None else energy_reason)
        return ServeRun(summary, sched.finished, steps)
