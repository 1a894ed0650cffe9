"""Iso-interactivity comparison of two systems and the decomposition of their ratio into factors.

    cmp = compare_systems(shape, Scenario.of("hgx-h200", "fp8"), Scenario.of("gb300-nvl72", "fp4"),
                          Workload(1024, 1024), tokens_per_s_per_user=50.0)
    cmp.ratio                                  # B's best output tokens/s per GPU / A's, at >= 50 tokens/s per user
    [(f.name, f.ratio) for f in cmp.steps]     # one factor at a time, in FACTOR_ORDER

Value of a scenario: its curve's best output tokens/s per GPU (all GPUs, prefill pool included) at >= the stated
tokens/s per user (tokprof.rollup.curve). Factors, switched from A's value to B's one at a time in FACTOR_ORDER:

  precision                  weight/activation format (fp8 -> fp4: bytes per weight, the math peak used)
  tensor-core FLOP/s         the GPU's dense peaks (a GPU without FP4 runs FP4 weights on FP8 math)
  HBM bandwidth              TB/s
  HBM capacity -> batch      GB (the largest batch that fits, and how few GPUs hold the weights)
  scale-up domain -> EP      GPUs per NVLink domain and the NVLink bandwidth/latency (EP all-to-alls on NVLink)
  scale-out network          NIC bandwidth/latency per GPU (EP beyond the domain, KV transfer)
  disaggregation             whether prefill and decode may run in separate pools
  MTP                        the multi-token-prediction depths allowed
  step-model calibration     the op-efficiency curves (A's and B's differ only when a measured reference run anchors
                             one of them): tokprof cannot attribute this part to a hardware factor (the residual)

Each step's contribution is log(value after) - log(value before); they add up to log(ratio) exactly, but depend on
the order (interactions: e.g. FP4 matters more once the batch is compute-bound). `reverse=True` runs the reverse
order too; `shapley=True` averages every factor's contribution over all orders (exact, over the 2^n subsets).
A step whose value is None (no configuration reaches the interactivity) has no contribution: it says so.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any

from tokprof.rollup.curve import Curve, Features, Workload, serving_curve
from tokprof.rollup.model_shape import ModelShape
from tokprof.rollup.step_model import StepModel, reference_step_model
from tokprof.rollup.systems import Hardware, hardware, resolve_system

FACTOR_ORDER = ("precision", "tensor-core FLOP/s", "HBM bandwidth", "HBM capacity -> batch",
                "scale-up domain -> EP", "scale-out network", "disaggregation", "MTP", "step-model calibration")
_HW_FIELDS = {"tensor-core FLOP/s": ("peak_tflops",), "HBM bandwidth": ("hbm_tbps",),
              "HBM capacity -> batch": ("memory_gb",),
              "scale-up domain -> EP": ("gpus_per_domain", "nvlink_gbps", "nvlink_latency_us"),
              "scale-out network": ("scale_out_gbps", "scale_out_latency_us")}


@dataclass(frozen=True)
class Scenario:
    """A system as served: its hardware, precision, allowed features and step model (with its provenance)."""

    hw: Hardware
    precision: str
    features: Features = field(default_factory=Features)
    step_model: StepModel = field(default_factory=StepModel)
    provenance: str = "modelled"

    @classmethod
    def of(cls, system: str, precision: str, features: Features | None = None,
           step_model: StepModel | None = None, run: str | None = None) -> Scenario:
        """A system by name. Its step model: `step_model` if given; else fitted to the RunResult file `run` (a
        measured run on this system's GPU); else to a shipped reference run of its GPU (tokprof/data/reference/);
        else the defaults. A curve from measured efficiency curves is 'projected', from the defaults 'modelled'."""
        hw = hardware(resolve_system(system))
        fitted = None
        if step_model is None and run is not None:
            fitted = step_model_from_run(run, hw.gpu)
        elif step_model is None:
            fitted = reference_step_model(hw.gpu)
        sm = step_model or fitted or StepModel()
        return cls(hw=hw, precision=precision, features=features or Features(), step_model=sm,
                   provenance="projected" if fitted is not None else "modelled")

    def curve(self, shape: ModelShape, workload: Workload) -> Curve:
        return serving_curve(shape, self.hw, workload, self.precision, features=self.features,
                             step_model=self.step_model, provenance=self.provenance)


def step_model_from_run(path: str, gpu: str) -> StepModel:
    """The step model with each op's efficiency curve fitted to a measured RunResult of `gpu` (the hook
    reference_step_model uses for shipped reference runs); ValueError when the run is of another GPU or has no
    memory-bound kernels to fit."""
    from tokprof.profiler.schema import load_run
    from tokprof.rollup.step_model import fit_efficiency_curves

    try:
        run = load_run(path)
    except (OSError, KeyError, TypeError) as err:
        raise ValueError(f"run: cannot read a RunResult from {path!r}: {err}") from err
    key = run.provenance.device.spec_key
    if key != gpu:
        raise ValueError(f"run: {path!r} was measured on {key or run.provenance.device.name!r}, not {gpu!r}; its "
                         "kernels cannot anchor this system's curve")
    curves = fit_efficiency_curves(run)
    if not curves:
        raise ValueError(f"run: {path!r} has no memory-bound kernel measurements to fit efficiency curves to")
    return StepModel().with_overrides({"memory_efficiency": {op: e for op, (e, _) in curves.items()},
                                       "op_call_latency_us": {op: a for op, (_, a) in curves.items()}},
                                      source=f"fitted to the measured run {path} ({run.provenance.device.name})")


def switch(a: Scenario, b: Scenario, factors: set[str] | frozenset[str]) -> Scenario:
    """A with the named factors taken from B."""
    hw = a.hw
    for name, names in _HW_FIELDS.items():
        if name in factors:
            hw = hw.with_(**{f: getattr(b.hw, f) for f in names})
    feats = a.features
    if "disaggregation" in factors:
        feats = replace(feats, disaggregation=b.features.disaggregation)
    if "MTP" in factors:
        feats = replace(feats, mtp_depths=b.features.mtp_depths)
    return replace(a, hw=hw, features=feats, precision=b.precision if "precision" in factors else a.precision,
                   step_model=b.step_model if "step-model calibration" in factors else a.step_model)


@dataclass
class FactorStep:
    name: str
    value_before: float | None  # best output tokens/s per GPU at the interactivity
    value_after: float | None
    log_ratio: float | None  # natural log; None when either value is None
    shapley_log_ratio: float | None = None
    reverse_log_ratio: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.log_ratio is None else math.exp(self.log_ratio)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value_before": self.value_before, "value_after": self.value_after,
                "ratio": self.ratio, "log_ratio": self.log_ratio, "shapley_log_ratio": self.shapley_log_ratio,
                "reverse_log_ratio": self.reverse_log_ratio, "note": self.note}


@dataclass
class Comparison:
    model: str
    workload: str
    tokens_per_s_per_user: float
    a: dict[str, Any]  # system, precision, best point, $/M, tokens/s per MW, provenance
    b: dict[str, Any]
    ratio: float | None  # B / A, output tokens/s per GPU (all GPUs)
    steps: list[FactorStep]
    order: tuple[str, ...]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "workload": self.workload, "tokens_per_s_per_user": self.tokens_per_s_per_user,
                "a": self.a, "b": self.b, "ratio": self.ratio, "order": list(self.order),
                "steps": [s.to_dict() for s in self.steps], "notes": self.notes}


def _summary(s: Scenario, curve: Curve, target: float) -> dict[str, Any]:
    best = curve.best_at(target)
    out = {"system": s.hw.system, "gpu": s.hw.gpu, "precision": s.precision, "provenance": s.provenance,
           "best": best.to_dict() if best else None,
           "output_tokens_per_s_per_gpu": best.output_tokens_per_s_per_gpu if best else None,
           "usd_per_million_tokens": best.usd_per_million_tokens if best else None,
           "tokens_per_s_per_mw": best.tokens_per_s_per_mw if best else None,
           "max_tokens_per_s_per_user": max((p.tokens_per_s_per_user for p in curve.frontier), default=None),
           "sources": curve.sources}
    if best is None:
        out["reason"] = (f"no configuration of {s.hw.system} reaches {target:g} tokens/s per user (its fastest: "
                         f"{out['max_tokens_per_s_per_user'] or 0:.1f})")
    return out


def compare_systems(shape: ModelShape, a: Scenario, b: Scenario, workload: Workload, tokens_per_s_per_user: float,
                    *, order: tuple[str, ...] = FACTOR_ORDER, reverse: bool = True,
                    shapley: bool = False) -> Comparison:
    """Both systems' best at the interactivity, the ratio B / A and its factors (module docstring)."""
    if not tokens_per_s_per_user > 0:
        raise ValueError(f"tokens_per_s_per_user: expected a positive number, got {tokens_per_s_per_user!r}")
    unknown = set(order) - set(FACTOR_ORDER)
    if unknown or len(set(order)) != len(FACTOR_ORDER):
        raise ValueError(f"order: expected a permutation of {list(FACTOR_ORDER)}, got {list(order)}")
    cache: dict[str, float | None] = {}

    def value(switched: frozenset[str]) -> float | None:
        scenario = switch(a, b, switched)
        key = repr(scenario)  # switching a factor A and B share gives the same scenario: computed once
        if key not in cache:
            best = scenario.curve(shape, workload).best_at(tokens_per_s_per_user)
            cache[key] = best.output_tokens_per_s_per_gpu if best else None
        return cache[key]

    def walk(seq: tuple[str, ...]) -> dict[str, tuple[float | None, float | None]]:
        done: frozenset[str] = frozenset()
        out = {}
        for name in seq:
            before = value(done)
            done = done | {name}
            out[name] = (before, value(done))
        return out

    fwd = walk(tuple(order))
    rev = walk(tuple(reversed(order))) if reverse else {}
    lr = lambda v: None if v[0] is None or v[1] is None else math.log(v[1] / v[0])  # noqa: E731
    sh: dict[str, float | None] = {}
    if shapley:  # factors A and B share contribute 0 in every order: enumerate only the ones that differ
        differ = [f for f in FACTOR_ORDER if switch(a, b, {f}) != a]
        n = len(differ)
        for name in FACTOR_ORDER:
            if name not in differ:
                sh[name] = 0.0
                continue
            others = [f for f in differ if f != name]
            total, ok = 0.0, True
            for k in range(n):
                w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
                for subset in itertools.combinations(others, k):
                    s = frozenset(subset)
                    d = lr((value(s), value(s | {name})))
                    if d is None:
                        ok = False
                        break
                    total += w * d
                if not ok:
                    break
            sh[name] = total if ok else None
    steps = []
    for name in order:
        before, after = fwd[name]
        note = "" if lr(fwd[name]) is not None else "no configuration reaches the interactivity before or after"
        steps.append(FactorStep(name=name, value_before=before, value_after=after, log_ratio=lr(fwd[name]),
                                shapley_log_ratio=sh.get(name), reverse_log_ratio=lr(rev[name]) if rev else None,
                                note=note))
    ca, cb = a.curve(shape, workload), b.curve(shape, workload)
    sa, sb = _summary(a, ca, tokens_per_s_per_user), _summary(b, cb, tokens_per_s_per_user)
    ratio = (sb["output_tokens_per_s_per_gpu"] / sa["output_tokens_per_s_per_gpu"]
             if sa["output_tokens_per_s_per_gpu"] and sb["output_tokens_per_s_per_gpu"] else None)
    notes = [f"value: best output tokens/s per GPU over all GPUs (prefill pool included) at >= "
             f"{tokens_per_s_per_user:g} tokens/s per user; factors switched A -> B in the order shown; "
             "contributions are log-ratios and add up to the total; 'reverse' is the same in the reverse order "
             "(the difference is the order-dependence)" + ("; 'shapley' averages over all orders" if shapley else "")]
    for key in ("usd_per_million_tokens", "tokens_per_s_per_mw"):
        va, vb = sa[key], sb[key]
        sb[f"{key}_ratio_b_over_a"] = vb / va if va and vb else None
    return Comparison(model=shape.name, workload=workload.label, tokens_per_s_per_user=tokens_per_s_per_user,
                      a=sa, b=sb, ratio=ratio, steps=steps, order=tuple(order), notes=notes)


def waterfall_png(cmp: Comparison, path: str, published_ratio: float | None = None) -> str:
    """The factor waterfall (multiplicative, log scale): A's value, each factor's step, B's value; with a
    published ratio, the part tokprof does not reach as a last bar. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a0 = cmp.a["output_tokens_per_s_per_gpu"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    names, lows, highs, colors = [f"A: {cmp.a['system']}"], [1.0], [a0 or 1.0], ["#777777"]
    level = a0 or 1.0
    for s in cmp.steps:
        names.append(s.name)
        if s.log_ratio is None:
            lows.append(level)
            highs.append(level)
            colors.append("#dddddd")
            continue
        new = level * math.exp(s.log_ratio)
        lows.append(min(level, new))
        highs.append(max(level, new))
        colors.append("#2a9d8f" if new >= level else "#e76f51")
        level = new
    names.append(f"B: {cmp.b['system']}")
    lows.append(1.0)
    highs.append(cmp.b["output_tokens_per_s_per_gpu"] or 1.0)
    colors.append("#777777")
    if published_ratio is not None and a0:
        names.append(f"published: A x {published_ratio:.1f}")
        target = a0 * published_ratio
        lows.append(min(level, target))
        highs.append(max(level, target))
        colors.append("#bbbbbb")
    x = list(range(len(names)))
    ax.bar(x, [h - lo for lo, h in zip(lows, highs, strict=True)], bottom=lows, color=colors)
    for i, s in enumerate(cmp.steps, start=1):  # each factor's multiplier over its bar
        text = "n/a" if s.log_ratio is None else f"x{math.exp(s.log_ratio):.2f}"
        ax.text(i, highs[i] * 1.08, text, ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(max(0.5, min(v for v in lows if v > 0) * 0.5), max(highs) * 2.5)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("output tokens/s per GPU (all GPUs)")
    ax.set_title(f"{cmp.model} {cmp.workload}: {cmp.b['system']} / {cmp.a['system']} at {cmp.tokens_per_s_per_user:.0f}"
                 f" tokens/s per user = {cmp.ratio:.2f}x ({cmp.a['provenance']} / {cmp.b['provenance']}; factors in "
                 "this order)" if cmp.ratio else f"{cmp.model}: no ratio at this interactivity", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
