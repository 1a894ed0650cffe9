"""`tokprof fleet`: `tokprof run` on each GPU type through Ray (issue 8)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from tokprof.commands._app import DB_HELP, app, check_output, console, fail, print_wide, split_csv


@app.command()
def fleet(
    gpus: str = typer.Option(..., "--gpus", help="GPU types, comma-separated (h100,h200,b200,a100,...): one Ray task "
                             "each, on a node with one GPU of that type."),
    model: str = typer.Option(..., "--model", help="Preset profiled on every GPU type, e.g. llama-3.1-8b."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster: ray://HOST:10001, HOST:6379 or auto "
                                       "(default: RAY_ADDRESS, else a new local Ray)."),
    out: Path = typer.Option(Path("tokprof-fleet"), "-o", "--out",  # noqa: B008 - typer reads defaults
                             help="Folder for one RunResult per GPU type, compare.md and report/."),
    db: Path | None = typer.Option(None, "--db", help=DB_HELP),  # noqa: B008 - typer reads options from defaults
    record: bool = typer.Option(True, "--record/--no-record", help="Record every RunResult in the history database."),
    task: str = typer.Option("run", "--task", help="What each node runs: run (`tokprof run`) or bottom-up (the kernel "
                             "roll-up only, batch 1 and 8 at context 1024)."),
    timeout_s: float | None = typer.Option(None, "--timeout-s", help="Longest wait for all nodes, s (default: no "
                                           "limit)."),
) -> None:
    """Profile one model on several GPU generations of a Ray cluster; gather the runs, the history and one report."""
    from rich.markup import escape

    from tokprof.fleet import gpu_target, run_fleet, task_by_name
    from tokprof.models.config import ModelConfig

    if timeout_s is not None and not timeout_s > 0:
        fail(f"--timeout-s: expected a positive number of seconds, got {timeout_s}")
    check_output("--out", out, folder=True)  # up front, not after the nodes have run
    check_output("--db", db)
    try:
        ModelConfig.from_name(model)  # here, not on every node of the cluster
        targets = [gpu_target(g) for g in split_csv(gpus)]
        result = run_fleet(targets, model, out, address=address, task=task_by_name(task), db=db, record=record,
                           timeout_s=timeout_s)
    except (ValueError, RuntimeError) as err:
        fail(str(err))
    table = Table(title=f"tokprof fleet: {model} on {', '.join(t.name for t in targets)}")
    for col in ("GPU type", "node", "RunResult or failure"):
        table.add_column(col)
    for t in targets:
        if t.name in result.runs:
            table.add_row(escape(t.name), escape(result.hosts[t.name]), escape(str(result.runs[t.name])))
        else:
            table.add_row(t.name, "-", f"[red]{escape(result.failures.get(t.name, 'no result'))}[/]")
    print_wide(table)
    for note in result.notes:
        console.print(f"[dim]{escape(note)}[/]")
    for what, path in (("compare", result.compare), ("report", result.report)):
        if path is not None:
            console.print(f"{what}: {escape(str(path))}")
    print(json.dumps({"command": "fleet", **result.to_dict()}))
    if result.failures:
        raise typer.Exit(1)
