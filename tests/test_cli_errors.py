"""Bad input on the command line: a clear error naming the argument (no traceback), exit 2; nothing measured lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tokprof.cli import app
from tokprof.profiler.schema import load_run

runner = CliRunner()
H100, H200 = (str(Path(__file__).parent / "data" / f"run_{gpu}.json") for gpu in ("h100", "h200"))
MODELLED = ["rollup", "--model", "tiny", "--gpu", "h200", "--modelled", "--context", "1024"]
E2E = ["e2e", "--model", "tiny", "--device", "cpu", "--no-energy", "--no-profile", "--framework", "tokprof",
       "--steps", "2", "--warmup", "1", "--batch", "1", "--context", "16"]
BENCH = ["bench", "--op", "swiglu", "--device", "cpu", "--backend", "torch", "--dtype", "fp32", "--no-ceilings"]


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKPROF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKPROF_HISTORY_DB", str(tmp_path / "history.db"))


def _invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result, " ".join(result.output.split())  # rich's line wrapping undone


def _refused(*args: str, message: str) -> str:
    result, text = _invoke(*args)
    assert result.exit_code == 2, text
    assert message in text and "Traceback" not in text
    return text


@pytest.mark.parametrize("option, value", [
    ("--batch", ""), ("--batch", "1,,2"), ("--batch", "1k1"), ("--context", "1k,"),
])
def test_int_lists_refuse_empty_and_malformed_items(option, value):
    _refused(*MODELLED, option, value, message=f"{option}: expected comma-separated positive ints")


@pytest.mark.parametrize("value", ["-5", "0", "inf", "", "20,"])
def test_interactivity_names_the_option(value):
    _refused(*MODELLED, "--interactivity", value, message="--interactivity: expected comma-separated positive")


def test_e2e_batch_with_an_empty_item():
    _refused(*E2E, "--batch", "1,,2", message="--batch: expected comma-separated positive ints")


# ------------------------------------------------------------------ outputs checked before anything is measured


def test_bench_output_a_folder(tmp_path):
    _refused(*BENCH, "--shape", "T=2,I=8", "-o", str(tmp_path), message=f"--output: expected a file, got the folder "
                                                                         f"{tmp_path}")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_bench_output_under_a_file(tmp_path):
    blocker = tmp_path / "a.json"
    blocker.write_text("{}")
    _refused(*BENCH, "--shape", "T=2,I=8", "-o", str(blocker / "x.json"), message=f"({blocker} is a file)")


@pytest.mark.parametrize("args, option", [
    ([*MODELLED, "-o", "{dir}"], "--output: expected a file"),
    ([*E2E, "-o", "{dir}"], "--output: expected a file"),
    (["compare", "{h100}", "{h200}", "--out", "{dir}"], "--out: expected a file"),
    (["energy-trace", "-o", "{dir}"], "--out: expected a file"),
    (["run", "--device", "cpu", "--model", "tiny", "--db", "{dir}", "-o", "{dir}/out"], "--db: expected a file"),
    (["fleet", "--gpus", "h100", "--model", "tiny", "--db", "{dir}"], "--db: expected a file"),
])
def test_file_outputs_refuse_a_folder(args, option, tmp_path):
    fixtures = {"dir": str(tmp_path), "h100": H100, "h200": H200}
    _refused(*[a.format(**fixtures) for a in args], message=option)


@pytest.mark.parametrize("args", [
    ["run", "--device", "cpu", "--model", "tiny", "-o", "{file}"],
    ["report", H100, "-o", "{file}"],
    ["fleet", "--gpus", "h100", "--model", "tiny", "-o", "{file}"],
])
def test_folder_outputs_refuse_a_file(args, tmp_path):
    file = tmp_path / "taken.json"
    file.write_text("{}")
    _refused(*[a.format(file=file) for a in args], message=f"--out: expected a folder, got the file {file}")
    assert file.read_text() == "{}"


# ------------------------------------------------------------------------------------------------ devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_kernels_on_a_gpu_that_is_not_there():
    _refused("kernels", "--device", "cuda", message="'cuda' asked for a GPU but torch sees none")


def test_kernels_on_a_device_that_is_not_cpu_or_cuda():
    _refused("kernels", "--device", "meta", message="--device: expected auto, cpu or cuda[:N], got 'meta'")


@pytest.mark.parametrize("args", [
    ["kernels"], ["ceilings"], ["bench", "--op", "swiglu"], ["e2e", "--model", "tiny"],
    ["rollup", "--model", "tiny", "--batch", "1", "--context", "16"], ["run", "--model", "tiny"],
    ["energy-trace", "-o", "{tmp}/trace.json"],
])
def test_gpu_index_past_the_visible_gpus(args, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _refused(*[a.format(tmp=tmp_path) for a in args], "--device", "cuda:7",
             message="--device: expected cuda:0 to cuda:0 (1 GPU(s) visible here), got 'cuda:7'")


# --------------------------------------------------------------------------------------------------- bench


def test_bench_timeout_below_the_harness_minimum_still_measures(tmp_path):
    out = tmp_path / "run.json"
    result, text = _invoke(*BENCH, "--shape", "T=2,I=8", "--timeout-s", "0.05", "-o", str(out))
    assert result.exit_code == 0, text
    assert "(1 measured, 0 failed)" in text
    assert len(load_run(out).kernels) == 1


def test_bench_with_every_call_failed_exits_1_and_keeps_the_file(tmp_path):
    out = tmp_path / "run.json"
    result, text = _invoke(*BENCH, "--shape", "T=0,I=8", "--timeout-s", "0.1", "-o", str(out))
    assert result.exit_code == 1, text
    assert "(0 measured, 1 failed)" in text
    assert len(load_run(out).failures) == 1


def test_bench_energy_window_must_be_positive(tmp_path):
    _refused(*BENCH, "--energy", "--energy-window-s", "0", "-o", str(tmp_path / "x.json"),
             message="--energy-window-s: expected a positive number of seconds up to 3600, got 0.0")
    assert not (tmp_path / "x.json").exists()


def test_bench_collective_error_printed_once():
    text = _refused("bench", "--op", "all_reduce", "--device", "cpu", "--world-size", "1",
                    message="--world-size: a collective needs at least 2 ranks, got 1")
    assert text.count("error:") == 1, text


# ----------------------------------------------------------------------------------------- e2e, reconcile


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "Invalid value for '--steps'"),
    (["--warmup", "-1"], "Invalid value for '--warmup'"),
    (["--framework", ""], "--framework: expected some of ['tokprof', 'transformers', 'vllm'], got ''"),
    (["--mode", "graph"], "--mode graph: CUDA graphs need a CUDA device, got --device cpu"),
])
def test_e2e_bad_arguments(args, message):
    _refused(*E2E, *args, message=message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM is skipped only without a GPU")
def test_e2e_with_nothing_measured_exits_1():
    result, text = _invoke(*E2E, "--framework", "vllm")
    assert result.exit_code == 1, text
    assert "vLLM needs a CUDA GPU" in text
    assert json.loads(result.stdout.strip().splitlines()[-1])["e2e"] == []


def test_reconcile_l4_names_the_option():
    _refused("reconcile", H100, "--no-write", "--l4", "nope",
             message="--l4: expected one of ['tokprof', 'transformers', 'vllm'], got 'nope'")


# -------------------------------------------------------------------------------------- energy-trace, fleet


@pytest.mark.parametrize("option, value, message", [
    ("--idle-s", "-1", "--idle-s: expected a non-negative number of seconds, got -1.0"),
    ("--settle-s", "nan", "--settle-s: expected a non-negative number of seconds, got nan"),
    ("--busy-s", "0", "--busy-s: expected a positive number of seconds, got 0.0"),
])
def test_energy_trace_durations(option, value, message, tmp_path):
    _refused("energy-trace", "-o", str(tmp_path / "trace.json"), option, value, message=message)


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny", "--timeout-s", "0"], "--timeout-s: expected a positive number of seconds, got 0.0"),
    (["--model", "gpt-9"], "model: expected one of"),
])
def test_fleet_refuses_before_starting_ray(args, message, tmp_path):
    _refused("fleet", "--gpus", "h100", "-o", str(tmp_path / "fleet"), *args, message=message)
    assert not (tmp_path / "fleet").exists()


def test_e2e_interrupted_exits_130_and_says_where_the_points_are(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tokprof.models.e2e_command.run_e2e", interrupt)
    out = tmp_path / "e2e.json"
    result, text = _invoke("e2e", "--model", "tiny", "--device", "cpu", "-o", str(out))
    assert result.exit_code == 130 and f"the points measured so far are in {out}" in text


def test_rollup_interrupted_exits_130_and_says_where_the_kernels_are(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tokprof.rollup.command.run_rollup", interrupt)
    out = tmp_path / "run.json"
    result, text = _invoke("rollup", "--model", "tiny", "--device", "cpu", "--backend", "torch", "-o", str(out))
    assert result.exit_code == 130 and f"the kernels measured so far are in {out}" in text
