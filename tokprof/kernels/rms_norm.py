"""RMSNorm with an optional fused residual add, as in every pre-norm Llama/Qwen decoder layer.

    x (T, H), weight (H,)                   ->  out (T, H)
    x (T, H), weight (H,), residual (T, H)  ->  (out (T, H), new_residual (T, H))

Numerics follow Hugging Face's `LlamaRMSNorm` exactly, because end-to-end parity with transformers depends on it:
1. new_residual = x + residual, rounded to the model dtype (HF adds the residual stream in the model dtype);
2. the norm is computed in fp32 from that rounded value: h = float(new_residual) * rsqrt(mean(h^2) + eps);
3. h is rounded to the model dtype (`hidden_states.to(input_dtype)`), then multiplied by weight in the model dtype,
   i.e. out = dtype(float(weight) * float(dtype(h))). (A product of two fp16 or bf16 values is exact in fp32, so
   computing it in fp32 and rounding once is bit-identical to HF's dtype multiply.)
Qwen3's per-head q/k norm is the same op on rows of head_dim: rms_norm(q.view(T * Hq, D), q_norm_weight (D,)).

Memory-bound: about 4 FLOP per element against 2 elements moved (4 with the residual).
Backends: torch (reference), triton, cuda (`cuda/rms_norm.cu`, 16-byte vector loads, warp + block reductions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from tokprof.kernels import _cuda
from tokprof.kernels._common import (
    FLOAT_DTYPES,
    Op,
    cdiv,
    check_same_device,
    check_same_dtype,
    check_tensor,
    dtype_bytes,
    make_generator,
    new_output,
    randn,
    resolve,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux only
    triton = None


# --------------------------------------------------------------------------------------------------------- torch


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    new_residual = None
    if residual is not None:
        new_residual = x + residual  # (T, H) in the model dtype, as HF's decoder layer adds it
        x = new_residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if new_residual is None else (out, new_residual)


# -------------------------------------------------------------------------------------------------------- triton

# Rows up to this length are normalised from registers in one pass; longer rows loop over chunks of _CHUNK_H.
_MAX_SINGLE_PASS_H = 8192
_CHUNK_H = 4096
# Elements one program handles when rows are short (Qwen3's per-head norm has H = 128): several rows per program
# keep each program's loads large enough to stream at full bandwidth.
_ELEMS_PER_PROGRAM = 4096

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, T, H, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                         SINGLE_PASS: tl.constexpr):
        # grid (cdiv(T, BLOCK_T),): BLOCK_T rows per program; all tensors row-major (T, H) and (H,).
        dtype = out_ptr.dtype.element_ty
        rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_mask = rows < T
        row_off = rows[:, None] * H  # (BLOCK_T, 1) int64
        cols = tl.arange(0, BLOCK_H)
        if SINGLE_PASS:
            mask = row_mask[:, None] & (cols[None, :] < H)
            offs = row_off + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + offs, mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)  # rounded to the dtype, as HF
                tl.store(new_res_ptr + offs, x, mask=mask)
            xf = x.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / H + eps)  # (BLOCK_T,)
            w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
            h = (xf * rstd[:, None]).to(dtype).to(tl.float32)
            tl.store(out_ptr + offs, (h * w[None, :]).to(dtype), mask=mask)
        else:
            # Pass 1: residual add (written once) and the sum of squares; pass 2 re-reads the row (from L2).
            src_ptr = new_res_ptr if HAS_RESIDUAL else x_ptr
            acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
            # Chunk index times a constexpr (not `range(0, H, BLOCK_H)`): keeps the offsets provably 16-aligned, so
            # the loads stay 128-bit.
            for chunk in range(0, tl.cdiv(H, BLOCK_H)):
                c = chunk * BLOCK_H + cols
                mask = row_mask[:, None] & (c[None, :] < H)
                offs = row_off + c[None, :]
                x = tl.load(x_ptr + offs, mask=mask, other=0.0)
                if HAS_RESIDUAL:
                    r = tl.load(res_ptr + offs, mask=mask, other=0.0)
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
                    tl.store(new_res_ptr + offs, x, mask=mask)
                xf = x.to(tl.float32)
                acc += xf * xf
            rstd = tl.rsqrt(tl.sum(acc, axis=1) / H + eps)
            if HAS_RESIDUAL:
                # Pass 2 reads new_residual back from global memory. If the compiler lays the two passes' accesses
                # out differently, another thread of this block wrote an element: a block barrier makes it visible.
                tl.debug_barrier()
            for chunk in range(0, tl.cdiv(H, BLOCK_H)):
                c = chunk * BLOCK_H + cols
                mask = row_mask[:, None] & (c[None, :] < H)
                offs = row_off + c[None, :]
                xf = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c, mask=c < H, other=0.0).to(tl.float32)
                h = (xf * rstd[:, None]).to(dtype).to(tl.float32)
                tl.store(out_ptr + offs, (h * w[None, :]).to(dtype), mask=mask)


def _triton_config(num_tokens: int, hidden: int) -> tuple[int, int, bool, int]:
    """(BLOCK_T, BLOCK_H, SINGLE_PASS, num_warps), chosen by a heuristic (autotuning is not run interpreted)."""
    if hidden <= _MAX_SINGLE_PASS_H:
        block_h = triton.next_power_of_2(hidden)
        single = True
    else:
        block_h = _CHUNK_H
        single = False
    block_t = max(1, min(triton.next_power_of_2(num_tokens), _ELEMS_PER_PROGRAM // block_h))
    # About 16 elements (two 16-byte loads of 16-bit data) per thread; 1..16 warps.
    num_warps = max(1, min(16, block_t * block_h // 512))
    return block_t, block_h, single, num_warps


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    num_tokens, hidden = x.shape
    out = new_output((num_tokens, hidden), x.dtype, x.device)
    new_res = new_output((num_tokens, hidden), x.dtype, x.device) if residual is not None else out
    block_t, block_h, single, num_warps = _triton_config(num_tokens, hidden)
    grid = (triton.cdiv(num_tokens, block_t),)
    _rms_norm_kernel[grid](x, residual if residual is not None else x, weight, out, new_res, num_tokens, hidden,
                           float(eps), HAS_RESIDUAL=residual is not None, BLOCK_T=block_t, BLOCK_H=block_h,
                           SINGLE_PASS=single, num_warps=num_warps)
    return out if residual is None else (out, new_res)


# ---------------------------------------------------------------------------------------------------------- cuda

# The vector kernels keep up to this many 16-byte vectors per thread in registers (must match VPT in rms_norm.cu).
_CUDA_VPT = 4


def _rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    num_tokens, hidden = x.shape
    out = new_output((num_tokens, hidden), x.dtype, x.device)
    new_res = new_output((num_tokens, hidden), x.dtype, x.device) if residual is not None else out
    res_in = residual if residual is not None else x
    has_res = int(residual is not None)
    vec = 16 // x.element_size()
    tensors = (x, res_in, weight, out, new_res)
    # The vector path needs every row start 16-byte aligned (H a multiple of the vector width, aligned bases) and a
    # row that fits in registers: VPT vectors per thread, at most 1024 threads.
    nvec = hidden // vec
    vectorised = (hidden % vec == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)
                  and nvec <= 1024 * _CUDA_VPT)
    args = (x, res_in, weight, out, new_res, num_tokens, hidden, float(eps), has_res)
    if vectorised and nvec <= 32 * _CUDA_VPT:
        # Short rows (Qwen3's per-head norm, H = 128): one warp per row, 4 rows per block, warp reductions only.
        # Block sizes here stay within each kernel's __launch_bounds__ in rms_norm.cu (128 here, 1024 below).
        name = _cuda.kernel_name("rms_norm_warp", x.dtype)
        _cuda.launch("rms_norm", name, x.device, (cdiv(num_tokens, 4),), (128,), args)
    elif vectorised:
        threads = min(1024, 32 * cdiv(cdiv(nvec, _CUDA_VPT), 32))
        name = _cuda.kernel_name("rms_norm_block", x.dtype)
        _cuda.launch("rms_norm", name, x.device, (num_tokens,), (threads,), args)
    else:
        threads = min(1024, 32 * cdiv(hidden, 32))
        name = _cuda.kernel_name("rms_norm_scalar", x.dtype)
        _cuda.launch("rms_norm", name, x.device, (num_tokens,), (threads,), args)
    return out if residual is None else (out, new_res)


# -------------------------------------------------------------------------------------------------------- public

_IMPLS = {"torch": _rms_norm_torch, "triton": _rms_norm_triton, "cuda": _rms_norm_cuda}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6, residual: torch.Tensor | None = None,
             backend: str = "triton") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """out (T, H) = rmsnorm(x) * weight; with residual (T, H): returns (rmsnorm(x + residual) * weight, x + residual).

    x, weight and residual share one dtype and device; rounding order as HF's LlamaRMSNorm (module docstring).
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    num_tokens, hidden = x.shape
    if num_tokens == 0:
        raise ValueError("x: expected at least one row (T >= 1), got T=0")
    if hidden == 0:
        raise ValueError("x: expected a non-zero hidden size H, got H=0")
    check_tensor("weight", weight, shape=(hidden,), dtypes=FLOAT_DTYPES, contiguous=True)
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        check_tensor("residual", residual, shape=(num_tokens, hidden), dtypes=FLOAT_DTYPES, contiguous=True)
        tensors["residual"] = residual
    check_same_device(**tensors)
    check_same_dtype(**tensors)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    impl = resolve("rms_norm", _IMPLS, backend, x.device)
    return impl(x, weight, float(eps), residual)


def make_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device | str, seed: int) -> dict[str, Any]:
    gen = make_generator(device, seed)
    t, h = shape["T"], shape["H"]
    inputs: dict[str, Any] = {
        "x": randn((t, h), dtype, device, gen),
        # Around 1, as trained norm weights are, but not all ones (a multiply by 1 would hide a wrong weight index).
        "weight": (1.0 + 0.1 * torch.randn((h,), generator=gen, device=device)).to(dtype),
        "eps": 1e-5,
    }
    if shape["residual"] == 1:
        inputs["residual"] = randn((t, h), dtype, device, gen)
    elif shape["residual"] != 0:
        raise ValueError(f"shape: rms_norm key 'residual' expected 0 or 1, got {shape['residual']!r}")
    return inputs


def cost(shape: Mapping[str, int], dtype: torch.dtype) -> tuple[int, int]:
    t, h, b = shape["T"], shape["H"], dtype_bytes(dtype)
    residual = shape["residual"] == 1
    flops = 4 * t * h  # per element: square, add into the sum, scale by rsqrt, multiply by weight
    min_bytes = 2 * t * h * b + h * b  # read x (T, H), write out (T, H), read weight (H,)
    if residual:
        flops += t * h  # the residual add
        min_bytes += 2 * t * h * b  # read residual (T, H), write new_residual (T, H)
    return flops, min_bytes


OP = Op(
    name="rms_norm",
    fn=rms_norm,
    impls=_IMPLS,
    shape_keys=("T", "H", "residual"),
    default_shape={"T": 16, "H": 4096, "residual": 1},
    make_inputs=make_inputs,
    cost=cost,
    cost_formula=("flops = 4*T*H (+ T*H with residual); bytes = (2*T*H + H)*dtype_bytes (read x, write out, read "
                  "weight) + 2*T*H*dtype_bytes with residual (read residual, write new_residual)"),
    description="RMSNorm (HF Llama rounding order) with optional fused residual add, x (T, H) -> (T, H)",
    shape_doc="T rows (tokens, or tokens*heads for a per-head norm), H normalised size, residual 0|1",
)
