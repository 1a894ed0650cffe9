"""One command line: the same flag for the same concept in every command, found by introspecting the CLI, and
output that reads the same at any terminal width, with no TTY."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from tokprof.cli import app

DATA = Path(__file__).parent / "data"
H100, H200 = DATA / "run_h100.json", DATA / "run_h200.json"
README = Path(__file__).parent.parent / "README.md"
runner = CliRunner()

# Commands whose last stdout line is one JSON document (the rule README states); every other command takes --json.
LAST_LINE_JSON = {"run", "e2e", "published", "validate", "serve-bench", "energy-trace", "fleet"}
CSV = {"bench", "rollup", "history"}
# concept -> the one visible flag name; a visible option whose name matches the pattern must be that flag
CONCEPTS = {
    "model": (r"^--model(-dir|-name|-path)?$", "--model"),
    "time budget": (r"^--(max-time|timeout|time-budget|budget)(-s)?$", "--timeout-s"),
    "batch": (r"^--batch(es|-sizes?)?$", "--batch"),
    "context": (r"^--(context|contexts|ctx|seq-len)$", "--context"),
    "json": (r"^--(json|as-json)$", "--json"),
}


def _is_option(p: click.Parameter) -> bool:
    return p.param_type_name == "option"  # typer's TyperOption is a click Parameter, not a click.Option


def _commands() -> dict[str, click.Command]:
    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _visible_flags(cmd: click.Command) -> list[str]:
    return [o for p in cmd.params if _is_option(p) and not p.hidden for o in p.opts]


def test_one_flag_name_per_concept_across_commands():
    for name, cmd in _commands().items():
        for flag in _visible_flags(cmd):
            for concept, (pattern, wanted) in CONCEPTS.items():
                if re.match(pattern, flag):
                    assert flag == wanted, f"tokprof {name} {flag}: the {concept} is {wanted} everywhere"


def test_every_command_has_json_or_ends_with_a_json_line_and_tables_have_csv():
    for name, cmd in _commands().items():
        flags = _visible_flags(cmd)
        assert ("--json" in flags) != (name in LAST_LINE_JSON), f"tokprof {name}: --json xor the last-line rule"
        assert ("--csv" in flags) == (name in CSV), f"tokprof {name}: --csv where tables are the product"


def test_output_files_are_dash_o_everywhere():
    for name, cmd in _commands().items():
        for p in cmd.params:
            if _is_option(p) and not p.hidden and p.name in ("out", "output"):
                assert "-o" in p.opts, f"tokprof {name}: {p.opts} without -o"


def test_old_names_are_hidden_aliases():
    cmds = _commands()
    hidden = {(n, o) for n, c in cmds.items() for p in c.params if _is_option(p) and p.hidden
              for o in p.opts}
    assert {("rollup", "--max-time-s"), ("e2e", "--model-dir"), ("run", "--no-report")} <= hidden


def test_help_and_readme_list_the_same_commands():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    listed = set(re.findall(r"^│ ([a-z][a-z0-9-]+) ", result.output, re.MULTILINE))
    assert listed == set(_commands()), listed
    readme = README.read_text()
    tour = readme[readme.index("## Command-line tour"):readme.index("Exit codes")]
    for name in _commands():
        assert f"`tokprof {name}" in tour, f"README's tour does not show tokprof {name}"


def test_version():
    from tokprof import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"tokprof {__version__}"


@pytest.mark.parametrize("columns", ["40", "80", "250"])
def test_history_output_is_the_same_at_any_width(tmp_path, columns):
    db = tmp_path / "h.db"
    result = runner.invoke(app, ["history", "--db", str(db), "--record", str(H100), "--record", str(H200)],
                           env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    # no TTY: a fixed width whatever COLUMNS says, so the run ids are whole on every line they are on
    assert "fixture-h100-0001" in result.output and "fixture-h200-0001" in result.output
    result = runner.invoke(app, ["history", "--db", str(db), "--json"], env={"COLUMNS": columns})
    doc = json.loads(result.stdout)
    assert sorted(r["run_id"] for r in doc["runs"]) == ["fixture-h100-0001", "fixture-h200-0001"]
    result = runner.invoke(app, ["history", "--db", str(db), "--csv"], env={"COLUMNS": columns})
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("run_id,") and len(lines) == 3


def test_history_on_a_narrow_terminal_keeps_run_ids_whole(tmp_path, monkeypatch):
    from tokprof.commands import _app
    from tokprof.term import OutputConsole

    db = tmp_path / "h.db"
    runner.invoke(app, ["history", "--db", str(db), "--record", str(H100)])
    narrow = OutputConsole(force_terminal=True, width=80, color_system=None)
    monkeypatch.setattr("tokprof.commands.reports.console", narrow)
    with narrow.capture() as cap:
        result = runner.invoke(app, ["history", "--db", str(db)])
    assert result.exit_code == 0
    text = cap.get()
    assert "fixture-h100-0001" in text and max(len(line) for line in text.splitlines()) <= 80
    assert _app.console.width == 160  # the shared console, printing to no terminal here: the fixed width


def test_errors_keep_their_brackets(tmp_path):
    from tokprof.commands._app import fail

    with pytest.raises(typer.Exit):
        fail("fleet sweeps need Ray: pip install 'tokprof[fleet]'")
    # through the CLI: a path with brackets in an error message comes out whole
    result = runner.invoke(app, ["report", str(tmp_path / "[x]" / "missing.json"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "[x]" in result.output


def test_fail_escapes_markup(capsys):
    from tokprof.commands._app import fail

    with pytest.raises(typer.Exit):
        fail("pip install 'tokprof[fleet]'")
    assert "pip install 'tokprof[fleet]'" in capsys.readouterr().err


def test_reconcile_leaves_its_input_untouched_unless_asked(tmp_path):
    run = tmp_path / "run.json"
    run.write_bytes(H100.read_bytes())
    before = run.read_bytes()
    result = runner.invoke(app, ["reconcile", str(run), "--utilisation", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["written"] == [] and doc["reconciliation"] and run.read_bytes() == before
    copy = tmp_path / "copy.json"
    result = runner.invoke(app, ["reconcile", str(run), "--utilisation", "0.5", "-o", str(copy)])
    assert result.exit_code == 0 and run.read_bytes() == before
    from tokprof.profiler.schema import load_run

    assert any(lv.get("name") == "L5" and lv.get("tokens_per_s_per_gpu") is not None
               for rec in load_run(copy).reconciliation for lv in rec["layers"])
    result = runner.invoke(app, ["reconcile", str(run), "--write"])
    assert result.exit_code == 0 and run.read_bytes() != before


def test_compare_and_report_json(tmp_path):
    result = runner.invoke(app, ["compare", str(H100), str(H100), "--json"])
    doc = json.loads(result.stdout)
    assert result.exit_code == doc["exit_code"] == 0 and doc["counts"]["SLOW"] == 0 and doc["rows"]
    result = runner.invoke(app, ["report", str(H100), "-o", str(tmp_path / "r"), "--json"])
    doc = json.loads(result.stdout)
    assert result.exit_code == 0 and len(doc["figures"]) == len(set(doc["figures"]))
    assert all(Path(f).is_file() for f in doc["figures"])  # the count is the files written


def test_e2e_and_rollup_sweep_defaults_agree():
    from tokprof.commands.models import sweep_defaults
    from tokprof.rollup.command import DEFAULT_BATCHES, default_contexts, load_model

    assert sweep_defaults("tiny", None, None) == (DEFAULT_BATCHES, default_contexts(load_model("tiny"), []))
    assert sweep_defaults("llama-3.1-8b", None, None) == ([1, 8, 64], [1024, 8192])
    assert sweep_defaults("tiny", "2", "1k") == ([2], [1024])


def test_paths_with_brackets_print_whole(tmp_path):
    out = tmp_path / "[fleet]" / "r.json"
    result = runner.invoke(app, ["rollup", "--model", "tiny", "--gpu", "h200", "--modelled", "--context", "1024",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and out.is_file()


def test_compare_says_when_a_run_was_made_on_a_shared_cpu(tmp_path):
    from tokprof.profiler.schema import load_run, save_run

    run = load_run(H100)
    run.notes.append("other processes kept 1.42 of 2 cores busy over the 50 s run (tokprof 0.58): the CPU was "
                     "shared, so these CPU figures are slower and noisier than on an idle CPU")
    new = save_run(run, tmp_path / "new.json")
    result = runner.invoke(app, ["compare", str(H100), str(new), "--json"])
    doc = json.loads(result.stdout)
    assert len(doc["conditions"]) == 1 and "new.json was measured on a shared CPU" in doc["conditions"][0]
    result = runner.invoke(app, ["compare", str(H100), str(new)])
    assert "> Caution: new.json was measured on a shared CPU" in result.stdout
    result = runner.invoke(app, ["compare", str(H100), str(H100), "--json"])
    assert json.loads(result.stdout)["conditions"] == []


def test_bench_json_and_csv(tmp_path):
    args = ["bench", "--op", "swiglu", "--device", "cpu", "--backend", "torch", "--dtype", "fp32", "--no-ceilings",
            "--shape", "T=2,I=64", "--timeout-s", "0.05"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "a.json"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (row,) = doc["kernels"]
    assert (row["op"], row["backend"], row["dtype"], row["shape"]) == ("swiglu", "torch", "fp32", "T=2,I=64")
    assert row["median_us"] > 0 and row["n_samples"] >= 10 and doc["failures"] == []
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "b.json"), "--csv"])
    lines = result.stdout.strip().splitlines()
    assert result.exit_code == 0 and lines[0].startswith("op,backend,dtype,shape,median_us") and len(lines) == 2
    result = runner.invoke(app, [*args, "--json", "--csv"])
    assert result.exit_code == 2 and "choose one output format" in result.output
