"""Report sections for the systems curves: the curve with configuration labels and cost isolines, the factor
waterfall, and the published table reproduced from first principles (markdown + matplotlib PNGs).

    write_curve_section([curve_a, curve_b], "out/")        # out/curve-<system>-<workload>.png, out/systems.md
    reproduce_published(shape, workloads=[Workload(1024, 1024)])   # the seed table's rows on the computed curves
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from tokprof.profiler.schema import save_json_atomic
from tokprof.rollup.curve import Curve, Workload
from tokprof.rollup.factors import Comparison, Scenario, compare_systems, waterfall_png
from tokprof.rollup.model_shape import ModelShape

# the seed table's GPUs -> the system and precision the article's rows describe (Hopper FP8, Blackwell FP4)
PUBLISHED_SYSTEMS = {"h200": ("hgx-h200", "fp8"), "gb300": ("gb300-nvl72", "fp4")}


# A published large-EP decode figure of the same model, to check the curve's scale against (not a fit):
DEEPSEEK_DAY6 = {
    "source": ("DeepSeek, 'Day 6: One More Thing, DeepSeek-V3/R1 Inference System Overview' (github.com/deepseek-ai/"
               "open-infra-index, 2025-03-01): decode ~14.8k output tokens/s per H800 node (1,850 per GPU) at an "
               "average 20-22 tokens/s per user, EP144 over InfiniBand"),
    "tokens_per_s_per_decode_gpu": 1850.0, "tokens_per_s_per_user": 20.0,
    "workload": "4k/1k",  # tokprof's reading: 608B input (56% cache hits) and 168B output tokens a day, ~3.6:1
    "h800_nvlink_gbps_per_direction": 200.0,  # NVIDIA H800 SXM: NVLink 400 GB/s (both directions)
}


def check_deepseek_day6(shape: ModelShape) -> dict[str, Any]:
    """tokprof's HGX H800 (an H100 with NVLink 400 GB/s) curve per decode GPU at DeepSeek's published operating
    point: the ratio modelled / published says how optimistic the uncalibrated MoE step model is."""
    s = Scenario.of("hgx-h100", "fp8")
    s = replace(s, hw=s.hw.with_(nvlink_gbps=DEEPSEEK_DAY6["h800_nvlink_gbps_per_direction"]))
    c = s.curve(shape, Workload.parse(DEEPSEEK_DAY6["workload"]))
    ok = [p for p in c.points if p.tokens_per_s_per_user >= DEEPSEEK_DAY6["tokens_per_s_per_user"]]
    best = max(ok, key=lambda p: p.output_tokens_per_s_per_decode_gpu) if ok else None
    value = best.output_tokens_per_s_per_decode_gpu if best else None
    return {"source": DEEPSEEK_DAY6["source"], "workload": DEEPSEEK_DAY6["workload"],
            "published_tokens_per_s_per_decode_gpu": DEEPSEEK_DAY6["tokens_per_s_per_decode_gpu"],
            "modelled_tokens_per_s_per_decode_gpu": value, "config": best.label if best else None,
            "modelled_over_published": value / DEEPSEEK_DAY6["tokens_per_s_per_decode_gpu"] if value else None}


def curve_png(curve: Curve, path: str | Path, labels: int = 8) -> str:
    """Every feasible point (grey), the Pareto frontier (line) with up to `labels` configuration names, and $/M
    isolines (constant tokens/s per GPU at the system's price)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.scatter([p.tokens_per_s_per_user for p in curve.points], [p.output_tokens_per_s_per_gpu for p in curve.points],
               s=4, color="#cccccc", label="feasible configurations")
    f = curve.frontier
    ax.plot([p.tokens_per_s_per_user for p in f], [p.output_tokens_per_s_per_gpu for p in f], "-o", ms=3,
            color="#264653", label="Pareto frontier")
    step = max(1, len(f) // labels)
    for p in f[::step]:
        ax.annotate(p.label, (p.tokens_per_s_per_user, p.output_tokens_per_s_per_gpu), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    price = next((p.usd_per_million_tokens * p.output_tokens_per_s_per_gpu * 3600 / 1e6 for p in curve.points
                  if p.usd_per_million_tokens), None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if price and f:
        lo, hi = ax.get_ylim()
        for usd in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10):
            tps = price / (usd * 3600 / 1e6)
            if lo < tps < hi:
                ax.axhline(tps, color="#e76f51", lw=0.6, ls="--")
                ax.text(ax.get_xlim()[0], tps, f" ${usd:g}/M", fontsize=7, color="#e76f51", va="bottom")
    ax.set_xlabel("tokens/s per user (decode speed)")
    ax.set_ylabel("output tokens/s per GPU (all GPUs, prefill included)")
    ax.set_title(f"{curve.model} {curve.workload} {curve.precision} on {curve.system} ({curve.provenance})", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _fmt(x: float | None, money: bool = False) -> str:
    if x is None:
        return "-"
    return f"${x:.3f}" if money else f"{x:,.1f}"


def curve_markdown(curve: Curve, png: str | None = None) -> list[str]:
    lines = [f"### {curve.model} {curve.workload} {curve.precision} on {curve.system} ({curve.provenance})", ""]
    if png:
        lines += [f"![curve]({Path(png).name})", ""]
    lines += ["| configuration | tokens/s/user | out tok/s/GPU (all) | per decode GPU | $/M | tok/s/MW | a2a link | "
              "label |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for p in curve.frontier:
        lines.append(f"| {p.label} | {p.tokens_per_s_per_user:,.1f} | {p.output_tokens_per_s_per_gpu:,.1f} | "
                     f"{p.output_tokens_per_s_per_decode_gpu:,.1f} | {_fmt(p.usd_per_million_tokens, True)} | "
                     f"{_fmt(p.tokens_per_s_per_mw)} | {p.a2a_link} | {p.provenance} |")
    lines += ["", "Sources: " + "; ".join(f"{k}: {v}" for k, v in curve.sources.items()), ""]
    return lines


def comparison_markdown(cmp: Comparison, png: str | None = None) -> list[str]:
    a, b = cmp.a, cmp.b
    lines = [f"### {b['system']} vs {a['system']} at {cmp.tokens_per_s_per_user:g} tokens/s per user "
             f"({cmp.model} {cmp.workload})", ""]
    for s in (a, b):
        lines.append(f"- {s['system']} {s['precision']} ({s['provenance']}): "
                     + (f"{s['best']['label']}: {s['output_tokens_per_s_per_gpu']:,.1f} tokens/s per GPU, "
                        f"{_fmt(s['usd_per_million_tokens'], True)}/M, {_fmt(s['tokens_per_s_per_mw'])} tokens/s per "
                        "MW" if s["best"] else s.get("reason", "no point")))
    lines += [f"- ratio B/A: {cmp.ratio:.2f}x" if cmp.ratio else "- ratio: none", ""]
    if png:
        lines += [f"![waterfall]({Path(png).name})", ""]
    lines += ["| factor | x (this order) | x (reverse order) | x (Shapley) | note |", "|---|---:|---:|---:|---|"]
    ex = lambda v: "-" if v is None else f"{math.exp(v):.3f}"  # noqa: E731
    for s in cmp.steps:
        lines.append(f"| {s.name} | {ex(s.log_ratio)} | {ex(s.reverse_log_ratio)} | {ex(s.shapley_log_ratio)} | "
                     f"{s.note} |")
    return lines + ["", *cmp.notes, ""]


def reproduce_published(shape: ModelShape, workloads: list[Workload] | None = None, tokens_per_s_per_user:
                        float | None = None, shapley: bool = False, out: str | Path | None = None) -> dict[str, Any]:
    """The seed table's rows (tokprof/data/published_tables.json) on tokprof's curves: where each printed
    tokens/s per GPU sits (the highest interactivity still giving it, on both readings of 'per GPU'), whether any
    configuration reaches it, and the decomposition of the two rows' ratio at one interactivity."""
    from tokprof.rollup.published import load_published_tables

    workloads = workloads or [Workload(1024, 1024), Workload(8192, 1024)]
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    table = load_published_tables()[0]
    rows = [r for r in table["rows"] if r.get("gpu") in PUBLISHED_SYSTEMS]
    result: dict[str, Any] = {"table": table["name"], "model": shape.name, "rows": [], "comparisons": []}
    lines = [f"## Published table from first principles: {table['name']} ({shape.name})", "",
             "The article prints no model, workload or interactivity for its rows; tokprof reads them as "
             f"{shape.name}, each workload below, Hopper FP8 and Blackwell FP4, and 'tokens/s per GPU' as output "
             "tokens over all GPUs (prefill pool included) - the per-decode-GPU reading is shown too.", ""]
    scen = {g: Scenario.of(*PUBLISHED_SYSTEMS[g]) for g in {r["gpu"] for r in rows}}
    for wl in workloads:
        curves = {g: s.curve(shape, wl) for g, s in scen.items()}
        at = {}
        for r in rows:
            c, tps = curves[r["gpu"]], float(r["tokens_per_s_per_gpu"]["value"])
            top = max(c.frontier, key=lambda p: p.output_tokens_per_s_per_gpu) if c.frontier else None
            dec = [p for p in c.frontier if p.output_tokens_per_s_per_decode_gpu >= tps]
            ui = c.interactivity_at(tps)
            entry = {"row": r["label"], "workload": wl.label, "system": c.system, "precision": c.precision,
                     "published_tokens_per_s_per_gpu": tps, "tokens_per_s_per_user_all_gpus": ui,
                     "tokens_per_s_per_user_per_decode_gpu": max((p.tokens_per_s_per_user for p in dec), default=None),
                     "curve_max_tokens_per_s_per_gpu": top.output_tokens_per_s_per_gpu if top else None,
                     "curve_max_config": top.label if top else None, "provenance": c.provenance,
                     "math": c.sources.get("math")}
            best_tps = entry["curve_max_tokens_per_s_per_gpu"] or 0.0
            if ui is None:
                entry["reason"] = (f"no configuration tokprof can express reaches {tps:,.0f} tokens/s per GPU on "
                                   f"{c.system} at {wl.label}: its best is {best_tps:,.0f} ({top.label if top else '-'}"
                                   f"): each output token also needs {wl.isl / wl.osl:g} prompt tokens of prefill "
                                   "compute (in the step or in a prefill pool), and the decode step reads the active "
                                   "experts' weights and the KV cache at the stated efficiencies")
            at[r["gpu"]] = ui
            result["rows"].append(entry)
            lines.append(f"- {wl.label} {r['label']}: {tps:,.0f} tokens/s per GPU sits at "
                         + (f"{ui:,.1f} tokens/s per user (all GPUs); "
                            if ui is not None else f"NO point of the curve: {entry['reason']}; ")
                         + f"curve max {best_tps:,.0f} ({entry['curve_max_config']})")
        # compare at 50 tokens/s per user and where the H200 row sits (the GB300 row's interactivity may be beyond the
        # H200 curve's fastest point: then no ratio exists there)
        sits = at.get("h200")
        targets = [tokens_per_s_per_user] if tokens_per_s_per_user else sorted({50.0, *([sits] if sits else [])})
        pub = rows[1]["tokens_per_s_per_gpu"]["value"] / rows[0]["tokens_per_s_per_gpu"]["value"]
        for target in targets if len(scen) == 2 else []:
            cmp = compare_systems(shape, scen["h200"], scen["gb300"], wl, target, shapley=shapley)
            d = cmp.to_dict()
            d["published_ratio"] = pub
            d["published_over_computed"] = pub / cmp.ratio if cmp.ratio else None
            result["comparisons"].append(d)
            png = None
            if out is not None:
                png = waterfall_png(cmp, str(Path(out) / f"waterfall-published-{wl.label.replace('/', '-')}-"
                                                         f"{target:.0f}.png"), published_ratio=pub)
            if cmp.ratio:
                gap = (f"the published ratio is {pub / cmp.ratio:.1f}x the computed one: that part is not reached by "
                       "any factor tokprof models" if pub > cmp.ratio else
                       f"tokprof's ratio exceeds the published one by {cmp.ratio / pub:.2f}x")
            else:
                gap = "no ratio: one system reaches no configuration at this interactivity"
            lines += ["", *comparison_markdown(cmp, png),
                      f"Published ratio {pub:.1f}x vs computed {cmp.ratio or float('nan'):.2f}x at {target:g} tokens/s "
                      f"per user: {gap}.", ""]
    lines += ["Both systems may use disaggregation and MTP here, so those factors are 1.0; `tokprof compare-systems "
              "--a-no-disagg --a-mtp 0` attributes them when the baseline serves without them.", ""]
    day6 = check_deepseek_day6(shape)
    result["scale_check"] = day6
    if day6["modelled_over_published"]:
        lines += [f"Scale check: {day6['source']}. tokprof's HGX H800 curve ({day6['workload']}) gives "
                  f"{day6['modelled_tokens_per_s_per_decode_gpu']:,.0f} tokens/s per decode GPU at >= 20 tokens/s per "
                  f"user ({day6['config']}): {day6['modelled_over_published']:.2f}x the published 1,850. The MoE step "
                  "model is not calibrated on a measured MoE run (no expert imbalance, no kernel inefficiency beyond "
                  "the dense calibration): read absolute tokens/s per GPU with that factor in mind; ratios between "
                  "systems carry less of it.", ""]
    result["markdown"] = "\n".join(lines)
    if out is not None:
        (Path(out) / "published-systems.md").write_text(result["markdown"] + "\n")
        save_json_atomic({k: v for k, v in result.items() if k != "markdown"}, Path(out) / "published-systems.json")
    return result
