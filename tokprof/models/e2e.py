"""End-to-end decode measurement: the real decode loop, timed step by step, with energy and GPU busy time.

    m = measure_e2e(model, batch=8, context=1024, steps=64, mode="graph")     # tokprof's Transformer
    m.median_step_us, m.tokens_per_s_per_gpu, m.ttft_ms, m.j_per_token, m.gpu_busy_fraction

How a point is measured (docs/measurement.md, "End to end"):
1. Random prompts of length P are prefilled (the TTFT: the whole batch, synchronised at both ends, after one
   warm-up prefill of the first sub-batch that compiles the kernels). `measure_e2e_modes` measures eager and graph
   from one prefill: each mode rewinds the decode state to the end of the prefill.
2. `warmup` decode steps run untimed (graph mode: two eager steps on a side stream, the capture, then replays).
3. `steps` decode steps are timed one by one (CUDA events between steps, one sync at the end; perf_counter on the
   CPU). P is chosen so that the timed steps attend contexts centred on `context`: step j attends P + warmup + j + 1
   tokens, the median of which is `context` (the plan's context counts the new token too). On the CPU, whose speed
   drifts by up to +-15% from one second to the next, the block of `steps` steps is rewound and timed again until
   `cpu_window_s` has passed (median over every block's steps); for tokprof's eager loop each block is followed by
   as many rounds of the point's kernel calls (tokprof.models.e2e_paired), the kernel times of the L4 prediction.
4. Energy: the decode state is rewound to the start of the timed range and the same steps are replayed, in rounds,
   for at least `energy_window_s` inside one NVML window; J/token = window energy / (batch x steps run), total energy
   (idle power included), less the idle tail the counter alignment adds when the idle power is known.
5. GPU busy fraction: rewound again, up to 32 steps under torch.profiler; the union of the GPU kernel intervals over
   the window's wall time (profiler overhead slows the host, so an eager figure is a lower bound).

Frameworks: `tokprof` here; transformers and vLLM through tokprof.models.adapters, measured the same way.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokprof.profiler.energy_sources import energy_not_asked
from tokprof.profiler.schema import from_dict, to_dict

FRAMEWORKS = ("tokprof", "transformers", "vllm")
MODES = ("eager", "graph")
CPU_WINDOW_S = 1.5  # CPU: blocks of timed steps (and paired kernel rounds) repeated for at least this long
PROFILE_STEPS = 8  # profiled steps for the busy fraction: enough to cover every kernel of a step many times


@dataclass
class E2EMeasurement:
    model: str
    gpu: str  # spec-table key, else the device name (a CPU model for CPU runs): the rule of the roll-up points
    framework: str  # "tokprof" | "transformers" | "vllm"
    mode: str  # "eager" | "graph"
    backend: str  # tokprof kernel backend; the framework's name for the others
    dtype: str
    batch: int
    context: int  # the median KV length the timed steps attend (the new token included)
    steps: int  # timed steps in all (blocks x steps per block)
    step_times_us: list[float]  # every timed step
    median_step_us: float
    p90_step_us: float
    tokens_per_s_per_gpu: float  # batch / median step
    tokens_per_s_per_user: float  # 1 / median step
    ttft_ms: float | None  # prefill of the whole batch to its first tokens
    j_per_token: float | None = None  # total energy over the decode window / tokens
    energy_reason: str | None = None  # why j_per_token is None, or how it was measured
    gpu_busy_fraction: float | None = None
    gpu_busy_reason: str | None = None  # why gpu_busy_fraction is None
    provenance: str = "measured"
    warmup_steps: int = 0
    prompt_len: int = 0
    context_first: int = 0  # KV length of the first timed step
    context_last: int = 0  # KV length of the last timed step
    device: str = ""  # the device as torch names it
    notes: list[str] = field(default_factory=list)
    blocks: int = 1  # the block of timed steps was rewound and timed this many times (CPU: cpu_window_s)
    # CPU, tokprof eager: the step's kernel calls timed in rounds between the blocks (tokprof.models.e2e_paired;
    # PairedCall dicts), the kernel times of the L4 prediction; None with paired_reason where there are none.
    paired_kernels: list[dict[str, Any]] | None = None
    paired_reason: str | None = None
    passes: int = 1  # separate passes merged into this record (merge_measurements)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> E2EMeasurement:
        return from_dict(cls, dict(d), "E2EMeasurement")


@dataclass
class DecodeSession:
    """A prefilled, warmed-up batch as one framework runs it: what the timing loop drives."""

    step: Callable[[], Any]  # one decode step of the whole batch, without a host sync
    rewind: Callable[[], None]  # back to the state at the start of the timed range
    ttft_ms: float | None
    notes: list[str] = field(default_factory=list)
    paired: Any = None  # CPU, tokprof eager: a PairedSequence of the point's kernel calls (tokprof.models.e2e_paired)
    paired_reason: str | None = None  # why `paired` is None


# --------------------------------------------------------------------------------------------------- helpers


def device_label(device: torch.device) -> tuple[str, str]:
    """(gpu, device name): the spec-table key or the device name as the roll-up names it, and the plain name."""
    from tokprof.profiler.devices import detect_device

    info = detect_device(device)
    return info.spec_key or info.name, info.name


def sync(device: torch.device) -> None:
    from tokprof.profiler.timing import sync as device_sync

    device_sync(device)


def prompt_length(context: int, warmup: int, steps: int) -> int:
    """Prompt length P so that the timed steps (P + warmup + 1 .. P + warmup + steps) are centred on `context`."""
    p = context - warmup - 1 - (steps - 1) // 2
    if p < 1:
        raise ValueError(f"context: {context} is too short to centre {steps} timed steps after {warmup} warm-up steps "
                         f"on it; expected context >= {warmup + 2 + (steps - 1) // 2}, or fewer steps")
    return p


def check_point(batch: int, context: int, steps: int, warmup: int) -> None:
    for name, value, low in (("batch", batch, 1), ("context", context, 1), ("steps", steps, 2),
                             ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


def time_steps(step: Callable[[], Any], n: int, device: torch.device) -> list[float]:
    """Each of n consecutive steps' time in us: CUDA events between steps and one sync at the end (nothing
    synchronises inside the loop), or perf_counter around each step on the CPU, where every op is synchronous."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            step()
            events[i + 1].record()
        sync(device)
        return [events[i].elapsed_time(events[i + 1]) * 1e3 for i in range(n)]
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        step()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return times


E2E_COOLDOWN_S = 0.2  # sleep before the decode energy window: the timed steps just heated the GPU (docs/measurement.md
# energy rule 4); as long as the kernel windows' cool-down in `tokprof run`


def energy_per_token(session: DecodeSession, steps: int, batch: int, median_step_us: float, device: torch.device, *,
                     window_s: float, meter: Any = None, idle_power_w: float | None = None,
                     cooldown_s: float = E2E_COOLDOWN_S) -> tuple[float | None, str]:
    """(J/token or None, how it was measured or why not) over rounds of the timed steps lasting >= window_s, after a
    `cooldown_s` sleep."""
    from tokprof.profiler.energy import energy_status, make_meter

    reason = energy_status(device)
    if reason is not None:
        return None, reason
    meter = meter if meter is not None else make_meter(device)
    rounds = max(1, math.ceil(window_s * 1e6 / (steps * median_step_us)))
    session.rewind()
    meter.source.sleep(cooldown_s)
    meter.begin_window("e2e_decode")
    try:
        for r in range(rounds):
            if r:
                session.rewind()
            for _ in range(steps):
                session.step()
    except BaseException:
        meter.discard_window("e2e_decode")  # the meter serves the next points: leave no window open
        raise
    try:
        window = meter.close_window("e2e_decode")
    except RuntimeError as err:  # a counter that never moved with no power readings, a failed NVML read
        return None, f"energy measurement failed ({err})"
    joules = window.energy.energy_j
    how = (f"total energy over {rounds} round(s) of the {steps} timed steps ({window.energy.time_s:.2f} s window "
           f"after a {cooldown_s:.1f} s cool-down, NVML {window.energy.method})")
    idle = idle_power_w if idle_power_w is not None else meter.idle_power_w
    if idle is not None:
        joules -= idle * window.tail_s
        how += f", less {window.tail_s * 1e3:.0f} ms of counter-alignment tail at {idle:.0f} W idle"
    else:
        how += f", including {window.tail_s * 1e3:.0f} ms of idle tail (idle power unknown)"
    return joules / (batch * steps * rounds), how


def busy_fraction(session: DecodeSession, steps: int, device: torch.device) -> tuple[float | None, str | None]:
    """GPU busy fraction over `steps` profiled steps: union of kernel intervals / wall time; (None, why) if unknown."""
    if device.type != "cuda":
        return None, f"a {device.type} run: there are no GPU kernels to count (needs a CUDA device and torch.profiler)"
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    session.rewind()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(device)
    # GPU activities only: an eager 8B step launches ~450 kernels, and CPU activities would add every op's host
    # events (and their correlation) to post-process, seconds per point for a figure that uses the GPU spans only.
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            session.step()
        end.record()
        sync(device)
    window_us = start.elapsed_time(end) * 1e3
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return None, "torch.profiler recorded no GPU kernels in the window (CUPTI unavailable?)"
    if len(spans) < steps:  # every decode step launches dozens of kernels: the profiler missed most of them
        return None, (f"torch.profiler recorded {len(spans)} GPU activities over {steps} steps (fewer than one a "
                      "step: kernels launched from a CUDA graph may not be traced here), so no busy fraction")
    busy_us, cur_start, cur_end = 0.0, spans[0][0], spans[0][1]
    for s, e in spans[1:]:  # union of intervals: concurrent kernels count once
        if s > cur_end:
            busy_us += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    busy_us += cur_end - cur_start
    return min(busy_us, window_us) / window_us, None


def timed_blocks(session: DecodeSession, steps: int, device: torch.device,
                 cpu_window_s: float = CPU_WINDOW_S) -> tuple[list[float], int]:
    """(every timed step in us, blocks): one block of `steps` steps on a GPU; on the CPU, blocks rewound and timed
    again until `cpu_window_s` has passed, each followed by `steps` rounds of `session.paired` when there is one."""
    if device.type == "cuda":
        return time_steps(session.step, steps, device), 1
    times: list[float] = []
    blocks = 0
    t0 = time.perf_counter()
    while blocks == 0 or time.perf_counter() - t0 < cpu_window_s:
        if blocks:
            session.rewind()
        times.extend(time_steps(session.step, steps, device))
        blocks += 1
        if session.paired is not None:
            from tokprof.kernels._common import skip_value_checks

            with skip_value_checks():  # the eager loop's state after its first step (tokprof_decode_session)
                for _ in range(steps):
                    session.paired.round()
    return times, blocks


def measure_session(session: DecodeSession, *, model: str, framework: str, mode: str, backend: str, dtype: str,
                    batch: int, context: int, steps: int, warmup: int, prompt_len: int, device: torch.device,
                    energy: bool = True, energy_window_s: float = 1.0, meter: Any = None,
                    idle_power_w: float | None = None, profile: bool = True,
                    cpu_window_s: float = CPU_WINDOW_S) -> E2EMeasurement:
    """Time `steps` steps of a warmed-up session (on the CPU, blocks of them over `cpu_window_s`: timed_blocks),
    then its energy and busy fraction (each over the same range)."""
    times, blocks = timed_blocks(session, steps, device, cpu_window_s)
    median_us = float(np.median(times))
    p90_us = float(np.percentile(times, 90))
    if not (median_us > 0 and math.isfinite(median_us)):
        raise RuntimeError(f"e2e: a median step time of {median_us} us is not a measurement; check the device timer")
    gpu, device_name = device_label(device)
    notes = list(session.notes)
    if energy:
        j_per_token, how = energy_per_token(session, steps, batch, median_us, device, window_s=energy_window_s,
                                            meter=meter, idle_power_w=idle_power_w)
    else:
        j_per_token, how = None, energy_not_asked(device)
    if profile:
        busy, busy_reason = busy_fraction(session, min(steps, PROFILE_STEPS), device)
    else:
        busy, busy_reason = None, "not profiled (profile=False)"
    first = prompt_len + warmup + 1
    notes.append(f"{steps} timed steps attending {first}..{first + steps - 1} KV tokens after {warmup} warm-up steps"
                 + (f", rewound and timed {blocks} times over {cpu_window_s:g} s (a CPU's speed drifts)"
                    if blocks > 1 else "")
                 + "; median and p90 over all samples (no outlier removal: an end-to-end tail is real)")
    paired = session.paired.results() if session.paired is not None else None
    if paired is not None:
        notes.append(f"paired kernel rounds: {session.paired.describe()}")
    if device.type == "cpu":
        notes.append(f"a CPU run on {device_name}: CPU figures, not GPU figures")
    return E2EMeasurement(
        model=model, gpu=gpu, framework=framework, mode=mode, backend=backend, dtype=dtype, batch=batch,
        context=context, steps=len(times), step_times_us=times, median_step_us=median_us, p90_step_us=p90_us,
        tokens_per_s_per_gpu=batch / (median_us * 1e-6), tokens_per_s_per_user=1.0 / (median_us * 1e-6),
        ttft_ms=session.ttft_ms, j_per_token=j_per_token, energy_reason=how, gpu_busy_fraction=busy,
        gpu_busy_reason=busy_reason, warmup_steps=warmup, prompt_len=prompt_len, context_first=first,
        context_last=first + steps - 1, device=device_name, notes=notes, blocks=blocks,
        paired_kernels=[c.to_dict() for c in paired] if paired is not None else None,
        paired_reason=None if paired is not None else session.paired_reason)


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> torch.Tensor:
    """(B, P) int64 random token ids on the CPU (a fixed seed: the same prompts for every framework)."""
    return torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------- tokprof


def check_fits(model: Any, batch: int, max_tokens: int) -> None:
    """RuntimeError naming the memory a point needs when its KV cache and prefill activations do not fit the GPU."""
    if model.device.type != "cuda":
        return
    import gc

    from tokprof.models.kv_cache import PagedKVCache

    cfg = model.config
    kv = PagedKVCache.bytes_needed(cfg.num_layers, batch, max_tokens, cfg.num_kv_heads, cfg.head_dim, model.dtype,
                                   model.block_size)
    chunk = min(batch * max_tokens, max(model.max_prefill_tokens, max_tokens))
    width = 2 * cfg.intermediate_size + cfg.q_size + 2 * cfg.kv_size + 4 * cfg.hidden_size
    activations = 2 * chunk * width * model.weights.embed.element_size()  # x2: inputs and outputs alive together
    # The caching allocator keeps what earlier points (and kernel benchmarks) freed; the driver counts it as used.
    # Hand it back first, or a point that fits is refused.
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(model.device)
    need = kv + activations
    if need > 0.95 * free:
        gib = 2 ** 30
        raise RuntimeError(f"batch {batch} x {max_tokens} tokens of {cfg.name} does not fit: the KV cache needs "
                           f"{kv / gib:.1f} GiB and prefill activations ~{activations / gib:.1f} GiB, "
                           f"{free / gib:.1f} GiB of {total / gib:.1f} GiB are free (weights take "
                           f"{model.weight_bytes / gib:.1f} GiB); use a smaller batch or context")


@dataclass
class PrefilledBatch:
    """A batch prefilled once, from which every decode mode starts (tokprof_prefill)."""

    prompt_len: int
    ttft_ms: float
    start: Any  # the Transformer's DecodeSnapshot right after the prefill
    notes: list[str]
    batch: int = 0
    context: int = 0  # the median KV length the timed steps attend


def tokprof_prefill(model: Any, batch: int, context: int, steps: int, warmup: int, seed: int) -> PrefilledBatch:
    """Prefill `model` (a tokprof Transformer) with random prompts sized for `context` and time it (the TTFT)."""
    prompt_len = prompt_length(context, warmup, steps)
    model.free_cache()
    check_fits(model, batch, prompt_len + warmup + steps + 1)
    ids = random_prompts(batch, prompt_len, model.config.vocab_size, seed)
    rows = max(1, min(batch, model.max_prefill_tokens // prompt_len))
    model.prefill(ids[:rows], max_new_tokens=1)  # compiles and autotunes the prefill kernels of the first sub-batch
    model.free_cache()
    model.reserve_cache(batch, prompt_len + warmup + steps + 1)  # allocated (and zeroed) before the clock starts
    sync(model.device)
    t0 = time.perf_counter()
    model.prefill(ids, max_new_tokens=warmup + steps + 1)
    sync(model.device)
    ttft_ms = (time.perf_counter() - t0) * 1e3
    notes = [f"TTFT: prefill of the whole batch ({batch} x {prompt_len} tokens, sub-batches of {rows}) to its first "
             "tokens, into a KV cache allocated before the clock started"]
    return PrefilledBatch(prompt_len=prompt_len, ttft_ms=ttft_ms, start=model.snapshot(), notes=notes, batch=batch,
                          context=context)


def tokprof_decode_session(model: Any, prefilled: PrefilledBatch, warmup: int, mode: str) -> DecodeSession:
    """Rewind `model` to the end of its prefill, warm up `mode` ("eager" or "graph") and return the session.

    Every mode starts from the same prefilled state, so one prefill serves both (the KV slots the warm-up and timed
    steps write are written again with the same values: greedy decoding of the same state is deterministic)."""
    model.release_graph()  # eager steps must not replay a graph captured for the previous mode
    model.restore(prefilled.start)
    notes = list(prefilled.notes)
    if mode == "graph":
        model.capture_graph(warmup_steps=2)
        for _ in range(warmup - 2):
            model.decode_step()
        notes.append("graph mode: one decode step captured in a CUDA graph after 2 eager warm-up steps, replayed")
    else:
        for _ in range(warmup):
            model.decode_step()
        notes.append("eager mode: each kernel launched from Python; the argument checks that read token ids and KV "
                     "slots back to the host ran in the batch's first decode step only (skip_value_checks after it), "
                     "so the timed steps hold no host synchronisation")
    snap = model.snapshot()
    paired, paired_reason = None, "paired kernel rounds are for tokprof's eager loop on the CPU"
    if mode == "eager" and model.device.type == "cpu":
        from tokprof.models.e2e_paired import PairedSequence

        paired, paired_reason = PairedSequence.for_point(
            model.config, batch=prefilled.batch, context=prefilled.context, dtype=model.precision.label,
            backend=model.backend, block_size=model.block_size, device=model.device)
        model.restore(snap)  # the rounds' first calls ran untimed beside the state; nothing of it changed
    return DecodeSession(step=model.decode_step, rewind=lambda: model.restore(snap), ttft_ms=prefilled.ttft_ms,
                         notes=notes, paired=paired, paired_reason=None if paired is not None else paired_reason)


def tokprof_session(model: Any, batch: int, context: int, steps: int, warmup: int, mode: str, seed: int
                    ) -> tuple[DecodeSession, int]:
    """Prefill `model` (a tokprof Transformer) and warm it up; (session, prompt length)."""
    prefilled = tokprof_prefill(model, batch, context, steps, warmup, seed)
    return tokprof_decode_session(model, prefilled, warmup, mode), prefilled.prompt_len


def _check_e2e_args(model: Any, batch: int, context: int, steps: int, warmup: int, modes: list[str]) -> None:
    check_point(batch, context, steps, warmup)
    if not modes:
        raise ValueError(f"modes: expected at least one of {list(MODES)}, got none")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if "graph" in modes:
        if model.device.type != "cuda":
            raise RuntimeError(f"mode='graph': CUDA graphs need a CUDA device, the model is on {model.device}; "
                               "use mode='eager' on the CPU")
        if warmup < 2:
            raise ValueError(f"warmup: graph mode needs at least 2 eager warm-up steps before the capture, "
                             f"got {warmup}")


def measure_e2e_modes(model: Any, batch: int, context: int, modes: list[str], steps: int = 32, *, warmup: int = 4,
                      seed: int = 0, energy: bool = True, energy_window_s: float = 1.0, meter: Any = None,
                      idle_power_w: float | None = None, profile: bool = True,
                      cpu_window_s: float = CPU_WINDOW_S) -> Iterator[E2EMeasurement]:
    """measure_e2e for each of `modes` at one (batch, context) from one prefill (the same TTFT for every mode):
    a prefill of 32 x 8k tokens of an 8B model takes seconds, so it is not repeated per mode.

    Arguments are checked now; the measurements are yielded one mode at a time, so a caller keeps the first mode's
    when a later one fails. The KV cache is given back when the iteration ends, normally or by an exception."""
    modes = list(modes)
    _check_e2e_args(model, batch, context, steps, warmup, modes)
    return _e2e_modes(model, batch, context, modes, steps, warmup, seed,
                      {"energy": energy, "energy_window_s": energy_window_s, "meter": meter,
                       "idle_power_w": idle_power_w, "profile": profile, "cpu_window_s": cpu_window_s})


def _e2e_modes(model: Any, batch: int, context: int, modes: list[str], steps: int, warmup: int, seed: int,
               session_kwargs: dict[str, Any]) -> Iterator[E2EMeasurement]:
    try:
        prefilled = tokprof_prefill(model, batch, context, steps, warmup, seed)
        for mode in modes:
            session = tokprof_decode_session(model, prefilled, warmup, mode)
            if len(modes) > 1:
                session.notes.append(f"one prefill shared by the modes {', '.join(modes)}")
            yield measure_session(session, model=model.config.name, framework="tokprof", mode=mode,
                                  backend=model.backend, dtype=model.precision.label, batch=batch, context=context,
                                  steps=steps, warmup=warmup, prompt_len=prefilled.prompt_len, device=model.device,
                                  **session_kwargs)
    finally:
        model.free_cache()  # the next point (or framework) gets the memory back


def measure_e2e(model: Any, batch: int, context: int, steps: int = 32, mode: str = "eager", *, warmup: int = 4,
                seed: int = 0, energy: bool = True, energy_window_s: float = 1.0, meter: Any = None,
                idle_power_w: float | None = None, profile: bool = True,
                cpu_window_s: float = CPU_WINDOW_S) -> E2EMeasurement:
    """Measure tokprof's Transformer end to end at (batch, context): see the module docstring for the method.

    mode "graph" replays the decode step as a CUDA graph (GPU only: RuntimeError on the CPU)."""
    (m,) = measure_e2e_modes(model, batch, context, [mode], steps, warmup=warmup, seed=seed, energy=energy,
                             energy_window_s=energy_window_s, meter=meter, idle_power_w=idle_power_w,
                             profile=profile, cpu_window_s=cpu_window_s)
    return m


PASSES_NOTE = "merged: "


def e2e_key(m: Mapping[str, Any]) -> tuple:
    """What makes two end-to-end records the same item (tokprof.reports.observations' key)."""
    return (m.get("model"), m.get("framework"), m.get("mode"), m.get("backend"), m.get("dtype"), m.get("batch"),
            m.get("context"))


def merge_measurements(parts: list[E2EMeasurement]) -> E2EMeasurement:
    """One record from the passes of one item (`tokprof run` on a CPU measures each point in passes spread over
    its end-to-end phase, so that a slow stretch of seconds moves one pass, not the point): the steps of every
    pass together (median, p90 and tokens/s over them), blocks summed, the TTFT the median of the passes', the
    paired kernel rounds merged (tokprof.models.e2e_paired.merge_paired)."""
    from tokprof.models.e2e_paired import merge_paired

    if not parts:
        raise ValueError("parts: expected at least one E2EMeasurement, got none")
    if len({e2e_key(p.to_dict()) for p in parts}) != 1:
        raise ValueError("parts: expected passes of one item (same model, framework, mode, backend, dtype, batch, "
                         "context)")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    times = [t for p in parts for t in p.step_times_us]
    median_us = float(np.median(times))
    ttfts = [p.ttft_ms for p in parts if p.ttft_ms is not None]
    energies = [(p.j_per_token, p.steps) for p in parts if p.j_per_token is not None]
    busy = [p.gpu_busy_fraction for p in parts if p.gpu_busy_fraction is not None]
    passes = sum(p.passes for p in parts)
    notes = [n for n in dict.fromkeys(n for p in parts for n in p.notes) if not n.startswith(PASSES_NOTE)]
    notes.append(f"{PASSES_NOTE}{passes} passes spread over the end-to-end phase (a CPU's speed drifts for seconds): "
                 f"median and p90 over the {len(times)} steps of all of them; TTFT the median of the passes'")
    paired = [p.paired_kernels for p in parts if p.paired_kernels]
    return dataclasses.replace(
        first, steps=len(times), step_times_us=times, median_step_us=median_us,
        p90_step_us=float(np.percentile(times, 90)), tokens_per_s_per_gpu=first.batch / (median_us * 1e-6),
        tokens_per_s_per_user=1.0 / (median_us * 1e-6), ttft_ms=float(np.median(ttfts)) if ttfts else None,
        j_per_token=(sum(j * n for j, n in energies) / sum(n for _, n in energies)
                     if len(energies) == len(parts) else None),
        gpu_busy_fraction=float(np.mean(busy)) if busy else None, blocks=sum(p.blocks for p in parts),
        paired_kernels=merge_paired(paired) if len(paired) == len(parts) else None, notes=notes, passes=passes)


def merge_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """End-to-end records (dicts) of several passes, those of one item merged (merge_measurements), in the order
    their items first came."""
    groups: dict[tuple, list[E2EMeasurement]] = {}
    for r in records:
        groups.setdefault(e2e_key(r), []).append(E2EMeasurement.from_dict(r))
    return [merge_measurements(parts).to_dict() for parts in groups.values()]
