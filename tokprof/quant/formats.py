"""Low-precision weight formats: the registry (`WEIGHT_FORMATS`), their byte counts, and quantise/dequantise in torch.

    fmt = WEIGHT_FORMATS["mxfp4"]                 # 4-bit e2m1 elements, one e8m0 scale per 32 along K
    qw = quantize_weight(w, "mxfp4")              # w (N, K) float -> QuantizedWeight (packed data + scales)
    w_hat = dequantize_weight(qw)                 # (N, K) fp32
    fmt.weight_bytes(N, K)                        # bytes of the stored tensors, scales included

Formats (the layouts production checkpoints use; K is the input-feature axis, N the output axis):

- fp8       e4m3 weight, one fp32 scale per tensor; activations quantised per token (W8A8).
- fp8-block e4m3 weight, one fp32 scale per 128x128 tile (DeepSeek-V3/R1: `weight` + `weight_scale_inv`, with
            w = weight * weight_scale_inv); activations per token per 128-group along K (W8A8).
- mxfp4     OCP Microscaling (MX) v1.0 MXFP4: e2m1 elements, blocks of 32 along K sharing an e8m0 (power-of-two)
            scale; the shared exponent is floor(log2(amax)) - emax_elem with emax_elem = 2 (OCP MX spec v1.0,
            section 6.3), elements that overflow saturate to +-6. gpt-oss layout: `*_blocks` uint8 (N, K/32, 16),
            two elements per byte (low nibble first), and `*_scales` uint8 (N, K/32) = exponent + 127.
- nvfp4     NVIDIA NVFP4: e2m1 elements, blocks of 16 along K sharing an e4m3 scale, and one fp32 per-tensor scale
            (global = amax / (448 * 6), block = e4m3(block amax / 6 / global)); NVIDIA, "Introducing NVFP4 for
            efficient and accurate low-precision inference" (NVIDIA technical blog, 2025-06).
- int4      weight-only INT4 with group-128 asymmetric scales and zero points (AWQ/GPTQ style): q in [0, 15],
            w = (q - zero) * scale, an fp16 scale and a zero point per 128 weights of a row.

e4m3 is OCP FP8 E4M3 (the `float8_e4m3fn` of torch): max normal 448, 3 mantissa bits. e2m1 (FP4) represents
{0, 0.5, 1, 1.5, 2, 3, 4, 6} and their negatives (OCP MX spec v1.0, section 5.3.3).

A K that is not a multiple of the block is padded with zeros to whole blocks (the stored bytes count the padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FP8_E4M3_MAX = 448.0  # largest finite OCP E4M3 value (torch.finfo(torch.float8_e4m3fn).max)
FP4_E2M1_MAX = 6.0
FP4_EMAX = 2  # exponent of the largest normal e2m1 value (6 = 1.5 * 2**2): OCP MX v1.0 emax_elem for FP4
FP8 = torch.float8_e4m3fn
# e2m1 codes 0..7 (the sign is bit 3): the values they represent
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class WeightFormat:
    """One weight format: how many bits a weight costs on HBM and what math it runs on."""

    name: str
    element_bits: int  # bits of one stored weight element
    block_k: int  # weights along K sharing a scale (0: one scale for the whole tensor)
    block_n: int  # rows sharing a scale (1: per row; 0: the whole tensor)
    scale_dtype: str  # "fp32" | "e8m0" | "e4m3" | "fp16"
    scale_bits: int
    zero_point_bits: int  # bits of a zero point per block (int4), 0 when symmetric
    tensor_scale_bytes: int  # a per-tensor fp32 scale (fp8, nvfp4), 0 when none
    activation: str  # "fp8": activations are quantised too (W8A8); "bf16": weight-only (the input dtype)
    # the tensor-core dtype that runs this format natively (the spec table's *_tflops field): used as the roof where
    # the GPU's spec row has that peak (fp4 on Blackwell); elsewhere a weight-only format runs in the activation
    # dtype (W4A16 on Hopper). None: always the activation dtype (INT4 weight-only).
    native_math: str | None
    op: str  # the kernel-registry op of a linear in this format
    description: str
    source: str
    checkpoint_layout: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def bits_per_weight(self, n: int = 4096, k: int = 4096) -> float:
        """Average stored bits per weight of an (n, k) matrix, scales and zero points included."""
        return 8 * self.weight_bytes(n, k) / (n * k)

    def scale_count(self, n: int, k: int) -> int:
        if self.block_k == 0:
            return 0
        rows = 1 if self.block_n == 0 else -(-n // self.block_n)
        return rows * -(-k // self.block_k)

    def weight_bytes(self, n: int, k: int) -> int:
        """Bytes of an (n, k) weight in this format: elements (K padded to whole blocks), scales, zero points."""
        k_pad = k if self.block_k == 0 else -(-k // self.block_k) * self.block_k
        scales = self.scale_count(n, k)
        bits = n * k_pad * self.element_bits + scales * (self.scale_bits + self.zero_point_bits)
        return -(-bits // 8) + self.tensor_scale_bytes


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    "fp8": WeightFormat(
        "fp8", 8, 0, 0, "fp32", 32, 0, 4, "fp8", "fp8", "linear_fp8",
        "FP8 e4m3 weights, per-tensor fp32 scale; activations per token (W8A8)",
        "OCP 8-bit Floating Point Specification (OFP8) rev 1.0, E4M3 (max 448)",
        "weight float8_e4m3fn (N, K) + weight_scale fp32 ()", aliases=("fp8-tensor", "w8a8")),
    "fp8-block": WeightFormat(
        "fp8-block", 8, 128, 128, "fp32", 32, 0, 0, "fp8", "fp8", "linear_fp8_block",
        "FP8 e4m3 weights, fp32 scale per 128x128 tile; activations per token per 128-group (W8A8)",
        "DeepSeek-V3 Technical Report (arXiv:2412.19437), section 3.3.2 fine-grained quantisation",
        "weight float8_e4m3fn (N, K) + weight_scale_inv fp32 (ceil(N/128), ceil(K/128))"),
    "mxfp4": WeightFormat(
        "mxfp4", 4, 32, 1, "e8m0", 8, 0, 0, "bf16", "fp4", "linear_mxfp4",
        "MXFP4: e2m1 elements, e8m0 scale per 32 along K (weight-only on Hopper, FP4 tensor cores on Blackwell)",
        "OCP Microscaling Formats (MX) Specification v1.0 (2023-09), MXFP4",
        "*_blocks uint8 (N, K/32, 16) + *_scales uint8 (N, K/32) (gpt-oss)"),
    "nvfp4": WeightFormat(
        "nvfp4", 4, 16, 1, "e4m3", 8, 0, 4, "bf16", "fp4", "linear_nvfp4",
        "NVFP4: e2m1 elements, e4m3 scale per 16 along K, fp32 per-tensor scale",
        "NVIDIA technical blog 'Introducing NVFP4 for Efficient and Accurate Low-Precision Inference' (2025-06)",
        "weight uint8 (N, K/2) + weight_scale float8_e4m3fn (N, K/16) + weight_scale_2 fp32 ()"),
    "int4": WeightFormat(
        "int4", 4, 128, 1, "fp16", 16, 8, 0, "bf16", None, "linear_int4",
        "INT4 weight-only, group 128 along K, fp16 scale and zero point per group (AWQ/GPTQ style, W4A16)",
        "Lin et al., AWQ (arXiv:2306.00978); Frantar et al., GPTQ (arXiv:2210.17323)",
        "qweight uint8 (N, K/2) + scales fp16 (N, K/128) + zeros uint8 (N, K/128) (AWQ packs zeros 8 per int32)",
        aliases=("w4a16", "awq", "gptq")),
}
# tokprof keeps int4 zero points one per byte (8 bits), which the byte count above says; AWQ packs them in 4 bits.

# Activation/KV dtypes that are plain torch storage types besides fp32/fp16/bf16.
KV_DTYPES = ("fp8",)


def weight_format(name: str) -> WeightFormat:
    """The format named `name` (or an alias); ValueError naming the choices otherwise."""
    key = str(name).lower()
    for fmt in WEIGHT_FORMATS.values():
        if key == fmt.name or key in fmt.aliases:
            return fmt
    raise ValueError(f"weight format: expected one of {sorted(WEIGHT_FORMATS)}, got {name!r}")


def is_weight_format(name: object) -> bool:
    return isinstance(name, str) and any(name.lower() == f.name or name.lower() in f.aliases
                                         for f in WEIGHT_FORMATS.values())


# ------------------------------------------------------------------------------------------------ quantised weight


@dataclass
class QuantizedWeight:
    """A quantised (N, K) weight in tokprof's kernel layout (see each format's `checkpoint_layout`).

    fp8 / fp8-block: data float8_e4m3fn (N, K); scale fp32 () or (ceil(N/128), ceil(K/128)).
    mxfp4 / nvfp4 / int4: data uint8 (N, K_pad/2), element 2j in the low nibble and 2j+1 in the high one;
    scale uint8 e8m0 (mxfp4), float8_e4m3fn (nvfp4) or fp16 (int4), shape (N, K_pad/block);
    tensor_scale fp32 () (nvfp4); zero uint8 (N, K_pad/128) (int4).
    """

    format: str
    shape: tuple[int, int]  # (N, K) of the original weight
    data: torch.Tensor
    scale: torch.Tensor
    tensor_scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None

    @property
    def fmt(self) -> WeightFormat:
        return WEIGHT_FORMATS[self.format]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        """Bytes of the stored tensors (what a kernel reads)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.tensor_scale, self.zero)
                   if t is not None)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return QuantizedWeight(self.format, self.shape, move(self.data), move(self.scale), move(self.tensor_scale),
                               move(self.zero))


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point() or w.numel() == 0:
        got = f"shape {tuple(w.shape)} dtype {w.dtype}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"weight: expected a non-empty 2-D float tensor (N, K), got {got}")
    if not torch.isfinite(w).all():
        raise ValueError("weight: expected finite values (no NaN or inf) to quantise")


def _pad_k(w: torch.Tensor, block: int) -> torch.Tensor:
    k = w.shape[1]
    pad = -k % block
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


# ---------------------------------------------------------------------------------------------------------- fp8


def quantize_fp8_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, fp32 scale ()) with x ~ q * scale, scale = amax / 448 (1 for an all-zero tensor)."""
    amax = x.detach().abs().amax().float()
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    q = (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8)
    return q, scale


def quantize_fp8_rows(x: torch.Tensor, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantisation: per row (group=0, scale (M,)) or per row per `group` columns
    (scale (M, ceil(K/group))). x ~ q * scale broadcast over the row or group."""
    m, k = x.shape
    xf = x.float()
    if group == 0:
        amax = xf.abs().amax(dim=1)  # (M,)
        scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
        return (xf / scale[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8), scale
    xp = _pad_k(xf, group).view(m, -1, group)  # (M, G, group)
    amax = xp.abs().amax(dim=2)  # (M, G)
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    q = (xp / scale[:, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).reshape(m, -1)[:, :k]
    return q.to(FP8).contiguous(), scale


def dequantize_fp8_rows(q: torch.Tensor, scale: torch.Tensor, group: int = 0) -> torch.Tensor:
    """The fp32 values of quantize_fp8_rows(x, group)."""
    if group == 0:
        return q.float() * scale[:, None]
    return q.float() * scale.repeat_interleave(group, dim=1)[:, : q.shape[1]]


def _quantize_fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    wp = torch.nn.functional.pad(w.float(), (0, -k % block, 0, -n % block))
    tiles = wp.view(wp.shape[0] // block, block, wp.shape[1] // block, block)  # (Nb, 128, Kb, 128)
    amax = tiles.abs().amax(dim=(1, 3))  # (Nb, Kb)
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).view_as(wp)[:n, :k]
    return q.to(FP8).contiguous(), scale


def expand_block_scale(scale: torch.Tensor, n: int, k: int, block: int = 128) -> torch.Tensor:
    """(ceil(N/b), ceil(K/b)) tile scales -> (N, K), each tile's scale on its weights."""
    return scale.repeat_interleave(block, dim=0)[:n].repeat_interleave(block, dim=1)[:, :k]


# ---------------------------------------------------------------------------------------------------------- fp4


def fp4_encode(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already divided by their scale) to e2m1 codes 0..15 (uint8), nearest, ties to even,
    saturating at +-6."""
    a = x.abs()
    # boundaries between neighbouring e2m1 values; a tie goes to the value whose mantissa bit is 0 (even)
    code = ((a > 0.25).to(torch.uint8) + (a >= 0.75).to(torch.uint8) + (a > 1.25).to(torch.uint8)
            + (a >= 1.75).to(torch.uint8) + (a > 2.5).to(torch.uint8) + (a >= 3.5).to(torch.uint8)
            + (a > 5.0).to(torch.uint8))
    return code | ((x < 0).to(torch.uint8) << 3)


def fp4_decode(code: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8 0..15) -> fp32 values."""
    table = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32, device=code.device)
    return table[code.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes < 16 -> (N, K/2) bytes, element 2j in the low nibble (the gpt-oss / ModelOpt order)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> (N, K) uint8 codes."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)


def _quantize_mxfp4(w: torch.Tensor) -> QuantizedWeight:
    n, k = w.shape
    wp = _pad_k(w.float(), 32).view(n, -1, 32)  # (N, K/32, 32)
    amax = wp.abs().amax(dim=2)  # (N, K/32)
    # OCP MX v1.0 section 6.3: X = 2^(floor(log2(amax)) - emax_elem); an all-zero block gets the smallest scale
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0**-126))) - FP4_EMAX,
                      torch.full_like(amax, -127.0)).clamp(-127, 127)
    codes = fp4_encode(wp / torch.exp2(exp)[:, :, None]).view(n, -1)
    return QuantizedWeight("mxfp4", (n, k), pack_nibbles(codes), (exp + 127).to(torch.uint8))


def _quantize_nvfp4(w: torch.Tensor) -> QuantizedWeight:
    n, k = w.shape
    wp = _pad_k(w.float(), 16).view(n, -1, 16)  # (N, K/16, 16)
    amax_t = wp.abs().amax()
    global_scale = torch.where(amax_t > 0, amax_t / (FP8_E4M3_MAX * FP4_E2M1_MAX), torch.ones_like(amax_t))
    block = (wp.abs().amax(dim=2) / FP4_E2M1_MAX / global_scale).clamp(max=FP8_E4M3_MAX).to(FP8)  # (N, K/16)
    denom = block.float() * global_scale
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    codes = fp4_encode(torch.where(denom[:, :, None] > 0, wp / safe[:, :, None], torch.zeros_like(wp))).view(n, -1)
    return QuantizedWeight("nvfp4", (n, k), pack_nibbles(codes), block.contiguous(), tensor_scale=global_scale)


def _quantize_int4(w: torch.Tensor, group: int = 128) -> QuantizedWeight:
    n, k = w.shape
    wp = _pad_k(w.float(), group).view(n, -1, group)  # (N, G, group)
    lo, hi = wp.amin(dim=2).clamp(max=0), wp.amax(dim=2).clamp(min=0)  # the range always holds 0 (padding)
    exact = ((hi - lo) / 15).clamp_min(1e-7)
    scale = exact.half()  # stored fp16, rounded up so 15 steps still span the group (no clipping), used as stored
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, 15)
    q = torch.round(wp / s[:, :, None] + zero[:, :, None]).clamp(0, 15).to(torch.uint8).view(n, -1)
    return QuantizedWeight("int4", (n, k), pack_nibbles(q), scale.contiguous(), zero=zero.to(torch.uint8))


def quantize_weight(w: torch.Tensor, fmt: str | WeightFormat) -> QuantizedWeight:
    """Quantise an (N, K) weight to `fmt` (round to nearest, scales from each block's absolute maximum)."""
    fmt = fmt if isinstance(fmt, WeightFormat) else weight_format(fmt)
    _check_weight(w)
    w = w.detach()
    if fmt.name == "fp8":
        q, scale = quantize_fp8_tensor(w)
        return QuantizedWeight("fp8", tuple(w.shape), q.contiguous(), scale)
    if fmt.name == "fp8-block":
        q, scale = _quantize_fp8_block(w)
        return QuantizedWeight("fp8-block", tuple(w.shape), q, scale)
    return {"mxfp4": _quantize_mxfp4, "nvfp4": _quantize_nvfp4, "int4": _quantize_int4}[fmt.name](w)


def block_scales(qw: QuantizedWeight) -> torch.Tensor:
    """The fp32 scale of each FP4 block, (N, K_pad/block): 2^(e - 127) for MX, e4m3 block x tensor scale for NVFP4."""
    if qw.format == "mxfp4":
        return torch.exp2(qw.scale.float() - 127)
    return qw.scale.float() * qw.tensor_scale


def dequantize_weight(qw: QuantizedWeight) -> torch.Tensor:
    """The (N, K) fp32 weight a quantised one stands for: the reference every quantised kernel is checked against."""
    n, k = qw.shape
    if qw.format == "fp8":
        return qw.data.float() * qw.scale
    if qw.format == "fp8-block":
        return qw.data.float() * expand_block_scale(qw.scale, n, k)
    codes = unpack_nibbles(qw.data)  # (N, K_pad)
    block = qw.fmt.block_k
    if qw.format == "int4":
        z = qw.zero.float().repeat_interleave(block, dim=1)
        s = qw.scale.float().repeat_interleave(block, dim=1)
        return ((codes.float() - z) * s)[:, :k]
    values = fp4_decode(codes)
    s = block_scales(qw)
    return (values * s.repeat_interleave(block, dim=1))[:, :k]


def error_bound(w: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Per-element bound on |w - dequantize(qw)| that the format guarantees (rounding to nearest):

    - e4m3 (fp8, fp8-block): 3 mantissa bits, so half an ulp is <= 2^-4 |x| for a normal x/scale (>= 2^-6) and
      2^-10 for a subnormal one (spacing 2^-9): bound max(2^-4 |w|, 2^-10 scale).
    - e2m1 (mxfp4, nvfp4): 1 mantissa bit: half an ulp is <= |x|/4 for |x/scale| in [1, 6] and 0.25 below 1; a value
      past 6 saturates (MX: the spec's floor-based exponent lets amax/scale reach just under 8; NVFP4: the e4m3
      rounding of the block scale lets it pass 6 by up to 1/16): bound max(|x|/4, 0.25 scale) + max(|x| - 6 scale, 0).
    - int4: half a step of the group, 0.5 scale (the stored fp16 scale), plus the fp32 slack of x/scale.
    """
    n, k = qw.shape
    wf = w.float()
    if qw.format in ("fp8", "fp8-block"):
        s = qw.scale if qw.format == "fp8" else expand_block_scale(qw.scale, n, k)
        return torch.maximum(wf.abs() * 2.0**-4, 2.0**-10 * s) * (1 + 1e-6)
    block = qw.fmt.block_k
    if qw.format == "int4":
        return (0.5 * qw.scale.float().repeat_interleave(block, dim=1)[:, :k]) * (1 + 1e-5)
    s = block_scales(qw)
    s = s.repeat_interleave(block, dim=1)[:, :k]
    over = (wf.abs() - FP4_E2M1_MAX * s).clamp_min(0)
    bound = torch.maximum(wf.abs() / 4, 0.25 * s) + over
    return torch.where(s > 0, bound * (1 + 1e-6), wf.abs())  # a zero NVFP4 block scale keeps nothing


def relative_rms_error(w: torch.Tensor, qw: QuantizedWeight) -> float:
    """||w - w_hat|| / ||w||: one number per format for tables."""
    diff = (w.float() - dequantize_weight(qw)).norm()
    ref = w.float().norm()
    return float(diff / ref) if ref > 0 else 0.0 if diff == 0 else math.inf
