"""`tokprof bench`, `ceilings`, `specs`, `energy-trace`: the kernel harness and its collectives (issues 3, 8)."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from tokprof.commands._app import (
    app,
    bench_device,
    check_device_index,
    check_one_format,
    check_output,
    console,
    err_console,
    fail,
    interrupted,
    pct,
    print_csv,
    print_wide,
    split_csv,
)
from tokprof.reports.document import num, num_bytes

MAX_SECONDS = 3600.0  # the longest sampling or energy window one call may ask for (1e308 would never return)


@app.command()
def bench(
    op: str = typer.Option(..., "--op", help="Op(s) to measure, comma-separated (see `tokprof kernels`)."),
    backend: str | None = typer.Option(None, "--backend", help="Backend(s), comma-separated: torch, triton, cuda "
                                       "(default: every backend that runs on the device)."),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, fp16 or bf16, or a weight format for --op linear "
                                     "(fp8, fp8-block, mxfp4, nvfp4, int4), comma-separated for several "
                                     "(default bf16 on a GPU, fp32 on the CPU)."),
    kv_dtype: str | None = typer.Option(None, "--kv-dtype", help="fp8: decode_attention and append_kv on an fp8 "
                                        "(e4m3) KV cache."),
    shape: list[str] | None = typer.Option(  # noqa: B008 - typer reads options from defaults
        None, "--shape", help="k=v,... over the op's default shape, e.g. T=16,I=14336; repeat --shape for a sweep."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda[:N] (default cuda when a GPU is visible)."),
    mode: str = typer.Option("events", "--mode", help="events (CUDA events, cold L2) or graph (CUDA-graph replays "
                             "over rotating inputs); the CPU always times with perf_counter."),
    energy: bool = typer.Option(False, "--energy", help="Also measure joules per call (NVML energy counter)."),
    energy_window_s: float = typer.Option(1.0, "--energy-window-s", help="Replay window per energy figure, s."),
    timeout_s: float = typer.Option(5.0, "--timeout-s", help="Longest sampling time per call, s (stops earlier "
                                    "at 0.5% noise)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs."),
    passes: int = typer.Option(3, "--passes", min=1, help="CPU: sweep this many times, each pass with 1/passes of "
                               "--timeout-s, and merge each call's passes (a CPU's speed drifts for seconds)."),
    with_ceilings: bool = typer.Option(True, "--ceilings/--no-ceilings", help="Measure (or read cached) copy and "
                                       "GEMM ceilings for the measured roofline."),
    output: str | None = typer.Option(None, "-o", "--output", help="RunResult file to write (default "
                                      "tokprof-bench-<run id>.json)."),
    world_size: int | None = typer.Option(None, "--world-size", help="Ranks of a collective (--op all_reduce,"
                                          "all_gather,all_to_all; --shape bytes=N): default every GPU here, 2 on the "
                                          "CPU."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of the table."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the table as CSV instead (one row per call)."),
) -> None:
    """Time kernels (and energy), place them on the roofline, and save a RunResult after every call."""
    from tokprof.profiler import bench as bench_mod
    from tokprof.profiler.ceilings import measure_ceilings
    from tokprof.profiler.collectives import COLLECTIVES
    from tokprof.profiler.devices import spec_for

    check_output("--output", output)  # up front: a bad path would lose the measurements
    check_one_format(as_json, as_csv)
    if world_size is not None or any(o in COLLECTIVES for o in split_csv(op)):
        _bench_collectives(split_csv(op), dtype, shape or [], device, world_size, timeout_s, seed, output)
        return
    dev = bench_device(device)
    if mode not in bench_mod.MODES:
        fail(f"--mode: expected one of {list(bench_mod.MODES)}, got {mode!r}")
    if not 0 < timeout_s <= MAX_SECONDS:
        fail(f"--timeout-s: expected a positive number of seconds up to {MAX_SECONDS:.0f}, got {timeout_s}")
    if energy and not 0 < energy_window_s <= MAX_SECONDS:
        fail(f"--energy-window-s: expected a positive number of seconds up to {MAX_SECONDS:.0f}, got "
             f"{energy_window_s}")
    ops, shape = split_csv(op), shape or []
    try:
        # Default backends: every one that runs at least one of the ops here (the others are reported as skipped).
        usable = {b for o in ops for b, why in bench_mod.get_op(o).available_backends(dev).items() if why is None}
        backends = split_csv(backend) or [b for b in ("torch", "triton", "cuda") if b in usable]
        dtypes = split_csv(dtype) or (["bf16"] if dev.type == "cuda" else ["fp32"])
        shapes = [bench_mod.parse_shape(s) for s in shape]
        calls, skipped = _bench_plan(ops, backends, dtypes, kv_dtype, shapes, dev)
    except ValueError as err:
        fail(str(err))
    for line in skipped:
        err_console.print(f"[yellow]skipped[/] {line}")

    run = bench_mod.new_run(["tokprof", "bench", "--op", ",".join(ops), "--backend", ",".join(backends), "--dtype",
                             ",".join(dtypes), *(["--kv-dtype", kv_dtype] if kv_dtype else []),
                             *[a for s in shape for a in ("--shape", s)], "--device", str(dev),
                             "--mode", mode, "--timeout-s", str(timeout_s), "--seed", str(seed),
                             *(["--energy", "--energy-window-s", str(energy_window_s)] if energy else []),
                             *([] if with_ceilings else ["--no-ceilings"]), *(["-o", output] if output else [])], dev)
    path = output or f"tokprof-bench-{run.run_id}.json"
    if with_ceilings:
        err_console.print(f"ceilings on {run.provenance.device.name} (cached per device) ...")
        run.ceilings = measure_ceilings(dev)
    from tokprof.profiler.cpu_load import CpuLoad, load_record
    from tokprof.profiler.schema import save_run

    meter = CpuLoad.start()
    try:
        kernels_done, failures = bench_mod.bench_calls(
            calls, dev, mode=mode, energy=energy, seed=seed, timing_kwargs=_timing(timeout_s),
            energy_kwargs={"window_s": energy_window_s}, spec=spec_for(run.provenance.device),
            ceilings=run.ceilings, out=path, run=run, cpu_passes=passes)
    except KeyboardInterrupt:
        interrupted(f"{len(run.kernels)} measurement(s) saved to {path}")
    if dev.type == "cpu":  # how shared the CPU was: `tokprof compare` will not call a change on a shared CPU SLOW
        load = meter.stop()
        run.cpu_load = load_record(load, {})
        run.notes.append(load.note())
        save_run(run, path)
        if load.contended:
            err_console.print(f"[yellow]warning:[/] {load.note()}")

    if as_json or as_csv:
        rows = [_bench_row(m) for m in kernels_done]
        for f in failures:
            err_console.print(f"[red]failed[/] {escape(f'{f.op} {f.shape} {f.dtype} {f.backend}: {f.error}')}")
        if as_json:
            print(json.dumps({"command": "bench", "output": path, "kernels": rows,
                              "failures": [{"op": f.op, "shape": f.shape, "dtype": f.dtype, "backend": f.backend,
                                            "error": f.error} for f in failures]}))
        else:
            print_csv(rows)
        if failures and not kernels_done:
            raise typer.Exit(1)
        return
    how = f"mode {mode}" if dev.type == "cuda" else "perf_counter timing"
    table = Table(title=f"tokprof bench on {run.provenance.device.name} ({dev}, {how})")
    for col in ("call", "median us", "p10-p90 us", "noise", "GB/s", "TFLOP/s", "% roof meas.", "% roof sheet",
                "J/call", "bound"):
        table.add_column(col, justify="left" if col in ("call", "bound") else "right")
    reasons: list[str] = []
    for m in kernels_done:
        t, r = m.timing, m.roofline
        noise = f"{t.noise:.1%}" + ("" if t.met_noise_target else "\n[yellow]missed[/]")
        if m.energy is not None:
            joules = f"{num(m.energy.total_j_per_call)}\n[dim]{num(m.energy.dynamic_j_per_call)} dyn.[/]"
        else:
            joules = "-"
            if m.energy_reason and m.energy_reason not in reasons:
                reasons.append(m.energy_reason)
        median = num(t.median_us) + (f"\n[dim]graph {num(m.graph_timing.median_us)}[/]" if m.graph_timing else "")
        meas = pct(r.efficiency_measured) + ("\n[red]suspicious[/]" if r.suspicious else "")
        call = f"{m.op} {m.backend} {m.dtype}\n[dim]{','.join(f'{k}={v}' for k, v in m.shape.items())}[/]"
        table.add_row(call, median, f"{num(t.p10_us)}-{num(t.p90_us)}", noise, num(r.achieved_gbps),
                      num(r.achieved_tflops), meas, pct(r.efficiency_datasheet), joules, r.bound or "-")
    print_wide(table)
    for why in reasons:
        console.print(f"[dim]energy: {why}[/]")
    for f in failures:
        err_console.print(f"[red]failed[/] {f.op} {f.shape} {f.dtype} {f.backend}: {f.error}")
    console.print(f"wrote {escape(str(path))} ({len(kernels_done)} measured, {len(failures)} failed)")
    if failures and not kernels_done:
        raise typer.Exit(1)  # nothing measured is no success


def _bench_row(m: object) -> dict[str, object]:
    """One measured call as a flat record (--json, --csv): units in the names, None for an unknown."""
    t, r, e = m.timing, m.roofline, m.energy  # type: ignore[attr-defined]
    return {"op": m.op, "backend": m.backend, "dtype": m.dtype,  # type: ignore[attr-defined]
            "shape": ",".join(f"{k}={v}" for k, v in m.shape.items()),  # type: ignore[attr-defined]
            "median_us": t.median_us, "p10_us": t.p10_us, "p90_us": t.p90_us, "noise": t.noise,
            "met_noise_target": t.met_noise_target, "n_samples": t.samples_taken, "achieved_gbps": r.achieved_gbps,
            "achieved_tflops": r.achieved_tflops, "efficiency_measured": r.efficiency_measured,
            "efficiency_datasheet": r.efficiency_datasheet, "bound": r.bound, "suspicious": r.suspicious,
            "j_per_call": e.total_j_per_call if e else None, "dynamic_j_per_call": e.dynamic_j_per_call if e else None,
            "graph_median_us": m.graph_timing.median_us if m.graph_timing else None}  # type: ignore[attr-defined]


def _timing(timeout_s: float) -> dict[str, float]:
    """Timing budget per call; the harness's 0.1 s minimum sampling time would exceed a smaller budget."""
    return {"max_time_s": timeout_s, "min_time_s": min(0.1, timeout_s)}


@app.command()
def ceilings(
    device: str | None = typer.Option(None, "--device", help="cpu or cuda[:N] (default cuda when a GPU is visible)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Measure again instead of reading the cached figures."),
    copy_mib: int | None = typer.Option(None, "--copy-mib", help="Copy buffer in MiB (default 1024 on a GPU, 256 "
                                        "on the CPU)."),
    gemm_n: int | None = typer.Option(None, "--gemm-n", help="GEMM size n of n^3 (default 8192 on a GPU, 1024 on "
                                      "the CPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Measure this device's copy bandwidth and GEMM FLOP/s (the measured roofline), cached per GPU and driver."""
    from tokprof.profiler.ceilings import measure_ceilings
    from tokprof.profiler.devices import detect_device, spec_for
    from tokprof.profiler.schema import to_dict

    dev = bench_device(device)
    for name, value in (("--copy-mib", copy_mib), ("--gemm-n", gemm_n)):
        if value is not None and value <= 0:
            fail(f"{name}: expected a positive int, got {value}")
    from tokprof.runner import available_memory_bytes

    memory, has = available_memory_bytes(dev)
    # The copy holds a source and a destination buffer; the GEMM three n x n matrices of up to 4 bytes.
    for name, need in (("--copy-mib", 2 * (copy_mib or 0) << 20), ("--gemm-n", 3 * 4 * (gemm_n or 0) ** 2)):
        if memory is not None and need > memory:
            fail(f"{name}: needs about {need / 1e9:.1f} GB, {has} {memory / 1e9:.1f} GB")
    try:
        c = measure_ceilings(dev, cache=not no_cache, copy_buffer_bytes=copy_mib << 20 if copy_mib else None,
                             gemm_n=gemm_n)
    except (RuntimeError, MemoryError) as err:  # out of memory all the same (the machine's other tenants)
        fail(f"ceilings could not be measured on {dev}: {type(err).__name__}: {err}")
    spec = spec_for(detect_device(dev))
    sheet_gbps = spec.hbm_tbps * 1e3 if spec and spec.hbm_tbps else None
    sheet_tflops = spec.peak_tflops(c.gemm_dtype) if spec else None
    if as_json:
        print(json.dumps({"ceilings": to_dict(c), "datasheet": {"key": spec.key if spec else None,
                                                                "hbm_gbps": sheet_gbps, "tflops": sheet_tflops}}))
        return
    table = Table(title=f"measured ceilings of {c.device} ({dev})")
    for col in ("ceiling", "measured", "datasheet", "measured / datasheet"):
        table.add_column(col)
    table.add_row(f"copy ({num_bytes(c.copy_bytes)} read + written)", f"{num(c.copy_gbps)} GB/s",
                  f"{num(sheet_gbps)} GB/s" if sheet_gbps else "-",
                  pct(c.copy_gbps / sheet_gbps) if sheet_gbps else "-")
    if c.read_gbps is not None:
        table.add_row("read-only (amax over the buffer)", f"{num(c.read_gbps)} GB/s",
                      f"{num(sheet_gbps)} GB/s" if sheet_gbps else "-",
                      pct(c.read_gbps / sheet_gbps) if sheet_gbps else "-")
    table.add_row(f"GEMM {c.gemm_dtype} {'x'.join(map(str, c.gemm_shape))}", f"{num(c.gemm_tflops)} TFLOP/s",
                  f"{num(sheet_tflops)} TFLOP/s" if sheet_tflops else "-",
                  pct(c.gemm_tflops / sheet_tflops) if sheet_tflops else "-")
    console.print(table)
    console.print(f"[dim]measured {c.measured_utc}; {c.note}[/]")


@app.command()
def specs(as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table.")) -> None:
    """The GPU spec table (datasheet peaks, dense) with each row's source and date."""
    import dataclasses

    from tokprof.profiler.devices import SPECS_PATH, load_specs

    rows = load_specs()
    if as_json:
        print(json.dumps({"path": str(SPECS_PATH), "gpus": [dataclasses.asdict(s) for s in rows.values()]}))
        return
    table = Table(title=f"GPU datasheet peaks, dense ({SPECS_PATH.name}; '-' = unknown)", show_lines=True)
    for col in ("key", "HBM TB/s", "bf16 TF", "fp8 TF", "fp32 TF", "TDP W", "idle W", "mem GB", "L2 MB",
                "source, date"):
        table.add_column(col, no_wrap=col == "key", justify="left" if col in ("key", "source, date") else "right")

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:g}"

    for s in rows.values():
        source = f"{s.name}: {s.source} ({s.date})" + (f"\n[dim]{s.note}[/]" if s.note else "")
        table.add_row(s.key, num(s.hbm_tbps), num(s.bf16_tflops), num(s.fp8_tflops),
                      num(s.fp32_tflops), num(s.tdp_w), num(s.idle_w), num(s.memory_gb), num(s.l2_mb), source)
    print_wide(table)




@app.command("energy-trace")
def energy_trace(
    out: str = typer.Option(..., "-o", "--out", help="Trace file to write (JSON, read by ReplaySource)."),
    device: str = typer.Option("cuda", help="CUDA device whose NVML counters are recorded."),
    idle_s: float = typer.Option(2.0, help="Seconds idle before the load."),
    busy_s: float = typer.Option(3.0, help="Seconds of back-to-back bf16 GEMMs (8192^3, random data)."),
    settle_s: float = typer.Option(3.0, help="Seconds idle after the load (the GPU cools and settles)."),
) -> None:
    """Record the NVML energy counter, power and temperature through idle -> GEMM load -> idle, as a replay trace."""
    import math
    import time

    import torch

    from tokprof.profiler import energy, nvml
    from tokprof.profiler.timing import sync

    if not 0 < busy_s < math.inf:
        fail(f"--busy-s: expected a positive number of seconds, got {busy_s}")
    for name, value in (("--idle-s", idle_s), ("--settle-s", settle_s)):
        if not 0 <= value < math.inf:
            fail(f"{name}: expected a non-negative number of seconds, got {value}")
    check_output("--out", out)  # up front: the trace is recorded for seconds before it is written
    check_device_index(device)
    reason = energy.energy_status(device)
    if reason is not None:
        fail(f"--device {device}: no NVML energy here: {reason}")
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

    readings = energy.record_trace(source, idle_s + busy_s + settle_s, workload=load)
    t0 = readings[0].timestamp_s
    readings = [energy.Reading(r.timestamp_s - t0, r.energy_mj, r.power_mw, r.temperature_c) for r in readings]
    meta = {"synthetic": False, "provenance": "recorded on hardware with `tokprof energy-trace`",
            "gpu": torch.cuda.get_device_name(torch.device(device)), "uuid": nvml.device_uuid(device),
            "recorded_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "phases_s": {"idle": [0.0, idle_s], "busy": [idle_s, idle_s + busy_s],
                         "settling": [idle_s + busy_s, idle_s + busy_s + settle_s]},
            "workload": "bf16 GEMM 8192x8192x8192 on random data, back to back"}
    path = energy.save_trace(readings, out, meta)
    console.print(f"{len(readings)} readings over {readings[-1].timestamp_s:.2f} s written to {path}")
    print(json.dumps({"command": "energy-trace", "out": str(path), "readings": len(readings)}))




def _bench_plan(ops: list[str], backends: list[str], dtypes: list[str], kv_dtype: str | None,
                shapes: list[dict[str, int]], dev: Any) -> tuple[list[Any], list[str]]:
    """The calls of a bench: each --dtype a precision label; a weight format turns --op linear into the format's
    op (linear_int4, ...) at the activation dtype (bf16 on a GPU, fp32 on the CPU), --kv-dtype fp8 turns
    decode_attention / append_kv into their fp8-cache ops. ValueError for a combination this device cannot run."""
    from tokprof.profiler import bench as bench_mod
    from tokprof.quant.precision import check_supported, op_for, parse_precision

    calls: list[Any] = []
    skipped: list[str] = []
    for label in dtypes:
        precision = parse_precision(label, kv_dtype=kv_dtype)
        if precision.weight_format is not None and "+act-" not in label:
            precision = parse_precision(precision, activation="bf16" if dev.type == "cuda" else "fp32")
        if precision.weight_format is not None and "linear" not in ops:
            raise ValueError(f"--dtype: {label} is a weight format for --op linear (the other ops run in the "
                             f"activation dtype), got --op {','.join(ops)}")
        for backend in backends:
            check_supported(precision, device=dev, backend=backend)
        mapped = list(dict.fromkeys(op_for(o, precision) for o in ops))
        more, why = bench_mod.plan_calls(mapped, backends, [precision.activation], shapes, dev)
        calls += [c for c in more if c not in calls]
        skipped += why
    return calls, list(dict.fromkeys(skipped))


def _bench_collectives(ops: list[str], dtype: str | None, shapes: list[str], device: str | None,
                       world_size: int | None, timeout_s: float, seed: int, output: str | None) -> None:
    """`tokprof bench --op all_reduce,all_gather [--world-size N] [--shape bytes=N]`: ranks spawned on this host
    (NCCL on GPUs, gloo on the CPU), or torchrun's ranks when launched by torchrun; one RunResult from rank 0."""
    import os

    import torch

    from tokprof.profiler import collectives as coll
    from tokprof.profiler.bench import new_run
    from tokprof.profiler.schema import save_run

    others = [o for o in ops if o not in coll.COLLECTIVES]
    if others or not ops:
        fail(f"--op: collectives ({', '.join(coll.COLLECTIVES)}) are measured on their own (with --world-size), "
             f"not mixed with kernel ops; got {','.join(ops) or 'none'}")
    if not 0 < timeout_s <= MAX_SECONDS:
        fail(f"--timeout-s: expected a positive number of seconds up to {MAX_SECONDS:.0f}, got {timeout_s}")
    dtypes = split_csv(dtype)
    if len(dtypes) > 1:
        fail(f"--dtype: one dtype per collective benchmark, got {dtype!r}")
    sizes: list[int] = []
    for text in shapes:
        key, sep, value = text.partition("=")
        if key.strip() != "bytes" or not sep:
            fail(f"--shape: a collective takes bytes=N such as bytes=64k (the ranks are --world-size), got {text!r}")
        try:
            sizes.extend(coll.parse_bytes(value))
        except ValueError as err:
            fail(f"--shape {text!r}: {err}")
    timing = _timing(timeout_s)
    try:
        if coll.under_torchrun():
            launched = int(os.environ["WORLD_SIZE"])
            if world_size is not None and world_size != launched:
                fail(f"--world-size {world_size}: torchrun launched {launched} ranks")
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            calls = [(o, b) for o in ops for b in sizes or coll.DEFAULT_SIZES[dev.type]]
            rank, records = coll.bench_collectives_torchrun(calls, dtype=dtypes[0] if dtypes else None,
                                                            timing_kwargs=timing, seed=seed)
            if rank != 0:
                return
            world = launched
        else:
            dev = bench_device(device)
            world = world_size if world_size is not None else (torch.cuda.device_count() if dev.type == "cuda"
                                                               else 2)
            if world < 2:
                fail(f"--world-size: a collective needs at least 2 ranks, got {world}"
                     + (" (GPUs visible here); plans use modelled collectives from the spec table's interconnect "
                        "instead" if world_size is None else ""))
            calls = [(o, b) for o in ops for b in sizes or coll.DEFAULT_SIZES[dev.type]]
            records = coll.bench_collectives(calls, world_size=world, device=dev.type,
                                             dtype=dtypes[0] if dtypes else None, timing_kwargs=timing, seed=seed)
    except typer.Exit:  # a RuntimeError subclass: fail() above, not a failed benchmark
        raise
    except (ValueError, RuntimeError) as err:
        fail(str(err))
    command = ["tokprof", "bench", "--op", ",".join(ops), "--world-size", str(world), "--device", str(dev),
               *[a for s in shapes for a in ("--shape", s)], *(["--dtype", dtypes[0]] if dtypes else []),
               "--timeout-s", str(timeout_s), "--seed", str(seed)]
    run = new_run(command, dev)
    run.kernels.extend(records)
    run.notes.append(f"collectives over {world} ranks ({records[0].backend}); bandwidths with the nccl-tests "
                     "definitions (busbw = algbw x 2(n-1)/n for all_reduce, x (n-1)/n for all_gather and all_to_all)")
    path = save_run(run, output or f"tokprof-bench-{run.run_id}.json")
    table = Table(title=f"tokprof bench: collectives on {run.provenance.device.name}, {world} ranks "
                        f"({records[0].backend})")
    for col in ("op", "bytes", "dtype", "median us", "p10-p90 us", "noise", "algbw GB/s", "busbw GB/s", "% link"):
        table.add_column(col, justify="left" if col in ("op", "dtype") else "right")
    for m in records:
        t, r = m.timing, m.roofline
        nbytes = m.shape["bytes"]
        table.add_row(m.op, num(nbytes), m.dtype, num(t.median_us), f"{num(t.p10_us)}-{num(t.p90_us)}",
                      f"{t.noise:.1%}" + ("" if t.met_noise_target else " [yellow]missed[/]"),
                      num(coll.algbw_gbps(nbytes, t.median_us)), num(r.achieved_gbps),
                      pct(r.efficiency_datasheet))
    print_wide(table)
    if records[0].roofline.t_roof_datasheet_us is None:
        console.print("[dim]% link: no interconnect figure for this device (a CPU, or a GPU missing from the spec "
                      "table)[/]")
    console.print(f"wrote {escape(str(path))} ({len(records)} measured)")
