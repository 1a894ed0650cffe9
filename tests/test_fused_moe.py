"""fused_moe: both backends against a float64 per-token loop (both activations, biases, odd sizes, experts that
no token chose, an expert chosen by many tokens), transformers' gpt-oss experts, the routing layout, cost, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, assert_close, requires_triton

from tokprof.kernels import OPS, fused_moe
from tokprof.kernels._common import poisoned_outputs

fm = importlib.import_module("tokprof.kernels.fused_moe")


def reference(x, w_gate_up, w_down, topk_weights, topk_ids, activation="silu", b_gate_up=None, b_down=None,
              round_to=None) -> torch.Tensor:
    """float64, token by token and slot by slot. `round_to` rounds the activation to that dtype, as every backend
    does between its two GEMMs (the kernels keep the intermediate in x's dtype)."""
    num_tokens, hidden = x.shape
    inter = w_down.shape[2]
    out = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for t in range(num_tokens):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            h = w_gate_up[e].double().cpu() @ x[t].double().cpu()  # (2I,)
            if b_gate_up is not None:
                h = h + b_gate_up[e].double().cpu()
            gate, up = h[:inter], h[inter:]
            if activation == "silu":
                a = gate * torch.sigmoid(gate) * up
            else:
                gate = gate.clamp(max=7.0)
                up = up.clamp(-7.0, 7.0)
                a = (up + 1) * gate * torch.sigmoid(1.702 * gate)
            if round_to is not None:
                a = a.to(round_to).double()
            y = w_down[e].double().cpu() @ a
            if b_down is not None:
                y = y + b_down[e].double().cpu()
            out[t] += float(topk_weights[t, j]) * y
    return out


def moe_inputs(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, dtype: torch.dtype,
               device: str, seed: int, gpt_oss: bool = False, hot_expert: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    if hot_expert:  # every token's first slot on expert 1: one expert with many rows (several row blocks)
        for t in range(num_tokens):
            row = [e for e in ids[t].tolist() if e != 1][: top_k - 1]
            ids[t] = torch.tensor([1] + row)
    weights = torch.rand(num_tokens, top_k, generator=gen)
    inputs = {
        "x": rand(num_tokens, hidden),
        "w_gate_up": rand(num_experts, 2 * inter, hidden, scale=hidden**-0.5 * (3 if gpt_oss else 1)),
        "w_down": rand(num_experts, hidden, inter, scale=inter**-0.5),
        "topk_weights": weights.to(device),
        "topk_ids": ids.to(torch.int32).to(device),
    }
    if gpt_oss:  # gate/up scaled up so some values pass the +-7 clamp
        inputs.update(activation="gpt_oss", b_gate_up=rand(num_experts, 2 * inter, scale=2.0),
                      b_down=rand(num_experts, hidden, scale=0.5))
    return inputs


# (T, H, I, E, k): decode-like (few tokens, many experts: most experts unchosen), odd H and I, one expert, k = E.
CASES = [(3, 64, 32, 16, 4), (5, 80, 48, 7, 2), (1, 33, 17, 5, 1), (4, 48, 24, 3, 3), (37, 32, 16, 8, 2)]


def case_id(case) -> str:
    return "T{}-H{}-I{}-E{}-k{}".format(*case)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gpt_oss"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_matches_per_token_loop(backend, case, activation, dtype):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    inputs = moe_inputs(*case, dtype=dtype, device=device, seed=5, gpt_oss=activation == "gpt_oss",
                        hot_expert=case[0] > 30)
    with poisoned_outputs():
        out = fused_moe(**inputs, backend=backend)
    assert out.dtype == dtype and out.device.type == torch.device(device).type
    assert_close(out, reference(**inputs, round_to=dtype), dtype, scale=4.0)


def test_unrounded_reference_within_dtype_error():
    # The rounding of the intermediate is the only deliberate departure from exact math: fp32 needs none.
    inputs = moe_inputs(4, 64, 32, 8, 2, torch.float32, "cpu", seed=6)
    assert_close(fused_moe(**inputs, backend="torch"), reference(**inputs), torch.float32)


def test_matches_transformers_gpt_oss_experts():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    hidden, inter, num_experts, top_k, num_tokens = 24, 16, 6, 2, 5
    config = transformers.GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
                                       num_experts_per_tok=top_k)
    experts = GptOssExperts(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    x = torch.randn(num_tokens, hidden, generator=gen) * 2
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), dim=-1)
    with torch.no_grad():
        theirs = experts(x, ids, weights)
    # transformers: gate_up_proj (E, H, 2I) with gate and up interleaved along 2I; ours: (E, 2I, H) = [gate | up].
    gu = experts.gate_up_proj.detach()
    w_gate_up = torch.cat([gu[..., ::2], gu[..., 1::2]], dim=-1).transpose(1, 2).contiguous()
    bgu = experts.gate_up_proj_bias.detach()
    b_gate_up = torch.cat([bgu[:, ::2], bgu[:, 1::2]], dim=-1).contiguous()
    w_down = experts.down_proj.detach().transpose(1, 2).contiguous()  # (E, I, H) -> (E, H, I)
    ours = fused_moe(x, w_gate_up, w_down, weights, ids.to(torch.int32), activation="gpt_oss", b_gate_up=b_gate_up,
                     b_down=experts.down_proj_bias.detach().contiguous(), backend="torch")
    assert (x @ gu[0, :, ::2]).max() > 7  # the clamp is exercised
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_route_blocks_touch_only_chosen_experts():
    # 2 tokens x 2 slots over 64 experts: 3 distinct experts (40 chosen twice), block_m 16.
    ids = torch.tensor([[40, 3], [9, 40]], dtype=torch.int32)
    sorted_pairs, expert, row0, row_end = fm._route_blocks(ids, 64, 16)
    assert expert.numel() == 4 // 16 + min(64, 4)  # grid bound from shapes: 4 row blocks
    assert expert.tolist() == [3, 9, 40, 64]  # one block per chosen expert, the tail marked E
    assert row0[:3].tolist() == [0, 1, 2] and row_end[:3].tolist() == [1, 2, 4]
    assert sorted_pairs.tolist() == [1, 2, 0, 3]  # pairs t*k+j sorted by expert, stable
    # An expert with 40 rows at block_m 16 gets 3 blocks covering [0,16), [16,32), [32,40).
    ids = torch.full((40, 1), 5, dtype=torch.int32)
    _, expert, row0, row_end = fm._route_blocks(ids, 8, 16)
    assert expert.tolist()[:4] == [5, 5, 5, 8] and row0.tolist()[:3] == [0, 16, 32] and row_end.tolist()[0] == 40


def test_expected_active_experts():
    assert fm.expected_active_experts(1, 256, 8) == 8
    # DeepSeek-R1 at B=16: 256 * (1 - (1 - 8/256)^16) = 101.96 -> 102
    assert fm.expected_active_experts(16, 256, 8) == 102
    assert fm.expected_active_experts(4096, 256, 8) == 256
    assert fm.expected_active_experts(2, 128, 8) == 16  # 15.5 rounds to 16 = T*k, never above
    assert fm.expected_active_experts(0, 128, 8) == 0


def test_cost_counts_only_touched_experts():
    # T=2, H=4, I=3, E=10, k=2, active 3, fp16: weights 3*4*3*2*3 = 216; x and out 2*2*4*2 = 32; router 2*2*8 = 32
    # flops = 4 pairs * (6*4*3 + 5*3 + 2*4) = 4 * 95 = 380
    op = OPS["fused_moe"]
    shape = {"T": 2, "H": 4, "I": 3, "E": 10, "k": 2, "active_experts": 3}
    assert op.cost(shape, torch.float16) == (380, 280)
    # Without active_experts: 10 * (1 - 0.8^2) = 3.6 -> 4 experts
    del shape["active_experts"]
    assert op.cost(shape, torch.float16)[1] == 4 * 72 + 32 + 32
    # gpt_oss adds the touched experts' biases: (2*3 + 4) * 2 bytes * 4
    assert op.cost({**shape, "gpt_oss": 1}, torch.float16)[1] == 4 * 72 + 4 * 20 + 64
    big = op.full_shape({"T": 16})
    assert op.cost(big, torch.bfloat16)[1] == 3 * 7168 * 2048 * 2 * 102 + 2 * 16 * 7168 * 2 + 16 * 8 * 8


@pytest.mark.parametrize("active", [5, 12])
def test_make_inputs_touches_exactly_active_experts(active):
    op = OPS["fused_moe"]
    shape = op.full_shape({"T": 6, "H": 16, "I": 8, "E": 32, "k": 2, "active_experts": active})
    inputs = op.make_inputs(shape, torch.float32, "cpu", seed=3)
    ids = inputs["topk_ids"]
    assert ids.shape == (6, 2) and ids.dtype == torch.int32
    assert all(len(set(row)) == 2 for row in ids.tolist())  # distinct experts per token
    assert len(set(ids.flatten().tolist())) == active
    out = op.run(inputs, backend="torch")
    assert_close(out, reference(**inputs), torch.float32)


def _good() -> dict:
    return moe_inputs(3, 16, 8, 4, 2, torch.float32, "cpu", seed=1)


@pytest.mark.parametrize("changes, message", [
    (lambda g: {"x": g["x"][0]}, "x: expected 2 dimensions"),
    (lambda g: {"x": g["x"][:, :8].contiguous()}, "w_gate_up: expected hidden size H=8"),
    (lambda g: {"w_gate_up": g["w_gate_up"][:, :15].contiguous()}, "w_gate_up: expected .* an even"),
    (lambda g: {"w_down": g["w_down"][:, :, :4].contiguous()}, r"w_down: expected shape \(4, 16, 8\)"),
    (lambda g: {"w_down": g["w_down"].half()}, "w_down: expected dtype torch.float32"),
    (lambda g: {"topk_weights": g["topk_weights"][:2]}, r"topk_weights: expected shape \(T=3, k\)"),
    (lambda g: {"topk_ids": g["topk_ids"][:, :1].contiguous()}, r"topk_ids: expected shape \(3, 2\)"),
    (lambda g: {"topk_ids": g["topk_ids"].float()}, "topk_ids: expected dtype in"),
    (lambda g: {"topk_ids": torch.tensor([[0, 1], [2, 4], [1, 3]], dtype=torch.int32)},
     r"topk_ids: expected expert ids in \[0, E=4\), got topk_ids\[1, 1\] = 4"),
    (lambda g: {"activation": "gelu"}, "activation: expected one of"),
    (lambda g: {"b_gate_up": torch.zeros(4, 8)}, r"b_gate_up: expected shape \(4, 16\)"),
    (lambda g: {"b_down": torch.zeros(4, 15)}, r"b_down: expected shape \(4, 16\)"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_inputs_name_the_argument(changes, message):
    inputs = _good()
    inputs.update(changes(inputs))
    with pytest.raises(ValueError, match=message):
        fused_moe(**inputs, backend="torch")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_experts_no_token_chose_are_never_read(backend):
    # NaN weights in every expert no token chose: any read of them would put NaN into the output.
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    inputs = moe_inputs(2, 32, 16, 12, 2, torch.float32, device, seed=8, gpt_oss=True)
    unused = sorted(set(range(12)) - set(inputs["topk_ids"].flatten().tolist()))
    assert len(unused) >= 8
    expected = reference(**inputs)
    for name in ("w_gate_up", "w_down", "b_gate_up", "b_down"):
        inputs[name][unused] = float("nan")
    assert_close(fused_moe(**inputs, backend=backend), expected, torch.float32)


def test_int64_ids_and_fp16_weights_accepted():
    inputs = moe_inputs(3, 32, 16, 6, 2, torch.float32, "cpu", seed=9)
    expected = reference(**inputs)
    inputs["topk_ids"] = inputs["topk_ids"].long()
    inputs["topk_weights"] = inputs["topk_weights"].half()
    assert_close(fused_moe(**inputs, backend="torch"), expected, torch.float32, scale=10.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [{"T": 1}, {"T": 16}, {"T": 300, "H": 512, "I": 256, "E": 8, "k": 2},
                                   {"T": 8, "H": 2880, "I": 2880, "E": 32, "k": 4, "gpt_oss": 1}])
def test_gpu_triton_matches_torch_and_captures(shape, dtype):
    op = OPS["fused_moe"]
    inputs = op.make_inputs(op.full_shape(shape), dtype, "cuda", seed=4)
    expected = fused_moe(**inputs, backend="torch")
    with poisoned_outputs():
        out = fused_moe(**inputs, backend="triton")
    assert_close(out, expected.float(), dtype, scale=4.0)
    # The Triton path never synchronises: it can be captured in a CUDA graph and replayed.
    from tokprof.kernels._common import skip_value_checks
    with skip_value_checks():
        fused_moe(**inputs, backend="triton")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fused_moe(**inputs, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured, expected.float(), dtype, scale=4.0)
