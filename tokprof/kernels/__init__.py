"""The decode-step kernels of an LLM, one op per file, each with torch (reference), Triton and CUDA backends.

The public functions follow docs/design.md ("The kernel API"); `OPS[name]` is the registry record that the
profiler and the model plans use (inputs, cost formula, implementations per backend).
"""

from __future__ import annotations

import importlib

import torch

from tokprof.kernels._common import BACKENDS, DTYPES, Op, dtype_name, parse_dtype

# Ops in decode-step order; each module defines the public function of the same name and an `OP` record.
_OP_MODULES = ("embedding", "rms_norm", "linear", "rope", "append_kv", "append_mla_kv", "decode_attention",
               "mla_decode_attention", "prefill_attention", "paged_prefill_attention", "mla_prefill_attention",
               "batched_linear", "bias_add", "swiglu", "moe_router", "fused_moe", "greedy_sample", "quantize_fp8",
               "linear_w8a8", "linear_w4a16", "append_kv_fp8", "decode_attention_fp8kv")

OPS: dict[str, Op] = {}
for _name in _OP_MODULES:
    try:  # INTEGRATION: explicit imports once every op file exists
        _module = importlib.import_module(f"tokprof.kernels.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"tokprof.kernels.{_name}":
            raise
        continue
    # a module holds one op (`OP`) or, for one kernel serving several formats, one op per format (`OPS_IN_MODULE`)
    for _op in getattr(_module, "OPS_IN_MODULE", None) or (_module.OP,):
        OPS[_op.name] = _op
    if hasattr(_module, _name):  # a registry entry reusing another op's function (decode_attention_fp8kv) has none
        globals()[_name] = getattr(_module, _name)


def available_backends(device: torch.device | str = "cpu") -> dict[str, dict[str, str | None]]:
    """op -> backend -> None when usable on `device`, else the reason (no GPU, no CuPy, no driver, ...)."""
    return {name: op.available_backends(device) for name, op in OPS.items()}


__all__ = [
    "BACKENDS",
    "DTYPES",
    "OPS",
    "Op",
    "append_kv",
    "append_mla_kv",
    "append_kv_fp8",
    "available_backends",
    "batched_linear",
    "bias_add",
    "decode_attention",
    "dtype_name",
    "embedding",
    "fused_moe",
    "greedy_sample",
    "linear",
    "mla_decode_attention",
    "mla_prefill_attention",
    "moe_router",
    "linear_w4a16",
    "linear_w8a8",
    "paged_prefill_attention",
    "parse_dtype",
    "prefill_attention",
    "quantize_fp8",
    "rms_norm",
    "rope",
    "swiglu",
]
