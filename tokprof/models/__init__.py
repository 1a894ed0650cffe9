"""Model configs, decode/prefill plans (model -> kernel calls), a runnable transformer and end-to-end runs."""

from __future__ import annotations

from tokprof.models.config import PRESETS, ModelConfig

__all__ = ["PRESETS", "ModelConfig"]
