"""swiglu: every backend against a float64 reference, cost formula, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, assert_close, requires_triton

from tokprof.kernels import OPS, swiglu
from tokprof.kernels._common import poisoned_outputs

SHAPES = [(1, 64), (5, 123), (16, 512), (3, 1000)]  # (T, I); 5x123 and 3x1000 are deliberately odd


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    g, u = gate_up.double().chunk(2, dim=-1)
    return g * torch.sigmoid(g) * u


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_reference(shape, dtype):
    inputs = OPS["swiglu"].make_inputs({"T": shape[0], "I": shape[1]}, dtype, "cpu", seed=1)
    out = swiglu(**inputs, backend="torch")
    assert out.dtype == dtype
    assert_close(out, reference(inputs["gate_up"]), dtype)


@requires_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype):
    inputs = OPS["swiglu"].make_inputs({"T": shape[0], "I": shape[1]}, dtype, TRITON_DEVICE, seed=2)
    with poisoned_outputs():
        out = swiglu(**inputs, backend="triton")
    assert_close(out, reference(inputs["gate_up"]), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(64, 14336)])
def test_gpu_backends_match_reference(shape, dtype, backend):
    inputs = OPS["swiglu"].make_inputs({"T": shape[0], "I": shape[1]}, dtype, "cuda", seed=3)
    with poisoned_outputs():
        out = swiglu(**inputs, backend=backend)
    torch.cuda.synchronize()
    assert_close(out, reference(inputs["gate_up"]), dtype)


def test_cost_hand_count():
    # T=2, I=3, fp16: reads 2*6 elements, writes 2*3 elements: 18 * 2 bytes; 5 FLOP per output.
    assert OPS["swiglu"].cost({"T": 2, "I": 3}, torch.float16) == (30, 36)
    assert OPS["swiglu"].cost({"T": 1, "I": 14336}, torch.bfloat16) == (5 * 14336, 3 * 14336 * 2)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="gate_up: expected 2 dimensions, got 3"):
        swiglu(torch.randn(2, 3, 4), backend="torch")
    with pytest.raises(ValueError, match="gate_up: expected an even"):
        swiglu(torch.randn(2, 5), backend="torch")
    with pytest.raises(ValueError, match="gate_up: expected at least one token"):
        swiglu(torch.randn(0, 4), backend="torch")
    with pytest.raises(ValueError, match="gate_up: expected dtype"):
        swiglu(torch.ones(2, 4, dtype=torch.int32), backend="torch")
    with pytest.raises(ValueError, match="gate_up: expected a contiguous tensor"):
        swiglu(torch.randn(8, 4).t(), backend="torch")
    with pytest.raises(ValueError, match="backend: expected one of"):
        swiglu(torch.randn(2, 4), backend="numpy")


def test_cuda_backend_without_gpu_says_what_works():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="Backends that work here: torch"):
        swiglu(torch.randn(2, 4), backend="cuda")
