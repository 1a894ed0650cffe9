"""Checkpoint layouts (DeepSeek fp8 + weight_scale_inv, gpt-oss MXFP4 blocks + scales, AutoAWQ int4) written as tiny
tensors the way their producers pack them, read back into tokprof's QuantizedWeight."""

from __future__ import annotations

import pytest
import torch

from tokprof.quant.checkpoint import AWQ_ORDER, from_awq, from_deepseek_fp8, from_gpt_oss_mxfp4, load_quantized_linears
from tokprof.quant.formats import FP4_VALUES, dequantize_weight, quantize_weight


def test_deepseek_fp8_block_layout() -> None:
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    qw = quantize_weight(w, "fp8-block")
    loaded = from_deepseek_fp8(qw.data, qw.scale)  # DeepSeek stores exactly this pair
    assert torch.equal(dequantize_weight(loaded), dequantize_weight(qw))
    with pytest.raises(ValueError, match="weight_scale_inv: expected shape"):
        from_deepseek_fp8(qw.data, qw.scale[:1])


def test_gpt_oss_mxfp4_layout() -> None:
    # one row, K = 64: block 0 scale 2^0 holds codes 0..15 twice; block 1 scale 2^-1 holds code 7 (6.0) everywhere
    codes = torch.cat([torch.arange(16), torch.arange(16), torch.full((32,), 7)]).to(torch.uint8).view(1, 64)
    blocks = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(1, 2, 16)  # gpt-oss: low nibble first
    scales = torch.tensor([[127, 126]], dtype=torch.uint8)
    w = dequantize_weight(from_gpt_oss_mxfp4(blocks, scales))
    expect = list(FP4_VALUES) + [-v for v in FP4_VALUES]
    assert w[0, :16].tolist() == expect and w[0, 16:32].tolist() == expect
    assert w[0, 32:].tolist() == [3.0] * 32


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's packing: (R, C) ints < 16 -> int32 (R, C/8), column AWQ_ORDER[i] of each 8 in nibble i."""
    r, c = values.shape
    packed = torch.zeros(r, c // 8, dtype=torch.int32)
    for i, col in enumerate(AWQ_ORDER):
        packed |= values[:, col::8].to(torch.int32) << (4 * i)
    return packed


def test_awq_int4_layout() -> None:
    gen = torch.Generator().manual_seed(3)
    k, n, g = 256, 16, 128
    q = torch.randint(0, 16, (k, n), generator=gen)  # AWQ is in-features first
    zeros = torch.randint(0, 16, (k // g, n), generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) + 0.5).half()
    loaded = from_awq(_awq_pack(q), _awq_pack(zeros), scales, group_size=g)
    expect = ((q - zeros.repeat_interleave(g, 0)).float() * scales.float().repeat_interleave(g, 0)).T  # (N, K)
    assert torch.allclose(dequantize_weight(loaded), expect)


def test_load_a_directory_of_layouts(tmp_path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    w = torch.randn(128, 128, generator=torch.Generator().manual_seed(1))
    fp8 = quantize_weight(w, "fp8-block")
    mx = quantize_weight(w, "mxfp4")
    safetensors.save_file({
        "model.layers.0.mlp.down_proj.weight": fp8.data, "model.layers.0.mlp.down_proj.weight_scale_inv": fp8.scale,
        "model.layers.0.mlp.experts.down_proj_blocks": mx.data.view(128, 4, 16),
        "model.layers.0.mlp.experts.down_proj_scales": mx.scale,
        "model.norm.weight": torch.ones(128),
    }, str(tmp_path / "model.safetensors"))
    loaded = load_quantized_linears(tmp_path)
    assert sorted(loaded) == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(dequantize_weight(loaded["model.layers.0.mlp.down_proj"]), dequantize_weight(fp8))
    assert torch.equal(dequantize_weight(loaded["model.layers.0.mlp.experts.down_proj"]), dequantize_weight(mx))
