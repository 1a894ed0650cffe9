"""The records of a run and the versioned `RunResult` JSON file that holds them.

One run writes one RunResult: provenance, measured ceilings, every kernel measurement (timing, roofline, energy),
the failures, and the sections later stages add (roll-up points, end-to-end measurements, reconciliation).
Reports and comparisons read only these files, so a run recorded on an H100 can be read anywhere.

    save_run(run, "run.json")      # atomic: a temporary file in the same folder, then os.replace
    run = load_run("run.json")     # validates; ValueError naming the file, the field path, expected and got

Units are in the field names (`_us`, `_j`, `_w`, `_gbps`, `_tflops`, `_bytes`, `_mhz`, `_c`). Every figure is
measured unless its record says otherwise (`provenance`). The schema is documented in docs/run-result.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

SCHEMA_VERSION = 1

PROVENANCES = ("measured", "modelled", "projected")


@dataclass
class Clocks:
    """An NVML snapshot of the card as found (tokprof never changes clocks or limits)."""

    sm_mhz: int | None = None
    mem_mhz: int | None = None
    sm_max_mhz: int | None = None
    temperature_c: int | None = None
    power_limit_w: float | None = None
    power_w: float | None = None


@dataclass
class Timing:
    """Every sample of one kernel call's time, and the statistics over them (MEASUREMENT.md, kernel time)."""

    samples_us: list[float]
    timer: str  # "cuda_events" | "cuda_graph" | "perf_counter"
    mode: str  # "events" | "graph" | "cpu"
    cold_l2: bool
    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float
    noise: float  # relative standard deviation after 1.5x IQR outlier removal
    n_outliers: int
    noise_target: float
    met_noise_target: bool
    calls_per_sample: int = 1  # graph mode: one sample is a replay of N calls, divided by N
    clocks_before: Clocks | None = None
    clocks_after: Clocks | None = None
    throttled: bool | None = None  # None where clocks are unknown (CPU)
    note: str = ""
    # GPU events mode: host time of one call (validation, allocation, launches), kept off the timed window by a
    # sleep kernel queued after the flush; None on the CPU and in graph mode.
    host_us_per_call: float | None = None
    flush: str | None = None  # cold-L2 flush before each timed call: "read" | "write"; None when none
    # NVML clock-event reasons seen while sampling (e.g. "sw_power_cap", "hw_thermal_slowdown"), sampled between
    # sample batches, and the lowest SM clock seen then; empty / None without NVML.
    clock_reasons: list[str] = field(default_factory=list)
    sm_mhz_min: int | None = None


@dataclass
class Energy:
    """One energy-meter window."""

    energy_j: float
    time_s: float
    avg_power_w: float
    method: str  # "counter" (NVML total energy) | "sampled" (power samples integrated)


@dataclass
class KernelEnergy:
    """Energy per call from back-to-back replays over a window of >= 1 s (MEASUREMENT.md, kernel energy)."""

    total_j_per_call: float
    dynamic_j_per_call: float  # total minus idle power x time per call
    idle_power_w: float
    calls: int
    window_s: float
    method: str
    temperature_c_start: int | None = None
    temperature_c_end: int | None = None


@dataclass
class Roofline:
    """Where one measured call sits against the roofline, datasheet and measured ceilings both."""

    flops: int
    min_bytes: int
    time_us: float
    achieved_gbps: float
    achieved_tflops: float
    intensity_flop_per_byte: float
    bound: str | None  # "memory" | "compute" | None when no ceiling is known
    t_roof_datasheet_us: float | None = None
    efficiency_datasheet: float | None = None
    t_roof_measured_us: float | None = None
    efficiency_measured: float | None = None
    suspicious: bool = False  # above 100% of a measured ceiling: a byte-count or timing bug, never a result
    note: str = ""


@dataclass
class KernelMeasurement:
    op: str
    shape: dict[str, int]
    dtype: str  # "fp32" | "fp16" | "bf16"
    backend: str
    device: str  # GPU name or CPU model
    timing: Timing
    roofline: Roofline
    energy: KernelEnergy | None = None
    energy_reason: str | None = None  # why energy is None
    graph_timing: Timing | None = None  # graph-mode time beside event time for short kernels
    provenance: str = "measured"

    @property
    def time_us(self) -> float:
        """The best-founded time of one call: the graph-mode median where one was taken (no launch jitter, no host
        time: what a call costs inside a captured decode step), else the main timing's median."""
        return self.best_timing.median_us

    @property
    def best_timing(self) -> Timing:
        return self.graph_timing if self.graph_timing is not None else self.timing

    def key(self) -> tuple[str, tuple[tuple[str, int], ...], str, str]:
        return (self.op, tuple(sorted(self.shape.items())), self.dtype, self.backend)


@dataclass
class Failure:
    """A call that could not be measured (out of memory, a kernel error, an interrupt): kept, never hidden."""

    op: str
    shape: dict[str, int]
    dtype: str
    backend: str
    error: str


@dataclass
class DeviceInfo:
    kind: str  # "cuda" | "cpu"
    name: str
    uuid: str | None = None
    sm_count: int | None = None
    l2_bytes: int | None = None
    memory_bytes: int | None = None
    sm_max_mhz: int | None = None
    mem_max_mhz: int | None = None
    compute_capability: str | None = None
    driver: str | None = None
    cuda: str | None = None
    cpu_model: str | None = None
    cpu_cores: int | None = None
    spec_key: str | None = None  # the row of the spec table this device matched, None when unknown


@dataclass
class Ceilings:
    """Measured in the same run: copy bandwidth (bytes read + written) and a large GEMM's FLOP/s."""

    copy_gbps: float
    gemm_tflops: float
    gemm_dtype: str
    copy_bytes: int
    gemm_shape: list[int]
    device: str
    measured_utc: str
    provenance: str = "measured"
    note: str = ""
    # read-only bandwidth (GB/s of bytes read by a reduction over the copy's source buffer): a read-mostly kernel
    # can beat a copy, so the measured memory roof is the larger of the two; None in runs from before it existed
    read_gbps: float | None = None

    @property
    def bandwidth_gbps(self) -> float:
        """The measured memory roof: max(copy, read-only)."""
        return max(self.copy_gbps, self.read_gbps or 0.0)


@dataclass
class Provenance:
    host: str
    device: DeviceInfo
    versions: dict[str, str | None]  # python, torch, triton, cupy, tokprof, driver, cuda, nvidia-ml-py
    git_sha: str | None
    timestamp_utc: str
    command: list[str]
    clocks: Clocks | None = None


@dataclass
class RunResult:
    provenance: Provenance
    kernels: list[KernelMeasurement] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    ceilings: Ceilings | None = None
    model: dict[str, Any] | None = None  # ModelConfig.to_dict() when the run is about a model
    # Sections of later stages, each a list of their records' to_dict(): tokprof.rollup and tokprof.models.
    rollup: list[dict[str, Any]] = field(default_factory=list)
    e2e: list[dict[str, Any]] = field(default_factory=list)
    reconciliation: list[dict[str, Any]] = field(default_factory=list)
    # tokprof.quant.accuracy.AccuracyReport dicts: a low-precision model's logit error against its reference
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    run_id: str = ""
    # The eager loop's costs beyond the kernels (tokprof.profiler.overhead.Overhead.to_dict()), None when not measured.
    overhead: dict[str, Any] | None = None
    # How busy other processes kept a CPU while the run measured, per phase (tokprof.profiler.cpu_load), None on a
    # GPU run or when not recorded.
    cpu_load: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------------- (de)serialisation


def to_dict(record: Any) -> Any:
    """A dataclass (tree) as JSON-ready dicts and lists; non-finite floats become None (JSON has no NaN)."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: to_dict(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, dict):
        return {str(k): to_dict(v) for k, v in record.items()}
    if isinstance(record, (list, tuple)):
        return [to_dict(v) for v in record]
    if isinstance(record, float) and not math.isfinite(record):
        return None
    return record


T = TypeVar("T")


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass `cls` from `data`, checking every field's type; ValueError names the field path."""
    return _convert(cls, data, path or cls.__name__)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else
                         f"{path}: expected {' or '.join(_type_name(o) for o in options)}, got {_got(value)}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected an object ({tp.__name__}), got {_got(value)}")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _convert(hints[f.name], value[f.name], f"{path}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{path}.{f.name}: missing (required field of {tp.__name__})")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(tp)})
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown} for {tp.__name__}")
        return tp(**kwargs)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {_got(value)}")
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected an object, got {_got(value)}")
        return {k: _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected a number, got {_got(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: expected an integer, got {_got(value)}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ValueError(f"{path}: expected {tp.__name__}, got {_got(value)}")
        return value
    raise TypeError(f"{path}: schema type {tp!r} is not supported")  # a bug in this file, not in the data


def _got(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return f"{type(value).__name__} {text[:60]}"


def save_json_atomic(data: Any, path: str | Path) -> Path:
    """Write JSON so that a reader never sees a half-written file: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_run(run: RunResult, path: str | Path) -> Path:
    return save_json_atomic(run.to_dict(), path)


def run_from_dict(data: Any, source: str = "RunResult") -> RunResult:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {_got(data)}")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{source}: schema_version: expected an integer, got {_got(version)}")
    if version > SCHEMA_VERSION:
        raise ValueError(f"{source}: schema_version {version} is newer than this tokprof reads ({SCHEMA_VERSION}); "
                         "upgrade tokprof")
    if version < 1:
        raise ValueError(f"{source}: schema_version: expected 1..{SCHEMA_VERSION}, got {version}")
    run = from_dict(RunResult, data, source)
    for i, k in enumerate(run.kernels):
        if k.provenance not in PROVENANCES:
            raise ValueError(f"{source}.kernels[{i}].provenance: expected one of {PROVENANCES}, got {k.provenance!r}")
    return run


def read_json(path: str | Path, what: str) -> Any:
    """Parse the JSON file `path`; ValueError naming the file and `what` it should be, or where the JSON breaks."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the {what} ({err.strerror})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg} "
                         f"(a truncated or corrupt {what}?)") from err


def load_run(path: str | Path) -> RunResult:
    """Read and validate a RunResult file; ValueError says which file, which field, what was expected and got."""
    return run_from_dict(read_json(path, "run file"), str(path))
