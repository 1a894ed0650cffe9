"""The typer app every `tokprof` command registers on, and the helpers the commands share."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="tokprof: GPU kernel-level throughput profiler, from kernels to cost per million tokens.")
console = Console()
DB_HELP = ("History database (default: TOKPROF_HISTORY_DB, else $XDG_DATA_HOME or ~/.local/share, "
           "tokprof/history.db).")
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



def bench_device(device: str | None) -> object:
    """--device as a torch.device (default: cuda when a GPU is visible, else cpu); exit 2 when it cannot work."""
    from tokprof.profiler.devices import resolve_device

    try:
        return resolve_device(device)
    except ValueError as err:
        fail(str(err))


def print_wide(table: Table) -> None:
    """Print a wide table whole: a terminal wraps it to its width, a pipe or a file gets 160 columns, not 80."""
    (console if console.is_terminal else Console(width=160)).print(table)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"

