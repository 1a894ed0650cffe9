"""Step times for the simulator: how long one scheduler step takes, from its shape (decode rows and their mean
context, prefill chunk tokens and their cached prefix).

- `MeasuredStepTable`: measured on this device through the server's own runner: decode steps over batch x context
  and prefill chunks over chunk size, medians of a few repeats, interpolated (linear, extrapolated from the last two
  points past the grid). A mixed step (decode rows + chunk tokens in one forward) costs decode(B, context) + what a
  chunk adds to a decode step, measured on mixed steps of a few batches at one context and interpolated over batch
  and chunk size. (Without mixed measurements, e.g. an older table: prefill(chunk) - fixed, where fixed is a
  one-token step; that read 6-8% under the server's mixed steps on a CPU: two attention calls and their
  concatenation, and the sampled rows of the chunk.)
- `ModelledStepTime`: for a GPU of the spec table, no measurement: every kernel call of the step at its datasheet
  roofline divided by a stated efficiency (tokprof.rollup.project's convention), plus a stated per-step overhead.
The scheduler's own host time per step is added by the simulator (measured on its calls, or stated).
"""

from __future__ import annotations

import bisect
import functools
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from tokprof.kernels._common import cdiv
from tokprof.serving.scheduler import Chunk, Request, StepPlan


@dataclass(frozen=True)
class StepShape:
    num_decode: int
    decode_context_mean: float  # KV tokens per decode row, the new token included
    num_prefill_tokens: int
    num_prefill_seqs: int
    prefill_context_tokens: int  # tokens cached before the chunks, summed
    decode_context_max: float = 0.0  # the longest decode row's KV length (0: take the mean)

    @classmethod
    def of(cls, plan: StepPlan) -> StepShape:
        return cls(plan.num_decode, plan.decode_context_mean, plan.num_prefill_tokens, len(plan.prefills),
                   plan.prefill_context_tokens, plan.decode_context_max)

    @classmethod
    def of_record(cls, st: Any) -> StepShape:
        """The shape of a recorded step (tokprof.serving.metrics.StepRecord)."""
        return cls(st.num_decode, st.decode_context_mean, st.num_prefill_tokens, st.num_prefill_seqs,
                   st.prefill_context_tokens, st.decode_context_max)

    def decode_only(self) -> StepShape:
        return StepShape(self.num_decode, self.decode_context_mean, 0, 0, 0, self.decode_context_max)


class StepTimeModel(Protocol):
    provenance: str  # "measured" (interpolated measurements) or "modelled"

    def step_time_s(self, shape: StepShape) -> float: ...

    def describe(self) -> str: ...


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), xs increasing; past either end, the line through the last two points
    (never below zero)."""
    if len(xs) == 1:
        return ys[0]
    i = bisect.bisect_right(xs, x) - 1
    i = min(max(i, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def context_axis(backend: str) -> str:
    """The context a decode step's cost follows: "max", its longest row (the torch reference pads every row's
    gather to it), or "mean" (the Triton and CUDA kernels stop at each row's own length)."""
    return "max" if backend == "torch" else "mean"


def decode_context(step: Any, axis: str) -> float:
    """A step's (StepShape or StepRecord) decode context on `axis`."""
    if axis == "max" and step.decode_context_max:
        return step.decode_context_max
    return step.decode_context_mean


def brackets(xs: Sequence[float], x: float) -> list[tuple[int, float]]:
    """The grid points (index, weight) that linear interpolation at x reads, inside the grid; past an end, that
    end alone (held, not extrapolated)."""
    if x <= xs[0] or len(xs) == 1:
        return [(0, 1.0)]
    if x >= xs[-1]:
        return [(len(xs) - 1, 1.0)]
    i = bisect.bisect_right(xs, x) - 1
    w = (x - xs[i]) / (xs[i + 1] - xs[i])
    return [(i, 1.0 - w), (i + 1, w)]


@dataclass
class MeasuredStepTable:
    batches: list[int]
    contexts: list[int]
    decode_s: list[list[float]]  # [batch index][context index], seconds of one decode step (mean)
    chunks: list[int]
    prefill_s: list[float]  # seconds of one step holding one prefill chunk of that many tokens (mean)
    device: str
    repeats: int
    cpu_load_note: str | None = None
    context_axis: str = "mean"  # "max" or "mean": the context a decode step's cost follows (context_axis())
    provenance: str = "measured"
    notes: list[str] = field(default_factory=list)
    # mixed steps: mixed_batches decode rows at context mixed_context plus one prefill chunk of each of `chunks`
    mixed_batches: list[int] = field(default_factory=list)
    mixed_context: int = 0
    mixed_s: list[list[float]] = field(default_factory=list)  # [mixed batch index][chunk index], seconds (mean)

    @property
    def fixed_s(self) -> float:
        return self.decode_s[0][0]

    def decode_time_s(self, batch: float, context: float) -> float:
        per_batch = [interp(self.contexts, row, context) for row in self.decode_s]
        return interp(self.batches, per_batch, batch)

    def prefill_time_s(self, tokens: float) -> float:
        return interp(self.chunks, self.prefill_s, tokens)

    def chunk_added_s(self, batch: float, tokens: float) -> float:
        """What a prefill chunk of `tokens` adds to a decode step of `batch` rows."""
        if not self.mixed_s:
            return max(0.0, self.prefill_time_s(tokens) - self.fixed_s)
        added = [interp(self.chunks, [m - self.decode_time_s(b, self.mixed_context) for m in row], tokens)
                 for b, row in zip(self.mixed_batches, self.mixed_s, strict=True)]
        return max(0.0, interp(self.mixed_batches, added, batch))

    def step_time_s(self, shape: StepShape) -> float:
        if shape.num_prefill_tokens == 0:
            return self.decode_time_s(shape.num_decode, self._context(shape)) if shape.num_decode else 0.0
        if not shape.num_decode:
            return self.prefill_time_s(shape.num_prefill_tokens)
        # Several chunks in one step are taken as one of their total: measured against the server's two- and
        # three-chunk steps, that read within 2% (each chunk's own cost summed, within 2% too).
        return (self.decode_time_s(shape.num_decode, self._context(shape))
                + self.chunk_added_s(shape.num_decode, shape.num_prefill_tokens))

    def _context(self, shape: StepShape) -> float:
        return decode_context(shape, self.context_axis)

    def describe(self) -> str:
        mixed = (f", mixed steps of batch {self.mixed_batches} at context {self.mixed_context} with each chunk"
                 if self.mixed_s else "")
        return (f"measured on {self.device}: decode steps over batch {self.batches} x context {self.contexts}, "
                f"prefill chunks of {self.chunks} tokens{mixed}, mean of {self.repeats}+ samples, interpolated")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MeasuredStepTable:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _fake_request(rid: int, tokens: int, vocab: int, rng: random.Random, decode: bool) -> Request:
    ids = [rng.randrange(vocab) for _ in range(tokens)]
    if decode:  # `tokens - 1` cached, the last one (a generated token) to decode
        return Request(rid, ids[:-1], 2, 0.0, output=ids[-1:], num_computed=tokens - 1)
    return Request(rid, ids, 1, 0.0)


def mixed_grid(batches: Sequence[int], contexts: Sequence[int]) -> tuple[list[int], int]:
    """The mixed steps' batches (the smallest, a middle one, the largest) and context (a middle one)."""
    b = sorted(batches)
    return sorted({b[0], b[len(b) // 2], b[-1]}), sorted(contexts)[(len(contexts) - 1) // 2]


def table_blocks(batches: Sequence[int], contexts: Sequence[int], chunks: Sequence[int], block_size: int) -> int:
    """KV blocks the largest synthetic step of a table needs."""
    mb, mc = mixed_grid(batches, contexts)
    return max(max(batches) * cdiv(max(contexts), block_size),
               max(mb) * cdiv(mc, block_size) + cdiv(max(chunks), block_size))


def table_plans(batches: Sequence[int], contexts: Sequence[int], chunks: Sequence[int], *, block_size: int,
                vocab: int, seed: int = 0) -> list[tuple[tuple[str, int, int], StepPlan]]:
    """The table's synthetic steps: (("decode", batch index, context index) | ("prefill", chunk index, 0) |
    ("mixed", mixed batch index, chunk index), plan).

    Each step's decode rows hold a shuffled range of blocks from 0 (their contents are whatever the pool holds:
    timing only): a server's requests hold blocks scattered over its pool after a few admissions and completions,
    and a gather from scattered blocks is slower than from consecutive ones. (Blocks drawn at random from a pool
    as large as the server's read 5-10% slow at the full batch instead: a server allocates its running requests'
    blocks one step at a time from a free list, interleaved, not at random.) A chunk's blocks follow the rows'."""
    rng = random.Random(seed)

    def decode_rows(b: int, ctx: int) -> list[Chunk]:
        per = cdiv(ctx, block_size)
        ids = list(range(b * per))
        rng.shuffle(ids)
        rows = []
        for i in range(b):
            r = _fake_request(i, ctx, vocab, rng, decode=True)
            r.blocks = ids[i * per:(i + 1) * per]
            rows.append(Chunk(r, ctx - 1, 1, True))
        return rows

    def chunk(rid: int, n: int, first_block: int) -> Chunk:
        r = _fake_request(rid, n, vocab, rng, decode=False)
        r.blocks = list(range(first_block, first_block + cdiv(n, block_size)))
        return Chunk(r, 0, n, True)

    out: list[tuple[tuple[str, int, int], StepPlan]] = []
    for bi, b in enumerate(batches):
        for ci, ctx in enumerate(contexts):
            out.append((("decode", bi, ci), StepPlan(decode_rows(b, ctx), [])))
    for ni, n in enumerate(chunks):
        out.append((("prefill", ni, 0), StepPlan([], [chunk(0, n, 0)])))
    mixed_batches, ctx = mixed_grid(batches, contexts)
    for bi, b in enumerate(mixed_batches):
        for ni, n in enumerate(chunks):
            out.append((("mixed", bi, ni), StepPlan(decode_rows(b, ctx), [chunk(b, n, b * cdiv(ctx, block_size))])))
    return out


def table_from_samples(samples: Mapping[tuple[str, int, int], Sequence[float]], *, batches: Sequence[int],
                       contexts: Sequence[int], chunks: Sequence[int], model: Any, repeats: int,
                       cpu_load_note: str | None, notes: list[str]) -> MeasuredStepTable:
    """A MeasuredStepTable of each shape's mean (keys as table_plans gives them): a request's time per output token
    is a mean over its steps, slow ones included, so a table must be the mean of its shapes' samples (a median, or
    a mean without the slow tail, read 1-3% under the server's own forward passes, which queueing amplifies
    several times in TPOT)."""

    def typical(key: tuple[str, int, int]) -> float:
        return statistics.fmean(samples[key])

    decode_s = [[typical(("decode", bi, ci)) for ci in range(len(contexts))] for bi in range(len(batches))]
    prefill_s = [typical(("prefill", ni, 0)) for ni in range(len(chunks))]
    mixed_batches, mixed_context = mixed_grid(batches, contexts)
    mixed_s = [[typical(("mixed", bi, ni)) for ni in range(len(chunks))] for bi in range(len(mixed_batches))]
    return MeasuredStepTable(list(batches), list(contexts), decode_s, list(chunks), prefill_s,
                             device=str(model.device), repeats=repeats, cpu_load_note=cpu_load_note,
                             context_axis=context_axis(model.backend), notes=notes,
                             mixed_batches=mixed_batches, mixed_context=mixed_context, mixed_s=mixed_s)


def measure_step_table(runner: Any, *, batches: Sequence[int], contexts: Sequence[int], chunks: Sequence[int],
                       repeats: int = 5, passes: int = 1, seed: int = 0,
                       clock: Callable[[], float] = time.perf_counter, clock_name: str = "wall") -> MeasuredStepTable:
    """Time `runner.execute` (tokprof.serving.engine.ModelRunner) on synthetic steps of each shape (table_plans),
    `repeats` times per shape in each of `passes` passes over the shapes (a CPU whose speed drifts over seconds
    then weighs on every shape alike, not on the shapes timed in one stretch).

    The pool must hold max(batches) x the blocks of max(contexts) + 1 tokens, and max(chunks) tokens."""
    from tokprof.profiler.cpu_load import CpuLoad

    for name, value in (("repeats", repeats), ("passes", passes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    model = runner.model
    pool_blocks = runner.cache.k[0].shape[0]
    need = table_blocks(batches, contexts, chunks, model.block_size)
    if need > pool_blocks:
        raise ValueError(f"runner: its pool of {pool_blocks} blocks cannot hold the table's largest step "
                         f"({need} blocks)")
    meter = CpuLoad.start()
    plans = table_plans(batches, contexts, chunks, block_size=model.block_size, vocab=model.config.vocab_size,
                        seed=seed)
    samples: dict[tuple[str, int, int], list[float]] = {key: [] for key, _ in plans}
    for _, plan in plans:
        runner.execute(plan)  # warm
    for _ in range(passes):
        for key, plan in plans:
            for _ in range(repeats):
                t0 = clock()
                runner.execute(plan)
                samples[key].append(clock() - t0)
    load = meter.stop()
    return table_from_samples(samples, batches=batches, contexts=contexts, chunks=chunks, model=model,
                              repeats=repeats * passes, cpu_load_note=load.note(), notes=[f"clock: {clock_name}"])


@dataclass
class ModelledStepTime:
    """Step times of `config` on GPU `gpu` (spec-table key), no measurement. By default through tokprof's step model
    (tokprof.rollup.step_model.StepModel, CUDA-graph execution: per-op efficiency curves and call latency, plus its
    per-step overhead and launches), the model `tokprof rollup --modelled` and `tokprof validate` use; with
    `efficiency` stated, every call at the datasheet roofline divided by it, plus `overhead_s` (0 unless stated).
    A stated `overhead_s` replaces the step model's overhead too."""

    config: Any  # ModelConfig
    gpu: str
    dtype: str = "bf16"
    efficiency: float | None = None
    overhead_s: float | None = None
    block_size: int = 16
    step_model: Any = None  # a StepModel; None: StepModel(execution="graph")
    provenance: str = "modelled"

    def __post_init__(self) -> None:
        from tokprof.rollup.project import resolve_gpu
        from tokprof.rollup.step_model import StepModel

        self._spec = resolve_gpu(self.gpu)
        if self.efficiency is not None and not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency: expected a fraction of the roofline in (0, 1], got {self.efficiency!r}")
        if self.overhead_s is not None and not self.overhead_s >= 0:
            raise ValueError(f"overhead_s: expected seconds >= 0, got {self.overhead_s!r}")
        if self.step_model is None:
            self.step_model = StepModel(execution="graph")

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - shapes repeat step after step; the model is immutable
    def _time_us(self, n_decode: int, context: int, n_prefill: int, prefix: int) -> float:
        from tokprof.models.plan import KernelCall, decode_plan
        from tokprof.rollup.project import roof_time_us

        rows = n_decode + n_prefill
        cfg = self.config
        calls = [c for c in decode_plan(cfg, rows, max(1, context), self.dtype, block_size=self.block_size)
                 if c.op != "decode_attention"]
        heads = {"Hq": cfg.num_heads, "Hkv": cfg.num_kv_heads, "D": cfg.head_dim, "block_size": self.block_size}
        if n_decode:
            calls.append(KernelCall("decode_attention", {"B": n_decode, "context": max(1, context), **heads},
                                    self.dtype, cfg.num_layers))
        if n_prefill:
            calls.append(KernelCall("paged_prefill_attention", {"B": 1, "chunk": n_prefill, "context": prefix,
                                                                **heads}, self.dtype, cfg.num_layers))
        if self.efficiency is not None:  # the stated flat efficiency of the roofline
            return sum(c.count * roof_time_us(*c.cost(), self._spec, self.dtype)[0] for c in calls) / self.efficiency
        est = self.step_model.step(calls, self._spec, self.dtype)
        return est.gpu_time_us if self.overhead_s is not None else est.step_time_us

    def step_time_s(self, shape: StepShape) -> float:
        if shape.num_decode == 0 and shape.num_prefill_tokens == 0:
            return 0.0
        ctx = 16 * round(shape.decode_context_mean / 16)  # memoised on a 16-token grid
        prefix = 16 * round(shape.prefill_context_tokens / 16)
        stated = self.overhead_s if self.overhead_s is not None else 0.0  # else inside _time_us (the step model's)
        return self._time_us(shape.num_decode, ctx, shape.num_prefill_tokens, prefix) * 1e-6 + stated

    def __hash__(self) -> int:
        return id(self)

    @property
    def spec_key(self) -> str:
        return self._spec.key

    def describe(self) -> str:
        over = (f"plus {self.overhead_s * 1e6:g} us per step (stated)" if self.overhead_s is not None else
                "plus the step model's per-step overhead")
        if self.efficiency is not None:
            return (f"modelled for {self._spec.name} from the datasheet roofline ({self._spec.source}) at a stated "
                    f"efficiency {self.efficiency:g}, {self.dtype}, {over}")
        return (f"modelled for {self._spec.name} ({self._spec.source}), {self.dtype}: "
                f"{self.step_model.describe()}; {over}")
