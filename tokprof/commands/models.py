"""`tokprof e2e` and `tokprof reconcile`: end-to-end decode and the iceberg (issue 5)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape

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
    model: str | None = typer.Option(None, "--model", help="Preset (tiny, llama-3.1-8b, ...: random weights on the "
                                     "device) or a local Hugging Face directory (config.json + safetensors)."),
    name: str | None = typer.Option(None, "--name", help="The model name the results carry (default: the preset, or "
                                    "the directory's name)."),
    model_dir: str | None = typer.Option(None, "--model-dir", hidden=True, help="Deprecated: --model DIR."),
    batch: str | None = typer.Option(None, "--batch", help="Batch sizes, e.g. 1,8,32 (default 1,8,64, as rollup)."),
    context: str | None = typer.Option(None, "--context", help="KV tokens the timed steps attend (their median), "
                                       "e.g. 1k,8k (default 1024,8192 up to the model's longest, as rollup)."),
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
    if model_dir is None and model is not None and Path(model).expanduser().is_dir():
        model_dir, model = str(Path(model).expanduser()), None  # --model DIR: one flag for presets and directories
    model = name or model  # with a directory: the name the results carry (old form: --model-dir DIR --model NAME)
    if not split_csv(framework):
        fail(f"--framework: expected some of {list(FRAMEWORKS)}, got {framework!r}")
    if set(split_csv(mode)) == {"graph"} and dev.type != "cuda":  # eager,graph measures eager and skips graph
        fail(f"--mode graph: CUDA graphs need a CUDA device, got --device {dev}; use --mode eager")
    if backend is not None:  # refused up front (exit 2): a backend that cannot run here is bad input, not a skip
        from tokprof.kernels import BACKENDS, OPS

        if backend not in BACKENDS:
            fail(f"--backend: expected one of {list(BACKENDS)}, got {backend!r}")
        why = next((r for op in OPS.values() if (r := op.available_backends(dev).get(backend)) is not None), None)
        if why is not None:
            fail(f"--backend {backend}: cannot run on {dev}: {why}")
    try:
        batches, contexts = sweep_defaults(model_dir or model, batch, context)
        args = E2EArgs(model=model, model_dir=model_dir, batches=batches, contexts=contexts,
                       modes=split_csv(mode) or None,
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
        console.print(f"wrote {escape(str(path))}")
    print(json.dumps({"command": "e2e", "output": path, "e2e": [m.to_dict() for m in results]}))
    if not results:
        raise typer.Exit(1)  # every point skipped (see above): nothing measured is no success


def sweep_defaults(model: str | None, batch: str | None, context: str | None) -> tuple[list[int], list[int]]:
    """--batch and --context as ints, defaulting as `tokprof rollup` does: batches 1,8,64; contexts 1024,8192 up to
    the model's longest (a model that cannot be read yet is left to the command's own error)."""
    from tokprof.rollup.command import DEFAULT_BATCHES, DEFAULT_CONTEXTS, default_contexts, load_model

    batches = parse_int_list("--batch", batch) if batch is not None else list(DEFAULT_BATCHES)
    if context is not None:
        return batches, parse_int_list("--context", context)
    try:
        return batches, default_contexts(load_model(model), []) if model else list(DEFAULT_CONTEXTS)
    except (ValueError, OSError):
        return batches, list(DEFAULT_CONTEXTS)


@app.command()
def reconcile(
    run_file: str = typer.Argument(..., help="RunResult with roll-up and/or end-to-end sections."),
    utilisation: float | None = typer.Option(None, "--utilisation", help="Duty cycle served, in (0, 1]: applies L5 "
                                             "(default: not applied)."),
    l4: str | None = typer.Option(None, "--l4", help="Framework for L4: tokprof, vllm or transformers (default: "
                                  "tokprof eager, else the first measured)."),
    write: bool = typer.Option(False, "--write/--no-write", help="Also store the reconciliation in RUN_FILE itself "
                               "(default: RUN_FILE is only read)."),
    output: str | None = typer.Option(None, "-o", "--output", help="Write a copy of the run with the reconciliation "
                                      "to this file (overwrites it); RUN_FILE is left as it was."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON document (no tables)."),
    served: bool = typer.Option(True, "--served/--no-served", help="L5 from tokprof's server (--served-from) or "
                                "predicted by its simulator from the run's step times (--utilisation overrides)."),
    served_from: str | None = typer.Option(None, "--served-from", help="A serve-bench.json whose measured sweep "
                                           "gives L5 for its model, device and batch."),
) -> None:
    """The iceberg: datasheet roofline -> measured roofline -> kernel sum -> end to end -> served, with each gap."""
    from tokprof.models.e2e import FRAMEWORKS
    from tokprof.models.e2e_command import print_reconciliation
    from tokprof.profiler.schema import load_run, save_run
    from tokprof.rollup.reconcile import reconcile as reconcile_run

    if l4 is not None and l4 not in FRAMEWORKS:
        fail(f"--l4: expected one of {list(FRAMEWORKS)}, got {l4!r}")
    check_output("--output", output)
    try:
        run = load_run(run_file)
        provider = None
        if served:
            from tokprof.profiler.schema import read_json
            from tokprof.serving.served import provider as served_provider

            provider = served_provider(read_json(served_from, "serve-bench result") if served_from else None)
        recs = reconcile_run(run, utilisation, l4_framework=l4, served=provider)
    except ValueError as err:
        fail(str(err))
    if not recs:
        fail(f"{run_file}: no roll-up point and no end-to-end measurement to reconcile; run `tokprof rollup` and/or "
             "`tokprof e2e -o` into it first")
    if not as_json:
        print_reconciliation(console, recs)
    written = [p for p in (run_file if write else None, output) if p]
    if written:  # a reading command changes no file unless asked (--write, -o)
        run.reconciliation = [r.to_dict() for r in recs]
        for path in written:
            save_run(run, path)
            if not as_json:
                console.print(f"wrote the reconciliation into {escape(str(path))}")
    print(json.dumps({"command": "reconcile", "run": run_file, "written": written,
                      "reconciliation": [r.to_dict() for r in recs]}))
