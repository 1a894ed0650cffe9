"""Modelled vs published: the step model (tokprof.rollup.step_model) against published decode measurements.

    report = validate()                      # every row of tokprof/data/published_decode.json
    report.rows[0].error                     # modelled / published - 1 (signed)
    report.stats["held_out"].median_abs      # |error| statistics per split: all, calibration, held_out

Each row is modelled at its batch and tp on its GPU's datasheet, at the mean context of its generation
(input + output / 2), then converted to the row's metric: `tokens_per_s_per_user`, `output_tokens_per_s_per_group`
(tokens/s per GPU x tp) or `token_latency_p50_s` (compared as its inverse). A row whose point does not fit in memory
is reported as such, without an error. The goal (issue 12): median |error| <= 15%, max <= 35% on dense bf16/fp16.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tokprof.models.config import ModelConfig
from tokprof.rollup.project import modelled, resolve_gpu
from tokprof.rollup.step_model import StepModel

METRICS = ("tokens_per_s_per_user", "output_tokens_per_s_per_group", "token_latency_p50_s")
GOAL_MEDIAN_ABS = 0.15
GOAL_MAX_ABS = 0.35


def load_published(path: str | Path | None = None) -> dict[str, Any]:
    """The published measurements (the shipped file, or `path` in its format), checked."""
    if path is None:
        text = resources.files("tokprof.data").joinpath("published_decode.json").read_text()
        where = "tokprof/data/published_decode.json"
    else:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ValueError(f"published: cannot read {str(path)!r}: {err.strerror or err}") from err
        where = str(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"published: {where} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list) or not isinstance(doc.get("sources"), dict):
        raise ValueError(f"published: {where} needs 'sources' (object) and 'rows' (list)")
    for i, r in enumerate(doc["rows"]):
        missing = [k for k in ("source", "model", "gpu", "dtype", "tp", "batch", "input_tokens", "output_tokens",
                               "metric", "value") if k not in r]
        if missing:
            raise ValueError(f"published: {where} rows[{i}] misses {missing}")
        if r["source"] not in doc["sources"]:
            raise ValueError(f"published: {where} rows[{i}] names source {r['source']!r}, not in 'sources'")
        if r["metric"] not in METRICS:
            raise ValueError(f"published: {where} rows[{i}].metric: expected one of {METRICS}, got {r['metric']!r}")
        if not (isinstance(r["value"], (int, float)) and r["value"] > 0):
            raise ValueError(f"published: {where} rows[{i}].value: expected a positive number, got {r['value']!r}")
    return doc


@dataclass
class RowResult:
    source: str
    split: str  # "calibration" | "held_out"
    model: str
    gpu: str
    dtype: str
    tp: int
    batch: int
    context: int  # the modelled mean context
    metric: str  # the row's metric; published and modelled are rates (a latency row: its inverse, tokens/s per user)
    published: float
    modelled: float | None
    error: float | None  # modelled / published - 1
    reason: str | None = None  # why modelled is None (does not fit)


@dataclass
class ErrorStats:
    rows: int
    median_abs: float | None
    max_abs: float | None
    median_signed: float | None

    @classmethod
    def of(cls, errors: list[float]) -> ErrorStats:
        if not errors:
            return cls(0, None, None, None)
        return cls(len(errors), statistics.median(abs(e) for e in errors), max(abs(e) for e in errors),
                   statistics.median(errors))

    def meets_goal(self) -> bool | None:
        if self.median_abs is None or self.max_abs is None:
            return None
        return self.median_abs <= GOAL_MEDIAN_ABS and self.max_abs <= GOAL_MAX_ABS


@dataclass
class ClaimCheck:
    """A published bound (not a measured row): the modelled bandwidth fraction against the stated maximum."""

    source_title: str
    statement: str
    modelled_bandwidth_fraction: float | None
    max_bandwidth_fraction: float
    holds: bool | None


@dataclass
class ValidationReport:
    rows: list[RowResult]
    stats: dict[str, ErrorStats] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    calibration_sources: list[str] = field(default_factory=list)
    claims: list[ClaimCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [vars(r) for r in self.rows], "claims": [vars(c) for c in self.claims],
                "stats": {k: {**vars(v), "meets_goal": v.meets_goal()} for k, v in self.stats.items()},
                "goal": {"median_abs": GOAL_MEDIAN_ABS, "max_abs": GOAL_MAX_ABS},
                "calibration_sources": self.calibration_sources, "sources": self.sources}


def validate(step_model: StepModel | None = None, path: str | Path | None = None) -> ValidationReport:
    """Model every published row with `step_model` (default: the shipped defaults) and compare."""
    doc = load_published(path)
    calibration = list(doc.get("calibration_sources") or [])
    results = []
    for r in doc["rows"]:
        config = ModelConfig.from_name(r["model"])
        context = int(r["input_tokens"]) + int(r["output_tokens"]) // 2
        (point,) = modelled(config, r["gpu"], [int(r["batch"])], [context], r["dtype"], tp=int(r["tp"]),
                            step_model=step_model)
        value = None
        if point.tokens_per_s_per_gpu is not None and point.tokens_per_s_per_user is not None:
            value = (point.tokens_per_s_per_gpu * point.tp if r["metric"] == "output_tokens_per_s_per_group"
                     else point.tokens_per_s_per_user)
        published = float(r["value"]) if r["metric"] != "token_latency_p50_s" else 1.0 / float(r["value"])
        results.append(RowResult(
            source=r["source"], split="calibration" if r["source"] in calibration else "held_out", model=r["model"],
            gpu=r["gpu"], dtype=r["dtype"], tp=int(r["tp"]), batch=int(r["batch"]), context=context,
            metric=r["metric"], published=published, modelled=value,
            error=value / published - 1.0 if value is not None else None,
            reason=point.infeasible_reason))
    stats = {"all": ErrorStats.of([x.error for x in results if x.error is not None])}
    for split in ("calibration", "held_out"):
        stats[split] = ErrorStats.of([x.error for x in results if x.error is not None and x.split == split])
    claims = [_check_claim(c, step_model) for c in doc.get("claims") or []]
    return ValidationReport(rows=results, stats=stats, sources=doc["sources"], calibration_sources=calibration,
                            claims=claims)


def _check_claim(c: dict[str, Any], step_model: StepModel | None) -> ClaimCheck:
    """The modelled fraction of the datasheet HBM bandwidth one decode step uses (decode weight + KV bytes of the
    plan / step time), against the claim's stated maximum."""
    config = ModelConfig.from_name(c["model"])
    context = int(c["input_tokens"]) + int(c["output_tokens"]) // 2
    (point,) = modelled(config, c["gpu"], [int(c["batch"])], [context], c["dtype"], tp=int(c["tp"]),
                        step_model=step_model)
    fraction = None
    if point.step_time_us is not None:
        spec = resolve_gpu(c["gpu"])
        roof_us = sum(o.count * o.efficiency_datasheet * o.time_us for o in point.ops
                      if o.bound == "memory" and o.efficiency_datasheet is not None)
        fraction = roof_us / point.step_time_us if spec.hbm_tbps else None
    bound = float(c["max_bandwidth_fraction"])
    return ClaimCheck(c["source_title"], c["statement"], fraction, bound,
                      None if fraction is None else fraction <= bound)
