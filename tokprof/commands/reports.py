"""`tokprof report`, `compare`, `history`: reports, the regression gate and run history (issue 6)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from tokprof.commands._app import (
    DB_HELP,
    app,
    check_one_format,
    check_output,
    console,
    err_console,
    fail,
    print_csv,
    quiet_console,
)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="RunResult JSON files, one or more."),  # noqa: B008 - typer
    out: Path = typer.Option(Path("tokprof-report"), "-o", "--out",  # noqa: B008 - typer reads defaults
                             help="Folder for report.md, report.html and the PNGs (its files are overwritten)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (the files written) instead."),
) -> None:
    """Write report.md, a self-contained report.html (images embedded) and PNG figures from RunResult files."""
    from tokprof.reports.render import render_report

    check_output("--out", out, folder=True)
    try:
        result = render_report(runs, out)
    except ValueError as err:
        fail(str(err))
    if as_json:
        print(json.dumps({"command": "report", "markdown": str(result.markdown), "html": str(result.html),
                          "figures": [str(p) for p in result.figures], "omitted": result.omitted}))
        return
    console.print(escape(f"wrote {result.markdown}, {result.html} and {len(result.figures)} figure(s) in {out}"))
    for line in result.omitted:
        console.print(f"[dim]omitted: {escape(line)}[/]")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(  # noqa: B008 - typer reads arguments from defaults
        ..., help="BASE.json NEW.json, or NEW.json alone with --against."),
    threshold: str = typer.Option("5%", help="Smallest change that counts, a percentage: 5% or 5."),
    against: str | None = typer.Option(None, help="Compare NEW.json with the history instead: best (per item) or "
                                                  "last (the latest run on the same device)."),
    db: Path | None = typer.Option(None, help=DB_HELP),  # noqa: B008 - typer reads options from defaults
    out: Path | None = typer.Option(None, "-o", "--out",  # noqa: B008 - typer reads options from defaults
                                    help="Also write the markdown summary to this file."),
    record: bool = typer.Option(False, "--record", help="Record NEW.json in the history after comparing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (verdict rows, counts, notes) instead "
                                 "of the markdown."),
    confirm: bool = typer.Option(True, "--confirm/--no-confirm", help="Re-measure here the kernels not judged SAME, "
                                 "interleaved with anchor kernels, before a SLOW verdict stands (on the new run's "
                                 "device and commit only; see docs/measurement.md)."),
) -> None:
    """Regression gate: SAME / FAST / SLOW / AMBIGUOUS per kernel and roll-up point (exit 1 on SLOW, 2 on bad input)."""
    from tokprof.profiler.schema import load_run, save_text_atomic
    from tokprof.reports.compare import CompareInputError, compare_against_history, compare_files, parse_threshold
    from tokprof.reports.history import History, HistoryDatabaseError

    try:
        fraction = parse_threshold(threshold)
    except ValueError as err:
        fail(str(err))
    check_output("--out", out)  # up front, not after the comparison
    wanted = 1 if against else 2
    if len(runs) != wanted:
        fail(f"runs: expected {'NEW.json alone with --against' if against else 'BASE.json NEW.json'}, got "
             f"{len(runs)} file(s)")
    try:
        if against:
            new = load_run(runs[0])
            result = compare_against_history(new, runs[0], History(db), against, threshold=fraction)
        else:
            result = compare_files(runs[0], runs[1], threshold=fraction)
        if confirm and any(r.gating and r.verdict != "SAME" for r in result.rows):
            from tokprof.reports.confirm import confirm_comparison

            err_console.print("[dim]re-measuring the flagged kernels here, interleaved with anchors ...[/]")
            confirm_comparison(result, load_run(runs[-1]))
        if record:
            History(db).record_run(load_run(runs[-1]), runs[-1])
    except (CompareInputError, HistoryDatabaseError, ValueError) as err:
        fail(str(err))
    try:
        paths = runs if not against else runs[-1:]
        conditions = [w for path in paths for w in run_conditions(load_run(path), path)]
    except ValueError:
        conditions = []
    text = result.to_markdown()
    if conditions:  # the verdict holds for the conditions the runs were made in: say when those were poor
        text += "\n" + "\n".join(f"> Caution: {w}" for w in conditions) + "\n"
    if as_json:
        print(json.dumps({"command": "compare", "exit_code": result.exit_code, "base": result.base_ref,
                          "new": result.new_ref, "cross_generation": result.cross_generation,
                          "threshold": result.threshold, "counts": result.counts(),
                          "rows": [dataclasses.asdict(r) for r in result.rows], "notes": result.notes,
                          "only_in_base": result.only_in_base, "only_in_new": result.only_in_new,
                          "conditions": conditions}, default=str))
    else:
        print(text)  # plain print: the markdown's brackets are not rich markup
    if out is not None:
        try:
            save_text_atomic(text, out)
        except OSError as err:
            fail(f"--out: cannot write {out} ({err.strerror or err}); the summary is above")
    raise typer.Exit(result.exit_code)


CPU_SHARED_MARK = "the CPU was shared"  # profiler/cpu_load.py's note on a contended CPU run


def run_conditions(run: Any, path: Path) -> list[str]:
    """What makes a run's figures less trustworthy than they look: measured on a shared CPU, or throttled."""
    out = []
    if any(CPU_SHARED_MARK in n for n in run.notes):
        out.append(f"{path.name} was measured on a shared CPU (other processes competed with it): its times are "
                   "slower and noisier than on an idle CPU")
    throttled = sorted({k.op for k in run.kernels if k.timing.throttled})
    if throttled:
        out.append(f"{path.name}: the GPU was throttled (SM clock below 75% of its max) while timing "
                   f"{', '.join(throttled)}")
    return out


@app.command()
def history(
    gpu: str | None = typer.Option(None, help="Only runs whose device name or spec key contains this (e.g. h100)."),
    op: str | None = typer.Option(None, help="Show the median-time trend of every measured call of this op."),
    model: str | None = typer.Option(None, help="Only runs of models whose name contains this."),
    db: Path | None = typer.Option(None, help=DB_HELP),  # noqa: B008 - typer reads options from defaults
    record: list[Path] | None = typer.Option(  # noqa: B008 - typer reads options from defaults
        None, "--record", help="Record this RunResult file first (repeatable)."),
    limit: int = typer.Option(40, min=1, help="Most rows per trend table."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (runs and trends) instead."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the runs as CSV instead (with --op: the kernel trends)."),
) -> None:
    """Runs recorded in the history database and their trends (last, best, change, sparkline)."""
    from tokprof.profiler.schema import load_run
    from tokprof.reports.document import num
    from tokprof.reports.history import History, HistoryDatabaseError

    check_one_format(as_json, as_csv)
    out = quiet_console() if as_json or as_csv else console
    hist = History(db)
    try:
        for path in record or []:
            added = hist.record_run(load_run(path), path)
            out.print(escape(f"{'recorded' if added else 'already recorded'}: {path}"))
        if not hist.path.exists():
            if as_json:
                print(json.dumps({"command": "history", "db": str(hist.path), "runs": [], "kernel_trends": [],
                                  "point_trends": []}))
            elif not as_csv:
                console.print(escape(f"no history yet at {hist.path}: record runs with "
                                     "`tokprof history --record RUN.json`"))
            return
        runs = hist.runs(gpu=gpu, model=model)
        kernel_trends = hist.kernel_trends(gpu=gpu, op=op, model=model) if op else []
        point_trends = hist.point_trends(gpu=gpu, model=model)
    except (HistoryDatabaseError, ValueError) as err:
        fail(str(err))
    if as_json:
        def trend(tr: Any) -> dict[str, Any]:
            return {**dataclasses.asdict(tr), "last": tr.last, "best": tr.best,
                    "delta_vs_previous": tr.delta_vs_previous, "delta_vs_best": tr.delta_vs_best}

        print(json.dumps({"command": "history", "db": str(hist.path), "runs": [dataclasses.asdict(r) for r in runs],
                          "kernel_trends": [trend(t) for t in kernel_trends],
                          "point_trends": [trend(t) for t in point_trends]}))
        return
    if as_csv:
        if op:
            print_csv([{"item": t.item, "device": t.device, "metric": t.metric, "runs": len(t.values), "last": t.last,
                        "best": t.best, "delta_vs_previous": t.delta_vs_previous, "delta_vs_best": t.delta_vs_best}
                       for t in kernel_trends])
        else:
            print_csv([dataclasses.asdict(r) for r in runs])
        return
    table = Table(title=escape(f"runs in {hist.path}" + (f" (gpu ~ {gpu})" if gpu else "")
                               + (f" (model ~ {model})" if model else "")))
    # the run id whole (it is what --against and the report name); the file and sha are what may fold
    for name in ("run_id", "timestamp (UTC)", "device", "model", "kernels", "points", "git sha", "file"):
        table.add_column(name, no_wrap=name in ("run_id", "kernels", "points"),
                         overflow="fold" if name in ("file", "device") else "ellipsis")
    for r in runs:
        table.add_row(escape(r.run_id), r.timestamp_utc.replace("T", " "), escape(r.device), escape(r.model or "-"),
                      str(r.kernels), str(r.points), (r.git_sha or "-")[:10], escape(r.source or "-"))
    console.print(table)
    for title, trends in ((f"kernel trends: {op}", kernel_trends), ("roll-up trends (measured)", point_trends)):
        if not trends:
            continue
        t = Table(title=f"{title}, oldest -> newest" + (f" (first {limit} of {len(trends)})" if len(trends) > limit
                                                          else ""))
        for name in ("item", "device", "metric", "runs", "last", "best", "vs previous", "vs best", "trend"):
            t.add_column(name)
        for tr in trends[:limit]:
            prev, best = tr.delta_vs_previous, tr.delta_vs_best
            t.add_row(escape(tr.item), escape(tr.device), tr.metric, str(len(tr.values)), num(tr.last), num(tr.best),
                      f"{prev:+.1%}" if prev is not None else "-", f"{best:+.1%}" if best is not None else "-",
                      tr.spark)
        console.print(t)
    if not op:
        console.print("[dim]kernel trends: add --op OP (e.g. --op linear)[/]")
