"""The end-to-end step time the bottom-up model predicts, from kernel measurements and measured overheads only.

    pred, why_not = predict_step(point, overhead, mode="eager", device_kind="cpu")
    pred.step_time_us, pred.terms

The inputs are a roll-up point (its kernel sum, op by op with counts) and the overhead micro-benchmark of the run
(tokprof.profiler.overhead); an end-to-end measurement is never an input, so the prediction can be held against one.

    CPU, eager   kernel sum + host work per step
                 (every op is synchronous and each measured kernel time already holds its own dispatch)
    GPU, eager   max(kernel sum + bookkeeping kernels, dispatch sum + host work)
                 (the host issues calls while the GPU runs them: the slower of the two sets the step; dispatch sum =
                 sum over the plan of count x the op's measured dispatch)
    GPU, graphs  kernel sum + bookkeeping kernels + kernel calls x GRAPH_NODE_GAP_US
                 (a replay issues no host work; each kernel node still costs a gap on the GPU)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A CUDA-graph kernel node costs ~0.5 us beyond its own execution: NVIDIA Developer Blog, "Getting Started with CUDA
# Graphs" (A. Gray, 2019): 3.4 us per kernel in a graph for kernels that run 2.9 us (3.8 us launched from a stream).
GRAPH_NODE_GAP_US = 0.5
# The decode step's bookkeeping ops on a GPU: 4 tiny kernels (tokprof.models.transformer) of ~2 us each, launch
# included (an assumption of the size of a one-warp kernel on an H100-class GPU; they are not timed by the roll-up).
GPU_BOOKKEEPING_KERNELS = 4
GPU_TINY_KERNEL_US = 2.0


@dataclass
class StepPrediction:
    mode: str  # "eager" | "graph"
    step_time_us: float
    kernel_sum_us: float  # the roll-up point's step time (L2)
    terms: dict[str, float] = field(default_factory=dict)  # every added term, us per step
    source: str = ""  # how it was computed, in words
    provenance: str = "modelled"


def _overhead(overhead: Any) -> Any:
    from tokprof.profiler.overhead import Overhead

    if overhead is None or isinstance(overhead, Overhead):
        return overhead
    return Overhead.from_dict(overhead)


def predict_step(point: Any, overhead: Any, *, mode: str, device_kind: str) -> tuple[StepPrediction | None, str | None]:
    """(the predicted step, None) or (None, why not) for `point` (a RollupPoint) run end to end in `mode`.

    `overhead`: an Overhead (or its dict) measured on the same device, None when the run has none."""
    if mode not in ("eager", "graph"):
        raise ValueError(f"mode: expected 'eager' or 'graph', got {mode!r}")
    if device_kind not in ("cpu", "cuda"):
        raise ValueError(f"device_kind: expected 'cpu' or 'cuda', got {device_kind!r}")
    if point is None:
        return None, "no roll-up point: no kernel sum to predict from"
    if getattr(point, "tp", 1) != 1:
        return None, "end-to-end runs are single-GPU: no prediction at tp > 1"
    kernels = point.step_time_us
    calls = sum(o.count for o in point.ops)
    if mode == "graph":
        if device_kind != "cuda":
            return None, "CUDA graphs need a GPU"
        book = GPU_BOOKKEEPING_KERNELS * GPU_TINY_KERNEL_US
        gaps = (calls + GPU_BOOKKEEPING_KERNELS) * GRAPH_NODE_GAP_US
        terms = {"bookkeeping kernels": book, "graph node gaps": gaps}
        return StepPrediction(mode, kernels + book + gaps, kernels, terms,
                              f"kernel sum + {GPU_BOOKKEEPING_KERNELS} bookkeeping kernels x {GPU_TINY_KERNEL_US:g} us "
                              f"(stated) + {calls + GPU_BOOKKEEPING_KERNELS} graph nodes x {GRAPH_NODE_GAP_US:g} us "
                              "(NVIDIA, Getting Started with CUDA Graphs, 2019)"), None
    oh = _overhead(overhead)
    if oh is None:
        return None, "no overhead micro-benchmark in this run (tokprof run measures it): no host work to add"
    if oh.kind != device_kind:
        return None, f"the overhead was measured on a {oh.kind} device, the point is on a {device_kind} device"
    host = oh.host_work_us(point.batch)
    if host is None:
        return None, "the overhead record has no host-work measurement"
    if device_kind == "cpu":
        return StepPrediction(mode, kernels + host, kernels, {"host work": host},
                              f"kernel sum + host work per step ({host:.4g} us at batch "
                              f"{point.batch}, measured); each kernel time holds its dispatch already"), None
    missing = sorted({o.op for o in point.ops if oh.dispatch_us(o.op) is None})
    if missing:
        return None, f"no dispatch measured for {', '.join(missing)}"
    dispatch = sum(o.count * oh.dispatch_us(o.op) for o in point.ops)
    book = GPU_BOOKKEEPING_KERNELS * GPU_TINY_KERNEL_US
    gpu_side, host_side = kernels + book, dispatch + host
    bound = "host" if host_side > gpu_side else "GPU"
    return StepPrediction(mode, max(gpu_side, host_side), kernels,
                          {"bookkeeping kernels": book, "dispatch": dispatch, "host work": host},
                          f"max(kernel sum + bookkeeping {book:g} us, dispatch {dispatch:.4g} us + host work "
                          f"{host:.4g} us): {bound}-bound"), None
