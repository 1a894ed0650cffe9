"""The step-time model of a decode step on a GPU that was not measured: per-op efficiency curves, a per-step
overhead, and collectives by algorithm, message size, GPU count and link. Used by `modelled()` (--modelled),
`project()` and the validation against published measurements (tokprof validate).

    model = StepModel()                                   # the defaults below, each with its source
    model = StepModel.from_json("assumptions.json")       # or StepModel().with_overrides({"call_latency_us": 2})
    est = model.step(calls, spec, "bf16")                  # StepEstimate: op shares, overhead, step_time_us
    for a in model.assumptions(): print(a.name, a.value, a.unit, a.source)

Terms (all us; t_roof from the datasheet: max(flops / peak FLOP/s, bytes / HBM bandwidth)):

  op time          t = call_latency_us + max(flops / (peak x compute_efficiency),
                                             bytes / (HBM x memory_efficiency[op]))
                   small calls are latency-bound (t -> call_latency_us), large ones approach memory_efficiency[op]
                   of the roof: the achieved fraction t_roof / t is the efficiency curve. `efficiency=` (one number
                   or per op) replaces the curve with t = t_roof / efficiency (the flat model).
  step overhead    graph execution: step_overhead_us["graph"] + calls x launch_us["graph"] (host work, sampling,
                   graph launch); eager: step_overhead_us["eager"] + max(0, calls x launch_us["eager"] - GPU time)
                   (the host launching kernels one by one is the bottleneck when it is slower than the GPU).
  collective       ring:     base_us["ring"] + 2(n-1) hops x hop_us[link] + bytes x 2(n-1)/n / (link x eff)
  (all-reduce;     tree:     base_us["tree"] + 2 ceil(log2 n) hops x hop_us[link] + bytes x 2(n-1)/n / (link x eff)
   all-gather      one_shot: base_us["one_shot"] + bytes x (n-1) / (link x eff)   (each GPU pushes its buffer)
   with n-1 hops,  two_shot: 2 x base_us["one_shot"] + bytes x 2(n-1)/n / (link x eff)
   bytes x (n-1)/n nvls:     base_us["nvls"] + bytes x 2(n-1)/n / (link x eff)       (NVSwitch multicast)
   and no tree)    auto:     the fastest of those the link offers (one/two-shot and NVLS need NVLink), as
                             NCCL's tuner and the custom all-reduces of vLLM / TensorRT-LLM choose by size.

Where tokprof ships a measured reference run of the GPU (tokprof/data/reference/<gpu>/), `reference_step_model`
fits each op's curve (efficiency and latency) to its kernels and `modelled()` uses it; else the defaults below.
The defaults were calibrated on a documented subset of tokprof/data/published_decode.json (see CALIBRATION) and
checked on the held-out rows (tokprof validate prints both errors).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tokprof.models.plan import COLLECTIVE_OPS, KernelCall
from tokprof.profiler import collectives as coll
from tokprof.profiler.devices import GpuSpec
from tokprof.quant.precision import base_op, math_dtype

EXECUTIONS = ("graph", "eager")
ALGORITHMS = ("auto", "ring", "tree", "one_shot", "two_shot", "nvls")

# Calibration (grid search minimising median + 0.3 x max |error|) on the calibration rows of
# tokprof/data/published_decode.json: gpt-fast README (Llama-2 7B/70B, A100, batch 1, tp 1-8) and torchao README
# (batch 1); held out: the LMDeploy A100 rows (batch 1-64, tp 1 and 4). `tokprof validate` prints both errors.
CALIBRATION = "calibrated on the gpt-fast and torchao rows of published_decode.json (tokprof validate)"
NCCL_TUNING = "NCCL src/graph/tuning.cc (NVIDIA/nccl 2.19+, LL protocol)"


@dataclass(frozen=True)
class Assumption:
    """One stated input of the model: its value, unit and where the value comes from."""

    name: str
    value: Any
    unit: str
    source: str


@dataclass(frozen=True)
class StepModel:
    """The assumptions of the step-time model (see the module docstring); every field can be overridden."""

    memory_efficiency: Mapping[str, float] = field(default_factory=lambda: {
        "linear": 0.80, "decode_attention": 0.85, "default": 0.80})
    compute_efficiency: float = 0.75
    call_latency_us: float = 3.5
    op_call_latency_us: Mapping[str, float] = field(default_factory=dict)  # per op, where fitted (else the above)
    execution: str = "graph"
    step_overhead_us: Mapping[str, float] = field(default_factory=lambda: {"graph": 100.0, "eager": 400.0})
    launch_us: Mapping[str, float] = field(default_factory=lambda: {"graph": 0.3, "eager": 6.0})
    collective_algorithm: str = "auto"
    collective_base_us: Mapping[str, float] = field(default_factory=lambda: {
        "ring": 6.6, "tree": 6.8, "one_shot": 15.0, "nvls": 25.0})
    collective_hop_us: Mapping[str, float] = field(default_factory=lambda: {"nvlink": 0.6, "pcie": 1.0})
    collective_efficiency: float = coll.DEFAULT_EFFICIENCY
    collective_latency_us: float | None = None  # a fixed latency per collective replaces the algorithm model
    link: str = coll.AUTO
    sources: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SOURCES))

    def __post_init__(self) -> None:
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution: expected one of {list(EXECUTIONS)}, got {self.execution!r}")
        if self.collective_algorithm not in ALGORITHMS:
            raise ValueError(f"collective_algorithm: expected one of {list(ALGORITHMS)}, got "
                             f"{self.collective_algorithm!r}")
        if self.link not in (coll.AUTO, "nvlink", "pcie"):
            raise ValueError(f"link: expected 'auto', 'nvlink' or 'pcie', got {self.link!r}")
        for name in ("memory_efficiency",):
            for op, v in getattr(self, name).items():
                _fraction(f"{name}[{op}]", v)
        if "default" not in self.memory_efficiency:
            raise ValueError("memory_efficiency: expected a 'default' entry (ops without their own)")
        _fraction("compute_efficiency", self.compute_efficiency)
        _fraction("collective_efficiency", self.collective_efficiency)
        _non_negative("call_latency_us", self.call_latency_us)
        for name in ("step_overhead_us", "launch_us"):
            for k in EXECUTIONS:
                if k not in getattr(self, name):
                    raise ValueError(f"{name}: expected entries for {list(EXECUTIONS)}, got "
                                     f"{dict(getattr(self, name))}")
                _non_negative(f"{name}[{k}]", getattr(self, name)[k])
        for op, v in self.op_call_latency_us.items():
            _non_negative(f"op_call_latency_us[{op}]", v)
        for k in ("ring", "tree", "one_shot", "nvls"):
            _non_negative(f"collective_base_us[{k}]", self.collective_base_us.get(k))
        for k in ("nvlink", "pcie"):
            _non_negative(f"collective_hop_us[{k}]", self.collective_hop_us.get(k))
        if self.collective_latency_us is not None:
            _non_negative("collective_latency_us", self.collective_latency_us)

    # ------------------------------------------------------------------------------------------ overrides

    def with_overrides(self, overrides: Mapping[str, Any], source: str = "stated by the user") -> StepModel:
        """A copy with `overrides` ({field: value}; mapping fields merge key by key), each marked with `source`."""
        if not isinstance(overrides, Mapping):
            raise ValueError(f"overrides: expected a JSON object of assumption names, got {type(overrides).__name__}")
        known = {f.name for f in fields(self)} - {"sources"}
        changes: dict[str, Any] = {}
        sources = dict(self.sources)
        for name, value in overrides.items():
            if name not in known:
                raise ValueError(f"assumptions: unknown name {name!r}; expected one of {sorted(known)}")
            current = getattr(self, name)
            if isinstance(current, Mapping):
                if not isinstance(value, Mapping):
                    raise ValueError(f"{name}: expected an object like {dict(current)}, got {value!r}")
                changes[name] = {**current, **value}
            else:
                changes[name] = value
            sources[name] = source
        return replace(self, **changes, sources=sources)

    @classmethod
    def from_json(cls, path: str | Path) -> StepModel:
        """The defaults with the overrides of a JSON file ({"call_latency_us": 2.0, "step_overhead_us": {...}})."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except OSError as err:
            raise ValueError(f"assumptions: cannot read {str(p)!r}: {err.strerror or err}") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"assumptions: {str(p)!r} is not valid JSON: {err}") from err
        return cls().with_overrides(data, source=f"stated in {p.name}")

    def assumptions(self) -> list[Assumption]:
        """Every assumption with its value, unit and source (what `tokprof rollup --modelled` prints)."""
        units = {"memory_efficiency": "fraction of HBM roof", "compute_efficiency": "fraction of peak FLOP/s",
                 "call_latency_us": "us per kernel call", "op_call_latency_us": "us per kernel call",
                 "execution": "", "step_overhead_us": "us per step",
                 "launch_us": "us per kernel call", "collective_algorithm": "",
                 "collective_base_us": "us per collective", "collective_hop_us": "us per hop",
                 "collective_efficiency": "fraction of link bandwidth", "collective_latency_us": "us per collective",
                 "link": ""}
        out = []
        for f in fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            out.append(Assumption(f.name, dict(value) if isinstance(value, Mapping) else value, units[f.name],
                                  self.sources.get(f.name, "stated")))
        return out

    # ------------------------------------------------------------------------------------------ the terms

    def op_time_us(self, call: KernelCall, spec: GpuSpec, dtype: str,
                   efficiency: float | Mapping[str, float] | None = None) -> tuple[float, float, str | None]:
        """(time of one call in us, its datasheet roof time, bound) on `spec` (module docstring: op time)."""
        flops, nbytes = call.cost()
        t_mem = nbytes / (_hbm(spec) * 1e12) * 1e6
        # the roof of the call's math dtype: fp8 for W8A8, fp4 for MXFP4/NVFP4 on Blackwell (tokprof.quant.precision)
        peak = spec.peak_tflops(math_dtype(call.op, call.dtype, spec, call.shape)) if flops else None
        t_comp = flops / (peak * 1e12) * 1e6 if peak else 0.0
        roof, bound = (t_comp, "compute") if t_comp > t_mem else (t_mem, "memory" if peak or not flops else None)
        if efficiency is not None:
            return roof / _flat(efficiency, call.op), roof, bound
        e_mem = self.memory_efficiency.get(call.op, self.memory_efficiency.get(
            base_op(call.op), self.memory_efficiency["default"]))  # linear_int4 etc. stream like linear
        latency = self.op_call_latency_us.get(call.op, self.call_latency_us)
        return latency + max(t_comp / self.compute_efficiency, t_mem / e_mem), roof, bound

    def overhead_us(self, kernel_calls: int, gpu_time_us: float) -> float:
        """Per-step time beyond the GPU's kernels and collectives (module docstring: step overhead)."""
        base = self.step_overhead_us[self.execution]
        launches = kernel_calls * self.launch_us[self.execution]
        if self.execution == "graph":
            return base + launches
        return base + max(0.0, launches - gpu_time_us)

    def collective_us(self, op: str, nbytes: int, world: int, link: coll.Link) -> tuple[float, str]:
        """(time of one collective in us, the algorithm used) over `link` (module docstring: collective)."""
        if op not in COLLECTIVE_OPS:
            raise ValueError(f"op: expected one of {sorted(COLLECTIVE_OPS)}, got {op!r}")
        bw = link.gbps_per_direction * 1e9 * self.collective_efficiency / 1e6  # bytes per us
        if self.collective_latency_us is not None:  # the fixed-latency model (the one before the algorithms)
            return self.collective_latency_us + nbytes * coll.bus_factor(op, world) / bw, "fixed latency"
        hop = self.collective_hop_us["nvlink" if link.kind == "nvlink" else "pcie"]
        base = self.collective_base_us
        n = world
        if op == "all_reduce":
            times = {"ring": base["ring"] + 2 * (n - 1) * hop + nbytes * 2 * (n - 1) / n / bw,
                     "tree": base["tree"] + 2 * math.ceil(math.log2(n)) * hop + nbytes * 2 * (n - 1) / n / bw}
            if link.kind == "nvlink":
                times["one_shot"] = base["one_shot"] + nbytes * (n - 1) / bw
                times["two_shot"] = 2 * base["one_shot"] + nbytes * 2 * (n - 1) / n / bw
                times["nvls"] = base["nvls"] + nbytes * 2 * (n - 1) / n / bw
        elif op == "all_to_all":  # each GPU sends (n-1)/n of its `nbytes` send buffer, n-1 pairwise steps ("ring")
            times = {"ring": base["ring"] + (n - 1) * hop + nbytes * (n - 1) / n / bw}
            if link.kind == "nvlink":  # every peer written at once (tokprof.rollup.systems.all_to_all_us's model)
                times["one_shot"] = base["one_shot"] + nbytes * (n - 1) / n / bw
        else:  # all_gather of a gathered output of `nbytes`
            times = {"ring": base["ring"] + (n - 1) * hop + nbytes * (n - 1) / n / bw}
            if link.kind == "nvlink":
                times["one_shot"] = base["one_shot"] + nbytes * (n - 1) / n / bw
        if self.collective_algorithm == "auto":
            algo = min(times, key=lambda k: times[k])
        elif self.collective_algorithm in times:
            algo = self.collective_algorithm
        else:
            raise ValueError(f"collective_algorithm: {self.collective_algorithm!r} is not available for {op} over "
                             f"{link.kind} (available: {sorted(times)})")
        return times[algo], algo

    def step(self, calls: list[KernelCall], spec: GpuSpec, dtype: str,
             efficiency: float | Mapping[str, float] | None = None,
             interconnect: GpuSpec | None = None, extra_kernel_calls: int = 0,
             extra_gpu_time_us: float = 0.0) -> StepEstimate:
        """Every call of one GPU's decode step timed, collectives included (over `interconnect`'s link, default
        `spec`'s), plus the step overhead. `extra_*`: kernels timed elsewhere (a projection's measured ones) that
        count towards the overhead's launches and GPU time."""
        from tokprof.rollup.records import OpShare

        shares: list[OpShare] = []
        algorithms: dict[str, str] = {}
        link = None
        for call in calls:
            if call.op in COLLECTIVE_OPS:
                if link is None:
                    link = coll.interconnect(interconnect or spec, self.link)
                    if link is None:
                        raise ValueError(f"link: {(interconnect or spec).key} has no NVLink or PCIe bandwidth in the "
                                         "spec table; name another GPU for the collectives")
                t, algo = self.collective_us(call.op, call.shape["bytes"], call.shape["world"], link)
                roof = call.shape["bytes"] * coll.bus_factor(call.op, call.shape["world"]) / (
                    link.gbps_per_direction * 1e3)
                algorithms[call.label] = algo
                shares.append(OpShare(op=call.op, label=call.label, count=call.count, time_us=t,
                                      total_us=call.count * t, share=0.0, efficiency_datasheet=roof / t,
                                      bound="interconnect", shape=dict(call.shape)))
                continue
            t, roof, bound = self.op_time_us(call, spec, dtype, efficiency)
            shares.append(OpShare(op=call.op, label=call.label, count=call.count, time_us=t, total_us=call.count * t,
                                  share=0.0, efficiency_datasheet=roof / t if t > 0 else None, bound=bound,
                                  shape=dict(call.shape)))
        kernel_calls = sum(c.count for c in calls if c.op not in COLLECTIVE_OPS) + extra_kernel_calls
        gpu_us = sum(s.total_us for s in shares) + extra_gpu_time_us
        overhead = self.overhead_us(kernel_calls, gpu_us)
        if overhead > 0:
            shares.append(OpShare(op="step_overhead", label=f"host work, launches, sampling ({self.execution})",
                                  count=1, time_us=overhead, total_us=overhead, share=0.0, bound="overhead"))
        return StepEstimate(shares=shares, gpu_time_us=gpu_us, overhead_us=overhead, kernel_calls=kernel_calls,
                            algorithms=algorithms, link=link)

    def describe(self, efficiency: float | Mapping[str, float] | None = None) -> str:
        """One line naming the assumptions in force (for a point's notes)."""
        if efficiency is not None:
            flat = (f"{efficiency:g} for every op" if not isinstance(efficiency, Mapping)
                    else ", ".join(f"{op} {e:g}" for op, e in efficiency.items()))
            ops = f"flat efficiency of the roofline (stated): {flat}"
        else:
            eff = ", ".join(f"{k} {v:g}" for k, v in self.memory_efficiency.items())
            ops = (f"op time = {self.call_latency_us:g} us + roof / efficiency (memory: {eff}; compute "
                   f"{self.compute_efficiency:g})")
        return (f"step model: {ops}; {self.execution} execution, overhead {self.step_overhead_us[self.execution]:g} us "
                f"per step + {self.launch_us[self.execution]:g} us per kernel call; collectives "
                f"{self.collective_algorithm} (tokprof.rollup.step_model; override with --assumptions FILE.json)")


@dataclass
class StepEstimate:
    """One modelled decode step: op shares (collectives and the overhead included), totals in us."""

    shares: list[Any]
    gpu_time_us: float  # kernels + collectives
    overhead_us: float
    kernel_calls: int
    algorithms: dict[str, str] = field(default_factory=dict)  # collective label -> algorithm chosen
    link: coll.Link | None = None

    @property
    def step_time_us(self) -> float:
        return self.gpu_time_us + self.overhead_us


def fit_efficiency_curves(run: Any, min_calls: int = 3) -> dict[str, tuple[float, float]]:
    """op -> (memory efficiency, call latency in us) fitted to a run's memory-bound kernel measurements by least
    squares on t = latency + t_roof_datasheet / efficiency (latency >= 0, efficiency <= 1); ops with fewer than
    `min_calls` distinct roof times are left out (the defaults stay)."""
    by_op: dict[str, list[tuple[float, float]]] = {}
    for k in run.kernels:
        r = k.roofline
        if r.bound == "memory" and r.t_roof_datasheet_us and k.time_us > 0 and not r.suspicious:
            by_op.setdefault(k.op, []).append((r.t_roof_datasheet_us, k.time_us))
    out = {}
    for op, pts in by_op.items():
        if len({x for x, _ in pts}) < min_calls:
            continue
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
        slope = max(slope, 1.0)  # efficiency <= 1
        latency = max(0.0, my - slope * mx)
        out[op] = (1.0 / slope, latency)
    return out


def reference_step_model(gpu_key: str, base: StepModel | None = None) -> StepModel | None:
    """The step model with efficiency curves fitted to the newest shipped reference run of `gpu_key`
    (tokprof/data/reference/<gpu_key>/*.json), or None when there is none (the defaults then apply)."""
    from importlib import resources

    from tokprof.profiler.schema import load_run

    folder = resources.files("tokprof.data").joinpath("reference").joinpath(gpu_key)
    if not folder.is_dir():
        return None
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    if not files:
        return None
    run = load_run(str(files[-1]))
    curves = fit_efficiency_curves(run)
    if not curves:
        return None
    model = base or StepModel()
    source = f"fitted to the reference run {files[-1].name} ({run.provenance.device.name})"
    return model.with_overrides({"memory_efficiency": {op: e for op, (e, _) in curves.items()},
                                 "op_call_latency_us": {op: a for op, (_, a) in curves.items()}}, source=source)


DEFAULT_SOURCES = {
    "memory_efficiency": ("decode_attention: FlashInfer blog 'Accelerating Self-Attentions for LLM Serving with "
                          "FlashInfer' (2024-02, 88-89% of H100 bandwidth); the rest " + CALIBRATION),
    "compute_efficiency": "assumption: large bf16 GEMMs reach ~75% of the dense datasheet peak",
    "call_latency_us": ("GPU-side cost per kernel (launch, ramp, tail; Hazy Research's megakernel blog, 2025-05-27, "
                        "reports ~1.3 us launch per kernel on an H100 even in CUDA graphs, plus the bubbles); "
                        + CALIBRATION),
    "op_call_latency_us": "per-op latencies fitted to a shipped reference run, where one exists (none by default)",
    "execution": "CUDA graphs, as gpt-fast (torch.compile), vLLM and TensorRT-LLM decode",
    "step_overhead_us": "host work per step; graph " + CALIBRATION + "; eager: assumption",
    "launch_us": "assumption: a graph node ~0.3 us, an eager PyTorch dispatch + launch ~6 us",
    "collective_algorithm": "the fastest for the message size, as NCCL's tuner and custom all-reduces choose",
    "collective_base_us": "ring, tree: " + NCCL_TUNING + " baseLat; one_shot " + CALIBRATION + "; nvls: assumption",
    "collective_hop_us": NCCL_TUNING + " hwLat per step",
    "collective_efficiency": "assumption (tokprof.profiler.collectives.DEFAULT_EFFICIENCY)",
    "collective_latency_us": "unset: the algorithm model; a number replaces it with a fixed latency",
    "link": "auto: NVLink where the spec table has it, else PCIe x16",
}


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}: expected a fraction in (0, 1], got {value!r}")
    return float(value)


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
    return float(value)


def _hbm(spec: GpuSpec) -> float:
    if spec.hbm_tbps is None:
        raise ValueError(f"gpu: the spec-table row {spec.key!r} has no HBM bandwidth; it cannot bound a kernel")
    return spec.hbm_tbps


def _flat(efficiency: float | Mapping[str, float], op: str) -> float:
    """The stated flat efficiency of `op` (one number, or one per op)."""
    from tokprof.rollup.economics import check_positive

    if isinstance(efficiency, Mapping):
        if op not in efficiency:
            raise ValueError(f"efficiency: no entry for op {op!r} (has {sorted(efficiency)}); give every op of the "
                             "plan, or one number")
        value = efficiency[op]
    else:
        value = efficiency
    eff = check_positive(f"efficiency[{op}]" if isinstance(efficiency, Mapping) else "efficiency", value)
    if eff > 1.0:
        raise ValueError(f"efficiency: expected a fraction of the roofline in (0, 1], got {value!r} for {op}")
    return eff
