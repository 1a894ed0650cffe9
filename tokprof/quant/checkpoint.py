"""Quantised weights in the layouts of published checkpoints -> tokprof's QuantizedWeight (kernel layout).

    qw = from_deepseek_fp8(weight, weight_scale_inv)           # DeepSeek-V3/R1: fp8 weight + 128x128 scales
    qw = from_gpt_oss_mxfp4(blocks, scales)                    # gpt-oss: *_blocks (N, K/32, 16) + *_scales (N, K/32)
    qw = from_awq(qweight, qzeros, scales)                     # AutoAWQ GEMM: int32 packed along N
    weights = load_quantized_linears(directory)                # every quantised linear of a safetensors directory

Each layout is documented with its function; the tests write tiny tensors in the layout (packing them the way the
checkpoint's producer does) and check the conversion against the values they packed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tokprof.quant.formats import FP8, QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ packs out-feature j of each group of 8 into nibble AWQ_ORDER.index(j)


def from_deepseek_fp8(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> QuantizedWeight:
    """DeepSeek-V3/R1 (and Qwen3 FP8) layout: `weight` float8_e4m3fn (N, K) and `weight_scale_inv` fp32
    (ceil(N/128), ceil(K/128)); the real weight is weight * weight_scale_inv tile by tile (the name says "inv"
    because the quantiser divided by it)."""
    n, k = weight.shape
    want = (-(-n // 128), -(-k // 128))
    if weight.dtype != FP8:
        raise ValueError(f"weight: expected float8_e4m3fn (N, K), got {weight.dtype}")
    if tuple(weight_scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv: expected shape {want} (128x128 tiles of ({n}, {k})), got "
                         f"{tuple(weight_scale_inv.shape)}")
    return QuantizedWeight("fp8-block", (n, k), weight.contiguous(), weight_scale_inv.float().contiguous())


def from_gpt_oss_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    """gpt-oss layout: `*_blocks` uint8 (..., N, K/32, 16), two e2m1 codes per byte (element 2j in the low nibble),
    and `*_scales` uint8 (..., N, K/32) = the e8m0 exponent + 127. One (N, K) matrix: leading dims must be gone
    (index the expert first for a MoE tensor)."""
    if blocks.dim() != 3 or blocks.shape[-1] != 16 or blocks.dtype != torch.uint8:
        raise ValueError(f"blocks: expected uint8 (N, K/32, 16), got {blocks.dtype} {tuple(blocks.shape)}")
    n, groups, _ = blocks.shape
    if tuple(scales.shape) != (n, groups) or scales.dtype != torch.uint8:
        raise ValueError(f"scales: expected uint8 ({n}, {groups}), got {scales.dtype} {tuple(scales.shape)}")
    return QuantizedWeight("mxfp4", (n, groups * 32), blocks.reshape(n, groups * 16).contiguous(),
                           scales.contiguous())


def _unpack_int32(packed: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """int32 (R, C) with 8 nibbles each -> uint8 (R, 8C); `order`: nibble i holds column order[i] of its group."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = ((packed[:, :, None] >> shifts) & 0xF).to(torch.uint8)  # (R, C, 8): nibble i
    if order is not None:
        cols = torch.empty_like(nibbles)
        cols[:, :, list(order)] = nibbles  # nibble i -> column order[i]
        nibbles = cols
    return nibbles.reshape(packed.shape[0], -1)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int = 128) -> QuantizedWeight:
    """AutoAWQ GEMM layout (in-features first): `qweight` int32 (K, N/8) and `qzeros` int32 (K/g, N/8), each int32
    holding 8 out-features' 4-bit values in AWQ's interleaved order (AWQ_ORDER); `scales` fp16 (K/g, N).
    w[n, k] = (q[k, n] - zero[k/g, n]) * scale[k/g, n]."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight, qzeros: expected int32, got {qweight.dtype}, {qzeros.dtype}")
    k, n8 = qweight.shape
    n = n8 * 8
    groups = -(-k // group_size)
    if tuple(qzeros.shape) != (groups, n8) or tuple(scales.shape) != (groups, n):
        raise ValueError(f"qzeros, scales: expected ({groups}, {n8}) and ({groups}, {n}) for qweight ({k}, {n8}) "
                         f"and group_size {group_size}, got {tuple(qzeros.shape)} and {tuple(scales.shape)}")
    q = _unpack_int32(qweight, AWQ_ORDER).T.contiguous()  # (N, K)
    zeros = _unpack_int32(qzeros, AWQ_ORDER).T.contiguous()  # (N, G)
    pad = -k % group_size
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return QuantizedWeight("int4", (n, k), packed, scales.T.contiguous().half(), zero=zeros)


def load_quantized_linears(directory: str | Path) -> dict[str, QuantizedWeight]:
    """Every quantised linear weight of a safetensors directory, by its module name ("model.layers.0.mlp.down_proj"),
    recognised by its tensors: `.weight` fp8 + `.weight_scale_inv` (DeepSeek), `.qweight` + `.qzeros` + `.scales`
    (AWQ), `_blocks` + `_scales` (gpt-oss MXFP4). Needs the safetensors package (a dev / GPU-image dependency)."""
    try:
        from safetensors import safe_open
    except ImportError as err:  # pragma: no cover - safetensors ships with the GPU image and the dev extra
        raise RuntimeError(f"reading safetensors needs the safetensors package ({err})") from err
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"directory: expected *.safetensors files in {str(directory)!r}, found none")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                tensors[key] = f.get_tensor(key)
    out: dict[str, QuantizedWeight] = {}
    for key, t in tensors.items():
        if key.endswith(".weight_scale_inv"):
            name = key[: -len(".weight_scale_inv")]
            out[name] = from_deepseek_fp8(tensors[f"{name}.weight"], t)
        elif key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            out[name] = from_awq(t, tensors[f"{name}.qzeros"], tensors[f"{name}.scales"])
        elif key.endswith("_blocks"):
            name = key[: -len("_blocks")]
            out[name] = from_gpt_oss_mxfp4(t, tensors[f"{name}_scales"])
    return out
