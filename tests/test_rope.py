"""rope: every backend against a float64 reference (HF rounding order), HF parity, inv_freq, cost, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, assert_close, requires_triton

from tokprof.kernels import OPS, rope
from tokprof.kernels._common import poisoned_outputs
from tokprof.kernels.rope import default_inv_freq
from tokprof.models.config import ModelConfig

# (T, Hq, Hkv, D): GQA ratios 1, 4 and 8; D 64 and 128; T 1, 5, 37; 3x6x3x96 has a head_dim whose half (48) is not
# a power of two.
SHAPES = [(1, 4, 4, 64), (5, 8, 2, 128), (37, 8, 1, 64), (3, 6, 3, 96)]


def reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
              inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 rotation with HF's two documented roundings kept: fp32 angles and cos/sin rounded to the dtype."""
    angles = (positions.float()[:, None] * inv_freq.float()[None, :]).double()  # (T, D/2), fp32 product as HF
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(q.dtype).double()[:, None, :]  # (T, 1, D)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(q.dtype).double()[:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat((-x2, x1), -1) * sin

    return rot(q), rot(k)


def inputs_for(shape: tuple[int, int, int, int], dtype: torch.dtype, device: str, seed: int,
               pos_dtype: torch.dtype = torch.int64) -> dict:
    t, hq, hkv, d = shape
    inputs = OPS["rope"].make_inputs({"T": t, "Hq": hq, "Hkv": hkv, "D": d}, dtype, device, seed)
    inputs["positions"] = inputs["positions"].to(pos_dtype)
    return inputs


def check(result, inputs: dict, dtype: torch.dtype, inv_freq: torch.Tensor | None = None) -> None:
    q, k = inputs["q"], inputs["k"]
    if inv_freq is None:
        inv_freq = default_inv_freq(inputs["theta"], q.shape[-1], q.device)
    q_ref, k_ref = reference(q, k, inputs["positions"], inv_freq)
    q_rot, k_rot = result
    assert q_rot.dtype == dtype and k_rot.dtype == dtype
    assert q_rot.is_contiguous() and k_rot.is_contiguous()
    # Up to three roundings to the dtype (two products, the sum) where HF rounds: twice the one-rounding tolerance.
    assert_close(q_rot, q_ref, dtype, what="q_rot", scale=2.0)
    assert_close(k_rot, k_ref, dtype, what="k_rot", scale=2.0)


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_reference(shape, dtype, pos_dtype):
    inputs = inputs_for(shape, dtype, "cpu", seed=1, pos_dtype=pos_dtype)
    check(rope(**inputs, backend="torch"), inputs, dtype)


@requires_triton
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype, pos_dtype):
    inputs = inputs_for(shape, dtype, TRITON_DEVICE, seed=2, pos_dtype=pos_dtype)
    with poisoned_outputs():
        result = rope(**inputs, backend="triton")
    check(result, inputs, dtype)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_inv_freq_override_llama31(backend):
    cfg = ModelConfig.from_name("llama-3.1-8b")
    inv_freq = cfg.inv_freq()  # (64,) with Llama 3.1 scaling
    plain = default_inv_freq(cfg.rope_theta, cfg.head_dim, torch.device("cpu"))
    assert not torch.equal(inv_freq, plain)
    device = "cpu" if backend == "torch" else TRITON_DEVICE
    inputs = inputs_for((5, 8, 2, cfg.head_dim), torch.float32, device, seed=3)
    inputs["theta"] = cfg.rope_theta
    inputs["positions"] = torch.tensor([0, 1, 4095, 8191, 100000], device=device)  # past the original 8k context
    with poisoned_outputs():
        scaled = rope(**inputs, inv_freq=inv_freq.to(device), backend=backend)
    check(scaled, inputs, torch.float32, inv_freq=inv_freq.to(device))
    unscaled = rope(**inputs, backend=backend)
    assert (scaled[0] - unscaled[0]).abs().max() > 0.1  # the override took effect


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_q_k_slices_of_a_fused_qkv_row(backend):
    # q and k as views into a fused (T, (Hq + 2*Hkv) * D) projection output: token stride != H * D.
    t, hq, hkv, d = 5, 4, 2, 64
    device = "cpu" if backend == "torch" else TRITON_DEVICE
    gen = torch.Generator(device=device).manual_seed(4)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen, device=device).half()
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    assert not q.is_contiguous() and not k.is_contiguous()
    positions = torch.randint(0, 8192, (t,), generator=gen, device=device)
    inputs = {"q": q, "k": k, "positions": positions, "theta": 10000.0}
    with poisoned_outputs():
        result = rope(**inputs, backend=backend)
    check(result, inputs, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_is_bit_identical_to_transformers(dtype):
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                      rope_theta=500000.0)
    inputs = inputs_for((9, 8, 2, 64), dtype, "cpu", seed=5)
    inputs["theta"] = 500000.0
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    cos, sin = rotary(inputs["q"], inputs["positions"][None, :])  # (1, T, D) each, in the dtype
    # HF layout (B, H, T, D): unsqueeze_dim=1 broadcasts cos over heads.
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(inputs["q"].transpose(0, 1)[None],
                                                     inputs["k"].transpose(0, 1)[None], cos, sin)
    q_rot, k_rot = rope(**inputs, backend="torch")
    assert torch.equal(q_rot, q_hf[0].transpose(0, 1))
    assert torch.equal(k_rot, k_hf[0].transpose(0, 1))


@requires_triton
def test_triton_matches_torch_rounding_in_fp16():
    inputs = inputs_for((37, 8, 2, 128), torch.float16, TRITON_DEVICE, seed=6)
    q_t, k_t = rope(**inputs, backend="torch")
    q_k, k_k = rope(**inputs, backend="triton")
    for a, b in ((q_t, q_k), (k_t, k_k)):
        mismatched = (a != b).float().mean().item()
        assert mismatched < 0.01, f"{mismatched:.2%} of outputs differ from the torch backend"


def test_position_zero_is_identity_and_rotation_preserves_pair_norms():
    inputs = inputs_for((3, 2, 2, 64), torch.float32, "cpu", seed=7)
    inputs["positions"] = torch.tensor([0, 5, 3000])
    q_rot, _ = rope(**inputs, backend="torch")
    torch.testing.assert_close(q_rot[0], inputs["q"][0])  # cos 0 = 1, sin 0 = 0
    q = inputs["q"]
    pair_norm = q[..., :32].pow(2) + q[..., 32:].pow(2)
    rot_norm = q_rot[..., :32].pow(2) + q_rot[..., 32:].pow(2)
    torch.testing.assert_close(rot_norm, pair_norm, rtol=1e-5, atol=1e-5)
    assert (q_rot[1:] - q[1:]).abs().max() > 0.1


def test_cost_hand_count():
    # T=2, Hq=2, Hkv=1, D=4, fp16: elements 2*3*4 = 24; flops 72; bytes 2*24*2 + 2*8 = 112.
    assert OPS["rope"].cost({"T": 2, "Hq": 2, "Hkv": 1, "D": 4}, torch.float16) == (72, 112)
    # Default shape, bf16: T=16, Hq=32, Hkv=8, D=128.
    elems = 16 * 40 * 128
    assert OPS["rope"].cost(OPS["rope"].full_shape(), torch.bfloat16) == (3 * elems, 4 * elems + 128)


def test_make_inputs_positions_and_theta():
    inputs = OPS["rope"].make_inputs(OPS["rope"].full_shape({"T": 64}), torch.float32, "cpu", 0)
    assert inputs["positions"].dtype == torch.int64 and inputs["theta"] == 500000.0
    assert int(inputs["positions"].min()) >= 0 and int(inputs["positions"].max()) < 8192
    again = OPS["rope"].make_inputs(OPS["rope"].full_shape({"T": 64}), torch.float32, "cpu", 0)
    assert torch.equal(inputs["positions"], again["positions"]) and torch.equal(inputs["q"], again["q"])


def test_bad_inputs_name_the_argument():
    q, k, pos = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.arange(3)
    with pytest.raises(ValueError, match="q: expected 3 dimensions, got 2"):
        rope(torch.randn(3, 8), k, pos, backend="torch")
    with pytest.raises(ValueError, match="q: expected an even, non-zero head_dim D, got D=7"):
        rope(torch.randn(3, 4, 7), torch.randn(3, 2, 7), pos, backend="torch")
    with pytest.raises(ValueError, match="q: expected at least one token"):
        rope(torch.randn(0, 4, 8), torch.randn(0, 2, 8), pos[:0], backend="torch")
    with pytest.raises(ValueError, match="q: expected dtype"):
        rope(q.to(torch.int32), k, pos, backend="torch")
    with pytest.raises(ValueError, match=r"k: expected shape \(3, \*, 8\), got \(3, 2, 16\)"):
        rope(q, torch.randn(3, 2, 16), pos, backend="torch")
    with pytest.raises(ValueError, match="k: expected dtype torch.float32"):
        rope(q, k.half(), pos, backend="torch")
    with pytest.raises(ValueError, match=r"q: expected heads and head_dim contiguous"):
        rope(torch.randn(3, 8, 4).transpose(1, 2), k, pos, backend="torch")
    with pytest.raises(ValueError, match=r"positions: expected shape \(3\), got \(4,\)"):
        rope(q, k, torch.arange(4), backend="torch")
    with pytest.raises(ValueError, match="positions: expected dtype"):
        rope(q, k, pos.float(), backend="torch")
    with pytest.raises(ValueError, match=r"inv_freq: expected shape \(4\), got \(8,\)"):
        rope(q, k, pos, inv_freq=torch.ones(8), backend="torch")
    with pytest.raises(ValueError, match="inv_freq: expected dtype"):
        rope(q, k, pos, inv_freq=torch.ones(4, dtype=torch.float64), backend="torch")
    with pytest.raises(ValueError, match="theta: expected a positive finite float"):
        rope(q, k, pos, theta=0.0, backend="torch")
    with pytest.raises(ValueError, match="backend: expected one of"):
        rope(q, k, pos, backend="jax")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="positions: expected a tensor on cpu"):
            rope(q, k, pos.cuda(), backend="torch")


def test_cuda_backend_without_gpu_says_what_works():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="Backends that work here: torch"):
        rope(torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.arange(2), backend="cuda")


# ----------------------------------------------------------------------------------------------------------- GPU

# D=36: D/2 = 18 is no multiple of the vector width, so the CUDA backend takes its scalar kernel.
GPU_SHAPES = SHAPES + [(16, 32, 8, 128), (4096, 32, 8, 128), (64, 64, 8, 128), (7, 16, 16, 80), (5, 4, 2, 36)]


@pytest.mark.gpu
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_backends_match_reference(shape, dtype, backend, pos_dtype):
    inputs = inputs_for(shape, dtype, "cuda", seed=8, pos_dtype=pos_dtype)
    with poisoned_outputs():
        result = rope(**inputs, backend=backend)
    torch.cuda.synchronize()
    check(result, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_backends_match_torch_rounding_and_take_qkv_slices(dtype, backend):
    t, hq, hkv, d = 300, 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(9)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen, device="cuda").to(dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    positions = torch.randint(0, 8192, (t,), generator=gen, device="cuda")
    inv_freq = ModelConfig.from_name("llama-3.1-8b").inv_freq().cuda()
    expected = rope(q, k, positions, inv_freq=inv_freq, backend="torch")
    with poisoned_outputs():
        got = rope(q, k, positions, inv_freq=inv_freq, backend=backend)
    for a, b in zip(expected, got, strict=True):
        mismatched = (a != b).float().mean().item()
        assert mismatched < 0.01, f"{mismatched:.2%} of outputs differ from the torch backend"
