"""greedy_sample: torch and Triton against torch.argmax (ties to the lowest index), cost formula, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, requires_triton

from tokprof.kernels import OPS, greedy_sample
from tokprof.kernels._common import poisoned_outputs

SHAPES = [(1, 7), (3, 1000), (5, 4099), (2, 9001)]  # (B, V); 4099 and 9001 span several 4096-wide blocks


def make(shape, dtype, device, seed):
    return OPS["greedy_sample"].make_inputs({"B": shape[0], "V": shape[1]}, dtype, device, seed=seed)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_argmax(shape, dtype):
    logits = make(shape, dtype, "cpu", seed=21)["logits"]
    out = greedy_sample(logits, backend="torch")
    assert out.dtype == torch.int64 and out.shape == (shape[0],)
    expected = torch.tensor([max(range(shape[1]), key=lambda j, r=r: (float(logits[r, j]), -j))
                             for r in range(shape[0])])
    assert torch.equal(out, expected)


@requires_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_argmax(shape, dtype):
    logits = make(shape, dtype, TRITON_DEVICE, seed=22)["logits"]
    with poisoned_outputs():
        out = greedy_sample(logits, backend="triton")
    assert out.dtype == torch.int64
    assert (out >= 0).all(), "some rows were left unwritten (poison -1)"
    assert torch.equal(out, torch.argmax(logits.double(), dim=-1))


@requires_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_triton_ties_go_to_the_lowest_index(dtype):
    gen = torch.Generator().manual_seed(23)
    logits = (torch.randn(4, 9000, generator=gen) - 10).to(dtype)
    logits[0, [17, 4500, 8999]] = 5.0  # tie across blocks: 17 wins
    logits[1, [4200, 4100]] = 5.0  # tie inside the second block: 4100 wins
    logits[2, [8999, 8000]] = 5.0  # tie in the last, partial block: 8000 wins
    logits[3] = float("-inf")  # all equal: index 0, like torch.argmax
    logits = logits.to(TRITON_DEVICE)
    out = greedy_sample(logits, backend="triton")
    assert out.tolist() == [17, 4100, 8000, 0]
    assert torch.equal(out, torch.argmax(logits, dim=-1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(64, 128256), (1, 151936)])
def test_gpu_triton_matches_argmax(shape, dtype):
    logits = make(shape, dtype, "cuda", seed=24)["logits"]
    out = greedy_sample(logits, backend="triton")
    torch.cuda.synchronize()
    assert torch.equal(out, torch.argmax(logits, dim=-1))


def test_cost_hand_count():
    # B=2, V=5, fp32: 10 compares; read 10 x 4 B, write 2 int64.
    assert OPS["greedy_sample"].cost({"B": 2, "V": 5}, torch.float32) == (10, 56)
    assert OPS["greedy_sample"].cost({"B": 1, "V": 128256}, torch.bfloat16) == (128256, 128256 * 2 + 8)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="logits: expected 2 dimensions, got 1"):
        greedy_sample(torch.randn(5), backend="torch")
    with pytest.raises(ValueError, match="logits: expected at least one row"):
        greedy_sample(torch.randn(0, 5), backend="torch")
    with pytest.raises(ValueError, match="logits: expected a non-empty vocabulary"):
        greedy_sample(torch.randn(2, 0), backend="torch")
    with pytest.raises(ValueError, match="logits: expected dtype"):
        greedy_sample(torch.ones(2, 5, dtype=torch.int64), backend="torch")
    with pytest.raises(ValueError, match="logits: expected a contiguous tensor"):
        greedy_sample(torch.randn(5, 2).t(), backend="torch")
    with pytest.raises(ValueError, match="backend: expected one of"):
        greedy_sample(torch.randn(2, 5), backend="jax")
