"""Systems (issue 18): links, all-to-all placement, model shape, curve terms and each factor in isolation."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from tokprof.cli import app
from tokprof.models.config import ModelConfig
from tokprof.rollup import capacity
from tokprof.rollup.curve import (
    MTP_ACCEPTANCE,
    PRECISIONS,
    Features,
    Workload,
    _prefill_tokens_per_s_per_gpu,
    math_peak,
    serving_curve,
    weight_bytes_per_gpu,
)
from tokprof.rollup.factors import FACTOR_ORDER, Scenario, compare_systems, switch
from tokprof.rollup.model_shape import DEEPSEEK_R1_HF_CONFIG, ModelShape, deepseek_r1_shape
from tokprof.rollup.step_model import StepModel
from tokprof.rollup.systems import SCALE_OUT_EFFICIENCY, all_to_all_us, hardware, load_systems, resolve_system

H200 = hardware(resolve_system("hgx-h200"))
GB300 = hardware(resolve_system("gb300-nvl72"))
SM = StepModel()
LLAMA = ModelShape.from_config(ModelConfig.from_name("llama-3.1-8b"))


def test_systems_table_links_prices_sources():
    systems = load_systems()
    for key in ("hgx-h100", "hgx-h200", "hgx-b200", "hgx-b300", "gb200-nvl72", "gb300-nvl72"):
        s = systems[key]
        assert s.scale_up.source and s.scale_out.source
    assert systems["hgx-h200"].gpus_per_domain == 8 and systems["gb300-nvl72"].gpus_per_domain == 72
    assert systems["hgx-h200"].scale_up.gbps_per_direction == 450.0  # NVLink 4: 900 GB/s both directions
    assert systems["gb300-nvl72"].scale_up.gbps_per_direction == 900.0  # NVLink 5: 1.8 TB/s both directions
    assert systems["hgx-h200"].scale_out.gbps_per_direction == 50.0  # ConnectX-7 400 Gb/s
    assert systems["gb300-nvl72"].scale_out.gbps_per_direction == 100.0  # ConnectX-8 800 Gb/s
    # prices and power from the InferenceX-style price sheet
    assert systems["hgx-h200"].usd_per_gpu_hour == 1.41 and systems["hgx-h200"].all_in_kw_per_gpu == 1.73
    assert systems["gb300-nvl72"].usd_per_gpu_hour == 2.65
    # public numbers: NVLink per GPU is 18x the NIC on an NVL72 rack with ConnectX-7 (900 / 50)
    assert systems["gb200-nvl72"].scale_up.gbps_per_direction / systems["gb200-nvl72"].scale_out.gbps_per_direction \
        == 18.0


def test_b300_needs_a_spec_row_or_uses_it():
    s = resolve_system("b300")
    if s.spec is None:
        with pytest.raises(ValueError, match="gpus.json"):
            hardware(s)
    else:
        assert hardware(s).memory_gb >= 270


def test_unknown_system_is_a_clear_error():
    with pytest.raises(ValueError, match="system: expected one of"):
        resolve_system("tpu-v9")


def test_ep8_to_ep16_on_hgx_crosses_the_scale_out_link_and_costs_what_it_costs():
    nbytes = 8 << 20  # each GPU sends 8 MiB spread over the ranks
    base, eff = SM.collective_base_us["one_shot"], SM.collective_efficiency
    t8, link8 = all_to_all_us(H200, nbytes, 8, SM)
    assert link8 == "nvlink"
    assert t8 == pytest.approx(base + 0.6 + nbytes * 7 / 8 / (450e3 * eff))
    t16, link16 = all_to_all_us(H200, nbytes, 16, SM)
    assert link16 == "scale-out"
    # half of each GPU's bytes go to the other node through its 50 GB/s NIC
    assert t16 == pytest.approx(base + 5.0 + nbytes * 8 / 16 / (50e3 * SCALE_OUT_EFFICIENCY))
    # the bandwidth terms: 8/16 of the bytes at 45 GB/s vs 7/8 at 315 GB/s = 4x
    assert (t16 - base - 5.0) / (t8 - base - 0.6) == pytest.approx((0.5 / 45.0) / (0.875 / 315.0))
    # on an NVL72 rack 16 (and 72) ranks stay on NVLink
    t16r, linkr = all_to_all_us(GB300, nbytes, 16, SM)
    assert linkr == "nvlink" and t16r == pytest.approx(base + 0.6 + nbytes * 15 / 16 / (900e3 * eff))
    assert all_to_all_us(GB300, nbytes, 72, SM)[1] == "nvlink"
    assert all_to_all_us(GB300, nbytes, 1, SM)[0] == 0


def test_curve_points_name_the_link_their_all_to_all_takes():
    shape = deepseek_r1_shape()
    feats = Features(disaggregation=False, mtp_depths=(0,), gpu_counts=(8, 16))
    for hw, expect16 in ((H200, "scale-out"), (GB300, "nvlink")):
        c = serving_curve(shape, hw, Workload(1024, 1024), "fp8", features=feats)
        links = {(p.gpus, p.tp): p.a2a_link for p in c.points}
        assert links[(8, 1)] == "nvlink" and links[(16, 1)] == expect16


def test_deepseek_r1_shape_against_published_counts():
    s = deepseek_r1_shape()
    assert s.total_params == pytest.approx(671e9, rel=2e-3)  # "671B total parameters" (DeepSeek-V3 report)
    assert s.active_params == pytest.approx(37e9, rel=0.02)  # "37B activated for each token"
    assert s.kv_elems_per_token == DEEPSEEK_R1_HF_CONFIG["kv_lora_rank"] + DEEPSEEK_R1_HF_CONFIG["qk_rope_head_dim"]
    assert s.kv_split_max == 1 and s.moe_layers == 58 and s.has_mtp


def test_deepseek_r1_shape_from_the_model_config_when_tokprof_has_it():
    try:  # the MoE/MLA presets of tokprof.models.config (DeepSeek-V3/R1); the published-config shape otherwise
        cfg = ModelConfig.from_name("deepseek-r1")
    except ValueError:
        from tokprof.rollup.model_shape import shape_for

        shape, source = shape_for("deepseek-r1")
        assert shape == deepseek_r1_shape() and "config.json" in source
        return
    assert ModelShape.from_config(cfg) == deepseek_r1_shape()


def test_dense_weights_per_gpu_match_the_capacity_model():
    cfg = ModelConfig.from_name("llama-3.1-8b")
    for tp in (1, 2, 4):
        ours = weight_bytes_per_gpu(LLAMA, "bf16", tp, tp, False)
        theirs = capacity.weight_bytes_per_gpu(cfg, "bf16", tp)
        assert ours == pytest.approx(theirs, rel=1e-3)


def test_precision_bytes_and_math_fallback():
    assert PRECISIONS["fp4"]["weight_bytes"] == 0.5625  # NVFP4: 4 bits + an fp8 scale per 16
    assert math_peak(H200, "fp4") == (1979.0, "fp8")  # Hopper has no FP4 tensor cores: W4A8
    shape = deepseek_r1_shape()
    w8 = weight_bytes_per_gpu(shape, "fp8", 8, 1, False)
    w4 = weight_bytes_per_gpu(shape, "fp4", 8, 1, False)
    assert 0.5 < w4 / w8 < 0.6


def test_mtp_tokens_per_step_and_draft_cost():
    shape = deepseek_r1_shape()
    c = serving_curve(shape, GB300, Workload(1024, 1024), "fp8",
                      features=Features(disaggregation=False, mtp_depths=(0, 2), gpu_counts=(8,)))
    by = {(p.mtp, p.tp, p.batch): p for p in c.points}
    assert by[(2, 1, 64)].tokens_per_step == pytest.approx(1 + MTP_ACCEPTANCE + MTP_ACCEPTANCE ** 2)
    assert by[(0, 1, 64)].tokens_per_step == 1
    # the verify step computes 3 tokens per sequence and drafts twice: slower per step, more tokens per user
    assert by[(2, 1, 64)].step_time_us > by[(0, 1, 64)].step_time_us
    assert by[(2, 1, 1)].tokens_per_s_per_user > by[(0, 1, 1)].tokens_per_s_per_user


def test_disaggregated_pool_ratio_by_hand():
    shape = deepseek_r1_shape()
    wl = Workload(8192, 1024)
    c = serving_curve(shape, GB300, wl, "fp8", features=Features(mtp_depths=(0,), gpu_counts=(16,)))
    p = next(p for p in c.points if p.mode == "disaggregated" and p.tp == 1 and p.batch == 64)
    rate = _prefill_tokens_per_s_per_gpu(shape, GB300, "fp8", SM, wl.prefill_context, 16)
    r = p.output_tokens_per_s_per_decode_gpu * wl.isl / wl.osl / rate
    assert p.prefill_gpus_per_decode_gpu == pytest.approx(r)
    assert p.output_tokens_per_s_per_gpu == pytest.approx(p.output_tokens_per_s_per_decode_gpu / (1 + r))
    agg = next(q for q in c.points if q.mode == "aggregated" and q.tp == 1 and q.batch == 64)
    assert agg.step_time_us > p.step_time_us  # prefill chunks ride in the aggregated step


def test_capacity_caps_the_batch():
    shape = deepseek_r1_shape()
    feats = Features(disaggregation=False, mtp_depths=(0,), gpu_counts=(8,))
    small = serving_curve(shape, H200, Workload(1024, 1024), "fp8", features=feats)
    big = serving_curve(shape, H200.with_(memory_gb=288.0), Workload(1024, 1024), "fp8", features=feats)
    assert max(p.batch for p in big.points) > max(p.batch for p in small.points)
    for p in small.points:
        assert p.memory_bytes_per_gpu <= 141e9 * 0.9
    # DeepSeek-R1 fp8 does not fit on one or two H200s
    assert {p.gpus for p in small.points} == {8}
    assert not serving_curve(shape, H200, Workload(1024, 1024), "fp8",
                             features=replace(feats, gpu_counts=(2,))).points


def test_frontier_is_pareto_and_costs_follow():
    c = serving_curve(LLAMA, H200, Workload(1024, 1024), "bf16")
    f = c.frontier
    assert all(a.tokens_per_s_per_user < b.tokens_per_s_per_user for a, b in zip(f, f[1:], strict=False))
    assert all(a.output_tokens_per_s_per_gpu > b.output_tokens_per_s_per_gpu for a, b in zip(f, f[1:], strict=False))
    for p in f:
        assert p.usd_per_million_tokens == pytest.approx(1.41 / (p.output_tokens_per_s_per_gpu * 3600 / 1e6))
        assert p.tokens_per_s_per_mw == pytest.approx(p.output_tokens_per_s_per_gpu * 1000 / 1.73)
        assert p.provenance == "modelled"
    best = c.best_at(50.0)
    assert best.tokens_per_s_per_user >= 50
    assert c.best_at(1e9) is None


@pytest.mark.parametrize("field,value,factor,wl", [("hbm_tbps", 9.6, "HBM bandwidth", "1k/1k"),
                                                   ("memory_gb", 282.0, "HBM capacity -> batch", "8k/1k")])
def test_one_factor_alone_carries_the_whole_ratio(field, value, factor, wl):
    a = Scenario(hw=H200, precision="bf16", features=Features(disaggregation=False, mtp_depths=(0,)))
    b = replace(a, hw=H200.with_(**{field: value}))
    # at 8k/1k and a low interactivity the batch is capped by memory: more HBM, a bigger batch
    cmp = compare_systems(LLAMA, a, b, Workload.parse(wl), 30.0 if wl == "1k/1k" else 5.0, shapley=True)
    assert cmp.ratio > 1.0
    for s in cmp.steps:
        expect = math.log(cmp.ratio) if s.name == factor else 0.0
        assert s.log_ratio == pytest.approx(expect, abs=1e-12)
        assert s.shapley_log_ratio == pytest.approx(expect, abs=1e-12)


def test_factors_add_up_in_both_orders_and_shapley():
    a = Scenario(hw=H200, precision="bf16", features=Features(disaggregation=False, mtp_depths=(0,)))
    b = replace(a, hw=H200.with_(hbm_tbps=8.0, memory_gb=288.0))
    cmp = compare_systems(LLAMA, a, b, Workload(1024, 1024), 30.0, shapley=True)
    total = math.log(cmp.ratio)
    assert sum(s.log_ratio for s in cmp.steps) == pytest.approx(total)
    assert sum(s.reverse_log_ratio for s in cmp.steps) == pytest.approx(total)
    assert sum(s.shapley_log_ratio for s in cmp.steps) == pytest.approx(total)
    assert switch(a, b, set(FACTOR_ORDER)) == b


def test_switch_takes_each_factor_from_b():
    a = Scenario.of("hgx-h200", "fp8", Features(disaggregation=False, mtp_depths=(0,)))
    b = Scenario.of("gb300-nvl72", "fp4")
    s = switch(a, b, {"scale-up domain -> EP"})
    assert s.hw.gpus_per_domain == 72 and s.hw.nvlink_gbps == 900.0 and s.hw.hbm_tbps == H200.hbm_tbps
    s = switch(a, b, {"MTP", "precision"})
    assert s.features.mtp_depths == b.features.mtp_depths and s.precision == "fp4" and not s.features.disaggregation


def test_workload_parse():
    assert Workload.parse("8k/1k") == Workload(8192, 1024)
    assert Workload.parse("1000/200") == Workload(1000, 200)
    wl = Workload(8192, 1024)
    assert (wl.prefill_per_output, wl.decode_context, wl.prefill_context, wl.seq_tokens) == (8, 8704, 4096, 9216)
    mix = Workload.parse("1k/1k:3,8k/1k:1")  # weights normalised: 3/4 short and 1/4 long requests
    assert mix.mix == ((1024, 1024, 0.75), (8192, 1024, 0.25)) and (mix.isl, mix.osl) == (2816, 1024)
    assert mix.prefill_per_output == pytest.approx((0.75 * 1024 + 0.25 * 8192) / 1024)
    assert mix.decode_context == pytest.approx(0.75 * 1536 + 0.25 * 8704) and mix.seq_tokens == 9216
    assert mix.prefill_context == pytest.approx((0.75 * 1024 * 512 + 0.25 * 8192 * 4096) / (0.75 * 1024 + 0.25 * 8192))
    assert mix.label == "1k/1k:0.75+8k/1k:0.25"
    for bad in ("1k", "a/b", "0/1k", "1k/1k/1k", "1k/1k:0", "1k/1k:x,8k/1k:1"):
        with pytest.raises(ValueError, match="workload"):
            Workload.parse(bad)


def test_cli_curve_and_compare(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["curve", "--model", "llama-3.1-8b", "--system", "h200", "--precision", "bf16",
                            "--report", str(tmp_path), "--json"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # --json: the document alone
    assert out["command"] == "curve" and out["frontier"] and out["provenance"] == "modelled"
    assert (tmp_path / "curve-hgx-h200-1k-1k.png").exists()
    r = runner.invoke(app, ["curve", "--workload", "1k"], env={"COLUMNS": "80"})
    assert r.exit_code == 2 and "workload" in r.output
    r = runner.invoke(app, ["compare-systems", "--model", "llama-3.1-8b", "--a", "h200:bf16", "--b", "b200:bf16",
                            "--interactivity", "30", "--report", str(tmp_path), "--json"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ratio"] > 1 and len(out["steps"]) == len(FACTOR_ORDER)
    assert sum(s["log_ratio"] for s in out["steps"]) == pytest.approx(math.log(out["ratio"]))
    assert (tmp_path / "waterfall.png").exists()
    assert np.isfinite(out["a"]["usd_per_million_tokens"])
    r = runner.invoke(app, ["systems"], env={"COLUMNS": "80"})  # tables, no JSON without --json
    assert r.exit_code == 0 and "gb300-nvl72" in r.stdout and '{"command"' not in r.stdout
    doc = json.loads(runner.invoke(app, ["systems", "--json"]).stdout)
    assert {s["key"] for s in doc["systems"]} >= {"hgx-h200", "gb300-nvl72"}


def test_a_measured_run_anchors_the_curve(monkeypatch):
    from types import SimpleNamespace

    import tokprof.profiler.schema as schema

    def k(op: str, roof: float, t: float) -> SimpleNamespace:
        return SimpleNamespace(op=op, time_us=t, roofline=SimpleNamespace(bound="memory", t_roof_datasheet_us=roof,
                                                                          suspicious=False))

    def fake_run(spec_key: str) -> SimpleNamespace:  # linear kernels at 40% of the HBM roof, 2 us latency
        return SimpleNamespace(kernels=[k("linear", r, 2.0 + r / 0.4) for r in (1.0, 10.0, 100.0, 1000.0)],
                               provenance=SimpleNamespace(device=SimpleNamespace(spec_key=spec_key, name="H200")))

    monkeypatch.setattr(schema, "load_run", lambda path: fake_run("h200"))
    feats = Features(disaggregation=False, mtp_depths=(0,))
    anchored = Scenario.of("hgx-h200", "bf16", feats, run="h200-run.json")
    assert anchored.provenance == "projected"
    assert anchored.step_model.memory_efficiency["linear"] == pytest.approx(0.4)
    plain = Scenario(hw=H200, precision="bf16", features=feats)
    ca, cp = anchored.curve(LLAMA, Workload(1024, 1024)), plain.curve(LLAMA, Workload(1024, 1024))
    assert {p.provenance for p in ca.points} == {"projected"} and ca.provenance == "projected"
    # batch 1 is weight-read bound: 0.4 of the roof instead of the default 0.8 is slower
    slow = next(p for p in ca.points if p.batch == 1 and p.tp == 1)
    fast = next(p for p in cp.points if p.batch == 1 and p.tp == 1)
    assert slow.step_time_us > 1.5 * fast.step_time_us
    monkeypatch.setattr(schema, "load_run", lambda path: fake_run("b200"))
    with pytest.raises(ValueError, match="measured on 'b200'"):
        Scenario.of("hgx-h200", "bf16", feats, run="b200-run.json")


FAST = Features(disaggregation=False, mtp_depths=(0,), gpu_counts=(8, 16, 32))


@pytest.mark.parametrize("factor,a_changes,b_changes,target", [
    ("precision", {"precision": "fp8"}, {"precision": "fp4"}, 30.0),
    ("scale-up domain -> EP", {}, {"hw": H200.with_(gpus_per_domain=72)}, 30.0),
    ("scale-out network", {}, {"hw": H200.with_(scale_out_gbps=400.0)}, 30.0),
    ("disaggregation", {}, {"features": replace(FAST, disaggregation=True)}, 30.0),
    ("MTP", {}, {"features": replace(FAST, mtp_depths=(0, 1, 2))}, 60.0),
])
def test_each_factor_in_isolation_on_deepseek(factor, a_changes, b_changes, target):
    shape = deepseek_r1_shape()
    base = Scenario(hw=GB300 if factor == "precision" else H200, precision="fp8", features=FAST)
    a, b = replace(base, **a_changes), replace(base, **b_changes)
    cmp = compare_systems(shape, a, b, Workload(1024, 1024), target)
    assert cmp.ratio is not None and cmp.ratio > 1.0
    for s in cmp.steps:
        assert s.log_ratio == pytest.approx(math.log(cmp.ratio) if s.name == factor else 0.0, abs=1e-12)


def test_reproduce_published_places_each_row_on_its_curve(tmp_path):
    from tokprof.rollup.systems_report import reproduce_published

    res = reproduce_published(deepseek_r1_shape(), workloads=[Workload(1024, 1024)], tokens_per_s_per_user=50.0,
                              out=tmp_path)
    assert {r["system"] for r in res["rows"]} == {"hgx-h200", "gb300-nvl72"}
    for r in res["rows"]:
        if r["tokens_per_s_per_user_all_gpus"] is None:
            assert "no configuration" in r["reason"]
            assert r["curve_max_tokens_per_s_per_gpu"] < r["published_tokens_per_s_per_gpu"]
        else:
            assert r["curve_max_tokens_per_s_per_gpu"] >= r["published_tokens_per_s_per_gpu"]
    (cmp,) = res["comparisons"]
    assert cmp["published_ratio"] == pytest.approx(6000 / 90)
    assert cmp["published_over_computed"] == pytest.approx(cmp["published_ratio"] / cmp["ratio"])
    assert sum(s["log_ratio"] for s in cmp["steps"]) == pytest.approx(math.log(cmp["ratio"]))
    assert res["scale_check"]["published_tokens_per_s_per_decode_gpu"] == 1850.0
    assert (tmp_path / "published-systems.md").exists() and (tmp_path / "published-systems.json").exists()


def test_dense_step_agrees_with_the_plan_based_step_model():
    """The curve's aggregated op groups against tokprof's per-kernel decode plan timed by the same step model
    (rollup.project.modelled): a dense model, decode only (the disaggregated step has no prefill in it)."""
    from tokprof.rollup.project import modelled

    cfg = ModelConfig.from_name("llama-3.1-8b")
    c = serving_curve(LLAMA, H200, Workload(1024, 1024), "bf16", features=Features(mtp_depths=(0,)))
    for tp in (1, 2):
        for ref in modelled(cfg, "h200", [1, 64, 256], [1536], "bf16", tp=tp):  # context = ISL + OSL / 2
            ours = next(p for p in c.points if p.tp == tp and p.batch == ref.batch and p.mode == "disaggregated")
            assert ours.step_time_us == pytest.approx(ref.step_time_us, rel=0.06)


@pytest.mark.parametrize("args,message", [
    (["curve", "--precision", "fp3"], "precision: expected one of"),
    (["curve", "--system", "tpu-v9"], "system: expected one of"),
    (["curve", "--mtp", "x"], "--mtp"),
    (["curve", "--max-gpus", "0"], "--max-gpus"),
    (["compare-systems", "--interactivity", "0"], "--interactivity"),
    (["compare-systems", "--a", "h200:fp9"], "precision"),
])
def test_cli_bad_input_exits_2(args, message):
    r = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert r.exit_code == 2 and message in " ".join(r.output.split()) and "Traceback" not in r.output
