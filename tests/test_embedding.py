"""embedding: torch and Triton against an index reference, cost formula, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, requires_triton

from tokprof.kernels import OPS, embedding
from tokprof.kernels._common import poisoned_outputs

SHAPES = [(1, 7, 64), (5, 123, 100), (16, 50, 1030)]  # (T, V, H); H=100 and 1030 are deliberately odd


def make(shape, dtype, device, seed, id_dtype=torch.int64):
    t, v, h = shape
    inputs = OPS["embedding"].make_inputs({"T": t, "V": v, "H": h}, dtype, device, seed=seed)
    inputs["token_ids"] = inputs["token_ids"].to(id_dtype)
    return inputs


def reference(token_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return torch.stack([table[int(i)] for i in token_ids.cpu()]).to(table.device)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_reference(shape, dtype, id_dtype):
    inputs = make(shape, dtype, "cpu", seed=11, id_dtype=id_dtype)
    out = embedding(**inputs, backend="torch")
    assert out.dtype == dtype and out.shape == (shape[0], shape[2])
    assert torch.equal(out, reference(**inputs))  # a copy: bit-exact


@requires_triton
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype, id_dtype):
    inputs = make(shape, dtype, TRITON_DEVICE, seed=12, id_dtype=id_dtype)
    with poisoned_outputs():
        out = embedding(**inputs, backend="triton")
    assert not torch.isnan(out).any(), "some output elements were left unwritten"
    assert torch.equal(out, reference(**inputs))


@requires_triton
def test_triton_repeated_and_edge_ids():
    gen = torch.Generator().manual_seed(13)
    table = torch.randn(9, 33, generator=gen).to(TRITON_DEVICE)
    ids = torch.tensor([8, 0, 8, 3, 0], dtype=torch.int32, device=TRITON_DEVICE)  # first, last and repeated rows
    with poisoned_outputs():
        out = embedding(ids, table, backend="triton")
    assert torch.equal(out, table[ids.long()])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(64, 128256, 4096)])
def test_gpu_triton_matches_reference(shape, dtype):
    inputs = make(shape, dtype, "cuda", seed=14)
    with poisoned_outputs():
        out = embedding(**inputs, backend="triton")
    torch.cuda.synchronize()
    assert torch.equal(out, inputs["table"][inputs["token_ids"]])


def test_cost_hand_count():
    # T=2, H=3, fp16: read 2 rows of 3 (12 B), write 2x3 (12 B), read 2 int64 ids (16 B); no FLOPs.
    assert OPS["embedding"].cost({"T": 2, "V": 10, "H": 3}, torch.float16) == (0, 40)
    assert OPS["embedding"].cost({"T": 1, "V": 128256, "H": 4096}, torch.bfloat16) == (0, 2 * 4096 * 2 + 8)


def test_bad_inputs_name_the_argument():
    table = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"token_ids: expected ids in \[0, 10\).*got 10"):
        embedding(torch.tensor([1, 10]), table, backend="torch")
    with pytest.raises(ValueError, match=r"token_ids: expected ids in \[0, 10\).*got -1"):
        embedding(torch.tensor([-1, 3], dtype=torch.int32), table, backend="torch")
    with pytest.raises(ValueError, match="token_ids: expected dtype"):
        embedding(torch.tensor([1.0, 2.0]), table, backend="torch")
    with pytest.raises(ValueError, match="token_ids: expected 1 dimensions, got 2"):
        embedding(torch.tensor([[1, 2]]), table, backend="torch")
    with pytest.raises(ValueError, match="token_ids: expected at least one token"):
        embedding(torch.tensor([], dtype=torch.int64), table, backend="torch")
    with pytest.raises(ValueError, match="table: expected dtype"):
        embedding(torch.tensor([1]), torch.ones(10, 4, dtype=torch.int32), backend="torch")
    with pytest.raises(ValueError, match="table: expected a contiguous tensor"):
        embedding(torch.tensor([1]), torch.randn(4, 10).t(), backend="torch")
    with pytest.raises(ValueError, match="backend: expected one of"):
        embedding(torch.tensor([1]), table, backend="numpy")


def test_cuda_backend_is_not_offered():
    with pytest.raises(RuntimeError, match="embedding has no cuda implementation.*Backends that work here: torch"):
        embedding(torch.tensor([1]), torch.randn(10, 4), backend="cuda")
