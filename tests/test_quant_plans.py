"""Low precision in plans, byte counts, the spec table, the roofline's math dtype, the card and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tokprof.models.config import ModelConfig, with_overrides
from tokprof.models.plan import decode_plan, plan_totals
from tokprof.models.transformer import Transformer
from tokprof.profiler.devices import load_specs
from tokprof.quant.accuracy import measure_accuracy, reference_run
from tokprof.quant.formats import WEIGHT_FORMATS
from tokprof.quant.precision import check_supported, math_dtype, parse_precision
from tokprof.rollup.card import analytic_card
from tokprof.rollup.project import modelled

LLAMA = ModelConfig.from_name("llama-3.1-8b")


def test_precision_labels_round_trip() -> None:
    assert parse_precision("fp8").label == "fp8"
    assert parse_precision("bf16", kv_dtype="fp8").label == "bf16+kv-fp8"
    p = parse_precision("nvfp4+kv-fp8")
    assert (p.activation, p.weight_format, p.kv_dtype) == ("bf16", "nvfp4", "fp8")
    assert parse_precision("int4", activation="fp32").label == "int4+act-fp32"
    assert parse_precision("int4+act-fp32").activation == "fp32"
    with pytest.raises(ValueError, match="dtype: expected one of"):
        parse_precision("fp5")
    with pytest.raises(ValueError, match="kv_dtype: expected 'fp8'"):
        parse_precision("bf16", kv_dtype="int8")


def test_weight_bytes_by_format_by_hand() -> None:
    h, i, layers, v = 4096, 14336, 32, 128256
    linear = layers * (6144 * h + h * h + 2 * i * h + h * i)  # QKV, O, gate-up, down of Llama-3.1-8B
    other = LLAMA.num_params() - linear  # embedding, LM head, norms: bf16 in every format
    assert LLAMA.weight_bytes("bf16") == LLAMA.weight_bytes(torch.bfloat16) == 2 * LLAMA.num_params()
    fp8 = layers * (6144 * h + h * h + 2 * i * h + h * i + 4 * 4)  # + one fp32 scale per tensor
    assert LLAMA.weight_bytes("fp8") == fp8 + 2 * other
    # MXFP4: 4.25 bits per weight (K is a multiple of 32 everywhere)
    assert LLAMA.weight_bytes("mxfp4") == linear * 17 // 32 + 2 * other
    decode_bf16 = LLAMA.decode_weight_bytes("bf16")
    assert decode_bf16 - LLAMA.decode_weight_bytes("mxfp4") == linear * 2 - linear * 17 // 32
    assert LLAMA.kv_bytes_per_token("bf16") == 2 * 32 * 8 * 128 * 2
    assert LLAMA.kv_bytes_per_token("nvfp4+kv-fp8") == 2 * 32 * 8 * 128
    assert LLAMA.kv_bytes_per_token(torch.bfloat16, kv_dtype="fp8") == 2 * 32 * 8 * 128
    assert v * h * 2 < LLAMA.decode_weight_bytes("int4") < decode_bf16 / 2


@pytest.mark.parametrize("label", ["fp8", "fp8-block", "mxfp4", "nvfp4", "int4"])
def test_plan_uses_the_format_ops_and_bytes(label: str) -> None:
    plan = decode_plan(LLAMA, 1, 1024, label)
    fmt = WEIGHT_FORMATS[label]
    ops = {c.op for c in plan}
    assert "linear" in ops and fmt.op in ops  # the LM head stays bf16, the layers use the format
    assert [c.labels for c in plan if c.op == "linear"] == [["lm_head"]]
    assert ("quantize_fp8" in ops) == (fmt.activation == "fp8")
    assert all(c.dtype == "bf16" for c in plan)
    # batch 1 is weight-bound: the plan's bytes drop by the format's weight bytes, exactly
    _, bf16_bytes = plan_totals(decode_plan(LLAMA, 1, 1024, "bf16"))
    _, q_bytes = plan_totals(plan)
    quant_act = sum(c.count * c.cost()[1] for c in plan if c.op == "quantize_fp8")
    # W8A8 reads 1-byte activations (M*K fewer bytes than bf16) plus their fp32 scales (per token or 128-group)
    fp8_act_saving = sum(c.count * (c.shape["M"] * c.shape["K"]
                                    - 4 * c.shape["M"] * (1 if label == "fp8" else -(-c.shape["K"] // 128)))
                         for c in plan if c.op == fmt.op) if fmt.activation == "fp8" else 0
    saved = LLAMA.decode_weight_bytes("bf16") - LLAMA.decode_weight_bytes(label)
    assert bf16_bytes - q_bytes == saved - quant_act + fp8_act_saving


def test_fp8_kv_plan_halves_the_attention_bytes() -> None:
    bf16 = {c.op: c for c in decode_plan(LLAMA, 8, 8192, "bf16")}
    fp8 = {c.op: c for c in decode_plan(LLAMA, 8, 8192, "bf16", kv_dtype="fp8")}
    assert "decode_attention" not in fp8 and "append_kv" not in fp8
    kv_bf16 = bf16["decode_attention"].cost()[1]
    kv_fp8 = fp8["decode_attention_fp8kv"].cost()[1]
    assert kv_fp8 == pytest.approx(kv_bf16 / 2, rel=0.01)
    tp_plan = decode_plan(LLAMA, 8, 8192, "nvfp4", tp=2, kv_dtype="fp8")
    assert {"linear_nvfp4", "decode_attention_fp8kv", "all_reduce"} <= {c.op for c in tp_plan}


def test_spec_table_low_precision_peaks() -> None:
    specs = load_specs()
    # dense figures: datasheet sparse figures halved (HGX B200: 144 PFLOPS FP4 sparse for 8 GPUs)
    assert specs["b200"].peak_tflops("fp4") == 9000.0
    assert specs["gb300"].peak_tflops("fp4") == 15000.0 and specs["gb200"].peak_tflops("fp4") == 10000.0
    assert specs["b300"].peak_tflops("fp4") == 13500.0 and specs["b300"].fp8_tflops == 4500.0
    assert specs["h200"].peak_tflops("fp4") is None and specs["h200"].peak_tflops("int8") == 1979.0
    assert specs["b200"].peak_tflops("fp6") == specs["b200"].peak_tflops("fp8")


def test_math_dtype_per_format_and_gpu() -> None:
    specs = load_specs()
    assert math_dtype("linear_fp8", "bf16", specs["h200"]) == "fp8"
    assert math_dtype("linear_nvfp4", "bf16", specs["h200"]) == "bf16"  # W4A16 on Hopper
    assert math_dtype("linear_nvfp4", "bf16", specs["gb300"]) == "fp4"  # native FP4 on Blackwell
    assert math_dtype("linear_mxfp4", "bf16", specs["b200"]) == "fp4"
    assert math_dtype("linear_int4", "bf16", specs["b200"]) == "bf16"
    assert math_dtype("rms_norm", "bf16", specs["b200"]) == "bf16"


def test_card_and_modelled_points_follow_the_format() -> None:
    specs = load_specs()
    card = analytic_card(LLAMA, specs["h200"], [1024], "fp8")
    assert card["decode_weight_bytes"] == LLAMA.decode_weight_bytes("fp8") and card["weight_format"] == "fp8"
    bf16 = modelled(LLAMA, "h200", [1], [1024], "bf16", efficiency=0.8)[0]
    fp8 = modelled(LLAMA, "h200", [1], [1024], "fp8", efficiency=0.8)[0]
    assert fp8.dtype == "fp8"
    # batch 1 is bandwidth-bound: the layers' GEMMs take half the time (half the weight bytes)...
    layer_gemms = {p.dtype: sum(o.total_us for o in p.ops if o.op.startswith("linear") and o.label != "lm_head")
                   for p in (bf16, fp8)}
    assert layer_gemms["fp8"] / layer_gemms["bf16"] == pytest.approx(0.5, rel=0.01)
    # ...and the step gains less (the LM head, attention, the activation quantisation and per-step overhead stay)
    assert 1.2 < fp8.tokens_per_s_per_gpu / bf16.tokens_per_s_per_gpu < 1.9
    # prefill-like batch: the fp8 roof (2x bf16) makes a W8A8 step faster than W4A16 on Hopper
    big_fp8 = modelled(LLAMA, "h200", [512], [128], "fp8", efficiency=0.8)[0]
    big_int4 = modelled(LLAMA, "h200", [512], [128], "int4", efficiency=0.8)[0]
    assert big_fp8.step_time_us < big_int4.step_time_us
    nv_b = modelled(LLAMA, "gb300", [512], [128], "nvfp4", efficiency=0.8)[0]
    fp8_b = modelled(LLAMA, "gb300", [512], [128], "fp8", efficiency=0.8)[0]
    assert nv_b.step_time_us < fp8_b.step_time_us  # FP4 roof 3x FP8's on GB300


def test_unsupported_combinations_are_refused_with_the_reason() -> None:
    specs = load_specs()
    with pytest.raises(ValueError, match="no fp8 peak"):
        modelled(LLAMA, "a100-sxm-80gb", [1], [1024], "fp8")
    check_supported(parse_precision("int4"), spec=specs["a100-sxm-80gb"])  # weight-only is fine on Ampere
    check_supported(parse_precision("fp8"), device="cpu")  # the CPU runs the torch references


@pytest.mark.slow
def test_tiny_model_keeps_greedy_agreement_in_every_format() -> None:
    """Torch path on the CPU: a tiny model (hidden 256, intermediate 512: every K a multiple of 128, so the
    128-groups and 128x128 tiles apply whole) with confident predictions (tied embedding scaled x4, as a trained
    model's logits are peaked, not the near-uniform logits of random weights), quantised to each format, keeps
    >= 95% greedy agreement with its fp32 self over the fixed prompt set, and its logit error stays a fraction of
    the logits' size (4-bit formats looser than fp8)."""
    cfg = with_overrides(ModelConfig.from_name("tiny"), tie_word_embeddings=True)

    def make() -> Transformer:
        m = Transformer.random(cfg, device="cpu", dtype="fp32", backend="torch", std=0.05, seed=0)
        m.weights.embed.mul_(4.0)
        return m

    reference = reference_run(make(), prompts=8, new_tokens=6)
    for label, rel in (("fp8", 0.15), ("fp8-block", 0.15), ("mxfp4", 0.4), ("nvfp4", 0.4), ("int4", 0.4),
                       ("fp32+kv-fp8", 0.05)):
        report = measure_accuracy(reference, make().quantize(label))
        assert report.greedy_agreement >= 0.95, (label, report)
        assert report.mean_abs_logit_error < rel * report.mean_abs_reference_logit, (label, report)
        assert report.max_abs_logit_error > 0  # the format changed something: the comparison is not vacuous
    same = measure_accuracy(reference, make())
    assert same.greedy_agreement == 1.0 and same.max_abs_logit_error == 0.0


def test_accuracy_report_small() -> None:
    """Torch path on the CPU, the quick form of the test above: fp8 weights and an fp8 cache, 2 prompts."""
    cfg = with_overrides(ModelConfig.from_name("tiny"), num_layers=1)
    reference = Transformer.random(cfg, device="cpu", dtype="fp32", backend="torch", seed=1)
    quantised = Transformer.random(cfg, device="cpu", dtype="fp32", backend="torch", seed=1).quantize("fp8+kv-fp8")
    report = measure_accuracy(reference, quantised, prompts=2, prompt_len=4, new_tokens=3)
    assert report.precision == "fp8+act-fp32+kv-fp8" and report.reference == "fp32" and report.positions == 6
    assert 0 < report.mean_abs_logit_error <= report.max_abs_logit_error < report.mean_abs_reference_logit
    assert quantised.weight_bytes < reference.weight_bytes  # the layers' linears in one byte


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from tokprof.cli import main; main()", *args], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "COLUMNS": "80"},
                          stdin=subprocess.DEVNULL, check=False)


def test_cli_rollup_modelled_formats() -> None:
    proc = _cli("rollup", "--model", "llama-3.1-8b", "--gpu", "gb300", "--modelled", "--dtype", "nvfp4",
                "--kv-dtype", "fp8", "--batch", "1", "--context", "1024")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["card"]["dtype"] == "nvfp4+kv-fp8" and doc["points"][0]["dtype"] == "nvfp4+kv-fp8"
    assert doc["card"]["kv_bytes_per_token"] == LLAMA.kv_bytes_per_token("bf16") // 2
    proc = _cli("rollup", "--model", "llama-3.1-8b", "--gpu", "a100-sxm-80gb", "--modelled", "--dtype", "fp8")
    assert proc.returncode == 2 and "no fp8 peak" in " ".join((proc.stdout + proc.stderr).split())


def test_bench_maps_formats_to_their_ops() -> None:
    from tokprof.commands.profiler import _bench_plan

    calls, _ = _bench_plan(["linear", "rms_norm"], ["torch"], ["int4", "fp32"], None, [{"M": 1, "N": 64, "K": 128}],
                           torch.device("cpu"))
    assert {(c[0], c[2]) for c in calls} == {("linear_int4", "fp32"), ("rms_norm", "fp32"), ("linear", "fp32")}
    calls, _ = _bench_plan(["decode_attention"], ["torch"], ["fp32"], "fp8", [], torch.device("cpu"))
    assert [c[0] for c in calls] == ["decode_attention_fp8kv"]
    with pytest.raises(ValueError, match="weight format for --op linear"):
        _bench_plan(["rms_norm"], ["torch"], ["mxfp4"], None, [], torch.device("cpu"))
