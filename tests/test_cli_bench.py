"""`tokprof bench`, `tokprof ceilings` and `tokprof specs` end to end on the CPU (typer's CliRunner)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tokprof.cli import app
from tokprof.profiler.ceilings import CPU_COPY_BUFFER_BYTES, CPU_GEMM_N, cache_key
from tokprof.profiler.devices import detect_device
from tokprof.profiler.schema import Ceilings, load_run, save_json_atomic, to_dict

runner = CliRunner()
QUICK = ["--device", "cpu", "--backend", "torch", "--dtype", "fp32", "--timeout-s", "0.1"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKPROF_CACHE_DIR", str(tmp_path / "cache"))


def test_bench_writes_a_run_the_loader_accepts(tmp_path):
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["bench", "--op", "swiglu", "--shape", "T=2,I=64", "--shape", "T=3,I=32", *QUICK,
                                 "--no-ceilings", "-o", str(out)])
    assert result.exit_code == 0, result.output
    run = load_run(out)
    assert [k.shape for k in run.kernels] == [{"T": 2, "I": 64}, {"T": 3, "I": 32}]
    assert all(k.timing.mode == "cpu" and k.timing.median_us > 0 for k in run.kernels)
    assert run.provenance.command[:4] == ["tokprof", "bench", "--op", "swiglu"] and run.ceilings is None
    assert f"wrote {out}" in result.output.replace("\n", "") and "swiglu torch fp32" in result.output
    assert "no energy counter on a cpu" in result.output


def test_bench_uses_cached_ceilings_for_the_measured_roofline(tmp_path):
    # A cache entry as `tokprof ceilings` would leave it, with the default CPU sizes: read, not re-measured.
    c = Ceilings(copy_gbps=5.0, gemm_tflops=0.05, gemm_dtype="fp32", copy_bytes=2 * CPU_COPY_BUFFER_BYTES,
                 gemm_shape=[CPU_GEMM_N] * 3, device=detect_device("cpu").name, measured_utc="2026-01-01T00:00:00Z",
                 read_gbps=4.0)
    save_json_atomic(to_dict(c), tmp_path / "cache" / "ceilings" / f"{cache_key(detect_device('cpu'))}.json")
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["bench", "--op", "swiglu", "--shape", "T=2,I=64", *QUICK, "--energy", "-o",
                                 str(out)])
    assert result.exit_code == 0, result.output
    run = load_run(out)
    assert run.ceilings is not None and run.ceilings.copy_gbps == 5.0
    k = run.kernels[0]
    # 2*64*3 elements * 4 B = 1536 B at 5 GB/s = 0.3072 us on the measured roof.
    assert k.roofline.t_roof_measured_us == pytest.approx(0.3072)
    assert k.energy is None and k.energy_reason.startswith("no energy counter on a cpu")


@pytest.mark.parametrize("args, message", [
    (["--op", "nope"], "op: expected one of"),
    (["--op", "swiglu", "--backend", "fortran"], "backend: expected one of"),
    (["--op", "swiglu", "--dtype", "int8"], "dtype: expected one of"),
    (["--op", "swiglu", "--shape", "Z=3"], "shape: unknown key"),
    (["--op", "swiglu", "--shape", "T=abc"], "T expected a non-negative int"),
    (["--op", "swiglu", "--mode", "wall"], "--mode: expected one of"),
    (["--op", "swiglu", "--backend", "cuda"], "nothing to run on cpu"),
])
def test_bench_bad_arguments_exit_2(args, message, tmp_path):
    base = ["--device", "cpu", "--timeout-s", "0.1", "--no-ceilings", "-o", str(tmp_path / "x.json")]
    result = runner.invoke(app, ["bench", *args, *base])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_bench_cuda_without_gpu_exit_2():
    result = runner.invoke(app, ["bench", "--op", "swiglu", "--device", "cuda"])
    assert result.exit_code == 2 and "use --device cpu" in result.output


def test_ceilings_command_small_sizes():
    result = runner.invoke(app, ["ceilings", "--device", "cpu", "--no-cache", "--copy-mib", "4", "--gemm-n", "64",
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["ceilings"]["copy_bytes"] == 8 << 20 and data["ceilings"]["gemm_shape"] == [64, 64, 64]
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["gemm_tflops"] > 0
    assert data["datasheet"]["key"] is None  # a CPU has no datasheet row
    bad = runner.invoke(app, ["ceilings", "--device", "cpu", "--gemm-n", "0"])
    assert bad.exit_code == 2 and "--gemm-n: expected a positive int" in bad.output


def test_specs_command():
    result = runner.invoke(app, ["specs", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in json.loads(result.output)["gpus"]}
    assert rows["h100-sxm"]["hbm_tbps"] == 3.35 and rows["h200"]["idle_w"] == 75
    assert all(r["source"] and r["date"] for r in rows.values())
    table = runner.invoke(app, ["specs"])
    assert table.exit_code == 0 and "h100-sxm" in table.output and "mi300x" in table.output
