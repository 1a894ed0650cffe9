"""decode_attention: every backend against a float64 reference over scattered pages, both split paths, cost, bad input.

CPU cases run the Triton kernels in the interpreter on tiny shapes; `gpu` cases run the compiled Triton and the CUDA
kernels, including a realistic shape and capture in a CUDA graph.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, assert_close, requires_triton

from tokprof.kernels import OPS, decode_attention
from tokprof.kernels._common import cdiv, poisoned_outputs

da = importlib.import_module("tokprof.kernels.decode_attention")  # the module; the package exports the function

# (B, Hq, Hkv, D, block_size, seq_lens): GQA ratios 1, 4, 8 and an odd 3; seq_len 1, exactly one page, tails that are
# not a multiple of the page; D 64, 128 and an odd 80 (not a power of two); pages of 16, 32 and an odd 5 tokens.
CASES = [
    (2, 2, 2, 64, 16, [1, 37]),
    (3, 8, 2, 128, 16, [50, 16, 3]),
    (1, 8, 1, 64, 32, [77]),
    (2, 6, 2, 80, 5, [23, 1]),
]
FORCED_SPLITS = 4  # _num_splits forced to this gives 2-4 splits on every case above (checked in the test)


def case_id(case) -> str:
    b, hq, hkv, d, bs, lens = case
    return f"B{b}-Hq{hq}-Hkv{hkv}-D{d}-bs{bs}-len{'_'.join(map(str, lens))}"


def paged_inputs(batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int, seq_lens: list[int],
                 dtype: torch.dtype, device: str, seed: int, spare_pages: int = 3) -> dict[str, torch.Tensor]:
    """Pages scattered over the cache in a random order, spare pages nobody uses, one spare block_table column
    holding -1 (a kernel that reads past a sequence's pages would fault or produce NaN)."""
    gen = torch.Generator().manual_seed(seed)
    pages_needed = [cdiv(n, block_size) for n in seq_lens]
    num_blocks = sum(pages_needed) + spare_pages
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = torch.full((batch, max(pages_needed) + 1), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_needed):
        block_table[b, :n] = perm[used:used + n]
        used += n

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    return {
        "q": rand(batch, num_q_heads, head_dim),  # (B, Hq, D)
        "k_cache": rand(num_blocks, block_size, num_kv_heads, head_dim),  # (num_blocks, block_size, Hkv, D)
        "v_cache": rand(num_blocks, block_size, num_kv_heads, head_dim),
        "block_table": block_table.to(device),  # (B, max_blocks)
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),  # (B,)
    }


def reference(q, k_cache, v_cache, block_table, seq_lens, scale=None) -> torch.Tensor:
    """float64, token by token through the page table (a different gather than the torch backend's)."""
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.empty(batch, num_q_heads, head_dim, dtype=torch.float64, device=q.device)
    for b in range(batch):
        t = torch.arange(int(seq_lens[b]), device=q.device)
        pages = block_table[b, t // block_size].long()
        k = k_cache[pages, t % block_size].double()  # (n, Hkv, D)
        v = v_cache[pages, t % block_size].double()
        qg = q[b].double().view(num_kv_heads, group, head_dim)  # (Hkv, G, D)
        p = torch.softmax(torch.einsum("hgd,nhd->hgn", qg, k) * scale, dim=-1)
        out[b] = torch.einsum("hgn,nhd->hgd", p, v).reshape(num_q_heads, head_dim)
    return out


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_matches_reference(case, dtype):
    inputs = paged_inputs(*case, dtype=dtype, device="cpu", seed=11)
    out = decode_attention(**inputs, backend="torch")
    assert out.dtype == dtype
    assert_close(out, reference(**inputs), dtype)


@requires_triton
@pytest.mark.parametrize("split", [False, True], ids=["one_pass", "split"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(case, dtype, split, monkeypatch):
    batch, _, num_kv_heads, head_dim, block_size, seq_lens = case
    inputs = paged_inputs(*case, dtype=dtype, device=TRITON_DEVICE, seed=12)
    monkeypatch.setattr(da, "_num_splits", lambda *args: FORCED_SPLITS if split else 1)
    block_n = da._triton_config(head_dim, inputs["q"].element_size(), inputs["q"].device)[0]  # 16 on the CPU
    num_splits, _ = da._split_plan(batch, num_kv_heads, inputs["block_table"].shape[1] * block_size, block_n,
                                   inputs["q"].device)
    assert (num_splits > 1) == split, f"the case must exercise the {'split' if split else 'one-pass'} path"
    with poisoned_outputs():
        out = decode_attention(**inputs, backend="triton")
    assert_close(out, reference(**inputs), dtype)


@requires_triton
def test_triton_explicit_scale_and_long_tail():
    # A non-default scale, and one sequence spanning many tiles with a 1-token tail (97 = 6 * 16 + 1).
    inputs = paged_inputs(2, 4, 1, 64, 16, [97, 2], torch.float32, TRITON_DEVICE, seed=13)
    with poisoned_outputs():
        out = decode_attention(**inputs, scale=0.3, backend="triton")
    assert_close(out, reference(**inputs, scale=0.3), torch.float32)


def test_split_plan_rounds_to_whole_tiles(monkeypatch):
    cpu = torch.device("cpu")
    assert da._num_splits(4, 8, 4096, cpu) == 1  # no GPU to fill
    monkeypatch.setattr(da, "_num_splits", lambda *args: 3)
    # 100 tokens in 3 splits of whole 16-token tiles: 34 -> 48 tokens per split -> 3 splits cover 144 >= 100.
    assert da._split_plan(1, 1, 100, 16, cpu) == (3, 48)
    monkeypatch.setattr(da, "_num_splits", lambda *args: 50)
    # More splits than tiles: one tile per split, never an empty split.
    assert da._split_plan(1, 1, 40, 16, cpu) == (3, 16)
    monkeypatch.setattr(da, "_num_splits", lambda *args: 1000)
    assert da._split_plan(1, 1, 1 << 20, 16, cpu)[0] == da.MAX_SPLITS


def test_make_inputs_scatters_pages():
    shape = {"B": 3, "Hq": 4, "Hkv": 2, "D": 64, "context": 50, "block_size": 16}
    inputs = OPS["decode_attention"].make_inputs(shape, torch.float16, "cpu", seed=5)
    bt = inputs["block_table"]
    assert bt.shape == (3, 4) and bt.dtype == torch.int32
    assert inputs["k_cache"].shape == (3 * 4 + 4, 16, 2, 64) and inputs["v_cache"].dtype == torch.float16
    assert inputs["q"].shape == (3, 4, 64)
    assert inputs["seq_lens"].tolist() == [50, 50, 50]
    ids = bt.flatten().tolist()
    assert len(set(ids)) == len(ids) and min(ids) >= 0 and max(ids) < 16  # distinct pages within the cache
    assert ids != sorted(ids)  # scattered, not laid out in order
    again = OPS["decode_attention"].make_inputs(shape, torch.float16, "cpu", seed=5)
    assert torch.equal(again["block_table"], bt) and torch.equal(again["k_cache"], inputs["k_cache"])
    out = OPS["decode_attention"].run(inputs, backend="torch")
    assert_close(out, reference(**inputs), torch.float16)


def test_cost_hand_count():
    # B=2, Hq=4, Hkv=2, D=8, context=20, block_size=16, fp16:
    # flops = 4 * 2 * 4 * 20 * 8 = 5120
    # K and V: 2 * 2 * 20 * 2 * 8 * 2 B = 2560; q and out: 2 * 2 * 4 * 8 * 2 B = 256;
    # block_table: 2 sequences * 2 pages * 4 B = 16; seq_lens: 2 * 4 B = 8  -> 2840 bytes
    shape = {"B": 2, "Hq": 4, "Hkv": 2, "D": 8, "context": 20, "block_size": 16}
    assert OPS["decode_attention"].cost(shape, torch.float16) == (5120, 2840)
    big = OPS["decode_attention"].full_shape({"B": 64})
    flops, min_bytes = OPS["decode_attention"].cost(big, torch.bfloat16)
    assert flops == 4 * 64 * 32 * 4096 * 128
    assert min_bytes == 2 * 64 * 4096 * 8 * 128 * 2 + 2 * 64 * 32 * 128 * 2 + 64 * 256 * 4 + 64 * 4


def _good() -> dict[str, torch.Tensor]:
    return paged_inputs(2, 4, 2, 64, 16, [20, 5], torch.float32, "cpu", seed=7)


@pytest.mark.parametrize("changes, message", [
    (lambda g: {"q": g["q"][0]}, "q: expected 3 dimensions, got 2"),
    (lambda g: {"q": g["q"].to(torch.int32)}, "q: expected dtype in"),
    (lambda g: {"q": g["q"].transpose(0, 1).contiguous().transpose(0, 1)}, "q: expected a contiguous tensor"),
    (lambda g: {"k_cache": g["k_cache"][..., :32]}, "k_cache: expected a contiguous tensor"),
    (lambda g: {"k_cache": g["k_cache"][..., :32].contiguous()}, r"k_cache: expected head dim D=64"),
    (lambda g: {"k_cache": g["k_cache"].half()}, "k_cache: expected dtype torch.float32"),
    (lambda g: {"v_cache": g["v_cache"][:, :8].contiguous()}, r"v_cache: expected shape \(6, 16, 2, 64\)"),
    (lambda g: {"v_cache": g["v_cache"][0]}, "v_cache: expected 4 dimensions, got 3"),
    (lambda g: {"block_table": g["block_table"].long()}, "block_table: expected dtype in"),
    (lambda g: {"block_table": g["block_table"][:1]}, r"block_table: expected shape \(2, \*\)"),
    (lambda g: {"block_table": g["block_table"][:, :0]}, "block_table: expected at least one page"),
    (lambda g: {"seq_lens": g["seq_lens"].long()}, "seq_lens: expected dtype in"),
    (lambda g: {"seq_lens": g["seq_lens"][:1]}, r"seq_lens: expected shape \(2\)"),
    (lambda g: {"seq_lens": torch.tensor([20, 0], dtype=torch.int32)},
     r"seq_lens: expected 1 <= seq_lens\[b\] <= max_blocks \* block_size = 3 \* 16 = 48 .*got seq_lens\[1\] = 0"),
    (lambda g: {"seq_lens": torch.tensor([49, 5], dtype=torch.int32)}, r"got seq_lens\[0\] = 49"),
    (lambda g: {"seq_lens": torch.tensor([20, 17], dtype=torch.int32)},  # a second page whose entry is -1
     r"block_table: expected page ids in \[0, num_blocks=6\) .*got block_table\[1, 1\] = -1"),
    (lambda g: {"q": g["q"][:, :3].contiguous()}, "q: expected Hq to be a multiple of Hkv = k_cache.shape.2. = 2"),
    (lambda g: {"q": g["q"][:0], "block_table": g["block_table"][:0], "seq_lens": g["seq_lens"][:0]},
     "q: expected a non-empty batch"),
    (lambda g: {"k_cache": g["k_cache"].to("meta")}, "k_cache: expected a tensor on cpu"),
    (lambda g: {"scale": float("nan")}, "scale: expected a finite number or None"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_inputs_name_the_argument(changes, message):
    inputs = _good()
    inputs.update(changes(inputs))
    with pytest.raises(ValueError, match=message):
        decode_attention(**inputs, backend="torch")


def test_bad_backend_and_backend_limits():
    with pytest.raises(ValueError, match="backend: expected one of"):
        decode_attention(**_good(), backend="numpy")
    inputs = paged_inputs(1, 2, 1, 72, 16, [3], torch.float32, "cpu", seed=8)
    with pytest.raises(ValueError, match=r"q: the cuda backend supports head dim D in \[64, 128\], got D=72"):
        da._decode_attention_cuda(**inputs)
    inputs = paged_inputs(1, 2, 1, 320, 16, [3], torch.float32, "cpu", seed=8)
    with pytest.raises(ValueError, match="q: the triton backend supports head dim D <= 256, got D=320"):
        da._decode_attention_triton(**inputs)


@pytest.mark.parametrize("block_size", [5, 8, 64, 128])
def test_cuda_backend_refuses_pages_it_was_not_compiled_for(block_size):
    # The page size is a template constant of the CUDA kernel: other sizes are refused before any launch.
    inputs = paged_inputs(1, 4, 2, 128, block_size, [9], torch.bfloat16, "cpu", seed=9)
    with pytest.raises(ValueError, match=rf"k_cache: the cuda backend supports block_size .* in \[16, 32\], "
                                         rf"got block_size={block_size}; use backend='triton' or 'torch'"):
        da._decode_attention_cuda(**inputs)
    assert da.CUDA_BLOCK_SIZES == (16, 32)
    source = (da._cuda.CUDA_DIR / "decode_attention.cu").read_text()
    for bs in da.CUDA_BLOCK_SIZES:  # the wrapper's list and the compiled instances agree
        assert f"TOKPROF_DECODE_ATTN(SUFFIX, T, D, GP, {bs})" in source


def test_cuda_backend_without_gpu_says_what_works():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="Backends that work here: torch"):
        decode_attention(**_good(), backend="cuda")


# ----------------------------------------------------------------------------------------------------------- gpu

GPU_CASES = CASES[:3] + [
    (2, 16, 1, 64, 16, [300, 9]),  # G=16: two head chunks in the CUDA kernel
    (2, 24, 2, 128, 7, [61, 130]),  # G=12, odd page size (the cuda backend refuses it)
    (3, 8, 8, 128, 128, [130, 1, 1000]),  # MHA, 128-token pages (the cuda backend refuses them)
    (4, 32, 8, 128, 16, [4096, 1000, 1, 2049]),  # Llama-3-8B heads, mixed lengths up to 4k
    # The CUDA kernel's compiled pages (16, 32), group tiles (1, 2, 4, 8, padded 3 -> 4, 12 -> 2 x 8) and lengths
    # around its steps (16-64 tokens a block step, two steps a loop iteration): exact multiples, one past, one short.
    (2, 24, 2, 128, 32, [61, 130]),  # G=12 with 32-token pages
    (3, 8, 8, 128, 32, [130, 1, 1000]),  # MHA with 32-token pages
    (2, 6, 2, 64, 16, [200, 33]),  # G=3: a 4-head tile with one padding head
    (3, 4, 2, 128, 16, [64, 96, 129]),  # G=2
    (2, 64, 8, 128, 32, [2500, 63]),  # Llama-3-70B heads (G=8), 32-token pages
    (2, 32, 8, 64, 32, [1024, 31]),  # D=64, G=4, 32-token pages
]
CUDA_ONLY_CASES = GPU_CASES[-6:]  # the Triton kernel does not depend on these shapes: spare the gpu call its compiles
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("split", ["auto", "one_pass", "forced_split"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("case", [c for c in GPU_CASES if c[3] in da.CUDA_HEAD_DIMS], ids=case_id)
def test_gpu_backends_match_reference(case, dtype, backend, split, monkeypatch):
    if backend == "triton" and (case in CUDA_ONLY_CASES or split == "one_pass"):
        pytest.skip("covered for the cuda kernel only")
    if split != "auto":
        monkeypatch.setattr(da, "_num_splits", lambda *args: FORCED_SPLITS if split == "forced_split" else 1)
    inputs = paged_inputs(*case, dtype=dtype, device="cuda", seed=21)
    if backend == "cuda" and case[4] not in da.CUDA_BLOCK_SIZES:
        with pytest.raises(ValueError, match="the cuda backend supports block_size"):
            decode_attention(**inputs, backend=backend)
        return
    with poisoned_outputs():
        out = decode_attention(**inputs, backend=backend)
    torch.cuda.synchronize()
    assert_close(out, reference(**inputs), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_triton_odd_head_dim(dtype):
    inputs = paged_inputs(2, 6, 2, 80, 5, [23, 1], dtype, "cuda", seed=22)
    with poisoned_outputs():
        out = decode_attention(**inputs, backend="triton")
    assert_close(out, reference(**inputs), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("batch", [4, 64])  # 4 x 8 KV heads splits on any GPU; 64 x 8 runs one pass on an H100
def test_gpu_realistic_shape(batch, backend):
    shape = {"B": batch, "Hq": 32, "Hkv": 8, "D": 128, "context": 4096, "block_size": 16}
    inputs = OPS["decode_attention"].make_inputs(shape, torch.bfloat16, "cuda", seed=23)
    with poisoned_outputs():
        out = decode_attention(**inputs, backend=backend)
    # Over 4096 tokens the outputs are averages ~0.02 in size (max ~0.1): bf16's usual atol (1.6e-2) would hide a
    # wrong page. A quarter of it (4e-3) still leaves ~16x margin over rounding (the torch backend is off by 2.4e-4).
    assert_close(out, reference(**inputs), torch.bfloat16, scale=0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_call_captures_in_a_cuda_graph(backend):
    # No host synchronisation inside the call: it can be captured once and replayed on new values.
    inputs = paged_inputs(3, 8, 2, 128, 16, [50, 16, 3], torch.float16, "cuda", seed=24)
    decode_attention(**inputs, backend=backend)  # compile and load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(**inputs, backend=backend)
    inputs["q"].copy_(torch.randn_like(inputs["q"]))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, reference(**inputs), torch.float16)


def test_triton_splits_fill_the_ctas_that_fit_per_sm(monkeypatch):
    # An H100's properties, faked: 132 SMs and 228 KB of shared memory per SM. The Triton kernel's 2 buffered
    # K/V tiles + 8 KB (72 KB at D=128 bf16) fit 3 programs per SM, so batch 1 / 1k context / 8 KV heads gets 16
    # splits (128 programs), not the 4 (32 programs, a quarter of the SMs) of 256-token splits for 2 per SM.
    from types import SimpleNamespace

    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                            shared_memory_per_multiprocessor=228 * 1024, L2_cache_size=50 << 20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    for fn in (da._sm_count, da.smem_per_sm):
        fn.cache_clear()
    gpu = torch.device("cuda", 0)
    try:
        assert da._triton_ctas_per_sm(128, 2, gpu) == 3
        assert da._split_plan(1, 8, 1024, 64, gpu, 3) == (16, 64)
        assert da._split_plan(64, 8, 4096, 64, gpu, 3) == (1, 4096)  # 512 programs already fill 3 x 132
        info = da.config_properties(gpu)
        assert info["smem_per_sm_used"] == 228 * 1024 and info["triton_d128_bf16"]["num_stages"] == 3
        # a torch build without the property: the capability's figure, with a warning, not a silent 0
        del props.shared_memory_per_multiprocessor
        da.smem_per_sm.cache_clear()
        with pytest.warns(UserWarning, match="shared_memory_per_multiprocessor"):
            assert da.smem_per_sm(gpu) == 228 * 1024
    finally:
        for fn in (da._sm_count, da.smem_per_sm):
            fn.cache_clear()
