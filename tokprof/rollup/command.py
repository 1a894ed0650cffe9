"""The work behind `tokprof rollup`: choose the mode, print the analytic card first, then the table; return the
JSON document the command prints as its last line. Bad arguments raise ValueError (the CLI turns them into a clear
error without a traceback).

Modes: measured here (bottom-up on --device), measured from a run file (--from), projected from a run file onto
another GPU (--from with --gpu), or modelled from a datasheet (--modelled --gpu). Each at a tensor-parallel degree
(--tp N: one GPU's share of the model, its all-reduces measured in the run or modelled from the interconnect spec).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from tokprof.models.config import ModelConfig
from tokprof.profiler.devices import GpuSpec, load_specs
from tokprof.profiler.schema import RunResult, load_run, save_run
from tokprof.rollup import card as rcard
from tokprof.rollup.bottom_up import bottom_up, rollup_points
from tokprof.rollup.capacity import DEFAULT_MEMORY_UTILIZATION, max_batch
from tokprof.rollup.economics import PriceOptions, check_positive
from tokprof.rollup.interconnect import CollectiveOptions
from tokprof.rollup.pareto import InteractivityCost, cost_at_interactivity
from tokprof.rollup.project import modelled, project, resolve_gpu
from tokprof.rollup.records import RollupPoint, merge_points, points_from_run
from tokprof.rollup.step_model import StepModel

DEFAULT_BATCHES = [1, 8, 64]
DEFAULT_CONTEXTS = [1024, 8192]


@dataclass
class RollupArgs:
    model: str | None = None
    batches: list[int] | None = None
    contexts: list[int] | None = None
    from_run: str | None = None
    gpu: str | None = None
    modelled: bool = False
    efficiency: float | None = None  # a flat stated efficiency instead of the step model's curves
    device: str = "cuda"
    backend: str | None = None
    dtype: str | None = None
    prices: PriceOptions = field(default_factory=PriceOptions)
    energy: bool = False
    max_time_s: float | None = None
    interactivity: list[float] = field(default_factory=list)
    output: str | None = None
    command: list[str] = field(default_factory=lambda: list(sys.argv))
    tp: int | None = None  # tensor-parallel degree; None: 1 (with --from: the run's measured points' own)
    ep: int = 1  # expert-parallel degree of an MoE model (--modelled)
    dp_attention: bool = False  # data-parallel attention over the EP group (--modelled)
    collectives: CollectiveOptions = field(default_factory=CollectiveOptions)  # how collectives are modelled
    step_model: StepModel | None = None  # the step model's assumptions (None: its defaults)
    batch_max: bool = False  # --batch max: the largest batch that fits at each context
    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION
    show_assumptions: bool = True  # print the step model's assumptions (modelled and projected points)


def load_model(name: str) -> ModelConfig:
    """A preset name, or a path to a Hugging Face config.json (or the directory holding it)."""
    return ModelConfig.from_hf(name) if Path(name).exists() else ModelConfig.from_name(name)


def _only(what: str, values: set[str], path: str) -> str:
    if len(values) != 1:
        raise ValueError(f"--{what}: {path} holds several {what}s {sorted(values)}; choose one with --{what}")
    return next(iter(values))


def _from_run(a: RollupArgs, console: Console) -> tuple[ModelConfig, dict[str, Any], list[RollupPoint], str,
                                                          RunResult, list[str]]:
    run = load_run(a.from_run)
    if run.model is None and a.model is None:
        raise ValueError(f"--from: {a.from_run} has no model section; give --model")
    cfg = load_model(a.model) if a.model else ModelConfig.from_dict(run.model)
    if run.model is not None and cfg != ModelConfig.from_dict(run.model):
        raise ValueError(f"--model: {a.from_run} measured {run.model.get('name')!r}, not {cfg.name!r}; leave --model "
                         "out to use the run's model")
    if not run.kernels:
        raise ValueError(f"--from: {a.from_run} holds no kernel measurements")
    measured = [p for p in points_from_run(run.rollup) if p.provenance == "measured"]
    tps = {p.tp for p in measured}
    tp = a.tp or (tps.pop() if len(tps) == 1 else 1)
    measured = [p for p in measured if p.tp == tp]
    batches = a.batches or sorted({p.batch for p in measured})
    contexts = a.contexts or sorted({p.context for p in measured})
    if a.batch_max:
        batches = [1]  # replaced per context below
    if not batches or not contexts:
        raise ValueError(f"--batch/--context: {a.from_run} has no measured roll-up points to take them from; "
                         "give --batch and --context")
    dtype = a.dtype or _only("dtype", {k.dtype for k in run.kernels}, a.from_run)
    backend = a.backend or _only("backend", {k.backend for k in run.kernels}, a.from_run)
    source_key = run.provenance.device.spec_key
    target = resolve_gpu(a.gpu) if a.gpu else None
    spec = target or (load_specs().get(source_key) if source_key else None)
    card = _card(console, cfg, spec, contexts, dtype, tp, a.memory_utilization)
    if target is not None and target.key != source_key:
        points = []
        for bs, ctxs in _sweep(a, cfg, target, batches, contexts, dtype, tp):
            points += project(run, target, prices=a.prices, batches=bs, contexts=ctxs, dtype=dtype,
                              backend=backend, tp=tp, collectives=a.collectives, step_model=a.step_model,
                              memory_utilization=a.memory_utilization)
        _print_assumptions(console, a)
        return cfg, card, points, "projected", run, []
    if a.batch_max:
        raise ValueError("--batch max: needs a GPU whose memory decides the batch: --modelled --gpu NAME, or --from "
                         "run.json --gpu NAME (a projection)")
    points, notes = rollup_points(cfg, batches, contexts, run, backend=backend, dtype=dtype, prices=a.prices, tp=tp,
                                  collectives=a.collectives)
    return cfg, card, points, "measured", run, notes


def _card(console: Console, cfg: ModelConfig, spec: GpuSpec | None, contexts: list[int], dtype: str,
          tp: int = 1, memory_utilization: float = DEFAULT_MEMORY_UTILIZATION, ep: int = 1,
          dp_attention: bool = False) -> dict[str, Any]:
    card = rcard.analytic_card(cfg, spec, contexts, dtype, tp=tp, memory_utilization=memory_utilization, ep=ep,
                               dp_attention=dp_attention)
    rcard.print_card(console, card)
    return card


def _sweep(a: RollupArgs, cfg: ModelConfig, spec: GpuSpec, batches: list[int], contexts: list[int], dtype: str,
           tp: int) -> list[tuple[list[int], list[int]]]:
    """(batches, contexts) grids to compute: the asked grid, or with --batch max the largest batch that fits at
    each context (a context where even batch 1 does not fit keeps batch 1, which then shows as infeasible)."""
    if not a.batch_max:
        return [(batches, contexts)]
    out = []
    for context in contexts:
        limit = max_batch(cfg, spec, context, dtype, tp, memory_utilization=a.memory_utilization, ep=a.ep,
                          dp_attention=a.dp_attention)
        out.append(([limit.batch or 1], [context]))
    return out


def _print_assumptions(console: Console, a: RollupArgs) -> None:
    """Every assumption of the step model with its value and source (--modelled and projections)."""
    if not a.show_assumptions:
        return
    from rich.markup import escape

    console.print("[bold]step-model assumptions[/] (override with --assumptions FILE.json or the options of "
                  "`tokprof rollup --help`):")
    if a.efficiency is not None:
        console.print(f"  efficiency = {a.efficiency:g} (stated with --efficiency: replaces the op curves below)")
    for x in (a.step_model or StepModel()).assumptions():
        unit = f" {x.unit}" if x.unit else ""
        console.print(f"  {x.name} = {escape(str(x.value))}{unit}  [dim]({escape(x.source)})[/]")


def default_contexts(cfg: ModelConfig, notes: list[str]) -> list[int]:
    """DEFAULT_CONTEXTS up to the model's longest context (tiny: 4096), with a note for what was left out; a context
    the user names is checked, never dropped."""
    fits = [c for c in DEFAULT_CONTEXTS if c <= cfg.max_position_embeddings]
    if len(fits) < len(DEFAULT_CONTEXTS):
        left = [c for c in DEFAULT_CONTEXTS if c not in fits]
        notes.append(f"default context(s) {left} left out: longer than {cfg.name}'s {cfg.max_position_embeddings} "
                     "positions")
    return fits or [cfg.max_position_embeddings]


def run_rollup(a: RollupArgs, console: Console) -> dict[str, Any]:
    """Do the roll-up `a` asks for, printing the card and the table on `console`; return the summary document."""
    if a.modelled and a.from_run:
        raise ValueError("--modelled and --from: choose one (--modelled uses specs alone, --from a measured run)")
    if a.tp is not None and (isinstance(a.tp, bool) or not isinstance(a.tp, int) or a.tp < 1):
        raise ValueError(f"--tp: expected a positive number of GPUs, got {a.tp!r}")
    tp = a.tp or 1
    if (a.ep != 1 or a.dp_attention) and not a.modelled:
        raise ValueError("--ep / --dp-attention: expert-parallel roll-ups are modelled (--modelled --gpu NAME)")
    notes: list[str] = []
    run: RunResult | None = None
    if a.from_run:
        cfg, card, points, mode, run, notes = _from_run(a, console)
    elif a.modelled:
        if a.gpu is None or a.model is None:
            raise ValueError("--modelled: give --model and --gpu (e.g. --model llama-3.1-8b --gpu h200 --modelled)")
        cfg, spec = load_model(a.model), resolve_gpu(a.gpu)
        contexts, dtype = a.contexts or default_contexts(cfg, notes), a.dtype or "bf16"
        card = _card(console, cfg, spec, contexts, dtype, tp, a.memory_utilization, a.ep, a.dp_attention)
        points = []
        for bs, ctxs in _sweep(a, cfg, spec, a.batches or DEFAULT_BATCHES, contexts, dtype, tp):
            points += modelled(cfg, spec, bs, ctxs, dtype, a.efficiency, prices=a.prices, tp=tp,
                               collectives=a.collectives, step_model=a.step_model,
                               memory_utilization=a.memory_utilization, ep=a.ep, dp_attention=a.dp_attention)
        _print_assumptions(console, a)
        mode = "modelled"
    else:
        if a.model is None:
            raise ValueError("--model: give a model to measure (or --from run.json, or --modelled --gpu NAME)")
        if a.batch_max:
            raise ValueError("--batch max: needs a GPU whose memory decides the batch: --modelled --gpu NAME, or "
                             "--from run.json --gpu NAME (a projection)")
        try:
            dev = torch.device(a.device)
        except RuntimeError as err:
            raise ValueError(f"--device: expected cpu or cuda[:N], got {a.device!r} ({err})") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU on this machine; measure on the CPU (--device cpu "
                             "--backend torch) or model a GPU from its datasheet (--modelled --gpu h100)")
        from tokprof.profiler.devices import detect_device

        cfg = load_model(a.model)
        # the dtype rule of every command: bf16 on a GPU (measured or modelled), fp32 on the CPU
        contexts, dtype = a.contexts or default_contexts(cfg, notes), a.dtype or ("bf16" if dev.type == "cuda"
                                                                                   else "fp32")
        key = detect_device(dev).spec_key
        card = _card(console, cfg, load_specs().get(key) if key else None, contexts, dtype, tp)
        timing_kwargs = None
        if a.max_time_s is not None:
            budget = check_positive("--timeout-s", a.max_time_s)
            # the harness's 0.1 s minimum would exceed a smaller budget
            timing_kwargs = {"max_time_s": budget, "min_time_s": min(0.1, budget)}
        backend = a.backend or ("triton" if dev.type == "cuda" else "torch")  # triton on a CPU: its slow interpreter
        points, run = bottom_up(cfg, a.batches or DEFAULT_BATCHES, contexts, backend, dev,
                                dtype=dtype, energy=a.energy, timing_kwargs=timing_kwargs, prices=a.prices,
                                out=a.output, command=a.command, tp=tp, collectives=a.collectives)
        notes += [n for n in run.notes if n.startswith("batch ")]
        mode = "measured"
    for note in notes:
        console.print(f"[yellow]{escape(note)}[/]")
    if not points:
        raise ValueError("no roll-up point could be computed (see the notes above)")
    at_tp = f", tp={points[0].tp}" if points[0].tp > 1 else ""
    rcard.print_points(console, points, f"{cfg.name} on {points[0].gpu} ({mode}, {points[0].dtype}{at_tp})")
    rcard.print_interconnect(console, points)
    costs: list[InteractivityCost] = [cost_at_interactivity(points, target, context=ctx)
                                      for target in a.interactivity for ctx in sorted({p.context for p in points})]
    rcard.print_interactivity(console, costs)
    if a.output and (a.from_run or a.modelled):
        if run is None:
            from tokprof.profiler.bench import new_run

            run = new_run(a.command, "cpu")
            run.model = cfg.to_dict()
            run.notes.append(f"{mode} roll-up: no kernel was measured; the provenance is the host it was computed on")
        merge_points(run.rollup, points)
        save_run(run, a.output)
    if a.output:
        console.print(f"wrote {escape(str(a.output))}")
    return rcard.summary(card, points, command="rollup", mode=mode,
                         model=cfg.name, output=a.output, interactivity=[vars(c) for c in costs])
