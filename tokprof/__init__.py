"""tokprof: a GPU kernel-level throughput profiler, from decode-step kernels to cost per million tokens."""

from __future__ import annotations

__version__ = "0.1.0"
