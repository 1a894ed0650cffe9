"""Serving systems (tokprof/data/systems.json): a GPU type in a scale-up domain with its links, price and power.

    systems = load_systems()                 # key -> System
    hw = hardware(systems["hgx-h200"])       # the flat parameter vector the curve model reads (Hardware)
    t_us, link = all_to_all_us(hw, nbytes_per_gpu=2 << 20, ranks=16, step_model=StepModel())

A system is what the published throughput-vs-interactivity benchmarks compare: not a GPU but GPUs on a fabric.
`Hardware` flattens a system and its GPU's spec-table row into the few numbers the curve model reads (HBM, peaks
by math dtype, capacity, the scale-up domain and both links, price, power), so the factor decomposition
(tokprof.rollup.factors) can switch one of them at a time from one system to another.

All-to-all over `ranks` GPUs (expert-parallel dispatch and combine). Each GPU sends `nbytes` in total, spread evenly
over the ranks; (ranks - 1)/ranks of it leaves the GPU. While the ranks fit in the scale-up domain it all travels
over NVLink; beyond, a GPU's peers outside its domain are (ranks - domain)/ranks of the ranks, and that share of its
bytes crosses the scale-out NIC, whose bandwidth is the bottleneck (the NVLink share runs at the same time):

    t = base_us + latency_us[link] + max(nbytes x in_domain_share / (nvlink x eff),
                                         nbytes x cross_share / (scale_out x eff_scale_out))

base_us is the step model's one-shot collective cost (a kernel that pushes each rank's buffer: DeepEP-style),
eff the step model's collective_efficiency; eff_scale_out a stated fraction (SCALE_OUT_EFFICIENCY: deepseek-ai/DeepEP
README reports 43-47 GB/s RDMA bandwidth of its EP 16-64 dispatch and combine on 400 Gb/s ConnectX-7, ~0.9 of 50).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from tokprof.profiler.devices import GpuSpec, load_specs
from tokprof.rollup.economics import PriceSheet, load_price_sheet
from tokprof.rollup.step_model import StepModel

SCALE_OUT_EFFICIENCY = 0.9
SCALE_OUT_EFFICIENCY_SOURCE = ("deepseek-ai/DeepEP README (normal kernels, internode on H800 + CX7 400 Gb/s: "
                               "RDMA bottleneck bandwidth 43-47 GB/s of 50)")
SYSTEM_ALIASES = {"h100": "hgx-h100", "h200": "hgx-h200", "b200": "hgx-b200", "b300": "hgx-b300",
                  "gb200": "gb200-nvl72", "gb300": "gb300-nvl72"}


@dataclass(frozen=True)
class LinkSpec:
    """One link of a system, per GPU, one direction."""

    kind: str  # "nvlink" | "infiniband"
    gbps_per_direction: float
    latency_us: float
    source: str
    what: str = ""


@dataclass(frozen=True)
class System:
    """One row of systems.json, resolved: its GPU's spec row and its price and power with their sources."""

    key: str
    name: str
    gpu: str
    gpus_per_domain: int
    scale_up: LinkSpec
    scale_out: LinkSpec
    usd_per_gpu_hour: float | None
    price_source: str
    all_in_kw_per_gpu: float | None
    power_source: str
    spec: GpuSpec | None  # None: the GPU has no spec-table row here (the reason in spec_reason)
    spec_reason: str | None = None


@dataclass(frozen=True)
class Hardware:
    """The parameters of a system the curve model reads (every figure per GPU). Factors switch these one by one."""

    system: str
    gpu: str
    hbm_tbps: float
    memory_gb: float
    peak_tflops: dict[str, float | None]  # math dtype ("bf16", "fp8", "fp4") -> dense datasheet TFLOP/s
    gpus_per_domain: int
    nvlink_gbps: float  # per direction
    nvlink_latency_us: float
    scale_out_gbps: float  # per direction
    scale_out_latency_us: float
    usd_per_gpu_hour: float | None
    all_in_kw_per_gpu: float | None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def peak(self, math_dtype: str) -> float | None:
        return self.peak_tflops.get(math_dtype)

    def with_(self, **changes: Any) -> Hardware:
        return replace(self, **changes)


def _link(row: Any, where: str) -> LinkSpec:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with kind, gbps_per_direction, latency_us, source")
    bw, lat = row.get("gbps_per_direction"), row.get("latency_us")
    if not isinstance(bw, (int, float)) or isinstance(bw, bool) or bw <= 0:
        raise ValueError(f"{where}.gbps_per_direction: expected a positive number, got {bw!r}")
    if not isinstance(lat, (int, float)) or isinstance(lat, bool) or lat < 0:
        raise ValueError(f"{where}.latency_us: expected a non-negative number, got {lat!r}")
    return LinkSpec(kind=str(row.get("kind")), gbps_per_direction=float(bw), latency_us=float(lat),
                    source=f"{row.get('source', '?')} ({row.get('date', 'undated')})",
                    what=str(row.get("generation") or row.get("nic") or ""))


def _system(row: dict[str, Any], where: str, specs: dict[str, GpuSpec], sheet: PriceSheet) -> System:
    for name in ("key", "name", "gpu"):
        if not isinstance(row.get(name), str):
            raise ValueError(f"{where}.{name}: expected a string, got {row.get(name)!r}")
    domain = row.get("gpus_per_domain")
    if isinstance(domain, bool) or not isinstance(domain, int) or domain < 1:
        raise ValueError(f"{where}.gpus_per_domain: expected a positive int, got {domain!r}")
    gpu = row["gpu"]
    spec = specs.get(gpu)
    reason = None if spec is not None else f"GPU {gpu!r} has no row in tokprof/data/gpus.json"
    price_row = sheet.row(gpu)
    usd, usd_src = row.get("usd_per_gpu_hour"), row.get("price_source") or row.get("price_note") or "unknown"
    kw, kw_src = row.get("all_in_kw_per_gpu"), row.get("power_source") or row.get("price_note") or "unknown"
    if row.get("price_from") == "prices.json":
        if price_row is None:
            usd, usd_src = None, f"prices.json has no row for {gpu!r}"
        else:
            tier = sheet.default_tier
            usd, usd_src = price_row.usd_per_gpu_hour.get(tier), f"prices.json {gpu} {tier} ({price_row.source})"
    if row.get("power_from") == "prices.json":
        if price_row is None:
            kw, kw_src = None, f"prices.json has no row for {gpu!r}"
        else:
            kw, kw_src = price_row.all_in_kw_per_gpu, f"prices.json {gpu} all-in kW ({price_row.source})"
    return System(key=row["key"], name=row["name"], gpu=gpu, gpus_per_domain=domain,
                  scale_up=_link(row.get("scale_up"), f"{where}.scale_up"),
                  scale_out=_link(row.get("scale_out"), f"{where}.scale_out"),
                  usd_per_gpu_hour=usd, price_source=usd_src, all_in_kw_per_gpu=kw, power_source=kw_src,
                  spec=spec, spec_reason=reason)


@lru_cache(maxsize=4)
def _load(path: str | None) -> dict[str, System]:
    if path is None:
        text = resources.files("tokprof.data").joinpath("systems.json").read_text()
        where = "tokprof/data/systems.json"
    else:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as err:
            raise ValueError(f"systems: cannot read {path!r}: {err.strerror or err}") from err
        where = path
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"systems: {where} is not valid JSON: {err}") from err
    rows = data.get("systems") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"systems: {where}: expected an object with a non-empty 'systems' list")
    specs, sheet = load_specs(), load_price_sheet()
    out = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"systems: {where}: systems[{i}]: expected an object, got {row!r}")
        s = _system(row, f"{where}: systems[{i}]", specs, sheet)
        out[s.key] = s
    return out


def load_systems(path: str | None = None) -> dict[str, System]:
    """key -> System from tokprof/data/systems.json (or `path` in its format)."""
    return dict(_load(path))


def resolve_system(name: str | System, systems: dict[str, System] | None = None) -> System:
    """A system from its key ("gb300-nvl72") or a short name ("gb300", "h200")."""
    if isinstance(name, System):
        return name
    systems = systems if systems is not None else load_systems()
    key = name.strip().lower() if isinstance(name, str) else name
    key = key if key in systems else SYSTEM_ALIASES.get(key, key)
    if key not in systems:
        raise ValueError(f"system: expected one of {sorted(systems)} (tokprof/data/systems.json), got {name!r}")
    return systems[key]


def hardware(system: System) -> Hardware:
    """The curve model's parameters of `system`; ValueError when its GPU has no spec row or lacks a figure."""
    spec = system.spec
    if spec is None:
        raise ValueError(f"system {system.key}: {system.spec_reason}; add the row (datasheet figures and source)")
    if spec.hbm_tbps is None or spec.memory_gb is None:
        raise ValueError(f"system {system.key}: the spec row {spec.key!r} lacks hbm_tbps or memory_gb")
    peaks = {"bf16": spec.bf16_tflops, "fp8": spec.fp8_tflops, "fp4": getattr(spec, "fp4_tflops", None)}
    return Hardware(
        system=system.key, gpu=spec.key, hbm_tbps=spec.hbm_tbps, memory_gb=spec.memory_gb, peak_tflops=peaks,
        gpus_per_domain=system.gpus_per_domain, nvlink_gbps=system.scale_up.gbps_per_direction,
        nvlink_latency_us=system.scale_up.latency_us, scale_out_gbps=system.scale_out.gbps_per_direction,
        scale_out_latency_us=system.scale_out.latency_us, usd_per_gpu_hour=system.usd_per_gpu_hour,
        all_in_kw_per_gpu=system.all_in_kw_per_gpu,
        sources={"gpu": f"{spec.source} ({spec.date})", "scale_up": system.scale_up.source,
                 "scale_out": system.scale_out.source, "price": system.price_source, "power": system.power_source})


def all_to_all_us(hw: Hardware, nbytes: Any, ranks: int, step_model: StepModel | None = None) -> tuple[Any, str]:
    """(time in us, the link that bounds it) of one all-to-all in which each GPU sends `nbytes` (a number or a numpy
    array) spread evenly over `ranks` GPUs (module docstring). ranks 1: no collective (0, "none")."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks: expected a positive int, got {ranks!r}")
    if ranks == 1:
        return 0.0 * np.asarray(nbytes), "none"
    model = step_model or StepModel()
    eff = model.collective_efficiency
    domain = hw.gpus_per_domain
    in_domain = (min(ranks, domain) - 1) / ranks
    cross = max(0, ranks - domain) / ranks
    t_nvl = np.asarray(nbytes) * in_domain / (hw.nvlink_gbps * 1e3 * eff)  # GB/s x 1e3 = bytes per us
    if cross == 0:
        return model.collective_base_us["one_shot"] + hw.nvlink_latency_us + t_nvl, "nvlink"
    t_out = np.asarray(nbytes) * cross / (hw.scale_out_gbps * 1e3 * SCALE_OUT_EFFICIENCY)
    link = "scale-out" if np.all(t_out >= t_nvl) else "nvlink"
    return model.collective_base_us["one_shot"] + hw.scale_out_latency_us + np.maximum(t_nvl, t_out), link


def transfer_us(hw: Hardware, nbytes: float, same_domain: bool) -> float:
    """One point-to-point transfer of `nbytes` (a request's KV cache from a prefill to a decode GPU), us."""
    if same_domain:
        return hw.nvlink_latency_us + nbytes / (hw.nvlink_gbps * 1e3)
    return hw.scale_out_latency_us + nbytes / (hw.scale_out_gbps * 1e3 * SCALE_OUT_EFFICIENCY)
