"""`tokprof serve-bench`: a short CPU sweep (server and simulator), the modelled GPU mode, files saved, the last
stdout line one JSON document, bad input exit 2 with the option named."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tokprof.cli import app

runner = CliRunner()


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_cpu_sweep_measured_beside_predicted(tmp_path):
    res = runner.invoke(app, ["serve-bench", "--rates", "50,100", "--requests", "6", "--input-len", "uniform:4:12",
                              "--output-len", "4", "--max-num-seqs", "4", "--token-budget", "16",
                              "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = _last_json(res.output)
    assert doc["command"] == "serve-bench" and doc["mode"] == "measured" and len(doc["points"]) == 2
    for p in doc["points"]:
        assert set(p["errors"]) == {"throughput", "median_tpot", "p90_ttft"}
        assert p["measured_tokens_per_s"] > 0 and p["predicted_tokens_per_s"] > 0
    saved = json.loads((tmp_path / "serve-bench.json").read_text())
    assert saved["points"][0]["measured"]["requests"] == 6 and saved["table"]["decode_s"]
    assert saved["cpu_load"]["note"] and saved["validation"]["rates"] == 2
    assert saved["points"][0]["measured"]["energy_j"] is None
    assert "NVML" in saved["points"][0]["measured"]["energy_reason"]
    md = (tmp_path / "serve-bench.md").read_text()
    assert "Simulator against tokprof's server" in md and "| 50 | measured |" in md
    assert (tmp_path / "serve-bench.png").stat().st_size > 0


def test_modelled_gpu_curve_and_cost(tmp_path):
    res = runner.invoke(app, ["serve-bench", "--gpu", "h100", "--model", "llama-3.1-8b", "--dtype", "bf16",
                              "--rates", "1,4", "--requests", "20", "--input-len", "512", "--output-len", "64",
                              "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = _last_json(res.output)
    assert doc["mode"] == "modelled" and doc["validation"] is None
    search = doc["slo_search"]
    assert search["max_rate_per_s"] > 0
    cost = search["cost"]
    assert cost["usd_per_million_tokens"] > 0  # the shipped price sheet has an H100 row
    saved = json.loads((tmp_path / "serve-bench.json").read_text())
    assert all("measured" not in p for p in saved["points"])
    assert saved["points"][1]["predicted"]["output_tokens_per_s_per_gpu"] > \
        saved["points"][0]["predicted"]["output_tokens_per_s_per_gpu"]


def test_bad_input_exit_2(tmp_path):
    for args, needle in ((["--rates", "0,2"], "--rates"), (["--input-len", "uniform:9:2"], "input_len"),
                         (["--clock", "sun"], "clock"), (["--slo-tpot-ms", "-1"], "--slo-tpot-ms")):
        res = runner.invoke(app, ["serve-bench", *args, "-o", str(tmp_path)])
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.output, (args, res.output)
        assert "Traceback" not in res.output
