"""batched_linear (MLA's per-head absorbed projections): torch and Triton against a float64 loop over heads, strided
x, cost, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, assert_close, requires_triton

from tokprof.kernels import OPS, batched_linear

# (M, G, N, K): decode rows 1 and 3, an M above one tile (70), odd N and K not multiples of the blocks.
SHAPES = [(1, 3, 40, 24), (3, 2, 33, 70), (70, 2, 16, 40)]


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[:, g].double() @ weight[g].double().T for g in range(weight.shape[0])], dim=1)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_matches_reference(shape, dtype):
    m, g, n, k = shape
    inputs = OPS["batched_linear"].make_inputs({"M": m, "G": g, "N": n, "K": k}, dtype, "cpu", 1)
    out = batched_linear(**inputs, backend="torch")
    assert out.shape == (m, g, n) and out.dtype == dtype
    assert_close(out, reference(**inputs), dtype, scale=2.0)


@requires_triton
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference_on_a_strided_view(shape):
    m, g, n, k = shape
    gen = torch.Generator().manual_seed(2)
    # x as the absorbed query sees it: the first k of k + 8 columns of each head (a view, not contiguous)
    full = torch.randn(m, g, k + 8, generator=gen).to(TRITON_DEVICE)
    x = full[:, :, :k]
    weight = (torch.randn(g, n, k, generator=gen) * k ** -0.5).to(TRITON_DEVICE)
    out = batched_linear(x, weight, backend="triton")
    assert_close(out, reference(x, weight), torch.float32)


def test_cost_and_bad_input():
    flops, min_bytes = OPS["batched_linear"].cost({"M": 2, "G": 3, "N": 5, "K": 7}, torch.float16)
    assert flops == 2 * 2 * 3 * 5 * 7
    assert min_bytes == 3 * (2 * 7 + 5 * 7 + 2 * 5) * 2
    x = torch.zeros(2, 3, 7)
    with pytest.raises(ValueError, match="weight: expected shape"):
        batched_linear(x, torch.zeros(3, 5, 6), backend="torch")
    with pytest.raises(ValueError, match="x: expected a contiguous last dimension"):
        batched_linear(torch.zeros(2, 7, 3).transpose(1, 2), torch.zeros(3, 5, 7), backend="torch")


# ------------------------------------------------------------------------------ append_mla_kv (MLA's cache write)

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_append_mla_kv_writes_rows_at_scattered_slots(backend):
    from tokprof.kernels import append_mla_kv

    device = "cpu" if backend == "torch" else TRITON_DEVICE
    gen = torch.Generator().manual_seed(3)
    t, lat, r, blocks, bs = 5, 40, 8, 4, 4
    fused = torch.randn(t, lat + 3 + r, generator=gen)  # row slices of one projection output, as the model has
    latent, k_rope = fused[:, :lat], fused[:, lat + 3:]
    cache = torch.randn(blocks, bs, lat + r, generator=gen)
    slots = torch.tensor([13, 0, 7, 4, 15])
    want = cache.clone().view(-1, lat + r)
    want[slots] = torch.cat([latent, k_rope], dim=1)
    got = cache.to(device)
    append_mla_kv(latent.to(device), k_rope.to(device), got, slots.to(device), backend=backend)
    assert torch.equal(got.cpu().view(-1, lat + r), want)
    with pytest.raises(ValueError, match="slot_mapping: expected slots in"):
        append_mla_kv(latent, k_rope, cache, torch.tensor([0, 1, 2, 3, 16]), backend="torch")
    with pytest.raises(ValueError, match="kv_cache: expected shape"):
        append_mla_kv(latent, k_rope, torch.zeros(2, 4, lat), slots, backend="torch")


# ------------------------------------------------------------------------------------ bias_add (gpt-oss's biases)

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_bias_add_on_a_row_slice(backend):
    from tokprof.kernels import bias_add

    device = "cpu" if backend == "torch" else TRITON_DEVICE
    gen = torch.Generator().manual_seed(4)
    full = torch.randn(3, 1100, generator=gen)
    x, bias = full[:, 5:1090], torch.randn(1085, generator=gen)  # N above one Triton block, strided rows
    out = bias_add(x.to(device), bias.to(device), backend=backend)
    assert out.is_contiguous() and torch.equal(out.cpu(), x + bias)
    assert OPS["bias_add"].cost({"T": 3, "N": 7}, torch.float16) == (21, (2 * 21 + 7) * 2)
    with pytest.raises(ValueError, match="bias: expected shape"):
        bias_add(x, torch.zeros(4), backend="torch")
