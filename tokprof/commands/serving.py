"""`tokprof serve-bench`: tokprof's continuous-batching server swept over request rates, the simulator beside it,
the highest rate that meets an SLO and the cost there (issue 19)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.table import Table

from tokprof.commands._app import app, check_output, console, err_console, fail, interrupted, print_wide


def _rates(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        rates = [float(v) for v in value.split(",")]
    except ValueError:
        rates = []
    if not rates or any(not r > 0 or r != r or r == float("inf") for r in rates):
        fail(f"--rates: expected comma-separated positive request rates (req/s) such as 2,5,10, got {value!r}")
    return rates


@app.command("serve-bench")
def serve_bench(
    model: str = typer.Option("tiny", "--model", help="Preset served (random weights), e.g. tiny."),
    gpu: str | None = typer.Option(None, "--gpu", help="Simulate this spec-table GPU (h100, h200, ...) with modelled "
                                   "step times instead of serving here (no server runs)."),
    device: str = typer.Option("cpu", "--device", help="Where the server runs: cpu or cuda[:N]."),
    backend: str = typer.Option("torch", "--backend", help="Kernel backend of the server: torch, triton or cuda."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16 (modelled mode: the datasheet dtype)."),
    rates: str | None = typer.Option(None, "--rates", help="Request rates (req/s), e.g. 5,10,20 (default: 0.25, 0.5, "
                                     "0.75 and 2 x the capacity the simulator estimates, each on the latest "
                                     "table)."),
    num_requests: int = typer.Option(120, "--requests", min=1, help="Requests per rate (120: a p90 over 12 tail "
                                     "requests; fewer make the p90 TTFT comparison noisy)."),
    mode: str = typer.Option("poisson", "--mode", help="poisson (open loop at each rate), agentic (multi-turn "
                             "sessions reusing their context), concurrency (closed loop, --clients) or trace."),
    input_len: str = typer.Option("uniform:32:128", "--input-len", help="Prompt tokens: N, uniform:LO:HI or "
                                  "lognormal:MEAN:CV."),
    output_len: str = typer.Option("32", "--output-len", help="Output tokens: N, uniform:LO:HI or lognormal:MEAN:CV."),
    turns: int = typer.Option(3, "--turns", min=1, help="Agentic mode: turns per session."),
    turn_input_len: str = typer.Option("16", "--turn-input-len", help="Agentic mode: new tokens per later turn."),
    think_s: float = typer.Option(0.0, "--think-s", min=0.0, help="Agentic mode: seconds between a turn's end and "
                                  "the next."),
    clients: int = typer.Option(8, "--clients", min=1, help="Concurrency mode: concurrent users."),
    trace: str | None = typer.Option(None, "--trace", help="Trace mode: a JSONL file (see tokprof.serving.loadgen)."),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs", min=1, help="Requests in the running batch at most."),
    token_budget: int = typer.Option(256, "--token-budget", min=1, help="Tokens per step (decode + prefill chunks)."),
    num_blocks: int | None = typer.Option(None, "--num-blocks", min=1, help="KV blocks of the pool (default: enough "
                                          "for a full batch of the longest requests; fewer forces preemption)."),
    block_size: int = typer.Option(16, "--block-size", min=1, help="Tokens per KV block."),
    prefix_caching: bool = typer.Option(False, "--prefix-caching/--no-prefix-caching", help="Share the blocks of "
                                        "repeated prompt prefixes."),
    slo_ttft_ms: float | None = typer.Option(None, "--slo-ttft-ms", help="SLO on p90 TTFT (default 1000 on the CPU, "
                                             "2000 on a GPU)."),
    slo_tpot_ms: float | None = typer.Option(None, "--slo-tpot-ms", help="SLO on p90 TPOT (default 50)."),
    clock: str = typer.Option("wall", "--clock", help="wall, or cpu: this thread's CPU time (a shared CPU measured "
                              "as if idle; --device cpu, --threads 1)."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch intra-op threads on the CPU."),
    paired: bool | None = typer.Option(None, "--paired/--no-paired", help="Time the simulator's step table "
                                       "between the server's steps, off its clock (default on a CPU, whose speed "
                                       "drifts), or just before each rate (default on a GPU, where energy is "
                                       "metered: the probe would sit in the energy window)."),
    cuda_graphs: bool | None = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="Replay CUDA graphs of the "
                                            "server's decode-only steps, padded to captured batch sizes (default: on "
                                            "a GPU with --backend triton or cuda)."),
    endpoint: str | None = typer.Option(None, "--endpoint", help="Drive an OpenAI-compatible server (vLLM, "
                                        "SGLang) at this URL, e.g. http://127.0.0.1:8000, instead of tokprof's own; "
                                        "with --gpu and --model the simulator predicts it beside."),
    endpoint_model: str | None = typer.Option(None, "--endpoint-model", help="The served model's name (default: "
                                              "the first one its /v1/models lists)."),
    speed_window_ms: float = typer.Option(250.0, "--speed-window-ms", min=0.0, help="Paired: the simulator follows "
                                          "the machine's speed over each run, the probe's samples within this many "
                                          "ms of a step (0: a steady machine, the table's means)."),
    efficiency: float | None = typer.Option(None, "--efficiency", help="Modelled mode: a stated flat fraction of "
                                            "the roofline for every op (default: tokprof's step model, the one "
                                            "`rollup --modelled` uses, with its per-step overhead)."),
    overhead_us: float | None = typer.Option(None, "--overhead-us", help="Per-step overhead added by the simulator, "
                                             "us (default: measured scheduler time; modelled mode: 0)."),
    usd_per_hour: float | None = typer.Option(None, "--usd-per-hour", help="Stated $ per device-hour (overrides the "
                                              "price sheet)."),
    all_in_kw: float | None = typer.Option(None, "--all-in-kw", help="Stated all-in kW per device."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights, lengths, token ids and arrivals."),
    out: Path = typer.Option(Path("serve-bench-out"), "-o", "--out",  # noqa: B008 - typer reads defaults
                             help="Folder for serve-bench.json (saved after every rate), serve-bench.md and .png."),
) -> None:
    """Serve a rate sweep with tokprof's continuous-batching server, simulate it beside, find the SLO rate."""
    from rich.markup import escape

    from tokprof.serving.bench import BenchOptions, run_bench
    from tokprof.serving.metrics import Slo
    from tokprof.serving.report import markdown, plot

    check_output("--out", out, folder=True)
    if gpu is None and not (device == "cpu" or device.startswith("cuda")):
        fail(f"--device: expected cpu or cuda[:N], got {device!r}")
    opts = BenchOptions(model=model, device=device, dtype=dtype, backend=backend, gpu=gpu, block_size=block_size,
                        num_blocks=num_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=token_budget,
                        prefix_caching=prefix_caching, mode=mode, input_len=input_len, output_len=output_len,
                        turn_input_len=turn_input_len, turns=turns, think_s=think_s, clients=clients, trace=trace,
                        num_requests=num_requests, rates=_rates(rates), seed=seed, threads=threads, clock=clock,
                        paired=paired, speed_window_s=speed_window_ms / 1e3 or None, graphs=cuda_graphs,
                        endpoint=endpoint,
                        endpoint_model=endpoint_model,
                        efficiency=efficiency, overhead_us=overhead_us, usd_per_gpu_hour=usd_per_hour,
                        all_in_kw_per_gpu=all_in_kw)
    try:
        default = Slo(1.0, 0.05) if gpu is None and endpoint is None and device == "cpu" else Slo(2.0, 0.05)
        slo = Slo(slo_ttft_ms / 1e3 if slo_ttft_ms is not None else default.ttft_s,
                  slo_tpot_ms / 1e3 if slo_tpot_ms is not None else default.tpot_s)
    except ValueError as err:
        fail(str(err).replace("slo.ttft_s", "--slo-ttft-ms").replace("slo.tpot_s", "--slo-tpot-ms"))
    json_path = out / "serve-bench.json"
    state: dict = {"rates": 0}

    def save(doc: dict) -> None:
        from tokprof.profiler.schema import save_json_atomic

        save_json_atomic(doc, json_path)
        state["rates"] = len(doc["points"])

    try:
        doc = run_bench(opts, save, log=lambda m: err_console.print(f"[dim]{escape(m)}[/]"), slo=slo)
    except typer.Exit:
        raise
    except (ValueError, RuntimeError) as err:
        fail(str(err))
    except KeyboardInterrupt:
        interrupted(f"{state['rates']} rate(s) finished are in {json_path}" if state["rates"] else
                    "no rate finished")
    md_path = out / "serve-bench.md"
    tmp = md_path.with_name(f".{md_path.name}.{os.getpid()}.tmp")
    tmp.write_text(markdown(doc))
    tmp.replace(md_path)
    png = plot(doc, out / "serve-bench.png")

    table = Table(title=f"serve-bench: {escape(doc['model'])} on {escape(str(doc.get('gpu')))}; SLO "
                  f"{escape(doc['slo_text'])}")
    for col in ("rate/s", "source", "tokens/s", "TTFT p90 ms", "TPOT p50 ms", "goodput req/s", "SLO", "errors "
                "(tput, TPOT, TTFT)"):
        table.add_column(col)
    for p in doc["points"]:
        for side in ("measured", "predicted"):
            s = p.get(side)
            if not s:
                continue
            errs = p.get("errors") if side == "predicted" else None
            err_text = ", ".join("-" if v is None else f"{v:+.0%}" for v in errs.values()) if errs else ""
            table.add_row(f"{p['rate_per_s']:.3g}", side, f"{s['output_tokens_per_s_per_gpu']:.1f}",
                          f"{s['ttft_s']['p90'] * 1e3:.1f}",
                          "-" if s['median_tpot_s'] is None else f"{s['median_tpot_s'] * 1e3:.2f}",
                          f"{s['goodput_requests_per_s']:.2f}", "met" if s["slo_met"] else "missed", err_text)
    print_wide(table)
    search = doc.get("slo_search", {})
    if search.get("max_rate_per_s") is not None:
        cost = search["cost"]
        usd = cost.get("usd_per_million_tokens")
        console.print(f"highest rate meeting the SLO (simulated): {search['max_rate_per_s']:.3g} req/s, "
                      f"{search['summary']['output_tokens_per_s_per_gpu']:.1f} tokens/s; "
                      f"$/M tokens: {'-' if usd is None else f'{usd:.3g}'}"
                      f"{'' if not cost.get('reason') else ' (' + escape(cost['reason']) + ')'}")
    if doc.get("cpu_load"):
        console.print(f"[dim]{escape(doc['cpu_load']['note'])}[/]")
    if doc.get("validation"):
        v = doc["validation"]
        console.print(f"simulator vs {escape(v['against'])} over {v['rates']} rates: goal "
                      f"{'met' if v['met'] else 'not met'}")
    console.print(f"wrote {json_path}, {md_path}" + (f", {png}" if png else ""))
    print(json.dumps({"command": "serve-bench", "output": str(json_path), "report": str(md_path),
                      "model": doc["model"], "gpu": doc.get("gpu"), "mode": doc.get("mode"),
                      "slo": doc["slo"], "validation": doc.get("validation"),
                      "slo_search": {k: v for k, v in search.items() if k != "summary"},
                      "points": [{"rate_per_s": p["rate_per_s"], "errors": p.get("errors"),
                                  "measured_tokens_per_s": (p.get("measured") or {}).get("output_tokens_per_s_per_gpu"),
                                  "predicted_tokens_per_s": (p.get("predicted") or {}).get(
                                      "output_tokens_per_s_per_gpu")}
                                 for p in doc["points"]]}))
