"""From kernel measurements to the economics of inference: tokens/s, J/token, $/M tokens and tokens/s per MW.

    from tokprof import rollup
    rollup.cost_per_million_tokens(usd_per_gpu_hour=1.41, tokens_per_s_per_gpu=90)      # 4.35...
    rollup.tokens_per_s_per_mw(tokens_per_s_per_gpu=90, all_in_kw_per_gpu=1.73)         # 52023...
    points, run = rollup.bottom_up(cfg, [1, 8, 64], [1024, 8192], "triton", "cuda")    # measured
    points = rollup.project(run, "b200")                                                # projected
    points = rollup.modelled(cfg, "h200", [1, 64], [8192])                             # modelled (step model)
    rollup.memory_budget(cfg, "h200", 128, 8192).reason; rollup.max_batch(cfg, "h200", 8192).batch   # capacity
    points = rollup.modelled(cfg70b, "h100", [8], [4096], tp=4)     # one GPU of 4, all-reduces modelled (NVLink)
    rollup.pareto_frontier(points, context=8192); rollup.cost_at_interactivity(points, 50.0, context=8192)
    rollup.check_published_table()        # where a published cost-per-token table does not follow its formula

Modules: economics (formulas, price sheets, all-in power), records (RollupPoint, OpShare), bottom_up, project
(projected and modelled), capacity (memory per GPU, the largest batch), step_model (efficiency curves, per-step
overhead, collectives by algorithm), validate (the step model against published measurements), interconnect (the
collectives of tensor-parallel points: measured or modelled), pareto
(frontier, interactivity), published (article check), reconcile (the iceberg layers L0..L5, and L1i at tp > 1,
against end-to-end measurements).
"""

from __future__ import annotations

from tokprof.rollup.bottom_up import bottom_up, rollup_points, run_gpu_name
from tokprof.rollup.capacity import MaxBatch, MemoryBudget, max_batch, memory_budget
from tokprof.rollup.economics import (
    DEFAULT_TIER,
    PriceOptions,
    PriceRow,
    PriceSheet,
    Pricing,
    all_in_kw_from_measured,
    cost_per_million_tokens,
    energy_usd_per_million_tokens,
    gpu_power_w,
    load_price_sheet,
    pricing_for,
    tokens_per_s_per_mw,
)
from tokprof.rollup.interconnect import CollectiveOptions
from tokprof.rollup.pareto import InteractivityCost, cost_at_interactivity, pareto_frontier
from tokprof.rollup.project import DEFAULT_EFFICIENCY, modelled, project, resolve_gpu, roof_time_us
from tokprof.rollup.published import PublishedCheck, check_published_table
from tokprof.rollup.reconcile import Layer, OpInefficiency, Reconciliation, reconcile, waterfall_rows
from tokprof.rollup.records import OpShare, RollupPoint, build_point, infeasible_point, points_from_run
from tokprof.rollup.step_model import StepModel

__all__ = [
    "MaxBatch",
    "MemoryBudget",
    "StepModel",
    "infeasible_point",
    "max_batch",
    "memory_budget",
    "CollectiveOptions",
    "Layer",
    "OpInefficiency",
    "Reconciliation",
    "reconcile",
    "waterfall_rows",
    "DEFAULT_EFFICIENCY",
    "DEFAULT_TIER",
    "InteractivityCost",
    "OpShare",
    "PriceOptions",
    "PriceRow",
    "PriceSheet",
    "Pricing",
    "PublishedCheck",
    "RollupPoint",
    "all_in_kw_from_measured",
    "bottom_up",
    "build_point",
    "check_published_table",
    "cost_at_interactivity",
    "cost_per_million_tokens",
    "energy_usd_per_million_tokens",
    "gpu_power_w",
    "load_price_sheet",
    "modelled",
    "pareto_frontier",
    "points_from_run",
    "pricing_for",
    "project",
    "resolve_gpu",
    "roof_time_us",
    "rollup_points",
    "run_gpu_name",
    "tokens_per_s_per_mw",
]
