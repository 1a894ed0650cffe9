"""`tokprof e2e` and `tokprof reconcile`: end-to-end decode and the iceberg (issue 5)."""

from __future__ import annotations

import json
import sys

import typer

from tokprof.commands._app import (
    app,
    bench_device,
    check_output,
    console,
    err_console,
    fail,
    interrupted,
    parse_int_list,
    split_csv,
)


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
    steps: int = typer.Option(32, "--steps", min=2, help="Timed decode steps per point."),
    warmup: int = typer.Option(4, "--warmup", min=0, help="Untimed decode steps before them (>= 2 for graph mode)."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda[:N] (default cuda when a GPU is visible)."),
    backend: str | None = typer.Option(None, "--backend", help="tokprof kernel backend: torch, triton or cuda "
                                       "(default triton on a GPU, torch on the CPU)."),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default bf16 on a GPU, fp32 on the "
                                     "CPU), or a weight format: fp8, fp8-block, mxfp4, nvfp4, int4 (the linears "
                                     "quantised; the run records the logit error it introduces)."),
    kv_dtype: str | None = typer.Option(None, "--kv-dtype", help="fp8: an e4m3 KV cache."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and prompts."),
    energy: bool = typer.Option(True, "--energy/--no-energy", help="J/token over the decode window (NVML)."),
    profile: bool = typer.Option(True, "--profile/--no-profile", help="GPU busy fraction from torch.profiler."),
    output: str | None = typer.Option(None, "-o", "--output", help="RunResult to write, or to extend when it "
                                      "exists (e.g. the run of `tokprof rollup`)."),
) -> None:
    """Measure the real decode loop end to end: step time, tokens/s, TTFT, J/token, GPU busy fraction."""
    from tokprof.models.e2e import FRAMEWORKS
    from tokprof.models.e2e_command import E2EArgs, run_e2e

    check_output("--output", output)  # up front: a bad path would lose the measurements
    dev = bench_device(device)
    if not split_csv(framework):
        fail(f"--framework: expected some of {list(FRAMEWORKS)}, got {framework!r}")
    if set(split_csv(mode)) == {"graph"} and dev.type != "cuda":  # eager,graph measures eager and skips graph
        fail(f"--mode graph: CUDA graphs need a CUDA device, got --device {dev}; use --mode eager")
    try:
        args = E2EArgs(model=model, model_dir=model_dir, batches=parse_int_list("--batch", batch),
                       contexts=parse_int_list("--context", context), modes=split_csv(mode) or None,
                       frameworks=split_csv(framework), steps=steps, warmup=warmup, device=dev,
                       backend=backend, dtype=dtype, output=output, seed=seed, energy=energy, profile=profile,
                       command=list(sys.argv), kv_dtype=kv_dtype)
        results, path = run_e2e(args, console, err_console)
    except typer.Exit:
        raise
    except (ValueError, RuntimeError) as err:  # bad arguments, a broken model directory, a backend missing here
        fail(str(err))
    except KeyboardInterrupt:
        interrupted(f"the points measured so far are in {output}" if output else "nothing written (no --output)")
    if path:
        console.print(f"wrote {path}")
    print(json.dumps({"command": "e2e", "output": path, "e2e": [m.to_dict() for m in results]}))
    if not results:
        raise typer.Exit(1)  # every point skipped (see above): nothing measured is no success


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
    from tokprof.models.e2e import FRAMEWORKS
    from tokprof.models.e2e_command import print_reconciliation
    from tokprof.profiler.schema import load_run, save_run
    from tokprof.rollup.reconcile import reconcile as reconcile_run

    if l4 is not None and l4 not in FRAMEWORKS:
        fail(f"--l4: expected one of {list(FRAMEWORKS)}, got {l4!r}")
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
