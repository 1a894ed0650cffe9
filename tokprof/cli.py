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
from rich.markup import escape
from rich.table import Table

from tokprof.commands._app import (
    DB_HELP,
    app,
    bench_device,
    check_output,
    console,
    fail,
    interrupted,
    parse_int_list,
    split_csv,
)


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
    if console.width < 120:  # a narrow terminal: one block per op, wrapped at words, never cut
        console.print(f"[bold]tokprof kernels on {dev}[/]")
        for name, row in rows.items():
            backends = ", ".join(f"[green]{b}[/]" if why is None else f"[red]{b}[/] ({escape(why)})"
                                 for b, why in row["backends"].items())
            console.print(f"\n[bold]{name}[/]: {escape(row['description'])}")
            console.print(f"  [dim]shape:[/] {escape(row['shape'])}")
            console.print(f"  [dim]backends here:[/] {backends}")
            console.print(f"  [dim]cost:[/] {escape(row['cost_formula'])}")
        return
    table = Table(title=f"tokprof kernels on {dev}", show_lines=True)
    table.add_column("op", style="bold")
    table.add_column("what")
    table.add_column("backends here")
    table.add_column("cost (flops; min bytes)")
    for name, row in rows.items():
        lines = [f"[green]{b}[/]" if why is None else f"[red]{b}[/]: {escape(why)}"
                 for b, why in row["backends"].items()]
        table.add_row(name, f"{escape(row['description'])}\n[dim]{escape(row['shape'])}[/]", "\n".join(lines),
                      escape(row["cost_formula"]))
    console.print(table)


# ------------------------------------------------------------------------------------ the main job (issue 7)


@app.command()
def run(
    model: str = typer.Option(None, "--model", help="Preset or a local Hugging Face directory (default: "
                              "llama-3.1-8b on a GPU, tiny on the CPU)."),
    batch: str | None = typer.Option(None, "--batch", help="Batch sizes, e.g. 1,8,32 (default 1,8,32,128 on a GPU, "
                                     "1,4 on the CPU); measured bottom-up and end to end."),
    context: str | None = typer.Option(None, "--context", help="KV tokens per sequence, e.g. 1k,8k (default 1024,8192 "
                                       "on a GPU, 128,512 on the CPU)."),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default bf16 on a GPU, fp32 on the "
                                     "CPU), or a weight format: fp8, fp8-block, mxfp4, nvfp4, int4 (activations stay "
                                     "in the default)."),
    backend: str | None = typer.Option(None, "--backend", help="Kernel backend: torch, triton or cuda (default triton "
                                       "on a GPU, torch on the CPU)."),
    price_sheet: str | None = typer.Option(None, "--price-sheet", help="Your price sheet (format of "
                                           "tokprof/data/prices.json)."),
    usd_per_gpu_hour: float | None = typer.Option(None, "--usd-per-gpu-hour", help="Stated $ per GPU-hour (overrides "
                                                  "the sheet)."),
    utilisation: float | None = typer.Option(None, "--utilisation", help="Duty cycle served, in (0, 1]: the "
                                             "iceberg's L5 (default: not applied)."),
    skip: str | None = typer.Option(None, "--skip", help="Stages to leave out, comma-separated: e2e, other-gpus, "
                                    "report, history."),
    out: str = typer.Option("tokprof-out", "--out", "-o", help="Folder for the RunResult and report/ (extended: each "
                            "run adds its own file and report folder)."),
    device: str = typer.Option("auto", help="auto (a GPU when torch sees one), cpu or cuda[:N]."),
    db: str = typer.Option(None, help=DB_HELP),
    no_report: bool = typer.Option(False, "--no-report", hidden=True, help="Deprecated: --skip report."),
    kv_dtype: str = typer.Option(None, "--kv-dtype", help="fp8: an e4m3 KV cache."),
) -> None:
    """The whole chain: ceilings, kernel benchmarks of the decode plan, roll-up, end to end, reconciliation, report.
    The last stdout line is one JSON document (the run, report and history paths, the measured points)."""
    from tokprof.rollup.economics import PriceOptions, load_price_sheet
    from tokprof.runner import run_main

    bench_device(device)  # a GPU that is not there, up front
    check_output("--out", out, folder=True)
    check_output("--db", db)  # the history is written last: a bad path would fail after the whole run
    try:
        prices = None
        if price_sheet or usd_per_gpu_hour is not None:
            prices = PriceOptions(sheet=load_price_sheet(price_sheet) if price_sheet else None,
                                  usd_per_gpu_hour=usd_per_gpu_hour)
        run_main(model=model, out_dir=out, device=device, console=console, history_db=db, report=not no_report,
                 batches=parse_int_list("--batch", batch) if batch else None,
                 contexts=parse_int_list("--context", context) if context else None, dtype=dtype, kv_dtype=kv_dtype,
                 backend=backend, prices=prices, utilisation=utilisation, skip=split_csv(skip))
    except ValueError as err:
        fail(str(err))
    except KeyboardInterrupt:
        interrupted(None)  # run_main has said which file keeps what was measured


# The other commands register on import, after these two, so that `tokprof --help` lists the main job first.
from tokprof.commands import profiler, economics, models, reports, fleet, serving  # noqa: E402, F401, I001


def main() -> None:
    app(prog_name="tokprof")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
