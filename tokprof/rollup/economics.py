"""Economics of inference: cost per million tokens, tokens/s per MW, energy cost, all-in power and price sheets.

    cost_per_million_tokens(usd_per_gpu_hour=1.41, tokens_per_s_per_gpu=90)      # 4.35... $ per 1e6 tokens
    tokens_per_s_per_mw(tokens_per_s_per_gpu=90, all_in_kw_per_gpu=1.73)         # 52023... tokens/s per MW
    energy_usd_per_million_tokens(j_per_token=0.5, usd_per_kwh=0.08, pue=1.2)    # 0.0133... $ per 1e6 tokens
    sheet = load_price_sheet()            # tokprof/data/prices.json (SemiAnalysis InferenceX constants)
    sheet = load_price_sheet("mine.json") # the user's rows replace the shipped rows of the same GPU

The formulas are InferenceX's: $/M tokens = $/GPU-h / (tokens/s/GPU x 3600 / 1e6). Power per GPU is "all-in"
(host, network and facility included): either a published figure (InferenceX builds it from component TDPs) or
the measured GPU power times an overhead factor the user states; each figure says which it is.
Non-positive or non-finite inputs raise ValueError naming the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokprof.profiler.schema import read_json

PRICES_PATH = Path(__file__).resolve().parent.parent / "data" / "prices.json"
DEFAULT_TIER = "hyperscaler"
J_PER_KWH = 3.6e6


def check_positive(name: str, value: Any) -> float:
    """`value` as a float when it is a positive finite number, else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------------ formulas


def cost_per_million_tokens(usd_per_gpu_hour: float, tokens_per_s_per_gpu: float) -> float:
    """$ per 1e6 tokens = $/GPU-h / (tokens/s per GPU x 3600 s/h) x 1e6."""
    usd = check_positive("usd_per_gpu_hour", usd_per_gpu_hour)
    tps = check_positive("tokens_per_s_per_gpu", tokens_per_s_per_gpu)
    return usd / (tps * 3600.0) * 1e6


def tokens_per_s_per_mw(tokens_per_s_per_gpu: float, all_in_kw_per_gpu: float) -> float:
    """Tokens/s per MW of provisioned power: a MW feeds 1000 / (all-in kW per GPU) GPUs."""
    tps = check_positive("tokens_per_s_per_gpu", tokens_per_s_per_gpu)
    kw = check_positive("all_in_kw_per_gpu", all_in_kw_per_gpu)
    return tps * 1000.0 / kw


def energy_usd_per_million_tokens(j_per_token: float, usd_per_kwh: float, pue: float = 1.0) -> float:
    """Electricity $ per 1e6 tokens: J/token x 1e6 / 3.6e6 J/kWh x $/kWh x PUE (facility / IT energy)."""
    j = check_positive("j_per_token", j_per_token)
    price = check_positive("usd_per_kwh", usd_per_kwh)
    p = check_positive("pue", pue)
    if p < 1.0:
        raise ValueError(f"pue: expected >= 1 (facility energy over IT energy), got {pue!r}")
    return j * 1e6 / J_PER_KWH * price * p


def gpu_power_w(j_per_token: float, tokens_per_s_per_gpu: float) -> float:
    """Average GPU power while decoding: J/token x tokens/s."""
    return check_positive("j_per_token", j_per_token) * check_positive("tokens_per_s_per_gpu", tokens_per_s_per_gpu)


def all_in_kw_from_measured(gpu_power_w: float, overhead_factor: float) -> float:
    """All-in kW per GPU = measured GPU power x a stated overhead (host, network, facility; >= 1)."""
    power = check_positive("gpu_power_w", gpu_power_w)
    factor = check_positive("overhead_factor", overhead_factor)
    if factor < 1.0:
        raise ValueError(f"overhead_factor: expected >= 1 (all-in power over GPU power), got {overhead_factor!r}")
    return power * factor / 1000.0


# -------------------------------------------------------------------------------------------------- price sheets


@dataclass(frozen=True)
class PriceRow:
    gpu: str  # spec-table key (tokprof/data/gpus.json)
    usd_per_gpu_hour: dict[str, float]  # tier -> $ per GPU-hour
    all_in_kw_per_gpu: float | None
    source: str
    date: str
    note: str = ""
    origin: str = ""  # the file this row came from


@dataclass(frozen=True)
class PriceSheet:
    rows: dict[str, PriceRow]
    default_tier: str = DEFAULT_TIER
    paths: tuple[str, ...] = ()

    def row(self, gpu: str) -> PriceRow | None:
        return self.rows.get(gpu)


def _field(where: str, row: dict[str, Any], name: str, kind: type) -> Any:
    if name not in row:
        raise ValueError(f"{where}.{name}: missing")
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}.{name}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _read_sheet(path: Path) -> tuple[dict[str, PriceRow], str | None]:
    data = read_json(path, "price sheet")
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
        raise ValueError(f"{path}: expected an object with a 'gpus' list (see tokprof/data/prices.json)")
    tier = data.get("default_tier")
    if tier is not None and not isinstance(tier, str):
        raise ValueError(f"{path}: default_tier: expected a string, got {tier!r}")
    rows: dict[str, PriceRow] = {}
    for i, row in enumerate(data["gpus"]):
        where = f"{path}: gpus[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
        known = {"gpu", "name", "usd_per_gpu_hour", "all_in_kw_per_gpu", "source", "date", "note"}
        unknown = sorted(set(row) - known)
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}; expected a subset of {sorted(known)}")
        gpu = _field(where, row, "gpu", str)
        prices = _field(where, row, "usd_per_gpu_hour", dict)
        if not prices:
            raise ValueError(f"{where}.usd_per_gpu_hour: expected at least one tier, got {{}}")
        usd = {str(t): check_positive(f"{where}.usd_per_gpu_hour.{t}", v) for t, v in prices.items()}
        kw = row.get("all_in_kw_per_gpu")
        kw = check_positive(f"{where}.all_in_kw_per_gpu", kw) if kw is not None else None
        if gpu in rows:
            raise ValueError(f"{where}.gpu: {gpu!r} appears twice")
        rows[gpu] = PriceRow(gpu=gpu, usd_per_gpu_hour=usd, all_in_kw_per_gpu=kw,
                             source=_field(where, row, "source", str), date=_field(where, row, "date", str),
                             note=str(row.get("note", "")), origin=str(path))
    return rows, tier


def load_price_sheet(path: str | Path | None = None) -> PriceSheet:
    """The shipped sheet, with the rows of the user's file at `path` (same format) replacing those of its GPUs."""
    rows, tier = _read_sheet(PRICES_PATH)
    paths = [str(PRICES_PATH)]
    if path is not None:
        user_rows, user_tier = _read_sheet(Path(path))
        rows = {**rows, **user_rows}
        tier = user_tier or tier
        paths.append(str(path))
    return PriceSheet(rows=rows, default_tier=tier or DEFAULT_TIER, paths=tuple(paths))


# ------------------------------------------------------------------------------------------------------- pricing


@dataclass
class Pricing:
    """What a roll-up point is priced with, and where each figure came from (or why it is missing)."""

    usd_per_gpu_hour: float | None = None
    price_source: str | None = None
    price_reason: str | None = None  # why usd_per_gpu_hour is None
    published_kw_per_gpu: float | None = None
    published_kw_source: str | None = None
    host_overhead: float | None = None  # all-in power / measured GPU power, stated by the user
    usd_per_kwh: float | None = None
    pue: float = 1.0
    notes: list[str] = field(default_factory=list)

    def all_in_kw(self, gpu_power_w: float | None) -> tuple[float | None, str]:
        """(all-in kW per GPU, its label) or (None, why): measured power x stated overhead, else published."""
        if self.host_overhead is not None and gpu_power_w is not None:
            kw = all_in_kw_from_measured(gpu_power_w, self.host_overhead)
            return kw, f"measured GPU power {gpu_power_w:.0f} W x stated overhead {self.host_overhead:g}"
        if self.published_kw_per_gpu is not None:
            return self.published_kw_per_gpu, str(self.published_kw_source)
        if self.host_overhead is not None:
            return None, "an overhead was stated but the GPU power is not measured (no J/token)"
        return None, "no published all-in kW for this GPU; state one (--all-in-kw) or an overhead on measured power"


def pricing_for(gpu: str, *, sheet: PriceSheet | None = None, tier: str | None = None,
                usd_per_gpu_hour: float | None = None, all_in_kw_per_gpu: float | None = None,
                host_overhead: float | None = None, usd_per_kwh: float | None = None, pue: float = 1.0) -> Pricing:
    """The pricing of `gpu` (a spec-table key): stated figures first, then the price sheet's row (`sheet` None: the
    shipped sheet)."""
    p = Pricing(pue=check_positive("pue", pue))
    if pue < 1.0:
        raise ValueError(f"pue: expected >= 1 (facility energy over IT energy), got {pue!r}")
    if host_overhead is not None:
        p.host_overhead = check_positive("host_overhead", host_overhead)
        if p.host_overhead < 1.0:
            raise ValueError(f"host_overhead: expected >= 1 (all-in power over GPU power), got {host_overhead!r}")
    if usd_per_kwh is not None:
        p.usd_per_kwh = check_positive("usd_per_kwh", usd_per_kwh)
    sheet = sheet if sheet is not None else load_price_sheet()
    row = sheet.row(gpu)
    tier = tier or sheet.default_tier
    if usd_per_gpu_hour is not None:
        p.usd_per_gpu_hour = check_positive("usd_per_gpu_hour", usd_per_gpu_hour)
        p.price_source = "stated by the user"
    elif row is None:
        p.price_reason = (f"GPU {gpu!r} has no row in the price sheet (rows: {', '.join(sorted(sheet.rows))}); "
                          "state a price (--usd-per-gpu-hour)")
    elif tier not in row.usd_per_gpu_hour:
        raise ValueError(f"tier: expected one of {sorted(row.usd_per_gpu_hour)} for {gpu} in {row.origin}, "
                         f"got {tier!r}")
    else:
        p.usd_per_gpu_hour = row.usd_per_gpu_hour[tier]
        p.price_source = f"{row.source} ({tier}, {row.date})"
    if all_in_kw_per_gpu is not None:
        p.published_kw_per_gpu = check_positive("all_in_kw_per_gpu", all_in_kw_per_gpu)
        p.published_kw_source = "stated by the user"
    elif row is not None and row.all_in_kw_per_gpu is not None:
        p.published_kw_per_gpu = row.all_in_kw_per_gpu
        p.published_kw_source = f"published all-in kW per GPU: {row.source} ({row.date})"
    return p


@dataclass
class PriceOptions:
    """How to price the points of a roll-up, whatever GPU they are on: a sheet, a tier and stated overrides."""

    sheet: PriceSheet | None = None  # None: the shipped sheet
    tier: str | None = None  # None: the sheet's default tier
    usd_per_gpu_hour: float | None = None
    all_in_kw_per_gpu: float | None = None
    host_overhead: float | None = None
    usd_per_kwh: float | None = None
    pue: float = 1.0

    def for_gpu(self, gpu: str) -> Pricing:
        sheet = self.sheet if self.sheet is not None else load_price_sheet()
        return pricing_for(gpu, sheet=sheet, tier=self.tier, usd_per_gpu_hour=self.usd_per_gpu_hour,
                           all_in_kw_per_gpu=self.all_in_kw_per_gpu, host_overhead=self.host_overhead,
                           usd_per_kwh=self.usd_per_kwh, pue=self.pue)
