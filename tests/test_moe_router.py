"""moe_router: the three families' routing rules against transformers' own router modules on random logits (rows
with near-ties excluded), both backends, cost, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import TRITON_DEVICE, requires_triton

from tokprof.kernels import OPS, moe_router
from tokprof.kernels._common import poisoned_outputs

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter  # noqa: E402

TIE_GAP = 1e-5  # rows whose chosen and first unchosen selection scores are closer than this are not compared


def _identity(router: torch.nn.Module, num_experts: int) -> torch.nn.Module:
    """Router weight = identity (hidden size E), so its input is the logits themselves."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router


def hf_qwen3(logits: torch.Tensor, top_k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    num_experts = logits.shape[1]
    config = transformers.Qwen3MoeConfig(hidden_size=num_experts, num_experts=num_experts,
                                         num_experts_per_tok=top_k, norm_topk_prob=norm)
    _, weights, ids = _identity(Qwen3MoeTopKRouter(config), num_experts)(logits)
    return weights, ids


def hf_gpt_oss(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_experts = logits.shape[1]
    config = transformers.GptOssConfig(hidden_size=num_experts, num_local_experts=num_experts,
                                       num_experts_per_tok=top_k)
    router = _identity(GptOssTopKRouter(config), num_experts)
    with torch.no_grad():
        router.bias.zero_()
    _, weights, ids = router(logits)
    return weights, ids


def hf_deepseek(logits: torch.Tensor, top_k: int, n_group: int, topk_group: int, bias: torch.Tensor, norm: bool,
                scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    num_experts = logits.shape[1]
    config = transformers.DeepseekV3Config(hidden_size=num_experts, n_routed_experts=num_experts,
                                           num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
                                           norm_topk_prob=norm, routed_scaling_factor=scaling)
    router = _identity(DeepseekV3TopkRouter(config), num_experts)
    router.e_score_correction_bias.copy_(bias)
    _, weights, ids = router(logits)
    return weights, ids


def _clear_rows(choice: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows whose k-th and (k+1)-th selection scores differ by more than TIE_GAP."""
    top = torch.topk(choice, min(top_k + 1, choice.shape[1]), dim=-1)[0]
    if top.shape[1] <= top_k:
        return torch.ones(choice.shape[0], dtype=torch.bool)
    return (top[:, top_k - 1] - top[:, top_k]) > TIE_GAP


def assert_same_routing(ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor],
                        rows: torch.Tensor) -> None:
    w, ids = ours
    tw, tids = theirs
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert rows.sum() >= rows.numel() // 2, "too many near-ties: the test would check little"
    order, t_order = ids.long().sort(dim=-1), tids.long().sort(dim=-1)
    assert torch.equal(order.values[rows].cpu(), t_order.values[rows].cpu()), "different experts chosen"
    w_sorted = w.gather(1, order.indices).double().cpu()
    tw_sorted = tw.gather(1, t_order.indices).double().cpu()
    torch.testing.assert_close(w_sorted[rows], tw_sorted[rows], atol=1e-6, rtol=1e-5)


BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [True, False], ids=["renorm", "no_renorm"])
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(7, 24, 3), (5, 128, 8), (1, 4, 1)])
def test_qwen3_moe_rule(num_tokens, num_experts, top_k, norm, backend):
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(1))
    theirs = hf_qwen3(logits, top_k, norm)
    with poisoned_outputs():
        ours = moe_router(logits.to(TRITON_DEVICE if backend == "triton" else "cpu"), top_k=top_k,
                          renormalize=norm, backend=backend)
    assert_same_routing(ours, theirs, _clear_rows(logits, top_k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(9, 32, 4), (3, 20, 3)])
def test_gpt_oss_rule(num_tokens, num_experts, top_k, backend):
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(2)) * 3
    theirs = hf_gpt_oss(logits, top_k)
    with poisoned_outputs():
        ours = moe_router(logits.to(TRITON_DEVICE if backend == "triton" else "cpu"), top_k=top_k,
                          scoring="softmax", renormalize=True, backend=backend)
    assert_same_routing(ours, theirs, _clear_rows(logits, top_k))


# (T, E, k, n_group, topk_group): DeepSeek-V3's own 256/8/8/4 on a few tokens, an odd group count, no grouping.
DEEPSEEK_CASES = [(6, 256, 8, 8, 4), (5, 24, 3, 3, 2), (4, 16, 4, 1, 1), (3, 12, 2, 6, 6)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm, scaling", [(True, 2.5), (False, 1.0)], ids=["renorm_scaled", "plain"])
@pytest.mark.parametrize("case", DEEPSEEK_CASES, ids=lambda c: "T{}-E{}-k{}-g{}-tg{}".format(*c))
def test_deepseek_v3_rule(case, norm, scaling, backend):
    num_tokens, num_experts, top_k, n_group, topk_group = case
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(num_tokens, num_experts, generator=gen) * 2
    bias = torch.randn(num_experts, generator=gen) * 0.3  # large enough to change the choice on some rows
    theirs = hf_deepseek(logits, top_k, n_group, topk_group, bias, norm, scaling)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    with poisoned_outputs():
        ours = moe_router(logits.to(device), top_k=top_k, scoring="sigmoid", n_group=n_group, topk_group=topk_group,
                          bias=bias.to(device), renormalize=norm, routed_scaling=scaling, backend=backend)
    choice = torch.sigmoid(logits) + bias
    rows = _clear_rows(choice, top_k)
    if n_group > 1:  # near-ties between group scores could change the groups kept: exclude those rows too
        group_scores = choice.view(num_tokens, n_group, -1).topk(2, dim=-1)[0].sum(-1)
        rows &= _clear_rows(group_scores, topk_group) if topk_group < n_group else rows
    assert_same_routing(ours, theirs, rows)


def test_bias_changes_the_choice_but_not_the_weights():
    # Expert 0 has the lowest score but a huge bias: chosen, with its un-biased sigmoid score as weight.
    logits = torch.tensor([[-2.0, 1.0, 0.5, 0.0]])
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0])
    w, ids = moe_router(logits, top_k=2, scoring="sigmoid", bias=bias, renormalize=False, backend="torch")
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[-2.0, 1.0]])))


def test_cost_and_make_inputs():
    # T=2, E=8, k=2, grouped, fp16: flops 2*8*(4+2) = 96; bytes 2*8*2 + 2*2*8 + 4*8 = 32 + 32 + 32 = 96
    op = OPS["moe_router"]
    assert op.cost({"T": 2, "E": 8, "k": 2, "n_group": 4, "topk_group": 2}, torch.float16) == (96, 96)
    assert op.cost({"T": 2, "E": 8, "k": 2, "n_group": 0, "topk_group": 0}, torch.float16) == (96, 64)
    inputs = op.make_inputs(op.full_shape({"T": 3}), torch.float32, "cpu", seed=0)
    assert inputs["scoring"] == "sigmoid" and inputs["logits"].shape == (3, 256) and inputs["bias"].shape == (256,)
    w, ids = op.run(inputs, backend="torch")
    assert ids.shape == (3, 8) and w.shape == (3, 8)
    groups = (ids.long() // 32).tolist()
    assert all(len(set(row)) <= 4 for row in groups)  # at most topk_group groups used
    torch.testing.assert_close(w.sum(-1), torch.full((3,), 2.5))


@pytest.mark.parametrize("kwargs, message", [
    ({"logits": torch.randn(2, 4, 3)}, "logits: expected 2 dimensions"),
    ({"logits": torch.randn(0, 4)}, r"logits: expected a non-empty \(T, E\)"),
    ({"top_k": 0}, r"top_k: expected an int in \[1, E=8\], got 0"),
    ({"top_k": 9}, r"top_k: expected an int in \[1, E=8\], got 9"),
    ({"scoring": "relu"}, "scoring: expected one of"),
    ({"n_group": 2}, "topk_group: expected n_group and topk_group both set"),
    ({"n_group": 3, "topk_group": 1}, "n_group: expected a positive int that divides E=8"),
    ({"n_group": 8, "topk_group": 1}, "n_group: expected groups of at least 2 experts"),
    ({"n_group": 2, "topk_group": 3}, r"topk_group: expected an int in \[1, n_group=2\]"),
    ({"n_group": 4, "topk_group": 1, "top_k": 3}, "top_k: expected at most topk_group"),
    ({"bias": torch.randn(7)}, r"bias: expected shape \(8\)"),
    ({"renormalize": 1}, "renormalize: expected a bool"),
    ({"routed_scaling": 0.0}, "routed_scaling: expected a positive finite number"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_inputs_name_the_argument(kwargs, message):
    args = {"logits": torch.randn(3, 8), "top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        moe_router(**args, backend="torch")
