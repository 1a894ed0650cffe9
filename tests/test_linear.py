"""linear: torch and Triton (skinny split-K and tiled kernels) against a float64 reference, cost, bad input."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, assert_close, requires_triton

from tokprof.kernels import OPS, linear
from tokprof.kernels._common import poisoned_outputs

# The module, not the function of the same name that tokprof.kernels exports.
linear_mod = importlib.import_module("tokprof.kernels.linear")

# (M, N, K): M of 1, 3, 16 and 17 take the skinny kernel (BLOCK_M 16 and 32), 64 its largest tile, 70 the tiled
# GEMM; N and K of 123 and 200 are not multiples of any block (interpreter tiles: 32 x 32).
SHAPES = [(1, 123, 200), (3, 200, 123), (16, 64, 64), (17, 123, 200), (64, 100, 256), (70, 123, 200)]

# 8B-model weight shapes (N, K): QKV, O, gate-up, down, LM head of Llama-3.1-8B.
LLAMA_8B_WEIGHTS = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.double() @ weight.double().T


def torch_backend_scale(dtype: torch.dtype, k: int) -> float:
    # Our Triton kernels accumulate in fp32, so only the final rounding to the output dtype differs from float64
    # and the plain tolerance applies. torch's 16-bit GEMMs may reduce in reduced precision (CPU half GEMMs on some
    # builds, cuBLAS split-K with allow_fp16_reduced_precision_reduction): each partial sum then rounds to 16 bits
    # and the error grows like sqrt(K) ulps, so the reference backend's atol scales with sqrt(K / 64).
    return 1.0 if dtype == torch.float32 else max(1.0, math.sqrt(k / 64))


def make(shape: tuple[int, int, int], dtype: torch.dtype, device: str, seed: int) -> dict[str, torch.Tensor]:
    m, n, k = shape
    return OPS["linear"].make_inputs({"M": m, "N": n, "K": k}, dtype, device, seed)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_matches_reference(shape, dtype):
    inputs = make(shape, dtype, "cpu", seed=1)
    out = linear(**inputs, backend="torch")
    assert out.dtype == dtype and out.shape == (shape[0], shape[1])
    assert_close(out, reference(**inputs), dtype, scale=torch_backend_scale(dtype, shape[2]))


class _Spy:
    """Wraps a Triton kernel and records the grids it was launched with."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@requires_triton
@pytest.mark.parametrize("split", [1, 3], ids=["no-split", "split-k"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype, split, monkeypatch):
    m, n, k = shape
    monkeypatch.setattr(linear_mod, "_split_k", lambda M, N, K, device: split)
    skinny = _Spy(linear_mod._linear_skinny_kernel)
    reduce = _Spy(linear_mod._splitk_reduce_kernel)
    tiled = _Spy(linear_mod._linear_tiled_kernel)
    monkeypatch.setattr(linear_mod, "_linear_skinny_kernel", skinny)
    monkeypatch.setattr(linear_mod, "_splitk_reduce_kernel", reduce)
    monkeypatch.setattr(linear_mod, "_linear_tiled_kernel", tiled)
    inputs = make(shape, dtype, TRITON_DEVICE, seed=2)
    with poisoned_outputs():  # poisons the fp32 split-K scratch as well: an unwritten partial would show as NaN
        out = linear(**inputs, backend="triton")
    assert out.dtype == dtype
    assert_close(out, reference(**inputs), dtype)
    # The intended path ran: skinny up to 64 rows (with the reduction pass exactly when K is split), tiled above.
    if m <= linear_mod.SKINNY_MAX_M:
        assert len(skinny.grids) == 1 and not tiled.grids
        used = skinny.grids[0][1]  # the split after rounding to whole K blocks (e.g. 3 of 2 K blocks -> 2)
        k_blocks = math.ceil(k / linear_mod._skinny_blocks()[1])
        assert used == 1 if split == 1 or k_blocks == 1 else 1 < used <= split
        assert len(reduce.grids) == (1 if used > 1 else 0)
    else:
        assert len(tiled.grids) == 1 and not skinny.grids and not reduce.grids


@requires_triton
def test_split_k_is_deterministic_and_matches_unsplit(monkeypatch):
    inputs = make((5, 96, 320), torch.float32, TRITON_DEVICE, seed=3)
    monkeypatch.setattr(linear_mod, "_split_k", lambda M, N, K, device: 1)
    whole = linear(**inputs, backend="triton")
    monkeypatch.setattr(linear_mod, "_split_k", lambda M, N, K, device: 4)
    split_a = linear(**inputs, backend="triton")
    split_b = linear(**inputs, backend="triton")
    assert torch.equal(split_a, split_b)  # fixed-order reduction, no atomics
    assert_close(split_a, whole.double(), torch.float32)


def test_split_k_on_cpu_is_one():
    assert linear_mod._split_k(1, 4096, 4096, "cpu") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("weight_shape", LLAMA_8B_WEIGHTS, ids=str)
def test_gpu_split_k_fills_the_gpu(weight_shape):
    n, k = weight_shape
    split = linear_mod._split_k(1, n, k, "cuda")
    block_n, block_k = linear_mod._skinny_blocks()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert 1 <= split <= max(1, math.ceil(k / block_k) // 4)
    if math.ceil(n / block_n) < 4 * sms and k >= 16 * block_k:
        assert split > 1, f"{weight_shape}: {math.ceil(n / block_n)} N tiles on {sms} SMs and no split-K"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_shape", LLAMA_8B_WEIGHTS, ids=str)
def test_gpu_triton_matches_reference(weight_shape, dtype, m):
    n, k = weight_shape
    inputs = make((m, n, k), dtype, "cuda", seed=4)
    with poisoned_outputs():
        out = linear(**inputs, backend="triton")
    torch.cuda.synchronize()
    assert_close(out, reference(**inputs), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_torch_matches_reference(dtype):
    inputs = make((16, 4096, 14336), dtype, "cuda", seed=5)
    out = linear(**inputs, backend="torch")
    assert_close(out, reference(**inputs), dtype, scale=torch_backend_scale(dtype, 14336))


def test_cost_hand_count():
    # M=2, N=3, K=4: 2*3 outputs of 4 multiply-adds = 48 FLOP; x 8 + weight 12 + out 6 elements of 2 bytes = 52.
    assert OPS["linear"].cost({"M": 2, "N": 3, "K": 4}, torch.float16) == (48, 52)
    flops, nbytes = OPS["linear"].cost({"M": 1, "N": 128256, "K": 4096}, torch.bfloat16)  # the 8B LM head
    assert flops == 2 * 128256 * 4096
    assert nbytes == (4096 + 128256 * 4096 + 128256) * 2


def test_registry_record():
    op = OPS["linear"]
    assert op.shape_keys == ("M", "N", "K") and op.full_shape() == {"M": 16, "N": 4096, "K": 4096}
    inputs = op.make_inputs({"M": 3, "N": 5, "K": 7}, torch.float16, "cpu", seed=0)
    assert set(inputs) == {"x", "weight"}
    assert inputs["x"].shape == (3, 7) and inputs["weight"].shape == (5, 7) and inputs["x"].dtype == torch.float16
    assert torch.equal(inputs["weight"], op.make_inputs({"M": 3, "N": 5, "K": 7}, torch.float16, "cpu", 0)["weight"])
    assert op.available_backends("cpu")["cuda"] == "linear has no cuda implementation"


def test_bad_inputs_name_the_argument():
    x = torch.randn(3, 8)
    w = torch.randn(5, 8)
    with pytest.raises(ValueError, match="x: expected 2 dimensions, got 3"):
        linear(x[None], w, backend="torch")
    with pytest.raises(ValueError, match="weight: expected 2 dimensions, got 1"):
        linear(x, w[0], backend="torch")
    with pytest.raises(ValueError, match="x: expected dtype"):
        linear(x.int(), w, backend="torch")
    with pytest.raises(ValueError, match=r"weight: expected dtype torch.float32 \(the dtype of x\), got torch.float16"):
        linear(x, w.half(), backend="torch")
    with pytest.raises(ValueError, match=r"weight: expected shape \(N, K\) with K=8 .* got \(5, 9\)"):
        linear(x, torch.randn(5, 9), backend="torch")
    with pytest.raises(ValueError, match="weight: expected a contiguous tensor"):
        linear(x, torch.randn(8, 5).t(), backend="torch")
    with pytest.raises(ValueError, match="x: expected a non-empty"):
        linear(x[:0], w, backend="torch")
    with pytest.raises(ValueError, match="x: expected a non-empty"):
        linear(x[:, :0], w[:, :0], backend="torch")
    with pytest.raises(ValueError, match="weight: expected a non-empty"):
        linear(x, w[:0], backend="torch")
    with pytest.raises(ValueError, match="weight: expected a tensor on cpu"):
        linear(x, w.to("meta"), backend="torch")
    with pytest.raises(ValueError, match="backend: expected one of"):
        linear(x, w, backend="cublas")
    with pytest.raises(RuntimeError, match="linear has no cuda implementation"):
        linear(x, w, backend="cuda")
