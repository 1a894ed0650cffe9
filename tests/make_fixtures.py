"""Build the SYNTHETIC RunResult fixtures under tests/data/ that the report, compare and history tests read.

    /work/venv/bin/python tests/make_fixtures.py          # rewrites tests/data/run_h100.json and run_h200.json

They are NOT measurements: every time is drawn from a formula (bytes and FLOPs at a fixed fraction of the
measured ceilings, plus seeded noise) so that the tests know what to expect; each file's notes and host say so.
The sections are built with the real record classes (RollupPoint, E2EMeasurement, Reconciliation), so their keys
follow the contract. The shapes are those of one Llama-3.1-8B bf16 decode step (the decode-step structure of the
plans), batch 1, 16, 64 at context 1024 and 8192. The H200 file differs from the H100 one by the GPU (ceilings,
specs, clocks) and by one injected regression: decode_attention at context 8192 reaches 15% less of its roofline.

`timing_from_samples` is also used by the tests to build runs with chosen sample sets.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from tokprof.models.config import ModelConfig
from tokprof.models.e2e import E2EMeasurement
from tokprof.profiler.devices import load_specs
from tokprof.profiler.roofline import roofline
from tokprof.profiler.schema import (
    Ceilings,
    Clocks,
    DeviceInfo,
    KernelEnergy,
    KernelMeasurement,
    Provenance,
    RunResult,
    Timing,
    save_run,
)
from tokprof.rollup.reconcile import Layer, OpInefficiency, Reconciliation
from tokprof.rollup.records import OpShare, RollupPoint

DATA_DIR = Path(__file__).resolve().parent / "data"
SYNTHETIC_NOTE = ("SYNTHETIC test fixture written by tests/make_fixtures.py from formulas and seeded noise: "
                  "NOT a measurement; never quote its numbers.")
MODEL = "llama-3.1-8b"
BATCHES = (1, 16, 64)
CONTEXTS = (1024, 8192)
RECONCILED = ((1, 1024), (64, 8192))  # the (batch, context) points that get an iceberg
BLOCK = 16

# Fraction of the measured roofline each op reaches in the fixtures (small ops lose more to launch and tails).
OP_EFFICIENCY = {"embedding": 0.35, "rms_norm": 0.55, "linear": 0.82, "rope": 0.45, "append_kv": 0.30,
                 "decode_attention": 0.78, "swiglu": 0.62, "greedy_sample": 0.50}

# (device name, spec key, copy GB/s, bf16 GEMM TFLOP/s, SM clock under load MHz, SM max MHz, $/GPU-h, all-in kW)
GPUS = {
    "h100": ("NVIDIA H100 80GB HBM3", "h100-sxm", 3000.0, 798.0, 1755, 1980, 1.30, 1.73),
    "h200": ("NVIDIA H200", "h200", 4300.0, 790.0, 1785, 1980, 1.41, 1.73),
    "b200": ("NVIDIA B200", "b200", None, None, None, None, 1.95, 2.17),
}
PRICE_SOURCE = "FACTS.md: SemiAnalysis InferenceX hyperscaler $/GPU-h and all-in kW per GPU (2026)"


def timing_from_samples(samples_us: list[float], mode: str = "events") -> Timing:
    """A Timing whose statistics follow docs/measurement.md from `samples_us` (noise: rel. std after IQR removal)."""
    x = np.asarray(samples_us, dtype=np.float64)
    q1, q3 = np.percentile(x, [25, 75])
    keep = x[(x >= q1 - 1.5 * (q3 - q1)) & (x <= q3 + 1.5 * (q3 - q1))]
    noise = float(keep.std(ddof=1) / keep.mean()) if keep.size > 1 else 0.0
    return Timing(samples_us=[float(v) for v in x], timer="cuda_events" if mode == "events" else "cuda_graph",
                  mode=mode, cold_l2=True, median_us=float(np.median(x)), p10_us=float(np.percentile(x, 10)),
                  p90_us=float(np.percentile(x, 90)), mean_us=float(x.mean()), noise=noise,
                  n_outliers=int(x.size - keep.size), noise_target=0.005, met_noise_target=noise <= 0.005)


def decode_calls(cfg: ModelConfig, batch: int, context: int) -> list[tuple[str, str, dict[str, int], int]]:
    """(op, label, shape, count) for one decode step, as the plans lay it out (Llama: no q/k norm)."""
    h, layers = cfg.hidden_size, cfg.num_layers
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return [
        ("embedding", "embedding", {"T": batch, "V": cfg.vocab_size, "H": h}, 1),
        ("rms_norm", "norm (no residual)", {"T": batch, "H": h, "residual": 0}, 1),
        ("rms_norm", "norm + residual", {"T": batch, "H": h, "residual": 1}, 2 * layers),
        ("linear", "QKV projection", {"M": batch, "N": q_size + 2 * kv_size, "K": h}, layers),
        ("rope", "RoPE", {"T": batch, "Hq": hq, "Hkv": hkv, "D": d}, layers),
        ("append_kv", "KV append", {"T": batch, "Hkv": hkv, "D": d, "block_size": BLOCK,
                                    "num_blocks": batch * math.ceil(context / BLOCK)}, layers),
        ("decode_attention", "attention", {"B": batch, "Hq": hq, "Hkv": hkv, "D": d, "context": context,
                                           "block_size": BLOCK}, layers),
        ("linear", "O projection", {"M": batch, "N": h, "K": q_size}, layers),
        ("linear", "gate-up projection", {"M": batch, "N": 2 * cfg.intermediate_size, "K": h}, layers),
        ("swiglu", "SwiGLU", {"T": batch, "I": cfg.intermediate_size}, layers),
        ("linear", "down projection", {"M": batch, "N": h, "K": cfg.intermediate_size}, layers),
        ("linear", "LM head", {"M": batch, "N": cfg.vocab_size, "K": h}, 1),
        ("greedy_sample", "greedy sampling", {"B": batch, "V": cfg.vocab_size}, 1),
    ]


def cost(op: str, s: dict[str, int]) -> tuple[int, int]:
    """(flops, min_bytes) in bf16 (2 bytes), each input read once and each output written once."""
    if op == "embedding":
        return 0, s["T"] * 8 + 2 * s["T"] * s["H"] * 2
    if op == "rms_norm":
        tensors = 4 if s["residual"] else 2
        return 4 * s["T"] * s["H"], (tensors * s["T"] * s["H"] + s["H"]) * 2
    if op == "linear":
        return 2 * s["M"] * s["N"] * s["K"], (s["M"] * s["K"] + s["N"] * s["K"] + s["M"] * s["N"]) * 2
    if op == "rope":
        elems = s["T"] * (s["Hq"] + s["Hkv"]) * s["D"]
        return 3 * elems, 2 * elems * 2 + s["T"] * 8
    if op == "append_kv":
        return 0, 2 * 2 * s["T"] * s["Hkv"] * s["D"] * 2 + s["T"] * 8
    if op == "decode_attention":
        kv = 2 * s["B"] * s["context"] * s["Hkv"] * s["D"] * 2
        return 4 * s["B"] * s["Hq"] * s["context"] * s["D"], kv + 2 * s["B"] * s["Hq"] * s["D"] * 2
    if op == "swiglu":
        return 5 * s["T"] * s["I"], 3 * s["T"] * s["I"] * 2
    if op == "greedy_sample":
        return 2 * s["B"] * s["V"], s["B"] * s["V"] * 2 + s["B"] * 8
    raise ValueError(f"op: expected one of the decode-step ops, got {op!r}")


def build_run(gpu: str, seed: int) -> RunResult:
    name, spec_key, copy_gbps, gemm_tflops, sm_mhz, sm_max_mhz, usd_h, kw = GPUS[gpu]
    rng = np.random.default_rng(seed)
    spec = load_specs()[spec_key]
    cfg = ModelConfig.from_name(MODEL)
    ceilings = Ceilings(copy_gbps=copy_gbps, gemm_tflops=gemm_tflops, gemm_dtype="bf16", copy_bytes=2 * 2**30,
                        gemm_shape=[8192, 8192, 8192], device=name, measured_utc="2026-01-01T00:00:00Z",
                        note=SYNTHETIC_NOTE)
    clocks = Clocks(sm_mhz=sm_mhz, mem_mhz=2619, sm_max_mhz=sm_max_mhz, temperature_c=55, power_limit_w=700.0,
                    power_w=420.0)
    device = DeviceInfo(kind="cuda", name=name, uuid=f"GPU-00000000-fixture-{gpu}", sm_count=132,
                        l2_bytes=int(spec.l2_mb * 1e6), memory_bytes=int(spec.memory_gb * 1e9),
                        sm_max_mhz=sm_max_mhz, mem_max_mhz=2619, compute_capability="9.0", driver="000.00 (synthetic)",
                        cuda="13.0", spec_key=spec_key)
    prov = Provenance(host="synthetic-fixture (no machine)", device=device,
                      versions={"python": "3.12", "torch": "2.11", "triton": "3.6", "tokprof": "0.1.0",
                                "cupy": None, "driver": None, "cuda": "13.0", "nvidia-ml-py": None},
                      git_sha=None, timestamp_utc=f"2026-01-0{1 if gpu == 'h100' else 2}T12:00:00Z",
                      command=["python", "tests/make_fixtures.py"], clocks=clocks)

    kernels: dict[tuple, KernelMeasurement] = {}
    per_point: dict[tuple[int, int], list[tuple[str, str, int, KernelMeasurement]]] = {}
    for batch in BATCHES:
        for context in CONTEXTS:
            rows = []
            for op, label, shape, count in decode_calls(cfg, batch, context):
                key = (op, tuple(sorted(shape.items())))
                if key not in kernels:
                    flops, nbytes = cost(op, shape)
                    t_roof_us = max(nbytes / (copy_gbps * 1e9), flops / (gemm_tflops * 1e12)) * 1e6
                    eff = OP_EFFICIENCY[op]
                    if gpu == "h200" and op == "decode_attention" and context == 8192:
                        eff *= 0.85  # the injected cross-generation regression the compare tests look for
                    samples = t_roof_us / eff * (1.0 + 0.003 * rng.standard_normal(15))
                    timing = timing_from_samples(list(samples))
                    timing.clocks_before = timing.clocks_after = clocks
                    timing.throttled = False
                    roof = roofline(flops, nbytes, timing.median_us, spec=spec, ceilings=ceilings, dtype="bf16")
                    power_w = 300.0 + 250.0 * eff
                    energy = KernelEnergy(total_j_per_call=power_w * timing.median_us * 1e-6,
                                          dynamic_j_per_call=(power_w - spec.idle_w) * timing.median_us * 1e-6,
                                          idle_power_w=spec.idle_w, calls=int(1.0 / (timing.median_us * 1e-6)),
                                          window_s=1.0, method="counter", temperature_c_start=50,
                                          temperature_c_end=58)
                    kernels[key] = KernelMeasurement(op=op, shape=shape, dtype="bf16", backend="triton",
                                                     device=name, timing=timing, roofline=roof, energy=energy)
                rows.append((op, label, count, kernels[key]))
            per_point[(batch, context)] = rows

    rollup = [rollup_point(gpu, "measured", b, c, rows, usd_h, kw) for (b, c), rows in per_point.items()]
    if gpu == "h100":  # other GPUs, as the roll-up would carry them: projected H200, modelled B200 (batch 1)
        rollup += [projected_point("h200", b, c, rows, scale=3000.0 / 4300.0) for (b, c), rows in per_point.items()]
        rollup += [projected_point("b200", 1, c, per_point[(1, c)], scale=3000.0 / 8000.0 * 1.25,
                                   provenance="modelled") for c in CONTEXTS]
    e2e = []
    for (b, c), rows in per_point.items():
        step_us = sum(count * k.time_us for _, _, count, k in rows)
        for mode, factor in (("graph", 1.03), ("eager", 1.12 + 0.25 / b)):
            e2e.append(e2e_point(gpu, mode, b, c, step_us * factor, rng))
    recon = [reconciliation(gpu, b, c, per_point[(b, c)], e2e, usd_h) for b, c in RECONCILED]
    return RunResult(provenance=prov, kernels=list(kernels.values()), ceilings=ceilings, model=cfg.to_dict(),
                     rollup=rollup, e2e=e2e, reconciliation=recon,
                     notes=[SYNTHETIC_NOTE], run_id=f"fixture-{gpu}-0001")


def _op_shares(rows: list[tuple[str, str, int, KernelMeasurement]], step_us: float,
               scale: float = 1.0) -> list[OpShare]:
    return [OpShare(op=op, label=label, count=count, time_us=k.time_us * scale, total_us=count * k.time_us * scale,
                    share=count * k.time_us * scale / step_us, efficiency_measured=k.roofline.efficiency_measured,
                    efficiency_datasheet=k.roofline.efficiency_datasheet, bound=k.roofline.bound,
                    shape=dict(k.shape)) for op, label, count, k in rows]


def rollup_point(gpu: str, provenance: str, batch: int, context: int, rows: list, usd_h: float, kw: float) -> dict:
    step_us = sum(count * k.time_us for _, _, count, k in rows)
    tps = batch / (step_us * 1e-6)
    j_total = sum(count * k.energy.total_j_per_call for _, _, count, k in rows) / batch
    j_dyn = sum(count * k.energy.dynamic_j_per_call for _, _, count, k in rows) / batch
    return RollupPoint(
        model=MODEL, gpu=GPUS[gpu][1], batch=batch, context=context, dtype="bf16", backend="triton",
        provenance=provenance, step_time_us=step_us, tokens_per_s_per_gpu=tps, tokens_per_s_per_user=1e6 / step_us,
        j_per_token_total=j_total, j_per_token_dynamic=j_dyn, energy_reason="NVML counter, kernel replays (synthetic)",
        usd_per_gpu_hour=usd_h, usd_per_million_tokens=usd_h / (tps * 3600 / 1e6), all_in_kw_per_gpu=kw,
        tokens_per_s_per_mw=tps * 1000.0 / kw, energy_usd_per_million_tokens=j_total * 1e6 / 3.6e6 * 0.08,
        price_source=PRICE_SOURCE, power_source=PRICE_SOURCE, ops=_op_shares(rows, step_us),
        notes=[SYNTHETIC_NOTE]).to_dict()


def projected_point(gpu: str, batch: int, context: int, rows: list, scale: float,
                    provenance: str = "projected") -> dict:
    _, spec_key, _, _, _, _, usd_h, kw = GPUS[gpu]
    step_us = sum(count * k.time_us for _, _, count, k in rows) * scale
    tps = batch / (step_us * 1e-6)
    return RollupPoint(
        model=MODEL, gpu=spec_key, batch=batch, context=context, dtype="bf16", backend="triton",
        provenance=provenance, step_time_us=step_us, tokens_per_s_per_gpu=tps, tokens_per_s_per_user=1e6 / step_us,
        energy_reason=f"{provenance} point: energy is not carried across GPUs", usd_per_gpu_hour=usd_h,
        usd_per_million_tokens=usd_h / (tps * 3600 / 1e6), all_in_kw_per_gpu=kw, tokens_per_s_per_mw=tps * 1000.0 / kw,
        price_source=PRICE_SOURCE, power_source=PRICE_SOURCE, ops=_op_shares(rows, step_us, scale),
        notes=[SYNTHETIC_NOTE]).to_dict()


def e2e_point(gpu: str, mode: str, batch: int, context: int, step_us: float, rng: np.random.Generator) -> dict:
    samples = step_us * (1.0 + 0.004 * rng.standard_normal(30))
    median = float(np.median(samples))
    return E2EMeasurement(
        model=MODEL, gpu=GPUS[gpu][1], framework="tokprof", mode=mode, backend="triton", dtype="bf16", batch=batch,
        context=context, steps=30, step_times_us=[float(v) for v in samples], median_step_us=median,
        p90_step_us=float(np.percentile(samples, 90)), tokens_per_s_per_gpu=batch / (median * 1e-6),
        tokens_per_s_per_user=1e6 / median, ttft_ms=12.0 + 0.004 * batch * context / 64,
        j_per_token=0.45 * median * 1e-6 * 1000 / batch, energy_reason="NVML counter over the decode window",
        gpu_busy_fraction=0.97 if mode == "graph" else 0.78, provenance="measured", warmup_steps=4,
        prompt_len=context - 34, context_first=context - 33, context_last=context + 16, device=GPUS[gpu][0],
        notes=[SYNTHETIC_NOTE]).to_dict()


def reconciliation(gpu: str, batch: int, context: int, rows: list, e2e: list[dict], usd_h: float) -> dict:
    steps = {
        "L0": sum(count * k.roofline.t_roof_datasheet_us for _, _, count, k in rows),
        "L1": sum(count * k.roofline.t_roof_measured_us for _, _, count, k in rows),
        "L2": sum(count * k.time_us for _, _, count, k in rows),
    }
    for mode, layer in (("graph", "L3"), ("eager", "L4")):
        steps[layer] = next(e["median_step_us"] for e in e2e
                            if e["mode"] == mode and e["batch"] == batch and e["context"] == context)
    titles = {"L0": ("datasheet roofline", "modelled", None),
              "L1": ("measured roofline", "modelled", "hardware derate"),
              "L2": ("kernel sum (bottom-up)", "measured", "kernel inefficiency"),
              "L3": ("end to end, CUDA graphs", "measured", "launch gaps and synchronisation"),
              "L4": ("end to end, eager or a framework", "measured", "host and framework overhead"),
              "L5": ("served at the stated utilisation", None, "idle capacity")}
    tps = {name: batch / (us * 1e-6) for name, us in steps.items()}
    total_gap = tps["L0"] - tps["L4"]
    layers, prev = [], None
    for name, (title, provenance, gap_name) in titles.items():
        value = tps.get(name)
        gap = prev - value if prev is not None and value is not None else None
        layers.append(Layer(name=name, title=title, tokens_per_s_per_gpu=value, step_time_us=steps.get(name),
                            usd_per_million_tokens=usd_h / (value * 3600 / 1e6) if value else None,
                            provenance=provenance, source="synthetic fixture",
                            reason=None if value is not None else "no utilisation stated: not applied",
                            gap_name=gap_name if gap is not None else None, gap_tokens_per_s=gap,
                            gap_share=gap / total_gap if gap is not None else None))
        prev = value if value is not None else prev
    gap_us = steps["L2"] - steps["L1"]
    lost = sorted((OpInefficiency(op=op, label=label, count=count, time_us_measured=count * k.time_us,
                                  time_us_at_roof=count * k.roofline.t_roof_measured_us,
                                  lost_us=count * (k.time_us - k.roofline.t_roof_measured_us),
                                  share_of_L1_L2_gap=count * (k.time_us - k.roofline.t_roof_measured_us) / gap_us)
                   for op, label, count, k in rows), key=lambda o: -o.lost_us)
    return Reconciliation(model=MODEL, gpu=GPUS[gpu][1], batch=batch, context=context, dtype="bf16",
                          utilisation=None, layers=layers, op_inefficiency=lost,
                          bottom_up_error_pct=(tps["L2"] - tps["L3"]) / tps["L3"] * 100.0,
                          bottom_up_error_against="L3", notes=[SYNTHETIC_NOTE]).to_dict()


def main() -> int:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for gpu, seed in (("h100", 100), ("h200", 200)):
        path = save_run(build_run(gpu, seed), DATA_DIR / f"run_{gpu}.json")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
