"""`tokprof e2e` and `tokprof reconcile`: the command-line layer over tokprof.models.e2e and tokprof.rollup.reconcile.

    tokprof e2e --model tiny                                   # CPU: tokprof eager + transformers, tiny preset
    tokprof e2e --model llama-3.1-8b --batch 1,8 --context 1k,8k --mode eager,graph -o run.json
    tokprof reconcile run.json --utilisation 0.6               # the waterfall, written back into run.json
"""

from __future__ import annotations

import dataclasses
import gc
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from tokprof.models.e2e import FRAMEWORKS, MODES, E2EMeasurement


@dataclass
class E2EArgs:
    model: str | None
    model_dir: str | None
    batches: list[int]
    contexts: list[int]
    modes: list[str] | None  # None: eager,graph on a GPU, eager on the CPU
    frameworks: list[str]
    steps: int
    warmup: int
    device: torch.device
    backend: str | None
    dtype: str | None  # a precision label: fp32 | fp16 | bf16, or a weight format (fp8, mxfp4, ...)
    output: str | None
    seed: int = 0
    energy: bool = True
    profile: bool = True
    command: list[str] = field(default_factory=lambda: list(sys.argv))
    # Explicit (batch, context) points; None: every batch x context. (A sweep that drops the points that do not fit
    # is not a cross product any more: batch 128 may fit at 1k context and not at 8k.)
    points: list[tuple[int, int]] | None = None
    # Where the frameworks other than tokprof are measured; None: at every point.
    framework_points: list[tuple[int, int]] | None = None
    energy_window_s: float = 1.0  # seconds of decode steps inside one NVML window per point and mode
    cpu_window_s: float = 1.5  # CPU: seconds of rewound blocks of timed steps per point and mode (e2e.CPU_WINDOW_S)
    kv_dtype: str | None = None  # "fp8": an e4m3 KV cache
    accuracy: bool = True  # a quantised model also measures its logit error against the unquantised one


def model_precision(a: E2EArgs) -> Any:
    """The Precision of `a`: --dtype a float dtype or a weight format (activations bf16 on a GPU, fp32 on the CPU
    unless the label names them), --kv-dtype fp8; ValueError for a combination this device cannot run."""
    from tokprof.quant.precision import ACT_PREFIX, check_supported, parse_precision

    default = "bf16" if a.device.type == "cuda" else "fp32"
    precision = parse_precision(a.dtype or default, kv_dtype=a.kv_dtype)
    if precision.weight_format is not None and ACT_PREFIX not in (a.dtype or ""):
        precision = parse_precision(precision, activation=default)
    check_supported(precision, device=a.device, backend=a.backend or ("triton" if a.device.type == "cuda"
                                                                      else "torch"))
    return precision


def load_model(a: E2EArgs, quantise: bool = True) -> Any:
    """The tokprof Transformer of --model-dir (weights from disk) or of the --model preset (random weights), in
    --dtype's format (`quantise=False`: the unquantised model of the same weights, the accuracy reference)."""
    precision = model_precision(a)
    model = _load_weights(a, precision.activation)
    return model.quantize(precision.label) if quantise and precision.quantised else model


def _load_weights(a: E2EArgs, dtype: str) -> Any:
    from tokprof.models.config import ModelConfig
    from tokprof.models.transformer import Transformer

    backend = a.backend or ("triton" if a.device.type == "cuda" else "torch")
    if a.model_dir:
        model = Transformer.from_pretrained(a.model_dir, device=a.device, dtype=dtype, backend=backend)
        if a.model:  # the name the roll-up points use
            model.config = dataclasses.replace(model.config, name=a.model)
        return model
    if not a.model:
        raise ValueError("--model: expected a preset name (tiny, llama-3.1-8b, ...) or --model-dir DIR")
    return Transformer.random(ModelConfig.from_name(a.model), device=a.device, dtype=dtype, seed=a.seed,
                              backend=backend)


def _open_run(a: E2EArgs, model: Any) -> Any:
    from tokprof.profiler.bench import new_run
    from tokprof.profiler.schema import load_run

    if a.output and Path(a.output).is_file():
        run = load_run(a.output)
        if run.model is not None and run.model.get("name") != model.config.name:
            raise ValueError(f"-o {a.output}: the run holds model {run.model.get('name')!r}, not "
                             f"{model.config.name!r}; write to another file")
    else:
        run = new_run(a.command, a.device)
    if run.model is None:
        run.model = model.config.to_dict()
    return run


def _energy_meter(device: torch.device) -> tuple[Any, float | None, str | None]:
    """(meter, idle power W, None) on a GPU with NVML, else (None, None, why). The idle power is measured once per
    run: reused when this process measured it lately (`tokprof run`: before its kernel benchmarks)."""
    from tokprof.profiler.bench import IDLE_SETTLE_S
    from tokprof.profiler.energy import energy_status, make_meter, measure_idle_power, recent_idle_power

    reason = energy_status(device)
    if reason is not None:
        return None, None, reason
    meter = make_meter(device)
    idle_w = recent_idle_power(device)
    if idle_w is None:
        idle_w = measure_idle_power(meter, seconds=1.0, settle_s=IDLE_SETTLE_S)
    meter.idle_power_w = idle_w
    return meter, idle_w, None


def e2e_points(a: E2EArgs) -> list[tuple[int, int]]:
    """The (batch, context) points of `a`: its explicit points, else every batch x context."""
    points = a.points if a.points is not None else [(b, c) for b in a.batches for c in a.contexts]
    if not points:
        raise ValueError("--batch/--context: expected at least one (batch, context) point, got none")
    return list(points)


def run_e2e(a: E2EArgs, console: Console, err_console: Console) -> tuple[list[E2EMeasurement], str | None]:
    """Measure every (framework, mode, batch, context); returns (measurements, path written or None).

    tokprof measures all its modes of one point from one prefill (measure_e2e_modes); a point or mode that fails
    (does not fit, a kernel error) is skipped with its reason in the run's notes, and the sweep goes on."""
    from tokprof.models.adapters import measure_transformers, measure_vllm, vllm_status
    from tokprof.models.e2e import measure_e2e_modes
    from tokprof.profiler.bench import SWEEP_ERRORS
    from tokprof.profiler.schema import save_run

    for fw in a.frameworks:
        if fw not in FRAMEWORKS:
            raise ValueError(f"--framework: expected some of {list(FRAMEWORKS)}, got {fw!r}")
    modes = a.modes or (["eager", "graph"] if a.device.type == "cuda" else ["eager"])
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"--mode: expected some of {list(MODES)}, got {mode!r}")
    points = e2e_points(a)
    model = load_model(a)
    run = _open_run(a, model)
    meter = idle_w = None
    if a.energy:
        meter, idle_w, why = _energy_meter(a.device)
        if why is not None:
            err_console.print(f"[dim]energy: {why}[/]")
    # Where energy cannot be measured each record says why (energy_status), so `energy` stays as asked.
    kwargs = {"steps": a.steps, "warmup": a.warmup, "seed": a.seed, "energy": a.energy}
    results: list[E2EMeasurement] = []

    def skip(what: str, why: str) -> None:
        err_console.print(f"[yellow]skipped[/] {what}: {why}")
        run.notes.append(f"e2e skipped {what}: {why}")

    def keep(m: E2EMeasurement) -> None:
        results.append(m)
        run.e2e.append(m.to_dict())
        if a.output:
            save_run(run, a.output)  # after every point: an interrupted sweep keeps what it measured

    def free() -> None:  # outside the except blocks: their tracebacks pinned the failed point's tensors
        if a.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err_console)
    task = bar.add_task("end to end", total=0)
    with bar:
        for fw in a.frameworks:
            fw_modes = []
            for mode in modes:
                if fw != "tokprof" and model.precision.quantised:
                    skip(f"{fw} {mode}", f"tokprof's {model.precision.label} weights run in tokprof's kernels only; "
                         f"{fw} would measure another model (its own quantisation or the unquantised weights)")
                elif mode == "graph" and a.device.type != "cuda" and fw != "vllm":
                    skip(f"{fw} graph", "CUDA graphs need a CUDA device")
                elif fw == "transformers" and mode == "graph":
                    skip("transformers graph", "the transformers adapter measures eager decoding only")
                elif fw == "vllm" and (why := vllm_status() if a.device.type == "cuda" else "vLLM needs a CUDA GPU"):
                    skip(f"vllm {mode}", why)
                else:
                    fw_modes.append(mode)
            fw_points = points
            if fw != "tokprof" and a.framework_points is not None:
                wanted = {tuple(p) for p in a.framework_points}
                fw_points = [p for p in points if p in wanted]
                if fw_modes and len(fw_points) < len(points):
                    run.notes.append(f"e2e {fw}: measured at (batch, context) {fw_points} only, to keep the run short; "
                                     "tokprof at every point")
            if fw_modes:  # the bar grows framework by framework: tokprof measures all its modes of a point at once
                bar.update(task, total=bar.tasks[0].total + len(fw_points) * (1 if fw == "tokprof" else len(fw_modes)))
            for batch, context in fw_points:
                if fw == "tokprof" and fw_modes:
                    # Eager first: a graph capture that fails after it leaves the point's eager measurement kept.
                    fw_modes = sorted(fw_modes, key=lambda mode: mode != "eager")
                    what = f"tokprof {'+'.join(fw_modes)} batch {batch} context {context}"
                    bar.update(task, description=what)
                    failed = False
                    try:  # the modes come one at a time: a graph capture that fails keeps the eager measurement
                        for m in measure_e2e_modes(model, batch, context, fw_modes, meter=meter, idle_power_w=idle_w,
                                                   profile=a.profile, energy_window_s=a.energy_window_s,
                                                   cpu_window_s=a.cpu_window_s, **kwargs):
                            keep(m)
                    except SWEEP_ERRORS as err:  # does not fit, too short a context, a kernel error: say so, go on
                        skip(what, f"{type(err).__name__}: {err}")
                        failed = True
                    if failed:
                        free()
                    bar.advance(task)
                    continue
                for mode in fw_modes:
                    what = f"{fw} {mode} batch {batch} context {context}"
                    bar.update(task, description=what)
                    m = None
                    try:
                        if fw == "transformers":
                            m = measure_transformers(model, batch, context, meter=meter, idle_power_w=idle_w,
                                                     profile=a.profile, energy_window_s=a.energy_window_s,
                                                     cpu_window_s=a.cpu_window_s, **kwargs)
                        else:
                            m = measure_vllm(model, batch, context, mode=mode, meter=meter, **kwargs)
                    except SWEEP_ERRORS as err:  # does not fit, too short a context: say so, go on
                        skip(what, f"{type(err).__name__}: {err}")
                    bar.advance(task)
                    if m is None:
                        free()
                        continue
                    keep(m)
    if results and a.accuracy and model.precision.quantised:
        _accuracy(a, model, run, console, err_console)
    print_e2e(console, results)
    return results, a.output


def _accuracy(a: E2EArgs, model: Any, run: Any, console: Console, err_console: Console) -> None:
    """Measure the quantised model's logit error against the same weights unquantised; into run.accuracy."""
    from tokprof.profiler.bench import SWEEP_ERRORS
    from tokprof.profiler.schema import save_run
    from tokprof.quant.accuracy import measure_accuracy

    err_console.print(f"accuracy of {model.precision.label} against {model.precision.activation} ...")
    try:
        reference = load_model(a, quantise=False)
        report = measure_accuracy(reference, model)
    except SWEEP_ERRORS as err:
        run.notes.append(f"accuracy not measured: {type(err).__name__}: {err}")
        err_console.print(f"[yellow]accuracy not measured[/]: {escape(str(err))}")
        return
    finally:
        model.free_cache()
    run.accuracy.append(report.to_dict())
    if a.output:
        save_run(run, a.output)
    console.print(f"accuracy ({report.provenance}) of {report.precision} against {report.reference}: greedy "
                  f"agreement {report.greedy_agreement:.1%} over {report.positions} positions; logit error max "
                  f"{report.max_abs_logit_error:.4g}, mean {report.mean_abs_logit_error:.4g} (mean |logit| "
                  f"{report.mean_abs_reference_logit:.4g}); {report.prompt_set}")


def _wide(console: Console) -> Console:
    """A terminal wraps tables to its width; a pipe or a file gets 160 columns, not 80."""
    return console if console.is_terminal else Console(width=160)


def print_e2e(console: Console, results: list[E2EMeasurement]) -> None:
    from tokprof.reports.document import num

    console = _wide(console)
    if not results:
        console.print("[yellow]no end-to-end measurement[/]")
        return
    first = results[0]
    table = Table(title=f"tokprof e2e: {first.model} {first.dtype} on {first.device}")
    for col in ("framework", "mode", "batch", "context", "median step us", "p90 us", "tokens/s/GPU",
                "tokens/s/user", "TTFT ms", "J/token", "GPU busy"):
        table.add_column(col, justify="left" if col in ("framework", "mode") else "right")
    for m in results:  # "tokprof (triton)"; a framework's versioned backend ("transformers-5.23.0") alone
        who = m.backend if m.backend.startswith(m.framework) else f"{m.framework} [dim]({m.backend})[/]"
        table.add_row(who, m.mode, str(m.batch), str(m.context),
                      num(m.median_step_us), num(m.p90_step_us), num(m.tokens_per_s_per_gpu),
                      num(m.tokens_per_s_per_user), "-" if m.ttft_ms is None else num(m.ttft_ms),
                      "-" if m.j_per_token is None else num(m.j_per_token),
                      "-" if m.gpu_busy_fraction is None else f"{m.gpu_busy_fraction:.0%}")
    console.print(table)
    reasons = {r for m in results for r in (m.energy_reason if m.j_per_token is None else None,
                                            m.gpu_busy_reason) if r}
    for r in sorted(reasons):
        console.print(f"[dim]{r}[/]")


def print_reconciliation(console: Console, recs: list[Any], top_ops: int = 5) -> None:
    """The waterfall of each point, its costliest ops inside L1 -> L2, and the bottom-up error."""
    from tokprof.rollup.reconcile import waterfall_rows

    console = _wide(console)
    for rec in recs:
        tp = getattr(rec, "tp", 1) or 1
        title = (f"{rec.model} on {rec.gpu}, batch {rec.batch}, context {rec.context}, {rec.dtype}"
                 + (f", tp={tp}" if tp > 1 else ""))
        table = Table(title=escape(title), show_lines=False)  # the model and GPU names are the user's text
        rows = waterfall_rows(rec)
        for col in rows[0]:
            table.add_column(col, justify="left" if col in ("layer", "gap", "provenance / why") else "right")
        for row in rows:
            table.add_row(*(escape(str(v)) for v in row.values()))
        console.print(table)
        if rec.op_inefficiency:
            where = "L1i -> L2 (kernels and collectives)" if tp > 1 else "L1 -> L2"
            ops = Table(title=f"kernel inefficiency inside {where} (per step)")
            for col in ("op", "where", "measured us", "at roof us", "lost us", "share of gap"):
                ops.add_column(col, justify="left" if col in ("op", "where") else "right")
            for o in [o for o in rec.op_inefficiency if getattr(o, "finding", True)][:top_ops]:
                ops.add_row(escape(o.op), escape(o.label), f"{o.time_us_measured:,.1f}", f"{o.time_us_at_roof:,.1f}",
                            f"{o.lost_us:,.1f}", "-" if o.share_of_L1_L2_gap is None else
                            f"{o.share_of_L1_L2_gap:.1%}")
            console.print(ops)
        if rec.bottom_up_error_pct is not None:
            energy = ("" if rec.energy_error_pct is None else
                      f"; J/token {rec.energy_error_pct:+.1f}% against {rec.bottom_up_error_against}")
            console.print(f"bottom-up error (L2 vs {rec.bottom_up_error_against}, tokens/s): "
                          f"[bold]{rec.bottom_up_error_pct:+.1f}%[/]{energy}")
        if not getattr(rec, "reliable", True):
            console.print(f"[yellow]unreliable[/] {escape(rec.unreliable_reason or '')}")
        for flag in getattr(rec, "flags", []):
            console.print(f"[yellow]flag[/] {escape(flag)}")
        for note in rec.notes:
            console.print(f"[dim]{escape(note)}[/]")
