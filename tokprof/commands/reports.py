"""`tokprof report`, `compare`, `history`: reports, the regression gate and run history (issue 6)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tokprof.commands._app import DB_HELP, app, check_output, console, fail


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="RunResult JSON files, one or more."),  # noqa: B008 - typer
    out: Path = typer.Option(Path("tokprof-report"), "-o", "--out",  # noqa: B008 - typer reads defaults
                             help="Folder for report.md, report.html and the PNGs."),
) -> None:
    """Write report.md, a self-contained report.html (images embedded) and PNG figures from RunResult files."""
    from rich.markup import escape

    from tokprof.reports.render import render_report

    check_output("--out", out, folder=True)
    try:
        result = render_report(runs, out)
    except ValueError as err:
        fail(str(err))
    console.print(f"wrote {result.markdown}, {result.html} and {len(result.figures)} figure(s) in {out}")
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
) -> None:
    """Regression gate: SAME / FAST / SLOW / AMBIGUOUS per kernel and roll-up point (exit 1 on SLOW, 2 on bad input)."""
    from tokprof.profiler.schema import load_run
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
        if record:
            History(db).record_run(load_run(runs[-1]), runs[-1])
    except (CompareInputError, HistoryDatabaseError, ValueError) as err:
        fail(str(err))
    text = result.to_markdown()
    print(text)  # plain print: the markdown's brackets are not rich markup
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    raise typer.Exit(result.exit_code)


@app.command()
def history(
    gpu: str | None = typer.Option(None, help="Only runs whose device name or spec key contains this (e.g. h100)."),
    op: str | None = typer.Option(None, help="Show the median-time trend of every measured call of this op."),
    model: str | None = typer.Option(None, help="Only runs of models whose name contains this."),
    db: Path | None = typer.Option(None, help=DB_HELP),  # noqa: B008 - typer reads options from defaults
    record: list[Path] | None = typer.Option(  # noqa: B008 - typer reads options from defaults
        None, "--record", help="Record this RunResult file first (repeatable)."),
    limit: int = typer.Option(40, min=1, help="Most rows per trend table."),
) -> None:
    """Runs recorded in the history database and their trends (last, best, change, sparkline)."""
    from tokprof.profiler.schema import load_run
    from tokprof.reports.document import num
    from tokprof.reports.history import History, HistoryDatabaseError

    hist = History(db)
    try:
        for path in record or []:
            added = hist.record_run(load_run(path), path)
            console.print(f"{'recorded' if added else 'already recorded'}: {path}")
        if not hist.path.exists():
            console.print(f"no history yet at {hist.path}: record runs with `tokprof history --record RUN.json`")
            return
        runs = hist.runs(gpu=gpu, model=model)
        kernel_trends = hist.kernel_trends(gpu=gpu, op=op, model=model) if op else []
        point_trends = hist.point_trends(gpu=gpu, model=model)
    except (HistoryDatabaseError, ValueError) as err:
        fail(str(err))
    table = Table(title=f"runs in {hist.path}" + (f" (gpu ~ {gpu})" if gpu else "") + (f" (model ~ {model})"
                                                                                      if model else ""))
    for name in ("run_id", "timestamp (UTC)", "device", "model", "kernels", "points", "git sha", "file"):
        table.add_column(name)
    for r in runs:
        table.add_row(r.run_id, r.timestamp_utc, r.device, r.model or "-", str(r.kernels), str(r.points),
                      r.git_sha or "-", r.source or "-")
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
            t.add_row(tr.item, tr.device, tr.metric, str(len(tr.values)), num(tr.last), num(tr.best),
                      f"{prev:+.1%}" if prev is not None else "-", f"{best:+.1%}" if best is not None else "-",
                      tr.spark)
        console.print(t)
    if not op:
        console.print("[dim]kernel trends: add --op OP (e.g. --op linear)[/]")
