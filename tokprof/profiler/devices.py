"""What a run ran on: device detection, software versions, the tokprof git sha, and the GPU spec table.

    info = detect_device("cuda")        # DeviceInfo: name, UUID, SMs, L2, memory, max clocks, driver, CUDA, ...
    spec = spec_for(info)               # GpuSpec from tokprof/data/gpus.json, or None (+ a warning) when unknown
    versions()                          # {"python": ..., "torch": ..., "triton": ..., "driver": ..., ...}

The spec table holds datasheet peaks (dense, no sparsity), each row with its source and date; it feeds the L0
(datasheet) roofline. Unknown hardware gets None and a warning, never the nearest row's numbers.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokprof.profiler import nvml  # NVML lookup and init live with the timing/energy side
from tokprof.profiler.schema import DeviceInfo, read_json

SPECS_PATH = Path(__file__).resolve().parent.parent / "data" / "gpus.json"

# Distributions whose versions a run records (None where not installed).
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "triton": ("triton",),
    "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"),
    "nvidia-ml-py": ("nvidia-ml-py",),
}


@dataclass(frozen=True)
class GpuSpec:
    """One row of tokprof/data/gpus.json. Units in names: TB/s = 1e12 B/s, TFLOP/s = 1e12 FLOP/s, GB = 1e9 B."""

    key: str
    name: str
    hbm_tbps: float | None
    bf16_tflops: float | None
    fp16_tflops: float | None
    fp8_tflops: float | None
    fp32_tflops: float | None
    tdp_w: float | None
    idle_w: float | None
    memory_gb: float | None
    l2_mb: float | None
    source: str
    date: str
    nvlink_gbps: float | None = None
    pcie_gen: int | None = None
    fp4_tflops: float | None = None  # FP4 / FP6 tensor-core rates (Blackwell); None where the GPU has none
    fp6_tflops: float | None = None
    int8_tops: float | None = None
    note: str = ""
    patterns: tuple[str, ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def peak_tflops(self, dtype: str) -> float | None:
        """Datasheet dense FLOP/s (TOPS for int8) for `dtype` (PEAK_DTYPES); None where unknown or absent."""
        if dtype not in PEAK_DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(PEAK_DTYPES)}, got {dtype!r}")
        return self.int8_tops if dtype == "int8" else getattr(self, f"{dtype}_tflops")

    def matches(self, device_name: str) -> bool:
        hit = any(re.search(p, device_name, re.IGNORECASE) for p in self.patterns)
        return hit and not any(re.search(p, device_name, re.IGNORECASE) for p in self.exclude)


_NUMBER_FIELDS = ("hbm_tbps", "bf16_tflops", "fp16_tflops", "fp8_tflops", "fp32_tflops", "tdp_w", "idle_w",
                  "memory_gb", "l2_mb", "nvlink_gbps", "fp4_tflops", "fp6_tflops", "int8_tops")
# the math dtypes with a datasheet peak (a roofline's compute roof)
PEAK_DTYPES = ("bf16", "fp16", "fp8", "fp32", "fp4", "fp6", "int8")


def _spec_from_row(row: Any, where: str) -> GpuSpec:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    for name in ("key", "name", "source", "date"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise ValueError(f"{where}.{name}: expected a non-empty string (every row needs its source and date), "
                             f"got {row.get(name)!r}")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["date"]):
        raise ValueError(f"{where}.date: expected YYYY-MM-DD, got {row['date']!r}")
    for name in _NUMBER_FIELDS:
        value = row.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{where}.{name}: expected a positive number or null, got {value!r}")
    pcie = row.get("pcie_gen")
    if pcie is not None and (isinstance(pcie, bool) or not isinstance(pcie, int)):
        raise ValueError(f"{where}.pcie_gen: expected an integer or null, got {pcie!r}")
    patterns = row.get("patterns") or []
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{where}.patterns: expected a non-empty list of regular expressions, got {patterns!r}")
    for p in [*patterns, *(row.get("exclude") or [])]:
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"{where}: bad pattern {p!r}: {err}") from err
    known = {"key", "name", "source", "date", "note", "patterns", "exclude", "pcie_gen", *_NUMBER_FIELDS}
    unknown = sorted(set(row) - known)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}")
    numbers = {n: (float(row[n]) if row.get(n) is not None else None) for n in _NUMBER_FIELDS}
    return GpuSpec(key=row["key"], name=row["name"], source=row["source"], date=row["date"],
                   note=row.get("note", ""), pcie_gen=pcie, patterns=tuple(patterns),
                   exclude=tuple(row.get("exclude") or ()), **numbers)


def load_specs(path: str | Path | None = None) -> dict[str, GpuSpec]:
    """The spec table, key -> GpuSpec, in file order (the order `match_spec` tries rows in)."""
    path = Path(path) if path is not None else SPECS_PATH
    if path == SPECS_PATH:
        return dict(_load_default_specs())
    return _read_specs(path)


@functools.cache
def _load_default_specs() -> tuple[tuple[str, GpuSpec], ...]:
    return tuple(_read_specs(SPECS_PATH).items())


def _read_specs(path: Path) -> dict[str, GpuSpec]:
    data = read_json(path, "GPU spec table")
    rows = data.get("gpus") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected an object with a 'gpus' list")
    specs: dict[str, GpuSpec] = {}
    for i, row in enumerate(rows):
        spec = _spec_from_row(row, f"{path}: gpus[{i}]")
        if spec.key in specs:
            raise ValueError(f"{path}: gpus[{i}].key {spec.key!r} appears twice")
        specs[spec.key] = spec
    return specs


def match_spec(name: str, specs: dict[str, GpuSpec] | None = None) -> str | None:
    """The spec-table key for a device name as torch reports it ("NVIDIA H100 80GB HBM3" -> "h100-sxm"), or None."""
    for key, spec in (specs if specs is not None else load_specs()).items():
        if spec.matches(name.strip()):
            return key
    return None


def spec_for(info: DeviceInfo, specs: dict[str, GpuSpec] | None = None) -> GpuSpec | None:
    """The datasheet row of a detected device; None for a CPU or unknown GPU (DeviceInfo.spec_key None)."""
    if info.spec_key is None:
        return None
    return (specs if specs is not None else load_specs()).get(info.spec_key)


# --------------------------------------------------------------------------------------------------- detection


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                model = line.split(":", 1)[1].strip()
                if model:
                    return model
    except OSError:
        pass  # not Linux: platform below
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_cores() -> int | None:
    """CPUs this process may run on (the affinity mask, which containers narrow), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def _nvml_query(fn_name: str, *args: Any) -> Any | None:
    """One pynvml query once `nvml` has initialised NVML; None without NVML or where the card does not support it."""
    if nvml.nvml_status() is not None:
        return None
    import pynvml  # importable: nvml_status() is None

    try:
        return getattr(pynvml, fn_name)(*args)
    except pynvml.NVMLError:
        return None  # not supported on this card or driver: the field stays None


def driver_version() -> str | None:
    """The NVIDIA driver version (e.g. "570.133.20"), None without NVML."""
    value = _nvml_query("nvmlSystemGetDriverVersion")
    return value.decode() if isinstance(value, bytes) else value


def _mem_max_mhz(device: torch.device) -> int | None:
    handle = nvml.handle(device)
    if handle is None:
        return None
    import pynvml

    value = _nvml_query("nvmlDeviceGetMaxClockInfo", handle, pynvml.NVML_CLOCK_MEM)
    return int(value) if value is not None else None


def _gpu_uuid(props: Any) -> str | None:
    raw = getattr(props, "uuid", None)
    if raw is None:
        return None
    text = str(raw)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def check_cuda_index(dev: torch.device, given: str | None = None) -> None:
    """ValueError (naming --device) when `dev` is cuda:N past the GPUs torch sees (torch would fail deep inside)."""
    count = torch.cuda.device_count()
    if dev.type == "cuda" and dev.index is not None and dev.index >= count:
        raise ValueError(f"--device: expected cuda:0 to cuda:{count - 1} ({count} GPU(s) visible here), "
                         f"got {given if given is not None else str(dev)!r}")


def resolve_device(device: str | None) -> torch.device:
    """A --device value as a torch.device: None or "auto" picks the GPU when torch sees one, else the CPU.

    ValueError (naming --device) for anything but auto, cpu or cuda[:N], or a GPU that torch does not see."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device: expected auto, cpu or cuda[:N], got {device!r}") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} asked for a GPU but torch sees none (torch {torch.__version__}); "
                         "use --device cpu")
    if dev.type == "cuda" and dev.index is not None:
        check_cuda_index(dev, device)
        # CUDA events, graph captures and Triton and CuPy launches go to the current device: make it this one, or
        # cuda:1 would be timed with events on cuda:0 and its kernels launched there.
        torch.cuda.set_device(dev)
    return dev


def detect_device(device: str | torch.device = "cpu") -> DeviceInfo:
    """Describe `device` for a run's provenance; a GPU missing from the spec table gets spec_key None + a warning."""
    dev = torch.device(device)
    if dev.type == "cpu":
        model = _cpu_model()
        return DeviceInfo(kind="cpu", name=model, cpu_model=model, cpu_cores=_cpu_cores())
    if dev.type != "cuda":
        raise ValueError(f"device: expected cpu or cuda[:N], got {device!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r}: no CUDA GPU is visible to torch here; use device='cpu' instead")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    cuda_dev = torch.device("cuda", index)
    uuid = nvml.device_uuid(cuda_dev) or _gpu_uuid(props)
    spec_key = match_spec(props.name)
    if spec_key is None:
        warnings.warn(f"GPU {props.name!r} is not in the spec table ({SPECS_PATH.name}): datasheet peaks and the L0 "
                      "roofline are None for this run; measured ceilings still apply", stacklevel=2)
    return DeviceInfo(
        kind="cuda",
        name=props.name,
        uuid=uuid,
        sm_count=props.multi_processor_count,
        l2_bytes=getattr(props, "L2_cache_size", None) or None,
        memory_bytes=props.total_memory,
        sm_max_mhz=nvml.max_sm_clock_mhz(cuda_dev),
        mem_max_mhz=_mem_max_mhz(cuda_dev),
        compute_capability=f"{props.major}.{props.minor}",
        driver=driver_version(),
        cuda=torch.version.cuda,
        cpu_model=_cpu_model(),
        cpu_cores=_cpu_cores(),
        spec_key=spec_key,
    )


# ---------------------------------------------------------------------------------------------------- versions


def _dist_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    """python, torch, triton, cupy, nvidia-ml-py, tokprof, driver, cuda; None where absent."""
    import tokprof

    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, names in _DISTRIBUTIONS.items():
        out[key] = _dist_version(names)
    out["torch"] = torch.__version__  # the imported one, which may differ from metadata in odd environments
    out["tokprof"] = tokprof.__version__
    out["driver"] = driver_version()
    out["cuda"] = torch.version.cuda
    return out


GIT_SHA_ENV = "TOKPROF_GIT_SHA"
_SHA_RE = re.compile(r"[0-9a-f]{40}(\+dirty)?")


def git_sha(path: str | Path | None = None) -> str | None:
    """HEAD of the git checkout holding tokprof (with "+dirty" when tracked files changed).

    Where the tree is not a checkout (a copy sent to a GPU machine without its .git, an installed wheel) the sha
    comes from the environment variable TOKPROF_GIT_SHA, set by whoever made the copy (scripts/gpu_check.sh does);
    None when neither gives one. A malformed TOKPROF_GIT_SHA is refused, not recorded."""
    root = Path(path) if path is not None else Path(__file__).resolve().parent.parent.parent
    if not (root / ".git").exists():
        # an installed wheel's site-packages may sit inside some unrelated repository: never ask git there
        return _sha_from_env()
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not re.fullmatch(r"[0-9a-f]{40}", sha):
        return _sha_from_env()
    return sha + ("+dirty" if dirty else "")


def _sha_from_env() -> str | None:
    value = os.environ.get(GIT_SHA_ENV, "").strip().lower()
    if not value:
        return None
    if not _SHA_RE.fullmatch(value):
        raise ValueError(f"{GIT_SHA_ENV}: expected a 40-hex-digit git sha (optionally with '+dirty'), got {value!r}")
    return value
