"""The serve-bench report: a markdown page (latency percentiles against request rate, goodput, the simulator beside
the measurement with its errors, the SLO rate and its cost) and a PNG of latency and throughput against rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _num(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def markdown(doc: dict[str, Any]) -> str:
    where = doc.get("gpu") or (doc.get("endpoint") or {}).get("url", "?")
    lines = [f"# serve-bench: {doc['model']} on {where} ({doc.get('mode', '?')})", ""]
    lines.append(f"SLO: {doc['slo_text']}. Step times: {doc.get('step_time', '-')}.")
    if doc.get("cpu_load"):
        lines.append(f"CPU load: {doc['cpu_load']['note']}.")
    reasons = {p["measured"].get("energy_reason") for p in doc["points"] if p.get("measured")} - {None}
    if reasons:
        lines.append("Energy: " + "; ".join(sorted(reasons)) + ".")
    lines += ["", "## Latency and throughput against request rate", "",
              "| rate (req/s) | source | tokens/s/GPU | tokens/s/user | TTFT p50 / p90 / p99 (ms) | "
              "TPOT p50 / p90 (ms) | ITL p90 (ms) | E2E p90 (ms) | goodput (req/s) | SLO met | preemptions | "
              "J/token |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in doc["points"]:
        for side in ("measured", "predicted"):
            s = p.get(side)
            if not s:
                continue
            lines.append(
                f"| {p['rate_per_s']:.3g} | {side} | {s['output_tokens_per_s_per_gpu']:.1f} | "
                f"{_num(s['tokens_per_s_per_user'], '.1f')} | {_ms(s['ttft_s']['p50'])} / {_ms(s['ttft_s']['p90'])} / "
                f"{_ms(s['ttft_s']['p99'])} | {_ms(s['tpot_s']['p50'])} / {_ms(s['tpot_s']['p90'])} | "
                f"{_ms(s['itl_s']['p90'])} | {_ms(s['e2e_s']['p90'])} | {s['goodput_requests_per_s']:.2f} | "
                f"{'yes' if s['slo_met'] else 'no'} | {s['preemptions']} | {_num(s.get('j_per_token'))} |")
    errs = [p for p in doc["points"] if "errors" in p]
    if errs:
        against = (doc.get("validation") or {}).get("against", "the server")
        lines += ["", f"## Simulator against {against}", "",
                  f"Goal: throughput {doc['goal']['throughput']}, median TPOT {doc['goal']['median_tpot']}, p90 TTFT "
                  f"{doc['goal']['p90_ttft']} (relative error of the prediction, signed).", "",
                  "| rate (req/s) | x capacity | throughput | median TPOT | p90 TTFT | within goal | "
                  "steady machine: throughput / TPOT / TTFT | machine speed p10-p90 (max) |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in errs:
            e = p["errors"]
            ok = "yes" if all(p["within_goal"].values()) else "no"
            st = p.get("errors_steady")
            steady = "-" if not st else " / ".join(_pct(st[k]) for k in ("throughput", "median_tpot", "p90_ttft"))
            sp = p.get("speed")
            speed = "-" if not sp else f"{sp['p10']:.2f}-{sp['p90']:.2f} ({sp['max']:.2f})"
            lines.append(f"| {p['rate_per_s']:.3g} | {_num(p.get('fraction_of_capacity'), 'g')} | "
                         f"{_pct(e['throughput'])} | {_pct(e['median_tpot'])} | {_pct(e['p90_ttft'])} | {ok} | "
                         f"{steady} | {speed} |")
        lines += ["", "The prediction follows the machine's speed over each run (the probe's samples over their "
                  "shapes' means; 1.0 = the table's mean machine); the steady column is the same simulation on the "
                  "mean machine."]
        if doc.get("wake"):
            lines.append(f"Waking from idle: {doc['wake']['how']}.")
        v = doc.get("validation")
        if v:
            lines += ["", f"Validation over {v['rates']} rates: {'met' if v['met'] else 'not met'}."]
    causes = [p for p in errs if p.get("causes_measured")]
    if causes:
        lines += ["", "## Where the served time goes (measured runs, against a full batch at the measured step "
                  "time)", "", "| rate (req/s) | " + " | ".join(c["name"] for c in causes[0]["causes_measured"]) + " |",
                  "|---|" + "---|" * len(causes[0]["causes_measured"])]
        for p in causes:
            lines.append(f"| {p['rate_per_s']:.3g} | " + " | ".join(
                f"{c['seconds']:.2f} s ({_num(c['share'], '.0%')})" for c in p["causes_measured"]) + " |")
    s = doc.get("slo_search")
    if s:
        lines += ["", "## Highest request rate that meets the SLO (predicted by the simulator)", ""]
        if s.get("max_rate_per_s") is None:
            lines.append(f"None: {s.get('reason', 'no rate met the SLO')}.")
        else:
            summ = s["summary"]
            cost = s["cost"]
            lines.append(f"{s['max_rate_per_s']:.3g} requests/s: {summ['output_tokens_per_s_per_gpu']:.1f} tokens/s "
                         f"per GPU, TTFT p90 {_ms(summ['ttft_s']['p90'])} ms, "
                         f"TPOT p90 {_ms(summ['tpot_s']['p90'])} ms.")
            usd = cost.get("usd_per_million_tokens")
            mw = cost.get("tokens_per_s_per_mw")
            lines.append(f"Cost at the SLO: {'-' if usd is None else f'${usd:.3g} per million tokens'}"
                         f"{'' if mw is None else f', {mw:.4g} tokens/s per MW'}"
                         f"{'' if not cost.get('reason') else ' (' + cost['reason'] + ')'}.")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> Path | None:
    """Latency percentiles and throughput against request rate, measured (solid) and predicted (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = doc["points"]
    if not points:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    rates = [p["rate_per_s"] for p in points]
    for side, style in (("measured", "-o"), ("predicted", "--x")):
        if not all(side in p for p in points):
            continue
        s = [p[side] for p in points]
        axes[0].plot(rates, [x["ttft_s"]["p90"] * 1e3 for x in s], style, label=f"TTFT p90 ({side})")
        axes[0].plot(rates, [x["ttft_s"]["p50"] * 1e3 for x in s], style, alpha=0.5, label=f"TTFT p50 ({side})")
        axes[1].plot(rates, [(x["tpot_s"]["p50"] or 0) * 1e3 for x in s], style, label=f"TPOT p50 ({side})")
        axes[1].plot(rates, [(x["tpot_s"]["p90"] or 0) * 1e3 for x in s], style, alpha=0.5,
                     label=f"TPOT p90 ({side})")
        axes[2].plot(rates, [x["output_tokens_per_s_per_gpu"] for x in s], style, label=f"tokens/s ({side})")
        axes[2].plot(rates, [x["goodput_tokens_per_s"] for x in s], style, alpha=0.5, label=f"goodput ({side})")
    slo = doc["slo"]
    axes[0].axhline(slo["ttft_s"] * 1e3, color="grey", lw=0.8)
    axes[1].axhline(slo["tpot_s"] * 1e3, color="grey", lw=0.8)
    for ax, title in zip(axes, ("time to first token (ms)", "time per output token (ms)", "output tokens/s per GPU"),
                         strict=True):
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
