"""The `tokprof` command line: `tokprof --help` lists the commands.

    tokprof run                     # the main job: ceilings, kernels, roll-up, end to end, iceberg, report
    tokprof kernels                 # ops, backends available here (and why others are not), cost formulas

Each command is a thin layer over the library: parse, call, print (rich tables), write files atomically. The
commands of each area live in tokprof/commands/; this module holds the main job and the entry point.
"""

from __future__ import annotations

import json
import sys

import typer
from rich.table import Table

from tokprof.commands._app import app, bench_device, check_output, console, fail, interrupted


@app.command()
def kernels(
    device: str = typer.Option("cpu", help="Device to check backends on: cpu or cuda[:N]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """List the ops, which backends run on this machine (and why the others do not), and their cost formulas."""
    from tokprof.kernels import OPS

    dev = bench_device(device)  # exit 2 on anything but cpu or cuda[:N] of a GPU torch sees
    rows = {name: {"backends": op.available_backends(dev), "cost_formula": op.cost_formula,
                   "shape": op.shape_doc, "default_shape": dict(op.default_shape), "description": op.description}
            for name, op in OPS.items()}
    if as_json:
        print(json.dumps({"device": str(dev), "ops": rows}))
        return
    table = Table(title=f"tokprof kernels on {dev}", show_lines=True)
    table.add_column("op", style="bold")
    table.add_column("what")
    table.add_column("backends here")
    table.add_column("cost (flops; min bytes)")
    for name, row in rows.items():
        lines = [f"[green]{b}[/]" if why is None else f"[red]{b}[/]: {why}" for b, why in row["backends"].items()]
        table.add_row(name, f"{row['description']}\n[dim]{row['shape']}[/]", "\n".join(lines), row["cost_formula"])
    console.print(table)


# ------------------------------------------------------------------------------------ the main job (issue 7)


@app.command()
def run(
    model: str = typer.Option(None, help="Model preset (default: llama-3.1-8b on a GPU, tiny on the CPU)."),
    out: str = typer.Option("tokprof-out", "--out", "-o", help="Folder for the RunResult, report and plots."),
    device: str = typer.Option("auto", help="auto (a GPU when torch sees one), cpu or cuda[:N]."),
    db: str = typer.Option(None, help="History database (default: TOKPROF_HISTORY_DB or the user's data dir)."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the report (RunResult and history only)."),
    dtype: str = typer.Option(None, "--dtype", help="Weights: the device's default (bf16 on a GPU, fp32 on the CPU) "
                              "or a format: fp8, fp8-block, mxfp4, nvfp4, int4 (activations stay in the default)."),
    kv_dtype: str = typer.Option(None, "--kv-dtype", help="fp8: an e4m3 KV cache."),
) -> None:
    """The whole chain: ceilings, kernel benchmarks of the decode plan, roll-up, end to end, reconciliation, report."""
    from tokprof.runner import run_main

    bench_device(device)  # a GPU that is not there, up front
    check_output("--out", out, folder=True)
    check_output("--db", db)  # the history is written last: a bad path would fail after the whole run
    try:
        run_main(model=model, out_dir=out, device=device, console=console, history_db=db, report=not no_report,
                 dtype=dtype, kv_dtype=kv_dtype)
    except ValueError as err:
        fail(str(err))
    except KeyboardInterrupt:
        interrupted(None)  # run_main has said which file keeps what was measured



# The other commands register on import, after these two, so that `tokprof --help` lists the main job first.
from tokprof.commands import profiler, economics, models, reports, fleet  # noqa: E402, F401, I001


def main() -> None:
    app(prog_name="tokprof")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
