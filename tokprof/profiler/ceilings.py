"""Measured ceilings of this machine: copy bandwidth and a large GEMM's FLOP/s (the L1 "measured roofline").

    c = measure_ceilings("cuda")              # 1 GiB device-to-device copy + bf16 GEMM 8192^3, cached
    c = measure_ceilings("cpu", cache=False)  # 256 MiB memory copy + fp32 GEMM 1024^3, re-measured

GPU: `dst.copy_(src)` on a 1 GiB buffer, counting bytes read plus written (2 GiB per copy), a read-only pass over
the same buffer (`amax`: a read-mostly kernel such as decode attention can beat a copy), and `torch.mm` of
8192x8192 bf16 random matrices (2 * 8192^3 FLOP; random data, since a GEMM on zeros runs ~13% faster). Both are timed
with `timing.measure` (events, cold L2), median of the samples. CPU: the same with a 256 MiB copy and an fp32 GEMM.

Results are cached as JSON, one file per GPU UUID and driver version (a driver update re-measures), in
$TOKPROF_CACHE_DIR, else $XDG_CACHE_HOME/tokprof, else ~/.cache/tokprof. A cached entry is reused only when it was
measured with the same sizes, and only a trustworthy measurement is written (unthrottled, noise <= 5%).
"""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tokprof.profiler import timing
from tokprof.profiler.devices import detect_device
from tokprof.profiler.schema import Ceilings, DeviceInfo, from_dict, save_json_atomic, to_dict

GPU_COPY_BUFFER_BYTES = 1 << 30  # 1 GiB per side: far beyond any L2 (B200 ~126 MB), so the copy streams HBM
GPU_GEMM_N = 8192
CPU_COPY_BUFFER_BYTES = 256 << 20
CPU_GEMM_N = 1024  # 2.1 GFLOP: tens of ms per call on 2 cores, so a few seconds per ceiling at most
DEFAULT_TIMING = {"min_time_s": 0.1, "max_time_s": 2.0}
# A ceiling is the most this machine can do. One measured on a shared or throttled device is too low, and a cached
# one would make later kernels look above 100% of it: only ceilings with both noises under this are cached.
CACHE_MAX_NOISE = 0.05


def cache_dir() -> Path:
    """$TOKPROF_CACHE_DIR, else $XDG_CACHE_HOME/tokprof, else ~/.cache/tokprof."""
    if os.environ.get("TOKPROF_CACHE_DIR"):
        return Path(os.environ["TOKPROF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokprof"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120]


def cache_key(info: DeviceInfo) -> str | None:
    """File stem of the cache entry: GPU UUID + driver; CPU host + model + torch. None when it cannot be keyed."""
    if info.kind == "cuda":
        if not info.uuid or not info.driver:
            return None  # without the driver version a cached figure could outlive a driver update
        return _slug(f"{info.uuid}-driver{info.driver}")
    return _slug(f"cpu-{socket.gethostname()}-{info.cpu_model}-torch{torch.__version__}")


def _read_cache(path: Path, copy_bytes: int, gemm_shape: list[int], gemm_dtype: str) -> Ceilings | None:
    """The cached ceilings if the file is valid and was measured with the same sizes; None otherwise."""
    try:
        data = json.loads(path.read_text())
        cached = from_dict(Ceilings, data, str(path))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, ValueError) as err:
        warnings.warn(f"ignoring an unreadable ceilings cache entry {path} ({err}); re-measuring", stacklevel=3)
        return None
    if (cached.copy_bytes, cached.gemm_shape, cached.gemm_dtype) != (copy_bytes, gemm_shape, gemm_dtype) or (
            cached.read_gbps is None):  # cached before the read-only ceiling existed: measure it
        return None
    cached.note = f"{cached.note}; read from cache {path}".lstrip("; ")
    return cached


def _copy_inputs(buffer_bytes: int, device: torch.device, seed: int) -> dict[str, Any]:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    # Random bytes: never time on zeros, whatever the memory system might do with them.
    src = torch.randint(0, 256, (buffer_bytes,), dtype=torch.uint8, device=device, generator=gen)  # (buffer_bytes,)
    return {"src": src, "dst": torch.empty_like(src)}


def _gemm_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict[str, Any]:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    a = torch.randn((n, n), generator=gen, device=device, dtype=torch.float32).to(dtype)  # (n, n)
    b = torch.randn((n, n), generator=gen, device=device, dtype=torch.float32).to(dtype)  # (n, n)
    return {"a": a, "b": b, "c": torch.empty((n, n), dtype=dtype, device=device)}


def _copy(inputs: dict[str, Any]) -> None:
    inputs["dst"].copy_(inputs["src"])


def _read(inputs: dict[str, Any]) -> None:
    # a max over the buffer as int32 words reads every byte once and writes one word: read-only bandwidth
    torch.amax(inputs["words"], dim=0, out=inputs["out"])


def _gemm(inputs: dict[str, Any]) -> None:
    torch.mm(inputs["a"], inputs["b"], out=inputs["c"])


def measure_ceilings(device: str | torch.device = "cuda", *, cache: bool = True, copy_buffer_bytes: int | None = None,
                     gemm_n: int | None = None, timing_kwargs: dict[str, Any] | None = None,
                     seed: int = 0) -> Ceilings:
    """Copy GB/s (bytes read + written) and GEMM TFLOP/s measured on `device`; cached unless `cache=False`.

    `copy_buffer_bytes` and `gemm_n` override the sizes (defaults: 1 GiB and 8192 on a GPU, 256 MiB and 1024 on the
    CPU); `timing_kwargs` go to `timing.measure` (default min_time_s=0.1, max_time_s=2.0).
    """
    dev = torch.device(device)
    info = detect_device(dev)
    on_gpu = info.kind == "cuda"
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    buffer_bytes = copy_buffer_bytes or (GPU_COPY_BUFFER_BYTES if on_gpu else CPU_COPY_BUFFER_BYTES)
    n = gemm_n or (GPU_GEMM_N if on_gpu else CPU_GEMM_N)
    for name, value in (("copy_buffer_bytes", buffer_bytes), ("gemm_n", n)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    gemm_dtype, torch_dtype = ("bf16", torch.bfloat16) if on_gpu else ("fp32", torch.float32)
    copy_bytes = 2 * buffer_bytes  # each copy reads the source and writes the destination
    gemm_shape = [n, n, n]

    key = cache_key(info)
    path = cache_dir() / "ceilings" / f"{key}.json" if key else None
    if cache and path is not None:
        cached = _read_cache(path, copy_bytes, gemm_shape, gemm_dtype)
        if cached is not None:
            return cached

    kwargs = {**DEFAULT_TIMING, **(timing_kwargs or {})}
    inputs = _copy_inputs(buffer_bytes, dev, seed)
    try:
        copy_t = timing.measure(_copy, inputs, device=dev, mode="events", **kwargs)
        words = inputs["src"][: buffer_bytes - buffer_bytes % 4].view(torch.int32)  # (buffer_bytes // 4,)
        read_inputs = {"words": words, "out": torch.empty((), dtype=torch.int32, device=dev)}
        read_t = timing.measure(_read, read_inputs, device=dev, mode="events", **kwargs)
        read_bytes = words.numel() * 4
    finally:
        del inputs
    inputs = _gemm_inputs(n, torch_dtype, dev, seed + 1)
    try:
        gemm_t = timing.measure(_gemm, inputs, device=dev, mode="events", **kwargs)
    finally:
        del inputs
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()

    copy_gbps = copy_bytes / (copy_t.median_us * 1e-6) / 1e9
    read_gbps = read_bytes / (read_t.median_us * 1e-6) / 1e9
    gemm_tflops = 2 * n**3 / (gemm_t.median_us * 1e-6) / 1e12
    notes = [f"copy: {buffer_bytes} B buffer, median of {copy_t.samples_taken} samples, noise {copy_t.noise:.2%}",
             f"read: amax over the same buffer ({read_bytes} B read), median of {read_t.samples_taken} samples, "
             f"noise {read_t.noise:.2%}",
             f"gemm: torch.mm {gemm_dtype} {n}^3 on random data, median of {gemm_t.samples_taken} samples, "
             f"noise {gemm_t.noise:.2%}"]
    if copy_t.throttled or gemm_t.throttled or read_t.throttled:
        notes.append("throttled: the SM clock fell below 75% of its max during a ceiling measurement")
    if not on_gpu:
        notes.append(f"CPU ceilings ({info.cpu_model}, {torch.get_num_threads()} torch threads), not GPU figures")
    if key is None:
        notes.append("not cached: GPU UUID or driver version unknown")
    worst_noise = max(copy_t.noise, gemm_t.noise, read_t.noise)
    trusted = not (copy_t.throttled or gemm_t.throttled or read_t.throttled) and worst_noise <= CACHE_MAX_NOISE
    if key is not None and not trusted:
        notes.append(f"not cached: {'throttled' if worst_noise <= CACHE_MAX_NOISE else f'noise {worst_noise:.1%}'} "
                     f"(a ceiling is cached only when unthrottled with noise <= {CACHE_MAX_NOISE:.0%}; a busy or "
                     "hot device understates it)")
    ceilings = Ceilings(
        copy_gbps=copy_gbps,
        gemm_tflops=gemm_tflops,
        gemm_dtype=gemm_dtype,
        copy_bytes=copy_bytes,
        gemm_shape=gemm_shape,
        device=info.name,
        measured_utc=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        note="; ".join(notes),
        read_gbps=read_gbps,
    )
    if path is not None and trusted:
        save_json_atomic(to_dict(ceilings), path)  # written even with cache=False: the freshest figure wins
    return ceilings
