"""`tokprof rollup` and `tokprof published` end to end through the CLI: card first, table, JSON as the last line."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tokprof.cli import app
from tokprof.profiler.schema import load_run

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result, result.stdout.strip().splitlines()


def _err(result) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(result.stderr.split())


def test_modelled_llama_on_h200_at_the_article_price():
    result, lines = _invoke("rollup", "--model", "llama-3.1-8b", "--gpu", "h200", "--modelled",
                            "--usd-per-gpu-hour", "1.41")
    assert result.exit_code == 0, result.output
    assert lines[0].startswith("llama-3.1-8b (bf16): 8.03 B parameters")  # the analytic card comes first
    assert "batch-1 bound on the h200 datasheet (4.8 TB/s, modelled)" in result.stdout
    doc = json.loads(lines[-1])
    assert doc["command"] == "rollup" and doc["mode"] == "modelled" and doc["model"] == "llama-3.1-8b"
    card = doc["card"]
    assert card["decode_weight_bytes"] == 2 * (8_030_261_248 - 128256 * 4096)
    assert card["kv_bytes_per_token"] == 131072
    bound = card["batch1"][0]
    assert bound["context"] == 1024
    assert bound["tokens_per_s_max"] == pytest.approx(4.8e12 / (card["decode_weight_bytes"] + 131072 * 1024))
    points = doc["points"]
    assert [(p["batch"], p["context"]) for p in points] == [(b, c) for b in (1, 8, 64) for c in (1024, 8192)]
    for p in points:
        assert p["provenance"] == "modelled" and p["usd_per_gpu_hour"] == 1.41
        assert p["usd_per_million_tokens"] == pytest.approx(1.41 / (p["tokens_per_s_per_gpu"] * 3600) * 1e6)
        assert p["tokens_per_s_per_mw"] == pytest.approx(p["tokens_per_s_per_gpu"] * 1000 / 1.73)
    # batch 1 by the step model: every call 3.5 us + its (memory) roof / 0.8 (attention 0.85), plus 100 us + 0.3 us
    # per call
    from tokprof.models import ModelConfig
    from tokprof.models.plan import decode_plan

    plan = decode_plan(ModelConfig.from_name("llama-3.1-8b"), 1, 1024, "bf16")
    step_us = sum(c.count * (3.5 + c.cost()[1] / 4.8e12 * 1e6 / (0.85 if c.op == "decode_attention" else 0.8))
                  for c in plan)
    step_us += 100.0 + 0.3 * sum(c.count for c in plan)
    assert points[0]["tokens_per_s_per_gpu"] == pytest.approx(1e6 / step_us, rel=1e-9)
    assert 0.55 * bound["tokens_per_s_max"] < points[0]["tokens_per_s_per_gpu"] < 0.8 * bound["tokens_per_s_max"]


def test_default_contexts_stop_at_the_models_longest():
    result, lines = _invoke("rollup", "--model", "tiny", "--gpu", "h100", "--modelled")
    assert result.exit_code == 0, result.output
    assert {p["context"] for p in json.loads(lines[-1])["points"]} == {1024}  # 8192 > tiny's 4096 positions
    assert "default context(s) [8192] left out: longer than tiny's 4096 positions" in " ".join(result.output.split())
    result, _ = _invoke("rollup", "--model", "tiny", "--gpu", "h100", "--modelled", "--context", "8192")
    assert result.exit_code == 2 and "8192" in result.output  # a context the user names is checked, not dropped


def test_modelled_with_interactivity_and_output(tmp_path):
    out = tmp_path / "modelled.json"
    result, lines = _invoke("rollup", "--model", "qwen3-8b", "--gpu", "h100", "--modelled", "--batch", "1,16,64",
                            "--context", "4k", "--efficiency", "0.7", "--interactivity", "100", "--tier", "neocloud",
                            "-o", str(out))
    assert result.exit_code == 0, result.output
    doc = json.loads(lines[-1])
    assert [p["usd_per_gpu_hour"] for p in doc["points"]] == [1.69] * 3
    (at,) = doc["interactivity"]
    assert at["context"] == 4096 and at["provenance"] == "interpolated" and len(at["between"]) == 2
    run = load_run(out)
    assert len(run.rollup) == 3 and run.model["name"] == "qwen3-8b" and not run.kernels


def test_measure_on_cpu_then_project_from_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKPROF_CACHE_DIR", str(tmp_path / "cache"))  # the measured ceilings are cached there
    out = tmp_path / "cpu.json"
    result, lines = _invoke("rollup", "--model", "tiny", "--device", "cpu", "--backend", "torch", "--dtype", "fp32",
                            "--batch", "1", "--context", "16", "--timeout-s", "0.01", "--usd-per-gpu-hour", "0.5",
                            "-o", str(out))
    assert result.exit_code == 0, result.output
    doc = json.loads(lines[-1])
    assert doc["mode"] == "measured" and len(doc["points"]) == 1
    run = load_run(out)
    assert run.ceilings is not None and run.ceilings.gemm_dtype == "fp32"  # measured here, on the CPU
    assert all(k.roofline.efficiency_measured is not None for k in run.kernels)
    assert doc["card"]["batch1"] == [] and "no datasheet HBM bandwidth" in doc["card"]["batch1_reason"]
    assert doc["points"][0]["usd_per_million_tokens"] == pytest.approx(
        0.5 / (doc["points"][0]["tokens_per_s_per_gpu"] * 3600) * 1e6)
    # the same file rolled up again: the measured kernels, nothing re-measured
    result, lines = _invoke("rollup", "--from", str(out))
    assert result.exit_code == 0, result.output
    again = json.loads(lines[-1])
    assert again["points"][0]["step_time_us"] == doc["points"][0]["step_time_us"]
    result, _ = _invoke("rollup", "--from", str(out), "--model", "qwen3-8b")
    assert result.exit_code == 2 and "measured 'tiny', not 'qwen3-8b'" in _err(result)
    # a CPU run carries no datasheet efficiency: projecting it is refused with the reason
    result, _ = _invoke("rollup", "--from", str(out), "--gpu", "h200")
    assert result.exit_code == 2 and "no spec-table row" in _err(result)


def test_errors_are_clear_and_without_traceback(tmp_path):
    result, _ = _invoke("rollup", "--model", "llama-3.1-8b", "--modelled")
    assert result.exit_code == 2 and "--modelled: give --model and --gpu" in _err(result)
    result, _ = _invoke("rollup", "--model", "llama-3.1-8b", "--gpu", "tpu-v9", "--modelled")
    assert result.exit_code == 2 and "gpu: expected one of" in _err(result)
    result, _ = _invoke("rollup", "--model", "gpt-9", "--gpu", "h200", "--modelled")
    assert result.exit_code == 2 and "model: expected one of" in _err(result)
    result, _ = _invoke("rollup", "--model", "tiny", "--gpu", "h200", "--modelled", "--usd-per-gpu-hour", "-1")
    assert result.exit_code == 2 and "usd_per_gpu_hour: expected a positive finite number" in _err(result)
    result, _ = _invoke("rollup", "--model", "tiny", "--gpu", "h200", "--modelled", "--batch", "0")
    assert result.exit_code == 2 and "--batch: expected comma-separated positive ints" in _err(result)
    bad = tmp_path / "prices.json"
    bad.write_text('{"gpus": [{"gpu": "h200"}]}')
    result, _ = _invoke("rollup", "--model", "tiny", "--gpu", "h200", "--modelled", "--price-sheet", str(bad))
    assert result.exit_code == 2 and "prices.json: gpus[0].usd_per_gpu_hour: missing" in _err(result)
    if not torch.cuda.is_available():
        result, _ = _invoke("rollup", "--model", "tiny")
        assert result.exit_code == 2 and "--device cuda: no CUDA GPU on this machine" in _err(result)
    result, _ = _invoke("rollup", "--from", str(tmp_path / "none.json"))
    assert result.exit_code == 2 and "cannot read the run file" in _err(result)
    assert "Traceback" not in result.output


def test_published_command_shows_where_the_article_does_not_follow():
    result, lines = _invoke("published")
    assert result.exit_code == 0, result.output
    assert "does not follow" in result.stdout and "$4.35" in result.stdout
    doc = json.loads(lines[-1])
    verdicts = {(c["gpu"], c["metric"]): c["consistent"] for c in doc["checks"]}
    assert verdicts == {("h200", "usd_per_million_tokens"): False, ("h200", "tokens_per_s_per_mw"): False,
                        ("gb300", "usd_per_million_tokens"): True, ("gb300", "tokens_per_s_per_mw"): None}
