"""`tokprof run` on the CPU: the whole chain on the tiny preset, and its refusals."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from tokprof.models.config import ModelConfig
from tokprof.profiler.schema import load_run
from tokprof.runner import (
    EST_CAPTURE_LAUNCH_US,
    EST_COMPILE_S,
    EST_ENERGY_ALIGN_S,
    EST_GRAPH_INSTANTIATE_S,
    EST_KERNEL_OVERHEAD_S,
    RunConfig,
    available_memory_bytes,
    check_fits,
    estimate_gpu_seconds,
    graph_capture_seconds,
    memory_needed_bytes,
    other_gpu_rows,
    reference_runs,
    resolve_device,
    run_main,
)

FIXTURES = Path(__file__).parent / "data"


def small_cpu_config() -> RunConfig:
    rc = RunConfig.for_device(torch.device("cpu"))
    return dataclasses.replace(rc, batches=[1, 2], contexts=[64], e2e_batches=[2], e2e_contexts=[64], e2e_steps=4,
                               frameworks=["tokprof"], timing_kwargs={"min_time_s": 0.01, "max_time_s": 0.05})


def test_cpu_defaults_are_labelled_and_small():
    rc = RunConfig.for_device(torch.device("cpu"))
    assert (rc.model, rc.backend, rc.dtype, rc.energy) == ("tiny", "torch", "fp32", False)
    gpu = RunConfig.for_device(torch.device("cuda"))
    assert (gpu.model, gpu.backend, gpu.dtype) == ("llama-3.1-8b", "triton", "bf16")
    assert gpu.batches == [1, 8, 32, 128] and gpu.contexts == [1024, 8192]


def test_run_main_writes_run_report_and_history(tmp_path, capsys):
    db = tmp_path / "history.db"
    path = run_main(out_dir=tmp_path / "out", device="cpu", command=["tokprof", "run"], history_db=db,
                    config_override=small_cpu_config())
    run = load_run(path)
    assert run.provenance.device.kind == "cpu"
    assert run.ceilings is not None and run.ceilings.copy_gbps > 0
    assert {k.op for k in run.kernels} >= {"linear", "decode_attention", "rms_norm", "swiglu"}
    # On the CPU each point's calls are timed round-robin in step order: the cache state of the eager loop.
    assert {k.timing.mode for k in run.kernels} == {"sequence"}
    measured = [p for p in run.rollup if p["provenance"] == "measured"]
    assert {(p["batch"], p["context"]) for p in measured} == {(1, 64), (2, 64)}
    assert all(p["tokens_per_s_per_gpu"] > 0 for p in measured)
    # Rows for other GPUs, labelled: modelled here (no shipped reference measurements on this checkout).
    other = {(p["gpu"], p["provenance"]) for p in run.rollup if p["provenance"] != "measured"}
    assert {g for g, _ in other} == {"h100-sxm", "h200", "b200"}
    assert all(prov in ("modelled", "projected") for _, prov in other)
    assert [m["framework"] for m in run.e2e] == ["tokprof"]
    # a CPU run measures end to end in passes spread over the phase, merged into one record per point
    assert [m["passes"] for m in run.e2e] == [3] and run.e2e[0]["paired_kernels"]
    assert all(k.timing.note.startswith("3 passes") for k in run.kernels)  # the kernels too
    assert run.reconciliation and run.reconciliation[0]["layers"][0]["name"] == "L0"
    assert any("CPU run" in n for n in run.notes)
    assert any("cores busy over the" in n for n in run.notes)  # how shared the CPU was, as found
    report = tmp_path / "out" / "report" / path.stem / "report.html"  # one folder per run
    assert (tmp_path / "out" / "report" / "index.html").read_text().count(f"{path.stem}/report.html") == 1
    assert report.stat().st_size > 10_000
    assert db.exists()
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["run"] == str(path) and summary["kind"] == "cpu"
    # The eager loop's overheads are measured and recorded; L4 gets a prediction and the summary its error.
    assert run.overhead is not None and [h["batch"] for h in run.overhead["host_work"]] == [2]
    assert run.overhead["host_work"][0]["per_step_us"] >= 0 and run.overhead["dispatch"]
    assert run.cpu_load is not None and set(run.cpu_load["phases"]) == {"ceilings", "kernels", "overhead", "e2e"}
    l4 = next(lv for lv in run.reconciliation[-1]["layers"] if lv["name"] == "L4")
    assert l4["predicted_step_time_us"] > 0 and l4["prediction_error_pct"] is not None
    assert summary["prediction"]["points"] == 1 and summary["prediction"]["layer"] == "L4"
    assert "L4 pred" in printed and "L4 prediction" in printed
    # The findings on the console: the measured layers of each point, then the other GPUs' rows.
    assert "tokens/s per GPU by layer" in printed and "L2 vs e2e" in printed
    assert "other GPUs, llama-3.1-8b bf16" in printed and "h200 (modelled)" in printed


def test_resolve_device_errors_name_the_argument():
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asked for a GPU but torch sees none"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_memory_needed_counts_weights_and_kv():
    cfg = ModelConfig.from_name("llama-3.1-8b")
    weights = cfg.weight_bytes(torch.bfloat16)  # 8.03e9 params x 2 bytes
    kv = cfg.kv_bytes_per_token(torch.bfloat16) * 128 * 8192  # 131072 bytes per token
    assert cfg.kv_bytes_per_token(torch.bfloat16) == 2 * 32 * 8 * 128 * 2
    assert memory_needed_bytes(cfg, torch.bfloat16, 128, 8192) == int((weights + kv) * 1.1) + (2 << 30)


@pytest.fixture
def h100_memory(monkeypatch):
    """torch.cuda.get_device_properties as on an H100 80GB (81559 MiB), so the GPU defaults can be checked here."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=81559 << 20))


def test_gpu_defaults_drop_exactly_the_points_that_do_not_fit(h100_memory):
    rc = RunConfig.for_device(torch.device("cuda"))
    notes = check_fits(ModelConfig.from_name("llama-3.1-8b"), rc)
    # Batch 128 at 8k context needs 137 GB of KV cache; every other point fits in 80 GB.
    assert rc.e2e_points == [(1, 1024), (1, 8192), (8, 1024), (8, 8192), (32, 1024), (32, 8192), (128, 1024)]
    assert len(notes) == 1 and "batch 128 context 8192 skipped" in notes[0]
    # The batches and contexts left are still all four and both: only the explicit points keep (128, 8192) out.
    assert rc.e2e_batches == [1, 8, 32, 128] and rc.e2e_contexts == [1024, 8192]
    assert set(rc.framework_points) <= set(rc.e2e_points)


def test_gpu_defaults_fit_the_five_minute_budget(h100_memory):
    cfg = ModelConfig.from_name("llama-3.1-8b")
    rc = RunConfig.for_device(torch.device("cuda"))
    check_fits(cfg, rc)
    est = estimate_gpu_seconds(cfg, rc)
    # 60 distinct decode-step calls, each: 0.4 s timing + 1 s energy window (>= 1 s) + 0.2 s cool-down
    # + alignment + set-up.
    assert est["kernels"] == pytest.approx(60 * (0.4 + 1.0 + 0.2 + EST_ENERGY_ALIGN_S + EST_KERNEL_OVERHEAD_S)
                                           + EST_COMPILE_S)
    # 32 of them (embedding, norms, rope, append_kv, swiglu, greedy_sample, attention at batch 1 / 1k) are modelled
    # under 10 us on the H100: each also timed in graph mode (0.4 s) after a capture of at most 256 input copies.
    assert 32 * (0.4 + EST_GRAPH_INSTANTIATE_S) < est["graphs"] < 32 * (0.4 + EST_GRAPH_INSTANTIATE_S + 0.02)
    assert 15 < est["prefill"] < 40  # ~10 PFLOP of prefill at 400 TFLOP/s, once per point (not per mode)
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))
    assert est["total"] <= 300, est
    # The first defaults (1 s timing, 0.5 s cool-downs, transformers at every point) did not.
    old = dataclasses.replace(rc, timing_kwargs={"max_time_s": 1.0}, energy_kwargs={}, framework_points=None)
    assert estimate_gpu_seconds(cfg, old)["total"] > 300


def test_graph_capture_estimate_counts_the_rotating_copies():
    # RMSNorm of one 4096-wide bf16 row touches 16 KiB: uncapped 15,260 copies on a 50 MB L2 (each a launch in the
    # capture, ~0.3 s); capped at 256 copies, one pass (256 x 3 us > 500 us), 256 launches of 20 us + instantiation
    assert graph_capture_seconds(16 << 10, 3.0, 50_000_000) == pytest.approx(
        256 * EST_CAPTURE_LAUNCH_US * 1e-6 + EST_GRAPH_INSTANTIATE_S)
    # a 64 MiB call needs ceil(5 x 50 MB / 64 MiB) + 1 = 5 copies; 5 x 300 us > 500 us: one pass
    assert graph_capture_seconds(64 << 20, 300.0, 50_000_000) == pytest.approx(
        5 * EST_CAPTURE_LAUNCH_US * 1e-6 + EST_GRAPH_INSTANTIATE_S)
    # a 1 us call on 5 copies: ceil(500 / 5) = 100 passes, 500 captured launches
    assert graph_capture_seconds(64 << 20, 1.0, 50_000_000) == pytest.approx(
        500 * EST_CAPTURE_LAUNCH_US * 1e-6 + EST_GRAPH_INSTANTIATE_S)


def test_check_fits_refuses_a_model_larger_than_the_ram(monkeypatch):
    ram = (24 << 30, "this machine has available")
    monkeypatch.setattr("tokprof.runner.available_memory_bytes", lambda device: ram)
    rc = RunConfig.for_device(torch.device("cpu"), "llama-3.1-8b")  # fp32 on the CPU: ~32 GB of weights
    with pytest.raises(ValueError, match=r"--model llama-3.1-8b: needs about 3\d\.\d GB .* this machine has available "
                                         r"25\.8 GB; choose a smaller model \(e\.g\. tiny\)"):
        check_fits(ModelConfig.from_name("llama-3.1-8b"), rc)
    rc = RunConfig.for_device(torch.device("cpu"))
    assert check_fits(ModelConfig.from_name("tiny"), rc) == [] and rc.e2e_points == [(1, 128), (1, 512), (4, 128),
                                                                                      (4, 512)]


def test_cpu_available_memory_is_read_from_linux():
    total, has = available_memory_bytes(torch.device("cpu"))
    if total is None:
        pytest.skip("no /proc/meminfo here")
    assert total > 0 and has == "this machine has available"


def test_reference_runs_picks_the_newest_file_per_gpu(tmp_path):
    (tmp_path / "h100-sxm").mkdir()
    (tmp_path / "h100-sxm" / "run-2026-01.json").write_text("{}")
    (tmp_path / "h100-sxm" / "run-2026-02.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    found = reference_runs(tmp_path)
    assert found == {"h100-sxm": tmp_path / "h100-sxm" / "run-2026-02.json"}


def test_cpu_run_projects_other_gpus_from_a_shipped_reference(tmp_path, monkeypatch):
    """A reference RunResult under data/reference/<gpu>/ turns that GPU's rows from modelled into projected."""
    (tmp_path / "h100-sxm").mkdir()
    shutil.copy(FIXTURES / "run_h100.json", tmp_path / "h100-sxm" / "run-h100.json")
    monkeypatch.setattr("tokprof.runner.REFERENCE_DIR", tmp_path)
    run = load_run(FIXTURES / "run_h200.json")
    run.rollup = []
    notes = other_gpu_rows(run, RunConfig.for_device(torch.device("cpu")), Console(file=io.StringIO()))
    kinds = {(p["gpu"], p["provenance"]) for p in run.rollup}
    assert kinds == {("h100-sxm", "projected"), ("h200", "modelled"), ("b200", "modelled")}
    assert any("projected from the shipped reference run run-h100.json" in n for n in notes)
    # The projected rows are the reference's own measured points, carried at its measured efficiencies.
    ref = load_run(tmp_path / "h100-sxm" / "run-h100.json")
    measured = {(p["batch"], p["context"]) for p in ref.rollup if p["provenance"] == "measured"}
    assert {(p["batch"], p["context"]) for p in run.rollup if p["gpu"] == "h100-sxm"} == measured


def test_other_gpus_show_the_model_asked_for(tmp_path, monkeypatch):
    """`tokprof run --model llama-3.2-1b` on a CPU: the other GPUs' rows are llama-3.2-1b, and a shipped reference
    of another model (the fixture measured llama-3.1-8b) is not projected in its place."""
    (tmp_path / "h100-sxm").mkdir()
    shutil.copy(FIXTURES / "run_h100.json", tmp_path / "h100-sxm" / "run-h100.json")
    monkeypatch.setattr("tokprof.runner.REFERENCE_DIR", tmp_path)
    run = load_run(FIXTURES / "run_h200.json")
    run.rollup = []
    rc = RunConfig.for_device(torch.device("cpu"), "llama-3.2-1b")
    rc.other_gpu_model = "llama-3.2-1b"  # run_main sets it when --model is given
    notes = other_gpu_rows(run, rc, Console(file=io.StringIO()))
    assert {p["model"] for p in run.rollup} == {"llama-3.2-1b"}
    assert {(p["gpu"], p["provenance"]) for p in run.rollup} == {("h100-sxm", "modelled"), ("h200", "modelled"),
                                                                 ("b200", "modelled")}
    assert any("h100-sxm: the shipped reference" in n and "llama-3.1-8b, not llama-3.2-1b" in n for n in notes)
    # the modelled rows are those of a modelled roll-up of that model at the GPU sweep
    from tokprof.rollup import modelled

    want = modelled(ModelConfig.from_name("llama-3.2-1b"), "h200", [1, 8, 32, 128], [1024, 8192], "bf16")
    got = {(p["batch"], p["context"]): p["tokens_per_s_per_gpu"] for p in run.rollup if p["gpu"] == "h200"}
    assert got == pytest.approx({(p.batch, p.context): p.tokens_per_s_per_gpu for p in want})


def test_run_options_override_the_device_defaults():
    rc = RunConfig.for_device(torch.device("cpu")).with_options(batches=[2], contexts=[64], dtype="fp16",
                                                                 backend="triton", utilisation=0.5,
                                                                 skip=["e2e", "report"])
    assert (rc.batches, rc.contexts, rc.e2e_batches, rc.e2e_contexts) == ([2], [64], [2], [64])
    assert (rc.dtype, rc.backend, rc.utilisation, rc.skip) == ("fp16", "triton", 0.5, {"e2e", "report"})
    with pytest.raises(ValueError, match="--skip: expected some of"):
        RunConfig.for_device(torch.device("cpu")).with_options(skip=["kernels"])
    with pytest.raises(ValueError, match="--utilisation: expected a fraction"):
        RunConfig.for_device(torch.device("cpu")).with_options(utilisation=1.5)


def test_a_broken_reference_falls_back_to_modelled_rows(tmp_path, monkeypatch):
    (tmp_path / "b200").mkdir()
    (tmp_path / "b200" / "run.json").write_text('{"schema_version": 1}')
    monkeypatch.setattr("tokprof.runner.REFERENCE_DIR", tmp_path)
    run = load_run(FIXTURES / "run_h200.json")
    run.rollup = []
    notes = other_gpu_rows(run, RunConfig.for_device(torch.device("cpu")), Console(file=io.StringIO()))
    assert {p["provenance"] for p in run.rollup if p["gpu"] == "b200"} == {"modelled"}
    assert any(n.startswith("b200: the shipped reference") and "modelled instead" in n for n in notes)


def test_an_interrupted_run_keeps_its_kernels_and_says_where(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tokprof.runner.run_e2e_points", interrupt)  # Ctrl-C during the end-to-end step
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        run_main(out_dir=tmp_path, device="cpu", command=["tokprof", "run"], history_db=tmp_path / "h.db",
                 config_override=small_cpu_config(), console=Console(file=out, width=200))
    saved = list(tmp_path.glob("run-tiny-*.json"))
    assert len(saved) == 1 and f"{saved[0]} keeps what was measured" in out.getvalue()
    run = load_run(saved[0])
    assert run.kernels and all(k.timing.median_us > 0 for k in run.kernels) and run.ceilings is not None
    assert run.interrupted.startswith("interrupted (Ctrl-C) at ") and "during end-to-end measurements" in \
        run.interrupted


def test_an_interrupt_before_any_measurement_leaves_a_file_that_says_so(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tokprof.profiler.ceilings.measure_ceilings", interrupt)
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        run_main(out_dir=tmp_path, device="cpu", command=["tokprof", "run"], history_db=tmp_path / "h.db",
                 config_override=small_cpu_config(), console=Console(file=out, width=200))
    (saved,) = tmp_path.glob("run-*.json")
    run = load_run(saved)
    assert not run.kernels and run.ceilings is None and "during ceilings" in run.interrupted
    assert "interrupted during ceilings" in out.getvalue()


def test_ctrl_c_inside_a_save_keeps_the_last_measurement(tmp_path, monkeypatch):
    # SIGINT arrives while the file is being written: the save completes, then KeyboardInterrupt is raised.
    import os
    import signal

    from tokprof.profiler import schema

    run = load_run(FIXTURES / "run_h100.json")
    real_fsync = os.fsync

    def fsync_then_sigint(fd):
        real_fsync(fd)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(schema.os, "fsync", fsync_then_sigint)
    with pytest.raises(KeyboardInterrupt):
        schema.save_run(run, tmp_path / "r.json")
    assert len(load_run(tmp_path / "r.json").kernels) == len(run.kernels)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


CONCURRENT_RUN = """
import dataclasses, sys
import torch
import tokprof.profiler.bench as bench
import tokprof.runner as runner
from tokprof.cli import main

bench.utc_now = lambda: "2026-01-01T00:00:00Z"  # both processes in the same second, whenever they start
tiny = dataclasses.replace(runner.RunConfig.for_device(torch.device("cpu")), batches=[1], contexts=[16],
                           e2e_points=[], frameworks=[], timing_kwargs={"min_time_s": 0.005, "max_time_s": 0.01})
runner.RunConfig.for_device = classmethod(lambda cls, device, model=None: tiny)
sys.argv = ["tokprof", "run", "--device", "cpu", "--no-report", "-o", sys.argv[1], "--db", sys.argv[2]]
main()
"""


def test_concurrent_runs_in_one_folder_never_overwrite_each_other(tmp_path):
    import os
    import subprocess
    import sys

    from tokprof.reports.history import History

    out, db = tmp_path / "out", tmp_path / "history.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "COLUMNS": "120"}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_RUN, str(out), str(db)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    files = sorted(out.glob("run-*.json"))
    assert len(files) == 2, files
    runs = [load_run(f) for f in files]
    assert {r.provenance.timestamp_utc for r in runs} == {"2026-01-01T00:00:00Z"}  # the same second
    assert len({r.run_id for r in runs}) == 2 and all(r.kernels for r in runs)
    recorded = History(db).runs()
    assert sorted(r.run_id for r in recorded) == sorted(r.run_id for r in runs)
    assert sorted(Path(r.source).name for r in recorded) == [f.name for f in files]


def test_cli_run_interrupted_exits_130_without_a_traceback(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tokprof.cli import app

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tokprof.runner.run_main", interrupt)
    result = CliRunner().invoke(app, ["run", "--device", "cpu", "--out", str(tmp_path / "o"),
                                      "--db", str(tmp_path / "h.db")])
    assert result.exit_code == 130 and "Traceback" not in result.output


def test_a_bad_history_file_is_refused_before_the_run(tmp_path, monkeypatch):
    from tokprof.reports.history import HistoryDatabaseError

    def never(*args, **kwargs):
        raise AssertionError("measured before the history file was checked")

    monkeypatch.setattr("tokprof.profiler.ceilings.measure_ceilings", never)
    bad = tmp_path / "notes.txt"
    bad.write_text("not a database\n")
    with pytest.raises(HistoryDatabaseError, match="not a tokprof history database"):
        run_main(out_dir=tmp_path / "o", device="cpu", command=["tokprof", "run"], history_db=bad,
                 config_override=small_cpu_config(), console=Console(file=io.StringIO()))
    # Another program's SQLite database, a newer tokprof's, an unwritable one: each refused with its real cause.
    import sqlite3

    from tokprof.reports.history import APPLICATION_ID

    foreign, future = tmp_path / "other.db", tmp_path / "future.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.close()
    con = sqlite3.connect(future)
    con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    con.execute("PRAGMA user_version = 99")
    con.execute("CREATE TABLE runs (x)")
    con.close()
    for db, cause in ((foreign, "another program"), (future, "schema version 99 is newer")):
        with pytest.raises(HistoryDatabaseError, match=cause):
            run_main(out_dir=tmp_path / "o", device="cpu", command=["tokprof", "run"], history_db=db,
                     config_override=small_cpu_config(), console=Console(file=io.StringIO()))
    monkeypatch.setattr("tokprof.reports.history.os.access", lambda path, mode: False)  # tests may run as root
    with pytest.raises(HistoryDatabaseError, match="cannot record runs there .*not writable"):
        run_main(out_dir=tmp_path / "o", device="cpu", command=["tokprof", "run"], history_db=tmp_path / "new.db",
                 config_override=small_cpu_config(), console=Console(file=io.StringIO()))
    assert not list((tmp_path / "o").glob("run-*.json")) if (tmp_path / "o").exists() else True
