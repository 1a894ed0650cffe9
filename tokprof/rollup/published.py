"""Recompute published cost-per-token tables from their own inputs and say where the printed numbers do not follow.

    for check in check_published_table():
        print(check.message)

tokprof/data/published_tables.json keeps each row as printed: its inputs ($/GPU-h, tokens/s per GPU) and its
derived figures ($/M tokens, tokens/s per MW), each with the step of its printed rounding. A derived figure follows
from the formula when the interval the inputs allow (inputs rounded as printed) meets the interval the printed
figure allows. tokens/s per MW needs an all-in kW per GPU, which the article does not print: tokprof reports the kW
the printed figure implies and compares with the price sheet's published figure for that GPU where there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokprof.profiler.schema import read_json
from tokprof.rollup.economics import PriceSheet, check_positive, cost_per_million_tokens, load_price_sheet

PUBLISHED_PATH = Path(__file__).resolve().parent.parent / "data" / "published_tables.json"


@dataclass
class PublishedCheck:
    table: str
    row: str
    gpu: str
    metric: str  # "usd_per_million_tokens" | "tokens_per_s_per_mw"
    printed: str
    printed_value: float
    computed: float | None  # from the row's inputs (and, for tokens/s per MW, the price sheet's kW per GPU)
    consistent: bool | None  # None when the table alone cannot decide (no kW per GPU known)
    implied: dict[str, float] = field(default_factory=dict)  # what the printed figure implies about an input
    message: str = ""
    source: str = ""


@dataclass(frozen=True)
class _Printed:
    printed: str
    value: float
    resolution: float

    @property
    def low(self) -> float:
        return self.value - self.resolution / 2

    @property
    def high(self) -> float:
        return self.value + self.resolution / 2


def _printed(where: str, row: dict[str, Any], name: str) -> _Printed:
    cell = row.get(name)
    if not isinstance(cell, dict):
        raise ValueError(f"{where}.{name}: expected an object {{printed, value, resolution}}, got {cell!r}")
    printed = cell.get("printed")
    if not isinstance(printed, str):
        raise ValueError(f"{where}.{name}.printed: expected a string, got {printed!r}")
    return _Printed(printed, check_positive(f"{where}.{name}.value", cell.get("value")),
                    check_positive(f"{where}.{name}.resolution", cell.get("resolution")))


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    tol = 1e-9 * max(abs(a[1]), abs(b[1]))
    return a[0] <= b[1] + tol and b[0] <= a[1] + tol


def _money(x: float) -> str:
    return f"${x:.3f}" if x < 1 else f"${x:.2f}"


def _si(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K"


def load_published_tables(path: str | Path | None = None) -> list[dict[str, Any]]:
    path = Path(path) if path is not None else PUBLISHED_PATH
    data = read_json(path, "published tables")
    tables = data.get("tables") if isinstance(data, dict) else None
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"{path}: expected an object with a non-empty 'tables' list")
    return tables


def check_published_table(path: str | Path | None = None, sheet: PriceSheet | None = None) -> list[PublishedCheck]:
    """Every derived figure of every published row, recomputed from the row's inputs, with a verdict."""
    sheet = sheet if sheet is not None else load_price_sheet()
    path = Path(path) if path is not None else PUBLISHED_PATH
    checks: list[PublishedCheck] = []
    for t, table in enumerate(load_published_tables(path)):
        name = str(table.get("name", f"table {t}"))
        source = f"{table.get('source', '?')} ({table.get('date', 'undated')})"
        for r, row in enumerate(table.get("rows") or []):
            where = f"{path}: tables[{t}].rows[{r}]"
            label, gpu = str(row.get("label", f"row {r}")), str(row.get("gpu", ""))
            usd = _printed(where, row, "usd_per_gpu_hour")
            tps = _printed(where, row, "tokens_per_s_per_gpu")
            checks.append(_check_cost(name, label, gpu, source, usd, tps, _printed(where, row,
                                                                                  "usd_per_million_tokens")))
            kw = sheet.row(gpu).all_in_kw_per_gpu if sheet.row(gpu) is not None else None
            checks.append(_check_per_mw(name, label, gpu, source, tps, _printed(where, row, "tokens_per_s_per_mw"),
                                        kw))
    return checks


def _check_cost(table: str, label: str, gpu: str, source: str, usd: _Printed, tps: _Printed,
                cost: _Printed) -> PublishedCheck:
    computed = cost_per_million_tokens(usd.value, tps.value)
    # the inputs are rounded too: the formula allows this interval
    allowed = (cost_per_million_tokens(usd.low, tps.high), cost_per_million_tokens(usd.high, tps.low))
    consistent = _overlap(allowed, (cost.low, cost.high))
    implied_tps = usd.value / (cost.value * 3600.0) * 1e6
    formula = f"{usd.printed} / ({tps.printed} tokens/s x 3600) x 1e6 = {_money(computed)}"
    if consistent:
        message = (f"{label}: cost per million tokens printed {cost.printed}; the formula gives {formula}: "
                   "follows at the printed precision")
    else:
        message = (f"{label}: cost per million tokens printed {cost.printed}, but the formula gives {formula} "
                   f"({(cost.value / computed - 1) * 100:+.1f}%): does NOT follow from the row's inputs; "
                   f"{cost.printed} at {usd.printed}/GPU-h implies {implied_tps:.1f} tokens/s per GPU, "
                   f"not {tps.printed}")
    return PublishedCheck(table=table, row=label, gpu=gpu, metric="usd_per_million_tokens", printed=cost.printed,
                          printed_value=cost.value, computed=computed, consistent=consistent,
                          implied={"tokens_per_s_per_gpu": implied_tps}, message=message, source=source)


def _check_per_mw(table: str, label: str, gpu: str, source: str, tps: _Printed, per_mw: _Printed,
                  sheet_kw: float | None) -> PublishedCheck:
    implied_kw = tps.value * 1000.0 / per_mw.value
    kw_range = (tps.low * 1000.0 / per_mw.high, tps.high * 1000.0 / per_mw.low)
    implied = {"all_in_kw_per_gpu": implied_kw, "all_in_kw_per_gpu_low": kw_range[0],
               "all_in_kw_per_gpu_high": kw_range[1]}
    message = (f"{label}: tokens/s per MW printed {per_mw.printed} at {tps.printed} tokens/s per GPU implies "
               f"{implied_kw:.2f} kW per GPU all-in ({kw_range[0]:.2f}-{kw_range[1]:.2f} with the rounding); "
               "the article does not print its kW per GPU")
    if sheet_kw is None:
        return PublishedCheck(table=table, row=label, gpu=gpu, metric="tokens_per_s_per_mw", printed=per_mw.printed,
                              printed_value=per_mw.value, computed=None, consistent=None, implied=implied,
                              message=message + f"; the price sheet has no all-in kW for {gpu!r} to compare with",
                              source=source)
    computed = tps.value * 1000.0 / sheet_kw
    consistent = kw_range[0] <= sheet_kw <= kw_range[1]
    verdict = "agrees" if consistent else "does NOT agree"
    message += (f"; the price sheet's {sheet_kw:.2f} kW per GPU gives {_si(computed)} tokens/s per MW: "
                f"{verdict} with the printed {per_mw.printed}")
    return PublishedCheck(table=table, row=label, gpu=gpu, metric="tokens_per_s_per_mw", printed=per_mw.printed,
                          printed_value=per_mw.value, computed=computed, consistent=consistent, implied=implied,
                          message=message, source=source)
