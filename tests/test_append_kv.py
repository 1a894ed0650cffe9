"""append_kv: written slots hold k and v exactly, every other slot untouched (NaN), padding skipped, cost, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_DTYPES, TRITON_DEVICE, requires_triton

from tokprof.kernels import OPS, append_kv

# (T, Hkv, D, block_size, num_blocks): T 1, 5, 37; D 64 and 128; block sizes 16 and not a power of two (5).
SHAPES = [(1, 8, 128, 16, 4), (5, 2, 64, 5, 7), (37, 1, 128, 16, 5), (6, 3, 64, 3, 20)]


def nan_caches(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, hkv, d, block_size, num_blocks = shape
    full = (num_blocks, block_size, hkv, d)
    return (torch.full(full, float("nan"), dtype=dtype, device=device),
            torch.full(full, float("nan"), dtype=dtype, device=device))


def slots_for(num_tokens: int, num_slots: int, device: str, seed: int, pad_every: int = 0,
              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Distinct random slots, every `pad_every`-th token padded with -1."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    if pad_every:
        slots[::pad_every] = -1
    return slots.to(dtype=dtype, device=device)


def check_written(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor) -> None:
    """Written slots equal k and v bit for bit; all other slots still NaN."""
    hkv, d = k.shape[1:]
    slots = slots.long().cpu()
    valid = slots >= 0
    for x, cache, name in ((k, k_cache, "k_cache"), (v, v_cache, "v_cache")):
        flat = cache.view(-1, hkv, d).cpu()
        written = torch.zeros(flat.shape[0], dtype=torch.bool)
        written[slots[valid]] = True
        assert torch.equal(flat[slots[valid]], x.cpu()[valid]), f"{name}: written slots differ from the input"
        untouched = flat[~written]
        assert torch.isnan(untouched).all(), (f"{name}: {int((~torch.isnan(untouched)).sum())} elements outside "
                                              f"the {int(valid.sum())} written slots were overwritten")


def run_case(shape, dtype, backend, device, seed, pad_every=0, slot_dtype=torch.int64):
    t, hkv, d, block_size, num_blocks = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(t, hkv, d, generator=gen, device=device).to(dtype)
    v = torch.randn(t, hkv, d, generator=gen, device=device).to(dtype)
    k_cache, v_cache = nan_caches(shape, dtype, device)
    slots = slots_for(t, num_blocks * block_size, device, seed, pad_every, slot_dtype)
    assert append_kv(k, v, k_cache, v_cache, slots, backend=backend) is None
    check_written(k, v, k_cache, v_cache, slots)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_writes_exactly_the_slots(shape, dtype, slot_dtype):
    run_case(shape, dtype, "torch", "cpu", seed=1, pad_every=3, slot_dtype=slot_dtype)


@requires_triton
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_writes_exactly_the_slots(shape, dtype, slot_dtype):
    run_case(shape, dtype, "triton", TRITON_DEVICE, seed=2, pad_every=3, slot_dtype=slot_dtype)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_all_padding_writes_nothing_and_slot_addressing(backend):
    device = "cpu" if backend == "torch" else TRITON_DEVICE
    k = torch.randn(4, 2, 64, device=device)
    v = torch.randn(4, 2, 64, device=device)
    k_cache, v_cache = nan_caches((4, 2, 64, 4, 3), torch.float32, device)
    append_kv(k, v, k_cache, v_cache, torch.full((4,), -1, device=device), backend=backend)
    assert torch.isnan(k_cache).all() and torch.isnan(v_cache).all()
    # Slot s lands at block s // block_size, offset s % block_size: slot 6 with block_size 4 is block 1, offset 2.
    append_kv(k, v, k_cache, v_cache, torch.tensor([6, -1, 11, 0], device=device), backend=backend)
    assert torch.equal(k_cache[1, 2], k[0]) and torch.equal(v_cache[2, 3], v[2]) and torch.equal(k_cache[0, 0], k[3])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_k_v_slices_of_a_fused_qkv_row(backend):
    t, hq, hkv, d = 5, 4, 2, 64
    device = "cpu" if backend == "torch" else TRITON_DEVICE
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device).half()
    k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
    assert not k.is_contiguous() and not v.is_contiguous()
    k_cache, v_cache = nan_caches((t, hkv, d, 4, 3), torch.float16, device)
    slots = slots_for(t, 12, device, seed=3, pad_every=4)
    append_kv(k, v, k_cache, v_cache, slots, backend=backend)
    check_written(k, v, k_cache, v_cache, slots)


def test_make_inputs_has_distinct_slots_and_cost_hand_count():
    op = OPS["append_kv"]
    inputs = op.make_inputs(op.full_shape({"T": 64}), torch.float16, "cpu", 0)
    slots = inputs["slot_mapping"]
    assert slots.dtype == torch.int64 and slots.unique().numel() == 64 and int(slots.max()) < 1024 * 16
    assert inputs["k_cache"].shape == (1024, 16, 8, 128)
    with pytest.raises(ValueError, match="T <= num_blocks \\* block_size"):
        op.make_inputs(op.full_shape({"T": 5, "block_size": 2, "num_blocks": 2}), torch.float16, "cpu", 0)
    # T=2, Hkv=1, D=4, fp16: k and v read (2*4*2 each = 32), written (32), slots 2*8 = 16: 80 bytes, 0 FLOP.
    assert op.cost({"T": 2, "Hkv": 1, "D": 4, "block_size": 16, "num_blocks": 1}, torch.float16) == (0, 80)
    assert op.cost(op.full_shape(), torch.bfloat16) == (0, 4 * 16 * 8 * 128 * 2 + 16 * 8)


def test_bad_inputs_name_the_argument():
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    kc, vc = torch.zeros(4, 2, 2, 8), torch.zeros(4, 2, 2, 8)
    slots = torch.tensor([0, 1, 7])
    with pytest.raises(ValueError, match="k: expected 3 dimensions, got 2"):
        append_kv(torch.randn(3, 16), v, kc, vc, slots, backend="torch")
    with pytest.raises(ValueError, match="k: expected at least one token"):
        append_kv(torch.randn(0, 2, 8), torch.randn(0, 2, 8), kc, vc, slots[:0], backend="torch")
    with pytest.raises(ValueError, match=r"v: expected shape \(3, 2, 8\), got \(3, 1, 8\)"):
        append_kv(k, torch.randn(3, 1, 8), kc, vc, slots, backend="torch")
    with pytest.raises(ValueError, match="v: expected dtype torch.float32"):
        append_kv(k, v.half(), kc, vc, slots, backend="torch")
    with pytest.raises(ValueError, match=r"k_cache: expected shape \(\*, \*, 2, 8\), got \(4, 2, 8, 2\)"):
        append_kv(k, v, torch.zeros(4, 2, 8, 2), vc, slots, backend="torch")
    with pytest.raises(ValueError, match="k_cache: expected a contiguous tensor"):
        append_kv(k, v, torch.zeros(2, 4, 2, 8).transpose(0, 1), vc, slots, backend="torch")
    with pytest.raises(ValueError, match=r"v_cache: expected shape \(4, 2, 2, 8\), got \(5, 2, 2, 8\)"):
        append_kv(k, v, kc, torch.zeros(5, 2, 2, 8), slots, backend="torch")
    with pytest.raises(ValueError, match="k_cache: expected dtype torch.float32"):
        append_kv(k, v, kc.half(), vc.half(), slots, backend="torch")
    with pytest.raises(ValueError, match="v: expected heads and head_dim contiguous"):
        append_kv(k, torch.randn(3, 8, 2).transpose(1, 2), kc, vc, slots, backend="torch")
    with pytest.raises(ValueError, match="slot_mapping: expected dtype"):
        append_kv(k, v, kc, vc, slots.float(), backend="torch")
    with pytest.raises(ValueError, match=r"slot_mapping: expected shape \(3\), got \(2,\)"):
        append_kv(k, v, kc, vc, slots[:2], backend="torch")
    with pytest.raises(ValueError, match=r"slot_mapping: expected slots in \[0, 8\) .* got 8"):
        append_kv(k, v, kc, vc, torch.tensor([0, 8, 1]), backend="torch")
    with pytest.raises(ValueError, match=r"slot_mapping: expected slots in \[0, 8\) .* got -2"):
        append_kv(k, v, kc, vc, torch.tensor([0, -2, 1], dtype=torch.int32), backend="torch")
    assert torch.equal(kc, torch.zeros_like(kc))  # nothing was written by the refused calls
    with pytest.raises(ValueError, match="backend: expected one of"):
        append_kv(k, v, kc, vc, slots, backend="cupy")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="slot_mapping: expected a tensor on cpu"):
            append_kv(k, v, kc, vc, slots.cuda(), backend="torch")


def test_cuda_backend_without_gpu_says_what_works():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="Backends that work here: torch"):
        append_kv(torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8),
                  torch.tensor([0]), backend="cuda")


# ----------------------------------------------------------------------------------------------------------- GPU

# Hkv*D = 18 is no multiple of the vector width, so the CUDA backend takes its scalar kernel.
GPU_SHAPES = SHAPES + [(64, 8, 128, 16, 1024), (4096, 8, 128, 16, 1024), (3, 5, 72, 7, 9), (4, 3, 6, 4, 5)]
ALL_BACKENDS = ["torch", "triton", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_backends_write_exactly_the_slots(shape, dtype, backend, slot_dtype):
    run_case(shape, dtype, backend, "cuda", seed=4, pad_every=5, slot_dtype=slot_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gpu_append_kv_captures_in_a_cuda_graph(backend):
    # The slot range check reads back to the host; it is skipped while capturing, so the call captures and replays.
    t, hkv, d, block_size, num_blocks = 8, 2, 64, 16, 4
    k = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = nan_caches((t, hkv, d, block_size, num_blocks), torch.bfloat16, "cuda")
    slots = slots_for(t, num_blocks * block_size, "cuda", seed=5, pad_every=3)
    append_kv(k, v, k_cache, v_cache, slots, backend=backend)  # warm-up: compiles and loads outside the capture
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        append_kv(k, v, k_cache, v_cache, slots, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    k.copy_(torch.randn_like(k))  # new data, replayed into the same slots
    graph.replay()
    torch.cuda.synchronize()
    check_written(k, v, k_cache, v_cache, slots)
