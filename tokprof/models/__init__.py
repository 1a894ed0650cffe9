"""Model configs, decode/prefill plans (model -> kernel calls), a runnable transformer and end-to-end runs."""

from __future__ import annotations

from tokprof.models.config import PRESETS, ModelConfig
from tokprof.models.plan import KernelCall, decode_plan, plan_totals, prefill_plan

__all__ = ["PRESETS", "KernelCall", "ModelConfig", "decode_plan", "plan_totals", "prefill_plan"]
