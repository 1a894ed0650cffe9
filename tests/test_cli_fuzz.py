"""Every subcommand's options, fuzzed: hostile values (zero, negative, huge, NaN, markup, path traversal, empty
lists) give exit 0, 1 or 2 and never a traceback. The measuring entry points are replaced by a sentinel, so the
test measures nothing: an input valid enough to reach a measurement ends the example there (that input is fine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer.main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tokprof.cli import app

DATA = Path(__file__).resolve().parent / "data"
FIXTURE = str(DATA / "run_h100.json")
VALUES = ("", "0", "-1", "1", "2", "1e308", "nan", "inf", "-inf", "99999999999999999999", "abc", "[/]", "[bold]x",
          "../../../escaped/x", "1,,2", ",", "1k,8k", "5%", "tiny", "h100", "cpu", "cuda:7", "torch", "triton",
          "fp32", "bf16", "T=0,I=8", "block_size=0", "B=1,context=64,block_size=0", FIXTURE, str(DATA))
COMMAND = typer.main.get_command(app)
NAMES = sorted(COMMAND.commands)
EXAMPLES = int(os.environ.get("TOKPROF_FUZZ_EXAMPLES", "6"))  # per command; more for a deeper search by hand


class Reached(BaseException):
    """A measurement was about to start: the arguments were accepted (BaseException: nothing catches it)."""


def _stop(*args, **kwargs):
    raise Reached


@pytest.fixture(autouse=True)
def _no_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKPROF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKPROF_HISTORY_DB", str(tmp_path / "history.db"))
    monkeypatch.chdir(tmp_path)  # default outputs land here
    for target in ("tokprof.profiler.timing.measure", "tokprof.profiler.ceilings.measure_ceilings",
                   "tokprof.runner.run_main", "tokprof.models.e2e_command.run_e2e",
                   "tokprof.profiler.energy.record_trace", "tokprof.profiler.collectives.bench_collectives",
                   "tokprof.profiler.bench.bench_calls", "tokprof.serving.bench.run_bench"):
        monkeypatch.setattr(target, _stop, raising=False)  # raising=False: an entry point another branch removed


def _params(name: str) -> list:
    return [p for p in COMMAND.commands[name].params if p.name != "help"]


@st.composite
def argv(draw, name: str) -> list[str]:
    out: list[str] = [name]
    for p in _params(name):
        if p.param_type_name == "argument":
            count = 1 if p.nargs == 1 else draw(st.integers(0, 2))
            out += [draw(st.sampled_from(VALUES)) for _ in range(count)]
            continue
        if not draw(st.booleans()):
            continue
        if p.is_flag:
            out.append(draw(st.sampled_from([*p.opts, *p.secondary_opts])))
        else:
            out += [draw(st.sampled_from(p.opts)), draw(st.sampled_from(VALUES))]
    return out


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_option_exits_cleanly(name, data):
    args = data.draw(argv(name))
    try:
        result = CliRunner().invoke(app, args)
    except Reached:
        return
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, result.output[-2000:], result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert "Traceback" not in result.output, (args, result.output[-2000:])


def test_every_command_is_fuzzed():
    assert {"bench", "run", "compare", "history", "report", "rollup", "e2e", "ceilings"} <= set(NAMES)
