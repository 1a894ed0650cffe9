"""Loading and launching the CUDA C++ kernels of `tokprof/kernels/cuda/*.cu` through CuPy.

Each .cu file exports `extern "C" __global__` kernels, one per dtype, named `<kernel>_<f32|f16|bf16>`, so the same
names resolve in a cubin built ahead of time by setup.py (nvcc) and in a module compiled at run time by NVRTC.

Lookup order for a device of compute capability X.Y:
1. `cuda/build/<stem>.sm_XY.cubin`, written by `setup.py` when nvcc was found at install time;
2. NVRTC through `cupy.RawModule(code=...)`, compiled on first use and cached on disk by CuPy
   (`~/.cupy/kernel_cache`, or `CUPY_CACHE_DIR`).

Launches go on torch's current stream (`cupy.cuda.ExternalStream`) and take tensors zero-copy, as raw device
pointers, so a CuPy kernel orders correctly with torch work and can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

CUDA_DIR = Path(__file__).parent / "cuda"
BUILD_DIR = CUDA_DIR / "build"
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17", f"-I{CUDA_DIR}")

_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


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


@functools.cache
def _module(stem: str, arch: str) -> Any:
    import cupy

    cubin = BUILD_DIR / f"{stem}.{arch}.cubin"
    if cubin.exists():
        return cupy.RawModule(path=str(cubin))
    source = (CUDA_DIR / f"{stem}.cu").read_text()
    return cupy.RawModule(code=source, options=NVRTC_OPTIONS, backend="nvrtc")


def get_kernel(stem: str, name: str, device: torch.device) -> Any:
    """The CuPy function `name` of `cuda/<stem>.cu` for `device` (loaded once per file and architecture)."""
    status = cupy_status()
    if status is not None:
        raise RuntimeError(f"the cuda backend is unavailable: {status}")
    major, minor = torch.cuda.get_device_capability(device)
    return _module(stem, f"sm_{major}{minor}").get_function(name)


def _arg(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return np.uint64(a.data_ptr())
    if isinstance(a, bool):
        return np.int32(int(a))
    if isinstance(a, int):
        return np.int32(a)
    if isinstance(a, float):
        return np.float32(a)
    raise TypeError(f"cannot pass {type(a).__name__} to a CUDA kernel")


def launch(stem: str, name: str, device: torch.device, grid: tuple[int, ...], block: tuple[int, ...],
           args: tuple[Any, ...], shared_mem_bytes: int = 0) -> None:
    """Launch `name` from `cuda/<stem>.cu` on torch's current stream of `device`.

    Tensors pass as device pointers (int32 scalars for Python ints, float32 for floats): the kernel signature
    must match that order and those types.
    """
    import cupy

    kernel = get_kernel(stem, name, device)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device.index or 0)
    with cupy.cuda.Device(device.index or 0):
        kernel(grid, block, tuple(_arg(a) for a in args), shared_mem=shared_mem_bytes, stream=stream)
