"""MoE/MLA models in low-precision weight formats, modelled: fused_moe's expert bytes in the format, the plans'
quantised projections, the config's byte counts and capacity, and the two issue-17 roll-up commands."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tokprof.cli import app
from tokprof.kernels import OPS
from tokprof.models import ModelConfig
from tokprof.models.plan import decode_plan
from tokprof.profiler.devices import load_specs
from tokprof.quant.formats import WEIGHT_FORMATS
from tokprof.quant.precision import math_dtype
from tokprof.rollup.capacity import max_batch

R1 = ModelConfig.from_name("deepseek-r1")
Q3 = ModelConfig.from_name("qwen3-30b-a3b")


def _moe_call(plan):
    (call,) = [c for c in plan if c.op == "fused_moe"]
    return call


def test_expert_bytes_of_one_moe_layer_nvfp4_vs_bf16_by_hand():
    # DeepSeek-R1 MoE layer at batch 1: 8 routed + 1 shared expert, H=7168, I=2048.
    bf16 = _moe_call(decode_plan(R1, 1, 1024, "bf16"))
    fp4 = _moe_call(decode_plan(R1, 1, 1024, "nvfp4"))
    assert bf16.shape["active_experts"] == fp4.shape["active_experts"] == 9
    h, i, a, t, k = 7168, 2048, 9, 1, 9
    io = 2 * t * h * 2 + t * k * 8  # x and out in bf16, topk weights and ids
    # nvfp4: 4-bit elements + one e4m3 scale per 16 along K, + a 4-byte fp32 tensor scale per matrix
    gate_up = (2 * i * h * 4 + 2 * i * (h // 16) * 8) // 8 + 4
    down = (h * i * 4 + h * (i // 16) * 8) // 8 + 4
    assert fp4.cost()[1] == a * (gate_up + down) + io
    assert bf16.cost()[1] == a * 3 * h * i * 2 + io
    ratio = (fp4.cost()[1] - io) / (bf16.cost()[1] - io)
    assert ratio == pytest.approx(WEIGHT_FORMATS["nvfp4"].bits_per_weight() / 16, rel=1e-3)  # 4.5 / 16
    assert fp4.cost()[0] == bf16.cost()[0]  # same FLOPs, counted against the fp4 roof where the GPU has one
    assert math_dtype("fused_moe", "bf16", load_specs()["gb300"], fp4.shape) == "fp4"
    assert math_dtype("fused_moe", "bf16", load_specs()["h200"], fp4.shape) == "bf16"  # no fp4 on Hopper
    assert math_dtype("fused_moe", "bf16", load_specs()["h200"], _moe_call(decode_plan(Q3, 4, 64, "fp8")).shape) \
        == "fp8"


def test_moe_plan_quantises_projections_but_not_router_head_or_latent():
    plan = decode_plan(R1, 4, 1024, "nvfp4")
    ops = {lab: c.op for c in plan for lab in c.labels}
    for lab in ("q_a_proj", "q_b_proj", "kv_a_proj", "o_proj", "gate_up_proj", "down_proj"):
        assert ops[lab] == "linear_nvfp4", lab
    assert ops["router"] == ops["lm_head"] == "linear"
    assert ops["q_absorb"] == ops["v_up"] == "batched_linear"
    fp8 = {lab: c.op for c in decode_plan(Q3, 4, 1024, "fp8") for lab in c.labels}
    assert fp8["qkv_proj"] == "linear_fp8" and "quant_qkv_proj" in fp8
    with pytest.raises(ValueError, match="kv_dtype: an fp8 KV cache of deepseek-r1"):
        decode_plan(R1, 4, 1024, "nvfp4+kv-fp8")
    kv8 = {c.op for c in decode_plan(Q3, 4, 1024, "fp8+kv-fp8")}  # standard attention: the dense fp8-cache ops
    assert {"append_kv_fp8", "decode_attention_fp8kv"} <= kv8 and "decode_attention" not in kv8


def test_config_bytes_follow_the_format():
    fmt = WEIGHT_FORMATS["nvfp4"]
    bf16, fp4 = R1.weight_bytes("bf16"), R1.weight_bytes("nvfp4")
    # the expert weights alone: 58 MoE layers x (256 routed + 1 shared) experts
    h, i = 7168, 2048
    per_expert = fmt.weight_bytes(2 * i, h) + fmt.weight_bytes(h, i)
    assert bf16 - fp4 > 58 * 257 * (3 * h * i * 2 - per_expert)  # the attention/dense linears save more on top
    assert 0.27 < fp4 / bf16 < 0.30  # mostly 4.5-bit weights, embedding/head/router/kv_b in bf16
    # a decode step at batch 1 reads 8 routed experts per layer: the byte count follows the plan's fused_moe
    one = R1.decode_weight_bytes("nvfp4", experts_touched=8)
    more = R1.decode_weight_bytes("nvfp4", experts_touched=9)
    assert more - one == 58 * per_expert
    assert Q3.weight_bytes("fp8") < 0.52 * Q3.weight_bytes("bf16")
    assert R1.weight_bytes(torch.bfloat16) == bf16


def test_capacity_fits_far_more_batch_in_the_format():
    # one GB300 (288 GB) holds neither: DeepSeek-R1 is 1.34 TB in bf16, 0.38 TB in nvfp4 (tp>1 MoE plans are not
    # built yet), so give it four GB300s' memory
    cap = 4 * 288 * 10**9
    assert max_batch(R1, "gb300", 8192, "bf16", capacity_bytes=cap).batch is None
    fp4 = max_batch(R1, "gb300", 8192, "nvfp4", capacity_bytes=cap).batch
    assert fp4 is not None and fp4 > 1000
    q_bf16 = max_batch(Q3, "h200", 8192, "bf16").batch
    q_fp8 = max_batch(Q3, "h200", 8192, "fp8").batch
    assert q_fp8 > q_bf16 * 1.2


@pytest.mark.parametrize("model,gpu,dtype", [("deepseek-r1", "gb300", "nvfp4"), ("qwen3-30b-a3b", "h200", "fp8")])
def test_acceptance_rollups_exit_0_with_format_bytes(model, gpu, dtype):
    res = CliRunner().invoke(app, ["rollup", "--model", model, "--gpu", gpu, "--modelled", "--dtype", dtype, "--json"])
    assert res.exit_code == 0, res.output
    card = json.loads(res.output[res.output.index("{"):])["card"]
    cfg = ModelConfig.from_name(model)
    assert card["weight_format"] == dtype
    assert card["weight_bytes"] == cfg.weight_bytes(dtype) < 0.55 * cfg.weight_bytes("bf16")
    assert "fused_moe" in OPS


def test_running_a_quantised_moe_model_is_refused_naming_the_dtype():
    from tokprof.models.transformer import Transformer

    model = Transformer.random(ModelConfig.from_name("tiny-moe"), device="cpu", dtype=torch.float32, seed=0,
                               backend="torch")
    with pytest.raises(ValueError, match=r"--dtype/--kv-dtype 'nvfp4\+act-fp32'.*--modelled"):
        model.quantize("nvfp4")
