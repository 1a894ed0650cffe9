"""CUDA-graph timing's inputs: rotating input copies and the capture of one graph that calls a kernel on each.

    graph = capture_graph(call, inputs, device="cuda:0", bytes_touched=min_bytes)   # then timing.measure(graph=...)

Graph timing that reuses one input finds it in L2 and reports bandwidths above the hardware: the graph therefore
calls the kernel on ceil(5 x L2 / bytes touched per call) + 1 copies of its inputs in turn, so that between two
uses of one copy the kernel streams >= 5x the L2. A tiny call would need tens of thousands of copies (each a Python
launch inside the capture): the rotation is capped (MAX_ROTATION_COPIES, a quarter of the free memory) and a
capped rotation that no longer spans 5x the L2 says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tokprof.profiler.cuda_basics import as_device, iter_tensors, l2_bytes, sync, working_set_bytes

ROTATION_L2_FACTOR = 5  # graph mode: copies span 5x L2 between two uses of one copy (rule 3)
# A graph replay at least this long keeps the replay's own launch and event overhead (~a few us) under ~1%.
MIN_REPLAY_US = 500.0
# At most this many rotating input copies (each a Python launch inside the capture, ~10-20 us of host time plus
# its memory). Beyond it a tiny call's inputs may sit in L2, which the timing's note then says.
MAX_ROTATION_COPIES = 256
# ... and never more copies than this share of the device's free memory.
ROTATION_MEMORY_FRACTION = 0.25


def rotation_copies(l2_cache_bytes: int, working_set: int, max_copies: int | None = None) -> int:
    """Input copies for graph mode: ceil(5 * L2 / working_set) + 1 (rule 3), at most `max_copies`.

    Between two uses of one copy the kernel then streams >= 5x the L2 through the cache, so no call finds its
    inputs in L2. E.g. L2 50 MiB, working set 16 MiB -> ceil(15.6) + 1 = 17 copies. `working_set` is the bytes each
    call touches (its min_bytes), not every byte of its arguments: a decode step's KV cache is allocated for the
    whole batch but each call reads only the context's pages. A tiny call (RMSNorm of one row: 16 KB) would need
    ~20k copies, each a Python launch inside the capture (seconds per capture): `max_copies` caps that, and
    rotation_spans_l2() says whether the capped rotation still keeps the inputs out of L2.
    """
    for name, value in (("l2_cache_bytes", l2_cache_bytes), ("working_set", working_set)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int of bytes, got {value!r}")
    copies = -(-ROTATION_L2_FACTOR * l2_cache_bytes // working_set) + 1
    if max_copies is not None:
        if isinstance(max_copies, bool) or not isinstance(max_copies, int) or max_copies < 1:
            raise ValueError(f"max_copies: expected a positive int, got {max_copies!r}")
        copies = min(copies, max_copies)
    return copies


def rotation_spans_l2(l2_cache_bytes: int, working_set: int, copies: int) -> bool:
    """Whether `copies` rotating copies of `working_set` bytes stream >= 5x the L2 between two uses of one copy."""
    return copies * working_set >= ROTATION_L2_FACTOR * l2_cache_bytes


def _clone_tensor(t: torch.Tensor) -> torch.Tensor:
    copy = t.detach().clone(memory_format=torch.preserve_format)
    if copy.stride() != t.stride():  # keep the layout the kernel was given (a strided view stays strided)
        copy = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
        copy.copy_(t.detach())
    return copy


def clone_inputs(inputs: Any) -> Any:
    """A copy of `inputs` with every tensor cloned (same shape, strides, dtype, device, values); others kept."""
    if isinstance(inputs, torch.Tensor):
        return _clone_tensor(inputs)
    if isinstance(inputs, Mapping):
        return {k: clone_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, list):
        return [clone_inputs(v) for v in inputs]
    if isinstance(inputs, tuple):
        return tuple(clone_inputs(v) for v in inputs)
    return inputs


def check_rotation(copies: list[Any], touched: list[int]) -> int:
    """Check graph rotation: every copy called equally often and no two copies sharing memory.

    `touched[i]` counts the calls captured on copies[i]. Returns the number of distinct tensor addresses used.
    RuntimeError otherwise: graph timing that reuses one input finds it in L2 and reports impossible bandwidth.
    """
    if len(touched) != len(copies):
        raise RuntimeError(f"graph rotation: {len(copies)} input copies but call counts for {len(touched)}")
    never = [i for i, n in enumerate(touched) if n == 0]
    if never:
        raise RuntimeError(f"graph rotation: input copies {never[:8]} (of {len(copies)}) were never called")
    if len(set(touched)) != 1:
        raise RuntimeError(f"graph rotation: copies called unevenly (min {min(touched)}, max {max(touched)} calls)")
    owner: dict[int, int] = {}
    for i, copy in enumerate(copies):
        for t in iter_tensors(copy):
            if t.numel() == 0:
                continue
            ptr = t.data_ptr()
            if owner.get(ptr, i) != i:
                raise RuntimeError(f"graph rotation: input copies {owner[ptr]} and {i} share memory at {ptr:#x}; "
                                   "each copy must hold its own tensors")
            owner[ptr] = i
    return len(owner)


@dataclass
class CapturedGraph:
    """One CUDA graph of `calls_per_replay` kernel calls rotating over `copies` input copies."""

    graph: Any  # torch.cuda.CUDAGraph
    calls_per_replay: int
    copies: int
    working_set_bytes: int
    l2_bytes: int
    touched: list[int]
    distinct_input_ptrs: int
    inputs: list[Any] = field(repr=False)  # the copies: they must live as long as the graph that reads them

    def replay(self) -> None:
        self.graph.replay()

    bytes_touched: int = 0  # what one call reads and writes (the rotation is sized by it); 0: the working set
    capture_s: float = 0.0  # host seconds the capture took

    @property
    def spans_l2(self) -> bool:
        """False when the copies (capped) stream less than 5x the L2 between two uses of one copy."""
        return self.copies > 1 and rotation_spans_l2(self.l2_bytes, self.bytes_touched or self.working_set_bytes,
                                                     self.copies)

    def describe(self) -> str:
        text = (f"graph of {self.calls_per_replay} calls over {self.copies} rotating input copies "
                f"({self.working_set_bytes} B each, {self.bytes_touched or self.working_set_bytes} B touched per "
                f"call, L2 {self.l2_bytes} B), each copy called {self.touched[0]}x per replay, captured in "
                f"{self.capture_s:.2f} s")
        if self.copies > 1 and not self.spans_l2:
            text += (f"; the rotation is capped at {self.copies} copies, which span less than "
                     f"{ROTATION_L2_FACTOR}x the L2: this call's inputs may partly hit in L2")
        return text


def _events_time_us(device: torch.device, fn: Callable[[], None], repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(device)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    sync(device)
    return start.elapsed_time(end) * 1000.0 / repeats


def restore_stream(stream: Any) -> None:
    """Make `stream` current again after a CUDA graph capture. A capture that fails makes torch.cuda.graph's
    capture_end raise before it restores the stream it switched to, so later work would run on the capture stream."""
    torch.cuda.set_stream(stream)


def graph_copies(l2: int, working_set: int, bytes_touched: int | None, free_bytes: int | None,
                 max_copies: int = MAX_ROTATION_COPIES) -> int:
    """How many rotating copies a capture makes: sized by the bytes one call touches, capped by `max_copies` and by
    ROTATION_MEMORY_FRACTION of the free device memory (each copy holds the whole working set)."""
    touched = bytes_touched if bytes_touched else working_set
    cap = max_copies
    if free_bytes is not None and working_set > 0:
        cap = max(1, min(cap, int(ROTATION_MEMORY_FRACTION * free_bytes) // working_set))
    return rotation_copies(l2, max(1, min(touched, working_set)), max_copies=cap)


def capture_graph(call: Callable[[Any], Any], inputs: Mapping[str, Any], *, device: torch.device | str | int,
                  rotate: bool = True, min_replay_us: float = MIN_REPLAY_US, bytes_touched: int | None = None,
                  max_copies: int = MAX_ROTATION_COPIES) -> CapturedGraph:
    """Capture `call` over rotating input copies into one CUDA graph (call `call(inputs)` once before: autotune).

    With `rotate`, ceil(5 * L2 / bytes_touched) + 1 copies (the first is `inputs` itself), at most `max_copies` and
    a quarter of the free memory (graph_copies); without, one. `bytes_touched`: what one call reads and writes (its
    min_bytes); None: the whole working set. The graph holds a whole number of passes over the copies, enough
    that a replay lasts >= `min_replay_us`.
    """
    device = as_device(device)
    if device.type != "cuda":
        raise ValueError(f"device: CUDA graphs need a CUDA device, got {device}")
    ws = working_set_bytes(inputs)
    if ws == 0:
        raise ValueError("inputs: expected at least one non-empty tensor to time, got none")
    if bytes_touched is not None and (isinstance(bytes_touched, bool) or not isinstance(bytes_touched, int)
                                      or bytes_touched < 0):
        raise ValueError(f"bytes_touched: expected a non-negative int of bytes, got {bytes_touched!r}")
    t_start = time.perf_counter()
    l2 = l2_bytes(device)
    free = int(torch.cuda.mem_get_info(device)[0]) if rotate else None
    n_copies = graph_copies(l2, ws, bytes_touched, free, max_copies) if rotate else 1
    copies = [inputs] + [clone_inputs(inputs) for _ in range(n_copies - 1)]
    with torch.cuda.device(device):
        # Warm up on a side stream first, as CUDA-graph capture wants (lazy library handles, workspaces).
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for i in range(min(3, n_copies)):
                call(copies[i])
        torch.cuda.current_stream(device).wait_stream(side)
        state = {"i": 0}

        def one_pass_call() -> None:
            call(copies[state["i"] % n_copies])
            state["i"] += 1

        per_call_us = _events_time_us(device, one_pass_call, min(n_copies, 8))
        passes = max(1, math.ceil(min_replay_us / max(n_copies * per_call_us, 1e-3)))
        touched = [0] * n_copies
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(device)
        try:
            with torch.cuda.graph(graph):
                for _ in range(passes):
                    for i in range(n_copies):
                        touched[i] += 1
                        call(copies[i])
        except RuntimeError as err:
            raise RuntimeError(f"CUDA graph capture of the call failed ({err}); a call that synchronises or "
                               "copies to the host cannot be captured: time it with mode='events'") from err
        finally:
            restore_stream(stream)
        sync(device)
    distinct = check_rotation(copies, touched)
    return CapturedGraph(graph=graph, calls_per_replay=passes * n_copies, copies=n_copies, working_set_bytes=ws,
                         l2_bytes=l2, touched=touched, distinct_input_ptrs=distinct, inputs=copies,
                         bytes_touched=min(bytes_touched, ws) if bytes_touched else ws,
                         capture_s=time.perf_counter() - t_start)


def check_graph_for(graph: CapturedGraph, inputs: Mapping[str, Any], rotate: bool) -> None:
    """ValueError unless `graph` was captured over `inputs` (its first copy) with the rotation asked for."""
    if not isinstance(graph, CapturedGraph):
        raise ValueError(f"graph: expected a CapturedGraph from capture_graph, got {type(graph).__name__}")
    if not graph.inputs or graph.inputs[0] is not inputs:
        raise ValueError("graph: expected a graph captured over these inputs (capture_graph(call, inputs, ...)), "
                         "got one captured over other tensors")
    if (graph.copies > 1) != rotate:
        raise ValueError(f"graph: expected a graph {'with' if rotate else 'without'} rotating input copies "
                         f"(cold_l2={rotate}), got one over {graph.copies} cop{'ies' if graph.copies > 1 else 'y'}")
