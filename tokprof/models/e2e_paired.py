"""A CPU decode step's kernel calls, timed interleaved with the end-to-end steps that the L4 prediction is held to.

    paired = PairedSequence.for_point(config, batch=4, context=512, dtype="fp32", backend="torch", block_size=16)
    ...  measure_session alternates: a block of end-to-end steps, then `paired.round()` as many times
    paired.results()          # [PairedCall]: per distinct call, its robust mean and median over every round
    paired_kernel_sum_us(...) # sum over calls of count x robust mean: the kernel sum of the L4 prediction

Why (docs/measurement.md, "CPU closure"): a CPU's speed drifts. On the 2-core VMs tokprof is built on, the median of
the same decode step over 1.5 s windows moves by up to +-15% from one window to the next with no other process
running, and kernel times taken in the kernel phase disagree with an end-to-end step taken 20 s later by that drift,
not by anything the model leaves out. So tokprof's eager end-to-end measurement on a CPU alternates blocks of steps
with rounds of the same point's kernel calls, in step order (each call meets the caches the calls before it leave,
as in bench.bench_sequence), and both sides see the same machine. Nothing of the end-to-end step times goes into
the kernel times, nor into the prediction made from them (tokprof.rollup.step_prediction).

Per call the estimate is a robust mean: the mean of the samples at or below Q3 + 3 x IQR. A step is the sum of its
calls, so its median follows the sum of their means, not of their medians: the per-call times are right-skewed and
their medians summed fall 5-12% under the step (measured on the tiny preset, fp32, batches 1 and 4). A rare
preemption that lands in one call, on the other hand, moves the median step hardly at all: those samples are
dropped.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokprof.profiler.schema import from_dict, to_dict

PAIRED_MAX_BYTES = 512 * 2**20  # the calls' inputs are allocated beside the model: above this, no pairing
OUTLIER_IQR = 3.0  # samples above Q3 + OUTLIER_IQR x IQR are preemptions, not the call's cost


@dataclass
class PairedCall:
    """One distinct kernel call of the step, timed in rounds interleaved with the end-to-end blocks (measured)."""

    op: str
    shape: dict[str, int]
    dtype: str
    count: int  # calls per step
    mean_us: float  # robust mean (module docstring): what the step's median sums
    median_us: float
    samples: int  # rounds x count
    dropped: int  # samples above Q3 + 3 x IQR
    rounds: int = 0

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PairedCall:
        return from_dict(cls, dict(d), "PairedCall")


def robust_mean(samples: Sequence[float]) -> tuple[float, int]:
    """(mean of the samples at or below Q3 + 3 x IQR, how many were dropped)."""
    if len(samples) == 0:
        raise ValueError("samples: expected at least one time, got none")
    a = np.asarray(samples, dtype=float)
    q1, q3 = np.percentile(a, [25, 75])
    kept = a[a <= q3 + OUTLIER_IQR * (q3 - q1)]
    return float(kept.mean()), int(a.size - kept.size)


def merge_paired(passes: Sequence[Sequence[PairedCall | Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The paired calls of several passes of one point, call by call: the robust mean weighted by the samples each
    pass kept, the median of the passes' medians, samples, drops and rounds summed."""
    out = []
    lists = [[c if isinstance(c, PairedCall) else PairedCall.from_dict(c) for c in p] for p in passes]
    for calls in zip(*lists, strict=True):
        kept = [c.samples - c.dropped for c in calls]
        first = calls[0]
        out.append(PairedCall(op=first.op, shape=first.shape, dtype=first.dtype, count=first.count,
                              mean_us=sum(c.mean_us * k for c, k in zip(calls, kept, strict=True)) / max(1, sum(kept)),
                              median_us=float(np.median([c.median_us for c in calls])),
                              samples=sum(c.samples for c in calls), dropped=sum(c.dropped for c in calls),
                              rounds=sum(c.rounds for c in calls)).to_dict())
    return out


def paired_kernel_sum_us(calls: Sequence[PairedCall | Mapping[str, Any]]) -> float:
    """Sum over the calls of count x robust mean: one step's kernel time as the paired rounds measured it."""
    total = 0.0
    for c in calls:
        c = c if isinstance(c, PairedCall) else PairedCall.from_dict(c)
        total += c.count * c.mean_us
    return total


class PairedSequence:
    """The kernel calls of one decode step with their inputs, run and timed one round at a time (CPU only)."""

    def __init__(self, calls: Sequence[Any], backend: str, device: torch.device | str = "cpu", seed: int = 0):
        from tokprof.kernels import OPS
        from tokprof.kernels._common import parse_dtype

        dev = torch.device(device)
        if dev.type != "cpu":
            raise ValueError(f"device: paired kernel rounds are the CPU's (a GPU has no drift to pair out), got {dev}")
        self.calls = list(calls)
        if not self.calls:
            raise ValueError("calls: expected the kernel calls of a step, got none")
        # One input set per call of the step (a layer's weights and KV pages are its own), run layer by layer: the
        # j-th call of every entry with more than j calls, in plan order. (index into self.calls, call, inputs)
        self._seq: list[tuple[int, Callable[[Any], Any], Any]] = []
        for j in range(max(c.count for c in self.calls)):
            for i, c in enumerate(self.calls):
                if c.count > j:
                    rec = OPS[c.op]
                    inputs = rec.make_inputs(rec.full_shape(c.shape), parse_dtype(c.dtype), dev, seed + j)
                    self._seq.append((i, functools.partial(rec.run, backend=backend), inputs))
        self._samples: list[list[float]] = [[] for _ in self.calls]
        self._rounds = 0
        for _, call, inputs in self._seq:  # first call: argument checks and lazy initialisation, untimed
            call(inputs)
        self.how = (f"the step's {len(self._seq)} kernel calls ({len(self.calls)} distinct), each on its own inputs, "
                    "timed in rounds between the blocks")

    @classmethod
    def for_point(cls, config: Any, *, batch: int, context: int, dtype: str, backend: str, block_size: int,
                  device: torch.device | str = "cpu", seed: int = 0) -> tuple[PairedSequence | None, str]:
        """(the point's paired sequence, how) or (None, why not): the decode plan's kernel calls at (batch,
        context), as the roll-up times them (tokprof.rollup.bottom_up.tp_step at tp 1)."""
        from tokprof.kernels import OPS
        from tokprof.kernels._common import parse_dtype
        from tokprof.profiler.bench import SWEEP_ERRORS
        from tokprof.rollup.bottom_up import tp_step

        try:
            plan = tp_step(config, batch, context, dtype, 1, block_size)[0]
            missing = sorted({c.op for c in plan if c.op not in OPS})
            if missing:
                return None, f"no paired kernel rounds: the plan has ops without a kernel ({', '.join(missing)})"
            need = sum(c.count * int(OPS[c.op].cost(OPS[c.op].full_shape(c.shape), parse_dtype(c.dtype))[1])
                       for c in plan)
            if need > PAIRED_MAX_BYTES:
                return None, (f"no paired kernel rounds: the plan's inputs ({need / 2**20:.0f} MiB) exceed "
                              f"{PAIRED_MAX_BYTES / 2**20:.0f} MiB beside the model")
            paired = cls(plan, backend, device, seed)
        except SWEEP_ERRORS as err:
            return None, f"no paired kernel rounds: {type(err).__name__}: {err}"
        return paired, paired.how

    def describe(self) -> str:
        return f"{self.how}: {self.rounds} rounds (robust mean per call)"

    def round(self) -> None:
        """Every call of the step once, layer by layer, each timed with perf_counter_ns."""
        for i, call, inputs in self._seq:
            start = time.perf_counter_ns()
            call(inputs)
            self._samples[i].append((time.perf_counter_ns() - start) / 1e3)
        self._rounds += 1

    @property
    def rounds(self) -> int:
        return self._rounds

    def results(self) -> list[PairedCall]:
        if self.rounds == 0:
            raise RuntimeError("results: no round was run; call round() first")
        out = []
        for c, s in zip(self.calls, self._samples, strict=True):
            mean, dropped = robust_mean(s)
            out.append(PairedCall(op=c.op, shape=dict(c.shape), dtype=c.dtype, count=c.count, mean_us=mean,
                                  median_us=float(np.median(s)), samples=len(s), dropped=dropped,
                                  rounds=self.rounds))
        return out
