"""rms_norm: every backend against a float64 reference (HF rounding order), HF parity, cost formula, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, assert_close, requires_triton

from tokprof.kernels import OPS, rms_norm
from tokprof.kernels._common import poisoned_outputs

# (T, H): 5x123 and 37x1000 are deliberately odd; 3x10000 takes the chunked (H > 8192) path; 40x128 is Qwen3's
# per-head norm (T*Hq rows of head_dim), several rows per Triton program.
SHAPES = [(1, 64), (5, 123), (37, 1000), (3, 10000), (40, 128)]


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
              residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float64 RMSNorm; the residual stream rounded to the model dtype first (the documented HF order)."""
    new_residual = None
    s = x.double()
    if residual is not None:
        new_residual = x.double() + residual.double()
        s = new_residual.to(x.dtype).double()
    out = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return out, new_residual


def inputs_for(shape: tuple[int, int], residual: bool, dtype: torch.dtype, device: str, seed: int) -> dict:
    return OPS["rms_norm"].make_inputs({"T": shape[0], "H": shape[1], "residual": int(residual)}, dtype, device, seed)


def check(result, inputs: dict, dtype: torch.dtype) -> None:
    out_ref, res_ref = reference(inputs["x"], inputs["weight"], inputs["eps"], inputs.get("residual"))
    if res_ref is None:
        assert isinstance(result, torch.Tensor)
        out = result
    else:
        out, new_residual = result
        assert new_residual.dtype == dtype
        assert_close(new_residual, res_ref, dtype, what="new_residual")
    assert out.dtype == dtype
    # Two roundings to the dtype (normalised value, then the weight product): twice the one-rounding tolerance.
    assert_close(out, out_ref, dtype, scale=2.0)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_reference(shape, dtype, residual):
    inputs = inputs_for(shape, residual, dtype, "cpu", seed=1)
    check(rms_norm(**inputs, backend="torch"), inputs, dtype)


@requires_triton
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype, residual):
    inputs = inputs_for(shape, residual, dtype, TRITON_DEVICE, seed=2)
    with poisoned_outputs():
        result = rms_norm(**inputs, backend="triton")
    check(result, inputs, dtype)


@requires_triton
def test_triton_matches_torch_bit_for_bit_in_fp16():
    # Same rounding points as the torch path; only the fp32 summation order differs, which rarely moves a rounding.
    inputs = inputs_for((37, 1000), True, torch.float16, TRITON_DEVICE, seed=3)
    out_t, res_t = rms_norm(**inputs, backend="torch")
    out_k, res_k = rms_norm(**inputs, backend="triton")
    assert torch.equal(res_t, res_k)
    mismatched = (out_t != out_k).float().mean().item()
    assert mismatched < 0.01, f"{mismatched:.2%} of outputs differ from the torch backend"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_is_bit_identical_to_transformers(dtype):
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    inputs = inputs_for((7, 256), True, dtype, "cpu", seed=4)
    norm = modeling_llama.LlamaRMSNorm(256, eps=inputs["eps"]).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(inputs["weight"])
        hidden = inputs["residual"] + inputs["x"]  # HF decoder layer: residual + hidden_states, in the dtype
        expected = norm(hidden)
    out, new_residual = rms_norm(**inputs, backend="torch")
    assert torch.equal(new_residual, hidden)
    assert torch.equal(out, expected)


def test_residual_changes_the_result_and_weight_is_applied():
    inputs = inputs_for((4, 64), True, torch.float32, "cpu", seed=5)
    with_res, _ = rms_norm(**inputs, backend="torch")
    plain = rms_norm(inputs["x"], inputs["weight"], eps=inputs["eps"], backend="torch")
    assert (with_res - plain).abs().max() > 0.1
    doubled = rms_norm(inputs["x"], 2 * inputs["weight"], eps=inputs["eps"], backend="torch")
    torch.testing.assert_close(doubled, 2 * plain)


def test_cost_hand_count():
    # T=2, H=3, fp16, no residual: flops 4*6 = 24; bytes (x 6 + out 6 + weight 3) * 2 = 30.
    assert OPS["rms_norm"].cost({"T": 2, "H": 3, "residual": 0}, torch.float16) == (24, 30)
    # With residual: + T*H flops (30) and + 2*T*H*2 bytes (read residual, write new_residual): 54.
    assert OPS["rms_norm"].cost({"T": 2, "H": 3, "residual": 1}, torch.float16) == (30, 54)
    # Default shape, bf16: T=16, H=4096, residual.
    assert OPS["rms_norm"].cost(OPS["rms_norm"].full_shape(), torch.bfloat16) == (5 * 16 * 4096,
                                                                                 (4 * 16 * 4096 + 4096) * 2)


def test_make_inputs_follows_the_residual_key():
    op = OPS["rms_norm"]
    assert "residual" in op.make_inputs(op.full_shape(), torch.float32, "cpu", 0)
    plain = op.make_inputs(op.full_shape({"T": 2, "residual": 0}), torch.float32, "cpu", 0)
    assert "residual" not in plain and plain["eps"] == 1e-5
    with pytest.raises(ValueError, match="'residual' expected 0 or 1"):
        op.make_inputs(op.full_shape({"residual": 2}), torch.float32, "cpu", 0)


def test_bad_inputs_name_the_argument():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="x: expected 2 dimensions, got 3"):
        rms_norm(torch.randn(2, 3, 8), w, backend="torch")
    with pytest.raises(ValueError, match="x: expected dtype"):
        rms_norm(torch.ones(4, 8, dtype=torch.int32), w, backend="torch")
    with pytest.raises(ValueError, match="x: expected a contiguous tensor"):
        rms_norm(torch.randn(8, 4).t(), w, backend="torch")
    with pytest.raises(ValueError, match="x: expected at least one row"):
        rms_norm(torch.randn(0, 8), w, backend="torch")
    with pytest.raises(ValueError, match=r"weight: expected shape \(8\), got \(7,\)"):
        rms_norm(x, torch.randn(7), backend="torch")
    with pytest.raises(ValueError, match="weight: expected dtype torch.float32"):
        rms_norm(x, w.half(), backend="torch")
    with pytest.raises(ValueError, match=r"residual: expected shape \(4, 8\), got \(4, 9\)"):
        rms_norm(x, w, residual=torch.randn(4, 9), backend="torch")
    with pytest.raises(ValueError, match="residual: expected dtype torch.float32"):
        rms_norm(x, w, residual=torch.randn(4, 8).half(), backend="torch")
    with pytest.raises(ValueError, match="eps: expected a finite float >= 0"):
        rms_norm(x, w, eps=-1.0, backend="torch")
    with pytest.raises(ValueError, match="backend: expected one of"):
        rms_norm(x, w, backend="numpy")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight: expected a tensor on cpu"):
            rms_norm(x, w.cuda(), backend="torch")


def test_cuda_backend_without_gpu_says_what_works():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="Backends that work here: torch"):
        rms_norm(torch.randn(2, 8), torch.randn(8), backend="cuda")


# ----------------------------------------------------------------------------------------------------------- GPU

GPU_SHAPES = SHAPES + [(64, 4096), (512, 8192), (4, 16384), (2048 * 32, 128), (7, 4095)]


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_backends_match_reference(shape, dtype, backend, residual):
    inputs = inputs_for(shape, residual, dtype, "cuda", seed=6)
    with poisoned_outputs():
        result = rms_norm(**inputs, backend=backend)
    torch.cuda.synchronize()
    check(result, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_backends_match_torch_rounding(dtype, backend):
    inputs = inputs_for((256, 4096), True, dtype, "cuda", seed=7)
    out_t, res_t = rms_norm(**inputs, backend="torch")
    out_k, res_k = rms_norm(**inputs, backend=backend)
    assert torch.equal(res_t, res_k)
    mismatched = (out_t != out_k).float().mean().item()
    assert mismatched < 0.01, f"{mismatched:.2%} of outputs differ from the torch backend"
