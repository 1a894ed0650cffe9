"""Collective micro-benchmarks (all-reduce, all-gather) with torch.distributed, and modelled collectives.

    ms = bench_collectives([("all_reduce", 1 << 20)], world_size=8, device="cuda")   # spawn 8 ranks, NCCL
    ms = bench_collectives([("all_reduce", 4096)], world_size=2, device="cpu")        # 2 ranks, gloo
    torchrun --nproc-per-node 8 -m tokprof.profiler.collectives --op all_reduce --bytes 64k,1M -o run.json
    t_us = modelled_all_reduce_us(65536, 8, load_specs()["h100-sxm"])                 # no GPUs needed

Measured (docs/measurement.md, kernel time): seeded random buffers; one untimed call, then a warm-up of about
`warmup_ms` (the same call count on every rank); then samples, each one a barrier, a whole-device sync, the timed
collective, a sync. Each rank times its own call; a sample is the slowest rank's time (all ranks then hold the same
samples, so they stop together: StopRule over the samples, >= 10 samples and 0.1 s, 0.5% noise or the timeout).
Then one more call's result is checked against a host reference (up to VERIFY_MAX_BYTES): a benchmark that moves
the wrong data fails instead of reporting a bandwidth.

Bandwidths with the nccl-tests definitions (its doc/PERFORMANCE.md), `bytes` the nccl-tests message size (the
all-reduce buffer; the all-gather's whole gathered output, each rank contributing bytes/n):

    algbw = bytes / time
    busbw = algbw * 2(n-1)/n   (all_reduce: a ring sends and receives 2(n-1)/n of the buffer per GPU)
    busbw = algbw * (n-1)/n    (all_gather)
    busbw = algbw * (n-1)/n    (all_to_all: of each rank's send buffer, 1/n stays on the rank)

busbw is comparable with one GPU's link bandwidth in one direction, so the roofline of a collective is
`t_roof = bytes * factor / link bandwidth per direction`: NVLink per GPU from the spec table (its `nvlink_gbps` is
all links, both directions: halved), else PCIe x16 from `pcie_gen`. On the CPU (gloo) there is no interconnect
spec: the roofline figures are None and the note says why.

Modelled, where fewer GPUs are present than a plan needs: `time = latency + bytes * factor / (link bandwidth per
direction * efficiency)`, provenance "modelled", every assumption in the note; `collective_time_us` (one) and
`plan_collective_times` (every collective of a tokprof.models.tp plan) use a run's measurement of the same
(op, bytes, world, dtype) instead when there is one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tokprof.kernels._common import dtype_name, parse_dtype
from tokprof.profiler import nvml
from tokprof.profiler.devices import GpuSpec, detect_device, spec_for
from tokprof.profiler.schema import KernelMeasurement, Roofline, Timing, from_dict, to_dict
from tokprof.profiler.stats import StopRule, bounded_sample, summarize

COLLECTIVES = ("all_reduce", "all_gather", "all_to_all")
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}
AUTO = "auto"

# PCIe x16 bandwidth per direction, GB/s: the NVIDIA datasheets state both directions together (A100 PCIe Gen4
# 64 GB/s, H100 and H200 PCIe Gen5 128 GB/s); gen3 from the same per-generation doubling. Recorded 2026-11-23.
PCIE_X16_GBPS_PER_DIRECTION = {3: 16.0, 4: 32.0, 5: 64.0}
PCIE_SOURCE = "NVIDIA A100/H100 datasheets: PCIe Gen4 x16 64 GB/s, Gen5 x16 128 GB/s (both directions), halved"

# Stated modelling assumptions, not measurements (each modelled figure's note repeats the ones it used): the fraction
# of the link bandwidth a collective reaches, and a fixed cost per collective that dominates small messages. Pass
# your own, or replace them with measurements (`tokprof bench --op all_reduce --world-size N`).
DEFAULT_EFFICIENCY = 0.7
DEFAULT_LATENCY_US = {"nvlink": 10.0, "pcie": 25.0}

VERIFY_MAX_BYTES = 1 << 24  # results checked against a host-side reference up to this message size
DEFAULT_SIZES = {"cuda": [1 << 13, 1 << 16, 1 << 20, 1 << 24, 1 << 28], "cpu": [1 << 12, 1 << 16, 1 << 20]}


# ----------------------------------------------------------------------------------------- formulas and links


def _check_world(world: int) -> None:
    if isinstance(world, bool) or not isinstance(world, int) or world < 2:
        raise ValueError(f"world: expected an int >= 2 (a collective needs two ranks), got {world!r}")


def bus_factor(op: str, world: int) -> float:
    """nccl-tests busbw / algbw: 2(n-1)/n for all_reduce, (n-1)/n for all_gather and all_to_all."""
    _check_world(world)
    if op == "all_reduce":
        return 2.0 * (world - 1) / world
    if op in ("all_gather", "all_to_all"):
        return (world - 1) / world
    raise ValueError(f"op: expected one of {list(COLLECTIVES)}, got {op!r}")


def algbw_gbps(nbytes: int, time_us: float) -> float:
    """Algorithm bandwidth, GB/s (1e9 B/s): message bytes / time."""
    if not (time_us > 0 and math.isfinite(time_us)):
        raise ValueError(f"time_us: expected a positive finite number, got {time_us!r}")
    return nbytes / (time_us * 1e-6) / 1e9


def busbw_gbps(op: str, nbytes: int, world: int, time_us: float) -> float:
    """Bus bandwidth, GB/s: algbw x bus_factor(op, world) (nccl-tests)."""
    return algbw_gbps(nbytes, time_us) * bus_factor(op, world)


@dataclass(frozen=True)
class Link:
    """One GPU's interconnect bandwidth in one direction, the ceiling of a collective's busbw."""

    kind: str  # "nvlink" | "pcie"
    gbps_per_direction: float
    source: str


def interconnect(spec: GpuSpec | None, link: str = AUTO) -> Link | None:
    """The link a collective runs over: `link` "nvlink", "pcie" or AUTO (NVLink where the GPU has it, else PCIe).

    None when the spec row does not know it (or for a CPU, spec None). ValueError when the asked link is unknown.
    """
    if link not in (AUTO, "nvlink", "pcie"):
        raise ValueError(f"link: expected 'auto', 'nvlink' or 'pcie', got {link!r}")
    if spec is None:
        return None
    if link in (AUTO, "nvlink") and spec.nvlink_gbps is not None:
        return Link("nvlink", spec.nvlink_gbps / 2.0,
                    f"{spec.key} nvlink_gbps {spec.nvlink_gbps:g} GB/s (all links, both directions) / 2; {spec.source}")
    if link in (AUTO, "pcie") and spec.pcie_gen in PCIE_X16_GBPS_PER_DIRECTION:
        return Link("pcie", PCIE_X16_GBPS_PER_DIRECTION[spec.pcie_gen],
                    f"{spec.key} PCIe Gen{spec.pcie_gen} x16; {PCIE_SOURCE}")
    if link != AUTO:
        raise ValueError(f"link: {spec.key} has no {link} bandwidth in the spec table (nvlink_gbps "
                         f"{spec.nvlink_gbps}, pcie_gen {spec.pcie_gen})")
    return None


# --------------------------------------------------------------------------------------------------- modelled


@dataclass
class CollectiveTime:
    """A collective's time for a plan: measured (a run's median) or modelled (formula and assumptions in note)."""

    op: str
    nbytes: int
    world: int
    time_us: float | None
    provenance: str  # "measured" | "modelled"
    note: str


def _modelled(op: str, nbytes: int, world: int, spec: GpuSpec | Link | None, efficiency: float,
              latency_us: float | None, link: str) -> tuple[float | None, str]:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"nbytes: expected a positive int of message bytes, got {nbytes!r}")
    factor = bus_factor(op, world)
    if not (isinstance(efficiency, (int, float)) and 0 < efficiency <= 1):
        raise ValueError(f"efficiency: expected a fraction of the link bandwidth in (0, 1], got {efficiency!r}")
    chosen = spec if isinstance(spec, Link) else interconnect(spec, link)
    if chosen is None:
        why = "no spec row (a CPU or an unknown GPU)" if spec is None else f"{spec.key} has no interconnect figure"
        return None, f"modelled {op}: unknown, {why}"
    lat = DEFAULT_LATENCY_US[chosen.kind] if latency_us is None else latency_us
    if not (isinstance(lat, (int, float)) and lat >= 0 and math.isfinite(lat)):
        raise ValueError(f"latency_us: expected a finite number of microseconds >= 0, got {latency_us!r}")
    time_us = lat + nbytes * factor / (chosen.gbps_per_direction * 1e9 * efficiency) * 1e6
    note = (f"modelled {op}: {lat:g} us latency + {nbytes} B x {factor:.3f} (busbw factor, n={world}) / "
            f"({chosen.gbps_per_direction:g} GB/s {chosen.kind} per direction x {efficiency:g} stated efficiency) "
            f"= {time_us:.2f} us; link from {chosen.source}")
    return time_us, note


def modelled_collective_us(op: str, nbytes: int, world: int, spec: GpuSpec | Link | None, *,
                           efficiency: float = DEFAULT_EFFICIENCY, latency_us: float | None = None,
                           link: str = AUTO) -> float | None:
    """latency + nbytes * bus_factor / (link GB/s per direction * efficiency), us; None when the link is unknown.

    `latency_us` None takes DEFAULT_LATENCY_US of the link kind (a stated assumption; pass a measured one)."""
    return _modelled(op, nbytes, world, spec, efficiency, latency_us, link)[0]


def modelled_all_reduce_us(nbytes: int, world: int, spec: GpuSpec | Link | None, efficiency: float = DEFAULT_EFFICIENCY,
                           latency_us: float | None = None, link: str = AUTO) -> float | None:
    return modelled_collective_us("all_reduce", nbytes, world, spec, efficiency=efficiency, latency_us=latency_us,
                                  link=link)


def modelled_all_gather_us(nbytes: int, world: int, spec: GpuSpec | Link | None, efficiency: float = DEFAULT_EFFICIENCY,
                           latency_us: float | None = None, link: str = AUTO) -> float | None:
    return modelled_collective_us("all_gather", nbytes, world, spec, efficiency=efficiency, latency_us=latency_us,
                                  link=link)


def collective_time_us(op: str, nbytes: int, world: int, dtype: str, *, spec: GpuSpec | Link | None,
                       measurements: Iterable[KernelMeasurement] = (), efficiency: float = DEFAULT_EFFICIENCY,
                       latency_us: float | None = None, link: str = AUTO) -> CollectiveTime:
    """The time a plan's collective takes: a run's measurement of the same (op, bytes, world, dtype) when there is
    one (its median, provenance "measured"), else the model (provenance "modelled", time None when unknown)."""
    for m in measurements:
        if (m.op == op and m.shape.get("bytes") == nbytes and m.shape.get("world") == world and m.dtype == dtype
                and m.provenance == "measured"):
            return CollectiveTime(op, nbytes, world, m.time_us, "measured",
                                  f"measured {m.backend} on {m.device}, median of {m.timing.samples_taken} samples")
    time_us, note = _modelled(op, nbytes, world, spec, efficiency, latency_us, link)
    return CollectiveTime(op, nbytes, world, time_us, "modelled", note + "; no measurement of this size in the run")


def plan_collective_times(calls: Iterable[Any], *, spec: GpuSpec | Link | None,
                          measurements: Iterable[KernelMeasurement] = (), efficiency: float = DEFAULT_EFFICIENCY,
                          latency_us: float | None = None, link: str = AUTO) -> list[tuple[Any, CollectiveTime]]:
    """(call, its CollectiveTime) for every collective of a plan (KernelCalls with op all_reduce / all_gather and
    shape {"bytes", "world"}, e.g. from tokprof.models.tp.tp_decode_calls): measured where `measurements` has the
    same collective, else modelled. A step's communication time is the sum of count x time_us over the result."""
    measured = list(measurements)
    out = []
    for call in calls:
        if call.op not in COLLECTIVES:
            continue
        out.append((call, collective_time_us(call.op, call.shape["bytes"], call.shape["world"], call.dtype, spec=spec,
                                             measurements=measured, efficiency=efficiency, latency_us=latency_us,
                                             link=link)))
    return out


# --------------------------------------------------------------------------------------------------- measured


def message_elems(op: str, nbytes: int, world: int, elem_bytes: int) -> tuple[int, int]:
    """(elements per rank's input, actual message bytes): the size rounded down to a whole number of elements (and,
    for all_gather, of per-rank shards; for all_to_all, of per-peer chunks); ValueError when that leaves nothing."""
    bus_factor(op, world)
    unit = elem_bytes * (world if op in ("all_gather", "all_to_all") else 1)
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < unit:
        raise ValueError(f"bytes: expected an int >= {unit} for {op} over {world} ranks of {elem_bytes}-byte "
                         f"elements, got {nbytes!r}")
    total = nbytes - nbytes % unit
    return (total // elem_bytes // world if op == "all_gather" else total // elem_bytes), total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _seeded_input(seed: int, rank: int, elems: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s input (elems,): seeded on the host, so every rank can rebuild every other rank's input."""
    gen = torch.Generator(device="cpu").manual_seed(seed * 1000003 + rank)
    return torch.randn(elems, generator=gen, dtype=torch.float32).to(dtype)


def _collective_fn(op: str, nbytes: int, world: int, dtype: torch.dtype, device: torch.device,
                   seed: int) -> tuple[Any, Any, Any, int]:
    """(run, reset, verify, message bytes): `run` issues the collective once; `reset` (untimed) restores the seeded
    input; `verify()` -> None when the last run's result matches a host reference, else what differs."""
    elems, total = message_elems(op, nbytes, world, dtype.itemsize)
    rank = dist.get_rank()
    pristine = _seeded_input(seed, rank, elems, dtype).to(device)  # (elems,)
    buf = pristine.clone()

    def reference() -> list[torch.Tensor]:
        return [_seeded_input(seed, r, elems, dtype).float() for r in range(world)]

    if op == "all_reduce":
        def run() -> None:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)

        def reset() -> None:  # repeated in-place sums grow n-fold per call: start each sample from the seed
            buf.copy_(pristine)

        def verify() -> str | None:
            expected = torch.stack(reference()).sum(0)
            tol = 1e-5 if dtype == torch.float32 else 2e-2  # summation order differs between backends
            err = (buf.float().cpu() - expected).abs().max().item()
            limit = tol * world * max(1.0, expected.abs().max().item())
            return None if err <= limit else f"max |error| {err:.3g} > {limit:.3g}"
        return run, reset, verify, total
    if op == "all_to_all":  # rank r's chunk j goes to rank j: out on rank r = chunk r of every rank, in rank order
        a2a_out = torch.full((elems,), float("nan"), dtype=dtype, device=device)  # (elems,), poisoned

        def run_a2a() -> None:
            dist.all_to_all_single(a2a_out, buf)

        def verify_a2a() -> str | None:
            chunk = elems // world
            expected = torch.cat([x[rank * chunk:(rank + 1) * chunk] for x in reference()])
            got = a2a_out.float().cpu()
            bad = int((got != expected).sum())
            return None if bad == 0 else f"{bad} of {got.numel()} exchanged elements differ from the ranks' chunks"
        return run_a2a, (lambda: None), verify_a2a, total
    out = torch.full((elems * world,), float("nan"), dtype=dtype, device=device)  # (world * elems,), poisoned
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13

    def run() -> None:
        gather(out, buf)

    def verify() -> str | None:
        expected = torch.cat(reference())
        got = out.float().cpu()
        bad = int((got != expected).sum())
        return None if bad == 0 else f"{bad} of {got.numel()} gathered elements differ from the ranks' inputs"
    return run, (lambda: None), verify, total


def measure_collective(op: str, nbytes: int, dtype: str | torch.dtype, device: torch.device | str, *,
                       warmup_ms: float = 25.0, min_samples: int = 10, min_time_s: float = 0.1,
                       max_time_s: float = 5.0, noise_target: float = 0.005, seed: int = 0) -> tuple[Timing, int]:
    """Time one collective in the current process group (every rank calls this with the same arguments).

    Returns (Timing, the message bytes actually used); every rank gets the same Timing (samples = slowest rank).
    """
    if not dist.is_initialized():
        raise RuntimeError("measure_collective needs an initialised torch.distributed process group: use "
                           "bench_collectives (spawns one) or run under torchrun")
    device = torch.device(device)
    world = dist.get_world_size()
    torch_dtype = parse_dtype(dtype)
    rule = StopRule(min_samples=min_samples, min_time_s=min_time_s, max_time_s=max_time_s, noise_target=noise_target)
    run, reset, verify, total = _collective_fn(op, nbytes, world, torch_dtype, device, seed)
    cuda = device.type == "cuda"

    run()  # first call: communicator set-up and connections, never timed
    _sync(device)
    t0 = time.perf_counter()
    run()
    _sync(device)
    (one_s,) = _max_over_ranks([time.perf_counter() - t0], device)
    warm_calls = int(min(1000, max(1, warmup_ms / 1000.0 / max(one_s, 1e-6))))  # the same count on every rank
    for _ in range(warm_calls):
        run()
    _sync(device)
    reset()
    before = nvml.clocks(device) if cuda else None

    samples: list[float] = []
    batch, start = 1, time.perf_counter()
    while True:
        local: list[float] = []
        for _ in range(batch):
            reset()
            dist.barrier()
            _sync(device)  # the whole device idle before the clock starts (rule 7)
            if cuda:
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev0.record()
                run()
                ev1.record()
                _sync(device)
                local.append(ev0.elapsed_time(ev1) * 1000.0)
            else:
                s_ns = time.perf_counter_ns()
                run()
                local.append((time.perf_counter_ns() - s_ns) / 1000.0)
        *batch_us, elapsed = _max_over_ranks([*local, time.perf_counter() - start], device)
        samples.extend(batch_us)
        if rule.should_stop(samples, elapsed):
            break
        batch = min(2 * batch, 64)
    after = nvml.clocks(device) if cuda else None
    checked = "result not checked (message above VERIFY_MAX_BYTES)"
    if total <= VERIFY_MAX_BYTES:  # a benchmark that moves no data, or the wrong data, must not pass for one
        reset()
        run()
        _sync(device)
        problem = verify()
        if problem is not None:
            raise RuntimeError(f"{op} of {total} B over {world} ranks ({dist.get_backend()}, rank "
                               f"{dist.get_rank()}): wrong result, {problem}")
        checked = "result checked against a host reference"

    stats = summarize(samples, noise_target)
    timer, mode = ("cuda_events", "events") if cuda else ("perf_counter", "cpu")
    note = (f"{rule.reason(samples, elapsed)}; {world} ranks, each sample the slowest rank's time, a barrier and a "
            f"device sync before each; {warm_calls} warm-up calls; {checked}")
    timing = Timing(samples_us=bounded_sample(samples), n_samples=len(samples), timer=timer, mode=mode,
                    cold_l2=False, median_us=stats["median_us"],
                    p10_us=stats["p10_us"], p90_us=stats["p90_us"], mean_us=stats["mean_us"], noise=stats["noise"],
                    n_outliers=stats["n_outliers"], noise_target=noise_target,
                    met_noise_target=stats["met_noise_target"], calls_per_sample=1, clocks_before=before,
                    clocks_after=after, throttled=nvml.is_throttled(before, after) if cuda else None, note=note)
    return timing, total


def collective_roofline(op: str, nbytes: int, world: int, elem_bytes: int, time_us: float,
                        link: Link | None, why_no_link: str = "") -> Roofline:
    """The Roofline record of a collective: bytes = the bus bytes each GPU sends (nbytes x bus factor), achieved
    GB/s = busbw, the roof = the link bandwidth per direction; FLOPs = the ring's reduction adds ((n-1)/n of the
    elements per rank for all_reduce, none for all_gather)."""
    factor = bus_factor(op, world)
    bus_bytes = max(1, int(round(nbytes * factor)))
    flops = (nbytes // elem_bytes) * (world - 1) // world if op == "all_reduce" else 0
    alg, bus = algbw_gbps(nbytes, time_us), busbw_gbps(op, nbytes, world, time_us)
    notes = [f"algbw {alg:.3f} GB/s, busbw {bus:.3f} GB/s (nccl-tests: busbw = algbw x {factor:.3f})",
             "measured roof: no interconnect ceiling is measured in a run"]
    t_roof = eff = None
    suspicious = False
    if link is None:
        notes.append(f"datasheet roof: {why_no_link or 'no interconnect figure in the spec table'}")
    else:
        t_roof = bus_bytes / (link.gbps_per_direction * 1e9) * 1e6
        eff = t_roof / time_us
        notes.append(f"datasheet roof: {link.gbps_per_direction:g} GB/s {link.kind} per direction ({link.source})")
        if eff > 1.0:
            suspicious = True
            notes.append(f"busbw is {eff:.0%} of the link: possible only with in-network reduction (NVLink SHARP on "
                         "NVSwitch systems); otherwise check the timing")
    return Roofline(flops=flops, min_bytes=bus_bytes, time_us=float(time_us), achieved_gbps=bus,
                    achieved_tflops=flops / (time_us * 1e-6) / 1e12, intensity_flop_per_byte=flops / bus_bytes,
                    bound="interconnect" if link is not None else None, t_roof_datasheet_us=t_roof,
                    efficiency_datasheet=eff, suspicious=suspicious, note="; ".join(notes))


def run_collectives(calls: Sequence[tuple[str, int]], dtype: str | torch.dtype, device: torch.device | str, *,
                    spec: GpuSpec | None | str = AUTO, link: str = AUTO, timing_kwargs: dict[str, Any] | None = None,
                    seed: int = 0) -> list[KernelMeasurement]:
    """Measure each (op, bytes) in the current process group; every rank returns the same records."""
    device = torch.device(device)
    info = detect_device(device)
    datasheet = spec_for(info) if spec == AUTO else spec
    chosen = interconnect(datasheet, link) if isinstance(datasheet, GpuSpec) else None
    why = "a CPU run (gloo): no interconnect spec" if device.type == "cpu" else (
        f"{info.name} is not in the spec table" if datasheet is None else f"{datasheet.key}: no {link} figure")
    backend = dist.get_backend()
    world = dist.get_world_size()
    torch_dtype = parse_dtype(dtype)
    out: list[KernelMeasurement] = []
    for op, nbytes in calls:
        timing, total = measure_collective(op, nbytes, torch_dtype, device, seed=seed, **(timing_kwargs or {}))
        roof = collective_roofline(op, total, world, torch_dtype.itemsize, timing.median_us, chosen, why)
        out.append(KernelMeasurement(op=op, shape={"bytes": total, "world": world}, dtype=dtype_name(torch_dtype),
                                     backend=str(backend), device=info.name, timing=timing, roofline=roof,
                                     energy=None, energy_reason="collective energy is not measured (per-GPU NVML "
                                     "counters across ranks are not combined)", provenance="measured"))
    return out


def _spawn_worker(rank: int, world: int, backend: str, init_file: str, calls: list[tuple[str, int]], dtype: str,
                  device_type: str, timing_kwargs: dict[str, Any] | None, link: str, seed: int, out_file: str) -> None:
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        records = run_collectives(calls, dtype, device, link=link, timing_kwargs=timing_kwargs, seed=seed)
        if rank == 0:
            Path(out_file).write_text(json.dumps([to_dict(r) for r in records]))
    finally:
        dist.destroy_process_group()


def check_calls(calls: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    checked = []
    for i, call in enumerate(calls):
        if not isinstance(call, (tuple, list)) or len(call) != 2:
            raise ValueError(f"calls[{i}]: expected (op, bytes), got {call!r}")
        op, nbytes = call
        if op not in COLLECTIVES:
            raise ValueError(f"calls[{i}]: op expected one of {list(COLLECTIVES)}, got {op!r}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"calls[{i}]: bytes expected a positive int, got {nbytes!r}")
        checked.append((op, nbytes))
    if not checked:
        raise ValueError("calls: expected at least one (op, bytes), got none")
    return checked


def bench_collectives(calls: Sequence[tuple[str, int]], *, world_size: int = 2, device: str = "cpu",
                      dtype: str | torch.dtype | None = None, timing_kwargs: dict[str, Any] | None = None,
                      link: str = AUTO, seed: int = 0) -> list[KernelMeasurement]:
    """Spawn `world_size` ranks on this host (torch.multiprocessing), measure every (op, bytes), return rank 0's
    records. device "cuda": NCCL, one GPU per rank; "cpu": gloo. dtype default bf16 on GPUs, fp32 on the CPU."""
    import torch.multiprocessing as mp

    calls = check_calls(calls)
    _check_world(world_size)
    device_type = torch.device(device).type
    if device_type not in BACKENDS:
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if device_type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < world_size:
            raise RuntimeError(f"world_size {world_size}: only {visible} CUDA GPU(s) visible here; measure with "
                               f"--world-size {visible} or fewer, or use the modelled collectives "
                               "(modelled_all_reduce_us) from the spec table's interconnect")
    dname = dtype_name(parse_dtype(dtype or ("bf16" if device_type == "cuda" else "fp32")))
    with tempfile.TemporaryDirectory(prefix="tokprof-collectives-") as tmp:
        out_file = os.path.join(tmp, "records.json")
        args = (world_size, BACKENDS[device_type], os.path.join(tmp, "rendezvous"), calls, dname, device_type,
                timing_kwargs, link, seed, out_file)
        try:
            mp.spawn(_spawn_worker, args=args, nprocs=world_size, join=True)
        except mp.ProcessRaisedException as err:
            raise RuntimeError(f"collective benchmark failed in a rank: {err}") from err
        except mp.ProcessExitedException as err:
            raise RuntimeError(f"a collective benchmark rank exited with code {err.exit_code}") from err
        data = json.loads(Path(out_file).read_text())
    return [from_dict(KernelMeasurement, d) for d in data]


def under_torchrun() -> bool:
    """True when torchrun (or another env:// launcher) set RANK and WORLD_SIZE for this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def bench_collectives_torchrun(calls: Sequence[tuple[str, int]], *, dtype: str | torch.dtype | None = None,
                               timing_kwargs: dict[str, Any] | None = None, link: str = AUTO,
                               seed: int = 0) -> tuple[int, list[KernelMeasurement]]:
    """Under torchrun: join the env:// process group (NCCL when GPUs are visible, else gloo), measure, leave.
    Returns (rank, records); only rank 0 should write them."""
    if not under_torchrun():
        raise RuntimeError("RANK, WORLD_SIZE and MASTER_ADDR are not set: launch with torchrun, or call "
                           "bench_collectives(..., world_size=N) to spawn ranks on this host")
    calls = check_calls(calls)
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(BACKENDS[device.type], init_method="env://")
    try:
        records = run_collectives(calls, dtype or ("bf16" if cuda else "fp32"), device, link=link,
                                  timing_kwargs=timing_kwargs, seed=seed)
        return dist.get_rank(), records
    finally:
        dist.destroy_process_group()


def parse_bytes(text: str) -> list[int]:
    """'4k,1M,256M' -> [4096, 1048576, 268435456] (k, M, G are powers of 1024); ValueError naming the bad item."""
    out = []
    for item in (p.strip() for p in text.split(",") if p.strip()):
        scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(item[-1].lower(), 1)
        digits = item[:-1] if scale > 1 else item
        try:
            value = int(digits) * scale
        except ValueError:
            raise ValueError(f"bytes: expected comma-separated sizes such as 4k,1M,256M, got {item!r} in "
                             f"{text!r}") from None
        if value <= 0:
            raise ValueError(f"bytes: expected positive sizes, got {item!r} in {text!r}")
        out.append(value)
    if not out:
        raise ValueError(f"bytes: expected comma-separated sizes such as 4k,1M,256M, got {text!r}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """torchrun entry point: every rank measures, rank 0 writes a RunResult and prints one JSON line."""
    import sys

    from tokprof.profiler.bench import new_run
    from tokprof.profiler.schema import save_run

    p = argparse.ArgumentParser(prog="python -m tokprof.profiler.collectives", description=main.__doc__)
    p.add_argument("--op", default="all_reduce,all_gather",
                   help="all_reduce, all_gather and/or all_to_all, comma-separated")
    p.add_argument("--bytes", default=None, help="message sizes, e.g. 8k,1M,256M (default: a sweep)")
    p.add_argument("--dtype", default=None, help="bf16 (GPU default), fp16 or fp32 (CPU default)")
    p.add_argument("--timeout-s", type=float, default=5.0, help="longest sampling time per size, s")
    p.add_argument("-o", "--output", default=None, help="RunResult file (default tokprof-collectives-<id>.json)")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.op.split(",") if o.strip()]
    sizes = parse_bytes(args.bytes) if args.bytes else DEFAULT_SIZES["cuda" if torch.cuda.is_available() else "cpu"]
    rank, records = bench_collectives_torchrun([(o, s) for o in ops for s in sizes], dtype=args.dtype,
                                               timing_kwargs={"max_time_s": args.timeout_s})
    if rank != 0:
        return
    run = new_run(["torchrun", "-m", "tokprof.profiler.collectives", *(argv or sys.argv[1:])],
                  "cuda" if torch.cuda.is_available() else "cpu")
    run.kernels.extend(records)
    path = save_run(run, args.output or f"tokprof-collectives-{run.run_id}.json")
    print(json.dumps({"command": "collectives", "output": str(path), "measured": len(records)}))


if __name__ == "__main__":  # pragma: no cover
    main()
