"""Memory capacity (tokprof.rollup.capacity): each term by hand, the edge cases (exactly full, tp not dividing the
heads, tp replicating KV heads), the largest batch, and infeasible points that are never a number."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tokprof import rollup
from tokprof.cli import app
from tokprof.models import ModelConfig
from tokprof.profiler.devices import load_specs
from tokprof.rollup import capacity
from tokprof.rollup.capacity import MaxBatch, max_batch, memory_budget
from tokprof.rollup.records import RollupPoint

L8 = ModelConfig.from_name("llama-3.1-8b")
L70 = ModelConfig.from_name("llama-3.1-70b")


def test_weights_per_gpu_by_hand():
    assert capacity.weight_bytes_per_gpu(L8, "bf16") == L8.weight_bytes(torch.bfloat16) == 16_060_522_496
    # tp 4 of llama-3.1-70b: per layer QKV (64/4 + 2 x 8/4) x 128 x 8192, O 16 x 128 x 8192, MLP 3 x 8192 x 7168,
    # norms 2 x 8192 whole; embedding whole (128256 x 8192), LM head 32064 rows, final norm
    per_layer = 8192 * (16 + 2 * 2) * 128 + 16 * 128 * 8192 + 3 * 8192 * 7168 + 2 * 8192
    want = (80 * per_layer + 128256 * 8192 + 32064 * 8192 + 8192) * 2
    assert capacity.weight_bytes_per_gpu(L70, "bf16", tp=4) == want


def test_kv_cache_is_paged_and_block_rounded():
    # 1000 tokens in blocks of 16 -> 63 blocks = 1008 tokens; 2 x 32 layers x 8 KV heads x 128 x 2 bytes per token
    assert capacity.kv_cache_bytes_per_gpu(L8, 3, 1000, "bf16") == 3 * 1008 * 2 * 32 * 8 * 128 * 2
    assert capacity.kv_cache_bytes_per_gpu(L8, 3, 1000, "bf16", block_size=256) == 3 * 1024 * 131072
    # tp 2: 4 KV heads per GPU
    assert capacity.kv_cache_bytes_per_gpu(L8, 1, 16, "bf16", tp=2) == 16 * 2 * 32 * 4 * 128 * 2


def test_tp_replicating_kv_heads_counts_one_head_on_every_gpu():
    # 8 KV heads over 16 GPUs: each GPU holds one (a replica), as tokprof.models.tp.kv_heads_per_gpu says
    cfg = ModelConfig("t", vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_layers=2, num_heads=16,
                      num_kv_heads=8, head_dim=64)
    assert capacity.kv_cache_bytes_per_gpu(cfg, 1, 16, "bf16", tp=16) == 16 * 2 * 2 * 1 * 64 * 2
    per_layer = 1024 * (1 + 2 * 1) * 64 + 1 * 64 * 1024 + 3 * 1024 * 128 + 2 * 1024
    want = (2 * per_layer + 1024 * 1024 + 64 * 1024 + 1024) * 2
    assert capacity.weight_bytes_per_gpu(cfg, "bf16", tp=16) == want


def test_tp_not_dividing_the_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="tp: expected a divisor of num_heads 32"):
        memory_budget(L8, "h100", 1, 1024, tp=3)
    with pytest.raises(ValueError, match="tp: with fewer KV heads"):
        capacity.kv_cache_bytes_per_gpu(ModelConfig("t", vocab_size=64, hidden_size=768, intermediate_size=128,
                                                    num_layers=1, num_heads=12, num_kv_heads=4, head_dim=64),
                                        1, 16, "bf16", tp=6)


def test_budget_terms_and_the_reason():
    b = memory_budget(L8, "h200", 128, 8192)
    act = 128 * (2 * (2 * 4096 + (32 + 16) * 128 + 2 * 14336) + 4 * 128256) + 64 * 2**20
    assert (b.weights_bytes, b.kv_cache_bytes, b.activation_bytes) == (16_060_522_496, 128 * 8192 * 131072, act)
    assert b.capacity_bytes == 141_000_000_000 and b.reserve_bytes == 14_100_000_000
    assert b.total_bytes == b.weights_bytes + b.kv_cache_bytes + b.activation_bytes + b.reserve_bytes
    assert b.fits is False
    assert b.reason.startswith("needs 167.7 GB (weights 16.1 GB, KV cache 137.4 GB") and "has 141.0 GB" in b.reason
    assert memory_budget(L8, "h200", 64, 8192).fits is True and memory_budget(L8, "h200", 64, 8192).reason is None
    with pytest.raises(ValueError, match=r"memory_utilization: expected a fraction in \(0, 1\]"):
        memory_budget(L8, "h200", 1, 1, memory_utilization=1.5)


def test_exactly_full_fits_and_one_byte_less_does_not():
    b = memory_budget(L8, None, 4, 4096, capacity_bytes=10**12, memory_utilization=1.0)
    exact = b.weights_bytes + b.kv_cache_bytes + b.activation_bytes
    assert memory_budget(L8, None, 4, 4096, capacity_bytes=exact, memory_utilization=1.0).fits is True
    assert memory_budget(L8, None, 4, 4096, capacity_bytes=exact - 1, memory_utilization=1.0).fits is False
    unknown = memory_budget(L8, None, 4, 4096)
    assert unknown.fits is None and unknown.reason is None and "no memory_gb" in unknown.capacity_source


def test_max_batch_is_the_last_batch_that_fits():
    limit = max_batch(L8, "h200", 8192)
    assert isinstance(limit, MaxBatch) and limit.reason is None
    assert memory_budget(L8, "h200", limit.batch, 8192).fits
    assert not memory_budget(L8, "h200", limit.batch + 1, 8192).fits
    # by hand: (141e9 x 0.9 - weights - workspace) / (KV per sequence + activations per sequence)
    per_seq = 8192 * 131072 + 2 * (2 * 4096 + 48 * 128 + 2 * 14336) + 4 * 128256
    assert limit.batch == (141e9 * 0.9 - 16_060_522_496 - 64 * 2**20) // per_seq == 103
    none = max_batch(L70, "h100", 1024)
    assert none.batch is None and none.reason.startswith("even batch 1 does not fit: needs 149.5 GB")
    assert max_batch(L70, "h100", 8192, tp=4).batch == 52
    assert max_batch(L8, None, 1024).batch is None  # capacity unknown


def test_modelled_points_stop_at_capacity():
    # issue 12's cases: 8B at batch 128 x 8192 on an H200 and 70B on one H100 do not fit; batch 64 and tp 4 do
    p128, p64 = rollup.modelled(L8, "h200", [128, 64], [8192])
    assert p128.infeasible_reason.startswith("needs 167.7 GB") and "has 141.0 GB" in p128.infeasible_reason
    assert (p128.step_time_us, p128.tokens_per_s_per_gpu, p128.tokens_per_s_per_user,
            p128.usd_per_million_tokens, p128.tokens_per_s_per_mw) == (None, None, None, None, None)
    assert p128.memory_bytes_per_gpu == memory_budget(L8, "h200", 128, 8192).total_bytes
    assert p64.infeasible_reason is None and p64.tokens_per_s_per_gpu > 1000
    assert p64.memory_capacity_bytes == 141_000_000_000
    assert RollupPoint.from_dict(json.loads(json.dumps(p128.to_dict()))) == p128
    assert all(p.infeasible_reason for p in rollup.modelled(L70, "h100", [1, 8], [1024]))
    tp4 = rollup.modelled(L70, "h100", [1, 8, 64], [1024], tp=4)
    assert all(p.tokens_per_s_per_gpu is not None and p.tokens_per_s_per_gpu > 0 for p in tp4)
    # the frontier and the cost at an interactivity skip what does not fit
    front = rollup.pareto_frontier([p128, p64])
    assert front == [p64]
    cost = rollup.cost_at_interactivity([p128], 10.0)
    assert cost.tokens_per_s_per_gpu is None and "fits in memory" in cost.reason


def test_cli_rollup_batch_max_and_infeasible_rows():
    env = {"COLUMNS": "80"}
    res = CliRunner().invoke(app, ["rollup", "--model", "llama-3.1-8b", "--gpu", "h200", "--modelled", "--batch",
                                   "128", "--context", "8192"], env=env)
    assert res.exit_code == 0, res.output
    (p,) = json.loads(res.stdout.strip().splitlines()[-1])["points"]
    assert p["tokens_per_s_per_gpu"] is None and p["infeasible_reason"].startswith("needs 167.7 GB")
    text = " ".join(res.stdout.split())
    assert "does not fit in memory, needs 167.7 GB" in text and "has 141.0 GB" in text and "infeasible" in text
    assert "largest batch that fits in 141 GB per GPU" in text and "tp 1: 103 at context 8192" in text
    res = CliRunner().invoke(app, ["rollup", "--model", "llama-3.1-8b", "--gpu", "h200", "--modelled", "--batch",
                                   "max", "--context", "1024,8192"], env=env)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert [(q["batch"], q["context"]) for q in doc["points"]] == [(821, 1024), (103, 8192)]
    assert all(q["tokens_per_s_per_gpu"] > 0 for q in doc["points"])
    card = {(r["tp"], r["context"]): r["batch"] for r in doc["card"]["max_batch"]}
    assert card[(1, 8192)] == 103 and card[(4, 8192)] > card[(2, 8192)] > 103
    res = CliRunner().invoke(app, ["rollup", "--model", "tiny", "--device", "cpu", "--batch", "max"], env=env)
    assert res.exit_code == 2 and "--batch max: needs a GPU" in " ".join(res.output.split())


def test_specs_hold_memory_for_every_gpu():
    # capacity needs memory_gb: every shipped GPU row has it
    assert all(s.memory_gb and s.memory_gb > 0 for s in load_specs().values())
