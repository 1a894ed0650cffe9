"""`tokprof report`: report.md, a self-contained report.html (PNGs embedded as data URIs, no network) and the PNGs.

    report = render_report(["run.json", "run_h200.json"], "out/")   # -> Report(markdown, html, figures, omitted)

Reads only RunResult files. Every table names the run each number came from (R1, R2, ... listed with run_id and
file in the "Runs" section) and its provenance (measured, modelled or projected); every figure's title names its
run. A section whose data is absent from the runs is omitted with a one-line reason, never filled in.

Tensor parallelism (issue 8): collective measurements (all-reduce, all-gather over NCCL or gloo) are kept out of the
HBM roofline and listed in their own table (algbw, busbw, % of the link roof); roll-up points at tp > 1 are labelled
with their tp, get a table splitting the per-GPU step into kernels and collectives, and their icebergs show the L1i
interconnect layer. Both appear only when the runs hold such data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tokprof.profiler.devices import PEAK_DTYPES
from tokprof.profiler.schema import RunResult, file_part, load_run
from tokprof.reports import plots
from tokprof.reports.document import (
    Block,
    Heading,
    Image,
    Omitted,
    Para,
    Table,
    na,
    num,
    pct,
    shape_text,
    to_html,
    to_markdown,
)

PROVENANCE_ORDER = ("measured", "modelled", "projected")
# tokprof.profiler.collectives.COLLECTIVES, without importing torch
COLLECTIVE_OPS = ("all_reduce", "all_gather", "all_to_all")
COLLECTIVE_BACKENDS = ("nccl", "gloo")
COST_FORMULA = "cost per million tokens = $/GPU-h / (tokens/s per GPU x 3600 / 1e6)"


@dataclass
class LoadedRun:
    """A RunResult and where it came from; `label` (R1, R2, ...) is how the report refers to it."""

    label: str
    path: Path
    run: RunResult

    @property
    def ref(self) -> str:
        return f"{self.label} ({self.run.run_id or 'no run_id'}, {self.path.name})"


@dataclass
class Report:
    markdown: Path
    html: Path
    figures: list[Path]
    omitted: list[str]


def load_runs(paths: Sequence[str | Path]) -> list[LoadedRun]:
    """Load and validate each file (ValueError naming the file and the field on a bad one)."""
    if not paths:
        raise ValueError("runs: expected at least one RunResult JSON file, got none")
    return [LoadedRun(f"R{i + 1}", Path(p), load_run(p)) for i, p in enumerate(paths)]


def _notes(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value if v]


# ------------------------------------------------------------------------------------------------- sections


def _runs_section(runs: list[LoadedRun]) -> list[Block]:
    rows = []
    for r in runs:
        p, d = r.run.provenance, r.run.provenance.device
        model = (r.run.model or {}).get("name") or "n/a (not a model run)"
        rows.append([r.label, r.run.run_id or "n/a (no run_id)", str(r.path), d.name, d.kind,
                     d.spec_key or "n/a (not in the spec table)", model, p.timestamp_utc,
                     str(p.versions.get("tokprof") or "n/a"), p.git_sha or "n/a (not a git checkout)", p.host])
    blocks: list[Block] = [Heading("Runs"), Table(["run", "run_id", "file", "device", "kind", "spec row", "model",
                                                   "timestamp (UTC)", "tokprof", "git sha", "host"], rows)]
    for r in runs:
        for note in r.run.notes:
            blocks.append(Para(f"{r.label} note: {note}"))
        if r.run.provenance.device.kind == "cpu":
            blocks.append(Para(f"{r.label} is a CPU run ({r.run.provenance.device.name}): its figures are CPU "
                               "figures, not GPU figures."))
    return blocks


def _spec_of(run: RunResult) -> Any:
    """The datasheet row (GpuSpec) of the run's device, or None for a CPU or an unknown GPU."""
    from tokprof.profiler.devices import load_specs, match_spec  # torch import: only when a report needs it

    device = run.provenance.device
    if device.kind != "cuda":
        return None
    key = device.spec_key or match_spec(device.name)
    return load_specs().get(key) if key else None


def is_collective(k: Any) -> bool:
    """A collective measurement (all-reduce / all-gather): it has a link roof, not an HBM one."""
    return k.op in COLLECTIVE_OPS or k.backend in COLLECTIVE_BACKENDS or k.roofline.bound == "interconnect"


def _kernels(run: RunResult) -> list[Any]:
    return [k for k in run.kernels if not is_collective(k)]


def tp_of(p: dict[str, Any]) -> int:
    return int(p.get("tp") or 1)


def _gpu_cell(p: dict[str, Any]) -> str:
    return f"{p.get('gpu')} (tp={tp_of(p)})" if tp_of(p) > 1 else str(p.get("gpu"))


def _main_dtype(run: RunResult) -> str | None:
    dtypes = [k.dtype for k in _kernels(run)]
    return max(set(dtypes), key=dtypes.count) if dtypes else None


def _datasheet_roof(run: RunResult, dtype: str | None) -> tuple[plots.Roof | None, str]:
    spec = _spec_of(run)
    if spec is None:
        return None, "no datasheet row for this device (a CPU or a GPU missing from tokprof/data/gpus.json)"
    tflops = spec.peak_tflops(dtype) if dtype in PEAK_DTYPES else None
    gbps = spec.hbm_tbps * 1e3 if spec.hbm_tbps is not None else None
    return plots.Roof("datasheet", gbps, tflops, f"[{spec.key}, {dtype}]"), f"{spec.key}: {spec.source} ({spec.date})"


def _ceilings_section(runs: list[LoadedRun]) -> list[Block]:
    blocks: list[Block] = [Heading("Ceilings")]
    rows, classes = [], []
    for r in runs:
        c = r.run.ceilings
        if c is None:
            blocks.append(Omitted(f"{r.label}: no measured ceilings in this run"))
        else:
            rows.append([r.label, c.device, num(c.copy_gbps), f"{num(c.gemm_tflops)} ({c.gemm_dtype})",
                         c.provenance, f"copy of {c.copy_bytes / 1e9:.2f} GB (read + written); GEMM "
                         f"{'x'.join(map(str, c.gemm_shape))}; {c.measured_utc}" + (f"; {c.note}" if c.note else "")])
            classes.append(f"prov-{c.provenance}")
        dtype = _main_dtype(r.run) or (c.gemm_dtype if c else None)
        roof, source = _datasheet_roof(r.run, dtype)
        if roof is not None:
            rows.append([r.label, r.run.provenance.device.name, num(roof.bandwidth_gbps),
                         f"{num(roof.tflops)} ({dtype})", "modelled", f"datasheet: {source}"])
            classes.append("prov-modelled")
    if rows:
        blocks.insert(1, Table(["run", "device", "memory GB/s", "TFLOP/s (dtype)", "provenance", "source"], rows,
                               classes))
    return blocks


def _kernel_row(r: LoadedRun, k: Any) -> list[str]:
    t, rf = k.timing, k.roofline
    flags = []
    if rf.suspicious:
        flags.append("SUSPICIOUS: above a ceiling")
    if t.throttled:
        flags.append("throttled")
    if not t.met_noise_target:
        flags.append(f"noise target {pct(t.noise_target)} missed")
    energy = num(k.energy.total_j_per_call) if k.energy else f"n/a ({k.energy_reason or 'not measured'})"
    return [r.label, k.op, shape_text(k.shape), k.dtype, k.backend, f"{num(t.median_us)} ({t.mode})",
            f"{num(t.p10_us)}-{num(t.p90_us)}", pct(t.noise), num(rf.achieved_gbps), num(rf.achieved_tflops),
            pct(rf.efficiency_measured), pct(rf.efficiency_datasheet), rf.bound or "n/a", energy, k.provenance,
            "; ".join(flags)]


# The shape keys that tell calls of one op apart on a roofline (rows or batch first, then the matrix sizes).
_TAG_KEYS = ("B", "T", "M", "N", "K", "context")


def _roof_tag(k: Any) -> str:
    """A point's label on the roofline: its op's varying sizes, e.g. 'M=8 N=4096' or 'B=64 context=8192'."""
    return " ".join(f"{key}={k.shape[key]}" for key in _TAG_KEYS if key in k.shape)[:28]


def _roofline_section(runs: list[LoadedRun], out: Path) -> tuple[list[Block], list[str]]:
    blocks: list[Block] = [Heading("Roofline and kernels")]
    omitted: list[str] = []
    if not any(r.run.kernels for r in runs):
        omitted.append("roofline: no kernel measurements in any run")
        return blocks + [Omitted(omitted[-1])], omitted
    for r in runs:
        kernels = _kernels(r.run)
        if not kernels:
            omitted.append(f"roofline {r.label}: no kernel measurements in this run"
                           + (" (collectives only: see their table)" if r.run.kernels else ""))
            blocks.append(Omitted(omitted[-1]))
            continue
        dtype = _main_dtype(r.run)
        roofs: list[plots.Roof] = []
        c = r.run.ceilings
        if c is not None:
            roofs.append(plots.Roof("measured", c.bandwidth_gbps, c.gemm_tflops if c.gemm_dtype == dtype else None,
                                    f"[{c.gemm_dtype} GEMM]"))
        sheet, _ = _datasheet_roof(r.run, dtype)
        if sheet is not None:
            roofs.append(sheet)
        points = [plots.RoofPoint(k.op, k.roofline.intensity_flop_per_byte, k.roofline.achieved_tflops,
                                  k.roofline.suspicious, _roof_tag(k)) for k in kernels
                  if k.roofline.intensity_flop_per_byte > 0 and k.roofline.achieved_tflops > 0]
        left_out = sorted({k.op for k in kernels if k.roofline.intensity_flop_per_byte <= 0
                           or k.roofline.achieved_tflops <= 0})
        device = r.run.provenance.device.name
        if points:
            path = plots.roofline_chart(out / f"roofline_{r.label}.png",
                                        title=f"Roofline, {device}: {len(points)} measured kernel calls "
                                              f"[{r.label} {r.run.run_id}]", points=points, roofs=roofs)
            caption = (f"{r.ref}: each point a measured kernel call (median time); lines: "
                       + (", ".join(f"{x.name} ceilings" for x in roofs) or "no ceilings known")
                       + ". Datasheet ceilings are modelled (spec table); measured ceilings come from the same run.")
            if left_out:
                caption += f" Not drawn (0 FLOP, no place on log axes; see the table): {', '.join(left_out)}."
            blocks.append(Image(path, f"roofline of {r.label}", caption))
        else:
            omitted.append(f"roofline chart {r.label}: no kernel with positive FLOPs to place on log axes")
            blocks.append(Omitted(omitted[-1]))
        blocks.append(Table(["run", "op", "shape", "dtype", "backend", "median us (mode)", "p10-p90 us", "noise",
                             "GB/s", "TFLOP/s", "% measured roof", "% datasheet roof", "bound", "J/call (total)",
                             "provenance", "flags"], [_kernel_row(r, k) for k in kernels],
                            [f"prov-{k.provenance}" for k in kernels]))
        if r.run.failures:
            blocks.append(Para(f"{r.label}: {len(r.run.failures)} call(s) could not be measured:"))
            blocks.append(Table(["run", "op", "shape", "dtype", "backend", "error"],
                                [[r.label, f.op, shape_text(f.shape), f.dtype, f.backend, f.error]
                                 for f in r.run.failures]))
    from tokprof.reports.tp_tables import collectives_blocks

    return blocks + collectives_blocks(runs), omitted


def _points(runs: list[LoadedRun]) -> list[tuple[LoadedRun, dict[str, Any]]]:
    return [(r, p) for r in runs for p in r.run.rollup if isinstance(p, dict)]


def _pareto_section(runs: list[LoadedRun], out: Path) -> tuple[list[Block], list[str]]:
    blocks: list[Block] = [Heading("Throughput vs interactivity")]
    series: dict[tuple, plots.Series] = {}
    prices: dict[tuple, plots.Price] = {}
    for r, p in _points(runs):
        x, y, batch = p.get("tokens_per_s_per_user"), p.get("tokens_per_s_per_gpu"), p.get("batch")
        if not (isinstance(x, (int, float)) and isinstance(y, (int, float)) and x > 0 and y > 0):
            continue
        prov = str(p.get("provenance", "unknown"))
        key = (r.label, p.get("gpu"), p.get("model"), p.get("context"), prov, tp_of(p))
        label = f"{r.label} {_gpu_cell(p)} {p.get('model')} ctx {p.get('context')}"
        on_cpu = prov == "measured" and r.run.provenance.device.kind == "cpu"  # other rows are GPUs' figures
        series.setdefault(key, plots.Series(label, prov, axes="CPU" if on_cpu else "GPU")).points.append(
            (float(x), float(y), int(batch or 0)))
        usd = p.get("usd_per_gpu_hour")
        if isinstance(usd, (int, float)) and usd > 0:
            prices.setdefault((usd, p.get("gpu")), plots.Price(float(usd), str(p.get("gpu"))))
    if not series:
        reason = "no roll-up points with tokens/s in any run"
        return blocks + [Omitted(reason)], [f"throughput vs interactivity: {reason}"]
    shown = list(prices.values())[:4]
    path = plots.pareto_chart(out / "pareto.png", title="Throughput vs interactivity per (run, device, context); "
                              "dotted: cost per million tokens", series=list(series.values()), prices=shown)
    caption = ("Each curve one (run, GPU, model, context) across batch sizes (labels b1, b16, ...), marked by "
               f"provenance; dotted lines: {COST_FORMULA}. A CPU's measured curves, when present, have a panel of "
               "their own (no price, and orders of magnitude below a GPU).")
    if len(prices) > len(shown):
        caption += f" Isolines drawn for the first {len(shown)} of {len(prices)} prices only."
    return blocks + [Image(path, "throughput vs interactivity", caption)], []


_COST_HEADERS = ["run", "provenance", "GPU", "model", "batch", "context", "dtype / backend", "step us",
                 "tokens/s per GPU", "tokens/s per user", "$/GPU-h", "$/M tokens", "J/token (total)",
                 "energy $/M tokens", "tokens/s per MW", "price source"]


# rollup/project.py's reason for a modelled point's J/token: "...; upper bound at TDP (700 W ...): 3.96 J/token"
_TDP_BOUND = re.compile(r"^(?P<why>.*?)[;:,]?\s*upper bound at TDP \((?P<what>[^)]*)\): (?P<j>[^ ]+) J/token$")


def _energy_reason(p: dict[str, Any]) -> Any:
    """The energy reason without a point's own TDP bound, so that one note serves every modelled row."""
    m = _TDP_BOUND.match(str(p.get("energy_reason") or ""))
    return (m.group("why") or "no energy measured") if m else p.get("energy_reason")


def _energy_cell(p: dict[str, Any]) -> str:
    """J/token, or a modelled row's TDP upper bound as '<= x (TDP bound)' in the cell, not in a note of its own."""
    m = _TDP_BOUND.match(str(p.get("energy_reason") or ""))
    if p.get("j_per_token_total") is None and m:
        return f"<= {m.group('j')} (TDP bound)"
    return na(p.get("j_per_token_total"), p.get("energy_reason"))


def _cost_section(runs: list[LoadedRun]) -> tuple[list[Block], list[str]]:
    blocks: list[Block] = [Heading("Cost across GPUs"), Para(COST_FORMULA + ". Measured, modelled and projected "
                                                             "rows are in separate tables; none stands in for "
                                                             "another. '<= x (TDP bound)': no energy was measured "
                                                             "for that row; x is the GPU's TDP over the whole step "
                                                             "time, per token, an upper bound, not an estimate.")]
    points = _points(runs)
    if not points:
        reason = "no roll-up in any run"
        return blocks + [Omitted(reason)], [f"cost table: {reason}"]
    known = {str(p.get("provenance")) for _, p in points}
    for prov in [*PROVENANCE_ORDER, *sorted(known - set(PROVENANCE_ORDER))]:
        rows = [(r, p) for r, p in points if p.get("provenance") == prov]
        if not rows:
            blocks.append(Omitted(f"no {prov} roll-up rows in these runs"))
            continue
        rows.sort(key=lambda rp: (str(rp[1].get("gpu")), str(rp[1].get("model")), rp[1].get("context") or 0,
                                  rp[1].get("batch") or 0))
        blocks.append(Heading(f"{prov} rows", 3))
        blocks.append(Table(_COST_HEADERS, [
            [r.label, prov, _gpu_cell(p), str(p.get("model")), num(p.get("batch")), num(p.get("context")),
             f"{p.get('dtype')} / {p.get('backend')}", num(p.get("step_time_us")),
             na(p.get("tokens_per_s_per_gpu"), p.get("infeasible_reason")),  # an infeasible point says why
             num(p.get("tokens_per_s_per_user")), num(p.get("usd_per_gpu_hour")), num(p.get("usd_per_million_tokens")),
             _energy_cell(p), na(p.get("energy_usd_per_million_tokens"), _energy_reason(p)),
             num(p.get("tokens_per_s_per_mw")),
             str(p.get("price_source") or "n/a")] for r, p in rows], [f"prov-{prov}"] * len(rows)))
    from tokprof.reports.tp_tables import tp_blocks

    return blocks + tp_blocks(points), []


def _op_share_section(runs: list[LoadedRun], out: Path) -> tuple[list[Block], list[str]]:
    blocks: list[Block] = [Heading("Per-op share of step time")]
    omitted: list[str] = []
    for r in runs:
        groups: dict[tuple, dict[int, dict[str, float]]] = {}
        for p in r.run.rollup:
            ops = p.get("ops") or []
            if not ops or p.get("batch") is None:
                continue
            key = (_gpu_cell(p), str(p.get("provenance")), str(p.get("model")), p.get("context"))
            shares = groups.setdefault(key, {}).setdefault(int(p["batch"]), {})
            for o in ops:
                label = str(o.get("label") or o.get("op"))
                shares[label] = shares.get(label, 0.0) + float(o.get("share") or 0.0)
        if not groups:
            omitted.append(f"op shares {r.label}: no roll-up with per-op breakdown in this run")
            blocks.append(Omitted(omitted[-1]))
            continue
        panels = []
        for (gpu, prov, model, context), by_batch in groups.items():
            batches = sorted(by_batch)
            labels = sorted({lab for b in batches for lab in by_batch[b]})
            panels.append(plots.ShareGroup(f"{gpu} {model} ctx {context} [{prov}]", batches,
                                           {lab: [by_batch[b].get(lab, 0.0) for b in batches] for lab in labels}))
        path = plots.op_share_chart(out / f"op_share_{r.label}.png",
                                    title=f"Share of decode-step time per op [{r.label} {r.run.run_id}]",
                                    groups=panels)
        blocks.append(Image(path, f"per-op share of step time, {r.label}",
                            f"{r.ref}: per-op share of one decode step (count x time per call / step time) across "
                            "batch sizes; each panel's provenance in brackets."))
    return blocks, omitted


def _e2e_section(runs: list[LoadedRun]) -> tuple[list[Block], list[str]]:
    blocks: list[Block] = [Heading("End to end")]
    rows, classes = [], []
    for r in runs:
        for e in r.run.e2e:
            rows.append([r.label, str(e.get("gpu")), str(e.get("model")), str(e.get("framework")), str(e.get("mode")),
                         f"{e.get('dtype')} / {e.get('backend')}", num(e.get("batch")), num(e.get("context")),
                         num(e.get("steps")), num(e.get("median_step_us")), num(e.get("p90_step_us")),
                         num(e.get("tokens_per_s_per_gpu")), num(e.get("tokens_per_s_per_user")),
                         num(e.get("ttft_ms")), na(e.get("j_per_token"), e.get("energy_reason")),
                         na(e.get("gpu_busy_fraction"), e.get("gpu_busy_reason") or e.get("busy_reason"), pct),
                         str(e.get("provenance", "measured"))])
            classes.append(f"prov-{e.get('provenance', 'measured')}")
    if not rows:
        reason = "no end-to-end measurements in any run"
        return blocks + [Omitted(reason)], [f"end to end: {reason}"]
    blocks.append(Table(["run", "GPU", "model", "framework", "mode", "dtype / backend", "batch", "context", "steps",
                         "median step us", "p90 step us", "tokens/s per GPU", "tokens/s per user", "TTFT ms",
                         "J/token", "GPU busy", "provenance"], rows, classes))
    return blocks, []


def _layer_reason(layer: dict[str, Any]) -> str | None:
    for key in ("reason", "tokens_per_s_reason", "note", "notes"):
        text = "; ".join(_notes(layer.get(key)))
        if text:
            return text
    return None


def _op_loss_rows(rec: dict[str, Any], label: str, limit: int = 8) -> list[list[str]]:
    names = ("op", "label", "time_us_measured", "time_us_at_roof", "lost_us", "share_of_L1_L2_gap")
    items = [dict(zip(names, o, strict=False)) if isinstance(o, (list, tuple)) else o
             for o in rec.get("op_inefficiency") or []]
    items = [o for o in items if o.get("finding", True)]  # an op faster than its roof is a flag, not a loss
    items.sort(key=lambda o: -(o.get("lost_us") or 0.0))
    return [[label, str(o.get("op")), str(o.get("label")), num(o.get("time_us_measured")),
             num(o.get("time_us_at_roof")), num(o.get("lost_us")), pct(o.get("share_of_L1_L2_gap"))]
            for o in items[:limit]]


def _iceberg_section(runs: list[LoadedRun], out: Path) -> tuple[list[Block], list[str]]:
    blocks: list[Block] = [Heading("The iceberg: from datasheet to served tokens/s")]
    omitted: list[str] = []
    if not any(r.run.reconciliation for r in runs):
        omitted.append("iceberg: no reconciliation in any run")
        return blocks + [Omitted(omitted[-1])], omitted
    for r in runs:
        if not r.run.reconciliation:
            omitted.append(f"iceberg {r.label}: no reconciliation in this run")
            blocks.append(Omitted(omitted[-1]))
            continue
        for rec in r.run.reconciliation:
            b, c, tp = rec.get("batch"), rec.get("context"), int(rec.get("tp") or 1)
            where = f"{rec.get('model')} on {rec.get('gpu')}" + (f" x{tp} (tp={tp})" if tp > 1 else "") + \
                f", batch {b}, context {c}"
            # the GPU in the name: a run holds the same (batch, context) measured here and modelled on other GPUs
            gpu_slug = re.sub(r"[^A-Za-z0-9.-]+", "-", str(rec.get("gpu"))).strip("-")[:40] or "gpu"
            suffix = f"_{gpu_slug}" + (f"_tp{tp}" if tp > 1 else "")
            blocks.append(Heading(f"{r.label}: {where}", 3))
            layers = [lv for lv in rec.get("layers") or [] if isinstance(lv, dict)]
            levels = [plots.Level(str(lv.get("name")), str(lv.get("title") or ""), lv.get("tokens_per_s_per_gpu"),
                                  str(lv.get("provenance") or "unknown"), lv.get("gap_name"), _layer_reason(lv))
                      for lv in layers]
            if any(lv.tokens_per_s_per_gpu is not None for lv in levels):
                # Names from sanitised parts: a field of the file can never name a path outside `out`.
                name = "_".join(file_part(x) for x in ("iceberg", r.label, f"b{b}", f"c{c}")) + suffix
                path = plots.iceberg_chart(out / f"{name}.png",
                                           title=f"Iceberg: {where} [{r.label} {r.run.run_id}]", levels=levels)
                blocks.append(Image(path, f"iceberg {r.label} batch {b} context {c}",
                                    f"{r.ref}: tokens/s per GPU at each layer (bar colour = provenance); red: lost "
                                    "to the layer above, named by its gap."))
            else:
                omitted.append(f"iceberg chart {r.label} b{b} c{c}{suffix}: no layer has tokens/s")
                blocks.append(Omitted(omitted[-1]))
            blocks.append(Table(["run", "layer", "what", "tokens/s per GPU", "$/M tokens", "J/token", "provenance",
                                 "gap to the layer above", "gap tokens/s", "share of the losses",
                                 "predicted tokens/s (modelled)"],
                                [[r.label, str(lv.get("name")), str(lv.get("title")),
                                  na(lv.get("tokens_per_s_per_gpu"), _layer_reason(lv)),
                                  num(lv.get("usd_per_million_tokens")),
                                  na(lv.get("j_per_token"), _layer_reason(lv)),
                                  str(lv.get("provenance") or "-"),
                                  "INVERTED: faster than the layer above (see the flag)" if lv.get("inverted") else
                                  str(lv.get("gap_name") or "-"),
                                  num(lv.get("gap_tokens_per_s")), pct(lv.get("gap_share")),
                                  num(lv.get("predicted_tokens_per_s_per_gpu")) + (
                                      "" if lv.get("prediction_error_pct") is None else
                                      f" ({lv['prediction_error_pct']:+.1f}% step)")] for lv in layers],
                                [f"prov-{lv.get('provenance')}" for lv in layers]))
            util, err, e_err = rec.get("utilisation"), rec.get("bottom_up_error_pct"), rec.get("energy_error_pct")
            against = rec.get("bottom_up_error_against") or "end to end"
            blocks.append(Para(
                f"{r.label}: utilisation (L5) "
                + (f"{pct(util)} as stated by the user" if util is not None else "not applied (none stated)")
                + f"; bottom-up error in tokens/s (L2 vs {against}, signed, both measured) "
                + (f"{err:+.1f}%" if isinstance(err, (int, float)) else "n/a (no end-to-end layer to compare with)")
                + (f"; in J/token {e_err:+.1f}%" if isinstance(e_err, (int, float)) else "") + "."))
            if tp > 1:
                blocks.append(Para(f"{r.label}: tensor parallel over {tp} GPUs: every layer's tokens/s per GPU is "
                                   f"batch / step time / {tp}, J/token counts the {tp} GPUs. L1i adds the plan's "
                                   "collectives at the interconnect roof (link bandwidth, no latency) to the roof "
                                   "above it; the gap it opens is the interconnect (all-reduce)."))
            loss = _op_loss_rows(rec, r.label)
            if loss:
                top = "L1i" if tp > 1 else "L1"
                what = "kernel and collective" if tp > 1 else "kernel"
                blocks.append(Para(f"{r.label}: {what} inefficiency inside {top} -> L2, largest losses first (time "
                                   "per step, measured against the measured roofline"
                                   + ("; collectives against the link roof" if tp > 1 else "") + "):"))
                blocks.append(Table(["run", "op", "label", "measured us", "at roof us", "lost us",
                                     f"share of {top}-L2 gap"], loss))
            if rec.get("reliable") is False:
                blocks.append(Para(f"{r.label} unreliable: {rec.get('unreliable_reason')}"))
            for flag in _notes(rec.get("flags")):
                blocks.append(Para(f"{r.label} flag: {flag}"))
            for note in _notes(rec.get("notes")):
                blocks.append(Para(f"{r.label} note: {note}"))
    return blocks, omitted


# ------------------------------------------------------------------------------------------------------ main


def render_report(paths: Sequence[str | Path], out_dir: str | Path) -> Report:
    """Write report.md, report.html and the PNGs for the RunResult files `paths` into `out_dir`."""
    runs = load_runs(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from tokprof import __version__

    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    blocks: list[Block] = [
        Heading("tokprof report", 1),
        Para(f"Generated {now} by tokprof {__version__} from {len(runs)} RunResult file(s): "
             + ", ".join(r.ref for r in runs) + ". Every number names its run (R1, R2, ...: see Runs) and its "
             "provenance: measured (on the run's device), modelled (from specs or formulas) or projected "
             "(measured efficiency carried to another GPU's specs)."),
        *_runs_section(runs), *_ceilings_section(runs),
    ]
    omitted: list[str] = []
    for section in (_roofline_section(runs, out), _pareto_section(runs, out), _cost_section(runs),
                    _op_share_section(runs, out), _e2e_section(runs), _iceberg_section(runs, out)):
        blocks += section[0]
        omitted += section[1]
    md_path = out / "report.md"
    html_path = out / "report.html"
    md_path.write_text(to_markdown(blocks))
    html_path.write_text(to_html(blocks, "tokprof report: " + ", ".join(r.ref for r in runs)))
    figures = list(dict.fromkeys(b.path for b in blocks if isinstance(b, Image)))  # each PNG once
    return Report(md_path, html_path, figures, omitted)


def write_index(folder: str | Path) -> Path:
    """index.html in `folder`: a link to each report one level below it (one folder per run), newest first, with the
    run's first heading line; rewritten after every run so that it lists every report the folder holds."""
    import html

    root = Path(folder)
    reports = sorted(root.glob("*/report.html"), key=lambda p: p.stat().st_mtime, reverse=True)
    items = []
    for path in reports:
        when = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        name = html.escape(path.parent.name)
        items.append(f'<li><a href="{html.escape(path.parent.name)}/report.html">{name}</a> '
                     f'<span class="when">({when})</span></li>')
    page = ["<!DOCTYPE html>", '<html lang="en">', '<head><meta charset="utf-8"><title>tokprof reports</title>',
            "<style>body { font-family: system-ui, sans-serif; max-width: 900px; margin: 1.5em auto; } "
            ".when { color: #666; font-size: 12px; }</style></head>", "<body>", "<h1>tokprof reports</h1>",
            f"<p>{len(reports)} report(s), newest first; each folder holds one run's report.md, report.html and "
            "PNGs.</p>", "<ul>", *items, "</ul>", "</body>", "</html>"]
    out = root / "index.html"
    out.write_text("\n".join(page) + "\n")
    return out
