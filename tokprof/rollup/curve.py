"""Throughput per GPU against interactivity (tokens/s per user) for a model on a system, from its parts.

    curve = serving_curve(shape, hardware(resolve_system("gb300")), Workload(1024, 1024), precision="fp4")
    curve.frontier            # Pareto points, each naming its configuration ("disagg DEP32 MTP2 b128 P:D 0.31")
    curve.best_at(50.0)       # the most output tokens/s per GPU at >= 50 tokens/s per user

Serving configurations searched (every combination, vectorised over the batch; capacity included):

  decode instance  G GPUs (1..72; beyond the scale-up domain the instance spans domains over the scale-out network).
                   Attention: tp-way tensor parallel (tp <= 8, within the domain) in G/tp data-parallel groups
                   (DP attention); MoE experts spread over all G GPUs (EP = G) with a dispatch and a combine
                   all-to-all per MoE layer (tokprof.rollup.systems.all_to_all_us: NVLink inside the domain, the
                   scale-out NIC beyond). G = tp: plain tensor parallelism (experts split too, all-reduces only).
  batch            sequences per attention group b (1..4096), capped by memory: weights + KV of b sequences of
                   ISL + OSL tokens + workspace <= memory_utilization x HBM (tokprof.rollup.capacity's defaults).
  MTP              n draft tokens from the model's MTP module (DeepSeek-V3/R1), acceptance a per position (stated,
                   MTP_ACCEPTANCE): tokens per step 1 + a + ... + a^n; the verify step computes b (1 + n) tokens;
                   drafting costs n x (one layer + head) at batch b.
  aggregated       prefill chunks mixed into decode steps: per step, b x tokens_per_step x ISL/OSL prompt tokens
                   ride along (their FLOPs, their all-to-all bytes); all GPUs serve both phases.
  disaggregated    a prefill pool sized to keep up: P/D = decode tokens/s per GPU x (ISL/OSL) / prefill tokens/s per
                   GPU; prefill compute-bound at PREFILL_MFU with its all-to-all overlapped; each request's KV
                   (ISL x KV bytes per token) crosses to the decode pool over NVLink (same domain) or the scale-out
                   NIC, and a point whose KV inflow exceeds that link is infeasible.

Step time (one decode GPU, us) = sum over op groups of calls x latency + max(FLOPs / (peak x compute_eff),
bytes / (HBM x memory_eff)) (the step model's op-time formula, tokprof.rollup.step_model, with its defaults or a
reference run's fitted curves) + collectives + the step model's per-step overhead. With DP attention the
all-to-alls overlap the computation of the other micro-batch (two-batch overlap, DeepSeek-V3 report section 3.4):
step = max(compute, all-to-all) + overhead; otherwise they add.

Workloads: ISL/OSL (1k/1k, 8k/1k, 1k/8k) or a mix of request kinds served mean-field (Workload).

Reported per point: output tokens/s per GPU over ALL GPUs (prefill GPUs included: the figure the published cost
tables divide a system's price by) and per decode GPU (what single-pool benchmarks print); tokens/s per user
(decode speed, TTFT excluded); $/M tokens and tokens/s per MW from the system's price and all-in power.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tokprof.rollup.capacity import DEFAULT_MEMORY_UTILIZATION, WORKSPACE_BYTES
from tokprof.rollup.model_shape import ModelShape
from tokprof.rollup.step_model import StepModel
from tokprof.rollup.systems import SCALE_OUT_EFFICIENCY, Hardware, all_to_all_us

MTP_ACCEPTANCE = 0.85
MTP_ACCEPTANCE_SOURCE = ("DeepSeek-V3 technical report (arXiv 2412.19437) section 5.4.3: the second token's "
                         "acceptance rate is 85-90%; 0.85 per draft position, stated")
PREFILL_MFU = 0.35
PREFILL_MFU_SOURCE = ("DeepSeek 'Day 6: DeepSeek-V3/R1 inference system overview' (2025-03-01): 73.7k input "
                      "tokens/s per H800 node in prefill, ~9.2k per GPU = ~0.35 of the FP8 peak at 2 x 37B FLOPs/token")
CALLS_PER_LAYER = 10  # attention: qkv-a, q/kv-b (absorbed), attention, o, norms; MLP/MoE: router, 2-3 GEMMs, combine

# precision: weight bytes per parameter (block scales included), tensor-core math dtype, KV bytes per element,
# all-to-all dispatch bytes per element (combine is bf16). Embedding and LM head stay bf16.
PRECISIONS: dict[str, dict[str, Any]] = {
    "bf16": {"weight_bytes": 2.0, "math": "bf16", "kv_bytes": 2.0, "dispatch_bytes": 2.0},
    "fp8": {"weight_bytes": 1.0 + 4 / 128 ** 2, "math": "fp8", "kv_bytes": 1.0, "dispatch_bytes": 1.0 + 4 / 128},
    "fp4": {"weight_bytes": 0.5 + 1 / 16, "math": "fp4", "kv_bytes": 1.0, "dispatch_bytes": 0.5 + 1 / 16},
}
PRECISION_SOURCE = ("fp8: DeepSeek-V3 block scales (fp32 per 128x128 weights, per 1x128 activations; DeepEP dispatches "
                    "fp8); fp4: NVFP4 (an fp8 scale per 16 values; nvidia/DeepSeek-R1-FP4); KV cache fp8 for both")

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 72)
TP_DEGREES = (1, 2, 4, 8)
BATCHES = tuple(sorted({int(round(2 ** (i / 2))) for i in range(0, 25)}))  # 1 .. 4096, ~sqrt(2) apart
MTP_DEPTHS = (0, 1, 2, 3)


@dataclass(frozen=True)
class Workload:
    """Input and output tokens per request (ISL / OSL), or a mix of request kinds (`mix`: (isl, osl, weight), the
    weights request fractions; isl/osl then hold the rounded means).

    A mix is served mean-field: the decode step attends the output-token-weighted mean context, the prefill load is
    sum(w isl) / sum(w osl) prompt tokens per output token, and memory holds the longest kind's ISL + OSL per
    sequence (conservative, as for a single kind)."""

    isl: int
    osl: int
    mix: tuple[tuple[int, int, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("isl", "osl"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int of tokens, got {v!r}")
        for isl, osl, w in self.mix:
            if isl <= 0 or osl <= 0 or not w > 0:
                raise ValueError(f"mix: expected (isl > 0, osl > 0, weight > 0) entries, got {(isl, osl, w)!r}")

    @property
    def kinds(self) -> tuple[tuple[int, int, float], ...]:
        return self.mix or ((self.isl, self.osl, 1.0),)

    @property
    def prefill_per_output(self) -> float:
        """Prompt tokens prefilled per output token."""
        return sum(w * i for i, _, w in self.kinds) / sum(w * o for _, o, w in self.kinds)

    @property
    def decode_context(self) -> float:
        """Mean attended tokens of a decode step (each kind weighted by its output tokens)."""
        return sum(w * o * (i + o / 2) for i, o, w in self.kinds) / sum(w * o for _, o, w in self.kinds)

    @property
    def prefill_context(self) -> float:
        """Mean attended tokens of a prompt token in prefill (half its prompt, weighted by prompt tokens)."""
        return sum(w * i * i / 2 for i, _, w in self.kinds) / sum(w * i for i, _, w in self.kinds)

    @property
    def seq_tokens(self) -> int:
        """KV tokens one sequence may hold at most (memory is sized for it)."""
        return max(i + o for i, o, _ in self.kinds)

    @property
    def label(self) -> str:
        k = lambda n: f"{n // 1024}k" if n % 1024 == 0 else str(n)  # noqa: E731
        if self.mix:
            return "+".join(f"{k(i)}/{k(o)}:{w:g}" for i, o, w in self.mix)
        return f"{k(self.isl)}/{k(self.osl)}"

    @classmethod
    def parse(cls, text: str) -> Workload:
        """'1k/1k', '8192/1024', or a mix of request kinds with their fractions: '1k/1k:0.7,8k/1k:0.3'."""
        def tokens(part: str) -> int | None:
            part = part.strip().lower()
            scale = 1024 if part.endswith("k") else 1
            digits = part[:-1] if scale > 1 else part
            return int(digits) * scale if digits.isdigit() and int(digits) > 0 else None

        def one(item: str) -> tuple[int, int] | None:
            parts = item.split("/")
            sizes = [tokens(p) for p in parts] if len(parts) == 2 else [None]
            return None if None in sizes else (sizes[0], sizes[1])

        bad = f"workload: expected ISL/OSL such as 1k/1k or 8192/1024, or a mix like 1k/1k:0.7,8k/1k:0.3, got {text!r}"
        items = [x for x in str(text).split(",")]
        if len(items) == 1 and ":" not in items[0]:
            pair = one(items[0])
            if pair is None:
                raise ValueError(bad)
            return cls(*pair)
        mix = []
        for item in items:
            kind, _, weight = item.partition(":")
            pair = one(kind)
            try:
                w = float(weight)
            except ValueError:
                w = -1.0
            if pair is None or not w > 0:
                raise ValueError(bad)
            mix.append((pair[0], pair[1], w))
        total = sum(w for *_, w in mix)
        isl = round(sum(w * i for i, _, w in mix) / total)
        osl = round(sum(w * o for _, o, w in mix) / total)
        return cls(isl, osl, tuple((i, o, w / total) for i, o, w in mix))


@dataclass(frozen=True)
class Features:
    """What configurations the search may use (the factor decomposition switches these)."""

    disaggregation: bool = True
    mtp_depths: tuple[int, ...] = MTP_DEPTHS
    max_gpus: int = 72  # largest decode instance
    gpu_counts: tuple[int, ...] = GPU_COUNTS


@dataclass
class CurvePoint:
    """One configuration at one batch: the figures, every one labelled by `provenance`."""

    label: str
    mode: str  # "aggregated" | "disaggregated"
    gpus: int  # decode instance (EP width)
    tp: int
    dp: int
    mtp: int
    batch: int  # sequences per attention group
    tokens_per_step: float
    step_time_us: float
    tokens_per_s_per_user: float
    output_tokens_per_s_per_gpu: float  # all GPUs, prefill included
    output_tokens_per_s_per_decode_gpu: float
    prefill_gpus_per_decode_gpu: float | None
    a2a_link: str
    memory_bytes_per_gpu: float
    usd_per_million_tokens: float | None
    tokens_per_s_per_mw: float | None
    provenance: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Curve:
    """Every feasible point of a search and its Pareto frontier (most tokens/s per GPU at each interactivity)."""

    model: str
    system: str
    workload: str
    precision: str
    points: list[CurvePoint]
    frontier: list[CurvePoint]
    provenance: str
    sources: dict[str, str] = field(default_factory=dict)
    infeasible: dict[str, int] = field(default_factory=dict)  # reason -> configurations dropped

    def best_at(self, tokens_per_s_per_user: float) -> CurvePoint | None:
        """The frontier point with the most output tokens/s per GPU at >= this interactivity; None if none."""
        ok = [p for p in self.frontier if p.tokens_per_s_per_user >= tokens_per_s_per_user]
        return max(ok, key=lambda p: p.output_tokens_per_s_per_gpu) if ok else None

    def interactivity_at(self, tokens_per_s_per_gpu: float) -> float | None:
        """The highest tokens/s per user at which the frontier still gives >= this many tokens/s per GPU."""
        ok = [p for p in self.frontier if p.output_tokens_per_s_per_gpu >= tokens_per_s_per_gpu]
        return max(p.tokens_per_s_per_user for p in ok) if ok else None

    def to_dict(self, all_points: bool = False) -> dict[str, Any]:
        out = {"model": self.model, "system": self.system, "workload": self.workload, "precision": self.precision,
               "provenance": self.provenance, "sources": self.sources, "infeasible": self.infeasible,
               "points": len(self.points), "frontier": [p.to_dict() for p in self.frontier]}
        if all_points:
            out["all_points"] = [p.to_dict() for p in self.points]
        return out


def pareto(points: list[CurvePoint]) -> list[CurvePoint]:
    """Points no other point beats on both tokens/s per user and tokens/s per GPU, by interactivity ascending."""
    best = -1.0
    front = []
    for p in sorted(points, key=lambda p: (-p.tokens_per_s_per_user, -p.output_tokens_per_s_per_gpu)):
        if p.output_tokens_per_s_per_gpu > best:
            front.append(p)
            best = p.output_tokens_per_s_per_gpu
    return front[::-1]


def _op(calls: float, flops: np.ndarray | float, nbytes: np.ndarray | float, peak_tflops: float, hbm_tbps: float,
        sm: StepModel, mem_key: str) -> np.ndarray:
    """The step model's op time (us) for a group of `calls` kernels moving `nbytes` and computing `flops`."""
    e_mem = sm.memory_efficiency.get(mem_key, sm.memory_efficiency["default"])
    lat = sm.op_call_latency_us.get(mem_key, sm.call_latency_us)
    return calls * lat + np.maximum(np.asarray(flops) / (peak_tflops * 1e6 * sm.compute_efficiency),
                                    np.asarray(nbytes) / (hbm_tbps * 1e6 * e_mem))


def math_peak(hw: Hardware, precision: str) -> tuple[float, str]:
    """(TFLOP/s, dtype) of the precision's math on this GPU; a GPU without it runs the next wider format's math
    (FP4 weights on Hopper: W4A8, fp8 tensor cores)."""
    order = ["fp4", "fp8", "bf16"]
    for dt in order[order.index(PRECISIONS[precision]["math"]):]:
        if hw.peak(dt):
            return float(hw.peak(dt)), dt
    raise ValueError(f"gpu {hw.gpu}: no tensor-core peak for {precision} or wider in the spec table")


def weight_bytes_per_gpu(shape: ModelShape, precision: str, gpus: int, tp: int, mtp: bool) -> float:
    """Bytes of parameters on one decode GPU: attention, dense MLP, shared experts and the head split tp ways (the
    head vocab-parallel), ceil(E / gpus) routed experts per MoE layer, the embedding whole (bf16)."""
    wb = PRECISIONS[precision]["weight_bytes"]
    layers_moe = shape.moe_layers + (1 if mtp else 0)
    attn_layers = shape.layers + (1 if mtp else 0)
    experts = math.ceil(shape.n_experts / gpus) if shape.n_experts else 0
    if not shape.is_moe:  # dense: the MLP is tensor-parallel
        return (attn_layers * shape.attn_params + shape.dense_layers * shape.dense_mlp_params) * wb / tp + 2 * (
            shape.vocab * shape.hidden * (1 + 1 / tp))
    return ((attn_layers * shape.attn_params + shape.dense_layers * shape.dense_mlp_params
             + layers_moe * shape.shared_params) * wb / tp + layers_moe * experts * shape.expert_params * wb
            + 2 * shape.vocab * shape.hidden * (1 + 1 / tp))


def kv_bytes_per_sequence(shape: ModelShape, precision: str, tokens: int, tp: int) -> float:
    return tokens * shape.kv_elems_per_token * shape.layers * PRECISIONS[precision]["kv_bytes"] / min(
        tp, shape.kv_split_max)


_AR_CACHE: dict[tuple, float] = {}


def _all_reduce_us(sm: StepModel, nbytes: int, tp: int, link: Any) -> float:
    """The step model's all-reduce time, memoised (the search asks for the same sizes many times)."""
    key = (sm.collective_algorithm, tuple(sorted(sm.collective_base_us.items())),
           tuple(sorted(sm.collective_hop_us.items())), sm.collective_efficiency, sm.collective_latency_us, nbytes, tp,
           link.gbps_per_direction)
    if key not in _AR_CACHE:
        if len(_AR_CACHE) > 100_000:
            _AR_CACHE.clear()
        _AR_CACHE[key] = sm.collective_us("all_reduce", nbytes, tp, link)[0]
    return _AR_CACHE[key]


def _decode_step(shape: ModelShape, hw: Hardware, precision: str, sm: StepModel, gpus: int, tp: int,
                 b: np.ndarray, mtp: int, context: float, prefill_tokens: np.ndarray, prefill_ctx: float,
                 layers_scale: float = 1.0, head: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """(compute us, collective us, the all-to-all's bounding link) of one decode step of one GPU, for batches `b`
    per attention group, `mtp` draft tokens verified, `prefill_tokens` prompt tokens per group riding along."""
    p = PRECISIONS[precision]
    wb, kvb = p["weight_bytes"], p["kv_bytes"]
    peak, _ = math_peak(hw, precision)
    peak_bf16 = hw.peak("bf16") or peak
    dp = gpus // tp
    q = b * (1 + mtp) + prefill_tokens  # tokens computed per attention group
    L, Lm = shape.layers * layers_scale, shape.moe_layers * layers_scale
    Ld = shape.dense_layers * layers_scale
    t = _op(4 * L, 2 * L * shape.attn_params * q / tp, L * shape.attn_params * wb / tp, peak, hw.hbm_tbps, sm,
            "linear")
    kv_read = b * context * shape.kv_elems_per_token * L * kvb / min(tp, shape.kv_split_max)
    attn_flops = (b * (1 + mtp) * context * shape.attn_flops_per_ctx
                  + prefill_tokens * prefill_ctx * shape.prefill_attn_flops_per_ctx) * L / tp
    t = t + _op(L, attn_flops, kv_read, peak_bf16, hw.hbm_tbps, sm, "decode_attention")
    t = t + _op(2 * L, 0.0, b * (1 + mtp) * shape.hidden * 2 * 4 * L, peak, hw.hbm_tbps, sm, "default")  # norms
    if Ld:
        t = t + _op(2 * Ld, 2 * Ld * shape.dense_mlp_params * q / tp, Ld * shape.dense_mlp_params * wb / tp, peak,
                    hw.hbm_tbps, sm, "linear")
    coll = np.zeros_like(q, dtype=float)
    link = "none"
    if shape.is_moe and Lm:
        tokens = dp * q  # tokens of the instance, each routed to top_k experts
        local = shape.n_experts / gpus
        touched = local * (1.0 - (1.0 - shape.top_k / shape.n_experts) ** tokens)
        t = t + _op(3 * Lm, 2 * Lm * tokens * shape.top_k / gpus * shape.expert_params,
                    Lm * touched * shape.expert_params * wb, peak, hw.hbm_tbps, sm, "linear")
        if shape.shared_params:
            t = t + _op(2 * Lm, 2 * Lm * shape.shared_params * q / tp, Lm * shape.shared_params * wb / tp, peak,
                        hw.hbm_tbps, sm, "linear")
        if dp > 1:  # dispatch (precision bytes) and combine (bf16) per MoE layer, each GPU sending its tokens' copies
            per_gpu = q / tp * shape.top_k * shape.hidden
            d_us, link = all_to_all_us(hw, per_gpu * p["dispatch_bytes"], gpus, sm)
            c_us, _ = all_to_all_us(hw, per_gpu * 2.0, gpus, sm)
            coll = coll + Lm * (d_us + c_us)
    if tp > 1:  # all-reduces inside the attention group over NVLink: after attention, and after the MLP unless EP
        from tokprof.profiler.collectives import Link

        nvl = Link("nvlink", hw.nvlink_gbps, "system scale-up link")
        per_layer = 1 if dp > 1 else 2
        ar = np.array([_all_reduce_us(sm, int(x * shape.hidden * 2), tp, nvl) for x in np.atleast_1d(q)])
        coll = coll + per_layer * L * ar
    if head:
        head_tokens = b * (1 + mtp)
        t = t + _op(1, 2 * shape.vocab * shape.hidden * head_tokens / tp, shape.vocab * shape.hidden * 2 / tp,
                    peak_bf16, hw.hbm_tbps, sm, "linear")
    return t, coll, link


def _prefill_tokens_per_s_per_gpu(shape: ModelShape, hw: Hardware, precision: str, sm: StepModel,
                                  context: float, gpus: int) -> float:
    """Prefill throughput of one GPU of a `gpus`-wide EP prefill instance: compute at PREFILL_MFU, the
    all-to-all of its tokens overlapped (the slower of the two per token)."""
    peak, _ = math_peak(hw, precision)
    flops = 2 * shape.active_params + shape.layers * shape.prefill_attn_flops_per_ctx * context
    t_compute = flops / (peak * 1e12 * PREFILL_MFU)
    if not shape.is_moe or gpus == 1:
        return 1.0 / t_compute
    chunk = 8192  # tokens per GPU per forward (a prefill batch), for the all-to-all's fixed cost
    per_gpu = chunk * shape.top_k * shape.hidden
    a2a = (all_to_all_us(hw, per_gpu * PRECISIONS[precision]["dispatch_bytes"], gpus, sm)[0]
           + all_to_all_us(hw, per_gpu * 2.0, gpus, sm)[0]) * shape.moe_layers * 1e-6 / chunk
    return 1.0 / max(t_compute, a2a)


def _label(mode: str, gpus: int, tp: int, mtp: int, b: int, ratio: float | None) -> str:
    par = f"TP{tp}" if gpus == tp else (f"DEP{gpus}" if tp == 1 else f"TP{tp}xDP{gpus // tp}")
    s = f"{'disagg' if mode == 'disaggregated' else 'agg'} {par}{f' MTP{mtp}' if mtp else ''} b{b}"
    return s + (f" P:D {ratio:.2f}" if ratio is not None else "")


def serving_curve(shape: ModelShape, hw: Hardware, workload: Workload, precision: str = "fp8", *,
                  features: Features | None = None, step_model: StepModel | None = None,
                  memory_utilization: float = DEFAULT_MEMORY_UTILIZATION, provenance: str = "modelled",
                  mtp_acceptance: float = MTP_ACCEPTANCE) -> Curve:
    """Search every configuration (module docstring) and return the feasible points and their Pareto frontier."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
    if not 0 <= mtp_acceptance < 1:
        raise ValueError(f"mtp_acceptance: expected a fraction in [0, 1), got {mtp_acceptance!r}")
    feats = features or Features()
    sm = step_model or StepModel()
    capacity = hw.memory_gb * 1e9 * memory_utilization - WORKSPACE_BYTES
    context = workload.decode_context  # mean attended tokens while decoding
    seq_tokens = workload.seq_tokens
    b_all = np.array(BATCHES, dtype=float)
    points: list[CurvePoint] = []
    dropped: dict[str, int] = {}
    prefill_rate = {}
    for gpus in sorted({g for g in feats.gpu_counts if g <= feats.max_gpus}):
        if shape.is_moe and gpus > shape.n_experts:
            continue
        for tp in TP_DEGREES:
            if tp > gpus or gpus % tp or tp > hw.gpus_per_domain or shape.heads % tp:
                continue
            if not shape.is_moe and gpus != tp:
                continue  # a dense model's data-parallel replicas serve like one group
            for mtp in feats.mtp_depths if shape.has_mtp else (0,):
                weights = weight_bytes_per_gpu(shape, precision, gpus, tp, mtp > 0)
                kv_seq = kv_bytes_per_sequence(shape, precision, seq_tokens, tp)
                b_max = math.floor((capacity - weights) / kv_seq) if capacity > weights else 0
                if b_max < 1:
                    dropped["weights do not fit"] = dropped.get("weights do not fit", 0) + 1
                    continue
                b = b_all[b_all <= b_max]
                tps = sum(mtp_acceptance ** i for i in range(mtp + 1))
                for mode in ("aggregated", "disaggregated") if feats.disaggregation else ("aggregated",):
                    pre = b * tps * workload.prefill_per_output if mode == "aggregated" else np.zeros_like(b)
                    comp, coll, link = _decode_step(shape, hw, precision, sm, gpus, tp, b, mtp, context, pre,
                                                    workload.prefill_context)
                    if mtp:  # n draft passes of the MTP module: one layer and the head, at batch b
                        dc, dcoll, _ = _decode_step(shape, hw, precision, sm, gpus, tp, b, 0, context,
                                                    np.zeros_like(b), 0.0, layers_scale=1.0 / shape.layers)
                        comp, coll = comp + mtp * dc, coll + mtp * dcoll
                    gpu_us = np.maximum(comp, coll) if gpus > tp else comp + coll
                    calls = CALLS_PER_LAYER * shape.layers * (1 + mtp / shape.layers)
                    step = gpu_us + sm.overhead_us(int(calls), 0.0)
                    per_user = tps / (step * 1e-6)
                    per_decode_gpu = b * (gpus // tp) * per_user / gpus
                    if mode == "disaggregated":
                        if gpus not in prefill_rate:
                            prefill_rate[gpus] = max(_prefill_tokens_per_s_per_gpu(
                                shape, hw, precision, sm, workload.prefill_context, g)
                                for g in {1, min(8, hw.gpus_per_domain), min(gpus, 72)} if g <= max(gpus, 8))
                        ratio = per_decode_gpu * workload.prefill_per_output / prefill_rate[gpus]
                        per_gpu = per_decode_gpu / (1 + ratio)
                        # KV of each request into the decode pool: over NVLink when both pools fit in one domain
                        same = gpus * (1 + ratio) <= hw.gpus_per_domain
                        kv_tok = kv_bytes_per_sequence(shape, precision, 1, 1)  # per prompt token
                        inflow = per_decode_gpu * workload.prefill_per_output * kv_tok / 1e9  # GB/s per decode GPU
                        limit = np.where(same, hw.nvlink_gbps, hw.scale_out_gbps * SCALE_OUT_EFFICIENCY)
                        ok = inflow <= limit
                        if not ok.all():
                            dropped["KV transfer exceeds the link"] = dropped.get(
                                "KV transfer exceeds the link", 0) + int((~ok).sum())
                    else:
                        ratio, per_gpu, ok = None, per_decode_gpu, np.ones_like(b, dtype=bool)
                    for i in np.nonzero(ok)[0]:
                        r = None if ratio is None else float(ratio[i])
                        pg = float(per_gpu[i])
                        usd = (hw.usd_per_gpu_hour / (pg * 3600 / 1e6)) if hw.usd_per_gpu_hour else None
                        mw = pg * 1000 / hw.all_in_kw_per_gpu if hw.all_in_kw_per_gpu else None
                        points.append(CurvePoint(
                            label=_label(mode, gpus, tp, mtp, int(b[i]), r), mode=mode, gpus=gpus, tp=tp,
                            dp=gpus // tp, mtp=mtp, batch=int(b[i]), tokens_per_step=tps,
                            step_time_us=float(step[i]), tokens_per_s_per_user=float(per_user[i]),
                            output_tokens_per_s_per_gpu=pg, output_tokens_per_s_per_decode_gpu=float(per_decode_gpu[i]),
                            prefill_gpus_per_decode_gpu=r, a2a_link=link,
                            memory_bytes_per_gpu=weights + kv_seq * float(b[i]) + WORKSPACE_BYTES,
                            usd_per_million_tokens=usd, tokens_per_s_per_mw=mw, provenance=provenance))
    peak, math_dtype = math_peak(hw, precision)
    sources = {**hw.sources, "math": f"{math_dtype} tensor cores, {peak:g} TFLOP/s dense"
               + ("" if math_dtype == PRECISIONS[precision]["math"] else
                  f" ({hw.gpu} has no {PRECISIONS[precision]['math']} peak in the spec table: {precision} weights on "
                  f"{math_dtype} math)"), "precision": PRECISION_SOURCE, "mtp_acceptance": f"{mtp_acceptance:g}: "
               + MTP_ACCEPTANCE_SOURCE, "prefill_mfu": f"{PREFILL_MFU:g}: {PREFILL_MFU_SOURCE}",
               "step_model": sm.describe()}
    return Curve(model=shape.name, system=hw.system, workload=workload.label, precision=precision, points=points,
                 frontier=pareto(points), provenance=provenance, sources=sources, infeasible=dropped)
