"""Precision labels: what `--dtype` / `--kv-dtype` name, and how a plan's kernel calls change with them.

    p = parse_precision("nvfp4", kv_dtype="fp8")     # Precision(activation="bf16", weight_format="nvfp4", kv="fp8")
    p.label                                          # "nvfp4+kv-fp8": RollupPoint.dtype, card, RunResult
    calls = apply_precision(calls, p)                # linear -> linear_nvfp4, decode_attention -> ..._fp8kv, ...

A label is a float dtype (fp32 | fp16 | bf16) or a weight format (tokprof.quant.formats: fp8, fp8-block, mxfp4,
nvfp4, int4), optionally followed by "+kv-fp8" for an fp8 KV cache. A weight format runs its activations in bf16
unless told otherwise (`activation=`, e.g. fp32 on a CPU, labelled "int4+act-fp32"). The LM head and the
embedding stay in the activation dtype, as the published FP8/FP4/INT4 checkpoints keep them (DeepSeek-V3 fp8,
gpt-oss MXFP4, NVIDIA ModelOpt NVFP4, AWQ). Plans' KernelCall.dtype stays the activation dtype; the format is
in the op name (linear_fp8, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprof.quant.formats import WEIGHT_FORMATS, is_weight_format, weight_format

FLOAT_NAMES = ("fp32", "fp16", "bf16")
KV_SUFFIX = "+kv-fp8"
ACT_PREFIX = "+act-"  # a weight format whose activations are not bf16: "int4+act-fp32" (a CPU run)
KV_DTYPES = ("fp8",)
UNQUANTISED_LINEARS = ("lm_head", "router")  # labels of linears kept in the activation dtype (MoE routers too)


@dataclass(frozen=True)
class Precision:
    activation: str  # "fp32" | "fp16" | "bf16": activations, norms, attention math, the LM head
    weight_format: str | None = None  # a WEIGHT_FORMATS key, None for weights in the activation dtype
    kv_dtype: str | None = None  # "fp8" for an e4m3 KV cache, None for the activation dtype

    @property
    def label(self) -> str:
        act = f"{ACT_PREFIX}{self.activation}" if self.weight_format and self.activation != "bf16" else ""
        return (self.weight_format or self.activation) + act + (KV_SUFFIX if self.kv_dtype == "fp8" else "")

    @property
    def quantised(self) -> bool:
        return self.weight_format is not None or self.kv_dtype is not None


def _float_name(value: str | torch.dtype, what: str) -> str:
    from tokprof.kernels._common import dtype_name, parse_dtype

    try:
        return dtype_name(parse_dtype(value))
    except ValueError:
        raise ValueError(f"{what}: expected one of {list(FLOAT_NAMES)} or a weight format {sorted(WEIGHT_FORMATS)} "
                         f"(optionally with {KV_SUFFIX!r}), got {value!r}") from None


def parse_precision(dtype: str | torch.dtype | Precision, *, weight_format: str | None = None,
                    kv_dtype: str | None = None, activation: str | torch.dtype | None = None) -> Precision:
    """A Precision from a label ("bf16", "fp8", "mxfp4+kv-fp8", torch.bfloat16) and optional overrides."""
    if isinstance(dtype, Precision):
        base = dtype
    elif isinstance(dtype, torch.dtype):
        base = Precision(_float_name(dtype, "dtype"))
    else:
        text = str(dtype).strip().lower()
        kv = None
        if text.endswith(KV_SUFFIX):
            text, kv = text[: -len(KV_SUFFIX)], "fp8"
        act_name = "bf16"
        if ACT_PREFIX in text:
            text, act_name = text.split(ACT_PREFIX, 1)
            act_name = _float_name(act_name, "dtype")
        if is_weight_format(text):
            base = Precision(act_name, _format_name(text), kv)
        else:
            base = Precision(_float_name(text, "dtype"), None, kv)
    fmt = base.weight_format if weight_format is None else _format_name(weight_format)
    act = _float_name(activation, "activation") if activation is not None else base.activation
    kv = base.kv_dtype if kv_dtype is None else check_kv_dtype(kv_dtype, act)
    return Precision(act, fmt, kv)


def _format_name(name: str) -> str | None:
    if name in ("", "none") or name in FLOAT_NAMES:
        return None
    return weight_format(name).name


def check_kv_dtype(kv_dtype: str, activation: str = "bf16") -> str | None:
    """'fp8' -> 'fp8'; 'auto' or the activation dtype -> None (the cache in the activation dtype)."""
    key = str(kv_dtype).strip().lower()
    if key in ("auto", "", activation) or key in FLOAT_NAMES:
        if key in FLOAT_NAMES and key != activation:
            raise ValueError(f"kv_dtype: the KV cache is fp8 or the model's dtype ({activation}), got {kv_dtype!r}")
        return None
    if key in ("fp8", "fp8_e4m3", "fp8-e4m3"):
        return "fp8"
    raise ValueError(f"kv_dtype: expected 'fp8' or 'auto' (the activation dtype), got {kv_dtype!r}")


# ------------------------------------------------------------------------------------------------ plan rewriting

_KV_OPS = {"append_kv": "append_kv_fp8", "decode_attention": "decode_attention_fp8kv"}


def apply_precision(calls: list, precision: Precision) -> list:
    """The calls of a plan (tokprof.models.plan.KernelCall, in step order) with the precision's ops: every linear
    but the LM head becomes the format's op (W8A8 formats add the activation quantisation, quantize_fp8, before
    it), and with an fp8 KV cache append_kv / decode_attention become append_kv_fp8 / decode_attention_fp8kv.
    Collectives and every other call are kept; equal (op, shape, dtype) calls are merged again."""
    from tokprof.models.plan import KernelCall

    if not precision.quantised:
        return calls
    merged: dict[tuple, KernelCall] = {}

    def add(call: KernelCall, op: str, labels: list[str], count: int, shape: dict[str, int]) -> None:
        new = KernelCall(op=op, shape=dict(shape), dtype=call.dtype, count=count, labels=list(labels))
        old = merged.get(new.key())
        if old is None:
            merged[new.key()] = new
            return
        old.count += count
        old.labels += [lab for lab in labels if lab not in old.labels]

    fmt = WEIGHT_FORMATS[precision.weight_format] if precision.weight_format else None
    for call in calls:
        if call.op == "linear" and fmt is not None:
            kept = [lab for lab in call.labels if lab in UNQUANTISED_LINEARS]
            labels = [lab for lab in call.labels if lab not in UNQUANTISED_LINEARS]
            count = call.count
            if kept:  # the LM head runs once per step: its share of a merged call stays in the activation dtype
                add(call, "linear", kept, len(kept), call.shape)
                count -= len(kept)
            if count <= 0 or not labels:
                continue
            if fmt.activation == "fp8":
                add(call, "quantize_fp8", [f"quant_{lab}" for lab in labels], count,
                    {"T": call.shape["M"], "K": call.shape["K"], "group": fmt.block_k})
            add(call, fmt.op, labels, count, call.shape)
        elif call.op == "fused_moe" and fmt is not None:  # MoE experts: their weights counted in the format
            from tokprof.kernels.fused_moe import WEIGHT_FORMAT_CODES

            add(call, call.op, call.labels, call.count,
                {**call.shape, "wfmt": WEIGHT_FORMAT_CODES.index(fmt.name) + 1})
        elif call.op in _KV_OPS and precision.kv_dtype == "fp8":
            add(call, _KV_OPS[call.op], call.labels, call.count, call.shape)
        else:
            add(call, call.op, call.labels, call.count, call.shape)
    return list(merged.values())


def math_dtype(op: str, dtype: str, spec: object | None = None, shape: dict[str, int] | None = None) -> str:
    """The dtype whose datasheet FLOP/s peak bounds a call of `op` at activation dtype `dtype` on `spec` (a GpuSpec):
    fp8 for the W8A8 ops; fp4 for MXFP4/NVFP4 where the spec row has an FP4 peak (Blackwell's native FP4 tensor
    cores, modelled from the datasheet), else the activation dtype (weight-only W4A16, as on Hopper); the
    activation dtype for INT4 and every other op. fused_moe names its experts' format in its `shape` (key wfmt)."""
    from tokprof.kernels import OPS

    name = OPS[op].extra.get("weight_format") if op in OPS else None
    if op == "fused_moe" and shape:
        from tokprof.kernels.fused_moe import weight_format_of

        name = weight_format_of(shape)
    if name is None:
        return dtype
    native = WEIGHT_FORMATS[name].native_math
    if native == "fp8":
        return "fp8"
    if native is not None and spec is not None and getattr(spec, f"{native}_tflops", None) is not None:
        return native
    return dtype


# ------------------------------------------------------------------------------------------- ops and devices


def op_for(op: str, precision: Precision) -> str:
    """The registry op that runs `op` at `precision`: linear -> the format's linear, append_kv / decode_attention ->
    their fp8-cache forms with an fp8 KV cache; every other op unchanged (it runs in the activation dtype)."""
    if op == "linear" and precision.weight_format is not None:
        return WEIGHT_FORMATS[precision.weight_format].op
    if op in _KV_OPS and precision.kv_dtype == "fp8":
        return _KV_OPS[op]
    return op


def _uses_fp8_types(precision: Precision) -> str | None:
    if precision.weight_format in ("fp8", "fp8-block"):
        return f"--dtype {precision.weight_format} runs an fp8 x fp8 GEMM (W8A8) on fp8 tensor cores"
    if precision.kv_dtype == "fp8":
        return "--kv-dtype fp8 reads an e4m3 KV cache (fp8 conversions)"
    if precision.weight_format == "nvfp4":
        return "--dtype nvfp4 decodes e4m3 block scales"
    return None


def check_supported(precision: Precision, *, spec: object | None = None, device: torch.device | str | None = None,
                    backend: str | None = None) -> None:
    """ValueError with the reason when `precision` cannot run (measured on `device` with `backend`) or be modelled
    (on the spec-table row `spec`) as asked.

    Modelled: a W8A8 format needs an fp8 peak in the GPU's spec row (Ampere has no fp8 tensor cores).
    Measured on a CUDA GPU: fp8 data (W8A8, an fp8 KV cache, NVFP4's e4m3 scales) needs sm_89 or later for the
    Triton kernels (Triton has no e4m3 conversions before sm_89), and W8A8 needs fp8 tensor cores whatever the
    backend (the torch path would time an fp32 emulation, not an fp8 GEMM). The CPU runs every format through the
    torch references (and the Triton interpreter), labelled as a CPU run."""
    fmt = precision.weight_format
    if spec is not None and fmt in ("fp8", "fp8-block") and getattr(spec, "fp8_tflops", None) is None:
        raise ValueError(f"dtype: {fmt} is W8A8 on fp8 tensor cores, and {getattr(spec, 'key', spec)} has none (no "
                         "fp8 peak in tokprof/data/gpus.json); use a weight-only format (int4, mxfp4, nvfp4) or bf16")
    if device is None or torch.device(device).type != "cuda":
        return
    why = _uses_fp8_types(precision)
    if why is None:
        return
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if (major, minor) >= (8, 9):
        return
    name = torch.cuda.get_device_name(torch.device(device))
    if fmt in ("fp8", "fp8-block") or backend in (None, "triton"):
        raise ValueError(f"dtype: {why}, which needs sm_89 or later; {name} is sm_{major}{minor}. Use a weight-only "
                         "format (int4, mxfp4) or bf16 on this GPU")


def base_op(op: str) -> str:
    """The op a low-precision op stands in for (linear_int4 -> linear, decode_attention_fp8kv -> decode_attention):
    for tables keyed by op, such as per-op efficiencies."""
    from tokprof.kernels import OPS

    if op in OPS and "base_op" in OPS[op].extra:
        return OPS[op].extra["base_op"]
    return {v: k for k, v in _KV_OPS.items()}.get(op, op)
