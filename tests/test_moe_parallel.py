"""Tensor and expert parallelism of the MoE/MLA decode plans: hand-counted calls, all-to-all bytes, gloo
all_to_all, capacity per rank and the modelled roll-up at tp / ep."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tokprof.cli import app
from tokprof.models.config import ModelConfig
from tokprof.models.config_moe import expert_params
from tokprof.models.plan import decode_plan
from tokprof.models.plan_moe_parallel import all_to_all_bytes, weight_bytes_per_gpu
from tokprof.models.tp import tp_totals
from tokprof.profiler import collectives as coll
from tokprof.rollup.capacity import kv_cache_bytes_per_gpu, max_batch, memory_budget
from tokprof.rollup.step_model import StepModel

FAST = {"min_samples": 5, "min_time_s": 0.0, "max_time_s": 0.15, "warmup_ms": 2.0}


def _by_label(calls):
    out = {}
    for c in calls:
        for label in c.label.split("+"):
            out[label] = c
    return out


def test_tiny_mla_tp2_calls_by_hand() -> None:
    c = ModelConfig.from_name("tiny-mla")  # 4 heads, q_lora 96, kv_lora 64, rope 32, nope 32, v 32, layer 0 dense
    calls = decode_plan(c, 4, 32, "bf16", tp=2)
    by = _by_label(calls)
    assert by["q_b_proj"].shape == {"M": 4, "N": 2 * (32 + 32), "K": 96}  # 2 heads per GPU
    assert by["kv_a_proj"].shape == {"M": 4, "N": 64, "K": 256}  # replicated: the latent row is every head's
    assert by["attention"].shape["H"] == 2 and by["attention"].shape["L"] == 64
    assert by["o_proj"].shape == {"M": 4, "N": 256, "K": 2 * 32}
    assert by["gate_up_proj"].shape["N"] == 2 * 512 // 2
    # E(distinct of 8, k 2, 4 tokens) = 8 (1 - 0.75^4) = 5.47 -> 5, + 1 shared; intermediate 128 / 2
    assert by["experts"].shape["I"] == 64 and by["experts"].shape["active_experts"] == 6
    ar = [x for x in calls if x.op == "all_reduce"]
    assert len(ar) == 1 and ar[0].shape == {"bytes": 4 * 256 * 2, "world": 2}
    assert ar[0].count == 2 + 1 + 1  # o_proj x 2 layers, the dense down_proj, the MoE block
    ag = [x for x in calls if x.op == "all_gather"]
    assert ag[0].shape == {"bytes": 4 * 256 * 2 * 2, "world": 2}
    assert tp_totals(calls)["collective_bytes"] == 4 * 2048 + 4096


def test_tiny_moe_ep2_dp_attention_calls_by_hand() -> None:
    c = ModelConfig.from_name("tiny-moe")  # 8 experts, top 2, hidden 256, 2 MoE layers, 4 q / 2 kv heads of 64
    calls = decode_plan(c, 4, 32, "bf16", ep=2, dp_attention=True)
    by = _by_label(calls)
    assert by["qkv_proj"].shape["N"] == (4 + 2 * 2) * 64  # whole attention on each rank
    a2a = [x for x in calls if x.op == "all_to_all"]
    assert len(a2a) == 1 and a2a[0].shape == {"bytes": 4 * 2 * 256 * 2, "world": 2}  # B x k x hidden x 2 bytes
    assert a2a[0].count == 2 * 2  # dispatch + combine per MoE layer
    # the group's 8 tokens x 2 slots over 2 ranks; distinct local experts 8 (1 - 0.75^8) / 2 = 3.6 -> 4 of 4
    assert by["experts"].shape == {"T": 8, "E": 4, "k": 1, "H": 256, "I": 128, "active_experts": 4}
    assert not [x for x in calls if x.op in ("all_reduce", "all_gather")]
    assert all_to_all_bytes(4, 256, 2, 2) == 4096


def test_tiny_moe_tp2_ep2_combines_with_an_all_reduce() -> None:
    c = ModelConfig.from_name("tiny-moe")
    calls = decode_plan(c, 4, 32, "bf16", tp=2, ep=2)
    by = _by_label(calls)
    # 4 tokens x 2 slots over 2 ranks; E distinct 5.47 / 2 = 2.7 -> 3 of the rank's 4
    assert by["experts"].shape == {"T": 4, "E": 4, "k": 1, "H": 256, "I": 128, "active_experts": 3}
    assert not [x for x in calls if x.op == "all_to_all"]
    ar = [x for x in calls if x.op == "all_reduce"]
    assert ar[0].count == 2 * 2 and ar[0].shape["bytes"] == 4 * 256 * 2  # o_proj and the MoE block per layer


def test_bad_parallel_layouts_say_why() -> None:
    c = ModelConfig.from_name("tiny-moe")
    with pytest.raises(ValueError, match="ep: expected a divisor of num_experts 8"):
        decode_plan(c, 1, 8, "bf16", ep=3, dp_attention=True)
    with pytest.raises(ValueError, match="ep == tp"):
        decode_plan(c, 1, 8, "bf16", ep=2)
    with pytest.raises(ValueError, match="dp_attention"):
        decode_plan(c, 1, 8, "bf16", dp_attention=True)
    with pytest.raises(ValueError, match="needs an MoE model"):
        decode_plan(ModelConfig.from_name("llama-3.1-8b"), 1, 8, "bf16", ep=2, dp_attention=True)


def test_all_to_all_bus_factor_and_modelled_time() -> None:
    assert coll.bus_factor("all_to_all", 8) == pytest.approx(7 / 8)
    link = coll.Link(kind="nvlink", gbps_per_direction=450.0, source="test")
    m = StepModel()
    t, algo = m.collective_us("all_to_all", 1 << 20, 8, link)
    bw = 450e9 * m.collective_efficiency / 1e6
    ring = m.collective_base_us["ring"] + 7 * m.collective_hop_us["nvlink"] + (1 << 20) * 7 / 8 / bw
    one_shot = m.collective_base_us["one_shot"] + (1 << 20) * 7 / 8 / bw
    assert t == pytest.approx(min(ring, one_shot)) and algo in ("ring", "one_shot")


def test_gloo_all_to_all_two_ranks() -> None:
    (rec,) = coll.bench_collectives([("all_to_all", 4096)], world_size=2, device="cpu", timing_kwargs=FAST)
    assert rec.op == "all_to_all" and rec.shape == {"bytes": 4096, "world": 2}
    t = rec.timing
    assert (rec.backend, rec.provenance) == ("gloo", "measured") and t.median_us > 0
    assert "result checked against a host reference" in t.note  # each rank got every rank's chunk for it
    algbw = 4096 / (t.median_us * 1e-6) / 1e9
    assert rec.roofline.achieved_gbps == pytest.approx(algbw * 0.5, rel=1e-12)  # busbw = algbw x (n-1)/n


def test_capacity_per_rank() -> None:
    c = ModelConfig.from_name("tiny-moe")
    experts = c.num_moe_layers * c.num_experts * expert_params(c)
    assert weight_bytes_per_gpu(c, "bf16", 1, 2, True) == c.weight_bytes("bf16") - experts // 2 * 2
    b = memory_budget(c, None, 2, 64, "bf16", capacity_bytes=10**9, ep=2, dp_attention=True)
    assert b.weights_bytes == weight_bytes_per_gpu(c, "bf16", 1, 2, True) and b.ep == 2
    mla = ModelConfig.from_name("tiny-mla")  # the latent KV row is replicated, not split, over TP ranks
    assert kv_cache_bytes_per_gpu(mla, 3, 64, "bf16", tp=2) == kv_cache_bytes_per_gpu(mla, 3, 64, "bf16", tp=1)
    r1 = ModelConfig.from_name("deepseek-r1")
    limit = max_batch(r1, "h200", 4096, "bf16", 8, ep=8)
    assert limit.batch is None and "does not fit" in limit.reason  # 1.34 TB of bf16 weights / 8 > 141 GB


def test_cli_rollup_deepseek_r1_tp8_and_qwen_ep() -> None:
    r1 = CliRunner().invoke(app, ["rollup", "--model", "deepseek-r1", "--gpu", "h200", "--modelled", "--tp", "8",
                                  "--batch", "1", "--context", "4096"])
    assert r1.exit_code == 0, r1.output
    doc = json.loads(r1.stdout.strip().splitlines()[-1])
    assert doc["card"]["tp"] == 8 and doc["card"]["weight_bytes_per_gpu"] > 141e9
    assert doc["points"][0]["tokens_per_s_per_gpu"] is None and "needs" in doc["points"][0]["infeasible_reason"]
    fp8 = CliRunner().invoke(app, ["rollup", "--model", "deepseek-r1", "--gpu", "h200", "--modelled", "--tp", "8",
                                   "--dtype", "fp8", "--batch", "1", "--context", "4096"])
    assert fp8.exit_code == 0, fp8.output
    doc = json.loads(fp8.stdout.strip().splitlines()[-1])
    p = doc["points"][0]  # fp8 weights fit: 86 GB per GPU
    assert p["tokens_per_s_per_gpu"] == pytest.approx(1 / (p["step_time_us"] * 1e-6) / 8)
    assert p["collective_time_us"] > 0 and p["usd_per_million_tokens"] > 0
    assert [r for r in doc["card"]["max_batch"] if r["tp"] == 8][0]["batch"] > 1
    q = CliRunner().invoke(app, ["rollup", "--model", "qwen3-235b-a22b", "--gpu", "h200", "--modelled", "--ep", "8",
                                 "--dp-attention", "--batch", "1,32", "--context", "4096"])
    assert q.exit_code == 0, q.output
    doc = json.loads(q.stdout.strip().splitlines()[-1])
    assert [r for r in doc["card"]["max_batch"] if r.get("ep") == 8][0]["batch"] > 32
    for p in doc["points"]:
        assert p["tokens_per_s_per_gpu"] == pytest.approx(p["batch"] / (p["step_time_us"] * 1e-6))
        assert p["usd_per_million_tokens"] > 0 and p["j_per_token_total"] is None
    bad = CliRunner().invoke(app, ["rollup", "--model", "qwen3-235b-a22b", "--gpu", "h200", "--modelled", "--ep",
                                   "3", "--dp-attention"])
    assert bad.exit_code != 0 and "num_experts 128" in " ".join(bad.output.split())
