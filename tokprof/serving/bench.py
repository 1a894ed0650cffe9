"""serve-bench: tokprof's server swept over request rates beside the simulator's prediction of it, the highest
rate that meets an SLO, and the cost per million tokens there.

Measured mode (a model that runs here, e.g. the tiny preset on the CPU): one server, a step table measured on it,
then per rate a seeded workload served (measured) and simulated (predicted) with the relative errors of
throughput, median TPOT and p90 TTFT. Modelled mode (`gpu` given): no server; the simulator with step times
modelled for that GPU sweeps the rates (the throughput-vs-latency curve) and finds the SLO rate.
The document is saved (atomically) after every rate, so an interrupted sweep keeps the rates it finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from tokprof.serving import loadgen
from tokprof.serving.engine import ServeRun
from tokprof.serving.metrics import Slo
from tokprof.serving.probe import SPEED_WINDOW_S, PairedProbe, PausableClock
from tokprof.serving.scheduler import SchedulerConfig
from tokprof.serving.served import gap_split, max_rate_meeting_slo
from tokprof.serving.simulator import Overhead, simulate
from tokprof.serving.step_time import MeasuredStepTable, ModelledStepTime, StepTimeModel
from tokprof.serving.traffic import Workload
from tokprof.serving.wake import WakePenalty, measure_wake_penalty

# The validation goal of the simulator against the server (relative errors).
GOAL = {"throughput": 0.10, "median_tpot": 0.10, "p90_ttft": 0.20}
# SLO defaults. The tiny preset on 2 CPU cores takes ~5-20 ms per step, so 50 ms per output token is met below
# saturation and missed past it; 1 s to the first token leaves room for a few queued prefills. On a GPU: 2 s / 50 ms.
CPU_SLO = Slo(ttft_s=1.0, tpot_s=0.05)
GPU_SLO = Slo(ttft_s=2.0, tpot_s=0.05)
# Of the estimated capacity: three below saturation and one well past it (the queue grows, throughput plateaus).
# Not one at 1.0: near a utilisation of 1 queueing delay goes as 1 / (1 - utilisation), so a 3% error in the
# service rate moves p90 TTFT by +50% to +170% there (measured), for the server as for any predictor of it. Past
# saturation p90 TTFT is the backlog over the service rate, which amplifies a service-rate error about
# 1 / (1 - capacity / rate) times: at 1.5 x, 3-4% moved it by 27-30%; at 2 x by 6-17%.
RATE_FRACTIONS = (0.25, 0.5, 0.75, 2.0)


@dataclass
class BenchOptions:
    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "fp32"
    backend: str = "torch"
    gpu: str | None = None  # modelled mode: a spec-table GPU, no server
    block_size: int = 16
    num_blocks: int | None = None  # None: enough for max_num_seqs requests of the longest lengths
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256
    prefix_caching: bool = False
    mode: str = "poisson"  # poisson | agentic | concurrency | trace
    input_len: str = "uniform:32:128"
    output_len: str = "32"
    turn_input_len: str = "16"  # agentic: new tokens per later turn
    turns: int = 3
    think_s: float = 0.0
    clients: int = 8  # concurrency mode
    trace: str | None = None
    num_requests: int = 120
    rates: list[float] | None = None  # None: fractions of the estimated capacity
    seed: int = 0
    threads: int | None = 1
    paired: bool | None = None  # measured mode: the step table timed between the server's steps, off its clock
    # (probe.py); None: on a CPU (whose speed drifts), not on a GPU (where the probe would sit in the energy window)
    speed_window_s: float | None = SPEED_WINDOW_S  # paired: the machine's speed trace's half-window; None: steady
    graphs: bool | None = None  # CUDA graphs of the decode-only steps; None: on a GPU with the triton or cuda backend
    clock: str = "wall"  # wall | cpu (this thread's CPU time: a shared CPU measured as if idle; needs threads=1)
    efficiency: float | None = None  # modelled mode: None = tokprof's step model, else a stated flat efficiency
    overhead_us: float | None = None  # None: measured (scheduler host time); modelled mode default 0
    usd_per_gpu_hour: float | None = None
    all_in_kw_per_gpu: float | None = None
    endpoint: str | None = None  # an OpenAI-compatible server (vLLM, SGLang) to drive instead of tokprof's own
    endpoint_model: str | None = None  # None: the first model its /v1/models lists


def _rel(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas == 0:
        return None
    return (pred - meas) / meas


def workload_for(opts: BenchOptions, rate: float, vocab: int, seed: int) -> Workload:
    inp = loadgen.LengthDist.parse("input_len", opts.input_len)
    out = loadgen.LengthDist.parse("output_len", opts.output_len)
    if opts.mode == "poisson":
        return loadgen.poisson(rate, opts.num_requests, inp, out, vocab_size=vocab, seed=seed)
    if opts.mode == "agentic":
        turn = loadgen.LengthDist.parse("turn_input_len", opts.turn_input_len)
        return loadgen.agentic(rate, max(1, opts.num_requests // opts.turns), opts.turns, inp, turn, out,
                               vocab_size=vocab, think_s=opts.think_s, seed=seed)
    if opts.mode == "concurrency":
        return loadgen.concurrency(opts.clients, opts.num_requests, inp, out, vocab_size=vocab, seed=seed)
    if opts.mode == "trace":
        if not opts.trace:
            raise ValueError("trace: mode 'trace' needs a trace file (--trace FILE.jsonl)")
        return loadgen.read_trace(opts.trace, vocab_size=vocab, seed=seed)
    raise ValueError(f"mode: expected poisson, agentic, concurrency or trace, got {opts.mode!r}")


def scheduler_config(opts: BenchOptions) -> SchedulerConfig:
    longest = loadgen.LengthDist.parse("input_len", opts.input_len).upper
    longest += loadgen.LengthDist.parse("output_len", opts.output_len).upper
    if opts.mode == "agentic":
        longest += (opts.turns - 1) * (loadgen.LengthDist.parse("turn_input_len", opts.turn_input_len).upper
                                       + loadgen.LengthDist.parse("output_len", opts.output_len).upper)
    per = -(-longest // opts.block_size)
    num_blocks = opts.num_blocks or opts.max_num_seqs * per + per
    return SchedulerConfig(num_blocks=num_blocks, block_size=opts.block_size, max_num_seqs=opts.max_num_seqs,
                           max_num_batched_tokens=opts.max_num_batched_tokens, prefix_caching=opts.prefix_caching)


def capacity_per_s(step_time: StepTimeModel, opts: BenchOptions, cfg: SchedulerConfig,
                   overhead: Overhead | None = None, seed: int = 0) -> float:
    """Requests/s at saturation, by the simulator: a closed loop of `max_num_seqs` clients (the batch kept full,
    prefills mixed in as the scheduler mixes them), its completion rate between the first and last quarter of
    the requests (the filling and draining ends left out)."""
    inp = loadgen.LengthDist.parse("input_len", opts.input_len)
    out = loadgen.LengthDist.parse("output_len", opts.output_len)
    n = 8 * opts.max_num_seqs
    wl = loadgen.concurrency(opts.max_num_seqs, n, inp, out, vocab_size=1 << 16, seed=seed)
    run = simulate(wl, cfg, step_time, Slo(ttft_s=1e9, tpot_s=1e9), overhead=overhead)
    done = sorted(r.finish_s for r in run.requests if r.finish_s is not None)
    lo, hi = len(done) // 4, 3 * len(done) // 4
    if hi <= lo or done[hi] <= done[lo]:
        raise RuntimeError(f"capacity: the simulated closed loop finished {len(done)} of {n} requests")
    return (hi - lo) / (done[hi] - done[lo])


def _errors(p: Any, m: Any) -> dict[str, float | None]:
    return {"throughput": _rel(p.output_tokens_per_s_per_gpu, m.output_tokens_per_s_per_gpu),
            "median_tpot": _rel(p.median_tpot_s, m.median_tpot_s),
            "p90_ttft": _rel(p.ttft_s["p90"], m.ttft_s["p90"])}


def _point(rate: float, wl: Workload, measured: ServeRun | None, predicted: ServeRun | None,
           table: StepTimeModel | None, steady: ServeRun | None = None) -> dict[str, Any]:
    """`steady`: the prediction on the table's mean machine, when `predicted` followed the machine's speed."""
    doc: dict[str, Any] = {"rate_per_s": rate, "workload": wl.description}
    if predicted is not None:
        doc["predicted"] = predicted.summary.to_dict()
    if steady is not None:
        doc["predicted_steady"] = steady.summary.to_dict()
    if measured is not None:
        m = measured.summary
        doc["measured"] = m.to_dict()
        if predicted is not None:
            errors = _errors(predicted.summary, m)
            doc.update(errors=errors, within_goal={k: v is not None and abs(v) <= GOAL[k] for k, v in errors.items()})
        if steady is not None:
            doc["errors_steady"] = _errors(steady.summary, m)
        if not measured.steps or table is None:  # an external server: no per-step record to split
            return doc
        full = table.step_time_s(_full_batch_shape(measured))
        b = max(1, max(s.num_decode for s in measured.steps))
        doc["causes_measured"] = [asdict(c) for c in gap_split(measured, table, full, b, b / full)]
    return doc


def _full_batch_shape(run: ServeRun) -> Any:
    from tokprof.serving.step_time import StepShape

    dec = [s for s in run.steps if s.num_decode]
    b = max((s.num_decode for s in dec), default=1)
    ctx = sum(s.decode_context_mean for s in dec) / len(dec) if dec else 1.0
    return StepShape(b, ctx, 0, 0, 0)


def cost_at(tokens_per_s: float | None, gpu: str | None, opts: BenchOptions) -> dict[str, Any]:
    from tokprof.rollup.economics import cost_per_million_tokens, pricing_for, tokens_per_s_per_mw

    out: dict[str, Any] = {"usd_per_million_tokens": None, "tokens_per_s_per_mw": None}
    if tokens_per_s is None or tokens_per_s <= 0:
        out["reason"] = "no rate meets the SLO: no throughput to price"
        return out
    if gpu is None and opts.usd_per_gpu_hour is None:
        out["reason"] = "a CPU has no row in the price sheet: state --usd-per-hour to price it"
    else:
        pricing = pricing_for(gpu or "cpu", usd_per_gpu_hour=opts.usd_per_gpu_hour,
                              all_in_kw_per_gpu=opts.all_in_kw_per_gpu)
        if pricing.usd_per_gpu_hour is not None:
            out["usd_per_million_tokens"] = cost_per_million_tokens(pricing.usd_per_gpu_hour, tokens_per_s)
            out["price_source"] = pricing.price_source
        else:
            out["reason"] = pricing.price_reason
        kw, label = pricing.all_in_kw(None)
        if kw is not None:
            out["tokens_per_s_per_mw"] = tokens_per_s_per_mw(tokens_per_s, kw)
        out["power_source"] = label
    return out


@dataclass
class _Rig:
    """Measured mode: tokprof's server on this device, and what measures its step times."""

    server: Any
    probe: PairedProbe | None
    measure: Callable[[], MeasuredStepTable]  # the step table, timed now on the server's runner
    wake: WakePenalty
    overhead: Overhead
    meter: Any  # an energy meter, or None (energy_reason says why)
    energy_reason: str | None
    cpu_load: Any


def _build_rig(opts: BenchOptions, config: Any, cfg: SchedulerConfig, doc: dict[str, Any],
               log: Callable[[str], None]) -> tuple[_Rig, MeasuredStepTable]:
    """The server, warmed up, its first step table (three passes), the cost of waking, the probe (paired) and the
    loop's host time; noted in `doc`."""
    import torch

    from tokprof.models.transformer import Transformer
    from tokprof.profiler.cpu_load import CpuLoad
    from tokprof.serving.engine import Server, ThreadCpuClock
    from tokprof.serving.step_time import measure_step_table

    if opts.threads and opts.device == "cpu":
        torch.set_num_threads(opts.threads)
    dev = torch.device(opts.device)
    model = Transformer.random(config, device=dev, dtype=opts.dtype, seed=opts.seed, backend=opts.backend,
                               block_size=opts.block_size)
    if opts.clock not in ("wall", "cpu"):
        raise ValueError(f"clock: expected 'wall' or 'cpu', got {opts.clock!r}")
    if opts.clock == "cpu":
        if opts.device != "cpu" or opts.threads != 1:
            raise ValueError("clock: 'cpu' (thread CPU time) needs --device cpu and --threads 1 (all the work "
                             "on the calling thread)")
        cpu_clock = ThreadCpuClock()
        clock = PausableClock(cpu_clock, cpu_clock.sleep)
        timer, timer_name = cpu_clock, cpu_clock.name
    else:
        clock = PausableClock()
        timer, timer_name = time.perf_counter, "wall"
    graphs = opts.graphs if opts.graphs is not None else (dev.type == "cuda" and opts.backend != "torch")
    server = Server(model, cfg, clock=clock, sleep=clock.sleep, graphs="cuda" if graphs else "off")
    doc.update(gpu=_device_name(dev), mode="measured", cuda_graphs=graphs)
    paired = opts.paired if opts.paired is not None else opts.device == "cpu"
    meter, energy_reason = _open_meter(opts.device, paired)
    log("warm-up and step table")
    server.warmup()
    cpu_meter = CpuLoad.start()
    # tokens per sequence the pool holds at the full batch
    longest = cfg.num_blocks // opts.max_num_seqs * cfg.block_size
    contexts = sorted({c for c in (16, 64, 256, 1024) if c <= longest} | {min(longest, 1024)})
    # Step time is concave in the batch at small batches: a sparse grid interpolated linearly reads a few % low
    # between its points, which the server's queueing amplifies in TPOT. So the grid is dense where batches are.
    batches = sorted({b for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if b < opts.max_num_seqs}
                     | {opts.max_num_seqs})
    # Attention is quadratic in a chunk's length, so prefill time is convex in it: with chunks of 16, 64 and 256
    # only, a 85-token chunk interpolated 4-9% over its measured time.
    chunks = sorted({c for c in (16, 32, 64, 96, 128, 192, 256, 384, 512) if c < opts.max_num_batched_tokens}
                    | {opts.max_num_batched_tokens})

    def measure() -> MeasuredStepTable:
        return measure_step_table(server.runner, batches=batches, contexts=contexts, chunks=chunks, repeats=2,
                                  passes=3, seed=opts.seed, clock=timer, clock_name=timer_name)

    step_time = measure()
    doc["table"] = step_time.to_dict()
    wake = _measure_wake(server, opts, timer, clock.sleep, chunks)
    doc["wake"] = wake.to_dict()
    doc["step_time"] = step_time.describe()
    probe = (PairedProbe(model, clock, batches=batches, contexts=contexts, chunks=chunks, seed=opts.seed,
                         clock_name=timer_name, graphs=graphs) if paired else None)
    doc["paired"] = ("per rate, the step table timed between the server's steps (one table step after each, "
                     "off the server's clock): the simulator's step times for that rate"
                     + (f", each step scaled by the machine's speed then (the probe's samples over their shapes' "
                        f"means, within {opts.speed_window_s:g} s)" if opts.speed_window_s else "")
                     if probe is not None else "per rate, the step table measured just before the server's run")
    if opts.overhead_us is None:
        from tokprof.serving.loop_overhead import measure_loop_overhead

        loop_s, how = measure_loop_overhead(server, opts, vocab_size=config.vocab_size, seed=opts.seed)
        overhead = Overhead(loop_s=loop_s)
        doc["loop_overhead"] = {"per_step_s": loop_s, "how": how}
    else:
        overhead = Overhead(stated_s=opts.overhead_us * 1e-6)
    return _Rig(server, probe, measure, wake, overhead, meter, energy_reason, cpu_meter), step_time


def run_bench(opts: BenchOptions, save: Callable[[dict[str, Any]], None],
              log: Callable[[str], None] = lambda _: None, slo: Slo | None = None) -> dict[str, Any]:
    """The sweep; `save(doc)` is called after every rate (and at the end) with the document so far."""
    from tokprof.models import ModelConfig

    config = ModelConfig.from_name(opts.model)
    cfg = scheduler_config(opts)
    slo = slo or (GPU_SLO if opts.gpu or opts.device != "cpu" else CPU_SLO)
    doc: dict[str, Any] = {"kind": "serve-bench", "model": config.name, "options": asdict(opts),
                           "scheduler": asdict(cfg), "slo": asdict(slo), "slo_text": slo.describe(),
                           "goal": {k: f"within {v:.0%}" for k, v in GOAL.items()}, "points": []}
    rig: _Rig | None = None
    wake: WakePenalty | None = None  # measured mode: the cost of waking from idle (wake.py)
    target = _endpoint(opts, doc)
    step_time: StepTimeModel | None = None
    overhead: Overhead | None = None
    if opts.gpu:
        step_time: StepTimeModel = ModelledStepTime(
            config, opts.gpu, dtype=opts.dtype, efficiency=opts.efficiency, block_size=opts.block_size,
            overhead_s=opts.overhead_us * 1e-6 if opts.overhead_us is not None else
            (0.0 if opts.efficiency is not None else None))
        gpu_key = step_time.spec_key
        doc.update(gpu=gpu_key, mode="endpoint" if target else "modelled", step_time=step_time.describe())
        overhead = Overhead(stated_s=0.0)  # inside the modelled step time
    elif target is None:
        rig, step_time = _build_rig(opts, config, cfg, doc, log)
        wake, overhead = rig.wake, rig.overhead
    else:
        doc.update(gpu=None, mode="endpoint", step_time=None)
    vocab = config.vocab_size
    capacity = capacity_per_s(step_time, opts, cfg, overhead, seed=opts.seed) if step_time is not None else None
    doc["capacity_estimate_per_s"] = capacity
    # Rates as fractions of the capacity: each one of the capacity on the latest table (measured while the rate
    # before it was served), as the CPU's speed drifts over a sweep's minute; stated rates are kept as they are.
    fractions = None if opts.rates else RATE_FRACTIONS
    if capacity is None and not opts.rates:
        raise ValueError("rates: driving an endpoint without a GPU to model needs stated rates (--rates 1,2,4), or "
                         "--gpu to estimate its capacity")
    rates = list(opts.rates or [round(f * capacity, 3) for f in RATE_FRACTIONS])
    latest = step_time
    save(doc)
    for i in range(len(rates)):
        measured = None
        point_table = step_time
        speed = None
        if rig is not None and i and rig.probe is None:  # measured again just before each rate: a CPU that drifts
            point_table = latest = rig.measure()             # hits both sides
        point_capacity = capacity
        if fractions is not None and latest is not step_time:
            point_capacity = capacity_per_s(latest, opts, cfg, overhead, seed=opts.seed)
            rates[i] = round(fractions[i] * point_capacity, 3)
        rate = rates[i]
        wl = workload_for(opts, rate, vocab, opts.seed + i)
        if rig is not None:
            log(f"rate {rate:g}/s: serving {wl.num_requests} requests")
            probe = rig.probe
            if probe is not None:
                probe.reset()
            measured = rig.server.run(wl, slo, meter=rig.meter, energy_reason=rig.energy_reason,
                                      between_steps=probe.after_step if probe is not None else None)
            if probe is not None:  # the table measured while this rate was served (probe.py)
                point_table = latest = probe.table()
                speed = probe.speed_trace(opts.speed_window_s) if opts.speed_window_s else None
        elif target is not None:
            from tokprof.serving.http_client import run_http

            log(f"rate {rate:g}/s: sending {wl.num_requests} requests to {target.base_url}")
            measured = run_http(wl, target, slo)
        predicted = (simulate(wl, cfg, point_table, slo, overhead=overhead, speed=speed, wake=wake)
                     if point_table is not None else None)
        steady = simulate(wl, cfg, point_table, slo, overhead=overhead, wake=wake) if speed is not None else None
        doc["points"].append(_point(rate, wl, measured, predicted, point_table, steady))
        if fractions is not None:
            doc["points"][-1].update(fraction_of_capacity=fractions[i], capacity_estimate_per_s=point_capacity)
        if point_table is not step_time:
            doc["points"][-1]["table"] = point_table.to_dict()
        if speed is not None:
            doc["points"][-1]["speed"] = speed.summary()
        save(doc)
    # The SLO rate, by the simulator (cheap): bisection over Poisson rates of the same lengths.
    def make(rate: float) -> ServeRun:
        return simulate(workload_for(opts, rate, vocab, opts.seed + 1000), cfg, step_time, slo, overhead=overhead,
                        wake=wake)

    if step_time is None:
        doc["slo_search"] = {"max_rate_per_s": None, "reason": "no step-time model to simulate with: give --gpu "
                             "(the endpoint's GPU) for a prediction"}
    elif opts.mode in ("poisson", "agentic"):
        best_rate, best = max_rate_meeting_slo(make, capacity, iterations=8)
        tps = best.summary.output_tokens_per_s_per_gpu if best else None
        doc["slo_search"] = {"provenance": "predicted", "max_rate_per_s": best_rate,
                             "summary": best.summary.to_dict() if best else None,
                             "cost": cost_at(tps, gpu_key if opts.gpu else None, opts)}
    else:
        doc["slo_search"] = {"max_rate_per_s": None, "reason": f"mode {opts.mode} has no request rate to search"}
    if rig is not None:
        load = rig.cpu_load.stop()
        doc["cpu_load"] = {"other_cores": load.other_cores, "cores": load.cores, "note": load.note(),
                           "contended": load.contended}
    errs = [p for p in doc["points"] if "errors" in p]
    if errs:
        doc["validation"] = {"rates": len(errs), "met": len(errs) >= 3 and all(
            all(p["within_goal"].values()) for p in errs), "goal": doc["goal"],
            "against": "tokprof's server" if rig is not None else
            f"the server at {target.base_url} (model {target.model})"}
    save(doc)
    return doc


def _measure_wake(server: Any, opts: BenchOptions, timer: Callable[[], float], sleep: Callable[[float], None],
                  chunks: list[int]) -> WakePenalty:
    """The cost of waking (wake.py), on a prefill step of the table's chunk nearest the mean prompt (the step a
    request arriving at an idle server runs first), after a one-row decode step at that context (the last step
    of a server about to idle)."""
    from tokprof.serving.step_time import table_plans

    mean_in = loadgen.LengthDist.parse("input_len", opts.input_len).mean
    chunk = min(chunks, key=lambda c: abs(c - min(mean_in, opts.max_num_batched_tokens)))
    plans = dict(table_plans([1], [chunk], [chunk], block_size=opts.block_size,
                             vocab=server.model.config.vocab_size, seed=opts.seed))
    return measure_wake_penalty(server.runner, plans[("prefill", 0, 0)], plans[("decode", 0, 0)], clock=timer,
                                sleep=sleep)


def _device_name(dev: Any) -> str:
    """The spec-table key of a GPU, else the device name (the CPU model): the rule of the roll-up points."""
    from tokprof.profiler.devices import detect_device

    info = detect_device(dev)
    return info.spec_key or info.name


def _open_meter(device: str, paired: bool) -> tuple[Any, str | None]:
    """(an NVML energy meter for the server's runs, None) or (None, why there is none)."""
    if not device.startswith("cuda"):
        return None, "a CPU has no energy meter here (NVML meters NVIDIA GPUs only)"
    if paired:
        return None, ("the paired probe's synthetic steps run inside each rate's energy window: energy is metered "
                      "with --no-paired (the default on a GPU)")
    from tokprof.profiler.energy import make_meter

    try:
        return make_meter(device), None
    except RuntimeError as err:
        return None, f"no energy meter: {err}"


def _endpoint(opts: BenchOptions, doc: dict[str, Any]) -> Any:
    """The HttpTarget of `opts.endpoint` (its model resolved; RuntimeError with the reason where nothing
    answers), noted in `doc`; None without an endpoint."""
    if not opts.endpoint:
        return None
    from tokprof.serving.http_client import HttpTarget

    target = HttpTarget(opts.endpoint, opts.endpoint_model)
    target.resolve()
    doc["endpoint"] = {"url": opts.endpoint, "model": target.model}
    return target


def table_from_doc(doc: dict[str, Any]) -> MeasuredStepTable | None:
    return MeasuredStepTable.from_dict(doc["table"]) if doc.get("table") else None
