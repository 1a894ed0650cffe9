"""NVML (through `pynvml`, package nvidia-ml-py): find the card behind a torch device and read it as found.

    nvml_status()            # None when NVML works, else why not (package missing, no driver library, no GPU)
    clocks("cuda:0")         # Clocks snapshot (SM/memory clock, max SM clock, temperature, power limit, power)
    handle("cuda:0")         # the NVML handle, or None

tokprof only reads: it never changes clocks, power limits or persistence mode (docs/measurement.md rule 6).
Nothing here raises because NVML is missing; callers get None and `nvml_status()` says why.

A torch CUDA index is not an NVML index: CUDA orders devices fastest-first by default and CUDA_VISIBLE_DEVICES
renumbers them, while NVML counts every board in PCI order. The handle is therefore found by the device's UUID,
then by its PCI bus id, and only then through CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

import torch

from tokprof.profiler.schema import Clocks

# SM clock below this fraction of its max flags a sample set as throttled (docs/measurement.md rule 6).
THROTTLE_FRACTION = 0.75

_lock = threading.Lock()
# "module": pynvml after nvmlInit, or "reason": why NVML is unavailable; "handles": CUDA index -> NVML handle
_state: dict[str, Any] = {}


def reset() -> None:
    """Forget the cached NVML state, so the next call loads and initialises NVML again (after a driver reload)."""
    with _lock:
        _state.clear()


def _load() -> Any | None:
    """pynvml after nvmlInit(), or None (the reason is kept for nvml_status())."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        if "reason" in _state:
            return None
        try:
            import pynvml
        except ImportError as err:
            _state["reason"] = (f"pynvml is not importable ({err}); install nvidia-ml-py "
                                "(`pip install nvidia-ml-py`) to read clocks, temperature and energy")
            return None
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError_LibraryNotFound:
            _state["reason"] = ("the NVML library (libnvidia-ml.so) was not found: no NVIDIA driver on this machine, "
                                "so clocks and energy are not measured")
            return None
        except pynvml.NVMLError as err:
            _state["reason"] = f"NVML failed to initialise: {err}"
            return None
        if count == 0:
            _state["reason"] = "NVML initialised but sees no NVIDIA GPU"
            return None
        _state["module"] = pynvml
        return pynvml


def nvml_status() -> str | None:
    """None when NVML is usable, else the reason it is not (a sentence for reports)."""
    if _load() is not None:
        return None
    return _state.get("reason", "NVML is unavailable")


def visible_devices(env: str | None = None) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES (indices, GPU-/MIG- UUIDs), or None when it is unset.

    `env` overrides the environment (for tests). CUDA stops at the first invalid entry; so does this.
    """
    value = os.environ.get("CUDA_VISIBLE_DEVICES") if env is None else env
    if value is None:
        return None
    out: list[str] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            break
        if not (item.isdigit() or item.startswith(("GPU-", "MIG-"))):
            break
        out.append(item)
    return out


def _cuda_index(device: torch.device | str | int) -> int | None:
    """The CUDA ordinal of a torch CUDA device, or None for any other device."""
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _call(fn: Any, *args: Any) -> Any | None:
    """One NVML query; None where the card does not support it (or the driver lacks the function)."""
    nvml = _state.get("module")
    if nvml is None:
        return None
    try:
        return fn(*args)
    except nvml.NVMLError:
        return None


def query(name: str, *args: Any) -> Any | None:
    """`pynvml.<name>(*args)`, or None without NVML, when the binding lacks it or the card does not support it."""
    nvml = _load()
    fn = getattr(nvml, name, None) if nvml is not None else None
    return None if fn is None else _call(fn, *args)


def _handle_from_properties(nvml: Any, index: int) -> Any | None:
    if not torch.cuda.is_available() or not 0 <= index < torch.cuda.device_count():
        return None
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        for candidate in (text, f"GPU-{text}") if not text.startswith(("GPU-", "MIG-")) else (text,):
            found = _call(nvml.nvmlDeviceGetHandleByUUID, candidate)
            if found is not None:
                return found
    if all(hasattr(props, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
        return _call(nvml.nvmlDeviceGetHandleByPciBusId, bus_id)
    return None


def handle(device: torch.device | str | int) -> Any | None:
    """The NVML handle of a torch CUDA device; None without NVML, for a CPU device, or when no board matches."""
    index = _cuda_index(device)
    if index is None:
        return None
    nvml = _load()
    if nvml is None:
        return None
    cache = _state.setdefault("handles", {})
    if index not in cache:
        cache[index] = _find_handle(nvml, index)
    return cache[index]


def _find_handle(nvml: Any, index: int) -> Any | None:
    found = _handle_from_properties(nvml, index)
    if found is not None:
        return found
    visible = visible_devices()
    if visible is None:
        return _call(nvml.nvmlDeviceGetHandleByIndex, index)
    if index >= len(visible):
        return None
    entry = visible[index]
    if entry.isdigit():
        return _call(nvml.nvmlDeviceGetHandleByIndex, int(entry))
    return _call(nvml.nvmlDeviceGetHandleByUUID, entry)


def device_uuid(device: torch.device | str | int) -> str | None:
    """NVML's UUID of the board ("GPU-..."), or None."""
    h = handle(device)
    if h is None:
        return None
    uuid = _call(_state["module"].nvmlDeviceGetUUID, h)
    return uuid.decode() if isinstance(uuid, bytes) else uuid


def max_sm_clock_mhz(device: torch.device | str | int) -> int | None:
    """The SM clock's maximum (boost) frequency in MHz, or None."""
    h = handle(device)
    if h is None:
        return None
    nvml = _state["module"]
    value = _call(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_SM)
    return int(value) if value is not None else None


def clocks(device: torch.device | str | int) -> Clocks | None:
    """An NVML snapshot of the card as found; None (never an exception) without NVML or for a CPU device.

    A field the card does not report is None; the others are still filled.
    """
    h = handle(device)
    if h is None:
        return None
    nvml = _state["module"]
    sm = _call(nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_SM)
    mem = _call(nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_MEM)
    sm_max = _call(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_SM)
    temp = _call(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU)
    limit_mw = _call(nvml.nvmlDeviceGetEnforcedPowerLimit, h)
    power_mw = _call(nvml.nvmlDeviceGetPowerUsage, h)
    return Clocks(
        sm_mhz=int(sm) if sm is not None else None,
        mem_mhz=int(mem) if mem is not None else None,
        sm_max_mhz=int(sm_max) if sm_max is not None else None,
        temperature_c=int(temp) if temp is not None else None,
        power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
        power_w=power_mw / 1000.0 if power_mw is not None else None,
    )


def is_throttled(before: Clocks | None, after: Clocks | None) -> bool | None:
    """True when either snapshot's SM clock is below 75% of its max; None when no snapshot tells (no NVML).

    A snapshot without an SM clock or a max is ignored; if neither snapshot has both, the answer is unknown.
    """
    verdicts = []
    for snap in (before, after):
        if snap is None or snap.sm_mhz is None or not snap.sm_max_mhz:
            continue
        verdicts.append(snap.sm_mhz < THROTTLE_FRACTION * snap.sm_max_mhz)
    if not verdicts:
        return None
    return any(verdicts)


# nvmlClocksEventReasons bits (nvml.h; called "throttle reasons" before driver 535). The ones that mean the card
# slowed itself down, as opposed to idling or following an application-clock setting.
CLOCK_REASON_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
SLOWDOWN_REASONS = frozenset({"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
                              "hw_power_brake_slowdown"})


def decode_clock_reasons(mask: int) -> list[str]:
    """The names of the bits set in an NVML clock-event-reason mask (unknown bits as hex)."""
    names = [name for bit, name in CLOCK_REASON_BITS.items() if mask & bit]
    unknown = mask & ~sum(CLOCK_REASON_BITS)
    if unknown:
        names.append(f"0x{unknown:x}")
    return names


def clock_reasons(device: torch.device | str | int) -> list[str] | None:
    """Why the clocks are what they are right now (decode_clock_reasons of NVML's mask); None without NVML."""
    h = handle(device)
    if h is None:
        return None
    nvml = _state["module"]
    fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
    if fn is None:
        return None
    mask = _call(fn, h)
    return decode_clock_reasons(int(mask)) if mask is not None else None


class ClockSampler:
    """Clock-event reasons and the SM clock sampled during a timing window (between sample batches), so a throttle
    that starts and ends inside the window is seen, not only what the two edge snapshots show."""

    def __init__(self, device: torch.device | str | int, min_interval_s: float = 0.05) -> None:
        self.device = device
        self.min_interval_s = min_interval_s  # NVML reads cost tens of us each: not after every batch
        self._last_s = -math.inf
        self.reasons: set[str] = set()
        self.sm_mhz_min: int | None = None
        self.sm_max_mhz: int | None = None
        self.samples = 0

    def sample(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_s < self.min_interval_s:
            return
        self._last_s = now
        snap = clocks(self.device)
        if snap is None:
            return
        self.samples += 1
        if snap.sm_mhz is not None:
            self.sm_mhz_min = snap.sm_mhz if self.sm_mhz_min is None else min(self.sm_mhz_min, snap.sm_mhz)
        self.sm_max_mhz = snap.sm_max_mhz or self.sm_max_mhz
        self.reasons.update(clock_reasons(self.device) or [])

    def throttled(self) -> bool | None:
        """True when a slowdown reason was seen or the SM clock fell below 75% of its max; None when unsampled."""
        if not self.samples:
            return None
        if self.reasons & SLOWDOWN_REASONS:
            return True
        if self.sm_mhz_min is not None and self.sm_max_mhz:
            return self.sm_mhz_min < THROTTLE_FRACTION * self.sm_max_mhz
        return None
