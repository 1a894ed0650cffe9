"""The interconnect part of a tensor-parallel roll-up point: the collectives of one GPU's decode step, timed.

    kernels, collectives = tp_step(config, batch=8, context=4096, dtype="bf16", tp=4)
    timed = time_collectives(collectives, spec=resolve_gpu("h100"), options=CollectiveOptions())
    timed.shares            # OpShares (bound "interconnect") to add to the kernels' shares; [] when unknown
    timed.provenance        # "measured" when the run measured every collective of the step, else "modelled"

Each collective (tokprof.models.tp: op "all_reduce" / "all_gather", shape {"bytes", "world"}) takes the median of a
run's measurement of the same (op, bytes, world, dtype) when the run has one, else the model of
tokprof.profiler.collectives:

    time = latency + bytes x bus factor / (link GB/s per direction x efficiency)

with the efficiency and latency stated (CollectiveOptions; the defaults are collectives.DEFAULT_EFFICIENCY and
DEFAULT_LATENCY_US) and repeated in the point's notes. The link comes from a spec-table row: the GPU the points are
for, or `interconnect_gpu` named by the user. A CPU has no interconnect row, so a CPU roll-up at tp > 1 has no
collective time (None, with the reason) unless a GPU is named for the modelled collectives; a run's own CPU (gloo)
measurements are used only when no other GPU is named, since they time another interconnect.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tokprof.models.config import ModelConfig
from tokprof.models.plan import DEFAULT_BLOCK_SIZE, KernelCall, decode_plan
from tokprof.models.tp import split_collectives
from tokprof.profiler import collectives as coll
from tokprof.profiler.devices import GpuSpec
from tokprof.profiler.schema import KernelMeasurement
from tokprof.rollup.records import OpShare


@dataclass
class CollectiveOptions:
    """How the collectives of a tp > 1 point are timed where the run has no measurement of them."""

    interconnect_gpu: str | GpuSpec | None = None  # spec row whose link models them; None: the points' own GPU
    efficiency: float = coll.DEFAULT_EFFICIENCY  # stated fraction of the link bandwidth (busbw / link)
    latency_us: float | None = None  # stated fixed cost per collective; None: DEFAULT_LATENCY_US of the link kind
    link: str = coll.AUTO  # "auto" (NVLink where the GPU has it, else PCIe), "nvlink" or "pcie"


@dataclass
class TimedCollectives:
    """The collectives of one step: their op shares (empty when unknown), provenance, reason and notes."""

    shares: list[OpShare] = field(default_factory=list)
    provenance: str | None = None  # "measured" | "modelled"; None when unknown
    reason: str | None = None  # why the collective time is unknown
    notes: list[str] = field(default_factory=list)

    @property
    def time_us(self) -> float | None:
        return sum(o.total_us for o in self.shares) if self.shares else None


def tp_step(config: ModelConfig, batch: int, context: int, dtype: str, tp: int,
            block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[list[KernelCall], list[KernelCall]]:
    """(kernel calls, collectives) of one GPU's decode step at tensor parallelism `tp` (no collective at tp=1)."""
    return split_collectives(decode_plan(config, batch, context, dtype, tp=tp, block_size=block_size))


def link_roof_us(call: KernelCall | OpShare, link: coll.Link | None) -> float | None:
    """One collective's time at the link roof: message bytes x bus factor / link bandwidth per direction, us
    (`call` a plan's collective or its op share: op and shape {"bytes", "world"}); None when the link is unknown."""
    if link is None:
        return None
    factor = coll.bus_factor(call.op, call.shape["world"])
    return call.shape["bytes"] * factor / (link.gbps_per_direction * 1e9) * 1e6


def interconnect_spec(options: CollectiveOptions, own: GpuSpec | None) -> tuple[GpuSpec | None, bool]:
    """(the spec row the collectives are modelled from, whether it is the user's named interconnect GPU)."""
    if options.interconnect_gpu is None:
        return own, False
    from tokprof.rollup.project import resolve_gpu  # project.py builds on this module

    return resolve_gpu(options.interconnect_gpu), True


def time_collectives(collectives: list[KernelCall], *, spec: GpuSpec | None, options: CollectiveOptions,
                     measurements: Iterable[KernelMeasurement] = ()) -> TimedCollectives:
    """Time every collective of one GPU's step: measured where `measurements` has it, else modelled from `spec`."""
    if not collectives:
        return TimedCollectives(provenance="modelled", notes=["no collective in this step"])
    link = coll.interconnect(spec, options.link) if spec is not None else None
    timed = coll.plan_collective_times(collectives, spec=spec, measurements=measurements,
                                       efficiency=options.efficiency, latency_us=options.latency_us,
                                       link=options.link)
    unknown = [ct for _, ct in timed if ct.time_us is None]
    if unknown:
        return TimedCollectives(reason=unknown[0].note + ("; name a GPU for the modelled collectives "
                                                          "(interconnect_gpu) or measure them "
                                                          "(tokprof bench --op all_reduce --world-size N)"))
    modelled = [ct for _, ct in timed if ct.provenance == "modelled"]
    out = TimedCollectives(provenance="modelled" if modelled else "measured")
    if modelled:  # the stated assumptions once per point; the per-collective formula is in collectives.py
        assert link is not None  # a modelled time exists only where the link is known
        latency = coll.DEFAULT_LATENCY_US[link.kind] if options.latency_us is None else options.latency_us
        out.notes.append(f"collectives modelled, not measured: time = {latency:g} us latency (stated) + message "
                         f"bytes x busbw factor / ({link.gbps_per_direction:g} GB/s {link.kind} per direction x "
                         f"{options.efficiency:g} stated efficiency); link: {link.source}")
    for call, ct in timed:
        roof = link_roof_us(call, link)
        out.shares.append(OpShare(op=call.op, label=call.label, count=call.count, time_us=ct.time_us,
                                  total_us=call.count * ct.time_us, share=0.0, efficiency_measured=None,
                                  efficiency_datasheet=roof / ct.time_us if roof is not None else None,
                                  bound="interconnect", shape=dict(call.shape)))
        how = "modelled" if ct.provenance == "modelled" else ct.note
        out.notes.append(f"{call.label}: {call.count} x {ct.time_us:.4g} us per step ({call.op} of "
                         f"{call.shape['bytes']} B over {call.shape['world']} GPUs, {how})")
    return out
