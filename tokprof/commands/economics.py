"""`tokprof rollup` and `tokprof published`: tokens/s, J/token, $/M tokens, tokens/s/MW (issue 4)."""

from __future__ import annotations

import json
import math
import sys

import typer

from tokprof.commands._app import (
    app,
    check_device_index,
    check_one_format,
    check_output,
    console,
    fail,
    interrupted,
    parse_int_list,
    print_csv,
    quiet_console,
)

# Sampling budget per kernel call of a roll-up sweep (--timeout-s): dozens of distinct calls, most of which reach the
# 0.5% noise target in well under a second on a GPU; on a shared CPU they rarely do, and bench's 5 s each made the
# tiny model's sweep take minutes.
ROLLUP_TIMEOUT_S = 1.0


@app.command()
def rollup(
    model: str | None = typer.Option(None, "--model", help="Preset (llama-3.1-8b, qwen3-8b, tiny, ...) or a Hugging "
                                     "Face config.json / model directory. With --from: defaults to the run's model."),
    batch: str | None = typer.Option(None, "--batch", help="Batch sizes, e.g. 1,8,64 (default 1,8,64; with --from: "
                                     "the run's), or 'max': the largest batch that fits in the GPU's memory at each "
                                     "context (--modelled, or a projection)."),
    context: str | None = typer.Option(None, "--context", help="KV tokens attended per sequence, e.g. 1024,8k "
                                       "(default 1024,8192; with --from: the run's)."),
    from_run: str | None = typer.Option(None, "--from", help="Roll up the kernels of this run file instead of "
                                        "measuring; with --gpu of another GPU, project onto it."),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU of the spec table (h100, h200, b200, ...): the target of "
                                   "--modelled, or of a projection with --from."),
    modelled_: bool = typer.Option(False, "--modelled", help="From the GPU's datasheet alone (no measurement)."),
    efficiency: float | None = typer.Option(None, "--efficiency", help="A flat stated fraction of the roofline "
                                            "every op reaches, instead of the step model's efficiency curves "
                                            "(--modelled only)."),
    device: str = typer.Option("cuda", "--device", help="Where to measure when neither --from nor --modelled: cpu "
                               "or cuda[:N]."),
    backend: str | None = typer.Option(None, "--backend", help="Kernel backend to measure: torch, triton or cuda "
                                       "(default triton; with --from: the run's)."),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, fp16 or bf16, or a weight format: fp8, fp8-block, "
                                     "mxfp4, nvfp4, int4 (default bf16; with --from: the run's)."),
    kv_dtype: str | None = typer.Option(None, "--kv-dtype", help="fp8: an e4m3 KV cache (default: the activation "
                                        "dtype)."),
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
    timeout_s: float = typer.Option(ROLLUP_TIMEOUT_S, "--timeout-s", help="Longest sampling time per kernel call, "
                                    "s (stops earlier at 0.5% noise; a sweep measures dozens of calls)."),
    max_time_s: float | None = typer.Option(None, "--max-time-s", hidden=True, help="Deprecated: --timeout-s."),
    interactivity: str | None = typer.Option(None, "--interactivity", help="Target tokens/s per user, e.g. 20,50: "
                                             "cost per M tokens on the frontier there (interpolated)."),
    output: str | None = typer.Option(None, "-o", "--output", help="Write the RunResult (kernels, roll-up) here."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON document (no card, no tables)."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the points as CSV instead (one row per point)."),
    tp: int | None = typer.Option(None, "--tp", help="Tensor-parallel GPUs: one GPU's share of the model plus its "
                                  "all-reduces, measured in the run or modelled from the interconnect spec "
                                  "(default 1; with --from: the run's)."),
    ep: int = typer.Option(1, "--ep", help="Expert-parallel GPUs of an MoE model (--modelled): routed experts / ep "
                           "per GPU; equal to --tp, or with --dp-attention and --tp 1."),
    dp_attention: bool = typer.Option(False, "--dp-attention", help="Data-parallel attention over the EP group: "
                                      "each GPU runs its own batch, tokens reach the experts by all-to-all."),
    assumptions: str | None = typer.Option(None, "--assumptions", help="JSON file of step-model assumptions to "
                                           "override (names as printed under 'step-model assumptions')."),
    execution: str | None = typer.Option(None, "--execution", help="Modelled execution: graph (CUDA graphs, "
                                         "default) or eager (per-kernel launches from the host)."),
    step_overhead_us: float | None = typer.Option(None, "--step-overhead-us", help="Per-step host overhead, us, of "
                                                  "the execution mode (overrides the step model's)."),
    call_latency_us: float | None = typer.Option(None, "--call-latency-us", help="Fixed GPU cost per kernel call, "
                                                 "us (overrides the step model's)."),
    collective_algorithm: str | None = typer.Option(None, "--collective-algorithm", help="auto (fastest for the "
                                                    "size), ring, tree, one_shot, two_shot or nvls."),
    collective_latency_us: float | None = typer.Option(None, "--collective-latency-us", help="A fixed latency per "
                                                       "collective, us, instead of the algorithm model."),
    collective_efficiency: float | None = typer.Option(None, "--collective-efficiency", help="Fraction of the link "
                                                       "bandwidth collectives reach (default 0.7)."),
    link: str | None = typer.Option(None, "--link", help="Link of the collectives: auto, nvlink or pcie."),
    interconnect_gpu: str | None = typer.Option(None, "--interconnect-gpu", help="Model the collectives on this "
                                                "spec-table GPU's link instead of --gpu's."),
    memory_utilization: float = typer.Option(0.9, "--memory-utilization", help="Fraction of GPU memory a serving "
                                             "engine may use (vLLM's default 0.9); the rest is the runtime reserve."),
) -> None:
    """Tokens/s per GPU and per user, J/token, $ per million tokens and tokens/s per MW for a model at each batch
    and context: measured bottom-up here, from a run file (--from), projected to another GPU, or --modelled."""
    from tokprof import rollup as ru
    from tokprof.rollup.command import RollupArgs, run_rollup

    check_output("--output", output)  # up front: a bad path would lose the measurements
    check_one_format(as_json, as_csv)
    if not (from_run or modelled_):
        check_device_index(device)
    try:
        prices = ru.PriceOptions(sheet=ru.load_price_sheet(price_sheet) if price_sheet else None, tier=tier,
                                 usd_per_gpu_hour=usd_per_gpu_hour, all_in_kw_per_gpu=all_in_kw,
                                 host_overhead=host_overhead, usd_per_kwh=usd_per_kwh, pue=pue)
        try:
            targets = [float(v) for v in interactivity.split(",")] if interactivity is not None else []
        except ValueError:
            targets = [math.nan]
        if not all(0 < t < math.inf for t in targets):
            fail("--interactivity: expected comma-separated positive numbers of tokens/s per user, got "
                 f"{interactivity!r}")
        if kv_dtype is not None or dtype is not None:
            from tokprof.quant.precision import check_supported, parse_precision

            precision = parse_precision(dtype or "bf16", kv_dtype=kv_dtype)
            dtype = precision.label
            if not (from_run or modelled_):
                check_supported(precision, device=device, backend=backend)
        batch_max = batch is not None and batch.strip().lower() == "max"
        step_model = _step_model(assumptions, execution=execution, step_overhead_us=step_overhead_us,
                                 call_latency_us=call_latency_us, collective_algorithm=collective_algorithm,
                                 collective_latency_us=collective_latency_us,
                                 collective_efficiency=collective_efficiency, link=link)
        collectives = ru.CollectiveOptions(interconnect_gpu=interconnect_gpu) if interconnect_gpu else \
            ru.CollectiveOptions()
        args = RollupArgs(model=model, batches=parse_int_list("--batch", batch) if batch is not None and not batch_max
                          else None,
                          contexts=parse_int_list("--context", context) if context is not None else None,
                          from_run=from_run, gpu=gpu, modelled=modelled_, efficiency=efficiency, device=device,
                          backend=backend, dtype=dtype, prices=prices, energy=energy,
                          max_time_s=max_time_s if max_time_s is not None else timeout_s,
                          interactivity=targets, output=output, command=list(sys.argv), tp=tp,
                          collectives=collectives, step_model=step_model, batch_max=batch_max,
                          memory_utilization=memory_utilization, ep=ep, dp_attention=dp_attention)
        doc = run_rollup(args, quiet_console() if as_json or as_csv else console)
    except typer.Exit:
        raise
    except (ValueError, RuntimeError) as err:  # bad arguments or files; a backend that cannot run here
        fail(str(err))
    except KeyboardInterrupt:  # bottom_up saves --output after every kernel
        interrupted(f"the kernels measured so far are in {output}" if output else "nothing written (no --output)")
    if as_csv:
        print_csv([{k: v for k, v in p.items() if not isinstance(v, (list, dict))} for p in doc["points"]])
        return
    print(json.dumps(doc))


def _step_model(path: str | None, **options: object) -> object:
    """The step model of the assumptions file (or the defaults) with the CLI's options on top; None when neither
    was given (the defaults)."""
    from tokprof.rollup.step_model import StepModel

    changes = {k: v for k, v in options.items() if v is not None}
    if path is None and not changes:
        return None
    model = StepModel.from_json(path) if path else StepModel()
    if "step_overhead_us" in changes:
        execution = changes.get("execution", model.execution)
        changes["step_overhead_us"] = {execution: changes["step_overhead_us"]}
    return model.with_overrides(changes, source="stated on the command line") if changes else model


@app.command()
def validate(
    published_file: str | None = typer.Option(None, "--published", help="Published measurements in the format of "
                                              "tokprof/data/published_decode.json (default: the shipped file)."),
    assumptions: str | None = typer.Option(None, "--assumptions", help="JSON file of step-model assumptions to "
                                           "override (as `tokprof rollup --assumptions`)."),
) -> None:
    """Modelled vs published decode throughput (the step model against published measurements): each row with its
    signed error, then the median and max |error| for the calibration rows, the held-out rows and all. Offline."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from tokprof.rollup.validate import GOAL_MAX_ABS, GOAL_MEDIAN_ABS
    from tokprof.rollup.validate import validate as run_validation

    try:
        report = run_validation(step_model=_step_model(assumptions), path=published_file)
    except ValueError as err:
        fail(str(err))
    table = Table(title="modelled vs published decode (error = modelled / published - 1)", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True, title_justify="left")
    for col in ("source", "model", "gpu", "tp", "batch", "ctx", "published", "modelled", "error"):
        table.add_column(col, justify="left" if col in ("source", "model", "gpu") else "right", no_wrap=True)
    for r in report.rows:
        unit = " g" if r.metric == "output_tokens_per_s_per_group" else " u"
        table.add_row(escape(r.source) + ("*" if r.split == "calibration" else ""), escape(r.model),
                      escape(r.gpu.replace("-sxm", "").replace("-80gb", "")), str(r.tp), str(r.batch), str(r.context),
                      f"{r.published:,.4g}{unit}", "no fit" if r.modelled is None else f"{r.modelled:,.4g}",
                      "-" if r.error is None else f"{r.error:+.1%}")
    console.print(table)
    console.print("[dim]* calibration row; u: tokens/s per user (a latency row: its inverse), g: output tokens/s of "
                  "the whole batch and tp group; ctx: the modelled mean context[/]")
    for r in report.rows:
        if r.reason:
            console.print(f"[yellow]{escape(r.source)} {escape(r.model)} batch {r.batch}: does not fit, "
                          f"{escape(r.reason)}[/]")
    for name, st in report.stats.items():
        if st.median_abs is None or st.max_abs is None:
            console.print(f"{name}: no rows")
            continue
        mark = "[green]meets[/]" if st.meets_goal() else "[red]misses[/]"
        console.print(f"{name} ({st.rows} rows): median |error| {st.median_abs:.1%}, max |error| {st.max_abs:.1%}, "
                      f"median signed {st.median_signed:+.1%} - {mark} the goal (median <= {GOAL_MEDIAN_ABS:.0%}, "
                      f"max <= {GOAL_MAX_ABS:.0%})")
    for c in report.claims:
        frac = "unknown" if c.modelled_bandwidth_fraction is None else f"{c.modelled_bandwidth_fraction:.0%}"
        verdict = {True: "[green]consistent[/]", False: "[red]contradicts it[/]", None: "cannot check"}[c.holds]
        console.print(f"claim ({escape(c.source_title)}): {escape(c.statement)}; modelled: {frac} of the HBM "
                      f"bandwidth - {verdict}")
    console.print(f"[dim]calibrated on: {', '.join(report.calibration_sources)}; sources and metrics in "
                  "tokprof/data/published_decode.json[/]")
    print(json.dumps({"command": "validate", **report.to_dict()}))


@app.command()
def published(
    price_sheet: str | None = typer.Option(None, "--price-sheet", help="Price sheet for the all-in kW comparison."),
    systems: bool = typer.Option(False, "--systems", help="Also reproduce the rows from first principles for "
                                 "DeepSeek-R1 (tokprof curve / compare-systems): where each row sits on the computed "
                                 "curve and how the ratio decomposes."),
    report: str | None = typer.Option(None, "--report", help="With --systems: folder for the markdown and waterfalls."),
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
    out = {"command": "published", "checks": [vars(c) for c in checks]}
    if systems:
        from tokprof.commands.systems import published_systems

        out["systems"] = published_systems(report)
    print(json.dumps(out))
