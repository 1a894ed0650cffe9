"""`tokprof run`: the whole story for the hardware in front of you, in one command.

    tokprof run                        # GPU: llama-3.1-8b bf16, triton; CPU: the tiny preset, fp32, torch backend
    tokprof run --model qwen3-8b --out results/

Steps, each saved to the RunResult as soon as it is measured (an interrupted run keeps what it had):
1. detect the device and refuse a model whose weights and KV cache do not fit (saying how much memory it needs);
2. measure the ceilings (copy bandwidth, GEMM FLOP/s);
3. benchmark every distinct kernel call of the model's decode plan over the sweep and roll up (tokens/s, J/token,
   $/M tokens, tokens/s/MW) with the default price sheet;
4. measure the same model end to end (tokprof with CUDA graphs and eager, transformers);
5. reconcile (the iceberg, L0..L5);
6. add rows for other GPUs: projected from this run's measured efficiencies when it ran on a GPU, else from the
   shipped reference measurements (tokprof/data/reference/<gpu>/) when present, else modelled from datasheets;
7. write the RunResult, the report and a history entry, and print where they are (last line: one JSON document).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tokprof.models.config import ModelConfig
from tokprof.profiler.cpu_load import CpuLoad, describe_record, load_record
from tokprof.profiler.devices import resolve_device
from tokprof.profiler.schema import RunResult, file_part, load_run, mark_interrupted, save_run
from tokprof.quant.precision import check_supported, parse_precision
from tokprof.reports.history import History
from tokprof.rollup.step_prediction import prediction_line, prediction_summary  # noqa: F401 (re-exported)
from tokprof.run_estimate import (  # noqa: F401  (re-exported: the estimate is part of the runner's API)
    EST_CAPTURE_LAUNCH_US,
    EST_COMPILE_S,
    EST_E2E_MODE_S,
    EST_ENERGY_ALIGN_S,
    EST_FIXED_S,
    EST_FRAMEWORK_POINT_S,
    EST_GRAPH_INSTANTIATE_S,
    EST_KERNEL_EFFICIENCY,
    EST_KERNEL_OVERHEAD_S,
    EST_LAUNCH_US,
    EST_PREFILL_TFLOPS,
    estimate_gpu_seconds,
    graph_capture_seconds,
)
from tokprof.term import OutputConsole

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"
OTHER_GPUS = ("h100-sxm", "h200", "b200")
GPU_DEFAULT_MODEL = "llama-3.1-8b"
SKIPPABLE = ("e2e", "other-gpus", "report", "history")  # `tokprof run --skip`: the stages a user may leave out


@dataclass
class RunConfig:
    """What one `tokprof run` measures. `for_device` gives the defaults of the issue: a GPU sweep that fits in about
    5 minutes of GPU time, and a CPU sweep that fits in under 3 minutes on 2 cores.

    GPU budget (llama-3.1-8b, batch {1, 8, 32, 128} x context {1k, 8k}), estimated for an H100 before the first
    measured run; `estimate_gpu_seconds` holds the arithmetic (~280 s with these defaults):
    - kernels: 60 distinct decode-step calls, each timed for up to 0.4 s (events, cold L2), then an energy window of
      1 s (>= 1 s for the NVML counter) after a 0.2 s cool-down (plus up to two counter updates, ~0.1 s, to align
      the window) and ~0.3 s of set-up: ~2.1 s a call, ~126 s; the 32 calls modelled under 10 us on the H100
      datasheet are also timed in graph mode (0.4 s each) after a capture of at most 256 rotating input copies
      (sized by the bytes each call touches; ~0.06 s): ~15 s; plus Triton's first compilations (~30 s cold);
    - end to end, tokprof: 7 points (batch 128 at 8k context needs ~137 GB of KV cache and is dropped), graph and
      eager from one prefill per point: prefills of 505k prompt tokens in all (+ a warm-up sub-batch per point;
      ~10 PFLOP, ~25 s), then per mode 36 steps, a 1 s energy window and 8 profiled steps (GPU activities only;
      ~3 s): ~45 s;
    - end to end, transformers: at 2 points only, (1, 1k) and (8, 8k): its eager loop costs ~40 ms of Python per
      step whatever the batch, and its profile holds ~100k host events: ~10 s a point;
    - ceilings, idle power, model set-up, report: ~20 s. In all ~4.5-5 minutes. The cool-down is 0.2 s rather than
      energy.py's 0.5 s default to stay in budget; energy on all kernels is kept because a bottom-up J/token needs
      every kernel of a step.
    """

    model: str
    device: torch.device
    backend: str
    dtype: str
    batches: list[int]
    contexts: list[int]
    e2e_batches: list[int]
    e2e_contexts: list[int]
    e2e_steps: int
    e2e_modes: list[str]
    frameworks: list[str]
    energy: bool
    timing_kwargs: dict[str, Any] = field(default_factory=dict)
    energy_kwargs: dict[str, Any] = field(default_factory=dict)  # energy.measure_kernel_energy: window_s, cooldown_s
    e2e_energy_window_s: float = 1.0
    e2e_cpu_window_s: float = 1.5  # CPU: rewound blocks of timed steps (and paired kernel rounds) per point and mode
    # (batch, context) points end to end; None: e2e_batches x e2e_contexts. check_fits sets the points that fit.
    e2e_points: list[tuple[int, int]] | None = None
    # Where frameworks other than tokprof run; None: at every end-to-end point.
    framework_points: list[tuple[int, int]] | None = None
    prices: Any = None  # rollup.economics.PriceOptions; None: the shipped price sheet
    utilisation: float | None = None  # duty cycle served, for L5 of the iceberg; None: L5 not applied
    skip: frozenset[str] = frozenset()  # stages left out: some of SKIPPABLE
    other_gpu_model: str | None = None  # the model of the other GPUs' rows; None: the model measured, on a GPU

    def with_options(self, *, batches: list[int] | None = None, contexts: list[int] | None = None,
                     dtype: str | None = None, backend: str | None = None, prices: Any = None,
                     utilisation: float | None = None, skip: Sequence[str] = ()) -> RunConfig:
        """These defaults with what the user asked for (`tokprof run --batch ... --skip e2e`); a sweep the user
        names is measured end to end too."""
        unknown = sorted(set(skip) - set(SKIPPABLE))
        if unknown:
            raise ValueError(f"--skip: expected some of {list(SKIPPABLE)}, got {unknown}")
        if utilisation is not None and not 0 < utilisation <= 1:
            raise ValueError(f"--utilisation: expected a fraction in (0, 1], got {utilisation}")
        rc = dataclasses.replace(self, skip=frozenset(skip), prices=prices, utilisation=utilisation)
        if batches:
            rc.batches, rc.e2e_batches, rc.e2e_points, rc.framework_points = list(batches), list(batches), None, None
        if contexts:
            rc.contexts, rc.e2e_contexts, rc.e2e_points, rc.framework_points = (list(contexts), list(contexts), None,
                                                                                 None)
        rc.dtype = dtype or rc.dtype
        rc.backend = backend or rc.backend
        return rc

    @classmethod
    def for_device(cls, device: torch.device, model: str | None = None) -> RunConfig:
        if device.type == "cuda":
            return cls(model=model or GPU_DEFAULT_MODEL, device=device, backend="triton", dtype="bf16",
                       batches=[1, 8, 32, 128], contexts=[1024, 8192], e2e_batches=[1, 8, 32, 128],
                       e2e_contexts=[1024, 8192], e2e_steps=32, e2e_modes=["graph", "eager"],
                       frameworks=["tokprof", "transformers"], energy=True,
                       timing_kwargs={"max_time_s": 0.4}, energy_kwargs={"window_s": 1.0, "cooldown_s": 0.2},
                       e2e_energy_window_s=1.0, framework_points=[(1, 1024), (8, 8192)])
        # CPU: small enough for 2 cores in well under 3 minutes; the CPU has no energy counter.
        return cls(model=model or "tiny", device=device, backend="torch", dtype="fp32", batches=[1, 4],
                   contexts=[128, 512], e2e_batches=[1, 4], e2e_contexts=[128, 512], e2e_steps=8,
                   e2e_modes=["eager"], frameworks=["tokprof", "transformers"], energy=False,
                   timing_kwargs={"min_time_s": 0.05, "max_time_s": 0.3})


def memory_needed_bytes(config: ModelConfig, dtype: torch.dtype | str, batch: int, context: int) -> int:
    """Weights, the KV cache of the largest point, and a 10% + 2 GiB allowance for activations and the allocator."""
    weights = config.weight_bytes(dtype)
    kv = config.kv_bytes_per_token(dtype) * batch * context
    return int((weights + kv) * 1.1) + (2 << 30)


def available_memory_bytes(device: torch.device) -> tuple[int | None, str]:
    """Memory the run may fill and how to name it: the GPU's total, or the RAM Linux says is available (None where
    neither is known)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, "the GPU has"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "this machine has available"
    except (OSError, ValueError, IndexError):
        pass
    return None, "unknown"


def check_fits(config: ModelConfig, rc: RunConfig) -> list[str]:
    """Refuse a model whose weights do not fit; drop end-to-end points whose KV cache does not (and say so)."""
    dtype = rc.dtype  # a float dtype or a low-precision label: ModelConfig counts the bytes of either
    total, has = available_memory_bytes(rc.device)
    if total is None:
        return [f"memory not checked: the available memory of {rc.device} is unknown"]
    weights_only = memory_needed_bytes(config, dtype, 0, 0)
    if weights_only > total:
        smaller = "llama-3.2-1b" if rc.device.type == "cuda" else "tiny"
        raise ValueError(f"--model {config.name}: needs about {weights_only / 1e9:.1f} GB for weights alone "
                         f"({config.weight_bytes(dtype) / 1e9:.1f} GB in {rc.dtype}), {has} "
                         f"{total / 1e9:.1f} GB; choose a smaller model (e.g. {smaller})")
    notes = []
    points = rc.e2e_points if rc.e2e_points is not None else [(b, c) for b in rc.e2e_batches
                                                                for c in rc.e2e_contexts]
    kept = [(b, c) for b, c in points if memory_needed_bytes(config, dtype, b, c) <= total]
    for b, c in points:
        if (b, c) not in kept:
            need = memory_needed_bytes(config, dtype, b, c)
            notes.append(f"end to end batch {b} context {c} skipped: needs about {need / 1e9:.0f} GB "
                         f"(weights + KV cache), {has} {total / 1e9:.0f} GB")
    # The kept points themselves: the batches x contexts of what is left would bring a dropped point back (batch 128
    # fits at 1k context, context 8k fits at batch 32, batch 128 at 8k does not).
    rc.e2e_points = kept
    rc.e2e_batches = sorted({b for b, _ in kept})
    rc.e2e_contexts = sorted({c for _, c in kept})
    return notes


def reference_runs(directory: Path | None = None) -> dict[str, Path]:
    """gpu key -> the newest shipped reference RunResult (tokprof/data/reference/<gpu>/*.json)."""
    directory = REFERENCE_DIR if directory is None else directory
    found: dict[str, Path] = {}
    if directory.is_dir():
        for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
            files = sorted(sub.glob("*.json"))
            if files:
                found[sub.name] = files[-1]
    return found


def other_gpu_rows(run: RunResult, rc: RunConfig, console: Console) -> list[str]:
    """Projected or modelled roll-up rows for H100, H200 and B200, appended to run.rollup; returns notes."""
    from tokprof.rollup import modelled, project
    from tokprof.rollup.command import load_model
    from tokprof.rollup.records import merge_points

    notes: list[str] = []
    # A CPU run of the default tiny model shows the GPUs with the GPU default model; a model the user named is the
    # model shown on every GPU.
    wanted = rc.other_gpu_model or GPU_DEFAULT_MODEL
    if rc.device.type == "cuda":
        for gpu in OTHER_GPUS:
            try:
                points = project(run, gpu, prices=rc.prices)
            except ValueError as err:
                notes.append(f"projection to {gpu} not made: {err}")
                continue
            merge_points(run.rollup, points)
            notes.append(f"projected {len(points)} point(s) to {gpu} from this run's measured efficiencies")
        return notes
    refs = reference_runs()
    for gpu in OTHER_GPUS:
        ref = refs.get(gpu)
        points = []
        if ref is not None:
            try:
                ref_run = load_run(ref)
                if (ref_run.model or {}).get("name") != load_model(wanted).name:  # the model asked for, not the ref's
                    raise ValueError(f"it measured {(ref_run.model or {}).get('name')}, not {wanted}")
                points = project(ref_run, gpu, prices=rc.prices)
                notes.append(f"{gpu}: projected from the shipped reference run {ref.name} "
                             f"({ref_run.provenance.device.name}, {ref_run.provenance.timestamp_utc})")
            except ValueError as err:
                notes.append(f"{gpu}: the shipped reference {ref} could not be used ({err}); modelled instead")
        if not points:
            config = load_model(wanted)
            gpu_rc = RunConfig.for_device(torch.device("cuda"), wanted)
            points = modelled(config, gpu, gpu_rc.batches, gpu_rc.contexts, dtype=gpu_rc.dtype, prices=rc.prices)
            if ref is None:
                notes.append(f"{gpu}: {config.name} modelled from the datasheet by the step model (no "
                             "shipped reference run)")
        merge_points(run.rollup, points)
    for note in notes:
        console.print(f"    [dim]{note}[/]")
    return notes


E2E_CPU_PASSES = 3  # CPU: passes over the end-to-end points, each with 1/3 of e2e_cpu_window_s, merged


def run_e2e_points(run: RunResult, rc: RunConfig, run_path: Path, console: Console) -> None:
    """End-to-end measurements of the model (tokprof graph/eager, transformers), appended to run.e2e as they come."""
    from tokprof.models.e2e import merge_records
    from tokprof.models.e2e_command import E2EArgs
    from tokprof.models.e2e_command import run_e2e as run_e2e_command

    points = rc.e2e_points if rc.e2e_points is not None else [(b, c) for b in rc.e2e_batches
                                                                for c in rc.e2e_contexts]
    if not points:
        run.notes.append("end to end: no point fits on this device")
        return
    save_run(run, run_path)  # run_e2e extends the file it is given
    if rc.device.type == "cuda":  # what the kernel benchmarks left in the caching allocator goes back first
        gc.collect()
        torch.cuda.empty_cache()
    from_dir = Path(rc.model).expanduser().is_dir()  # a Hugging Face directory: its real weights end to end
    passes = E2E_CPU_PASSES if rc.device.type == "cpu" else 1
    args = E2EArgs(model=None if from_dir else rc.model, model_dir=rc.model if from_dir else None,
                   batches=rc.e2e_batches, contexts=rc.e2e_contexts,
                   modes=rc.e2e_modes, frameworks=rc.frameworks, steps=rc.e2e_steps, warmup=4, device=rc.device,
                   backend=rc.backend, dtype=rc.dtype, output=str(run_path), energy=rc.energy,
                   command=list(run.provenance.command), points=points, framework_points=rc.framework_points,
                   energy_window_s=rc.e2e_energy_window_s, cpu_window_s=rc.e2e_cpu_window_s / passes)
    before = len(load_run(run_path).e2e)
    for _ in range(passes):  # CPU: passes over the points, merged after each (an interrupted run keeps them)
        run_e2e_command(args, console, OutputConsole(stderr=True))
        fresh = load_run(run_path)
        fresh.e2e = fresh.e2e[:before] + merge_records(fresh.e2e[before:])
        save_run(fresh, run_path)
    run.e2e = fresh.e2e
    run.notes = list(dict.fromkeys(fresh.notes))


def run_main(model: str | None = None, out_dir: str | Path = "tokprof-out", device: str = "auto", *,
             console: Console | None = None, command: Sequence[str] | None = None,
             history_db: str | Path | None = None, report: bool = True,
             config_override: RunConfig | None = None, batches: list[int] | None = None,
             contexts: list[int] | None = None, dtype: str | None = None, kv_dtype: str | None = None,
             backend: str | None = None, prices: Any = None, utilisation: float | None = None,
             skip: Sequence[str] = ()) -> Path:
    """Run the whole chain and return the RunResult path. See the module docstring. `model` is a preset or a
    Hugging Face directory; `batches` .. `skip` override RunConfig.for_device's defaults (RunConfig.with_options);
    `dtype` may be a low-precision format and `kv_dtype` fp8 (tokprof.quant.precision)."""
    from tokprof.profiler.bench import new_run
    from tokprof.profiler.ceilings import measure_ceilings
    from tokprof.profiler.overhead import measure_overhead
    from tokprof.rollup import bottom_up
    from tokprof.rollup.reconcile import reconcile

    console = console or OutputConsole()
    t0 = time.perf_counter()
    cpu_load = CpuLoad.start()
    phases: dict[str, Any] = {}  # phase -> CpuLoadResult: how shared the CPU was in each
    dev = resolve_device(device)
    history = History(history_db)
    history.check(write=True)  # a foreign, newer or unwritable history is said before the run, not after it
    from tokprof.rollup.command import load_model

    rc = (config_override or RunConfig.for_device(dev, model)).with_options(
        batches=batches, contexts=contexts, backend=backend, prices=prices, utilisation=utilisation,
        skip=[*skip, *([] if report else ["report"])])
    if model is not None and rc.other_gpu_model is None:
        rc.other_gpu_model = model  # the other GPUs' rows show the model asked for
    if dtype is not None or kv_dtype is not None:  # a low-precision run (tokprof.quant.precision)
        precision = parse_precision(dtype or rc.dtype, kv_dtype=kv_dtype)
        if precision.weight_format is not None and "+act-" not in (dtype or ""):
            precision = parse_precision(precision, activation=parse_precision(rc.dtype).activation)
        check_supported(precision, device=dev, backend=rc.backend)
        rc = dataclasses.replace(rc, dtype=precision.label)
    config = load_model(rc.model)
    fit_notes = check_fits(config, rc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = new_run(list(command) if command is not None else sys.argv, dev)
    run_path = reserve_run_path(run, out, config.name, run.provenance.device.spec_key or dev.type)
    stage = "set-up"
    label = "GPU" if dev.type == "cuda" else "CPU run: CPU figures"
    console.rule(f"tokprof run: {config.name} on {run.provenance.device.name} [{label}]")
    run.notes.extend(fit_notes)
    if dev.type == "cuda":
        est = estimate_gpu_seconds(config, rc)
        console.print(f"[dim]estimated GPU time ~{est['total'] / 60:.1f} min (modelled: kernels "
                      f"{est['kernels'] + est['graphs']:.0f} s, prefill {est['prefill']:.0f} s, end to end "
                      f"{est['e2e'] + est['frameworks']:.0f} s)[/]")
    if dev.type == "cpu":
        run.notes.append(f"CPU run on {run.provenance.device.name}: {rc.backend} backend, {rc.dtype}, model "
                         f"{config.name}; no energy counter on a CPU")

    wall_s: dict[str, float] = {}  # wall seconds per phase, in the summary
    mark = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        wall_s[name] = round(now - mark[0], 1)
        mark[0] = now

    try:
        stage = "ceilings"
        console.print("[bold]1/5[/] ceilings")
        phase = CpuLoad.start()
        ceilings = measure_ceilings(dev)
        phases["ceilings"] = phase.stop()
        run.ceilings = ceilings
        console.print(f"    copy {ceilings.copy_gbps:.1f} GB/s, GEMM {ceilings.gemm_tflops:.2f} TFLOP/s "
                      f"({ceilings.gemm_dtype})")
        lap("ceilings")

        stage = "kernel benchmarks"
        console.print(f"[bold]2/5[/] kernels of the decode plan: batch {rc.batches} x context {rc.contexts}")
        phase = CpuLoad.start()
        points, run = bottom_up(config, rc.batches, rc.contexts, rc.backend, dev, dtype=rc.dtype, energy=rc.energy,
                                timing_kwargs=rc.timing_kwargs, energy_kwargs=rc.energy_kwargs or None,
                                ceilings=ceilings, run=run, out=run_path, prices=rc.prices)
        lap("kernels")
        phases["kernels"] = phase.stop()
        phase = CpuLoad.start()
        run.overhead = measure_overhead(config, rc.e2e_batches or rc.batches, dev, dtype=rc.dtype,
                                        backend=rc.backend, context=min(rc.contexts)).to_dict()
        phases["overhead"] = phase.stop()
        host = ", ".join(f"batch {h['batch']} {h['per_step_us']:.0f} us" for h in run.overhead["host_work"])
        console.print(f"    eager-loop overhead (measured): host work per step {host}")
        save_run(run, run_path)
        lap("overhead")

        e2e_where = (f"(batch, context) {rc.e2e_points}" if rc.e2e_points is not None
                     else f"batch {rc.e2e_batches} x context {rc.e2e_contexts}")
        stage = "end-to-end measurements"
        if "e2e" in rc.skip:
            console.print("[bold]3/5[/] end to end: skipped (--skip e2e)")
            run.notes.append("end to end not measured: skipped (--skip e2e)")
        else:
            console.print(f"[bold]3/5[/] end to end: {e2e_where}, {', '.join(rc.frameworks)} "
                          f"({', '.join(rc.e2e_modes)})")
            phase = CpuLoad.start()
            run_e2e_points(run, rc, run_path, console)
            lap("e2e")
            phases["e2e"] = phase.stop()

        if dev.type == "cpu":  # a CPU is found shared more often than a GPU: say how shared it was while measuring
            load = cpu_load.stop()
            run.notes.append(load.note())
            run.cpu_load = load_record(load, phases)
            if run.cpu_load["contended"]:
                console.print(f"[yellow]warning: {describe_record(run.cpu_load)}: the CPU was shared, so these "
                              "CPU figures are slower and noisier than on an idle CPU[/]")

        stage = "reconciliation"
        console.print("[bold]4/5[/] reconciliation and other GPUs")
        from tokprof.serving.served import provider as served_provider  # L5: the simulator on the run's step times

        run.reconciliation = [r.to_dict() for r in reconcile(run, rc.utilisation, served=served_provider())]
        if "other-gpus" not in rc.skip:
            run.notes.extend(other_gpu_rows(run, rc, console))
        lap("reconcile")
        save_run(run, run_path)

        stage = "report and history"
        console.print("[bold]5/5[/] report and history")
        summary: dict[str, Any] = {"run": str(run_path), "device": run.provenance.device.name, "model": config.name,
                                   "kind": dev.type}
        if "report" not in rc.skip:
            from tokprof.reports.render import render_report, write_index

            # one folder per run (the run file's name), and an index of every run's report beside them
            rep = render_report([run_path], out / "report" / run_path.stem)
            summary["report_html"] = str(rep.html)
            summary["report_md"] = str(rep.markdown)
            summary["report_index"] = str(write_index(out / "report"))
        if "history" not in rc.skip:
            history.record_run(run, run_path)
            summary["history_db"] = str(history.path)
        lap("report")
        summary["phase_seconds"] = wall_s
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        summary["points"] = [_point_summary(p) for p in points]
        summary["prediction"] = prediction_summary(run)
        _print_story(console, run)
        _print_summary(console, summary)
        print(json.dumps(summary))
        return run_path
    except KeyboardInterrupt:
        # The file is what was saved (end to end extends the file, not `run`); it says that the run was cut short.
        try:
            saved = load_run(run_path)
        except ValueError:
            saved = run
        mark_interrupted(saved, stage)
        save_run(saved, run_path)
        console.print(f"[yellow]interrupted[/] during {stage}: {run_path} keeps what was measured up to the last "
                      "finished kernel or end-to-end point, and says that the run was interrupted")
        raise


def reserve_run_path(run: RunResult, out: Path, model: str, device: str) -> Path:
    """Create `out/run-<model>-<device>-<run id>.json` exclusively (the run id ends in a random part): runs started in
    the same second, in other processes, never write one file. A clash, however unlikely, takes a new id."""
    import uuid

    for _ in range(5):
        path = out / f"run-{file_part(model)}-{file_part(device)}-{file_part(run.run_id)}.json"
        try:
            return save_run(run, path, exclusive=True)
        except FileExistsError:
            run.run_id = f"{run.run_id.rsplit('-', 1)[0]}-{uuid.uuid4().hex[:8]}"
    raise ValueError(f"--out {out}: could not create a new run file there (names kept clashing)")


def _point_summary(p: Any) -> dict[str, Any]:
    def r(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else round(x, 4)

    return {"batch": p.batch, "context": p.context, "tokens_per_s_per_gpu": r(p.tokens_per_s_per_gpu),
            "usd_per_million_tokens": r(p.usd_per_million_tokens), "provenance": p.provenance}


def _no_fit(p: dict[str, Any]) -> str:
    """An infeasible point's cell: what it needs and what the GPU has, never a number of tokens/s."""
    need, has = p.get("memory_bytes_per_gpu"), p.get("memory_capacity_bytes")
    if isinstance(need, (int, float)) and isinstance(has, (int, float)):
        return f"needs {need / 1e9:.0f} GB, has {has / 1e9:.0f} GB"
    return "does not fit"


def _fmt(value: Any, suffix: str = "") -> str:
    from tokprof.reports.document import num

    return "-" if value is None else num(value) + suffix


def _print_story(console: Console, run: RunResult) -> None:
    """The run's findings on the console: the iceberg of each measured point, then the other GPUs' rows."""
    from rich.markup import escape
    from rich.table import Table

    if run.reconciliation:
        priced = {(p["batch"], p["context"]): p for p in run.rollup if p.get("provenance") == "measured"}
        columns: dict[str, list[str]] = {k: [] for k in ("batch", "ctx", "L1 roof", "L2 sum", "L3 pred", "L3 graph",
                                                          "L4 pred", "L4 eager", "pred err", "L2 vs e2e", "$/M tok",
                                                          "J/tok")}
        flags: list[str] = []
        for rec in run.reconciliation:
            layers = {lv.get("name"): lv for lv in rec.get("layers") or []}
            tps = {k: lv.get("tokens_per_s_per_gpu") for k, lv in layers.items()}
            pred = {k: lv.get("predicted_tokens_per_s_per_gpu") for k, lv in layers.items()}
            perr = next((layers[k].get("prediction_error_pct") for k in ("L4", "L3") if k in layers
                         and layers[k].get("prediction_error_pct") is not None), None)
            point = priced.get((rec["batch"], rec["context"]), {})
            err = rec.get("bottom_up_error_pct")
            reliable = rec.get("reliable", True)
            for key, value in zip(columns, (str(rec["batch"]), str(rec["context"]),
                                            _fmt(tps.get("L1")), _fmt(tps.get("L2")), _fmt(pred.get("L3")),
                                            _fmt(tps.get("L3")), _fmt(pred.get("L4")), _fmt(tps.get("L4")),
                                            "-" if perr is None else f"{perr:+.1f}%" if reliable else "unreliable",
                                            "-" if err is None else f"{err:+.1f}%" if reliable else "unreliable",
                                            _fmt(point.get("usd_per_million_tokens")),
                                            _fmt(point.get("j_per_token_total"))), strict=True):
                columns[key].append(value)
            flags += [f"batch {rec['batch']} context {rec['context']}: {f}" for f in rec.get("flags") or []]
        columns = {k: v for k, v in columns.items() if any(x != "-" for x in v)}  # no empty columns (a CPU: no $)
        table = Table(title=f"{run.provenance.device.name}, {(run.model or {}).get('name')}: tokens/s per GPU by layer",
                      caption="L1 modelled from measured ceilings; L3/L4 pred modelled: kernel sum + measured "
                              "overheads, computed without the end-to-end figures; the rest measured; pred err: "
                              "predicted / measured step - 1; L2 vs e2e: the kernel sum against L3 (graphs), else L4",
                      title_justify="left", caption_justify="left")
        for header in columns:
            table.add_column(header, justify="right", no_wrap=True)
        for row in zip(*columns.values(), strict=True):
            table.add_row(*row)
        console.print(table)
        line = prediction_line(prediction_summary(run))
        if line:
            console.print(escape(line), style=None if prediction_summary(run)["reliable"] else "yellow")
        for flag in flags:
            console.print(f"[yellow]flag[/] {escape(flag)}")
    others = [p for p in run.rollup if p.get("provenance") in ("modelled", "projected")]
    if others:
        gpus = list(dict.fromkeys(p["gpu"] for p in others))
        cells = {(p["gpu"], p["batch"], p["context"]): p for p in others}
        first = others[0]
        table = Table(title=f"other GPUs, {first['model']} {first['dtype']}: tokens/s per GPU · $/M tokens",
                      caption="modelled: datasheet roofline through the step model; projected: this run's measured "
                              "efficiencies on the other GPU's datasheet; rows stop at memory capacity",
                      title_justify="left",
                      caption_justify="left")
        table.add_column("batch", justify="right")
        table.add_column("context", justify="right")
        for gpu in gpus:
            kind = next(p["provenance"] for p in others if p["gpu"] == gpu)
            table.add_column(f"{gpu} ({kind})", justify="right")
        for batch, context in dict.fromkeys((p["batch"], p["context"]) for p in others):
            row = [cells.get((gpu, batch, context)) for gpu in gpus]
            table.add_row(str(batch), str(context), *("-" if p is None else _no_fit(p) if p.get("infeasible_reason")
                                                      else f"{_fmt(p['tokens_per_s_per_gpu'])} · "
                                                      f"${_fmt(p.get('usd_per_million_tokens'))}" for p in row))
        console.print(table)


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    console.rule("done")
    from rich.markup import escape  # paths are text, not markup

    console.print(escape(f"RunResult: {summary['run']}"))
    if "report_html" in summary:
        console.print(escape(f"report:    {summary['report_html']} (and {summary['report_md']})"))
    if "history_db" in summary:
        console.print(escape(f"history:   {summary['history_db']}"))
    phases = ", ".join(f"{k} {v:g} s" for k, v in summary.get("phase_seconds", {}).items())
    console.print(f"time:      {summary['seconds']} s" + (f" ({phases})" if phases else ""))
