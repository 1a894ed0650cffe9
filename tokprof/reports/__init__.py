"""Reports from RunResult files: markdown/HTML/PNG reports, the regression gate (compare) and run history (SQLite).

    from tokprof.reports import History, compare_runs, render_report
    render_report(["run.json"], "report/")                    # report.md, report.html, *.png
    result = compare_runs(load_run("base.json"), load_run("new.json"), threshold=0.05)
    History().record_run(run, "run.json")                    # default database in the user's data directory

Everything here reads only RunResult files (tokprof.profiler.schema), so a run from an H100 can be reported and
compared on a laptop. Names are imported lazily, so that `tokprof history` does not load matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "render_report": "render", "Report": "render", "load_runs": "render",
    "compare_runs": "compare", "compare_files": "compare", "compare_against_history": "compare",
    "Comparison": "compare", "CompareInputError": "compare", "parse_threshold": "compare",
    "History": "history", "HistoryDatabaseError": "history", "record_run": "history", "default_db_path": "history",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tokprof.reports' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tokprof.reports.{_EXPORTS[name]}"), name)
