"""The step-time model (tokprof.rollup.step_model): each term against a hand computation, the overrides, and the
assumptions it prints; then the validation against published measurements and its goal."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from tokprof import rollup
from tokprof.cli import app
from tokprof.models import ModelConfig
from tokprof.models.plan import KernelCall, decode_plan
from tokprof.profiler.collectives import Link
from tokprof.profiler.devices import load_specs
from tokprof.rollup.step_model import StepModel
from tokprof.rollup.validate import GOAL_MAX_ABS, GOAL_MEDIAN_ABS, load_published, validate

H100 = load_specs()["h100-sxm"]
NVLINK = Link("nvlink", 450.0, "test")
PCIE = Link("pcie", 64.0, "test")


def test_op_time_is_latency_plus_roof_over_the_ops_efficiency():
    m = StepModel()
    call = KernelCall("linear", {"M": 1, "N": 6144, "K": 4096}, "bf16", 1)
    flops, nbytes = call.cost()
    t, roof, bound = m.op_time_us(call, H100, "bf16")
    assert bound == "memory" and roof == pytest.approx(nbytes / 3.35e12 * 1e6)
    assert t == pytest.approx(3.5 + nbytes / (3.35e12 * 0.80) * 1e6)  # defaults: 3.5 us + roof / 0.80
    # a small call is latency-bound: its achieved fraction of the roof is far below the curve's ceiling
    tiny = KernelCall("rms_norm", {"T": 1, "H": 64, "residual": 0}, "bf16", 1)
    t_tiny, roof_tiny, _ = m.op_time_us(tiny, H100, "bf16")
    assert roof_tiny / t_tiny < 0.01 and t_tiny == pytest.approx(3.5 + roof_tiny / 0.80)
    # a compute-bound GEMM approaches compute_efficiency of the peak
    big = KernelCall("linear", {"M": 8192, "N": 8192, "K": 8192}, "bf16", 1)
    t_big, roof_big, bound_big = m.op_time_us(big, H100, "bf16")
    assert bound_big == "compute" and t_big == pytest.approx(3.5 + 2 * 8192**3 / (989e12 * 0.75) * 1e6)
    # a flat stated efficiency replaces the curve: t = roof / efficiency
    assert m.op_time_us(call, H100, "bf16", efficiency=0.5)[0] == pytest.approx(roof / 0.5)


def test_step_overhead_graph_and_eager():
    m = StepModel()
    assert m.overhead_us(200, 5000.0) == pytest.approx(100.0 + 200 * 0.3)  # graph: base + nodes
    eager = m.with_overrides({"execution": "eager"})
    assert eager.overhead_us(200, 5000.0) == pytest.approx(400.0)  # the GPU is slower than the launches
    assert eager.overhead_us(200, 1000.0) == pytest.approx(400.0 + 200 * 6.0 - 1000.0)  # host-bound


def test_collectives_by_algorithm_size_and_gpu_count():
    m = StepModel()
    bw = 450e9 * 0.7 / 1e6  # bytes per us at the stated link efficiency
    n, nbytes = 8, 8 * 4096 * 2
    ring = 6.6 + 2 * 7 * 0.6 + nbytes * 2 * 7 / 8 / bw
    tree = 6.8 + 2 * 3 * 0.6 + nbytes * 2 * 7 / 8 / bw
    one_shot = 15.0 + nbytes * 7 / bw
    two_shot = 30.0 + nbytes * 2 * 7 / 8 / bw
    for algo, want in (("ring", ring), ("tree", tree), ("one_shot", one_shot), ("two_shot", two_shot)):
        t, used = m.with_overrides({"collective_algorithm": algo}).collective_us("all_reduce", nbytes, n, NVLINK)
        assert (used, t) == (algo, pytest.approx(want)), algo
    t, used = m.collective_us("all_reduce", nbytes, n, NVLINK)  # auto: the fastest, a tree for small messages
    assert used == "tree" and t == pytest.approx(tree)
    big = 256 << 20  # large messages: bandwidth decides (ring, tree, two-shot and NVLS move 2(n-1)/n of the buffer)
    t_big, used_big = m.collective_us("all_reduce", big, n, NVLINK)
    assert used_big != "one_shot" and t_big == pytest.approx(min(ring, tree) - nbytes * 2 * 7 / 8 / bw
                                                              + big * 2 * 7 / 8 / bw)
    # PCIe: no one-shot / NVLS; 1 us per hop; and an all-gather has n-1 hops and moves (n-1)/n
    t_pcie, used_pcie = m.collective_us("all_reduce", nbytes, 2, PCIE)  # n = 2: ring 6.6 + 2 hops < tree 6.8 + 2
    assert used_pcie == "ring" and t_pcie == pytest.approx(6.6 + 2 * 1 * 1.0 + nbytes * 1 / (64e9 * 0.7 / 1e6))
    t_ag, used_ag = m.with_overrides({"collective_algorithm": "ring"}).collective_us("all_gather", nbytes, 4, NVLINK)
    assert used_ag == "ring" and t_ag == pytest.approx(6.6 + 3 * 0.6 + nbytes * 3 / 4 / bw)
    with pytest.raises(ValueError, match="'nvls' is not available for all_reduce over pcie"):
        m.with_overrides({"collective_algorithm": "nvls"}).collective_us("all_reduce", nbytes, 2, PCIE)
    # a stated fixed latency replaces the algorithms: latency + bytes x busbw factor / (link x efficiency)
    fixed, how = m.with_overrides({"collective_latency_us": 10.0}).collective_us("all_reduce", nbytes, n, NVLINK)
    assert how == "fixed latency" and fixed == pytest.approx(10.0 + nbytes * 2 * 7 / 8 / bw)


def test_step_sums_ops_collectives_and_overhead():
    cfg = ModelConfig.from_name("tiny")
    calls = decode_plan(cfg, 2, 64, "bf16", tp=2)
    m = StepModel()
    est = m.step(calls, H100, "bf16")
    want = 0.0
    kernels = 0
    for c in calls:
        if c.op in ("all_reduce", "all_gather"):
            want += c.count * m.collective_us(c.op, c.shape["bytes"], c.shape["world"], NVLINK)[0]
        else:
            want += c.count * m.op_time_us(c, H100, "bf16")[0]
            kernels += c.count
    assert est.kernel_calls == kernels and est.gpu_time_us == pytest.approx(want)
    assert est.overhead_us == pytest.approx(100.0 + 0.3 * kernels)
    assert est.step_time_us == pytest.approx(sum(s.total_us for s in est.shares))
    assert est.shares[-1].op == "step_overhead" and est.shares[-1].bound == "overhead"


def test_overrides_assumptions_and_json(tmp_path):
    m = StepModel().with_overrides({"call_latency_us": 2.0, "memory_efficiency": {"linear": 0.9}})
    assert m.call_latency_us == 2.0 and m.memory_efficiency == {"linear": 0.9, "decode_attention": 0.85,
                                                                 "default": 0.80}
    listed = {a.name: a for a in m.assumptions()}
    assert listed["call_latency_us"].source == "stated by the user" and listed["call_latency_us"].unit
    assert "NCCL src/graph/tuning.cc" in listed["collective_hop_us"].source
    assert all(a.source for a in StepModel().assumptions())
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"step_overhead_us": {"graph": 500}, "collective_algorithm": "ring"}))
    f = StepModel.from_json(path)
    assert f.step_overhead_us["graph"] == 500 and f.collective_algorithm == "ring"
    assert dict(f.sources)["step_overhead_us"] == "stated in a.json"
    with pytest.raises(ValueError, match="assumptions: unknown name 'nope'"):
        StepModel().with_overrides({"nope": 1})
    with pytest.raises(ValueError, match=r"memory_efficiency\[linear\]: expected a fraction in \(0, 1\]"):
        StepModel().with_overrides({"memory_efficiency": {"linear": 1.5}})
    with pytest.raises(ValueError, match="execution: expected one of"):
        StepModel(execution="turbo")
    path.write_text("{nope")
    with pytest.raises(ValueError, match="is not valid JSON"):
        StepModel.from_json(path)


def test_modelled_takes_a_step_model_and_prints_its_notes():
    cfg = ModelConfig.from_name("llama-3.1-8b")
    (base,) = rollup.modelled(cfg, "h100", [8], [1024])
    (slow,) = rollup.modelled(cfg, "h100", [8], [1024], step_model=StepModel().with_overrides(
        {"step_overhead_us": {"graph": 1100.0}}))
    assert slow.step_time_us - base.step_time_us == pytest.approx(1000.0)
    assert base.overhead_time_us == pytest.approx(100.0 + 0.3 * sum(c.count for c in decode_plan(cfg, 8, 1024,
                                                                                                    "bf16")))
    assert "step model: op time = 3.5 us + roof / efficiency" in base.notes[0]


def test_published_rows_have_sources_and_known_models():
    doc = load_published()
    assert len(doc["rows"]) >= 20 and set(doc["calibration_sources"]).isdisjoint(doc["held_out_sources"])
    for r in doc["rows"]:
        src = doc["sources"][r["source"]]
        assert src["url"].startswith("https://github.com/") and src["title"] and src["setup"]
        ModelConfig.from_name(r["model"])
        assert r["dtype"] in ("bf16", "fp16") and r["gpu"] in load_specs()
    # gpt-fast's README (Llama-2-7B, 8x A100-80GB, batch 1): 104.9 tokens/s at tp 1, 328.43 at tp 8
    gf = {(r["model"], r["tp"]): r["value"] for r in doc["rows"] if r["source"] == "gpt-fast"}
    assert gf[("llama-2-7b", 1)] == 104.9 and gf[("llama-2-7b", 8)] == 328.43


def test_validation_meets_the_goal_on_calibration_and_held_out_rows():
    report = validate()
    for r in report.rows:
        assert r.error is not None and r.error == pytest.approx(r.modelled / r.published - 1)
    for split in ("all", "calibration", "held_out"):
        st = report.stats[split]
        assert st.rows > 0 and st.median_abs <= GOAL_MEDIAN_ABS and st.max_abs <= GOAL_MAX_ABS, split
    assert report.stats["held_out"].rows >= 15
    # the published bound: vLLM and SGLang use at most 50% of an H100's bandwidth on Llama-3.2-1B at batch 1
    (claim,) = report.claims
    assert claim.holds is True and 0.3 < claim.modelled_bandwidth_fraction <= 0.5
    # a step model without overhead and with a flat 100% efficiency is far off: the goal can fail
    ideal = StepModel().with_overrides({"call_latency_us": 0.0, "step_overhead_us": {"graph": 0.0},
                                        "launch_us": {"graph": 0.0}, "collective_base_us": {"ring": 0.0, "tree": 0.0,
                                                                                             "one_shot": 0.0},
                                        "collective_hop_us": {"nvlink": 0.0},
                                        "memory_efficiency": {"linear": 1.0, "default": 1.0,
                                                              "decode_attention": 1.0}})
    assert validate(step_model=ideal).stats["all"].meets_goal() is False


def test_cli_validate_prints_the_table_and_one_json_line(tmp_path):
    res = CliRunner().invoke(app, ["validate"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["command"] == "validate" and doc["stats"]["all"]["meets_goal"] is True
    text = res.stdout
    assert "gpt-fast*" in text and "lmdeploy" in text and "median |error|" in text and "meets" in text
    assert len(doc["rows"]) == len(load_published()["rows"])
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"sources": {}, "rows": [{"source": "x"}]}))
    res = CliRunner().invoke(app, ["validate", "--published", str(bad)])
    assert res.exit_code == 2 and "misses" in res.output and "Traceback" not in res.output


def test_cli_rollup_step_model_options():
    base = ["rollup", "--model", "llama-3.1-8b", "--gpu", "h100", "--modelled", "--batch", "8", "--context", "1024",
            "--tp", "2"]
    env = {"COLUMNS": "80"}
    a = CliRunner().invoke(app, base, env=env)
    b = CliRunner().invoke(app, [*base, "--step-overhead-us", "1100", "--collective-algorithm", "one_shot",
                                 "--call-latency-us", "3.5"], env=env)
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    pa = json.loads(a.stdout.strip().splitlines()[-1])["points"][0]
    pb = json.loads(b.stdout.strip().splitlines()[-1])["points"][0]
    assert pb["overhead_time_us"] - pa["overhead_time_us"] == pytest.approx(1000.0)
    assert pb["collective_time_us"] > pa["collective_time_us"]  # one-shot (15 us) is slower than auto's ring at n = 2
    assert "step-model assumptions" in a.stdout and "collective_hop_us" in a.stdout
    assert "stated on the command line" in " ".join(b.stdout.split())
    bad = CliRunner().invoke(app, [*base, "--collective-algorithm", "smoke"], env=env)
    assert bad.exit_code == 2 and "collective_algorithm: expected one of" in " ".join(bad.output.split())
    fixed = CliRunner().invoke(app, [*base, "--collective-latency-us", "50"], env=env)
    pf = json.loads(fixed.stdout.strip().splitlines()[-1])["points"][0]
    assert pf["collective_time_us"] > 64 * 50 and math.isfinite(pf["step_time_us"])


def test_efficiency_curves_fitted_to_reference_measurements():
    from types import SimpleNamespace

    from tokprof.rollup.step_model import fit_efficiency_curves, reference_step_model

    def k(op: str, roof: float, t: float, bound: str = "memory") -> SimpleNamespace:
        r = SimpleNamespace(bound=bound, t_roof_datasheet_us=roof, suspicious=False)
        return SimpleNamespace(op=op, time_us=t, roofline=r)

    # t = 2 us + roof / 0.7 exactly; a compute-bound call and an op with too few points are ignored
    run = SimpleNamespace(kernels=[k("linear", r, 2.0 + r / 0.7) for r in (1.0, 10.0, 100.0, 1000.0)]
                          + [k("linear", 5.0, 1e6, "compute"), k("rope", 1.0, 4.0)])
    curves = fit_efficiency_curves(run)
    assert set(curves) == {"linear"}
    eff, latency = curves["linear"]
    assert eff == pytest.approx(0.7) and latency == pytest.approx(2.0)
    assert reference_step_model("no-such-gpu") is None  # no shipped reference: the defaults apply
    fitted = StepModel().with_overrides({"memory_efficiency": {"linear": eff}, "op_call_latency_us": {"linear": 2.0}})
    call = KernelCall("linear", {"M": 1, "N": 4096, "K": 4096}, "bf16", 1)
    t, roof, _ = fitted.op_time_us(call, H100, "bf16")
    assert t == pytest.approx(2.0 + roof / 0.7)
