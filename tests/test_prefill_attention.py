"""prefill_attention: torch and Triton against a float64 reference (causal and full, GQA, odd S), cost, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, assert_close, requires_triton

from tokprof.kernels import OPS, prefill_attention
from tokprof.kernels._common import poisoned_outputs

# The module, not the function of the same name that tokprof.kernels exports.
attn_mod = importlib.import_module("tokprof.kernels.prefill_attention")

# (B, Hq, Hkv, S, D, causal): S of 1, odd S (5, 37, 100) and one multiple of every block size (64); GQA ratios 1, 4
# and 8; D 64 and 128. The interpreter's tiles are 32 query rows x 16 keys, so S=100 has four row blocks, off-band
# blocks below the diagonal, split diagonals and a ragged tail.
CASES = [
    (1, 1, 1, 1, 64, True),
    (1, 2, 2, 1, 128, False),
    (2, 4, 1, 5, 64, True),
    (1, 8, 1, 37, 128, True),
    (2, 4, 4, 37, 64, False),
    (1, 8, 2, 100, 64, True),
    (1, 8, 1, 100, 128, False),
    (1, 2, 2, 64, 128, True),
]


def case_id(case: tuple[int, ...]) -> str:
    b, hq, hkv, s, d, causal = case
    return f"B{b}-Hq{hq}-Hkv{hkv}-S{s}-D{d}-{'causal' if causal else 'full'}"


def shape_of(case: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(("B", "Hq", "Hkv", "S", "D", "causal"), (*case[:5], int(case[5])), strict=True))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None):
    """Float64 attention with query head h reading KV head h // (Hq / Hkv)."""
    hq, seq, d = q.shape[1], q.shape[2], q.shape[3]
    group = hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    kd = k.double().repeat_interleave(group, dim=1)
    vd = v.double().repeat_interleave(group, dim=1)
    scores = q.double() @ kd.transpose(-1, -2) * scale  # (B, Hq, S, S)
    if causal:
        future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ vd


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_matches_reference(case, dtype):
    inputs = OPS["prefill_attention"].make_inputs(shape_of(case), dtype, "cpu", seed=1)
    with poisoned_outputs():
        out = prefill_attention(**inputs, backend="torch")
    assert out.dtype == dtype
    assert_close(out, reference(inputs["q"], inputs["k"], inputs["v"], inputs["causal"]), dtype)


def test_torch_row_chunks_match_reference(monkeypatch):
    # A score budget of 3 rows' worth forces the chunked path (and causal key truncation) on a small prompt.
    b, hq, hkv, s, d = 1, 4, 2, 23, 64
    monkeypatch.setattr(attn_mod, "_TORCH_SCORE_BYTES", 3 * 4 * hq * s)
    inputs = OPS["prefill_attention"].make_inputs({"B": b, "Hq": hq, "Hkv": hkv, "S": s, "D": d, "causal": 1},
                                                  torch.float32, "cpu", seed=4)
    for causal in (True, False):
        with poisoned_outputs():
            out = prefill_attention(inputs["q"], inputs["k"], inputs["v"], causal=causal, backend="torch")
        assert_close(out, reference(inputs["q"], inputs["k"], inputs["v"], causal), torch.float32)


@requires_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(case, dtype):
    inputs = OPS["prefill_attention"].make_inputs(shape_of(case), dtype, TRITON_DEVICE, seed=2)
    with poisoned_outputs():
        out = prefill_attention(**inputs, backend="triton")
    assert out.dtype == dtype
    assert_close(out, reference(inputs["q"], inputs["k"], inputs["v"], inputs["causal"]), dtype)


@requires_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_explicit_scale(backend):
    inputs = OPS["prefill_attention"].make_inputs({"B": 1, "Hq": 4, "Hkv": 2, "S": 19, "D": 64, "causal": 1},
                                                  torch.float32, TRITON_DEVICE, seed=5)
    with poisoned_outputs():
        out = prefill_attention(**inputs, scale=0.31, backend=backend)
    assert_close(out, reference(inputs["q"], inputs["k"], inputs["v"], True, scale=0.31), torch.float32)
    # And the scale matters: the default (D**-0.5 = 0.125) gives a different answer.
    default = reference(inputs["q"], inputs["k"], inputs["v"], True)
    assert (out.double().cpu() - default.cpu()).abs().max() > 1e-2


@requires_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_causal_rows_ignore_future_keys(backend):
    # Independent of the reference: changing keys and values at positions > i must leave row i as it was.
    inputs = OPS["prefill_attention"].make_inputs({"B": 1, "Hq": 4, "Hkv": 1, "S": 41, "D": 64, "causal": 1},
                                                  torch.float32, TRITON_DEVICE, seed=6)
    cut = 17
    k2, v2 = inputs["k"].clone(), inputs["v"].clone()
    gen = torch.Generator(device=TRITON_DEVICE).manual_seed(7)
    k2[:, :, cut:] = torch.randn(k2[:, :, cut:].shape, generator=gen, device=TRITON_DEVICE)
    v2[:, :, cut:] = torch.randn(v2[:, :, cut:].shape, generator=gen, device=TRITON_DEVICE)
    out1 = prefill_attention(inputs["q"], inputs["k"], inputs["v"], backend=backend)
    out2 = prefill_attention(inputs["q"], k2, v2, backend=backend)
    assert torch.equal(out1[:, :, :cut], out2[:, :, :cut])
    assert not torch.allclose(out1[:, :, cut:], out2[:, :, cut:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(1, 8, 2, 4096, 128, True), (2, 8, 1, 1000, 64, True), (1, 8, 8, 2048, 128, False),
                                  (1, 4, 1, 333, 256, True)], ids=case_id)
def test_gpu_triton_matches_reference(case, dtype):
    inputs = OPS["prefill_attention"].make_inputs(shape_of(case), dtype, "cuda", seed=3)
    with poisoned_outputs():
        out = prefill_attention(**inputs, backend="triton")
    torch.cuda.synchronize()
    assert_close(out, reference(inputs["q"], inputs["k"], inputs["v"], inputs["causal"]), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_torch_matches_reference(dtype):
    inputs = OPS["prefill_attention"].make_inputs({"B": 1, "Hq": 8, "Hkv": 2, "S": 4096, "D": 128, "causal": 1},
                                                  dtype, "cuda", seed=8)
    with poisoned_outputs():
        out = prefill_attention(**inputs, backend="torch")
    assert_close(out, reference(inputs["q"], inputs["k"], inputs["v"], True), dtype)


def test_cost_hand_count():
    op = OPS["prefill_attention"]
    # B=1, Hq=2, Hkv=1, S=3, D=4. Causal: 6 visible (query, key) pairs per head, 4*D = 16 FLOP per pair, 2 heads.
    assert op.cost({"B": 1, "Hq": 2, "Hkv": 1, "S": 3, "D": 4, "causal": 1}, torch.float16)[0] == 16 * 6 * 2
    # Full: 9 pairs per head. Bytes: q and out 2*3*4 = 24 elements each, k and v 1*3*4 = 12 each: 72 * 2 bytes.
    assert op.cost({"B": 1, "Hq": 2, "Hkv": 1, "S": 3, "D": 4, "causal": 0}, torch.float16) == (16 * 9 * 2, 144)
    flops, nbytes = op.cost(op.full_shape(), torch.bfloat16)  # 1 x 32/8 heads x 4096 tokens x 128, causal
    assert flops == 4 * 32 * 128 * 4096 * 4097 // 2
    assert nbytes == (2 * 32 + 2 * 8) * 4096 * 128 * 2


def test_registry_record():
    op = OPS["prefill_attention"]
    assert op.shape_keys == ("B", "Hq", "Hkv", "S", "D", "causal", "window", "sinks")
    assert set(op.default_shape) == {"B", "Hq", "Hkv", "S", "D", "causal"}  # gpt-oss's window and sinks optional
    shape = op.full_shape({"S": 9, "D": 64, "Hq": 4, "Hkv": 2})
    inputs = op.make_inputs(shape, torch.float32, "cpu", seed=0)
    assert set(inputs) == {"q", "k", "v", "causal"} and inputs["causal"] is True
    assert inputs["q"].shape == (1, 4, 9, 64) and inputs["k"].shape == (1, 2, 9, 64)
    again = op.make_inputs(shape, torch.float32, "cpu", seed=0)
    assert torch.equal(inputs["q"], again["q"])  # seeded
    assert op.available_backends("cpu")["cuda"] == "prefill_attention has no cuda implementation"
    extras = op.make_inputs(op.full_shape({**shape, "window": 4, "sinks": 1}), torch.float32, "cpu", seed=0)
    assert extras["sliding_window"] == 4 and extras["sinks"].shape == (4,) and extras["sinks"].dtype == torch.float32
    # Causal window 4 over S=9: rows see 1, 2, 3, 4, 4, 4, 4, 4, 4 keys = 30 pairs; 4*D FLOP per pair per head.
    flops, min_bytes = op.cost({**shape, "window": 4, "sinks": 1}, torch.float16)
    assert flops == 4 * 64 * 4 * 30 and min_bytes == op.cost(shape, torch.float16)[1] + 4 * 4


def test_bad_inputs_name_the_argument():
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="q: expected 4 dimensions, got 3"):
        prefill_attention(q[0], k, k, backend="torch")
    with pytest.raises(ValueError, match="k: expected dtype"):
        prefill_attention(q, k.int(), k, backend="torch")
    with pytest.raises(ValueError, match=r"v: expected dtype torch.float32 \(the dtype of q\), got torch.float16"):
        prefill_attention(q, k, k.half(), backend="torch")
    with pytest.raises(ValueError, match="k: expected a KV head count Hkv that divides"):
        prefill_attention(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8), backend="torch")
    with pytest.raises(ValueError, match=r"k: expected shape \(B, Hkv, S, D\)"):
        prefill_attention(q, torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), backend="torch")
    with pytest.raises(ValueError, match=r"k: expected shape \(B, Hkv, S, D\)"):
        prefill_attention(q, torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), backend="torch")
    with pytest.raises(ValueError, match=r"v: expected shape \(B, Hkv, S, D\)"):
        prefill_attention(q, k, torch.randn(1, 2, 5, 16), backend="torch")
    with pytest.raises(ValueError, match="q: expected a contiguous tensor"):
        prefill_attention(torch.randn(1, 5, 4, 8).transpose(1, 2), k, k, backend="torch")
    with pytest.raises(ValueError, match="q: expected a non-empty"):
        prefill_attention(q[:, :, :0], k[:, :, :0], k[:, :, :0], backend="torch")
    with pytest.raises(ValueError, match="k: expected a tensor on cpu"):
        prefill_attention(q, k.to("meta"), k, backend="torch")
    with pytest.raises(ValueError, match="causal: expected a bool"):
        prefill_attention(q, k, k, causal=1, backend="torch")
    with pytest.raises(ValueError, match="scale: expected None or a positive finite float"):
        prefill_attention(q, k, k, scale=-1.0, backend="torch")
    with pytest.raises(ValueError, match="backend: expected one of"):
        prefill_attention(q, k, k, backend="flash")
    with pytest.raises(RuntimeError, match="prefill_attention has no cuda implementation"):
        prefill_attention(q, k, k, backend="cuda")


@requires_triton
def test_triton_rejects_head_dims_it_cannot_tile():
    q = torch.randn(1, 2, 3, 48, device=TRITON_DEVICE)
    k = torch.randn(1, 2, 3, 48, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="q: the triton backend takes head dim D in .* got D=48; backend='torch'"):
        prefill_attention(q, k, k, backend="triton")
    out = prefill_attention(q, k, k, backend="torch")  # the reference takes any D
    assert_close(out, reference(q, k, k, True), torch.float32)
