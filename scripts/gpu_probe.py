"""First-contact probes for a lent GPU, one JSON file each, for scripts/gpu_check.sh (also runnable alone).

    python scripts/gpu_probe.py props --out props.json          # device properties + what the kernel configs use
    python scripts/gpu_probe.py timing-ab --out timing_ab.json  # ~9 decode calls timed five ways
    python scripts/gpu_probe.py nvml --out nvml.json            # a 3 s NVML trace: counter interval, counter vs power
    python scripts/gpu_probe.py run --out-dir run               # a reduced `tokprof run`, time-logged per phase

`--device cpu` runs each probe's logic on the CPU with tiny shapes (what gpu_check.sh's DRY=1 does, and what the
CPU test of the script runs), so that a typo cannot waste the GPU call. Every probe writes its file atomically
and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Representative Llama-3.1-8B decode calls (bf16 on a GPU): short latency-bound calls, a GEMV, a skinny GEMM, and
# decode attention short and long. On the CPU (dry mode): the same ops at tiny shapes, fp32, torch backend.
GPU_CALLS = [
    ("rms_norm", {"T": 1, "H": 4096, "residual": 1}),
    ("rope", {"T": 1, "Hq": 32, "Hkv": 8, "D": 128}),
    ("append_kv", {"T": 32, "Hkv": 8, "D": 128, "block_size": 16, "num_blocks": 2048}),
    ("swiglu", {"T": 32, "I": 14336}),
    ("linear", {"M": 1, "N": 6144, "K": 4096}),
    ("linear", {"M": 32, "N": 28672, "K": 4096}),
    ("decode_attention", {"B": 1, "Hq": 32, "Hkv": 8, "D": 128, "context": 1024, "block_size": 16}),
    ("decode_attention", {"B": 32, "Hq": 32, "Hkv": 8, "D": 128, "context": 8192, "block_size": 16}),
    ("greedy_sample", {"B": 32, "V": 128256}),
]
CPU_CALLS = [
    ("rms_norm", {"T": 1, "H": 64, "residual": 1}),
    ("linear", {"M": 2, "N": 64, "K": 64}),
    ("decode_attention", {"B": 1, "Hq": 4, "Hkv": 2, "D": 16, "context": 32, "block_size": 16}),
]
# The timing methods compared (events variants apply on a GPU only; graph mode only on a GPU).
METHODS = {
    "events_write_flush_host_inside": {"mode": "events", "flush": "write", "host_behind": False},  # the old way
    "events_write_flush": {"mode": "events", "flush": "write", "host_behind": True},
    "events_read_flush": {"mode": "events", "flush": "read", "host_behind": True},  # the default now
    "graph": {"mode": "graph"},
}


def _write(out: Path, doc: dict[str, Any]) -> None:
    from tokprof.profiler.schema import save_json_atomic

    save_json_atomic(doc, out)
    print(json.dumps({"probe": doc.get("probe"), "out": str(out)}))


def props(device: torch.device, out: Path) -> None:
    """torch's device properties (every field), NVML clocks, and the decode-attention configs they imply."""
    doc: dict[str, Any] = {"probe": "props", "device": str(device), "torch": torch.__version__}
    try:
        import triton

        doc["triton"] = triton.__version__
    except ImportError:
        doc["triton"] = None
    if device.type == "cuda":
        from tokprof.kernels import decode_attention as da
        from tokprof.profiler import nvml

        p = torch.cuda.get_device_properties(device)
        doc["properties"] = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                             for k in dir(p) if not k.startswith("_") for v in [getattr(p, k)] if not callable(v)}
        doc["decode_attention_configs"] = da.config_properties(device)
        clocks = nvml.clocks(device)
        doc["clocks"] = None if clocks is None else clocks.__dict__
        doc["clock_reasons"] = nvml.clock_reasons(device)
        doc["nvml_status"] = nvml.nvml_status()
    else:
        doc["properties"] = {"cpu_threads": torch.get_num_threads()}
    _write(out, doc)


def timing_ab(device: torch.device, out: Path, max_time_s: float) -> None:
    """Each call timed by every method of METHODS, with its host us per call and the roofline time: which method
    a figure should come from, decided on the GPU instead of assumed."""
    from tokprof.kernels import OPS
    from tokprof.kernels._common import skip_value_checks
    from tokprof.profiler import timing
    from tokprof.profiler.devices import detect_device, spec_for
    from tokprof.rollup.project import roof_time_us

    on_gpu = device.type == "cuda"
    calls, dtype, backend = (GPU_CALLS, torch.bfloat16, "triton") if on_gpu else (CPU_CALLS, torch.float32, "torch")
    spec = spec_for(detect_device(device)) if on_gpu else None
    rows: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"probe": "timing-ab", "device": str(device), "backend": backend, "rows": rows}
    for op, shape in calls:
        rec = OPS[op]
        full = rec.full_shape(shape)
        inputs = rec.make_inputs(full, dtype, device, 0)
        rec.run(inputs, backend)  # compile, with every argument check

        def call(kw: dict[str, Any], rec: Any = rec) -> Any:
            with skip_value_checks():
                return rec.run(kw, backend)

        flops, min_bytes = rec.cost(full, dtype)
        row: dict[str, Any] = {"op": op, "shape": full, "flops": flops, "min_bytes": min_bytes, "methods": {}}
        if spec is not None:
            row["roof_us"] = roof_time_us(flops, min_bytes, spec, "bf16")[0]
        row["host_us_per_call"] = timing.host_time_us(call, inputs, device)
        for name, method in METHODS.items():
            if not on_gpu and name != "events_read_flush":
                continue  # on the CPU every mode is perf_counter: one is enough to exercise the code
            t0 = time.perf_counter()
            try:
                kw = dict(method)
                mode = kw.pop("mode")
                if mode == "graph":
                    kw["bytes_touched"] = int(min_bytes)
                t = timing.measure(call, inputs, device=device, mode=mode, max_time_s=max_time_s, **kw)
                row["methods"][name] = {"median_us": t.median_us, "p10_us": t.p10_us, "p90_us": t.p90_us,
                                        "noise": t.noise, "samples": len(t.samples_us), "cold_l2": t.cold_l2,
                                        "throttled": t.throttled, "clock_reasons": t.clock_reasons,
                                        "note": t.note, "wall_s": round(time.perf_counter() - t0, 3)}
            except (RuntimeError, ValueError) as err:  # one method failing must not lose the others
                row["methods"][name] = {"error": f"{type(err).__name__}: {err}"[:400]}
        rows.append(row)
        _write(out, doc)  # after every call: a probe stopped at its time limit keeps what it measured
        del inputs
    _write(out, doc)


def nvml_probe(device: torch.device, out: Path, trace_out: Path) -> None:
    """A 3 s NVML trace through idle -> GEMM load -> idle and what it says (energy_sources.trace_summary)."""
    doc: dict[str, Any] = {"probe": "nvml", "device": str(device)}
    from tokprof.profiler import energy

    reason = energy.energy_status(device)
    if reason is not None:
        doc["reason"] = reason
        _write(out, doc)
        return
    from tokprof.profiler.energy_sources import record_trace, save_trace, trace_summary
    from tokprof.profiler.timing import sync

    idle_s, busy_s, settle_s = 1.0, 1.0, 1.0
    source = energy.make_source("nvml", device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))

    def load() -> None:
        time.sleep(idle_s)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < busy_s:
            for _ in range(10):
                a @ b
            sync(device)

    readings = record_trace(source, idle_s + busy_s + settle_s, workload=load)
    t0 = readings[0].timestamp_s
    readings = [energy.Reading(r.timestamp_s - t0, r.energy_mj, r.power_mw, r.temperature_c) for r in readings]
    phases = {"idle_before": (0.0, idle_s), "busy": (idle_s + 0.2, idle_s + busy_s),
              "idle_after": (idle_s + busy_s + 0.5, idle_s + busy_s + settle_s)}
    save_trace(readings, trace_out, {"synthetic": False, "provenance": "recorded on hardware by gpu_probe.py nvml",
                                     "phases_s": {k: list(v) for k, v in phases.items()}})
    doc["summary"] = trace_summary(readings, phases)
    doc["trace"] = str(trace_out)
    _write(out, doc)


def first_contact_run(device: torch.device, out_dir: Path) -> None:
    """A reduced `tokprof run`: Llama-3.1-8B at batch {1, 32} x context {1k, 8k}, energy on, one e2e framework;
    the tiny preset on the CPU. Time-logged per phase (the run's summary has phase_seconds)."""
    import dataclasses

    from tokprof.runner import RunConfig, run_main

    rc = RunConfig.for_device(device)
    if device.type == "cuda":
        rc = dataclasses.replace(rc, batches=[1, 32], contexts=[1024, 8192], e2e_batches=[1, 32],
                                 e2e_contexts=[1024, 8192], frameworks=["tokprof"], framework_points=None,
                                 e2e_steps=16)
    else:
        rc = dataclasses.replace(rc, batches=[1], contexts=[64], e2e_batches=[1], e2e_contexts=[64],
                                 frameworks=["tokprof"], e2e_steps=4,
                                 timing_kwargs={"min_time_s": 0.01, "max_time_s": 0.05})
    run_main(out_dir=out_dir, device=str(device), config_override=rc, report=device.type == "cuda",
             history_db=out_dir / "history.db", command=["scripts/gpu_probe.py", "run", "--device", str(device)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["props", "timing-ab", "nvml", "run"])
    parser.add_argument("--device", default="cuda", help="cuda[:N], or cpu for a dry run of the probe's logic")
    parser.add_argument("--out", default=None, help="JSON file to write (props, timing-ab, nvml)")
    parser.add_argument("--out-dir", default="first-contact", help="folder of the reduced run (run)")
    parser.add_argument("--timeout-s", type=float, default=0.3,
                        help="timing-ab: the stop rule's time budget per method, s (tokprof's one budget flag name)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device: torch sees no GPU here (device {args.device!r}); use --device cpu for a dry run",
              file=sys.stderr)
        return 2
    if not args.timeout_s > 0:
        print(f"--timeout-s: expected a positive number of seconds, got {args.timeout_s}", file=sys.stderr)
        return 2
    if args.probe != "run" and not args.out:
        print(f"--out: the {args.probe} probe needs a JSON file to write", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    if args.probe == "props":
        props(device, out)
    elif args.probe == "timing-ab":
        timing_ab(device, out, args.timeout_s)
    elif args.probe == "nvml":
        nvml_probe(device, out, out.with_name(out.stem + "-trace.json"))
    else:
        first_contact_run(device, Path(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
