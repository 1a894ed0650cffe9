"""One benchmark per (op, backend) that runs on this device (parametrised in benchmarks/conftest.py, which also
says how to run and compare them)."""

from __future__ import annotations

import torch


def test_kernel(kernel_benchmark, op, backend, shape):
    out = kernel_benchmark(op, backend, shape)
    # A benchmark of a kernel that returns garbage is worthless: float outputs must be finite.
    for t in out if isinstance(out, tuple) else (out,):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            assert torch.isfinite(t).all(), f"{op}/{backend}: non-finite output"
