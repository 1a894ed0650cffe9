"""The invariants of a reconciliation: a layer faster than the layer above it is flagged with its likely cause, op
losses are shares of the losses that add up to 100% (ops faster than their roof are flagged apart, never findings),
and a CPU run whose cores were shared says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokprof.profiler.schema import RunResult

if TYPE_CHECKING:
    from tokprof.rollup.reconcile import Reconciliation


# Why a layer can come out faster than the layer above it, by (upper, lower) layer: the likely causes to check.
INVERSION_CAUSES = {
    ("L0", "L1"): "the measured ceilings exceed the datasheet: the copy benchmark read cached data, or the spec row "
                  "is wrong",
    ("L1", "L2"): "the kernel sum beats the measured roofline: the ceilings were measured low (another process "
                  "competed, or the GPU throttled), or kernels were timed with warm caches (inputs cache-resident, "
                  "read above the DRAM ceiling), or a cost formula counts too many bytes",
    ("L1i", "L2"): "the kernel and collective sum beats its roof: the ceilings or the link bandwidth were measured "
                   "low, or kernels were timed with warm caches",
    ("L2", "L3"): "the end-to-end loop beats the sum of its own kernels: kernels timed slower than they run in the "
                  "loop (contended while the kernels were timed, or caches flushed harder than the loop does)",
    ("L2", "L4"): "the end-to-end loop beats the sum of its own kernels: kernels timed slower than they run in the "
                  "loop (contended while the kernels were timed, or caches flushed harder than the loop does)",
    ("L3", "L4"): "the eager loop beats the CUDA-graph replay of the same step: different backends or a graph "
                  "capture problem",
}


def contention_note(run: RunResult) -> str | None:
    """How other processes competed for a CPU run's cores, or None (a GPU run, an idle CPU, not recorded)."""
    from tokprof.profiler.cpu_load import describe_record

    if run.provenance.device.kind != "cpu":
        return None
    if run.cpu_load is None:  # a file from before cpu_load was recorded: its note says whether the CPU was shared
        return next((n.split(": the CPU was shared")[0] for n in run.notes if "the CPU was shared" in n), None)
    return describe_record(run.cpu_load)


def check_op_invariants(rec: Reconciliation, gap_us: float, roof_name: str) -> None:
    """Op losses are shares of the losses (adding up to 100%); ops faster than their roof are flagged apart; what
    the ops' net loss leaves of the gap is said."""
    ops = rec.op_inefficiency
    losses = sum(o.lost_us for o in ops if o.finding)
    gains = -sum(o.lost_us for o in ops if not o.finding)
    rec.op_gains_us = gains
    rec.op_unexplained_us = gap_us - (losses - gains)
    if gains > 0:
        faster = [f"{o.op} {o.label}" for o in ops if not o.finding]
        rec.flags.append(f"{len(faster)} op(s) ran faster than their measured roof ({', '.join(faster[:4])}"
                         f"{', ...' if len(faster) > 4 else ''}; {gains:.4g} us per step in all): not losses; likely "
                         "the ceilings were measured low (contended or throttled) or the inputs were cache-resident")
    if losses > 0 and gap_us > 0:
        text = f"op losses inside {roof_name} -> L2: {losses:.4g} us per step, each op's share of them adds up to 100%"
        if gains > 0:
            text += f"; less {gains:.4g} us of ops faster than their roof, the gap is {gap_us:.4g} us"
        if abs(rec.op_unexplained_us) > 1e-3 * max(abs(gap_us), 1e-9):
            text += f"; {rec.op_unexplained_us:.4g} us of the gap unexplained by the ops (another plan?)"
        rec.notes.append(text)


def flag_inversions(rec: Reconciliation, contention: str | None) -> None:
    known = [layer for layer in rec.layers if layer.tokens_per_s_per_gpu is not None]
    for prev, cur in zip(known, known[1:], strict=False):
        if not cur.inverted:
            continue
        faster = (cur.tokens_per_s_per_gpu / prev.tokens_per_s_per_gpu - 1) * 100
        cause = INVERSION_CAUSES.get((prev.name, cur.name), "a lower layer cannot beat the one above it: a "
                                     "measurement or model error")
        cur.flag = (f"{cur.name} ({cur.title}) is {faster:.1f}% faster than {prev.name} ({prev.title}): {cause}"
                    + (f"; {contention}" if contention else ""))
        rec.flags.append(cur.flag)
