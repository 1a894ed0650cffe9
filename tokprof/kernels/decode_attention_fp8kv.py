"""Registry entry of decode attention over an FP8 KV cache: the same kernel (tokprof.kernels.decode_attention with
k_scale / v_scale), its inputs built with e4m3 caches and per-head scales, and its cost counting one byte per
cached element (half of bf16's KV bytes: the term that dominates decode at long context).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tokprof.kernels._common import Op, cdiv, dtype_bytes
from tokprof.kernels.decode_attention import OP as BASE
from tokprof.kernels.decode_attention import decode_attention
from tokprof.quant.formats import FP8


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    inputs = BASE.make_inputs(shape, dtype, device, seed)
    # random normal K/V (unit size) stored as e4m3 values up to ~4 * 112 with per-head scales 1/112 around 1
    hkv = shape["Hkv"]
    ramp = torch.linspace(0.8, 1.2, hkv, device=device, dtype=torch.float32)
    k_scale, v_scale = ramp / 112, ramp.flip(0) / 112
    inputs["k_cache"] = (inputs["k_cache"].float() / k_scale[:, None]).to(FP8)
    inputs["v_cache"] = (inputs["v_cache"].float() / v_scale[:, None]).to(FP8)
    return {**inputs, "k_scale": k_scale, "v_scale": v_scale}


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    batch, hq, hkv, d = shape["B"], shape["Hq"], shape["Hkv"], shape["D"]
    context, block_size, b = shape["context"], shape["block_size"], dtype_bytes(dtype)
    flops = 4 * batch * hq * context * d
    min_bytes = (2 * batch * context * hkv * d  # K and V, one byte each
                 + 2 * batch * hq * d * b  # q, out in the model dtype
                 + batch * cdiv(context, block_size) * 4 + batch * 4  # block_table entries, seq_lens
                 + 2 * 4 * hkv)  # the per-head scales
    return flops, min_bytes


OP = Op(
    name="decode_attention_fp8kv",
    fn=decode_attention,
    impls={k: v for k, v in BASE.impls.items() if k != "cuda"},  # the CUDA kernel reads 16-bit caches only
    shape_keys=BASE.shape_keys,
    default_shape=BASE.default_shape,
    make_inputs=make_inputs,
    cost=cost,
    cost_formula=("flops = 4*B*Hq*context*D; bytes = 2*B*context*Hkv*D (e4m3 K, V) + 2*B*Hq*D*dtype_bytes (q, out) "
                  "+ 4*B*ceil(context/block_size) + 4*B + 8*Hkv (per-head scales)"),
    description="paged decode attention over an fp8 e4m3 KV cache with per-head k/v scales",
    shape_doc=BASE.shape_doc,
)
