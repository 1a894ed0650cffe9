"""gpt-oss's attention extras in decode_attention and prefill_attention: sinks (a per-head logit in the softmax
denominator) and a sliding window, against an explicit float64 masked softmax, on both backends and both decode
split paths; and transformers' own gpt-oss eager attention and sliding-window mask for the semantics."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, assert_close, requires_triton
from test_decode_attention import paged_inputs

from tokprof.kernels import OPS, decode_attention, prefill_attention
from tokprof.kernels._common import poisoned_outputs

da = importlib.import_module("tokprof.kernels.decode_attention")


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                             sinks: torch.Tensor | None, scale: float) -> torch.Tensor:
    """float64: q (Hq, M, D), k, v (Hq, N, D), visible (M, N) bool, sinks (Hq,) -> (Hq, M, D). The sink is an extra
    column of logits whose probability is dropped (no value)."""
    scores = torch.einsum("hmd,hnd->hmn", q.double(), k.double()) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double()[:, None, None].expand(-1, scores.shape[1], 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.einsum("hmn,hnd->hmd", probs, v.double())


def decode_reference(q, k_cache, v_cache, block_table, seq_lens, sinks, window, scale) -> torch.Tensor:
    batch, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(batch, hq, d, dtype=torch.float64)
    for b in range(batch):
        n = int(seq_lens[b])
        t = torch.arange(n)
        pages = block_table[b].cpu()[t // block_size].long()
        k = k_cache.cpu()[pages, t % block_size].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)  # (Hq, n, D)
        v = v_cache.cpu()[pages, t % block_size].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        visible = (t > n - 1 - window)[None, :] if window else torch.ones(1, n, dtype=torch.bool)
        out[b] = masked_softmax_attention(q[b].cpu()[:, None], k, v, visible, sinks, scale)[:, 0]
    return out


# (B, Hq, Hkv, D, block_size, seq_lens, window): windows shorter than, equal to and longer than the sequences,
# windows that start mid-page and mid-tile, one token.
DECODE_CASES = [
    (2, 4, 2, 64, 16, [37, 5], 8),
    (3, 8, 1, 32, 5, [50, 1, 21], 21),
    (1, 2, 2, 64, 16, [70], 100),
    (2, 6, 3, 80, 16, [33, 40], 1),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("extras", ["sinks", "window", "both"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-D{c[3]}-w{c[6]}")
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_decode_sinks_and_window(backend, case, extras, dtype, monkeypatch):
    *shape, window = case
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    inputs = paged_inputs(*shape, dtype=dtype, device=device, seed=21)
    gen = torch.Generator().manual_seed(22)
    sinks = (torch.randn(shape[1], generator=gen) * 2).to(device) if extras != "window" else None
    window = window if extras != "sinks" else None
    with poisoned_outputs():
        out = decode_attention(**inputs, scale=0.2, sinks=sinks, sliding_window=window, backend=backend)
    expected = decode_reference(**inputs, sinks=None if sinks is None else sinks.cpu(), window=window, scale=0.2)
    assert_close(out, expected, dtype)


@requires_triton
@pytest.mark.parametrize("extras", ["sinks", "window", "both"])
def test_decode_split_path_merges_sinks_once(extras, monkeypatch):
    # Forced splits: with a window some splits hold no visible token, and the sink must join the merge only once.
    monkeypatch.setattr(da, "_num_splits", lambda *args: 4)
    inputs = paged_inputs(2, 4, 2, 64, 16, [61, 30], torch.float32, TRITON_DEVICE, seed=23)
    sinks = torch.tensor([3.0, -1.0, 0.5, 8.0]).to(TRITON_DEVICE) if extras != "window" else None
    window = 40 if extras != "sinks" else None
    capacity = min(inputs["block_table"].shape[1] * 16, window or 1 << 30)  # the wrapper splits the window only
    num_splits, _ = da._split_plan(2, 2, capacity, 16, inputs["q"].device)
    assert num_splits == 3  # 80 tokens of pages in 32-token splits; a 40-token window in 16-token splits
    with poisoned_outputs():
        out = decode_attention(**inputs, sinks=sinks, sliding_window=window, backend="triton")
    expected = decode_reference(**inputs, sinks=None if sinks is None else sinks.cpu(), window=window,
                                scale=64**-0.5)
    assert_close(out, expected, torch.float32)


def prefill_reference(q, k, v, sinks, window, scale) -> torch.Tensor:
    batch, hq, seq, _ = q.shape
    group = hq // k.shape[1]
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    visible = (j <= i) & (j > i - window) if window else j <= i
    return torch.stack([masked_softmax_attention(q[b], k[b].repeat_interleave(group, 0), v[b].repeat_interleave(
        group, 0), visible, sinks, scale) for b in range(batch)])


# (B, Hq, Hkv, S, D, window): windows inside one 16-key block, across blocks, longer than the prompt.
PREFILL_CASES = [(1, 4, 2, 45, 32, 7), (2, 2, 1, 70, 64, 33), (1, 2, 2, 20, 16, 64), (1, 3, 1, 50, 32, 1)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("extras", ["sinks", "window", "both"])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-S{}-D{}-w{}".format(*c))
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_prefill_sinks_and_window(backend, case, extras, dtype):
    batch, hq, hkv, seq, d, window = case
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(batch, h, seq, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    sinks = torch.randn(hq, generator=gen) * 2 if extras != "window" else None
    window = window if extras != "sinks" else None
    with poisoned_outputs():
        out = prefill_attention(q.to(device), k.to(device), v.to(device), sinks=None if sinks is None else
                                sinks.to(device), sliding_window=window, backend=backend)
    assert_close(out, prefill_reference(q, k, v, sinks, window, d**-0.5), dtype)


def test_matches_transformers_gpt_oss_eager_attention():
    # transformers' gpt-oss eager attention with its sliding-window causal mask, against prefill_attention (all
    # positions) and decode_attention (the last position, through pages).
    pytest.importorskip("transformers")
    from transformers.masking_utils import sliding_window_causal_mask_function
    from transformers.models.gpt_oss import modeling_gpt_oss as gm

    hq, hkv, seq, d, window = 4, 2, 19, 16, 6
    gen = torch.Generator().manual_seed(41)
    q, k, v = (torch.randn(1, h, seq, d, generator=gen) for h in (hq, hkv, hkv))
    module = torch.nn.Module()
    module.num_key_value_groups = hq // hkv
    module.sinks = torch.nn.Parameter(torch.randn(hq, generator=gen))
    module.training = False
    keep = sliding_window_causal_mask_function(window)
    zero = torch.tensor(0)
    mask = keep(zero, zero, torch.arange(seq)[:, None], torch.arange(seq)[None, :])  # (S, S) bool
    assert mask.shape == (seq, seq) and int(mask[10].sum()) == window
    additive = torch.zeros(1, 1, seq, seq).masked_fill(~mask, float("-inf"))
    theirs, _ = gm.eager_attention_forward(module, q, k, v, additive, scaling=d**-0.5)  # (1, S, Hq, D)
    sinks = module.sinks.detach()
    ours = prefill_attention(q, k, v, sinks=sinks, sliding_window=window, backend="torch")
    torch.testing.assert_close(ours.transpose(1, 2), theirs, atol=1e-5, rtol=1e-5)
    # decode of the last token: its K/V rows in 4-token pages, in reverse page order
    pages = (seq + 3) // 4
    k_cache = torch.zeros(pages, 4, hkv, d)
    v_cache = torch.zeros(pages, 4, hkv, d)
    block_table = torch.arange(pages - 1, -1, -1, dtype=torch.int32)[None, :]
    for t in range(seq):
        k_cache[block_table[0, t // 4], t % 4] = k[0, :, t]
        v_cache[block_table[0, t // 4], t % 4] = v[0, :, t]
    out = decode_attention(q[0, :, -1][None].contiguous(), k_cache, v_cache, block_table,
                           torch.tensor([seq], dtype=torch.int32), sinks=sinks, sliding_window=window,
                           backend="torch")
    torch.testing.assert_close(out[0], theirs[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"sinks": torch.zeros(3)}, r"sinks: expected shape \(4\)"),
    ({"sinks": torch.zeros(4, dtype=torch.int64)}, "sinks: expected dtype in"),
    ({"sliding_window": 0}, "sliding_window: expected None or a positive int"),
    ({"sliding_window": 2.0}, "sliding_window: expected None or a positive int"),
])
def test_bad_extras_name_the_argument(kwargs, message):
    inputs = paged_inputs(2, 4, 2, 64, 16, [20, 5], torch.float32, "cpu", seed=7)
    with pytest.raises(ValueError, match=message):
        decode_attention(**inputs, **kwargs, backend="torch")
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=message):
        prefill_attention(q, k, k, **kwargs, backend="torch")
    with pytest.raises(ValueError, match="sliding_window: expected None with causal=False"):
        prefill_attention(q, k, k, causal=False, sliding_window=4, backend="torch")
    with pytest.raises(ValueError, match="sinks: the cuda backend has no attention sinks"):
        da._decode_attention_cuda(**inputs, sinks=torch.zeros(4))


def test_registry_window_and_sinks_keys():
    op = OPS["decode_attention"]
    base = {"B": 2, "Hq": 4, "Hkv": 2, "D": 8, "context": 20, "block_size": 16}
    assert op.full_shape(base) == base  # the keys are optional: shapes without them are unchanged
    # window 6 < context 20: K/V of 6 tokens, one page of block_table; flops 4*2*4*6*8 = 1536;
    # bytes 2*2*6*2*8*2 = 768 (K, V) + 256 (q, out) + 2*1*4 (block_table) + 8 (seq_lens) + 4*4 (sinks) = 1056
    assert op.cost({**base, "window": 6, "sinks": 1}, torch.float16) == (1536, 1056)
    assert op.cost({**base, "window": 64}, torch.float16) == op.cost(base, torch.float16)
    inputs = op.make_inputs(op.full_shape({**base, "window": 6, "sinks": 1}), torch.float32, "cpu", seed=1)
    assert inputs["sliding_window"] == 6 and inputs["sinks"].shape == (4,)
    expected = decode_reference(**{k: v for k, v in inputs.items() if k not in ("sinks", "sliding_window")},
                                sinks=inputs["sinks"], window=6, scale=8**-0.5)
    assert_close(op.run(inputs, backend="torch"), expected, torch.float32)
