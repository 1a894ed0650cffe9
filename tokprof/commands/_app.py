"""The typer app every `tokprof` command registers on, and the helpers the commands share."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from tokprof.term import OutputConsole

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="tokprof: GPU kernel-level throughput profiler, from kernels to cost per million tokens.")
console = OutputConsole()  # a terminal's width, else a fixed width (tokprof/term.py)
DB_HELP = ("History database (default: TOKPROF_HISTORY_DB, else $XDG_DATA_HOME or ~/.local/share, "
           "tokprof/history.db).")
err_console = OutputConsole(stderr=True)


def _version(value: bool) -> None:
    if value:
        from tokprof import __version__

        print(f"tokprof {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print tokprof's version and exit."),
) -> None:
    """tokprof: GPU kernel-level throughput profiler, from kernels to cost per million tokens."""


def quiet_console() -> OutputConsole:
    """A console that prints nowhere: for --json and --csv, whose stdout is the document alone."""
    return OutputConsole(file=io.StringIO())


def print_csv(rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """`rows` as CSV on stdout (a header line, then one line per row; None as an empty cell): for --csv."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})


def check_one_format(as_json: bool, as_csv: bool) -> None:
    if as_json and as_csv:
        fail("--json and --csv: choose one output format")


def fail(message: str, code: int = 2) -> None:
    """Print a clear error (no traceback) and exit with `code`; the message is text, never rich markup (a hint such
    as pip install 'tokprof[fleet]' keeps its brackets)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def interrupted(kept: str | None) -> None:
    """Ctrl-C: say what was kept (None: nothing to say, already said) and exit 130, without a traceback."""
    if kept:
        err_console.print(f"[yellow]interrupted[/]: {escape(kept)}")
    raise typer.Exit(130)


def split_csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def parse_int_list(name: str, value: str) -> list[int]:
    """'1,8,64' or '1k,8k' -> ints; exit 2 on an empty list, an empty item ('1,,8'), a non-number or a value <= 0."""
    try:
        out = [int(v[:-1]) * 1024 if v.lower().endswith("k") else int(v) for v in (s.strip() for s in value.split(","))]
    except ValueError:
        fail(f"{name}: expected comma-separated positive ints such as 1,8,64 (or 1k,8k), got {value!r}")
    if not out or any(v <= 0 for v in out):
        fail(f"{name}: expected comma-separated positive ints such as 1,8,64 (or 1k,8k), got {value!r}")
    return out


def check_output(name: str, path: str | Path | None, folder: bool = False) -> None:
    """Exit 2 before any work when `path` cannot be written: a folder where a file is wanted (or the reverse), or a
    file in the way of its parent folders. Checked up front so that no measurement is lost to a bad -o."""
    if path is None:
        return
    p = Path(path).expanduser()
    if folder and p.exists() and not p.is_dir():
        fail(f"{name}: expected a folder, got the file {path}")
    if not folder and p.is_dir():
        fail(f"{name}: expected a file, got the folder {path}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                fail(f"{name}: expected a path under a folder, got {path} ({parent} is a file)")
            break
    _check_writable(name, path, p, folder)


MIN_FREE_BYTES = 16 << 20  # less free space than this where results go: refused up front, not after measuring


def _check_writable(name: str, path: str | Path, p: Path, folder: bool) -> None:
    """Exit 2 when this process cannot create or replace `p` (permissions, a read-only or full file system)."""
    import os
    import shutil

    where = p if folder and p.is_dir() else p.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not os.access(where, os.W_OK | os.X_OK) or (not folder and p.exists() and not os.access(p, os.W_OK)):
        fail(f"{name}: cannot write {path} ({where} is not writable by this user)")
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if free < MIN_FREE_BYTES:
        fail(f"{name}: cannot write {path}: only {free >> 20} MiB free on the file system of {where} (at least "
             f"{MIN_FREE_BYTES >> 20} MiB needed)")


def check_device_index(device: str | None) -> None:
    """Exit 2 when --device names a GPU index past the GPUs torch sees (torch would raise deep inside); other
    problems with --device are left to the command's own check, which names them."""
    import torch

    from tokprof.profiler.devices import check_cuda_index

    try:
        dev = torch.device(device) if device not in (None, "auto") else None
    except RuntimeError:
        return
    if dev is not None and torch.cuda.is_available():
        try:
            check_cuda_index(dev, device)
        except ValueError as err:
            fail(str(err))


def bench_device(device: str | None) -> object:
    """--device as a torch.device (default: cuda when a GPU is visible, else cpu); exit 2 when it cannot work."""
    from tokprof.profiler.devices import resolve_device

    try:
        return resolve_device(device)  # also refuses cuda:N past the visible GPUs
    except ValueError as err:
        fail(str(err))


def print_wide(table: Table) -> None:
    """Print a wide table: a terminal wraps it to its width, a pipe or a file gets term.PIPE_WIDTH columns."""
    console.print(table)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"

