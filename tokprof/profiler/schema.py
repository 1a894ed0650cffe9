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

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import tempfile
import threading
import time
import types
import typing
from collections.abc import Iterator
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
    """One kernel call's time: the statistics over every sample, and a bounded sample of the raw times.

    The statistics (median, percentiles, noise) are computed over all `n_samples` samples; `samples_us` keeps at
    most stats.MAX_STORED_SAMPLES of them, evenly spaced in time order (all of them when there were fewer). Files
    written before the bound hold every sample and no `n_samples` (None: len(samples_us) is the count)."""

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
    n_samples: int | None = None  # samples the statistics are over; None in older files (every sample is stored)

    @property
    def samples_taken(self) -> int:
        """How many samples the statistics are over (older files: the stored samples, which were all of them)."""
        return self.n_samples if self.n_samples is not None else len(self.samples_us)


@dataclass
class Energy:
    """One energy-meter window."""

    energy_j: float
    time_s: float
    avg_power_w: float
    method: str  # "counter" (NVML total energy) | "sampled" (power samples integrated)


@dataclass
class KernelEnergy:
    """Energy per call from back-to-back replays over a window of >= 1 s (docs/measurement.md, kernel energy)."""

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
    # Set when the run was stopped before its end (Ctrl-C): when, during what, and that the file keeps everything
    # measured up to then. None: the run finished (or the file predates this field).
    interrupted: str | None = None
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
        if not math.isfinite(value):
            raise ValueError(f"{path}: expected a finite number, got {value!r}")
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


def find_non_finite(value: Any, path: str) -> str | None:
    """The path of the first NaN or infinite float in `value` (a dataclass tree, dicts, lists), else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} = {value!r}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items: Any = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    elif isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, v in items:
        found = find_non_finite(v, f"{path}{key}" if str(key).startswith("[") else f"{path}.{key}")
        if found:
            return found
    return None


def check_finite(value: Any, what: str) -> None:
    """ValueError naming the field when `value` holds NaN or infinity: JSON has neither, and a NaN median would
    compare as anything (an all-NaN run compared with itself said FAST)."""
    found = find_non_finite(value, what)
    if found:
        raise ValueError(f"{found}: expected a finite number (NaN and infinity are not measurements; a figure that "
                         "is unknown is None with a reason)")


STALE_TMP_S = 600.0  # a temporary file of an atomic save older than this was left by a killed process


def remove_stale_tmp(folder: Path, now: float | None = None) -> list[Path]:
    """Remove `.*.tmp` files of atomic saves (ours: `.<name>.<random>.tmp`) older than STALE_TMP_S in `folder`:
    what a SIGKILL between the write and the rename leaves. A save in progress is younger, so it is never touched."""
    now = time.time() if now is None else now
    removed = []
    try:
        candidates = list(folder.glob(".*.json.*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def save_json_atomic(data: Any, path: str | Path, *, exclusive: bool = False) -> Path:
    """Write JSON so that a reader never sees a half-written file: temp file in the same folder, fsync, rename.
    ValueError (naming the field) on NaN or infinity; `exclusive`: FileExistsError when `path` exists (never
    replace another run's file); OSError (disk full, no permission) leaves no file behind, not even an empty one."""
    check_finite(data, Path(path).name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path.parent)
    with _sigint_deferred():  # Ctrl-C during a save lands after it: the file keeps the last measurement
        return _write_atomic(data, path, exclusive)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT while the block runs (main thread only; elsewhere signals go to the main thread anyway), then
    deliver it: KeyboardInterrupt after the block, or the handler that was installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous) and previous is not signal.default_int_handler:
                previous(signal.SIGINT, None)
            elif previous is not signal.SIG_IGN:
                raise KeyboardInterrupt


def _write_atomic(data: Any, path: Path, exclusive: bool) -> Path:
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
        if exclusive:
            try:
                os.link(tmp, path)  # atomic, and fails when `path` exists (os.replace would overwrite it)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: reserve the name exclusively, then replace it
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_text_atomic(text: str, path: str | Path) -> Path:
    """Write a text file atomically (a failed write leaves the old file or none, never an empty one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def mark_interrupted(run: RunResult, during: str) -> None:
    """Record in `run` that it was stopped by Ctrl-C `during` a stage (what it holds is all that was measured)."""
    from datetime import datetime, timezone

    when = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    run.interrupted = (f"interrupted (Ctrl-C) at {when} during {during}; this file keeps everything measured up to "
                       "then, and nothing after it was measured")


def save_run(run: RunResult, path: str | Path, *, exclusive: bool = False) -> Path:
    """Save `run` atomically; ValueError naming the field when a figure is NaN or infinite (see save_json_atomic)."""
    check_finite(run, "RunResult")
    return save_json_atomic(run.to_dict(), path, exclusive=exclusive)


def file_part(value: Any, limit: int = 64) -> str:
    """`value` as a safe piece of a file name: letters, digits, '.', '_' and '-' only, no leading dot, bounded.
    File names built from a RunResult's fields go through this, so that a field such as "1/../../x" cannot name a
    path outside the output folder."""
    text = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+|\.{2,}", "-", str(value))).strip(".-")[:limit]
    return text or "x"


# Fields of the free-form sections (rollup, e2e, reconciliation and their nested records) that other code uses as
# numbers or in names: checked at load, so that a hostile or corrupt file cannot pass a string where an int goes.
_INT_FIELDS = ("batch", "context", "tp", "count", "steps")
_STR_FIELDS = ("model", "gpu", "dtype", "backend", "framework", "mode", "provenance", "op", "label", "name")
_NUMBER_SUFFIXES = ("_us", "_s", "_w", "_j", "_kw", "_gbps", "_tflops", "_pct", "share", "_per_gpu", "_per_user",
                    "_tokens", "_per_mw", "_bytes", "_hour")


def check_section(records: Any, path: str) -> None:
    """Type-check the named fields of a free-form section, recursively; ValueError naming the field."""
    if isinstance(records, list):
        for i, v in enumerate(records):
            check_section(v, f"{path}[{i}]")
        return
    if not isinstance(records, dict):
        return
    for key, v in records.items():
        where = f"{path}.{key}"
        if v is None:
            continue
        if key in _INT_FIELDS and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{where}: expected an integer, got {_got(v)}")
        if key in _STR_FIELDS and not isinstance(v, str):
            raise ValueError(f"{where}: expected a string, got {_got(v)}")
        if key.endswith(_NUMBER_SUFFIXES) and not isinstance(v, (list, dict)) and (
                isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{where}: expected a number, got {_got(v)}")
        if isinstance(v, (dict, list)):
            check_section(v, where)


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
    check_finite(data, source)
    run = from_dict(RunResult, data, source)
    for name in ("rollup", "e2e", "reconciliation"):
        check_section(getattr(run, name), f"{source}.{name}")
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
