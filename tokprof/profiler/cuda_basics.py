"""Device basics shared by the timing harness and graph capture: devices, whole-device sync, the L2 size and its
flush buffer, and the bytes a call's inputs hold.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

FLUSH_L2_FACTOR = 2  # flush buffer = 2x L2 (rule 2)


def as_device(device: torch.device | str | int) -> torch.device:
    """A torch.device with an explicit CUDA index; ValueError for other types, RuntimeError without CUDA."""
    try:
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r} ({err})") from err
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {str(device)!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                               "measure with device='cpu' instead")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def sync(device: torch.device | str | int) -> None:
    """Wait for all work on the whole device (every stream), not one stream; a no-op on the CPU (rule 7)."""
    device = as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_bytes(device: torch.device | str | int) -> int | None:
    """The device's L2 cache size in bytes; None for a CPU device."""
    device = as_device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).L2_cache_size)


def flush_bytes(l2_cache_bytes: int) -> int:
    """Size of the cold-L2 flush buffer: twice the L2 (H100 50 MB -> 100 MB, H200 60 MB -> 120 MB)."""
    if isinstance(l2_cache_bytes, bool) or not isinstance(l2_cache_bytes, int) or l2_cache_bytes <= 0:
        raise ValueError(f"l2_cache_bytes: expected a positive int, got {l2_cache_bytes!r}")
    return FLUSH_L2_FACTOR * l2_cache_bytes


def l2_flush_bytes(device: torch.device | str | int) -> int | None:
    """The flush buffer size for `device` (2x its L2), or None on the CPU (no flush there)."""
    l2 = l2_bytes(device)
    return None if l2 is None else flush_bytes(l2)


_flush_buffers: dict[int, torch.Tensor] = {}


def flush_buffer(device: torch.device | str | int) -> torch.Tensor:
    """The cold-L2 flush buffer of `device` (uint8, 2x L2), allocated once per device and reused."""
    device = as_device(device)
    if device.type != "cuda":
        raise ValueError(f"device: the L2 flush buffer exists on CUDA devices only, got {device}")
    size = l2_flush_bytes(device)
    buf = _flush_buffers.get(device.index)
    if buf is None or buf.numel() != size:
        buf = torch.empty(size, dtype=torch.uint8, device=device)
        _flush_buffers[device.index] = buf
    return buf


# ------------------------------------------------------------------------------------------ inputs and rotation


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value)


def working_set_bytes(inputs: Mapping[str, Any]) -> int:
    """Bytes of the distinct tensors in `inputs` (a tensor passed twice counts once; a view counts its elements)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in iter_tensors(inputs):
        nbytes = t.numel() * t.element_size()
        key = (t.data_ptr(), nbytes)
        if nbytes and key not in seen:
            seen.add(key)
            total += nbytes
    return total
