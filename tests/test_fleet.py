"""Fleet sweeps on a local Ray: two CPU "nodes" (custom resources standing in for GPU types) each run a small
bottom-up roll-up of the tiny preset; both RunResults come back, load, are recorded in the history database, and
are compared. Skipped when Ray (the optional `fleet` extra) is not importable."""

from __future__ import annotations

import functools
import os
import time

import pytest

from tokprof.fleet import (
    FleetTarget,
    bottom_up_task,
    cpu_targets,
    gpu_target,
    missing_resources,
    run_fleet,
    task_by_name,
)
from tokprof.profiler.schema import load_run

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'tokprof[fleet]')")


def test_gpu_targets_ask_for_one_gpu_of_the_accelerator_type() -> None:
    h100, h200 = gpu_target("h100"), gpu_target("H200")
    assert h100.ray_options() == {"num_gpus": 1.0, "num_cpus": 1, "max_retries": 0, "accelerator_type": "H100"}
    from ray.util.accelerators import accelerators

    assert h200.accelerator_type == accelerators.NVIDIA_H200 == "H200"
    assert h100.needs() == {"GPU": 1.0, "accelerator_type:H100": 0.001}
    # a cluster with one H100 node and no H200: only the H200 target is missing
    cluster = {"CPU": 16.0, "GPU": 1.0, "accelerator_type:H100": 1.0}
    assert missing_resources(h100, cluster) == []
    assert missing_resources(h200, cluster) == ["accelerator_type:H200 0.001 (cluster has 0)"]
    with pytest.raises(ValueError, match="gpus: expected names among"):
        gpu_target("h9000")
    with pytest.raises(ValueError, match="task: expected 'run' or 'bottom-up'"):
        task_by_name("train")


def test_local_ray_fleet_of_two_cpu_nodes(tmp_path) -> None:
    names = ["cpu_a", "cpu_b"]
    targets = cpu_targets(names)
    # an absent stand-in: fails at once with the cluster's resources instead of pending for ever
    ghost = FleetTarget(name="ghost", device="cpu", num_gpus=0.0, resources={"tokprof_node_ghost": 1.0})
    # a node whose task raises (it asks for CUDA on a CPU node): reported, and the other nodes' runs still count
    broken = FleetTarget(name="broken", device="cuda", num_gpus=0.0, resources={"tokprof_node_broken": 1.0})
    task = functools.partial(bottom_up_task, batches=(1,), contexts=(16,), backend="torch", dtype="fp32",
                             ceilings=None,
                             timing_kwargs={"min_samples": 3, "min_time_s": 0.0, "max_time_s": 0.02,
                                            "warmup_ms": 0.0})
    db = tmp_path / "history.db"
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 1024 * 1024,
             resources={f"tokprof_node_{n}": 1.0 for n in [*names, "broken"]},
             runtime_env={"env_vars": {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}})
    try:
        result = run_fleet([*targets, ghost, broken], "tiny", tmp_path / "fleet", task=task, db=db, report=True,
                           timeout_s=120)
        assert ray.is_initialized(), "run_fleet must leave a Ray connection it did not open"
    finally:
        ray.shutdown()
    elapsed = time.perf_counter() - t0

    assert set(result.failures) == {"ghost", "broken"}, result.failures
    assert "CUDA" in result.failures["broken"]
    assert "tokprof_node_ghost 1 (cluster has 0)" in result.failures["ghost"]
    assert set(result.runs) == set(names)
    for name in names:
        run = load_run(result.runs[name])
        assert run.model is not None and run.model["name"] == "tiny"
        assert run.kernels, f"{name}: no kernel measurement came back"
        assert {k.device for k in run.kernels} == {run.provenance.device.name}
        points = run.rollup
        assert len(points) == 1 and points[0]["batch"] == 1 and points[0]["context"] == 16
        step_us = sum(op["total_us"] for op in points[0]["ops"])
        assert points[0]["step_time_us"] == pytest.approx(step_us, rel=1e-9)
        assert points[0]["tokens_per_s_per_gpu"] == pytest.approx(1e6 / step_us, rel=1e-9)
    assert result.recorded == names
    from tokprof.reports.history import History

    recorded = {r.run_id for r in History(db).runs()}
    assert recorded == {load_run(result.runs[n]).run_id for n in names}
    text = result.compare.read_text()
    assert "cpu_b against cpu_a" in text
    assert result.report is not None and result.report.name == "report.md"
    assert all(f"{name}.json" in result.report.read_text() for name in names)
    assert elapsed < 90, f"fleet test took {elapsed:.0f} s"


def test_cli_fleet_refuses_an_unknown_gpu_type() -> None:
    from typer.testing import CliRunner

    from tokprof.cli import app

    result = CliRunner().invoke(app, ["fleet", "--gpus", "h100,h900", "--model", "tiny"])
    assert result.exit_code == 2, result.output
    assert "gpus: expected names among" in " ".join(result.output.split())
