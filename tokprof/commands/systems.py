"""`tokprof systems`, `tokprof curve`, `tokprof compare-systems`: serving systems from their parts (issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from tokprof.commands._app import app, check_output, console, fail, quiet_console, split_csv

MODEL_HELP = "Model preset or HF config.json (default deepseek-r1)."
WORKLOAD_HELP = ("ISL/OSL tokens, e.g. 1k/1k, 8k/1k, 1k/8k, or a mix of request kinds with their fractions, "
                 "e.g. 1k/1k:0.7,8k/1k:0.3 (served mean-field).")


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in label)


def _features(no_disagg: bool, mtp: str | None, max_gpus: int):
    from tokprof.rollup.curve import MTP_DEPTHS, Features

    if max_gpus < 1:
        fail(f"--max-gpus: expected a positive int, got {max_gpus}")
    depths = MTP_DEPTHS
    if mtp is not None:
        try:
            depths = tuple(sorted({int(x) for x in split_csv(mtp)}))
        except ValueError:
            fail(f"--mtp: expected draft lengths such as 0,1,2,3, got {mtp!r}")
        if not depths or min(depths) < 0 or max(depths) > 8:
            fail(f"--mtp: expected draft lengths between 0 and 8, got {mtp!r}")
    return Features(disaggregation=not no_disagg, mtp_depths=depths, max_gpus=max_gpus)


def _scenario(text: str, features, option: str, run: str | None = None):
    from tokprof.rollup.factors import Scenario

    system, _, precision = text.partition(":")
    try:
        return Scenario.of(system, precision or "fp8", features, run=run)
    except ValueError as err:
        fail(f"{option}: {err}")


@app.command("systems")
def systems_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of the tables."),
) -> None:
    """The serving systems tokprof knows (tokprof/data/systems.json): GPU, scale-up domain, links, price, power."""
    from tokprof.rollup.systems import load_systems

    out_console = quiet_console() if as_json else console

    table = Table(title="serving systems (per GPU; GB/s per direction)")
    for col in ("system", "gpu", "domain", "scale-up", "scale-out", "$/GPU-h", "kW all-in"):
        table.add_column(col)
    rows = []
    for s in load_systems().values():
        table.add_row(s.key, s.gpu + ("" if s.spec else " (no spec row)"), str(s.gpus_per_domain),
                      f"{s.scale_up.gbps_per_direction:g} {escape(s.scale_up.what)}",
                      f"{s.scale_out.gbps_per_direction:g} {escape(s.scale_out.what)}",
                      "-" if s.usd_per_gpu_hour is None else f"{s.usd_per_gpu_hour:.2f}",
                      "-" if s.all_in_kw_per_gpu is None else f"{s.all_in_kw_per_gpu:.2f}")
        rows.append({"key": s.key, "gpu": s.gpu, "gpus_per_domain": s.gpus_per_domain,
                     "scale_up_gbps_per_direction": s.scale_up.gbps_per_direction,
                     "scale_out_gbps_per_direction": s.scale_out.gbps_per_direction,
                     "usd_per_gpu_hour": s.usd_per_gpu_hour, "price_source": s.price_source,
                     "all_in_kw_per_gpu": s.all_in_kw_per_gpu, "power_source": s.power_source,
                     "scale_up_source": s.scale_up.source, "scale_out_source": s.scale_out.source})
    out_console.print(table)
    for s in load_systems().values():
        out_console.print(f"[dim]{escape(s.key)}: scale-up {escape(s.scale_up.source)}; scale-out "
                          f"{escape(s.scale_out.source)}; price {escape(s.price_source)}[/]")
    if as_json:
        print(json.dumps({"command": "systems", "systems": rows}))


@app.command()
def curve(
    system: str = typer.Option("hgx-h200", "--system", help="System key or short name (h200, gb300, ...)."),
    model: str = typer.Option("deepseek-r1", "--model", help=MODEL_HELP),
    precision: str = typer.Option("fp8", "--precision", help="bf16, fp8 or fp4 (weights and math)."),
    workload: str = typer.Option("1k/1k", "--workload", help=WORKLOAD_HELP),
    no_disagg: bool = typer.Option(False, "--no-disagg", help="Aggregated serving only."),
    mtp: str | None = typer.Option(None, "--mtp", help="MTP draft lengths to search, e.g. 0 or 0,1,2,3 (default)."),
    max_gpus: int = typer.Option(72, "--max-gpus", help="Largest decode instance (EP width)."),
    report: Path | None = typer.Option(None, "--report", help="Folder for the curve PNG and markdown section."),  # noqa: B008
    all_points: bool = typer.Option(False, "--all-points", help="Every feasible point in the JSON, not only the "
                                    "frontier."),
    run: str | None = typer.Option(None, "--run", help="A measured RunResult of this system's GPU: its kernels' "
                                   "efficiency curves anchor the curve (labelled projected)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of the tables."),
) -> None:
    """Output tokens/s per GPU vs tokens/s per user for a model on a system: every serving configuration searched
    (TP, EP, DP attention, MTP, aggregated or disaggregated, capacity), the Pareto frontier, $/M and tokens/s per MW."""
    from tokprof.rollup.curve import Workload
    from tokprof.rollup.model_shape import shape_for
    from tokprof.rollup.systems_report import curve_markdown, curve_png

    check_output("--report", report, folder=True)
    out_console = quiet_console() if as_json else console
    feats = _features(no_disagg, mtp, max_gpus)
    try:
        shape, shape_source = shape_for(model)
        wl = Workload.parse(workload)
        scen = _scenario(system, feats, "--system", run)
        from dataclasses import replace

        scen = replace(scen, precision=precision)
        c = scen.curve(shape, wl)
    except ValueError as err:
        fail(str(err))
    table = Table(title=f"{c.model} {c.workload} {c.precision} on {c.system}: Pareto frontier ({c.provenance})")
    for col in ("configuration", "tok/s/user", "tok/s/GPU all", "per decode GPU", "$/M", "tok/s/MW", "a2a"):
        table.add_column(col, justify="left" if col in ("configuration", "a2a") else "right")
    for p in c.frontier:
        table.add_row(p.label, f"{p.tokens_per_s_per_user:,.1f}", f"{p.output_tokens_per_s_per_gpu:,.0f}",
                      f"{p.output_tokens_per_s_per_decode_gpu:,.0f}",
                      "-" if p.usd_per_million_tokens is None else f"{p.usd_per_million_tokens:.3f}",
                      "-" if p.tokens_per_s_per_mw is None else f"{p.tokens_per_s_per_mw:,.0f}", p.a2a_link)
    out_console.print(table)
    out_console.print(f"[dim]every figure {c.provenance}; tokens/s per GPU 'all' counts the prefill pool, 'per decode "
                  f"GPU' does not; model: {escape(shape_source)}[/]")
    for k, v in c.sources.items():
        out_console.print(f"[dim]{escape(k)}: {escape(v)}[/]")
    out = {"command": "curve", **c.to_dict(all_points=all_points), "model_source": shape_source}
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        png = curve_png(c, report / f"curve-{c.system}-{_slug(c.workload)}.png")
        (report / f"curve-{c.system}-{_slug(c.workload)}.md").write_text(
            "\n".join(curve_markdown(c, png)) + "\n")
        out["report"] = str(report)
        out_console.print(f"report: {escape(str(report))}")
    if as_json:
        print(json.dumps(out))


@app.command("compare-systems")
def compare_systems_cmd(
    a: str = typer.Option("hgx-h200:fp8", "--a", help="System A as SYSTEM:PRECISION."),
    b: str = typer.Option("gb300-nvl72:fp4", "--b", help="System B as SYSTEM:PRECISION."),
    interactivity: float = typer.Option(50.0, "--interactivity", help="tokens/s per user to compare at."),
    model: str = typer.Option("deepseek-r1", "--model", help=MODEL_HELP),
    workload: str = typer.Option("1k/1k", "--workload", help=WORKLOAD_HELP),
    a_no_disagg: bool = typer.Option(False, "--a-no-disagg", help="A serves aggregated only."),
    a_mtp: str | None = typer.Option(None, "--a-mtp", help="A's MTP draft lengths (e.g. 0: no MTP)."),
    shapley: bool = typer.Option(False, "--shapley", help="Also average each factor over all orders (2^n curves "
                                 "for the n factors that differ; slower)."),
    report: Path | None = typer.Option(None, "--report", help="Folder for the waterfall PNG and markdown."),  # noqa: B008
    a_run: str | None = typer.Option(None, "--a-run", help="A measured RunResult of A's GPU anchoring A's curve."),
    b_run: str | None = typer.Option(None, "--b-run", help="A measured RunResult of B's GPU anchoring B's curve."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of the tables."),
) -> None:
    """Iso-interactivity comparison of two systems: each one's best tokens/s per GPU, $/M and tokens/s per MW at the
    stated tokens/s per user, the ratio, and the ratio decomposed into factors (a waterfall)."""
    from tokprof.rollup.curve import Workload
    from tokprof.rollup.factors import compare_systems
    from tokprof.rollup.model_shape import shape_for
    from tokprof.rollup.systems_report import comparison_markdown, waterfall_png

    check_output("--report", report, folder=True)
    out_console = quiet_console() if as_json else console
    if not interactivity > 0:
        fail(f"--interactivity: expected a positive number of tokens/s per user, got {interactivity}")
    sa = _scenario(a, _features(a_no_disagg, a_mtp, 72), "--a", a_run)
    sb = _scenario(b, _features(False, None, 72), "--b", b_run)
    try:
        shape, _ = shape_for(model)
        cmp = compare_systems(shape, sa, sb, Workload.parse(workload), interactivity, shapley=shapley)
    except ValueError as err:
        fail(str(err))
    for s in (cmp.a, cmp.b):
        if s["best"]:
            out_console.print(f"{escape(s['system'])} {s['precision']} ({s['provenance']}): "
                              f"{escape(s['best']['label'])} {s['output_tokens_per_s_per_gpu']:,.0f} tokens/s per GPU")
        else:
            out_console.print(f"[yellow]{escape(s['reason'])}[/]")
    table = Table(title=f"factors of {cmp.ratio:.2f}x" if cmp.ratio else "factors (no ratio)")
    for col in ("factor", "x (order)", "x (reverse)", "x (Shapley)"):
        table.add_column(col, justify="left" if col == "factor" else "right")
    import math

    ex = lambda v: "-" if v is None else f"{math.exp(v):.3f}"  # noqa: E731
    for s in cmp.steps:
        table.add_row(s.name, ex(s.log_ratio), ex(s.reverse_log_ratio), ex(s.shapley_log_ratio))
    out_console.print(table)
    for n in cmp.notes:
        out_console.print(f"[dim]{escape(n)}[/]")
    out = {"command": "compare-systems", **cmp.to_dict()}
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        png = waterfall_png(cmp, str(report / "waterfall.png"))
        (report / "compare-systems.md").write_text("\n".join(comparison_markdown(cmp, png)) + "\n")
        out["report"] = str(report)
        out_console.print(f"report: {escape(str(report))}")
    if as_json:
        print(json.dumps(out))


def published_systems(report: str | None) -> dict:
    """`tokprof published --systems`: the seed table's rows from first principles (printed; returned for the JSON)."""
    from tokprof.rollup.model_shape import shape_for
    from tokprof.rollup.systems_report import reproduce_published

    if report is not None:
        check_output("--report", report, folder=True)
    try:
        shape, source = shape_for("deepseek-r1")
        result = reproduce_published(shape, out=report)
    except ValueError as err:
        fail(str(err))
    console.print(escape(result["markdown"]))
    console.print(f"[dim]model: {escape(source)}[/]")
    return {k: v for k, v in result.items() if k != "markdown"}
