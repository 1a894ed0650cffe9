"""The report's figures as PNG files: roofline, iceberg waterfall, throughput-interactivity with cost isolines, and
per-op share of step time.

Each function takes plain records (built by render.py from RunResult files), draws one figure with a title, axis
labels and units, writes a PNG at a modest dpi (the HTML report embeds it) and returns the path. Figures are drawn
on matplotlib's Agg canvas directly (no pyplot, no display, no global figure state), so they work on a headless
machine and from several threads.

    roofline_chart("roofline.png", title=..., points=[RoofPoint(...)], roofs=[Roof("measured", 3000.0, 798.0)])
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # explicit: reports are rendered on machines without a display

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tokprof.reports.document import num  # noqa: E402

DPI = 80  # ~640x400 px per figure: readable, and the self-contained HTML stays a few hundred KB
PROVENANCE_STYLE = {
    "measured": {"color": "#1f77b4", "marker": "o", "linestyle": "-"},
    "modelled": {"color": "#7f7f7f", "marker": "s", "linestyle": ":"},
    "projected": {"color": "#9467bd", "marker": "^", "linestyle": "--"},
}
_UNKNOWN_STYLE = {"color": "#d62728", "marker": "x", "linestyle": "-."}


def _style(provenance: str) -> dict[str, str]:
    return PROVENANCE_STYLE.get(provenance, _UNKNOWN_STYLE)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _title(text: str, width_in: float, fontsize: float = 10.0) -> str:
    """`text` wrapped to the figure's width (about 0.55 em per character), so that no title runs off a figure."""
    return textwrap.fill(text, max(20, int(width_in * 72 / (0.55 * fontsize))))


def _colors(n: int) -> list[tuple[float, float, float, float]]:
    cmap = matplotlib.colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


# ---------------------------------------------------------------------------------------------------- roofline


@dataclass
class RoofPoint:
    """One measured kernel call: where it sits (intensity FLOP/byte, achieved TFLOP/s)."""

    label: str  # legend group, e.g. the op name
    intensity_flop_per_byte: float
    tflops: float
    suspicious: bool = False
    tag: str = ""  # printed beside the point: what tells calls of one op apart (e.g. "B=64", "M=8 N=4096")


@dataclass
class Roof:
    """One set of ceilings: memory bandwidth (GB/s) and compute (TFLOP/s); either may be unknown (None)."""

    name: str  # "measured" | "datasheet"
    bandwidth_gbps: float | None
    tflops: float | None
    detail: str = ""

    @property
    def ridge_flop_per_byte(self) -> float | None:
        if self.bandwidth_gbps is None or self.tflops is None:
            return None
        return self.tflops * 1e12 / (self.bandwidth_gbps * 1e9)


def roofline_chart(path: str | Path, *, title: str, points: Sequence[RoofPoint], roofs: Sequence[Roof]) -> Path:
    """Log-log roofline: each kernel a point, each roof a line, memory- and compute-bound regions shaded."""
    if not points:
        raise ValueError("points: expected at least one kernel with positive intensity and TFLOP/s, got none")
    xs = [p.intensity_flop_per_byte for p in points]
    ys = [p.tflops for p in points]
    ridges = [r.ridge_flop_per_byte for r in roofs if r.ridge_flop_per_byte is not None]
    x_lo, x_hi = min(xs + ridges) / 4.0, max(xs + ridges) * 4.0
    peaks = [r.tflops for r in roofs if r.tflops is not None]
    y_hi = max(ys + peaks) * 2.5
    y_lo = min(ys) / 4.0

    fig = Figure(figsize=(10.0, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)

    # Shade by the first roof with both ceilings (render.py passes the measured one first): this machine's ridge.
    shade = next((r for r in roofs if r.ridge_flop_per_byte is not None), None)
    if shade is not None:
        ridge = shade.ridge_flop_per_byte
        ax.axvspan(x_lo, ridge, color="#1f77b4", alpha=0.08, lw=0)
        ax.axvspan(ridge, x_hi, color="#ff7f0e", alpha=0.08, lw=0)
        ax.text(x_lo * 1.3, y_hi / 1.8, f"memory-bound\n(left of the {shade.name} ridge,\n{ridge:.3g} FLOP/byte)",
                fontsize=7, va="top", color="#1f4e79")
        ax.text(x_hi / 1.3, y_hi / 1.8, "compute-bound", fontsize=7, va="top", ha="right", color="#8a4500")

    grid = [x_lo * (x_hi / x_lo) ** (i / 200) for i in range(201)]
    for roof, ls in zip(roofs, ("-", "--", ":", "-."), strict=False):
        if roof.bandwidth_gbps is None and roof.tflops is None:
            continue
        line = [min(roof.tflops if roof.tflops is not None else math.inf,
                    roof.bandwidth_gbps * 1e9 * x / 1e12 if roof.bandwidth_gbps is not None else math.inf)
                for x in grid]
        parts = []
        if roof.bandwidth_gbps is not None:
            parts.append(f"{num(roof.bandwidth_gbps)} GB/s")
        if roof.tflops is not None:
            parts.append(f"{num(roof.tflops)} TFLOP/s")
        label = f"{roof.name} roof ({', '.join(parts)})" + (f" {roof.detail}" if roof.detail else "")
        ax.plot(grid, line, color="black", linestyle=ls, lw=1.4, label=label)

    labels = list(dict.fromkeys(p.label for p in points))
    for label, color in zip(labels, _colors(len(labels)), strict=True):
        group = [p for p in points if p.label == label]
        ax.scatter([p.intensity_flop_per_byte for p in group], [p.tflops for p in group], s=22, color=color,
                   edgecolors="black", linewidths=0.4, label=label, zorder=3)
    # Each point's tag beside it; points at the same place share one label, and labels alternate above and below
    # so that neighbours do not print over each other.
    tags: dict[tuple[float, float], list[str]] = {}
    for p in points:
        if p.tag:
            spot = (round(math.log10(p.intensity_flop_per_byte), 2), round(math.log10(p.tflops), 2))
            tags.setdefault(spot, [])
            if p.tag not in tags[spot]:
                tags[spot].append(p.tag)
    for i, ((lx, ly), names) in enumerate(sorted(tags.items())):
        text = ", ".join(names) if len(names) <= 2 else f"{names[0]}, +{len(names) - 1}"
        ax.annotate(text, (10**lx, 10**ly), textcoords="offset points", xytext=(4, 4 if i % 2 == 0 else -8),
                    fontsize=5.5, color="#333333", zorder=5)
    bad = [p for p in points if p.suspicious]
    if bad:
        ax.scatter([p.intensity_flop_per_byte for p in bad], [p.tflops for p in bad], s=90, facecolors="none",
                   edgecolors="red", linewidths=1.2, label="suspicious (>100% of a ceiling)", zorder=4)
    ax.set_title(_title(title, 7.0), fontsize=10)
    ax.set_xlabel("arithmetic intensity (FLOP/byte, min bytes)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.grid(True, which="major", alpha=0.3)
    # outside the axes: a legend inside would sit on points somewhere
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------- iceberg


INTERCONNECT_LAYER = "L1i"  # tokprof.rollup.reconcile.INTERCONNECT_LAYER's name
LOST_COLOR = {"lost": "#d62728", "interconnect": "#ff7f0e"}
LOST_LABEL = {"lost": "lost to the layer above", "interconnect": "lost to the interconnect (collectives at roof)"}


@dataclass
class Level:
    """One layer of the iceberg: tokens/s per GPU (None when not measured, with the reason)."""

    name: str  # "L0".."L5"
    title: str
    tokens_per_s_per_gpu: float | None
    provenance: str
    gap_name: str | None = None
    reason: str | None = None


def iceberg_chart(path: str | Path, *, title: str, levels: Sequence[Level]) -> Path:
    """Waterfall of tokens/s per GPU from L0 (datasheet) down: each bar a layer, the red part what it lost (orange
    at the interconnect layer L1i of a tensor-parallel point)."""
    known = [lv.tokens_per_s_per_gpu for lv in levels if lv.tokens_per_s_per_gpu is not None]
    if not known:
        raise ValueError("levels: expected at least one layer with tokens_per_s_per_gpu, got none")
    top = max(known)
    fig = Figure(figsize=(8.0, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    prev: float | None = None
    used: set[str] = set()
    for i, lv in enumerate(levels):
        value = lv.tokens_per_s_per_gpu
        if value is None:
            reason = lv.reason or "no value in the run"
            reason = reason if len(reason) <= 90 else reason[:87] + "..."
            ax.text(i, top * 0.04, textwrap.fill(f"n/a: {reason}", 15), ha="center", va="bottom", fontsize=6,
                    color="#555555")
            continue
        style = _style(lv.provenance)
        legend = None if lv.provenance in used else lv.provenance
        used.add(lv.provenance)
        ax.bar(i, value, width=0.6, color=style["color"], alpha=0.85, label=legend)
        if value > 0.12 * top:  # the value inside its bar's top, clear of the red segment above it
            ax.text(i, value * 0.98, f"{value:,.0f}", ha="center", va="top", fontsize=7, color="white")
        else:
            ax.text(i, value, f"{value:,.0f}", ha="center", va="bottom", fontsize=7)
        if prev is not None and prev > value:
            # the interconnect layer (tensor parallelism, L1i) in its own colour: what the all-reduces cost
            lost = "interconnect" if lv.name == INTERCONNECT_LAYER else "lost"
            ax.bar(i, prev - value, bottom=value, width=0.6, color=LOST_COLOR[lost], alpha=0.25, hatch="//",
                   label=None if lost in used else LOST_LABEL[lost])
            used.add(lost)
            gap = textwrap.fill(f"-{(prev - value) / prev:.0%} {lv.gap_name or ''}".strip(), 16)
            if prev - value > 0.15 * top:
                ax.text(i, value + (prev - value) / 2, gap, ha="center", va="center", fontsize=6.5,
                        bbox={"facecolor": "white", "alpha": 0.8, "lw": 0, "pad": 1})
            else:  # too thin to hold text: above its own bar (the bars to the right are lower, so it is free)
                ax.text(i, prev * 1.01, gap, ha="center", va="bottom", fontsize=6)
        elif prev is not None and value > prev:
            ax.text(i, value * 1.04, "above the layer above!", ha="center", fontsize=6.5, color="#d62728")
        prev = value
    ax.set_xlim(-0.6, len(levels) - 0.4)
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels([f"{lv.name}\n{textwrap.fill(lv.title, 14)}" for lv in levels], fontsize=7)
    ax.set_ylim(0, top * 1.32)  # room above the tallest bar for a gap label and the legend
    ax.set_ylabel("tokens/s per GPU")
    ax.set_title(_title(title, 8.0), fontsize=10)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------ throughput-interactivity


@dataclass
class Series:
    """One curve: points (tokens/s per user, tokens/s per GPU, batch) of one (run, GPU, context, provenance)."""

    label: str
    provenance: str
    points: list[tuple[float, float, int]] = field(default_factory=list)
    axes: str = "GPU"  # the panel it is drawn on: "CPU" (a CPU's measured curves) or "GPU"


@dataclass
class Price:
    """A $/GPU-hour whose cost-per-million-token isolines are drawn (horizontal: cost depends on tokens/s/GPU)."""

    usd_per_gpu_hour: float
    label: str


def _nice_levels(lo: float, hi: float, limit: int = 6) -> list[float]:
    """1-2-5 values in [lo, hi], thinned to at most `limit`."""
    if not (lo > 0 and hi > lo):
        return []
    out = [m * 10.0**e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
           for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
    step = max(1, math.ceil(len(out) / limit))
    return out[::step]


def pareto_chart(path: str | Path, *, title: str, series: Sequence[Series], prices: Sequence[Price]) -> Path:
    """tokens/s per GPU (throughput) vs tokens/s per user (interactivity), log-log, with $/M-token isolines.

    Series of different `axes` groups (a CPU's measured curves, the GPUs') get panels of their own: a CPU is two or
    three orders of magnitude slower and would flatten the GPUs' curves. Isolines (priced GPU-hours) go on the GPU
    panel; each cost level is labelled once, with every price that draws it."""
    kept = [s for s in series if any(x > 0 and y > 0 for x, y, _ in s.points)]
    if not kept:
        raise ValueError("series: expected at least one point with positive tokens/s, got none")
    groups = list(dict.fromkeys(s.axes for s in kept))
    color_of = {id(s): c for s, c in zip(kept, _colors(len(kept)), strict=True)}
    width_in = 10.0 if len(groups) == 1 else 13.0
    fig = Figure(figsize=(width_in, 5.2))
    axes = [fig.add_subplot(1, len(groups), k + 1) for k in range(len(groups))]
    for ax, group in zip(axes, groups, strict=True):
        mine = [s for s in kept if s.axes == group]
        pts = [(x, y) for s in mine for x, y, _ in s.points if x > 0 and y > 0]
        x_lo, x_hi = min(p[0] for p in pts) / 1.6, max(p[0] for p in pts) * 1.6
        y_lo, y_hi = min(p[1] for p in pts) / 2.0, max(p[1] for p in pts) * 2.0
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(y_lo, y_hi)
        if group != "CPU":
            _isolines(ax, prices, x_lo, x_hi, y_lo, y_hi)
        for s in mine:
            style = _style(s.provenance)
            ordered = sorted(p for p in s.points if p[0] > 0 and p[1] > 0)
            ax.plot([p[0] for p in ordered], [p[1] for p in ordered], marker=style["marker"],
                    linestyle=style["linestyle"], lw=1.2, ms=5, label=f"{s.label} [{s.provenance}]",
                    color=color_of[id(s)])  # one colour per curve across the panels: the legend is shared
            for x, y, batch in ordered:
                ax.annotate(f"b{batch}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        ax.set_title(f"{group}" if len(groups) > 1 else "", fontsize=9)
        ax.set_xlabel("tokens/s per user (interactivity, 1 / step time)")
        ax.set_ylabel("tokens/s on the CPU (throughput)" if group == "CPU" else "tokens/s per GPU (throughput)")
        ax.grid(True, which="major", alpha=0.3)
        _plain_log_ticks(ax)
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    names = [n for ax in axes for n in ax.get_legend_handles_labels()[1]]
    fig.legend(handles, names, fontsize=6.5, loc="upper left", bbox_to_anchor=(0.8, 0.92), borderaxespad=0)
    fig.suptitle(_title(title, width_in * 0.8), fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.79, 0.95))
    return _save(fig, path)


def _plain_log_ticks(ax: object) -> None:
    """Log axes ticked at 1, 2, 5 x 10^n with plain numbers (1,000 not 10^3) and no minor labels: an axis spanning
    less than a decade otherwise labels every minor tick, over each other."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):  # type: ignore[attr-defined]
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def _isolines(ax: object, prices: Sequence[Price], x_lo: float, x_hi: float, y_lo: float, y_hi: float) -> None:
    """Horizontal $/M-token isolines, a grey dash pattern per price; one label per cost level, at its highest line,
    naming every price that draws it (near-equal prices would otherwise print over each other)."""
    iso_styles = [("#444444", (0, (1, 2))), ("#777777", (0, (4, 2))), ("#444444", (0, (6, 2, 1, 2))),
                  ("#999999", (0, (2, 4)))]
    per_price = max(2, 6 // max(len(prices), 1))
    levels: dict[float, list[tuple[float, Price]]] = {}
    for i, price in enumerate(prices):
        color, dash = iso_styles[i % len(iso_styles)]
        # cost per M tokens = $/h / (tokens/s/GPU * 3600 / 1e6)  =>  tokens/s/GPU = $/h * 1e6 / (3600 * cost)
        k = price.usd_per_gpu_hour * 1e6 / 3600.0
        for cost in _nice_levels(k / y_hi, k / y_lo, limit=per_price):
            ax.axhline(k / cost, color=color, lw=0.8, ls=dash, alpha=0.8)  # type: ignore[attr-defined]
            levels.setdefault(cost, []).append((k / cost, price))
    for cost, lines in levels.items():
        y = max(y for y, _ in lines)
        # "\\$": a bare "$" pair would switch matplotlib into mathtext.
        who = ", ".join(f"{p.label} @ \\${p.usd_per_gpu_hour:g}/h" for _, p in lines)
        ax.text(x_hi / 1.05, y * 1.03, f"\\${cost:g}/M tokens ({who})", fontsize=6,  # type: ignore[attr-defined]
                ha="right", va="bottom", color="#333333", clip_on=True,
                bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 0.5})


# ------------------------------------------------------------------------------------------------ op shares


@dataclass
class ShareGroup:
    """One panel: per-op share of step time (fractions) at each batch size."""

    title: str
    batches: list[int]
    shares: dict[str, list[float]]  # label -> share per batch (same order as batches)


def op_share_chart(path: str | Path, *, title: str, groups: Sequence[ShareGroup]) -> Path:
    """Stacked bars: share of one decode step's time per op, one bar per batch size, one panel per group."""
    if not groups:
        raise ValueError("groups: expected at least one group of op shares, got none")
    totals: dict[str, float] = {}
    for g in groups:
        for label, values in g.shares.items():
            totals[label] = totals.get(label, 0.0) + sum(values)
    labels = sorted(totals, key=lambda k: -totals[k])
    color_of = dict(zip(labels, _colors(len(labels)), strict=True))
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    legend_cols = 3 if ncols >= 2 else 2
    legend_in = 0.2 * math.ceil(len(labels) / legend_cols) + 0.25  # the legend's height, below the panels
    width_in, height_in = 3.3 * ncols + 0.6, 3.4 * nrows + 0.6 + legend_in
    fig = Figure(figsize=(width_in, height_in))
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(len(groups))]
    for ax, g in zip(axes, groups, strict=True):
        bottom = [0.0] * len(g.batches)
        xs = list(range(len(g.batches)))
        for label in labels:
            values = [100.0 * v for v in g.shares.get(label, [0.0] * len(g.batches))]
            ax.bar(xs, values, bottom=bottom, color=color_of[label], width=0.7, edgecolor="white", lw=0.3,
                   label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xticks(xs)
        ax.set_xticklabels([str(b) for b in g.batches])
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel("share of step time (%)")
        ax.set_ylim(0, 105)
        ax.set_title(textwrap.fill(g.title, 40), fontsize=8)
    handles, names = axes[0].get_legend_handles_labels()
    # below the panels, in its own strip: a legend beside or inside them would cover one
    fig.legend(handles, names, fontsize=6.5, loc="lower center", ncol=legend_cols, frameon=False)
    fig.suptitle(_title(title, width_in), fontsize=10)
    fig.tight_layout(rect=(0, legend_in / height_in, 1, 1 - 0.45 / height_in))
    return _save(fig, path)
