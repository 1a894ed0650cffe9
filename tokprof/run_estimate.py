"""The modelled GPU time of `tokprof run` with a RunConfig, by part: kernels, graph captures, prefill, end to end.

    parts = estimate_gpu_seconds(ModelConfig.from_name("llama-3.1-8b"), RunConfig.for_device(torch.device("cuda")))

Every constant is a stated assumption (an H100-class GPU, Triton kernels), not a measurement; a measured run's
summary prints its real time per phase (`phase_seconds`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tokprof.models.config import ModelConfig
from tokprof.quant.precision import parse_precision

if TYPE_CHECKING:
    from tokprof.runner import RunConfig


# Stated assumptions of the GPU-time estimate below (H100-class GPU, Triton kernels), not measurements; a measured
# run's summary prints its real time ("seconds").
EST_PREFILL_TFLOPS = 400.0  # a prefill's GEMMs and causal attention together
EST_KERNEL_OVERHEAD_S = 0.3  # per kernel call: inputs, first call, the energy window's graph capture
EST_CAPTURE_LAUNCH_US = 20.0  # host time per kernel launch recorded into a graph (Python wrapper + launch)
EST_GRAPH_INSTANTIATE_S = 0.05  # per graph: instantiation and the first (uploading) replay
EST_KERNEL_EFFICIENCY = 0.8  # to model which calls are short: this fraction of the H100 datasheet roofline ...
EST_LAUNCH_US = 2.0  # ... plus a launch
EST_ENERGY_ALIGN_S = 0.2  # per energy window: waiting for the counter's next update at both ends
EST_COMPILE_S = 30.0  # Triton's first compilations on a cold cache
EST_E2E_MODE_S = 3.0  # per end-to-end point and mode: capture or warm-up, 32 timed and 32 profiled steps, profile
EST_FRAMEWORK_POINT_S = 10.0  # per point of another framework (transformers' eager loop, its profile)
EST_FIXED_S = 20.0  # ceilings, idle power, model set-up, reconciliation, report


def graph_capture_seconds(bytes_touched: int, call_us: float, l2_bytes: int) -> float:
    """Modelled host seconds to capture one call's graph-mode timing graph, as tokprof.profiler.graphs builds it:
    ceil(5 x L2 / bytes touched) + 1 rotating copies (at most MAX_ROTATION_COPIES), passes enough for a replay of
    MIN_REPLAY_US, each captured launch EST_CAPTURE_LAUNCH_US of host time, plus instantiation."""
    from tokprof.profiler.graphs import MAX_ROTATION_COPIES, MIN_REPLAY_US, rotation_copies

    copies = rotation_copies(l2_bytes, max(1, int(bytes_touched)), max_copies=MAX_ROTATION_COPIES)
    passes = max(1, math.ceil(MIN_REPLAY_US / (copies * call_us)))
    return copies * passes * EST_CAPTURE_LAUNCH_US * 1e-6 + EST_GRAPH_INSTANTIATE_S


def estimate_gpu_seconds(config: ModelConfig, rc: RunConfig) -> dict[str, float]:
    """A modelled estimate of `tokprof run`'s GPU time with `rc`, by part (seconds; "total" sums them).

    kernels: distinct decode-step calls x (timing budget + energy window + cool-down + alignment + overhead) +
    compilation; prefill: every end-to-end point's prompt tokens (and one warm-up sub-batch) at EST_PREFILL_TFLOPS;
    e2e: points x modes x (EST_E2E_MODE_S + the energy cool-down); frameworks: other frameworks' points x
    EST_FRAMEWORK_POINT_S; graphs: per call modelled under SHORT_KERNEL_US on the H100 datasheet, its capture
    (graph_capture_seconds: the rotating copies times the host time of a captured launch) and its timing budget.
    """
    from tokprof.models.e2e import E2E_COOLDOWN_S, prompt_length
    from tokprof.models.plan import decode_plan
    from tokprof.models.transformer import DEFAULT_PREFILL_TOKENS
    from tokprof.profiler.devices import load_specs
    from tokprof.profiler.timing import SHORT_KERNEL_US

    distinct = {c.key(): c for b in rc.batches for c_ in rc.contexts for c in decode_plan(config, b, c_, rc.dtype)}
    h100 = load_specs()["h100-sxm"]
    math = parse_precision(rc.dtype).activation  # a low-precision label's activation dtype bounds the estimate
    peak_flops, peak_bw = (h100.peak_tflops(math) or h100.bf16_tflops) * 1e12, h100.hbm_tbps * 1e12
    timing_s = float(rc.timing_kwargs.get("max_time_s", 5.0))
    graphs_s = 0.0
    for f, b in (c.cost() for c in distinct.values()):
        t_us = max(f / peak_flops, b / peak_bw) * 1e6 / EST_KERNEL_EFFICIENCY + EST_LAUNCH_US
        if t_us < SHORT_KERNEL_US:  # also timed in graph mode (bench.wants_graph_time)
            graphs_s += graph_capture_seconds(b, t_us, int(h100.l2_mb * 1e6)) + timing_s
    per_kernel = timing_s + EST_KERNEL_OVERHEAD_S
    if rc.energy:
        per_kernel += (float(rc.energy_kwargs.get("window_s", 1.0)) + float(rc.energy_kwargs.get("cooldown_s", 0.5))
                       + EST_ENERGY_ALIGN_S)
    points = rc.e2e_points if rc.e2e_points is not None else [(b, c) for b in rc.e2e_batches
                                                                for c in rc.e2e_contexts]
    flop_per_token = 2 * (config.active_params() if config.is_moe else config.num_params())  # MoE: k experts only
    attn_per_seq = 2 * config.num_layers * config.num_heads * config.head_dim  # x prompt_len^2: causal QK^T and PV
    warmup = 4
    prefill_flop = 0.0
    for batch, context in points:
        p = prompt_length(context, warmup, rc.e2e_steps)
        rows = max(1, min(batch, DEFAULT_PREFILL_TOKENS // p))
        prefill_flop += (batch + rows) * (flop_per_token * p + attn_per_seq * p * p)  # rows: the warm-up sub-batch
    others = [fw for fw in rc.frameworks if fw != "tokprof"]
    fw_points = points if rc.framework_points is None else [p for p in points if p in set(rc.framework_points)]
    modes = [m for m in rc.e2e_modes if m == "eager" or rc.device.type == "cuda"]
    parts = {
        "kernels": len(distinct) * per_kernel + EST_COMPILE_S,
        "graphs": graphs_s if rc.device.type == "cuda" else 0.0,
        "prefill": prefill_flop / (EST_PREFILL_TFLOPS * 1e12),
        "e2e": len(points) * len(modes) * (EST_E2E_MODE_S + (E2E_COOLDOWN_S if rc.energy else 0.0))
        if "tokprof" in rc.frameworks else 0.0,
        "frameworks": len(others) * len(fw_points) * EST_FRAMEWORK_POINT_S,
        "fixed": EST_FIXED_S,
    }
    parts["total"] = sum(parts.values())
    return parts
