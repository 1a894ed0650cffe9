"""Memory capacity of a decode point: does (model, batch, context, dtype, tp) fit on one GPU of the group?

    budget = memory_budget(ModelConfig.from_name("llama-3.1-8b"), "h200", batch=128, context=8192)
    budget.fits, budget.reason        # False, "needs 168.2 GB per GPU (...), has 141.0 GB"
    limit = max_batch(cfg, "h200", context=8192)   # MaxBatch(batch=..., reason=None, budget=...)

Terms, bytes per GPU (each is a field of `MemoryBudget`):

  weights      the parameters one GPU of the tensor-parallel group holds, sharded as tokprof.models.tp shards the
               decode step: QKV column-parallel (Hq/tp query heads and kv_heads_per_gpu KV heads, replicated KV
               heads counted on every GPU that holds one), O and down row-parallel (1/tp), gate-up 1/tp, the LM
               head vocab-parallel (ceil(V/tp) rows); the norms and the embedding table replicated (whole on every
               GPU; a tied LM head shares the table). At tp 1 this is ModelConfig.weight_bytes(dtype).
  kv_cache     batch x ceil(context / block_size) x block_size tokens (paged: whole blocks), each
               2 (K, V) x layers x kv_heads_per_gpu x head_dim x dtype bytes.
  activations  the decode step's live tensors plus fixed workspaces, stated, not measured:
               batch x (dtype bytes x (2 x hidden + (Hq/tp + 2 x Hkv_gpu) x head_dim + 2 x intermediate/tp)
                        + 4 x vocab)                      (residual + normed hidden, QKV, gate-up; fp32 logits)
               + WORKSPACE_BYTES (cuBLAS / attention workspaces, 64 MiB).
  reserve      what a serving engine leaves unused: (1 - memory_utilization) x capacity. The default 0.9 is vLLM's
               `gpu_memory_utilization` default (vLLM engine arguments, docs.vllm.ai "Engine Arguments"): the
               remaining 10% covers the CUDA context, NCCL buffers, CUDA graphs and allocator fragmentation.

A low-precision label as dtype (tokprof.quant.precision: "fp8", "nvfp4+kv-fp8", ...) stores the layers' linear
weights in its format (scales included; the embedding, LM head and norms in the activation dtype), the KV cache in
one byte per element with "+kv-fp8", and the activations in the activation dtype.

Capacity is the spec table's `memory_gb` (decimal GB, as tokprof/data/gpus.json states its units), or the bytes the
device reports (`capacity_bytes`, e.g. torch.cuda.mem_get_info()[1]). A point fits when the sum of the four terms is
at most the capacity (exactly full fits).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tokprof.kernels._common import cdiv
from tokprof.models.config import ModelConfig
from tokprof.models.plan import DEFAULT_BLOCK_SIZE
from tokprof.models.tp import check_tp, kv_heads_per_gpu
from tokprof.profiler.devices import GpuSpec
from tokprof.quant.formats import WEIGHT_FORMATS
from tokprof.quant.precision import parse_precision

DEFAULT_MEMORY_UTILIZATION = 0.9
MEMORY_UTILIZATION_SOURCE = ("vLLM's default gpu_memory_utilization 0.9 (vLLM docs, Engine Arguments): the rest "
                             "covers the CUDA context, NCCL buffers, CUDA graphs and allocator fragmentation")
_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # activation dtypes
WORKSPACE_BYTES = 64 * 2**20  # stated: cuBLAS(Lt) and attention workspaces, one per GPU


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def weight_bytes_per_gpu(config: ModelConfig, dtype: str, tp: int = 1, *, ep: int = 1,
                         dp_attention: bool = False) -> int:
    """Bytes of the parameters one GPU of `tp` holds (see the module docstring); tp 1: config.weight_bytes.
    MoE/MLA models at tp / ep > 1: tokprof.models.plan_moe_parallel.weight_bytes_per_gpu (experts / ep)."""
    if (tp > 1 or ep > 1 or dp_attention) and _moe_family(config, tp):
        from tokprof.models import plan_moe_parallel

        return plan_moe_parallel.weight_bytes_per_gpu(config, parse_precision(dtype).label, tp, ep, dp_attention)
    if _moe_family(config, tp):  # every expert resident (all may be routed to), MLA's own projections
        return config.weight_bytes(dtype)
    check_tp(config, tp)
    precision = parse_precision(dtype)  # a low-precision label stores the layers' linears in its format
    elem = _ELEMENT_BYTES[precision.activation]
    h, d = config.hidden_size, config.head_dim
    hq, hkv = config.num_heads // tp, kv_heads_per_gpu(config, tp)
    inter = config.intermediate_size // tp
    linears = [((hq + 2 * hkv) * d, h), (h, hq * d), (2 * inter, h), (h, inter)]  # (N, K): QKV, O, gate-up, down
    norms = 2 * h + (2 * d if config.qk_norm else 0)  # replicated
    if precision.weight_format is not None:
        fmt = WEIGHT_FORMATS[precision.weight_format]
        linear_bytes = sum(fmt.weight_bytes(n, k) for n, k in linears)
        embed = config.vocab_size * h
        head = 0 if config.tie_word_embeddings else cdiv(config.vocab_size, tp) * h
        return config.num_layers * (linear_bytes + norms * elem) + (embed + head + h) * elem
    per_layer = (h * (hq + 2 * hkv) * d  # QKV, column-parallel (KV heads replicated when Hkv < tp)
                 + hq * d * h  # O, row-parallel
                 + 3 * h * inter  # gate-up and down
                 + norms)
    embed = config.vocab_size * h  # replicated (tokprof.models.tp's default)
    head = 0 if config.tie_word_embeddings else cdiv(config.vocab_size, tp) * h
    return (config.num_layers * per_layer + embed + head + h) * elem


def _moe_family(config: ModelConfig, tp: int) -> bool:
    """MoE / MLA / sliding-window models: counted by the config's own byte methods, single GPU only for now."""
    from tokprof.models.plan import _is_moe_family
    from tokprof.models.plan_moe import check_supported

    if not _is_moe_family(config):
        return False
    check_supported(config, tp)  # float dtypes; the tp/ep shapes are checked by plan_moe_parallel.check_parallel
    return True


def kv_cache_bytes_per_gpu(config: ModelConfig, batch: int, context: int, dtype: str, tp: int = 1,
                           block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Paged KV cache of `batch` sequences of `context` tokens on one GPU: whole blocks of `block_size` tokens."""
    for name, value in (("batch", batch), ("context", context), ("block_size", block_size)):
        _check_positive_int(name, value)
    tokens = batch * cdiv(context, block_size) * block_size
    if _moe_family(config, tp):  # MLA: one latent row per token; gpt-oss sliding layers: at most the window
        if not config.is_mla and tp > 1:  # KV heads sharded as tokprof.models.tp shards them
            return batch * config.kv_bytes_per_sequence(dtype, cdiv(context, block_size) * block_size) \
                * kv_heads_per_gpu(config, tp) // config.num_kv_heads
        # MLA's latent row is one "head": replicated on every TP rank, whole on each (tp does not divide it)
        return batch * config.kv_bytes_per_sequence(dtype, cdiv(context, block_size) * block_size)
    precision = parse_precision(dtype)  # an fp8 cache ("+kv-fp8") holds one byte per element
    elem = 1 if precision.kv_dtype == "fp8" else _ELEMENT_BYTES[precision.activation]
    return tokens * 2 * config.num_layers * kv_heads_per_gpu(config, tp) * config.head_dim * elem


def activation_bytes_per_gpu(config: ModelConfig, batch: int, dtype: str, tp: int = 1) -> int:
    """Live tensors of one decode step plus WORKSPACE_BYTES (the formula of the module docstring)."""
    _check_positive_int("batch", batch)
    elem = _ELEMENT_BYTES[parse_precision(dtype).activation]
    hq, hkv = config.num_heads // tp, kv_heads_per_gpu(config, tp)
    per_token = (elem * (2 * config.hidden_size + (hq + 2 * hkv) * config.head_dim
                         + 2 * (config.intermediate_size // tp)) + 4 * config.vocab_size)
    return batch * per_token + WORKSPACE_BYTES


def capacity_of(gpu: GpuSpec | None, capacity_bytes: int | None = None) -> tuple[int | None, str]:
    """(bytes of memory per GPU, where the figure comes from); None when neither the device nor the spec knows."""
    if capacity_bytes is not None:
        return _check_positive_int("capacity_bytes", capacity_bytes), "the device's reported memory"
    if gpu is None or gpu.memory_gb is None:
        name = gpu.key if gpu is not None else "this device"
        return None, f"{name} has no memory_gb in the spec table and no device figure was given"
    return int(gpu.memory_gb * 1e9), f"{gpu.key} memory_gb {gpu.memory_gb:g} ({gpu.source})"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


@dataclass
class MemoryBudget:
    """One GPU's memory at a decode point, bytes per GPU; `fits` None when the capacity is unknown."""

    model: str
    gpu: str | None
    batch: int
    context: int
    dtype: str
    tp: int
    block_size: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    reserve_bytes: int
    capacity_bytes: int | None
    capacity_source: str
    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION
    ep: int = 1  # expert-parallel ranks (MoE): routed experts / ep on each GPU
    dp_attention: bool = False  # data-parallel attention over the EP group: `batch` is this GPU's

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.capacity_bytes is None else self.total_bytes <= self.capacity_bytes

    @property
    def reason(self) -> str | None:
        """Why the point does not fit ("needs 168.2 GB per GPU (...), has 141.0 GB"), else None."""
        if self.fits is not False:
            return None
        assert self.capacity_bytes is not None
        per = " per GPU" if self.tp > 1 or self.ep > 1 else ""
        return (f"needs {_gb(self.total_bytes)}{per} (weights {_gb(self.weights_bytes)}, KV cache "
                f"{_gb(self.kv_cache_bytes)} for batch {self.batch} x context {self.context}, activations "
                f"{_gb(self.activation_bytes)}, reserve {_gb(self.reserve_bytes)}), has {_gb(self.capacity_bytes)}"
                f" on {self.gpu}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes, "fits": self.fits, "reason": self.reason}


def _check_utilization(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"memory_utilization: expected a fraction in (0, 1], got {value!r}")
    return float(value)


def memory_budget(config: ModelConfig, gpu: GpuSpec | str | None, batch: int, context: int, dtype: str = "bf16",
                  tp: int = 1, *, block_size: int = DEFAULT_BLOCK_SIZE, capacity_bytes: int | None = None,
                  memory_utilization: float = DEFAULT_MEMORY_UTILIZATION, ep: int = 1,
                  dp_attention: bool = False) -> MemoryBudget:
    """The memory of one GPU at this point (terms in the module docstring) against its capacity.

    `gpu` a spec row or key (its memory_gb), or None with `capacity_bytes` (a device's own figure); tp must shard
    the model (tokprof.models.tp.check_tp: a clear ValueError otherwise)."""
    if isinstance(gpu, str):
        from tokprof.rollup.project import resolve_gpu

        gpu = resolve_gpu(gpu)
    check_tp(config, tp)
    if ep != 1 or dp_attention:
        from tokprof.models.plan_moe_parallel import check_parallel

        check_parallel(config, tp, ep, dp_attention)
    utilization = _check_utilization(memory_utilization)
    dname = parse_precision(dtype).label  # a float dtype or a low-precision label (tokprof.quant.precision)
    capacity, source = capacity_of(gpu, capacity_bytes)
    reserve = round((1.0 - utilization) * capacity) if capacity is not None else 0
    return MemoryBudget(
        model=config.name, gpu=gpu.key if gpu is not None else None, batch=batch, context=context, dtype=dname,
        tp=tp, block_size=block_size, weights_bytes=weight_bytes_per_gpu(config, dname, tp, ep=ep,
                                                                                dp_attention=dp_attention),
        kv_cache_bytes=kv_cache_bytes_per_gpu(config, batch, context, dname, tp, block_size),
        activation_bytes=activation_bytes_per_gpu(config, batch, dname, tp), reserve_bytes=reserve,
        capacity_bytes=capacity, capacity_source=source, memory_utilization=utilization, ep=ep,
        dp_attention=dp_attention)


@dataclass
class MaxBatch:
    """The largest batch that fits at a context: `batch` None with the reason when even batch 1 does not (or the
    capacity is unknown); `budget` is the memory at that batch (at batch 1 when none fits)."""

    batch: int | None
    context: int
    tp: int
    reason: str | None
    budget: MemoryBudget


def max_batch(config: ModelConfig, gpu: GpuSpec | str | None, context: int, dtype: str = "bf16", tp: int = 1, *,
              block_size: int = DEFAULT_BLOCK_SIZE, capacity_bytes: int | None = None,
              memory_utilization: float = DEFAULT_MEMORY_UTILIZATION, limit: int = 1 << 20, ep: int = 1,
              dp_attention: bool = False) -> MaxBatch:
    """Largest batch (<= `limit`) whose memory_budget fits; every term grows with the batch, so bisect."""
    kw = {"block_size": block_size, "capacity_bytes": capacity_bytes, "memory_utilization": memory_utilization,
          "ep": ep, "dp_attention": dp_attention}
    one = memory_budget(config, gpu, 1, context, dtype, tp, **kw)
    if one.fits is None:
        return MaxBatch(None, context, tp, f"capacity unknown: {one.capacity_source}", one)
    if not one.fits:
        return MaxBatch(None, context, tp, f"even batch 1 does not fit: {one.reason}", one)
    lo, hi = 1, _check_positive_int("limit", limit)
    if memory_budget(config, gpu, hi, context, dtype, tp, **kw).fits:
        lo = hi
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        if memory_budget(config, gpu, mid, context, dtype, tp, **kw).fits:
            lo = mid
        else:
            hi = mid
    return MaxBatch(lo, context, tp, None, memory_budget(config, gpu, lo, context, dtype, tp, **kw))
