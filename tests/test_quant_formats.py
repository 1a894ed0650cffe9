"""Quantise -> dequantise round trips of every weight format, within the error bound its specification implies."""

from __future__ import annotations

import pytest
import torch

from tokprof.quant.formats import (
    FP4_VALUES,
    WEIGHT_FORMATS,
    dequantize_fp8_rows,
    dequantize_weight,
    error_bound,
    fp4_decode,
    fp4_encode,
    pack_nibbles,
    quantize_fp8_rows,
    quantize_weight,
    relative_rms_error,
    unpack_nibbles,
    weight_format,
)


def _weight(n: int = 192, k: int = 320, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[3, 7] = 0.5  # an outlier, so block scales differ from the tensor's
    w[5, 40:72] = 0.0  # an all-zero MX block
    return w


@pytest.mark.parametrize("fmt", sorted(WEIGHT_FORMATS))
def test_round_trip_within_the_format_bound(fmt: str) -> None:
    w = _weight()
    qw = quantize_weight(w, fmt)
    err = (w - dequantize_weight(qw)).abs()
    bound = error_bound(w, qw)
    assert (err <= bound).all(), f"{fmt}: worst excess {(err - bound).max().item():.3g}"
    assert dequantize_weight(qw).shape == w.shape
    # and the bound is not vacuous: the typical error stays well below the weights' own size
    assert relative_rms_error(w, qw) < {"fp8": 0.05, "fp8-block": 0.05, "mxfp4": 0.25, "nvfp4": 0.15,
                                        "int4": 0.15}[fmt]


@pytest.mark.parametrize("fmt", sorted(WEIGHT_FORMATS))
def test_stored_bytes_match_the_format_count(fmt: str) -> None:
    w = _weight(256, 384)
    qw = quantize_weight(w, fmt)
    assert qw.nbytes() == WEIGHT_FORMATS[fmt].weight_bytes(256, 384)


def test_bits_per_weight_by_hand() -> None:
    # 4096 x 4096: fp8 per tensor 8 bits + one fp32; mxfp4 4 + 8/32; nvfp4 4 + 8/16 + one fp32; int4 4 + (16+8)/128
    assert WEIGHT_FORMATS["fp8"].weight_bytes(4096, 4096) == 4096 * 4096 + 4
    assert WEIGHT_FORMATS["fp8-block"].weight_bytes(4096, 4096) == 4096 * 4096 + 32 * 32 * 4
    assert WEIGHT_FORMATS["mxfp4"].bits_per_weight() == pytest.approx(4.25)
    assert WEIGHT_FORMATS["nvfp4"].bits_per_weight() == pytest.approx(4.5, abs=1e-5)
    assert WEIGHT_FORMATS["int4"].bits_per_weight() == pytest.approx(4 + 24 / 128)


def test_fp8_saturates_at_448_and_rounds_e4m3() -> None:
    # per-tensor scale = amax / 448: the largest weight maps to 448 exactly
    w = torch.tensor([[448.0 * 2, 1.0, -3.0, 0.0]])
    qw = quantize_weight(w, "fp8")
    assert qw.scale.item() == 2.0
    assert qw.data.float().abs().max().item() == 448.0
    assert dequantize_weight(qw).tolist() == [[896.0, 1.0, -3.0, 0.0]]


def test_mxfp4_scale_is_the_spec_shared_exponent() -> None:
    # block amax 5.0: floor(log2 5) - 2 = 0 -> scale 1 (e8m0 code 127); amax 12: floor(log2 12) - 2 = 1 -> scale 2
    w = torch.zeros(2, 32)
    w[0, 0], w[0, 1] = 5.0, 0.74
    w[1, 0], w[1, 1] = 12.0, -1.0
    qw = quantize_weight(w, "mxfp4")
    assert qw.scale.tolist() == [[127], [128]]
    deq = dequantize_weight(qw)
    assert deq[0, :2].tolist() == [4.0, 0.5]  # 5 -> 4 (tie 5 goes to even 4), 0.74 -> 0.5
    assert deq[1, :2].tolist() == [12.0, -1.0]  # 12/2 = 6 exactly
    # gpt-oss layout: blocks (N, K/32, 16) are a view of the packed data
    assert qw.data.view(2, 1, 16).shape == (2, 1, 16)


def test_nvfp4_two_level_scales() -> None:
    w = _weight(64, 64)
    qw = quantize_weight(w, "nvfp4")
    assert qw.tensor_scale.item() == pytest.approx(w.abs().max().item() / (448 * 6))
    assert qw.scale.dtype == torch.float8_e4m3fn and qw.scale.shape == (64, 4)


def test_int4_zero_points_and_exact_grid_values() -> None:
    # a group whose values sit on the grid of its own scale comes back exactly
    w = torch.zeros(1, 128)
    w[0, :16] = torch.arange(16, dtype=torch.float32) * 0.1 - 0.5  # min -0.5, max 1.0 -> scale 0.1, zero 5
    qw = quantize_weight(w, "int4")
    assert qw.zero.item() == 5
    assert qw.scale.float().item() == pytest.approx(0.1, rel=1e-3)
    assert torch.allclose(dequantize_weight(qw)[0, :16], w[0, :16], atol=1e-3)


def test_fp4_codec_ties_to_even_and_saturates() -> None:
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.9, -0.3, -6.0])
    assert fp4_decode(fp4_encode(x)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5, -6.0]
    codes = torch.arange(16, dtype=torch.uint8)
    assert fp4_decode(codes)[:8].tolist() == list(FP4_VALUES)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes.view(2, 8))), codes.view(2, 8))


@pytest.mark.parametrize("group", [0, 128])
def test_activation_quantisation_per_token_and_group(group: int) -> None:
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_fp8_rows(x, group)
    assert scale.shape == ((5,) if group == 0 else (5, 3))
    err = (x - dequantize_fp8_rows(q, scale, group)).abs()
    s = scale[:, None] if group == 0 else scale.repeat_interleave(group, dim=1)[:, :300]
    assert (err <= torch.maximum(x.abs() * 2.0**-4, 2.0**-10 * s) * (1 + 1e-6)).all()


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="weight format: expected one of"):
        weight_format("fp5")
    with pytest.raises(ValueError, match="weight: expected a non-empty 2-D float tensor"):
        quantize_weight(torch.zeros(4), "fp8")
    assert weight_format("AWQ").name == "int4"
