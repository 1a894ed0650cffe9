"""Roll-up economics: formulas, the published article table, price sheets, pareto/interpolation, projection and the
modelled mode. Expected values are computed by hand in each test from the stated inputs."""

from __future__ import annotations

import json
import math

import pytest

from tokprof import rollup
from tokprof.models import ModelConfig, decode_plan, plan_totals
from tokprof.profiler.schema import (
    DeviceInfo,
    KernelMeasurement,
    Provenance,
    Roofline,
    RunResult,
    Timing,
    load_run,
    save_run,
)
from tokprof.rollup import OpShare, PriceOptions, RollupPoint

# ---------------------------------------------------------------------------------------------------- formulas


def test_cost_and_power_formulas():
    # The InferenceX formula on the article's H200 row: 1.41 / (90 * 3600) * 1e6 = 4.3518...
    assert rollup.cost_per_million_tokens(usd_per_gpu_hour=1.41, tokens_per_s_per_gpu=90) == pytest.approx(
        4.351851851851852, rel=1e-12)
    assert rollup.cost_per_million_tokens(2.65, 6000) == pytest.approx(0.122685185, rel=1e-8)
    # a MW feeds 1000 / 1.73 GPUs
    assert rollup.tokens_per_s_per_mw(tokens_per_s_per_gpu=90, all_in_kw_per_gpu=1.73) == pytest.approx(
        52023.12138728, rel=1e-10)
    # 0.5 J/token: 1e6 tokens = 5e5 J = 0.1389 kWh; x $0.10/kWh x PUE 1.2
    assert rollup.energy_usd_per_million_tokens(0.5, 0.10, pue=1.2) == pytest.approx(0.5e6 / 3.6e6 * 0.10 * 1.2)
    assert rollup.gpu_power_w(0.1, 4000) == pytest.approx(400.0)
    assert rollup.all_in_kw_from_measured(400.0, 1.5) == pytest.approx(0.6)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1.41", None])
def test_non_positive_or_non_finite_inputs_name_the_argument(bad):
    with pytest.raises(ValueError, match="usd_per_gpu_hour: expected a positive finite number"):
        rollup.cost_per_million_tokens(bad, 90)
    with pytest.raises(ValueError, match="tokens_per_s_per_gpu: expected a positive finite number"):
        rollup.cost_per_million_tokens(1.41, bad)
    with pytest.raises(ValueError, match="all_in_kw_per_gpu: expected a positive finite number"):
        rollup.tokens_per_s_per_mw(90, bad)
    with pytest.raises(ValueError, match="j_per_token: expected a positive finite number"):
        rollup.energy_usd_per_million_tokens(bad, 0.1)


def test_pue_and_overhead_below_one_are_rejected():
    with pytest.raises(ValueError, match="pue: expected >= 1"):
        rollup.energy_usd_per_million_tokens(0.5, 0.1, pue=0.9)
    with pytest.raises(ValueError, match="overhead_factor: expected >= 1"):
        rollup.all_in_kw_from_measured(400.0, 0.5)
    with pytest.raises(ValueError, match="host_overhead: expected >= 1"):
        rollup.pricing_for("h100-sxm", host_overhead=0.8)


# ------------------------------------------------------------------------------------------------ the article


def test_published_table_recomputed_and_inconsistencies_shown():
    checks = {(c.gpu, c.metric): c for c in rollup.check_published_table()}
    assert len(checks) == 4
    h200 = checks[("h200", "usd_per_million_tokens")]
    assert h200.computed == pytest.approx(4.351851851851852) and h200.printed == "$4.20"
    assert h200.consistent is False
    assert h200.implied["tokens_per_s_per_gpu"] == pytest.approx(1.41 / (4.20 * 3600) * 1e6)  # 93.25
    assert "$4.35" in h200.message and "93.3 tokens/s" in h200.message
    gb300 = checks[("gb300", "usd_per_million_tokens")]
    assert gb300.computed == pytest.approx(2.65 / (6000 * 3600) * 1e6) and gb300.consistent is True
    per_mw = checks[("h200", "tokens_per_s_per_mw")]
    assert per_mw.implied["all_in_kw_per_gpu"] == pytest.approx(90 * 1000 / 54000)  # 1.67 kW
    assert per_mw.computed == pytest.approx(90 * 1000 / 1.73)  # with InferenceX's H200 figure: 52.0K, not 54K
    assert per_mw.consistent is False
    gb300_mw = checks[("gb300", "tokens_per_s_per_mw")]
    assert gb300_mw.implied["all_in_kw_per_gpu"] == pytest.approx(6000 * 1000 / 2.8e6)  # 2.14 kW
    assert gb300_mw.consistent is None and gb300_mw.computed is None


def test_published_table_with_a_sheet_that_agrees(tmp_path):
    sheet = tmp_path / "sheet.json"
    sheet.write_text(json.dumps({"gpus": [{"gpu": "h200", "usd_per_gpu_hour": {"hyperscaler": 1.41},
                                           "all_in_kw_per_gpu": 1.667, "source": "test", "date": "2026"}]}))
    checks = {(c.gpu, c.metric): c for c in rollup.check_published_table(sheet=rollup.load_price_sheet(sheet))}
    assert checks[("h200", "tokens_per_s_per_mw")].consistent is True


# ----------------------------------------------------------------------------------------------- price sheets


def test_shipped_price_sheet_has_the_inferencex_constants():
    sheet = rollup.load_price_sheet()
    assert sheet.default_tier == "hyperscaler"
    expected = {"h100-sxm": (1.30, 1.69, 1.30, 1.73), "h200": (1.41, 1.74, 1.60, 1.73),
                "b200": (1.95, 2.34, 2.90, 2.17), "gb200": (2.21, 2.75, 3.30, 2.10)}
    for gpu, (hyper, neo, rental, kw) in expected.items():
        row = sheet.row(gpu)
        assert row.usd_per_gpu_hour == {"hyperscaler": hyper, "neocloud": neo, "rental_3yr": rental}
        assert row.all_in_kw_per_gpu == kw and "InferenceX" in row.source and row.date
    p = rollup.pricing_for("h200", sheet=sheet, tier="neocloud")
    assert p.usd_per_gpu_hour == 1.74 and "neocloud" in p.price_source
    assert rollup.pricing_for("h200", sheet=sheet, usd_per_gpu_hour=3.0).price_source == "stated by the user"
    with pytest.raises(ValueError, match="tier: expected one of"):
        rollup.pricing_for("h200", sheet=sheet, tier="spot")
    missing = rollup.pricing_for("l4", sheet=sheet)
    assert missing.usd_per_gpu_hour is None and "no row in the price sheet" in missing.price_reason


def test_user_sheet_overrides_rows_of_its_gpus(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"default_tier": "own", "gpus": [
        {"gpu": "h200", "usd_per_gpu_hour": {"own": 2.5}, "all_in_kw_per_gpu": 2.0, "source": "my contract",
         "date": "2026-01"}]}))
    sheet = rollup.load_price_sheet(path)
    assert sheet.row("h200").usd_per_gpu_hour == {"own": 2.5} and sheet.row("h200").origin == str(path)
    assert sheet.row("b200").usd_per_gpu_hour["hyperscaler"] == 1.95  # the shipped rows stay
    assert rollup.pricing_for("h200", sheet=sheet).usd_per_gpu_hour == 2.5


@pytest.mark.parametrize("content,match", [
    ("{not json", r"bad\.json: not valid JSON at line 1"),
    (json.dumps({"rows": []}), r"bad\.json: expected an object with a 'gpus' list"),
    (json.dumps({"gpus": [{"usd_per_gpu_hour": {"a": 1}, "source": "s", "date": "d"}]}),
     r"bad\.json: gpus\[0\]\.gpu: missing"),
    (json.dumps({"gpus": [{"gpu": "h200", "usd_per_gpu_hour": {"a": -1}, "source": "s", "date": "d"}]}),
     r"bad\.json: gpus\[0\]\.usd_per_gpu_hour\.a: expected a positive finite number, got -1"),
    (json.dumps({"gpus": [{"gpu": "h200", "usd_per_gpu_hour": {}, "source": "s", "date": "d"}]}),
     r"gpus\[0\]\.usd_per_gpu_hour: expected at least one tier"),
    (json.dumps({"gpus": [{"gpu": "h200", "usd_per_gpu_hour": {"a": 1}, "all_in_kw_per_gpu": "2",
                           "source": "s", "date": "d"}]}), r"gpus\[0\]\.all_in_kw_per_gpu: expected a positive"),
    (json.dumps({"gpus": [{"gpu": "h200", "usd_per_gpu_hour": {"a": 1}, "date": "d"}]}),
     r"gpus\[0\]\.source: missing"),
    (json.dumps({"gpus": [{"gpu": "h200", "usd_per_gpu_hour": {"a": 1}, "source": "s", "date": "d", "kw": 1}]}),
     r"gpus\[0\]: unknown fields \['kw'\]"),
    (json.dumps({"gpus": [{"gpu": "h200", "usd_per_gpu_hour": {"a": 1}, "source": "s", "date": "d"}] * 2}),
     r"gpus\[1\]\.gpu: 'h200' appears twice"),
])
def test_bad_price_sheets_are_rejected_naming_file_and_field(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        rollup.load_price_sheet(path)


def test_missing_price_sheet_file(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.json: cannot read the price sheet"):
        rollup.load_price_sheet(tmp_path / "nope.json")


# ----------------------------------------------------------------------------------------- points and pareto


def _point(batch: int, tps_gpu: float, context: int = 1024, usd: float | None = 2.0) -> RollupPoint:
    step_s = batch / tps_gpu
    return RollupPoint(model="m", gpu="h100-sxm", batch=batch, context=context, dtype="bf16", backend="triton",
                       provenance="measured", step_time_us=step_s * 1e6, tokens_per_s_per_gpu=tps_gpu,
                       tokens_per_s_per_user=1 / step_s, usd_per_gpu_hour=usd)


def test_build_point_prices_and_measured_power():
    ops = [OpShare("linear", "qkv_proj", 2, 300.0, 600.0, 0.0), OpShare("swiglu", "swiglu", 4, 100.0, 400.0, 0.0)]
    pricing = rollup.pricing_for("h100-sxm", host_overhead=1.5, usd_per_kwh=0.1, pue=1.2)
    p = rollup.build_point(model="m", gpu="h100-sxm", batch=4, context=64, dtype="bf16", backend="triton",
                           provenance="measured", ops=ops, pricing=pricing, j_per_step_total=0.4,
                           j_per_step_dynamic=0.3)
    assert p.step_time_us == 1000.0 and p.tokens_per_s_per_gpu == pytest.approx(4000.0)
    assert p.tokens_per_s_per_user == pytest.approx(1000.0)
    assert [o.share for o in p.ops] == [pytest.approx(0.6), pytest.approx(0.4)]
    assert p.j_per_token_total == pytest.approx(0.1) and p.j_per_token_dynamic == pytest.approx(0.075)
    assert p.usd_per_gpu_hour == 1.30 and p.usd_per_million_tokens == pytest.approx(1.30 / (4000 * 3600) * 1e6)
    assert p.all_in_kw_per_gpu == pytest.approx(0.4 * 1000 * 1.5 / 1000)  # 400 W measured x 1.5
    assert "measured GPU power 400 W x stated overhead 1.5" in p.power_source
    assert p.tokens_per_s_per_mw == pytest.approx(4000 * 1000 / 0.6)
    assert p.energy_usd_per_million_tokens == pytest.approx(0.1 * 1e6 / 3.6e6 * 0.1 * 1.2)
    assert RollupPoint.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_point_without_energy_uses_the_published_power():
    ops = [OpShare("linear", "x", 1, 500.0, 500.0, 0.0)]
    p = rollup.build_point(model="m", gpu="h200", batch=1, context=8, dtype="bf16", backend="torch",
                           provenance="measured", ops=ops, pricing=rollup.pricing_for("h200", host_overhead=1.4,
                                                                                     sheet=rollup.load_price_sheet()),
                           energy_reason="no NVML")
    assert p.j_per_token_total is None and p.energy_reason == "no NVML"
    assert p.all_in_kw_per_gpu == 1.73 and "published" in p.power_source
    assert p.energy_usd_per_million_tokens is None


def test_rollup_point_rejects_bad_provenance():
    d = _point(1, 100.0).to_dict()
    d["provenance"] = "guessed"
    with pytest.raises(ValueError, match="provenance: expected one of"):
        RollupPoint.from_dict(d)


def test_pareto_frontier_drops_dominated_points():
    pts = [_point(1, 100.0), _point(8, 600.0), _point(16, 500.0), _point(64, 2000.0), _point(4, 300.0, context=8192)]
    # per user: b1 100, b8 75, b16 31.25 (beaten by b8 on both), b64 31.25
    front = rollup.pareto_frontier(pts, context=1024)
    assert [p.batch for p in front] == [64, 8, 1]
    with pytest.raises(ValueError, match="context: the points span contexts"):
        rollup.pareto_frontier(pts)
    with pytest.raises(ValueError, match="context: expected one of the sweep's contexts"):
        rollup.pareto_frontier(pts, context=5)


def test_cost_at_interactivity_is_interpolated_and_labelled():
    pts = [_point(1, 100.0), _point(8, 600.0), _point(64, 2000.0)]  # per user 100, 75, 31.25
    c = rollup.cost_at_interactivity(pts, 50.0)
    w = (50.0 - 31.25) / (75.0 - 31.25)
    assert c.tokens_per_s_per_gpu == pytest.approx(2000.0 + w * (600.0 - 2000.0))
    assert c.usd_per_million_tokens == pytest.approx(2.0 / (c.tokens_per_s_per_gpu * 3600) * 1e6)
    assert c.provenance == "interpolated" and c.between == [64, 8]
    exact = rollup.cost_at_interactivity(pts, 75.0)
    assert exact.tokens_per_s_per_gpu == 600.0 and exact.provenance == "measured" and exact.between == [8]
    outside = rollup.cost_at_interactivity(pts, 500.0)
    assert outside.tokens_per_s_per_gpu is None and "does not extrapolate" in outside.reason
    assert rollup.cost_at_interactivity(pts, 50.0, usd_per_gpu_hour=4.0).usd_per_million_tokens == pytest.approx(
        2 * c.usd_per_million_tokens)
    with pytest.raises(ValueError, match="target_tokens_per_s_per_user: expected a positive"):
        rollup.cost_at_interactivity(pts, 0)


# ------------------------------------------------------------------------------------ projection and modelled


def _timing(us: float) -> Timing:
    return Timing(samples_us=[us] * 10, timer="cuda_events", mode="events", cold_l2=True, median_us=us, p10_us=us,
                  p90_us=us, mean_us=us, noise=0.0, n_outliers=0, noise_target=0.005, met_noise_target=True)


def _recorded_run(efficiency: dict[str, float]) -> tuple[RunResult, ModelConfig]:
    """A run as recorded on an H100: every call of tiny's decode plan at batch 2, context 40, at a known datasheet
    efficiency per op (time = H100 roof / efficiency)."""
    cfg = ModelConfig.from_name("tiny")
    h100 = rollup.resolve_gpu("h100")
    device = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", spec_key="h100-sxm")
    run = RunResult(provenance=Provenance(host="h", device=device, versions={}, git_sha=None,
                                          timestamp_utc="2026-01-01T00:00:00Z", command=["test"]),
                    model=cfg.to_dict(), run_id="recorded")
    ops = []
    for call in decode_plan(cfg, 2, 40, "bf16"):
        flops, nbytes = call.cost()
        t_roof = max(flops / 989e12, nbytes / 3.35e12) * 1e6
        t = t_roof / efficiency[call.op]
        roof = Roofline(flops=flops, min_bytes=nbytes, time_us=t, achieved_gbps=nbytes / t / 1e3,
                        achieved_tflops=flops / t / 1e6, intensity_flop_per_byte=flops / nbytes, bound="memory",
                        t_roof_datasheet_us=t_roof, efficiency_datasheet=efficiency[call.op])
        run.kernels.append(KernelMeasurement(op=call.op, shape=call.shape, dtype="bf16", backend="triton",
                                             device=device.name, timing=_timing(t), roofline=roof))
        ops.append(OpShare(call.op, call.label, call.count, t, call.count * t, 0.0))
    point = rollup.build_point(model="tiny", gpu="h100-sxm", batch=2, context=40, dtype="bf16", backend="triton",
                               provenance="measured", ops=ops, pricing=rollup.pricing_for("h100-sxm"))
    run.rollup.append(point.to_dict())
    assert h100.hbm_tbps == 3.35 and h100.bf16_tflops == 989.0  # the numbers used above
    return run, cfg


def test_projection_carries_each_ops_efficiency_to_the_target(tmp_path):
    eff = {"embedding": 0.3, "rms_norm": 0.6, "linear": 0.5, "rope": 0.4, "append_kv": 0.2, "decode_attention": 0.7,
           "swiglu": 0.65, "greedy_sample": 0.1}
    run, cfg = _recorded_run(eff)
    save_run(run, tmp_path / "run.json")
    run = load_run(tmp_path / "run.json")  # through the file, as a user would
    (p,) = rollup.project(run, "h200")
    expected_us = 0.0
    calls = decode_plan(cfg, 2, 40, "bf16")
    for call in calls:
        flops, nbytes = call.cost()
        expected_us += call.count * max(flops / 989e12, nbytes / 4.8e12) * 1e6 / eff[call.op]
    kernels_us = expected_us
    # no kernel measurement holds the per-step overhead: the step model's (graph) 100 us + 0.3 us per kernel call
    expected_us += 100.0 + 0.3 * sum(c.count for c in calls)
    assert p.provenance == "projected" and p.gpu == "h200" and (p.batch, p.context) == (2, 40)
    assert p.step_time_us == pytest.approx(expected_us, rel=1e-12)
    assert p.tokens_per_s_per_gpu == pytest.approx(2 / (expected_us * 1e-6))
    assert p.usd_per_gpu_hour == 1.41 and p.all_in_kw_per_gpu == 1.73
    assert p.j_per_token_total is None and "not carried across GPUs" in p.energy_reason
    assert "projected from h100-sxm" in p.notes[0]
    # every op memory-bound on both GPUs: the projected kernels are the measured ones x 3.35 / 4.8
    measured = rollup.points_from_run(run.rollup)[0]
    assert kernels_us == pytest.approx(measured.step_time_us * 3.35 / 4.8, rel=1e-9)
    (overhead,) = [o for o in p.ops if o.op == "step_overhead"]
    assert overhead.total_us == pytest.approx(expected_us - kernels_us, rel=1e-12)


def test_projection_needs_a_datasheet_source_and_every_call():
    run, _ = _recorded_run(dict.fromkeys(["embedding", "rms_norm", "linear", "rope", "append_kv",
                                          "decode_attention", "swiglu", "greedy_sample"], 0.5))
    with pytest.raises(ValueError, match=r"no measurement of append_kv .*num_blocks': 500.*batch 2, context 4000"):
        rollup.project(run, "b200", batches=[2], contexts=[4000])
    run.provenance.device.spec_key = None
    with pytest.raises(ValueError, match="no spec-table row"):
        rollup.project(run, "b200")
    with pytest.raises(ValueError, match="gpu: expected one of"):
        rollup.project(run, "voodoo-5")
    run.provenance.device.spec_key = "h100-sxm"
    with pytest.raises(ValueError, match="run: no measurements of dtype 'fp16'"):
        rollup.project(run, "b200", dtype="fp16")
    assert len(rollup.project(run, "b200", dtype="bf16", backend="triton")) == 1


def test_modelled_llama_8b_on_h200_is_the_bandwidth_roof_over_efficiency():
    cfg = ModelConfig.from_name("llama-3.1-8b")
    pts = rollup.modelled(cfg, "h200", [1, 64], [1024], "bf16", efficiency=0.8,
                          prices=PriceOptions(usd_per_gpu_hour=1.41))
    for p in pts:
        plan = decode_plan(cfg, p.batch, 1024, "bf16")
        flops, nbytes = plan_totals(plan)
        # every call of these steps is memory-bound on H200 (ridge 989/4.8 = 206 FLOP/byte); the flat efficiency
        # replaces the op curves, the step overhead (graph: 100 us + 0.3 us per kernel call) stays
        overhead = 100.0 + 0.3 * sum(c.count for c in plan)
        assert p.step_time_us == pytest.approx(nbytes / 4.8e12 / 0.8 * 1e6 + overhead, rel=1e-12)
        assert p.usd_per_million_tokens == pytest.approx(1.41 / (p.tokens_per_s_per_gpu * 3600) * 1e6)
        assert p.tokens_per_s_per_mw == pytest.approx(p.tokens_per_s_per_gpu * 1000 / 1.73)
        assert p.provenance == "modelled" and p.price_source == "stated by the user"
        assert "0.8 for every op" in p.notes[0] and "upper bound at TDP (700 W" in p.energy_reason
        assert sum(o.share for o in p.ops) == pytest.approx(1.0)
    assert 220 < pts[0].tokens_per_s_per_gpu < 260  # ~0.8 x 4.8 TB/s / 15.1 GB, less the step overhead


def test_modelled_per_op_efficiency_and_bad_efficiency():
    cfg = ModelConfig.from_name("tiny")
    eff = {"embedding": 1.0, "rms_norm": 1.0, "linear": 0.5, "rope": 1.0, "append_kv": 1.0, "decode_attention": 1.0,
           "swiglu": 1.0, "greedy_sample": 1.0}
    (p,) = rollup.modelled(cfg, "b200", [1], [16], "bf16", efficiency=eff)
    expected = 0.0
    plan = decode_plan(cfg, 1, 16, "bf16")
    for call in plan:
        flops, nbytes = call.cost()
        expected += call.count * max(flops / 2250e12, nbytes / 8e12) * 1e6 / eff[call.op]
    expected += 100.0 + 0.3 * sum(c.count for c in plan)  # the step overhead (graph execution)
    assert p.step_time_us == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"efficiency: expected a fraction of the roofline in \(0, 1\]"):
        rollup.modelled(cfg, "b200", [1], [16], efficiency=1.5)
    with pytest.raises(ValueError, match="efficiency: expected a positive finite number"):
        rollup.modelled(cfg, "b200", [1], [16], efficiency=0)
    with pytest.raises(ValueError, match="efficiency: no entry for op 'embedding'"):
        rollup.modelled(cfg, "b200", [1], [16], efficiency={"rms_norm": 0.5})
    with pytest.raises(ValueError, match="batches: expected a non-empty list"):
        rollup.modelled(cfg, "b200", [], [16])
    with pytest.raises(ValueError, match="contexts: expected positive ints"):
        rollup.modelled(cfg, "b200", [1], [0])


def test_resolve_gpu_names():
    assert rollup.resolve_gpu("h100").key == "h100-sxm"
    assert rollup.resolve_gpu("H200").key == "h200"
    assert rollup.resolve_gpu("NVIDIA H100 80GB HBM3").key == "h100-sxm"
    assert math.isclose(rollup.roof_time_us(0, 4_800_000, rollup.resolve_gpu("h200"), "bf16")[0], 1.0)
