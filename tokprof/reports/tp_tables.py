"""The report's tensor-parallel tables (issue 8): collective measurements against the link roof, and the per-GPU
step of tp > 1 roll-up points split into kernels and collectives. Used by render.py; each returns no block at all
when the runs hold no such data (the single-GPU report is unchanged).
"""

from __future__ import annotations

from typing import Any

from tokprof.reports.document import Block, Heading, Para, Table, na, num, pct
from tokprof.reports.render import LoadedRun, is_collective, tp_of


def collectives_blocks(runs: list[LoadedRun]) -> list[Block]:
    """Collective measurements, apart from the HBM roofline: nccl-tests bandwidths against the link roof."""
    rows, classes = [], []
    for r in runs:
        for k in (k for k in r.run.kernels if is_collective(k)):
            t, rf = k.timing, k.roofline
            nbytes, world = k.shape.get("bytes"), k.shape.get("world")
            algbw = nbytes / (t.median_us * 1e-6) / 1e9 if isinstance(nbytes, int) and t.median_us > 0 else None
            roof = next((n.split(": ", 1)[1] for n in rf.note.split("; ") if n.startswith("datasheet roof: ")), None)
            rows.append([r.label, k.op, num(nbytes), num(world), k.dtype, k.backend, k.device,
                         f"{num(t.median_us)} ({num(t.p10_us)}-{num(t.p90_us)})", num(algbw), num(rf.achieved_gbps),
                         na(rf.efficiency_datasheet, roof, pct), k.provenance,
                         "SUSPICIOUS: above the link" if rf.suspicious else ""])
            classes.append(f"prov-{k.provenance}")
    if not rows:
        return []
    return [Heading("Collectives (interconnect)", 3),
            Para("All-reduce and all-gather measurements, kept out of the HBM roofline: nccl-tests bandwidths, "
                 "algbw = message bytes / time, busbw = algbw x 2(n-1)/n (all-reduce) or (n-1)/n (all-gather), "
                 "against one GPU's link bandwidth per direction (datasheet, modelled)."),
            Table(["run", "op", "message bytes", "ranks", "dtype", "backend", "device", "median us (p10-p90)",
                   "algbw GB/s", "busbw GB/s", "% of link roof", "provenance", "flags"], rows, classes)]


def tp_blocks(points: list[tuple[LoadedRun, dict[str, Any]]]) -> list[Block]:
    """Tensor-parallel points: the per-GPU step split into kernels and collectives (absent when there are none)."""
    tp_points = [(r, p) for r, p in points if tp_of(p) > 1]
    if not tp_points:
        return []
    rows = []
    for r, p in tp_points:
        coll, step = p.get("collective_time_us"), p.get("step_time_us")
        ar_us = sum(float(o.get("total_us") or 0.0) for o in p.get("ops") or [] if o.get("op") == "all_reduce")
        known = isinstance(coll, (int, float)) and isinstance(step, (int, float)) and step > 0
        rows.append([r.label, str(p.get("provenance")), str(p.get("gpu")), str(p.get("model")), num(tp_of(p)),
                     num(p.get("batch")), num(p.get("context")), num(step), num(p.get("kernel_time_us")),
                     na(coll, p.get("collective_reason")), pct(coll / step) if known else "n/a",
                     pct(ar_us / step) if known else "n/a",
                     str(p.get("collective_provenance") or "n/a (unknown)"), num(p.get("tokens_per_s_per_gpu"))])
    return [Heading("Tensor-parallel points: interconnect", 3),
            Para("Per-GPU decode step of a tensor-parallel group = kernels + count x time of its collectives "
                 "(all-reduces after the O and down projections, the logits all-gather); tokens/s per GPU = batch / "
                 "step time / tp. Collective times are measured where the run measured that size, else modelled "
                 "from the interconnect spec at a stated efficiency (see each point's notes)."),
            Table(["run", "provenance", "GPU", "model", "tp", "batch", "context", "step us (per GPU)", "kernels us",
                   "collectives us", "collectives share", "all-reduce share", "collectives provenance",
                   "tokens/s per GPU"], rows, [f"prov-{p.get('provenance')}" for _, p in tp_points])]
