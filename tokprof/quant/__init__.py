"""Low-precision formats (FP8, MXFP4, NVFP4, INT4): registry, byte counts, quantise/dequantise, accuracy."""

from __future__ import annotations

from tokprof.quant.formats import (
    FP8_E4M3_MAX,
    WEIGHT_FORMATS,
    QuantizedWeight,
    WeightFormat,
    dequantize_weight,
    is_weight_format,
    quantize_weight,
    weight_format,
)

__all__ = ["FP8_E4M3_MAX", "WEIGHT_FORMATS", "QuantizedWeight", "WeightFormat", "dequantize_weight",
           "is_weight_format", "quantize_weight", "weight_format"]
