"""The end-to-end step time the bottom-up model predicts, from kernel measurements and measured overheads only.

    pred, why_not = predict_step(point, overhead, mode="eager", device_kind="cpu")
    pred.step_time_us, pred.terms

The inputs are a roll-up point (its kernel sum, op by op with counts) and the overhead micro-benchmark of the run
(tokprof.profiler.overhead); an end-to-end measurement is never an input, so the prediction can be held against one.

    CPU, eager   kernel sum + host work per step
                 (every op is synchronous and each measured kernel time already holds its own dispatch). Where the
                 end-to-end measurement timed the step's kernel calls in rounds between its blocks (`paired`,
                 tokprof.models.e2e_paired: a CPU's speed drifts between the kernel phase and the e2e phase), the
                 kernel sum is theirs: count x robust mean per call. Only kernel times; no step time is read.
    GPU, eager   max(kernel sum + bookkeeping kernels, dispatch sum + host work)
                 (the host issues calls while the GPU runs them: the slower of the two sets the step; dispatch sum =
                 sum over the plan of count x the op's measured dispatch)
    GPU, graphs  kernel sum + bookkeeping kernels + the step model's graph overhead
                 (tokprof.rollup.step_model.StepModel(execution="graph").overhead_us: a per-step cost for the
                 host work and sampling around the replay, plus a launch per graph node; its sources print with it)

Only measured kernel calls count (a modelled point's "step_overhead" op is not a kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The decode step's bookkeeping ops on a GPU: 4 tiny kernels (tokprof.models.transformer) of ~2 us each, launch
# included (an assumption of the size of a one-warp kernel on an H100-class GPU; they are not timed by the roll-up).
GPU_BOOKKEEPING_KERNELS = 4
GPU_TINY_KERNEL_US = 2.0


@dataclass
class StepPrediction:
    mode: str  # "eager" | "graph"
    step_time_us: float
    kernel_sum_us: float  # the kernel sum used: the roll-up point's (L2), or the paired rounds' on a CPU
    terms: dict[str, float] = field(default_factory=dict)  # every added term, us per step
    source: str = ""  # how it was computed, in words
    provenance: str = "modelled"


def _overhead(overhead: Any) -> Any:
    from tokprof.profiler.overhead import Overhead

    if overhead is None or isinstance(overhead, Overhead):
        return overhead
    return Overhead.from_dict(overhead)


def _paired_sum(point_ops: list[Any], paired: Any) -> tuple[float | None, str]:
    """(count x robust mean summed over the paired calls, how) when they are the point's calls; (None, why not)."""
    from tokprof.models.e2e_paired import PairedCall, paired_kernel_sum_us

    if not paired:
        return None, "no paired kernel rounds"
    calls = [c if isinstance(c, PairedCall) else PairedCall.from_dict(c) for c in paired]
    mine = sorted((o.op, o.count) for o in point_ops)
    theirs = sorted((c.op, c.count) for c in calls)
    if mine != theirs:
        return None, "the paired kernel rounds are not this point's calls"
    rounds = min(c.rounds for c in calls)
    n = sum(c.count for c in calls)
    return paired_kernel_sum_us(calls), (f"the step's {n} kernel calls timed in {rounds} rounds between the "
                                         "end-to-end blocks, count x robust mean")


def predict_step(point: Any, overhead: Any, *, mode: str, device_kind: str,
                 paired: Any = None) -> tuple[StepPrediction | None, str | None]:
    """(the predicted step, None) or (None, why not) for `point` (a RollupPoint) run end to end in `mode`.

    `overhead`: an Overhead (or its dict) measured on the same device, None when the run has none. `paired`: the
    PairedCall records (or dicts) of the end-to-end measurement, CPU eager only (module docstring)."""
    if mode not in ("eager", "graph"):
        raise ValueError(f"mode: expected 'eager' or 'graph', got {mode!r}")
    if device_kind not in ("cpu", "cuda"):
        raise ValueError(f"device_kind: expected 'cpu' or 'cuda', got {device_kind!r}")
    if point is None:
        return None, "no roll-up point: no kernel sum to predict from"
    if getattr(point, "tp", 1) != 1:
        return None, "end-to-end runs are single-GPU: no prediction at tp > 1"
    kernel_ops = [o for o in point.ops if o.op != "step_overhead"]
    kernels = sum(o.total_us for o in kernel_ops)
    calls = sum(o.count for o in kernel_ops)
    if mode == "graph":
        if device_kind != "cuda":
            return None, "CUDA graphs need a GPU"
        from tokprof.rollup.step_model import StepModel

        model = StepModel(execution="graph")
        book = GPU_BOOKKEEPING_KERNELS * GPU_TINY_KERNEL_US
        graph = model.overhead_us(calls + GPU_BOOKKEEPING_KERNELS, kernels + book)
        terms = {"bookkeeping kernels": book, "graph overhead": graph}
        return StepPrediction(mode, kernels + book + graph, kernels, terms,
                              f"kernel sum + {GPU_BOOKKEEPING_KERNELS} bookkeeping kernels x {GPU_TINY_KERNEL_US:g} us "
                              f"(stated) + the step model's graph overhead {graph:.4g} us ("
                              f"{model.step_overhead_us['graph']:g} us per step + {calls + GPU_BOOKKEEPING_KERNELS} "
                              f"nodes x {model.launch_us['graph']:g} us; {model.sources['step_overhead_us']})"), None
    oh = _overhead(overhead)
    if oh is None:
        return None, "no overhead micro-benchmark in this run (tokprof run measures it): no host work to add"
    if oh.kind != device_kind:
        return None, f"the overhead was measured on a {oh.kind} device, the point is on a {device_kind} device"
    host = oh.host_work_us(point.batch)
    if host is None:
        return None, "the overhead record has no host-work measurement"
    if device_kind == "cpu":
        paired_us, how = _paired_sum(kernel_ops, paired)
        if paired_us is not None:
            kernels, what = paired_us, f"kernel sum ({how})"
        else:
            what = f"kernel sum (the kernel phase's medians; {how})"
        return StepPrediction(mode, kernels + host, kernels, {"host work": host},
                              f"{what} + host work per step ({host:.4g} us at batch "
                              f"{point.batch}, measured); each kernel time holds its dispatch already"), None
    missing = sorted({o.op for o in kernel_ops if oh.dispatch_us(o.op) is None})
    if missing:
        return None, f"no dispatch measured for {', '.join(missing)}"
    dispatch = sum(o.count * oh.dispatch_us(o.op) for o in kernel_ops)
    book = GPU_BOOKKEEPING_KERNELS * GPU_TINY_KERNEL_US
    gpu_side, host_side = kernels + book, dispatch + host
    bound = "host" if host_side > gpu_side else "GPU"
    return StepPrediction(mode, max(gpu_side, host_side), kernels,
                          {"bookkeeping kernels": book, "dispatch": dispatch, "host work": host},
                          f"max(kernel sum + bookkeeping {book:g} us, dispatch {dispatch:.4g} us + host work "
                          f"{host:.4g} us): {bound}-bound"), None


# The goal of the eager prediction on an idle CPU (issue 12): median and max |predicted / measured step - 1|.
PREDICTION_GOAL_MEDIAN_PCT = 10.0
PREDICTION_GOAL_MAX_PCT = 20.0


def prediction_summary(run: Any, layer: str = "L4") -> dict[str, Any]:
    """How well `layer`'s predicted step (kernel sum + measured overheads) matched the measured one over the run's
    points: median and max |predicted / measured - 1| in %, the goal, and whether the figures can be judged (a
    contended CPU's cannot)."""
    import statistics

    errors = [(rec["batch"], rec["context"], lv["prediction_error_pct"]) for rec in run.reconciliation
              for lv in rec.get("layers") or [] if lv.get("name") == layer
              and isinstance(lv.get("prediction_error_pct"), (int, float))]
    unreliable = next((rec.get("unreliable_reason") for rec in run.reconciliation if not rec.get("reliable", True)),
                      None)
    out: dict[str, Any] = {"layer": layer, "points": len(errors), "median_abs_error_pct": None,
                           "max_abs_error_pct": None, "goal": f"median <= {PREDICTION_GOAL_MEDIAN_PCT:g}%, max <= "
                           f"{PREDICTION_GOAL_MAX_PCT:g}%", "met": None, "reliable": unreliable is None,
                           "unreliable_reason": unreliable,
                           "errors_pct": [{"batch": b, "context": c, "error_pct": round(e, 2)} for b, c, e in errors]}
    if errors:
        abs_errors = [abs(e) for _, _, e in errors]
        out["median_abs_error_pct"] = round(statistics.median(abs_errors), 2)
        out["max_abs_error_pct"] = round(max(abs_errors), 2)
        if unreliable is None:
            out["met"] = (out["median_abs_error_pct"] <= PREDICTION_GOAL_MEDIAN_PCT
                          and out["max_abs_error_pct"] <= PREDICTION_GOAL_MAX_PCT)
    return out


def prediction_line(summary: dict[str, Any]) -> str | None:
    """The closure of the bottom-up model in one line (markup-free), None when nothing was predicted."""
    if not summary["points"]:
        return None
    figures = (f"median |predicted / measured - 1| {summary['median_abs_error_pct']:.1f}%, max "
               f"{summary['max_abs_error_pct']:.1f}% over {summary['points']} point(s)")
    if not summary["reliable"]:
        return f"{summary['layer']} prediction not judged: {summary['unreliable_reason']} (as measured: {figures})"
    verdict = "meets" if summary["met"] else "misses"
    return f"{summary['layer']} prediction (kernel sum + measured overheads): {figures}; {verdict} the goal " \
           f"({summary['goal']})"
