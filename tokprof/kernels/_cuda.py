"""Loading and launching the CUDA C++ kernels of `tokprof/kernels/cuda/*.cu` through CuPy.

Each .cu file exports `extern "C" __global__` kernels, one per dtype, named `<kernel>_<f32|f16|bf16>`, so the same
names resolve in a cubin built ahead of time by setup.py (nvcc) and in a module compiled at run time by NVRTC.

Lookup order for a device of compute capability X.Y:
1. `cuda/build/<stem>.sm_XY.cubin`, written by `setup.py` when nvcc was found at install time; else the cubin of the
   highest earlier minor revision of the same major architecture (an sm_80 cubin runs on sm_86 and sm_89). A cubin
   older than its .cu or common.cuh is stale (the source was edited after the build) and is not used;
2. NVRTC through `cupy.RawModule(code=...)`, compiled on first use and cached on disk by CuPy
   (`~/.cupy/kernel_cache`, or `CUPY_CACHE_DIR`). common.cuh is pasted into the source handed to NVRTC, so CuPy's
   cache key (the source text) changes when the header does. NVRTC needs libnvrtc and the CUDA headers
   (cuda_fp16.h, cuda_bf16.h): a CUDA toolkit (CUDA_PATH) or `pip install "cupy-cuda13x[ctk]"`.

Modules are loaded per (file, architecture, device), inside that device's context. Launches go on torch's current
stream (`cupy.cuda.ExternalStream`) and take tensors zero-copy, as raw device pointers, so a CuPy kernel orders
correctly with torch work and can be captured in a CUDA graph (after a first, eager call has loaded the module).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

CUDA_DIR = Path(__file__).parent / "cuda"
BUILD_DIR = CUDA_DIR / "build"
COMMON_HEADER = CUDA_DIR / "common.cuh"
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17", f"-I{CUDA_DIR}")

_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_GRID_MAX = (2**31 - 1, 65535, 65535)  # CUDA's limits on gridDim.x, .y, .z
_BLOCK_MAX = (1024, 1024, 64)  # blockDim.x, .y, .z; and at most 1024 threads in all


@functools.cache
def cupy_status() -> str | None:
    """None when CuPy can launch kernels here, else why not (never raises)."""
    try:
        import cupy
    except ImportError as err:
        return f"CuPy is not installed ({err}); install tokprof[cuda13] or tokprof[cuda12]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CuPy raises CUDARuntimeError subclasses that vary by version
        return f"CuPy cannot reach a CUDA driver: {type(err).__name__}: {err}"
    if count == 0:
        return "CuPy sees no CUDA device"
    return None


def kernel_name(base: str, dtype: torch.dtype) -> str:
    """'rms_norm', torch.bfloat16 -> 'rms_norm_bf16'."""
    return f"{base}_{_SUFFIX[dtype]}"


def _stale(cubin: Path, stem: str) -> bool:
    """True when the .cu or common.cuh was modified after `cubin` was built."""
    built = cubin.stat().st_mtime
    return any(src.stat().st_mtime > built for src in (CUDA_DIR / f"{stem}.cu", COMMON_HEADER))


def find_cubin(stem: str, major: int, minor: int, build_dir: Path | None = None) -> tuple[Path | None, str]:
    """(the prebuilt cubin to load for compute capability major.minor or None, what was looked at and why not).

    A cubin built for sm_XY runs on sm_XZ for Z >= Y (same major architecture), so sm_89 takes an sm_80 cubin;
    sm_90 takes only sm_90 (there is no later 9.x), and sm_100 never takes an sm_90 one.
    """
    build_dir = BUILD_DIR if build_dir is None else build_dir
    notes: list[str] = []
    for m in range(minor, -1, -1):
        cubin = build_dir / f"{stem}.sm_{major}{m}.cubin"
        if not cubin.exists():
            continue
        if _stale(cubin, stem):
            notes.append(f"{cubin.name} is older than {stem}.cu or common.cuh (stale; rebuild with `pip install -e .`)")
            continue
        return cubin, ""
    if not notes:
        notes.append(f"no {stem}.sm_{major}*.cubin in {build_dir}")
    return None, "; ".join(notes)


def nvrtc_source(stem: str) -> str:
    """The source of `cuda/<stem>.cu` with common.cuh pasted in place of its #include (line numbers kept by #line)."""
    lines = (CUDA_DIR / f"{stem}.cu").read_text().splitlines(keepends=True)
    header = "".join("\n" if line.strip() == "#pragma once" else line
                     for line in COMMON_HEADER.read_text().splitlines(keepends=True))
    for i, line in enumerate(lines):
        if line.strip() == '#include "common.cuh"':
            lines[i] = f'#line 1 "common.cuh"\n{header}\n#line {i + 2} "{stem}.cu"\n'
    return "".join(lines)


@functools.cache
def _module(stem: str, major: int, minor: int, device_index: int) -> Any:
    """The loaded CuPy module of `cuda/<stem>.cu` on device `device_index` (its CuPy context must be current)."""
    import cupy

    arch = f"sm_{major}{minor}"
    cubin, why_not = find_cubin(stem, major, minor)
    if cubin is not None:
        return cupy.RawModule(path=str(cubin))  # loaded by get_function, in the device context current then
    module = cupy.RawModule(code=nvrtc_source(stem), options=NVRTC_OPTIONS, backend="nvrtc")
    try:
        module.compile()  # RawModule compiles lazily; compile here so a failure says what to install
    except Exception as err:  # CompileException, a missing libnvrtc (pathfinder's error), driver errors: all fatal
        raise RuntimeError(
            f"the cuda backend could not compile cuda/{stem}.cu for {arch} with NVRTC ({type(err).__name__}: {err}). "
            f"No usable prebuilt cubin: {why_not}. Fixes: build cubins ahead of time with nvcc on PATH "
            f"(`TOKPROF_CUDA_ARCHS={arch} pip install -e .`), or give NVRTC libnvrtc and the CUDA headers "
            "(cuda_fp16.h, cuda_bf16.h): a CUDA toolkit found through CUDA_PATH, or "
            "`pip install \"cupy-cuda13x[ctk]\"` (nvidia-cuda-nvrtc and nvidia-cuda-runtime). "
            "Or use backend='triton' or 'torch'."
        ) from err
    return module


@functools.cache
def _kernel(stem: str, name: str, major: int, minor: int, device_index: int) -> Any:
    return _module(stem, major, minor, device_index).get_function(name)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _resolve(stem: str, name: str, index: int) -> Any:
    """`name` of `cuda/<stem>.cu` on device `index`; the caller has made that device current in CuPy."""
    status = cupy_status()
    if status is not None:
        raise RuntimeError(f"the cuda backend is unavailable: {status}")
    major, minor = torch.cuda.get_device_capability(index)
    return _kernel(stem, name, major, minor, index)


def get_kernel(stem: str, name: str, device: torch.device) -> Any:
    """The CuPy function `name` of `cuda/<stem>.cu` for `device` (loaded once per file, architecture and device)."""
    import cupy

    index = _device_index(device)
    with cupy.cuda.Device(index):
        return _resolve(stem, name, index)


def _arg(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return np.uint64(a.data_ptr())
    if isinstance(a, bool):
        return np.int32(int(a))
    if isinstance(a, int):
        if not _INT32_MIN <= a <= _INT32_MAX:
            raise ValueError(f"CUDA kernel argument: expected an int that fits the kernel's 32-bit int, got {a}")
        return np.int32(a)
    if isinstance(a, float):
        return np.float32(a)
    raise TypeError(f"cannot pass {type(a).__name__} to a CUDA kernel")


def _check_launch(name: str, grid: tuple[int, ...], block: tuple[int, ...]) -> None:
    """Grid and block within CUDA's limits, so a bad launch fails here with its numbers, not as 'invalid argument'."""
    for what, dims, limits in (("grid", grid, _GRID_MAX), ("block", block, _BLOCK_MAX)):
        ok = 1 <= len(dims) <= 3 and all(isinstance(d, int) and 1 <= d <= lim
                                         for d, lim in zip(dims, limits, strict=False))
        if not ok:
            raise ValueError(f"{what} of {name}: expected 1-3 positive ints within {limits[:len(dims)]}, got {dims}")
    threads = 1
    for d in block:
        threads *= d
    if threads > 1024:
        raise ValueError(f"block of {name}: expected at most 1024 threads, got {block}")


_MAX_DYNAMIC_SHARED_BYTES = 48 * 1024  # beyond this a kernel must opt in (cudaFuncSetAttribute), which none does


def launch(stem: str, name: str, device: torch.device, grid: tuple[int, ...], block: tuple[int, ...],
           args: tuple[Any, ...], shared_mem_bytes: int = 0) -> None:
    """Launch `name` from `cuda/<stem>.cu` on torch's current stream of `device`.

    Tensors pass as device pointers (`const T*` / `T*` parameters), Python ints as int32 (`int`), floats as float32
    (`float`): the kernel signature must match that order and those types.
    """
    import cupy

    _check_launch(name, grid, block)
    if not 0 <= shared_mem_bytes <= _MAX_DYNAMIC_SHARED_BYTES:
        raise ValueError(f"shared_mem_bytes of {name}: expected 0..{_MAX_DYNAMIC_SHARED_BYTES} (no kernel opts in to "
                         f"more), got {shared_mem_bytes}")
    index = _device_index(device)
    cargs = tuple(_arg(a) for a in args)
    with cupy.cuda.Device(index):  # the module loads (first call) and the launch both happen in this device's context
        kernel = _resolve(stem, name, index)
        stream = _external_stream(torch.cuda.current_stream(index).cuda_stream, index)
        kernel(grid, block, cargs, shared_mem=shared_mem_bytes, stream=stream)


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int, index: int) -> Any:
    """CuPy's handle on torch's stream `ptr` of device `index`: one per stream, not one per launch. CuPy 14 warns
    that ExternalStream is deprecated (DeprecationWarning on each construction, host time inside a timed call);
    it still works, and Stream.from_external is missing from older CuPy."""
    import cupy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, index)
