"""paged_prefill_attention: torch and Triton (interpreter) against a float64 reference over scattered pages, the
decode and whole-prompt special cases, cost and bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import TRITON_DEVICE, assert_close, requires_triton

from tokprof.kernels import OPS, decode_attention, paged_prefill_attention, prefill_attention
from tokprof.kernels._common import cdiv


def paged_chunks(chunks: list[int], prefixes: list[int], hq: int, hkv: int, d: int, block_size: int,
                 dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Sequences b with prefixes[b] cached tokens then chunks[b] query tokens (K/V appended), pages in random order."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + c for p, c in zip(prefixes, chunks, strict=True)]
    pages = [cdiv(n, block_size) for n in seq_lens]
    num_blocks = sum(pages) + 2
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.full((len(chunks), max(pages) + 1), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[used:used + n]
        used += n
    cu = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32)
    return {
        "q": torch.randn(sum(chunks), hq, d, generator=gen).to(dtype),
        "k_cache": torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype),
        "v_cache": torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype),
        "block_table": table, "cu_q_lens": cu, "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
    }


def reference(q, k_cache, v_cache, block_table, cu_q_lens, seq_lens) -> torch.Tensor:
    """float64, query by query (a different loop than the torch backend's)."""
    total, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(total, hq, d, dtype=torch.float64)
    for b in range(len(seq_lens)):
        q0, q1, L = int(cu_q_lens[b]), int(cu_q_lens[b + 1]), int(seq_lens[b])
        for i in range(q1 - q0):
            pos = L - (q1 - q0) + i
            t = torch.arange(pos + 1)
            pages = block_table[b, t // bs].long()
            k, v = k_cache[pages, t % bs].double(), v_cache[pages, t % bs].double()  # (n, Hkv, D)
            for h in range(hq):
                kh = h // (hq // hkv)
                p = torch.softmax(k[:, kh] @ q[q0 + i, h].double() * d**-0.5, 0)
                out[q0 + i, h] = p @ v[:, kh]
    return out


CASES = [([5, 17], [0, 21], 4, 2, 16, 8), ([1, 3, 20], [40, 0, 3], 6, 2, 32, 5)]


@pytest.mark.parametrize("case", CASES)
def test_torch_matches_float64(case):
    chunks, prefixes, hq, hkv, d, bs = case
    inp = paged_chunks(chunks, prefixes, hq, hkv, d, bs, torch.float32)
    assert_close(paged_prefill_attention(**inp, backend="torch"), reference(**inp), torch.float32)


@requires_triton
def test_triton_matches_float64():
    chunks, prefixes, hq, hkv, d, bs = CASES[1]
    inp = {k: v.to(TRITON_DEVICE) for k, v in paged_chunks(chunks, prefixes, hq, hkv, d, bs, torch.float32).items()}
    assert_close(paged_prefill_attention(**inp, backend="triton"), reference(**{k: v.cpu() for k, v in inp.items()}),
                 torch.float32)


def test_special_cases_equal_decode_and_prefill():
    # n_b = 1: decode attention; prefix 0: causal prefill of the whole prompt.
    inp = paged_chunks([1, 1], [30, 6], 4, 2, 16, 8, torch.float32, seed=1)
    dec = decode_attention(inp["q"].contiguous(), inp["k_cache"], inp["v_cache"], inp["block_table"],
                           inp["seq_lens"], backend="torch")
    assert_close(paged_prefill_attention(**inp, backend="torch"), dec.double(), torch.float32)
    inp = paged_chunks([12], [0], 4, 2, 16, 8, torch.float32, seed=2)
    t = torch.arange(12)
    k = inp["k_cache"][inp["block_table"][0, t // 8].long(), t % 8]  # (12, Hkv, D)
    v = inp["v_cache"][inp["block_table"][0, t // 8].long(), t % 8]
    full = prefill_attention(inp["q"].transpose(0, 1)[None].contiguous(), k.transpose(0, 1)[None].contiguous(),
                             v.transpose(0, 1)[None].contiguous(), causal=True, backend="torch")
    assert_close(paged_prefill_attention(**inp, backend="torch"), full[0].transpose(0, 1).double(), torch.float32)


def test_cost_by_hand():
    # B=1, Hq=2, Hkv=1, D=4, chunk=3 after context=2: pairs = 3*2 + 3*4/2 = 12; flops = 4*2*4*12 = 384.
    shape = {"B": 1, "Hq": 2, "Hkv": 1, "D": 4, "chunk": 3, "context": 2, "block_size": 4}
    flops, nbytes = OPS["paged_prefill_attention"].cost(shape, torch.float32)
    assert flops == 384
    assert nbytes == 2 * 5 * 1 * 4 * 4 + 2 * 3 * 2 * 4 * 4 + 2 * 4 + 3 * 4
    inputs = OPS["paged_prefill_attention"].make_inputs(shape, torch.float32, "cpu", 0)
    assert paged_prefill_attention(**inputs, backend="torch").shape == (3, 2, 4)


def test_bad_input_names_the_argument():
    inp = paged_chunks([3], [2], 4, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_prefill_attention(**{**inp, "seq_lens": torch.tensor([2], dtype=torch.int32)}, backend="torch")
    with pytest.raises(ValueError, match="cu_q_lens"):
        paged_prefill_attention(**{**inp, "cu_q_lens": torch.tensor([0, 2], dtype=torch.int32)}, backend="torch")
    with pytest.raises(ValueError, match="q: expected Hq"):
        paged_prefill_attention(**{**inp, "q": torch.randn(3, 3, 16)}, backend="torch")
