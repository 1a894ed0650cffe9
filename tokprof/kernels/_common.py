"""Shared pieces of the kernel library: argument checks, backend availability and the registry record.

Every public kernel function (see docs/design.md, "The kernel API") validates its arguments with the helpers here,
so that a bad call raises a ValueError naming the argument, what was expected and what came, whatever the backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

BACKENDS: tuple[str, ...] = ("torch", "triton", "cuda")

# Short names used on the command line and in result files.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOAT_DTYPES: tuple[torch.dtype, ...] = tuple(DTYPES.values())


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype}")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16."""
    if isinstance(dtype, torch.dtype):
        dtype_name(dtype)  # validates
        return dtype
    aliases = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
    key = aliases.get(str(dtype).lower(), str(dtype).lower())
    if key not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)} (or torch names), got {dtype!r}")
    return DTYPES[key]


def cdiv(a: int, b: int) -> int:
    """Ceiling division of positive ints."""
    return -(-a // b)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------- argument checks


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor shape {tuple(t.shape)} dtype {t.dtype} on {t.device}"
    return f"{type(t).__name__} {t!r}"


def check_tensor(
    name: str,
    t: Any,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    shape: tuple[int | None, ...] | None = None,
    contiguous: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check one tensor argument; raise ValueError naming `name`, the expectation and what came.

    `shape` entries of None match any size. `contiguous` asks for a row-major (C-contiguous) layout.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {_describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got {t.dim()} (shape {tuple(t.shape)})")
    if shape is not None and (t.dim() != len(shape)
                              or any(e is not None and e != s for e, s in zip(shape, t.shape, strict=True))):
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}; "
                         "call .contiguous() first")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where the other arguments are), got {t.device}")
    return t


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected a tensor on {first.device} (the device of {first_name}), "
                             f"got {t.device}")
    return first.device


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise ValueError(f"{name}: expected dtype {first.dtype} (the dtype of {first_name}), got {t.dtype}")
    return first.dtype


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_sinks_and_window(sinks: Any, sliding_window: Any, num_q_heads: int, device: torch.device) -> None:
    """gpt-oss's attention extras: sinks (Hq,) float, one logit per query head that joins the softmax denominator;
    sliding_window a positive int (attend to the last `sliding_window` positions, the current one included)."""
    if sinks is not None:
        check_tensor("sinks", sinks, shape=(num_q_heads,), dtypes=FLOAT_DTYPES, contiguous=True, device=device)
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window: expected None or a positive int (positions attended, the current one "
                         f"included), got {sliding_window!r}")


def check_backend(backend: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    return backend


# ------------------------------------------------------------------------------------------- backend availability

try:  # Triton ships only for Linux; elsewhere the triton backend reports itself missing.
    import triton  # noqa: F401

    _TRITON_IMPORT_ERROR: str | None = None
except ImportError as err:  # pragma: no cover - depends on the platform
    _TRITON_IMPORT_ERROR = f"triton is not installed ({err})"


def triton_interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fix_interpreter_index() -> None:
    """Let the interpreter turn scalar tensors into Python ints again under NumPy >= 2.4 (Triton <= 3.6).

    The interpreter holds a scalar (an int argument, a value computed from one) as a 1-element 1-D array, and
    `range(start, end, step)` in a kernel calls the tensor's `__index__`, which Triton 3.6 defines as
    `int(self.handle.data)`. NumPy 2.4 made int() of a 1-D array a TypeError ("only 0-dimensional arrays can be
    converted to Python scalars"), so every kernel loop with a runtime bound fails in the interpreter.
    Later Triton (3.9 here) reads `int(self.handle.data.squeeze())` (triton-lang/triton#9171, fixed by #9172).

    Feature-detected, not version-pinned: the interpreter's own `__index__` is tried on a 1-element scalar the
    first time a kernel runs, and replaced (for that launch's patch scope, as Triton restores it) only if it fails.
    Nothing changes for compiled kernels, nor in an interpreter that already copes.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - a Triton without its interpreter, or without NumPy
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_tokprof_index_fix", False):
        return
    broken: list[bool] = []  # filled on the first launch: whether Triton's __index__ fails on a 1-element scalar

    def index(self: Any) -> int:
        return int(np.asarray(self.handle.data).squeeze())

    def patch_lang_tensor(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(tensor, *args, **kwargs)
        if not broken:
            probe = tensor.__new__(tensor)
            probe.handle = interpreter.TensorHandle(np.array([1], dtype=np.int32), tl.int32)
            try:
                broken.append(tensor.__index__(probe) != 1)
            except TypeError:
                broken.append(True)
        if broken[0]:
            scope = args[0] if args else kwargs.get("scope")
            if scope is not None and hasattr(scope, "set_attr"):
                scope.set_attr(tensor, "__index__", index)  # restored with the rest after the launch
            else:  # pragma: no cover - an interpreter without patch scopes
                tensor.__index__ = index
        return result

    patch_lang_tensor._tokprof_index_fix = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor


if _TRITON_IMPORT_ERROR is None and triton_interpreted():
    _fix_interpreter_index()


def triton_status(device: torch.device) -> str | None:
    """None when Triton kernels can run on `device`, else why not."""
    if _TRITON_IMPORT_ERROR:
        return _TRITON_IMPORT_ERROR
    if device.type == "cuda":
        if triton_interpreted():
            return "TRITON_INTERPRET=1 is set: Triton runs its CPU interpreter, not the GPU; unset it to use the GPU"
        return None
    if device.type == "cpu":
        if triton_interpreted():
            return None
        return ("Triton kernels need a CUDA GPU; on the CPU set TRITON_INTERPRET=1 before tokprof or triton is "
                "imported to run them in Triton's (slow) interpreter")
    return f"Triton does not run on device type {device.type!r}"


def cuda_status(device: torch.device) -> str | None:
    """None when the CUDA C++ kernels (through CuPy) can run on `device`, else why not."""
    from tokprof.kernels._cuda import cupy_status

    if device.type != "cuda":
        return f"the cuda backend needs tensors on a CUDA GPU, got device {device}"
    return cupy_status()


@dataclass(frozen=True)
class Op:
    """Registry record of one op: how to make inputs, what it costs, and its implementations per backend.

    `make_inputs(shape, dtype, device, seed)` returns the keyword arguments of the public function (tensors and
    options, never `backend`), so `op.run(inputs, backend)` == `op.fn(**inputs, backend=backend)`.
    `cost(shape, dtype)` returns (flops, min_bytes): each input read once, each output written once.
    """

    name: str
    fn: Callable[..., Any]
    impls: Mapping[str, Callable[..., Any]]
    shape_keys: tuple[str, ...]
    default_shape: Mapping[str, int]
    make_inputs: Callable[[Mapping[str, int], torch.dtype, torch.device | str, int], dict[str, Any]]
    cost: Callable[[Mapping[str, int], torch.dtype], tuple[int, int]]
    cost_formula: str
    description: str = ""
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    shape_doc: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def full_shape(self, shape: Mapping[str, int] | None = None) -> dict[str, int]:
        """The default shape updated with `shape`; unknown keys are an error."""
        shape = dict(shape or {})
        unknown = sorted(set(shape) - set(self.shape_keys))
        if unknown:
            raise ValueError(f"shape: {self.name} takes keys {list(self.shape_keys)}, got unknown {unknown}")
        full = {**self.default_shape, **shape}
        for k, v in full.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"shape: {self.name} key {k!r} expected a non-negative int, got {v!r}")
        return full

    def available_backends(self, device: torch.device | str) -> dict[str, str | None]:
        """backend -> None when usable on `device`, else the reason it is not."""
        device = torch.device(device)
        out: dict[str, str | None] = {}
        for backend in BACKENDS:
            if backend not in self.impls:
                out[backend] = f"{self.name} has no {backend} implementation"
            elif backend == "torch":
                out[backend] = None
            elif backend == "triton":
                out[backend] = triton_status(device)
            else:
                out[backend] = cuda_status(device)
        return out

    def run(self, inputs: Mapping[str, Any], backend: str = "triton") -> Any:
        return self.fn(**inputs, backend=backend)


def resolve(op: str, impls: Mapping[str, Callable[..., Any]], backend: str, device: torch.device) -> Callable[..., Any]:
    """The implementation of `op` for `backend` on `device`, or a RuntimeError that says which backends work."""
    check_backend(backend)
    if backend == "torch":
        return impls["torch"]
    reason: str | None
    if backend not in impls:
        reason = f"{op} has no {backend} implementation"
    elif backend == "triton":
        reason = triton_status(device)
    else:
        reason = cuda_status(device)
    if reason is None:
        return impls[backend]
    usable = ["torch"]
    if "triton" in impls and triton_status(device) is None:
        usable.append("triton")
    if "cuda" in impls and backend != "cuda" and cuda_status(device) is None:
        usable.append("cuda")
    raise RuntimeError(f"backend={backend!r} cannot run {op} on {device}: {reason}. "
                       f"Backends that work here: {', '.join(usable)}")


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def randn(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, gen: torch.Generator,
          scale: float = 1.0) -> torch.Tensor:
    """Random normal values (never zeros: a GEMM on zeros runs faster than on data), drawn in fp32 then cast."""
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


# --------------------------------------------------------------------------------------------- value checks

_VALUE_CHECKS = True


@contextmanager
def skip_value_checks() -> Iterator[None]:
    """Skip the argument checks that read tensor values back to the host (seq_lens, slots, token ids, pages).

    Those checks synchronise a GPU once per call. A timed kernel call (the profiler) and a decode loop that has
    already been checked once (the Transformer) run inside this context, so their timings hold no host syncs.
    """
    global _VALUE_CHECKS
    previous, _VALUE_CHECKS = _VALUE_CHECKS, False
    try:
        yield
    finally:
        _VALUE_CHECKS = previous


def value_checks_apply(device: torch.device) -> bool:
    """Whether value checks run on `device` now: not inside skip_value_checks(), not while a CUDA graph captures
    (a capture cannot synchronise), not on the meta device (no values)."""
    if not _VALUE_CHECKS or device.type == "meta":
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


# ------------------------------------------------------------------------------------------------ output buffers

_POISON_OUTPUTS = False


@contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Inside this context every kernel output is allocated full of NaN, so a test sees any element left unwritten."""
    global _POISON_OUTPUTS
    previous, _POISON_OUTPUTS = _POISON_OUTPUTS, True
    try:
        yield
    finally:
        _POISON_OUTPUTS = previous


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (uninitialised; NaN-filled inside `poisoned_outputs()`, -1 for integer dtypes,
    which have no NaN)."""
    if _POISON_OUTPUTS:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
