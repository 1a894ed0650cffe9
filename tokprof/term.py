"""The consoles tokprof prints through: a terminal's own width, a fixed width everywhere else.

A terminal wraps tables to its width (rich's default, COLUMNS read when printing). A pipe, a file or a test harness
gets PIPE_WIDTH columns whatever COLUMNS says, so that a row is never cut in a log and checks of the printed text
read the same on any machine. Scripts that parse the output should use `--json` (or the last stdout line of the
commands that end with one JSON document) rather than the tables.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, ConsoleDimensions

PIPE_WIDTH = 160  # columns when stdout is not a terminal: wide enough for the widest table (bench, specs)


class OutputConsole(Console):
    """A rich Console whose width is the terminal's when it prints to one, else PIPE_WIDTH (COLUMNS ignored)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fixed_width = kwargs.get("width") is not None
        if not self._fixed_width:
            self._width = None  # rich froze COLUMNS at construction; size reads it at print time instead

    @property  # type: ignore[override]
    def size(self) -> ConsoleDimensions:
        if not self._fixed_width and not self.is_terminal:
            return ConsoleDimensions(PIPE_WIDTH, self._height or 25)
        return Console.size.fget(self)  # type: ignore[attr-defined]

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]
