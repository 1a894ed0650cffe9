"""Helpers shared by the tests: tolerance tables, closeness checks with useful messages, NaN poisoning."""

from __future__ import annotations

import os

import pytest
import torch

# (atol, rtol) of a kernel output in the given dtype against a float64 reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

CPU_DTYPES = [torch.float32, torch.float16]  # bf16 only on a GPU: the interpreter's bf16 tl.dot is wrong

HAS_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Where the Triton kernels can run in this process: CPU tensors under the interpreter, else the GPU.
TRITON_DEVICE = "cpu" if INTERPRETED or not HAS_GPU else "cuda"

requires_triton = pytest.mark.skipif(not INTERPRETED and not HAS_GPU,
                                     reason="Triton needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "output",
                 scale: float = 1.0) -> None:
    """Every element of `actual` written (no NaN left from poisoning) and within tolerance of `expected`."""
    atol, rtol = TOLERANCES[dtype]
    atol *= scale
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan = torch.isnan(a) & ~torch.isnan(e)
    assert not nan.any(), f"{what}: {int(nan.sum())} of {a.numel()} elements are NaN (unwritten or invalid)"
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    assert not bad.any(), (
        f"{what} ({dtype}): {int(bad.sum())} of {a.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
        f"max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}, "
        f"first bad index {tuple(int(i) for i in bad.nonzero()[0])}"
    )

