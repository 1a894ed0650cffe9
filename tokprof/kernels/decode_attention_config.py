"""The launch configuration of the Triton decode-attention kernel from the device: SM count, shared memory per SM
(the device property, else the compute capability's figure), tile size, warps and pipeline stages, and how many
programs fit on one SM. tokprof.kernels.decode_attention plans its splits from these."""

from __future__ import annotations

import functools
import warnings

import torch

# Shared memory per SM by compute capability (CUDA C Programming Guide, "Technical Specifications per Compute
# Capability"), for torch builds whose device properties lack shared_memory_per_multiprocessor.
SMEM_PER_SM_BY_ARCH = {(8, 0): 164 * 1024, (8, 6): 100 * 1024, (8, 7): 164 * 1024, (8, 9): 100 * 1024,
                       (9, 0): 228 * 1024, (10, 0): 228 * 1024, (12, 0): 100 * 1024}


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def smem_per_sm(device: torch.device) -> int:
    """Shared memory per SM in bytes: the device property, else the compute capability's figure (with a warning:
    the Triton config depends on it, and a silent 0 would drop it to a single-buffered config)."""
    props = torch.cuda.get_device_properties(device)
    value = getattr(props, "shared_memory_per_multiprocessor", None)
    if value:
        return int(value)
    arch = (props.major, props.minor)
    fallback = SMEM_PER_SM_BY_ARCH.get(arch, 100 * 1024)
    warnings.warn(f"decode_attention: torch's device properties have no shared_memory_per_multiprocessor on "
                  f"{props.name} (sm_{arch[0]}{arch[1]}); the Triton config assumes {fallback // 1024} KB per SM",
                  stacklevel=2)
    return fallback


def _triton_config(head_dim_pad: int, elem_bytes: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages), chosen by rule rather than autotuned, so one call never runs many configs
    (and the interpreter, which would run every config, is never asked to).

    On a GPU: K and V tiles of 16 KB each (BLOCK_N = 64 tokens at D=128 in 16-bit), 4 warps (8 for fp32), and
    num_stages=3, which the pipeliner turns into 2 buffered K/V tiles (~72 KB of shared memory): the next tile
    streams in while the current one is used, and 2-3 programs stay resident per SM on an A100 or H100 (164 / 228 KB
    per SM), a few hundred KB in flight per SM, more than HBM latency x bandwidth needs (~25-40 KB per SM on an
    H100). GPUs with ~100 KB per SM (sm_86, sm_89) get num_stages=2 (one buffer, ~39 KB) and hide latency with more
    programs.
    Compiled ahead of time for sm_80 and sm_90 without spills; the rule is not yet tuned by measurement.
    On the CPU interpreter: 16-token tiles, so the tiny test shapes still cover several tiles and masked tails.
    """
    if device.type != "cuda":
        return 16, 4, 1
    block_n = max(16, min(128, 16384 // (head_dim_pad * elem_bytes)))
    tile_bytes = 2 * block_n * head_dim_pad * elem_bytes  # one K and one V tile
    two_buffers = 2 * tile_bytes + 8192  # + q, the p tile and layout conversions
    num_stages = 3 if smem_per_sm(device) >= 2 * two_buffers else 2
    # fp32 dots run as exact FMAs ("ieee") from registers: on 4 warps the split variant spilled ~1.2 KB per thread
    # (255 registers, triton 3.9, sm_90); 8 warps halve each thread's share of the tiles.
    num_warps = 8 if elem_bytes == 4 else 4
    return block_n, num_warps, num_stages


def _triton_ctas_per_sm(head_dim_pad: int, elem_bytes: int, device: torch.device) -> int:
    """Programs of the Triton decode kernel resident per SM, from its shared memory: (num_stages - 1) buffered K/V
    tiles + 8 KB each (an H100 or H200: 228 KB / 72 KB = 3), at most 4."""
    if device.type != "cuda":
        return 1
    block_n, _, stages = _triton_config(head_dim_pad, elem_bytes, device)
    per_cta = (stages - 1) * 2 * block_n * head_dim_pad * elem_bytes + 8192
    return max(1, min(4, smem_per_sm(device) // per_cta))
