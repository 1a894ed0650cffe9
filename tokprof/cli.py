"""The `tokprof` command line.

    tokprof kernels                 # ops, backends available here (and why others are not), cost formulas

Each command is a thin layer over the library: parse, call, print (rich tables), write files atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="tokprof: GPU kernel-level throughput profiler, from kernels to cost per million tokens.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """tokprof: GPU kernel-level throughput profiler, from kernels to cost per million tokens."""


def fail(message: str, code: int = 2) -> None:
    """Print a clear error (no traceback) and exit with `code`."""
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def split_csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def parse_int_list(name: str, value: str) -> list[int]:
    try:
        out = [int(v.lower().replace("k", "")) * (1024 if v.lower().endswith("k") else 1) for v in split_csv(value)]
    except ValueError:
        fail(f"{name}: expected comma-separated positive ints such as 1,8,64 (or 1k,8k), got {value!r}")
    if not out or any(v <= 0 for v in out):
        fail(f"{name}: expected comma-separated positive ints such as 1,8,64 (or 1k,8k), got {value!r}")
    return out


@app.command()
def kernels(
    device: str = typer.Option("cpu", help="Device to check backends on: cpu or cuda[:N]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """List the ops, which backends run on this machine (and why the others do not), and their cost formulas."""
    import torch

    from tokprof.kernels import OPS

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        fail(f"--device: expected cpu or cuda[:N], got {device!r} ({err})")
    rows = {name: {"backends": op.available_backends(dev), "cost_formula": op.cost_formula,
                   "shape": op.shape_doc, "default_shape": dict(op.default_shape), "description": op.description}
            for name, op in OPS.items()}
    if as_json:
        print(json.dumps({"device": str(dev), "ops": rows}))
        return
    table = Table(title=f"tokprof kernels on {dev}", show_lines=True)
    table.add_column("op", style="bold")
    table.add_column("what")
    table.add_column("backends here")
    table.add_column("cost (flops; min bytes)")
    for name, row in rows.items():
        lines = [f"[green]{b}[/]" if why is None else f"[red]{b}[/]: {why}" for b, why in row["backends"].items()]
        table.add_row(name, f"{row['description']}\n[dim]{row['shape']}[/]", "\n".join(lines), row["cost_formula"])
    console.print(table)


# ------------------------------------------------------------------------------------ the main job (issue 7)


@app.command()
def run(
    model: str = typer.Option(None, help="Model preset (default: llama-3.1-8b on a GPU, tiny on the CPU)."),
    out: str = typer.Option("tokprof-out", "--out", "-o", help="Folder for the RunResult, report and plots."),
    device: str = typer.Option("auto", help="auto (a GPU when torch sees one), cpu or cuda[:N]."),
    db: str = typer.Option(None, help="History database (default: TOKPROF_HISTORY_DB or the user's data dir)."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the report (RunResult and history only)."),
) -> None:
    """The whole chain: ceilings, kernel benchmarks of the decode plan, roll-up, end to end, reconciliation, report."""
    from tokprof.runner import run_main

    try:
        run_main(model=model, out_dir=out, device=device, console=console, history_db=db, report=not no_report)
    except ValueError as err:
        fail(str(err))


# ---------------------------------------------------------------------- bench, ceilings and specs (issue 3)


def _bench_device(device: str | None) -> object:
    """--device as a torch.device (default: cuda when a GPU is visible, else cpu); exit 2 when it cannot work."""
    import torch

    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        fail(f"--device: expected cpu or cuda[:N], got {name!r} ({err})")
    if dev.type not in ("cpu", "cuda"):
        fail(f"--device: expected cpu or cuda[:N], got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu")
    return dev


def _print_wide(table: Table) -> None:
    """Print a wide table whole: a terminal wraps it to its width, a pipe or a file gets 160 columns, not 80."""
    (console if console.is_terminal else Console(width=160)).print(table)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


@app.command()
def bench(
    op: str = typer.Option(..., "--op", help="Op(s) to measure, comma-separated (see `tokprof kernels`)."),
    backend: str | None = typer.Option(None, "--backend", help="Backend(s), comma-separated: torch, triton, cuda "
                                       "(default: every backend that runs on the device)."),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, fp16 or bf16, comma-separated for several "
                                     "(default bf16 on a GPU, fp32 on the CPU)."),
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
    with_ceilings: bool = typer.Option(True, "--ceilings/--no-ceilings", help="Measure (or read cached) copy and "
                                       "GEMM ceilings for the measured roofline."),
    output: str | None = typer.Option(None, "-o", "--output", help="RunResult file to write (default "
                                      "tokprof-bench-<run id>.json)."),
    world_size: int | None = typer.Option(None, "--world-size", help="Ranks of a collective (--op all_reduce,"
                                          "all_gather; --shape bytes=N): default every GPU here, 2 on the CPU."),
) -> None:
    """Time kernels (and energy), place them on the roofline, and save a RunResult after every call."""
    from tokprof.profiler import bench as bench_mod
    from tokprof.profiler.ceilings import measure_ceilings
    from tokprof.profiler.collectives import COLLECTIVES
    from tokprof.profiler.devices import spec_for

    if world_size is not None or any(o in COLLECTIVES for o in split_csv(op)):
        _bench_collectives(split_csv(op), dtype, shape or [], device, world_size, timeout_s, seed, output)
        return
    dev = _bench_device(device)
    if mode not in bench_mod.MODES:
        fail(f"--mode: expected one of {list(bench_mod.MODES)}, got {mode!r}")
    if not timeout_s > 0:
        fail(f"--timeout-s: expected a positive number of seconds, got {timeout_s}")
    ops, shape = split_csv(op), shape or []
    try:
        # Default backends: every one that runs at least one of the ops here (the others are reported as skipped).
        usable = {b for o in ops for b, why in bench_mod.get_op(o).available_backends(dev).items() if why is None}
        backends = split_csv(backend) or [b for b in ("torch", "triton", "cuda") if b in usable]
        dtypes = split_csv(dtype) or (["bf16"] if dev.type == "cuda" else ["fp32"])
        shapes = [bench_mod.parse_shape(s) for s in shape]
        calls, skipped = bench_mod.plan_calls(ops, backends, dtypes, shapes, dev)
    except ValueError as err:
        fail(str(err))
    for line in skipped:
        err_console.print(f"[yellow]skipped[/] {line}")

    run = bench_mod.new_run(["tokprof", "bench", "--op", ",".join(ops), "--backend", ",".join(backends), "--dtype",
                             ",".join(dtypes), *[a for s in shape for a in ("--shape", s)], "--device", str(dev),
                             "--mode", mode, "--timeout-s", str(timeout_s), "--seed", str(seed),
                             *(["--energy", "--energy-window-s", str(energy_window_s)] if energy else []),
                             *([] if with_ceilings else ["--no-ceilings"]), *(["-o", output] if output else [])], dev)
    path = output or f"tokprof-bench-{run.run_id}.json"
    if with_ceilings:
        err_console.print(f"ceilings on {run.provenance.device.name} (cached per device) ...")
        run.ceilings = measure_ceilings(dev)
    try:
        kernels_done, failures = bench_mod.bench_calls(
            calls, dev, mode=mode, energy=energy, seed=seed, timing_kwargs={"max_time_s": timeout_s},
            energy_kwargs={"window_s": energy_window_s}, spec=spec_for(run.provenance.device),
            ceilings=run.ceilings, out=path, run=run)
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted[/]: {len(run.kernels)} measurement(s) saved to {path}")
        raise typer.Exit(130) from None

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
            joules = f"{m.energy.total_j_per_call:.3g}\n[dim]{m.energy.dynamic_j_per_call:.3g} dyn.[/]"
        else:
            joules = "-"
            if m.energy_reason and m.energy_reason not in reasons:
                reasons.append(m.energy_reason)
        median = f"{t.median_us:.2f}" + (f"\n[dim]graph {m.graph_timing.median_us:.2f}[/]" if m.graph_timing else "")
        meas = _pct(r.efficiency_measured) + ("\n[red]suspicious[/]" if r.suspicious else "")
        call = f"{m.op} {m.backend} {m.dtype}\n[dim]{','.join(f'{k}={v}' for k, v in m.shape.items())}[/]"
        table.add_row(call, median, f"{t.p10_us:.2f}-{t.p90_us:.2f}", noise, f"{r.achieved_gbps:.1f}",
                      f"{r.achieved_tflops:.3f}", meas, _pct(r.efficiency_datasheet), joules, r.bound or "-")
    _print_wide(table)
    for why in reasons:
        console.print(f"[dim]energy: {why}[/]")
    for f in failures:
        err_console.print(f"[red]failed[/] {f.op} {f.shape} {f.dtype} {f.backend}: {f.error}")
    console.print(f"wrote {path} ({len(kernels_done)} measured, {len(failures)} failed)")


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

    dev = _bench_device(device)
    for name, value in (("--copy-mib", copy_mib), ("--gemm-n", gemm_n)):
        if value is not None and value <= 0:
            fail(f"{name}: expected a positive int, got {value}")
    c = measure_ceilings(dev, cache=not no_cache, copy_buffer_bytes=copy_mib << 20 if copy_mib else None,
                         gemm_n=gemm_n)
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
    table.add_row(f"copy ({c.copy_bytes} B read + written)", f"{c.copy_gbps:.1f} GB/s",
                  f"{sheet_gbps:.0f} GB/s" if sheet_gbps else "-",
                  _pct(c.copy_gbps / sheet_gbps) if sheet_gbps else "-")
    table.add_row(f"GEMM {c.gemm_dtype} {'x'.join(map(str, c.gemm_shape))}", f"{c.gemm_tflops:.2f} TFLOP/s",
                  f"{sheet_tflops:.0f} TFLOP/s" if sheet_tflops else "-",
                  _pct(c.gemm_tflops / sheet_tflops) if sheet_tflops else "-")
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
    _print_wide(table)


# ------------------------------------------------------------------------------- rollup and published (issue 4)


@app.command()
def rollup(
    model: str | None = typer.Option(None, "--model", help="Preset (llama-3.1-8b, qwen3-8b, tiny, ...) or a Hugging "
                                     "Face config.json / model directory. With --from: defaults to the run's model."),
    batch: str | None = typer.Option(None, "--batch", help="Batch sizes, e.g. 1,8,64 (default 1,8,64; with --from: "
                                     "the run's)."),
    context: str | None = typer.Option(None, "--context", help="KV tokens attended per sequence, e.g. 1024,8k "
                                       "(default 1024,8192; with --from: the run's)."),
    from_run: str | None = typer.Option(None, "--from", help="Roll up the kernels of this run file instead of "
                                        "measuring; with --gpu of another GPU, project onto it."),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU of the spec table (h100, h200, b200, ...): the target of "
                                   "--modelled, or of a projection with --from."),
    modelled_: bool = typer.Option(False, "--modelled", help="From the GPU's datasheet alone (no measurement)."),
    efficiency: float = typer.Option(0.8, "--efficiency", help="Stated fraction of the roofline every op reaches "
                                     "(--modelled only)."),
    device: str = typer.Option("cuda", "--device", help="Where to measure when neither --from nor --modelled: cpu "
                               "or cuda[:N]."),
    backend: str | None = typer.Option(None, "--backend", help="Kernel backend to measure: torch, triton or cuda "
                                       "(default triton; with --from: the run's)."),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default bf16; with --from: the "
                                     "run's)."),
    price_sheet: str | None = typer.Option(None, "--price-sheet", help="Your price sheet (format of "
                                           "tokprof/data/prices.json); its rows replace the shipped ones."),
    tier: str | None = typer.Option(None, "--tier", help="Price tier of the sheet: hyperscaler (default), neocloud "
                                    "or rental_3yr."),
    usd_per_gpu_hour: float | None = typer.Option(None, "--usd-per-gpu-hour", help="Stated $ per GPU-hour "
                                                  "(overrides the sheet)."),
    all_in_kw: float | None = typer.Option(None, "--all-in-kw", help="Stated all-in kW per GPU (host, network, "
                                           "facility included; overrides the sheet)."),
    host_overhead: float | None = typer.Option(None, "--host-overhead", help="All-in power over measured GPU power "
                                               "(e.g. 1.6): all-in kW from measured energy."),
    usd_per_kwh: float | None = typer.Option(None, "--usd-per-kwh", help="Electricity price, for energy $ per M "
                                             "tokens."),
    pue: float = typer.Option(1.0, "--pue", help="Facility energy over IT energy, for energy $ per M tokens."),
    energy: bool = typer.Option(False, "--energy", help="Measure kernel energy too (needs NVML on a GPU)."),
    max_time_s: float | None = typer.Option(None, "--max-time-s", help="Timing budget per kernel call, seconds "
                                            "(default: the harness's 5 s)."),
    interactivity: str | None = typer.Option(None, "--interactivity", help="Target tokens/s per user, e.g. 20,50: "
                                             "cost per M tokens on the frontier there (interpolated)."),
    output: str | None = typer.Option(None, "-o", "--output", help="Write the RunResult (kernels, roll-up) here."),
    tp: int | None = typer.Option(None, "--tp", help="Tensor-parallel GPUs: one GPU's share of the model plus its "
                                  "all-reduces, measured in the run or modelled from the interconnect spec "
                                  "(default 1; with --from: the run's)."),
) -> None:
    """Tokens/s per GPU and per user, J/token, $ per million tokens and tokens/s per MW for a model at each batch
    and context: measured bottom-up here, from a run file (--from), projected to another GPU, or --modelled."""
    from tokprof import rollup as ru
    from tokprof.rollup.command import RollupArgs, run_rollup

    try:
        prices = ru.PriceOptions(sheet=ru.load_price_sheet(price_sheet) if price_sheet else None, tier=tier,
                                 usd_per_gpu_hour=usd_per_gpu_hour, all_in_kw_per_gpu=all_in_kw,
                                 host_overhead=host_overhead, usd_per_kwh=usd_per_kwh, pue=pue)
        targets = []
        for v in split_csv(interactivity):
            try:
                targets.append(float(v))
            except ValueError:
                fail(f"--interactivity: expected comma-separated numbers of tokens/s per user, got {interactivity!r}")
        args = RollupArgs(model=model, batches=parse_int_list("--batch", batch) if batch else None,
                          contexts=parse_int_list("--context", context) if context else None, from_run=from_run,
                          gpu=gpu, modelled=modelled_, efficiency=efficiency, device=device, backend=backend,
                          dtype=dtype, prices=prices, energy=energy, max_time_s=max_time_s, interactivity=targets,
                          output=output, command=list(sys.argv), tp=tp)
        doc = run_rollup(args, console)
    except typer.Exit:
        raise
    except (ValueError, RuntimeError) as err:  # bad arguments or files; a backend that cannot run here
        fail(str(err))
    print(json.dumps(doc))


@app.command()
def published(
    price_sheet: str | None = typer.Option(None, "--price-sheet", help="Price sheet for the all-in kW comparison."),
) -> None:
    """Recompute the published cost-per-token table (tokprof/data/published_tables.json) from its inputs and show
    where the printed figures do not follow from the formula."""
    from tokprof import rollup as ru

    try:
        checks = ru.check_published_table(sheet=ru.load_price_sheet(price_sheet) if price_sheet else None)
    except ValueError as err:
        fail(str(err))
    for c in checks:
        mark = {True: "[green]follows[/]", False: "[bold red]does not follow[/]", None: "[yellow]cannot check[/]"}
        console.print(f"{mark[c.consistent]}  {c.message}")
    print(json.dumps({"command": "published", "checks": [vars(c) for c in checks]}))


# ------------------------------------------------------------------------ report, compare, history (issue 6)

_DB_HELP = "History database (default: TOKPROF_HISTORY_DB, else $XDG_DATA_HOME or ~/.local/share, tokprof/history.db)."


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="RunResult JSON files, one or more."),  # noqa: B008 - typer
    out: Path = typer.Option(Path("tokprof-report"), "-o", "--out",  # noqa: B008 - typer reads defaults
                             help="Folder for report.md, report.html and the PNGs."),
) -> None:
    """Write report.md, a self-contained report.html (images embedded) and PNG figures from RunResult files."""
    from rich.markup import escape

    from tokprof.reports.render import render_report

    try:
        result = render_report(runs, out)
    except ValueError as err:
        fail(str(err))
    console.print(f"wrote {result.markdown}, {result.html} and {len(result.figures)} figure(s) in {out}")
    for line in result.omitted:
        console.print(f"[dim]omitted: {escape(line)}[/]")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(  # noqa: B008 - typer reads arguments from defaults
        ..., help="BASE.json NEW.json, or NEW.json alone with --against."),
    threshold: str = typer.Option("5%", help="Smallest change that counts, a percentage: 5% or 5."),
    against: str | None = typer.Option(None, help="Compare NEW.json with the history instead: best (per item) or "
                                                  "last (the latest run on the same device)."),
    db: Path | None = typer.Option(None, help=_DB_HELP),  # noqa: B008 - typer reads options from defaults
    out: Path | None = typer.Option(None, "-o", "--out",  # noqa: B008 - typer reads options from defaults
                                    help="Also write the markdown summary to this file."),
    record: bool = typer.Option(False, "--record", help="Record NEW.json in the history after comparing."),
) -> None:
    """Regression gate: SAME / FAST / SLOW / AMBIGUOUS per kernel and roll-up point (exit 1 on SLOW, 2 on bad input)."""
    from tokprof.profiler.schema import load_run
    from tokprof.reports.compare import CompareInputError, compare_against_history, compare_files, parse_threshold
    from tokprof.reports.history import History, HistoryDatabaseError

    try:
        fraction = parse_threshold(threshold)
    except ValueError as err:
        fail(str(err))
    wanted = 1 if against else 2
    if len(runs) != wanted:
        fail(f"runs: expected {'NEW.json alone with --against' if against else 'BASE.json NEW.json'}, got "
             f"{len(runs)} file(s)")
    try:
        if against:
            new = load_run(runs[0])
            result = compare_against_history(new, runs[0], History(db), against, threshold=fraction)
        else:
            result = compare_files(runs[0], runs[1], threshold=fraction)
        if record:
            History(db).record_run(load_run(runs[-1]), runs[-1])
    except (CompareInputError, HistoryDatabaseError, ValueError) as err:
        fail(str(err))
    text = result.to_markdown()
    print(text)  # plain print: the markdown's brackets are not rich markup
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    raise typer.Exit(result.exit_code)


@app.command()
def history(
    gpu: str | None = typer.Option(None, help="Only runs whose device name or spec key contains this (e.g. h100)."),
    op: str | None = typer.Option(None, help="Show the median-time trend of every measured call of this op."),
    model: str | None = typer.Option(None, help="Only runs of models whose name contains this."),
    db: Path | None = typer.Option(None, help=_DB_HELP),  # noqa: B008 - typer reads options from defaults
    record: list[Path] | None = typer.Option(  # noqa: B008 - typer reads options from defaults
        None, "--record", help="Record this RunResult file first (repeatable)."),
    limit: int = typer.Option(40, min=1, help="Most rows per trend table."),
) -> None:
    """Runs recorded in the history database and their trends (last, best, change, sparkline)."""
    from tokprof.profiler.schema import load_run
    from tokprof.reports.history import History, HistoryDatabaseError

    hist = History(db)
    try:
        for path in record or []:
            added = hist.record_run(load_run(path), path)
            console.print(f"{'recorded' if added else 'already recorded'}: {path}")
        if not hist.path.exists():
            console.print(f"no history yet at {hist.path}: record runs with `tokprof history --record RUN.json`")
            return
        runs = hist.runs(gpu=gpu, model=model)
        kernel_trends = hist.kernel_trends(gpu=gpu, op=op, model=model) if op else []
        point_trends = hist.point_trends(gpu=gpu, model=model)
    except (HistoryDatabaseError, ValueError) as err:
        fail(str(err))
    table = Table(title=f"runs in {hist.path}" + (f" (gpu ~ {gpu})" if gpu else "") + (f" (model ~ {model})"
                                                                                      if model else ""))
    for name in ("run_id", "timestamp (UTC)", "device", "model", "kernels", "points", "git sha", "file"):
        table.add_column(name)
    for r in runs:
        table.add_row(r.run_id, r.timestamp_utc, r.device, r.model or "-", str(r.kernels), str(r.points),
                      r.git_sha or "-", r.source or "-")
    console.print(table)
    for title, trends in ((f"kernel trends: {op}", kernel_trends), ("roll-up trends (measured)", point_trends)):
        if not trends:
            continue
        t = Table(title=f"{title}, oldest -> newest" + (f" (first {limit} of {len(trends)})" if len(trends) > limit
                                                          else ""))
        for name in ("item", "device", "metric", "runs", "last", "best", "vs previous", "vs best", "trend"):
            t.add_column(name)
        for tr in trends[:limit]:
            prev, best = tr.delta_vs_previous, tr.delta_vs_best
            t.add_row(tr.item, tr.device, tr.metric, str(len(tr.values)), f"{tr.last:.4g}", f"{tr.best:.4g}",
                      f"{prev:+.1%}" if prev is not None else "-", f"{best:+.1%}" if best is not None else "-",
                      tr.spark)
        console.print(t)
    if not op:
        console.print("[dim]kernel trends: add --op OP (e.g. --op linear)[/]")


# ------------------------------------------------------------------------------- energy traces (issue 3, energy)


@app.command("energy-trace")
def energy_trace(
    out: str = typer.Option(..., "-o", "--out", help="Trace file to write (JSON, read by ReplaySource)."),
    device: str = typer.Option("cuda", help="CUDA device whose NVML counters are recorded."),
    idle_s: float = typer.Option(2.0, help="Seconds idle before the load."),
    busy_s: float = typer.Option(3.0, help="Seconds of back-to-back bf16 GEMMs (8192^3, random data)."),
    settle_s: float = typer.Option(3.0, help="Seconds idle after the load (the GPU cools and settles)."),
) -> None:
    """Record the NVML energy counter, power and temperature through idle -> GEMM load -> idle, as a replay trace."""
    import time

    import torch

    from tokprof.profiler import energy, nvml
    from tokprof.profiler.timing import sync

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


# ---------------------------------------------------------------------- end to end and reconciliation (issue 5)


@app.command()
def e2e(
    model: str | None = typer.Option(None, "--model", help="Preset (tiny, llama-3.1-8b, ...): random weights on the "
                                     "device; with --model-dir, the name the results carry."),
    model_dir: str | None = typer.Option(None, "--model-dir", help="Local Hugging Face directory (config.json + "
                                         "safetensors) to load instead of random weights."),
    batch: str = typer.Option("1", "--batch", help="Batch sizes, e.g. 1,8,32."),
    context: str = typer.Option("128", "--context", help="KV tokens the timed steps attend (their median), e.g. "
                                "1k,8k."),
    mode: str | None = typer.Option(None, "--mode", help="eager and/or graph (default eager,graph on a GPU, eager "
                                    "on the CPU)."),
    framework: str = typer.Option("tokprof,transformers", "--framework", help="Comma-separated: tokprof, "
                                  "transformers, vllm (vllm only where importable)."),
    steps: int = typer.Option(32, "--steps", help="Timed decode steps per point."),
    warmup: int = typer.Option(4, "--warmup", help="Untimed decode steps before them (>= 2 for graph mode)."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda[:N] (default cuda when a GPU is visible)."),
    backend: str | None = typer.Option(None, "--backend", help="tokprof kernel backend: torch, triton or cuda "
                                       "(default triton on a GPU, torch on the CPU)."),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default bf16 on a GPU, fp32 on the "
                                     "CPU)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and prompts."),
    energy: bool = typer.Option(True, "--energy/--no-energy", help="J/token over the decode window (NVML)."),
    profile: bool = typer.Option(True, "--profile/--no-profile", help="GPU busy fraction from torch.profiler."),
    output: str | None = typer.Option(None, "-o", "--output", help="RunResult to write, or to extend when it "
                                      "exists (e.g. the run of `tokprof rollup`)."),
) -> None:
    """Measure the real decode loop end to end: step time, tokens/s, TTFT, J/token, GPU busy fraction."""
    from tokprof.models.e2e_command import E2EArgs, run_e2e

    try:
        args = E2EArgs(model=model, model_dir=model_dir, batches=parse_int_list("--batch", batch),
                       contexts=parse_int_list("--context", context), modes=split_csv(mode) or None,
                       frameworks=split_csv(framework), steps=steps, warmup=warmup, device=_bench_device(device),
                       backend=backend, dtype=dtype, output=output, seed=seed, energy=energy, profile=profile,
                       command=list(sys.argv))
        results, path = run_e2e(args, console, err_console)
    except typer.Exit:
        raise
    except (ValueError, RuntimeError) as err:  # bad arguments, a broken model directory, a backend missing here
        fail(str(err))
    if path:
        console.print(f"wrote {path}")
    print(json.dumps({"command": "e2e", "output": path, "e2e": [m.to_dict() for m in results]}))


@app.command()
def reconcile(
    run_file: str = typer.Argument(..., help="RunResult with roll-up and/or end-to-end sections."),
    utilisation: float | None = typer.Option(None, "--utilisation", help="Duty cycle served, in (0, 1]: applies L5 "
                                             "(default: not applied)."),
    l4: str | None = typer.Option(None, "--l4", help="Framework for L4: tokprof, vllm or transformers (default: "
                                  "tokprof eager, else the first measured)."),
    write: bool = typer.Option(True, "--write/--no-write", help="Store the reconciliation in the run file."),
) -> None:
    """The iceberg: datasheet roofline -> measured roofline -> kernel sum -> end to end -> served, with each gap."""
    from tokprof.models.e2e_command import print_reconciliation
    from tokprof.profiler.schema import load_run, save_run
    from tokprof.rollup.reconcile import reconcile as reconcile_run

    try:
        run = load_run(run_file)
        recs = reconcile_run(run, utilisation, l4_framework=l4)
    except ValueError as err:
        fail(str(err))
    if not recs:
        fail(f"{run_file}: no roll-up point and no end-to-end measurement to reconcile; run `tokprof rollup` and/or "
             "`tokprof e2e -o` into it first")
    print_reconciliation(console, recs)
    if write:
        run.reconciliation = [r.to_dict() for r in recs]
        save_run(run, run_file)
        console.print(f"wrote the reconciliation into {run_file}")
    print(json.dumps({"command": "reconcile", "run": run_file, "reconciliation": [r.to_dict() for r in recs]}))


# ------------------------------------------------------------------ collectives and fleet sweeps (issue 8)


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
    if not timeout_s > 0:
        fail(f"--timeout-s: expected a positive number of seconds, got {timeout_s}")
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
    timing = {"max_time_s": timeout_s}
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
            dev = _bench_device(device)
            world = world_size if world_size is not None else (torch.cuda.device_count() if dev.type == "cuda"
                                                               else 2)
            if world < 2:
                fail(f"--world-size: a collective needs at least 2 ranks, got {world}"
                     + (" (GPUs visible here); plans use modelled collectives from the spec table's interconnect "
                        "instead" if world_size is None else ""))
            calls = [(o, b) for o in ops for b in sizes or coll.DEFAULT_SIZES[dev.type]]
            records = coll.bench_collectives(calls, world_size=world, device=dev.type,
                                             dtype=dtypes[0] if dtypes else None, timing_kwargs=timing, seed=seed)
    except (ValueError, RuntimeError) as err:
        fail(str(err))
    command = ["tokprof", "bench", "--op", ",".join(ops), "--world-size", str(world), "--device", str(dev),
               *[a for s in shapes for a in ("--shape", s)], *(["--dtype", dtypes[0]] if dtypes else []),
               "--timeout-s", str(timeout_s), "--seed", str(seed)]
    run = new_run(command, dev)
    run.kernels.extend(records)
    run.notes.append(f"collectives over {world} ranks ({records[0].backend}); bandwidths with the nccl-tests "
                     "definitions (busbw = algbw x 2(n-1)/n for all_reduce, x (n-1)/n for all_gather)")
    path = save_run(run, output or f"tokprof-bench-{run.run_id}.json")
    table = Table(title=f"tokprof bench: collectives on {run.provenance.device.name}, {world} ranks "
                        f"({records[0].backend})")
    for col in ("op", "bytes", "dtype", "median us", "p10-p90 us", "noise", "algbw GB/s", "busbw GB/s", "% link"):
        table.add_column(col, justify="left" if col in ("op", "dtype") else "right")
    for m in records:
        t, r = m.timing, m.roofline
        nbytes = m.shape["bytes"]
        table.add_row(m.op, str(nbytes), m.dtype, f"{t.median_us:.2f}", f"{t.p10_us:.2f}-{t.p90_us:.2f}",
                      f"{t.noise:.1%}" + ("" if t.met_noise_target else " [yellow]missed[/]"),
                      f"{coll.algbw_gbps(nbytes, t.median_us):.3f}", f"{r.achieved_gbps:.3f}",
                      _pct(r.efficiency_datasheet))
    _print_wide(table)
    if records[0].roofline.t_roof_datasheet_us is None:
        console.print("[dim]% link: no interconnect figure for this device (a CPU, or a GPU missing from the spec "
                      "table)[/]")
    console.print(f"wrote {path} ({len(records)} measured)")


@app.command()
def fleet(
    gpus: str = typer.Option(..., "--gpus", help="GPU types, comma-separated (h100,h200,b200,a100,...): one Ray task "
                             "each, on a node with one GPU of that type."),
    model: str = typer.Option(..., "--model", help="Preset profiled on every GPU type, e.g. llama-3.1-8b."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster: ray://HOST:10001, HOST:6379 or auto "
                                       "(default: RAY_ADDRESS, else a new local Ray)."),
    out: Path = typer.Option(Path("tokprof-fleet"), "-o", "--out",  # noqa: B008 - typer reads defaults
                             help="Folder for one RunResult per GPU type, compare.md and report/."),
    db: Path | None = typer.Option(None, "--db", help=_DB_HELP),  # noqa: B008 - typer reads options from defaults
    record: bool = typer.Option(True, "--record/--no-record", help="Record every RunResult in the history database."),
    task: str = typer.Option("run", "--task", help="What each node runs: run (`tokprof run`) or bottom-up (the kernel "
                             "roll-up only, batch 1 and 8 at context 1024)."),
    timeout_s: float | None = typer.Option(None, "--timeout-s", help="Longest wait for all nodes, s (default: no "
                                           "limit)."),
) -> None:
    """Profile one model on several GPU generations of a Ray cluster; gather the runs, the history and one report."""
    from rich.markup import escape

    from tokprof.fleet import gpu_target, run_fleet, task_by_name

    try:
        targets = [gpu_target(g) for g in split_csv(gpus)]
        result = run_fleet(targets, model, out, address=address, task=task_by_name(task), db=db, record=record,
                           timeout_s=timeout_s)
    except (ValueError, RuntimeError) as err:
        fail(str(err))
    table = Table(title=f"tokprof fleet: {model} on {', '.join(t.name for t in targets)}")
    for col in ("GPU type", "node", "RunResult or failure"):
        table.add_column(col)
    for t in targets:
        if t.name in result.runs:
            table.add_row(t.name, result.hosts[t.name], str(result.runs[t.name]))
        else:
            table.add_row(t.name, "-", f"[red]{escape(result.failures.get(t.name, 'no result'))}[/]")
    _print_wide(table)
    for note in result.notes:
        console.print(f"[dim]{escape(note)}[/]")
    for what, path in (("compare", result.compare), ("report", result.report)):
        if path is not None:
            console.print(f"{what}: {path}")
    print(json.dumps({"command": "fleet", **result.to_dict()}))
    if result.failures:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="tokprof")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
