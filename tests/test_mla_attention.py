"""MLA (absorbed) decode and prefill: both backends against a float64 reference, decode over scattered pages with
both split paths, and the absorbed form against the unabsorbed computation (per-head K and V up-projected from the
latent); cost, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, assert_close, requires_triton

from tokprof.kernels import OPS, mla_decode_attention, mla_prefill_attention
from tokprof.kernels._common import cdiv, poisoned_outputs

mla = importlib.import_module("tokprof.kernels.mla_decode_attention")
da = importlib.import_module("tokprof.kernels.decode_attention")


def paged_latent(batch: int, heads: int, rank: int, rope_dim: int, block_size: int, seq_lens: list[int],
                 dtype: torch.dtype, device: str, seed: int) -> dict:
    """Pages in a random order over the cache, spare pages, a spare block_table column of -1."""
    gen = torch.Generator().manual_seed(seed)
    pages = [cdiv(n, block_size) for n in seq_lens]
    num_blocks = sum(pages) + 3
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = torch.full((batch, max(pages) + 1), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = perm[used:used + n]
        used += n

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    return {
        "q_latent": rand(batch, heads, rank),
        "q_rope": rand(batch, heads, rope_dim),
        "kv_cache": rand(num_blocks, block_size, rank + rope_dim),
        "block_table": block_table.to(device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "kv_lora_rank": rank,
        "scale": 0.11,
    }


def decode_reference(q_latent, q_rope, kv_cache, block_table, seq_lens, kv_lora_rank, scale) -> torch.Tensor:
    batch, heads, rank = q_latent.shape
    block_size = kv_cache.shape[1]
    out = torch.empty(batch, heads, rank, dtype=torch.float64)
    for b in range(batch):
        t = torch.arange(int(seq_lens[b]))
        rows = kv_cache.cpu()[block_table[b].cpu()[t // block_size].long(), t % block_size].double()  # (n, L+R)
        c, k_pe = rows[:, :rank], rows[:, rank:]
        s = (q_latent[b].cpu().double() @ c.T + q_rope[b].cpu().double() @ k_pe.T) * scale  # (H, n)
        out[b] = torch.softmax(s, dim=-1) @ c
    return out


# (B, H, L, R, block_size, seq_lens): DeepSeek's 512 + 64 on a few tokens, odd rank/rope sizes, odd pages, 1 token.
CASES = [
    (2, 4, 64, 16, 16, [37, 1]),
    (1, 3, 40, 8, 5, [23]),
    (3, 16, 512, 64, 16, [18, 40, 7]),
    (2, 20, 32, 16, 32, [65, 33]),
]


def case_id(case) -> str:
    return "B{}-H{}-L{}-R{}-bs{}-len{}".format(*case[:5], "_".join(map(str, case[5])))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_decode_torch_matches_reference(case, dtype):
    inputs = paged_latent(*case, dtype=dtype, device="cpu", seed=1)
    out = mla_decode_attention(**inputs, backend="torch")
    assert out.dtype == dtype and out.shape == inputs["q_latent"].shape
    assert_close(out, decode_reference(**inputs), dtype)


@requires_triton
@pytest.mark.parametrize("split", [False, True], ids=["one_pass", "split"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_decode_triton_matches_reference(case, dtype, split, monkeypatch):
    inputs = paged_latent(*case, dtype=dtype, device=TRITON_DEVICE, seed=2)
    monkeypatch.setattr(da, "_num_splits", lambda *args: 3 if split else 1)
    capacity = inputs["block_table"].shape[1] * case[4]
    assert (da._split_plan(case[0], 1, capacity, 16, torch.device(TRITON_DEVICE))[0] > 1) == split
    with poisoned_outputs():
        out = mla_decode_attention(**inputs, backend="triton")
    assert_close(out, decode_reference(**inputs), dtype)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_absorbed_decode_equals_unabsorbed_attention(backend):
    # DeepSeek-V3's MLA in miniature: per head, k = [W_UK c | k_pe], v = W_UV c, score = (q_nope.k_nope +
    # q_pe.k_pe) * scale. Absorbed: q_latent = W_UK^T q_nope, out = W_UV (softmax @ c).
    batch, heads, rank, rope_dim, nope_dim, v_dim, block_size = 2, 4, 32, 16, 24, 20, 8
    seq_lens = [19, 6]
    gen = torch.Generator().manual_seed(3)
    w_uk = torch.randn(heads, nope_dim, rank, generator=gen, dtype=torch.float64) * rank**-0.5
    w_uv = torch.randn(heads, v_dim, rank, generator=gen, dtype=torch.float64) * rank**-0.5
    q_nope = torch.randn(batch, heads, nope_dim, generator=gen, dtype=torch.float64)
    q_pe = torch.randn(batch, heads, rope_dim, generator=gen, dtype=torch.float64)
    scale = (nope_dim + rope_dim) ** -0.5
    inputs = paged_latent(batch, heads, rank, rope_dim, block_size, seq_lens, torch.float64, "cpu", seed=4)
    expected = torch.empty(batch, heads, v_dim, dtype=torch.float64)
    for b, n in enumerate(seq_lens):
        t = torch.arange(n)
        rows = inputs["kv_cache"][inputs["block_table"][b, t // block_size].long(), t % block_size]
        c, k_pe = rows[:, :rank], rows[:, rank:]  # (n, L), (n, R)
        k_nope = torch.einsum("hdl,nl->hnd", w_uk, c)  # (H, n, nope)
        v = torch.einsum("hdl,nl->hnd", w_uv, c)  # (H, n, v_dim)
        s = (torch.einsum("hd,hnd->hn", q_nope[b], k_nope) + q_pe[b] @ k_pe.T) * scale
        expected[b] = torch.einsum("hn,hnd->hd", torch.softmax(s, dim=-1), v)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    fp32 = {k: (v.float().to(device) if isinstance(v, torch.Tensor) and v.is_floating_point() else
                v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    # As a model computes it: a per-head bmm (H, B, nope) x (H, nope, L) -> (H, B, L), seen as a strided (B, H, L).
    q_latent = torch.bmm(q_nope.transpose(0, 1).float(), w_uk.float()).to(device).transpose(0, 1)
    fp32.update(q_latent=q_latent, q_rope=q_pe.float().to(device), scale=scale)
    out_latent = mla_decode_attention(**fp32, backend=backend)  # (B, H, L)
    out = torch.einsum("hdl,bhl->bhd", w_uv, out_latent.double().cpu())
    assert_close(out, expected, torch.float32)


def prefill_reference(q_latent, q_rope, kv, kv_lora_rank, scale, causal) -> torch.Tensor:
    rank = kv_lora_rank
    c, k_pe = kv[..., :rank].double(), kv[..., rank:].double()
    s = (torch.einsum("bhsl,btl->bhst", q_latent.double(), c)
         + torch.einsum("bhsr,btr->bhst", q_rope.double(), k_pe)) * scale
    if causal:
        seq = kv.shape[1]
        s = s.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhst,btl->bhsl", torch.softmax(s, dim=-1), c)


PREFILL_CASES = [(1, 3, 37, 64, 16, True), (2, 2, 20, 32, 16, False), (1, 4, 50, 40, 8, True)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "B{}-H{}-S{}-L{}-R{}-causal{}".format(*c))
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_prefill_matches_reference(backend, case, dtype):
    batch, heads, seq, rank, rope_dim, causal = case
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(5)
    q_latent = torch.randn(batch, heads, seq, rank, generator=gen).to(dtype)
    q_rope = torch.randn(batch, heads, seq, rope_dim, generator=gen).to(dtype)
    kv = torch.randn(batch, seq, rank + rope_dim, generator=gen).to(dtype)
    with poisoned_outputs():
        out = mla_prefill_attention(q_latent.to(device), q_rope.to(device), kv.to(device), kv_lora_rank=rank,
                                    scale=0.1, causal=causal, backend=backend)
    assert_close(out, prefill_reference(q_latent, q_rope, kv, rank, 0.1, causal), dtype)


def test_prefill_last_row_equals_decode():
    # The prompt's last query over its own rows = decode of that query over the same rows in pages.
    gen = torch.Generator().manual_seed(6)
    heads, seq, rank, rope_dim = 3, 21, 32, 16
    q_latent = torch.randn(1, heads, seq, rank, generator=gen)
    q_rope = torch.randn(1, heads, seq, rope_dim, generator=gen)
    kv = torch.randn(1, seq, rank + rope_dim, generator=gen)
    full = mla_prefill_attention(q_latent, q_rope, kv, kv_lora_rank=rank, scale=0.2, backend="torch")
    cache = torch.zeros(3, 8, rank + rope_dim)
    block_table = torch.tensor([[2, 0, 1]], dtype=torch.int32)
    for t in range(seq):
        cache[block_table[0, t // 8], t % 8] = kv[0, t]
    last = mla_decode_attention(q_latent[:, :, -1].contiguous(), q_rope[:, :, -1].contiguous(), cache, block_table,
                                torch.tensor([seq], dtype=torch.int32), kv_lora_rank=rank, scale=0.2, backend="torch")
    torch.testing.assert_close(last, full[:, :, -1], atol=1e-5, rtol=1e-5)


def test_cost_hand_count():
    # decode B=2, H=4, L=8, R=2, context=5, block_size=4, fp16: flops 2*2*4*5*(16+2) = 1440;
    # bytes: latent rows 2*5*10*2 = 200, q/out 2*4*(16+2)*2 = 288, block_table 2*2*4 = 16, seq_lens 8 -> 512
    shape = {"B": 2, "H": 4, "L": 8, "R": 2, "context": 5, "block_size": 4}
    assert OPS["mla_decode_attention"].cost(shape, torch.float16) == (1440, 512)
    # prefill B=1, H=2, S=3, L=8, R=2 causal: pairs 6 -> flops 2*2*18*6/... = B*H*(2L+R)*S*(S+1) = 1*2*18*12 = 432
    # bytes (1*2*3*18 + 1*3*10) * 2 = 276
    shape = {"B": 1, "H": 2, "S": 3, "L": 8, "R": 2, "causal": 1}
    assert OPS["mla_prefill_attention"].cost(shape, torch.float16) == (432, 276)
    inputs = OPS["mla_decode_attention"].make_inputs(OPS["mla_decode_attention"].full_shape({"B": 2, "H": 4,
                                                                                             "context": 70}),
                                                     torch.float32, "cpu", seed=1)
    assert inputs["kv_cache"].shape[1:] == (64, 576) and inputs["block_table"].shape == (2, 2)
    assert_close(OPS["mla_decode_attention"].run(inputs, backend="torch"), decode_reference(**inputs),
                 torch.float32)


def _good() -> dict:
    return paged_latent(2, 4, 32, 16, 16, [20, 5], torch.float32, "cpu", seed=7)


@pytest.mark.parametrize("changes, message", [
    (lambda g: {"q_latent": g["q_latent"][0]}, "q_latent: expected 3 dimensions"),
    (lambda g: {"q_latent": g["q_latent"].transpose(1, 2).contiguous().transpose(1, 2)},
     "q_latent: expected a contiguous last dimension"),
    (lambda g: {"kv_lora_rank": 16}, "q_latent: expected last dimension kv_lora_rank=16"),
    (lambda g: {"kv_lora_rank": 0}, "kv_lora_rank: expected a positive int"),
    (lambda g: {"q_rope": g["q_rope"][:, :3].contiguous()}, r"q_rope: expected shape \(B=2, H=4, R\)"),
    (lambda g: {"kv_cache": g["kv_cache"][..., :40].contiguous()}, "kv_cache: expected rows of kv_lora_rank"),
    (lambda g: {"kv_cache": g["kv_cache"].half()}, "kv_cache: expected dtype torch.float32"),
    (lambda g: {"block_table": g["block_table"].long()}, "block_table: expected dtype in"),
    (lambda g: {"seq_lens": torch.tensor([20, 0], dtype=torch.int32)}, r"seq_lens: expected 1 <= seq_lens\[b\]"),
    (lambda g: {"seq_lens": torch.tensor([20, 17], dtype=torch.int32)}, "block_table: expected page ids"),
    (lambda g: {"scale": float("inf")}, "scale: expected a positive finite number"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_decode_bad_inputs_name_the_argument(changes, message):
    inputs = _good()
    inputs.update(changes(inputs))
    with pytest.raises(ValueError, match=message):
        mla_decode_attention(**inputs, backend="torch")


def test_prefill_bad_inputs_name_the_argument():
    q_latent, q_rope, kv = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4), torch.randn(1, 5, 12)
    with pytest.raises(ValueError, match=r"kv: expected shape \(B, S, kv_lora_rank \+ R\) = \(1, 5, 12\)"):
        mla_prefill_attention(q_latent, q_rope, kv[:, :, :10].contiguous(), kv_lora_rank=8, scale=0.1,
                              backend="torch")
    with pytest.raises(ValueError, match=r"q_rope: expected shape \(B, H, S, R\)"):
        mla_prefill_attention(q_latent, q_rope[:, :1].contiguous(), kv, kv_lora_rank=8, scale=0.1, backend="torch")
    with pytest.raises(ValueError, match="causal: expected a bool"):
        mla_prefill_attention(q_latent, q_rope, kv, kv_lora_rank=8, scale=0.1, causal=1, backend="torch")
    with pytest.raises(ValueError, match="scale: expected a positive finite number"):
        mla_prefill_attention(q_latent, q_rope, kv, kv_lora_rank=8, scale=-1.0, backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [{"B": 1, "H": 16}, {"B": 64, "H": 16, "context": 1000}, {"B": 300, "H": 128,
                                                                                            "context": 100}])
def test_gpu_decode_matches_reference(shape, dtype):
    op = OPS["mla_decode_attention"]
    inputs = op.make_inputs(op.full_shape(shape), dtype, "cuda", seed=5)
    with poisoned_outputs():
        out = mla_decode_attention(**inputs, backend="triton")
    torch.cuda.synchronize()
    assert_close(out, decode_reference(**inputs), dtype)


@requires_triton
def test_split_count_capped_for_the_merge(monkeypatch):
    # However many splits the decode planner asks for, MLA merges at most MLA_MAX_SPLITS rows of L values per head:
    # 64 asked, 416 tokens of pages in 16-token tiles would give 26 splits; capped to 13 of 32 tokens.
    monkeypatch.setattr(da, "_num_splits", lambda *args: 64)
    inputs = paged_latent(1, 2, 32, 16, 16, [400], torch.float32, TRITON_DEVICE, seed=9)
    real = mla._decode_attention_reduce_kernel
    splits_pad = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                splits_pad.append(kwargs["SPLITS_PAD"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(mla, "_decode_attention_reduce_kernel", Spy())
    with poisoned_outputs():
        out = mla_decode_attention(**inputs, backend="triton")
    assert splits_pad == [16] and mla.MLA_MAX_SPLITS == 16
    assert_close(out, decode_reference(**inputs), torch.float32)
