"""Test configuration: Triton's CPU interpreter on machines without a GPU, and the `gpu` marker.

TRITON_INTERPRET must be set before triton is first imported, which is why it happens here, at conftest import.
On a GPU machine the Triton kernels run compiled and the interpreter tests on CPU tensors are skipped.
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
