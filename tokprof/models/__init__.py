"""Model configs, decode/prefill plans (model -> kernel calls), a runnable transformer and end-to-end runs."""

from __future__ import annotations

from tokprof.models.config import PRESETS, ModelConfig
from tokprof.models.e2e import E2EMeasurement, measure_e2e
from tokprof.models.plan import KernelCall, decode_plan, plan_totals, prefill_plan
from tokprof.models.transformer import Transformer

__all__ = ["PRESETS", "E2EMeasurement", "KernelCall", "ModelConfig", "Transformer", "decode_plan", "measure_e2e",
           "plan_totals", "prefill_plan"]
