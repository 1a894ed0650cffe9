"""The `tokprof` command line.

    tokprof kernels                 # ops, backends available here (and why others are not), cost formulas

Each command is a thin layer over the library: parse, call, print (rich tables), write files atomically.
"""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="tokprof: GPU kernel-level throughput profiler, from kernels to cost per million tokens.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """tokprof: GPU kernel-level throughput profiler, from kernels to cost per million tokens."""


def fail(message: str, code: int = 2) -> None:
    """Print a clear error (no traceback) and exit with `code`."""
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def split_csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def parse_int_list(name: str, value: str) -> list[int]:
    try:
        out = [int(v.lower().replace("k", "")) * (1024 if v.lower().endswith("k") else 1) for v in split_csv(value)]
    except ValueError:
        fail(f"{name}: expected comma-separated positive ints such as 1,8,64 (or 1k,8k), got {value!r}")
    if not out or any(v <= 0 for v in out):
        fail(f"{name}: expected comma-separated positive ints such as 1,8,64 (or 1k,8k), got {value!r}")
    return out


@app.command()
def kernels(
    device: str = typer.Option("cpu", help="Device to check backends on: cpu or cuda[:N]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """List the ops, which backends run on this machine (and why the others do not), and their cost formulas."""
    import torch

    from tokprof.kernels import OPS

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        fail(f"--device: expected cpu or cuda[:N], got {device!r} ({err})")
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


def main() -> None:
    app(prog_name="tokprof")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
