"""Fleet sweeps on Ray: the same profile on several GPU generations, gathered into one history and one report.

    tokprof fleet --address ray://head:10001 --gpus h100,h200 --model llama-3.1-8b --out fleet/

    result = run_fleet([gpu_target("h100"), gpu_target("h200")], "llama-3.1-8b", "fleet/", address="auto")

One Ray task per GPU type, each asking for `num_gpus=1` and Ray's accelerator-type resource of that GPU
(ray.util.accelerators names: "accelerator_type:H100", ...), runs the profile on its node (`tokprof run` through
tokprof.runner.run_main by default, or any task function with the same signature), and sends the RunResult back as
JSON: nodes need no shared file system. The driver validates each RunResult, writes it to OUT/<target>.json,
records it in the history database (tokprof.reports.history), renders one report over all of them and writes the
`tokprof compare` verdicts of every GPU against the first (cross-generation: by roofline efficiency and SM cycles).

A GPU type that no node offers fails at once with the cluster's resources in the message (Ray would otherwise
leave the task pending for ever); a task that fails is reported and the others go on. Ray is an optional extra
(`pip install tokprof[fleet]`). On a CPU, targets with custom resources stand in for GPU types (the tests do so).
"""

from __future__ import annotations

import functools
import json
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokprof.profiler.schema import run_from_dict, save_json_atomic

# Spec-table keys -> the ray.util.accelerators constant naming their accelerator type, and the label Ray puts on
# such a node (used when an older Ray lacks the constant).
RAY_ACCELERATORS: dict[str, tuple[str, str]] = {
    "a100": ("NVIDIA_A100", "A100"), "h100": ("NVIDIA_H100", "H100"), "h200": ("NVIDIA_H200", "H200"),
    "b200": ("NVIDIA_B200", "B200"), "gb200": ("NVIDIA_GB200", "GB200"), "gb300": ("NVIDIA_GB300", "GB300"),
    "l40s": ("NVIDIA_L40S", "L40S"), "l4": ("NVIDIA_L4", "L4"),
    "mi300x": ("AMD_INSTINCT_MI300x", "AMD-Instinct-MI300X-OAM"),
}

TaskFn = Callable[..., Any]  # task(model=..., out_dir=..., device=...) -> path of the RunResult it wrote


def require_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise RuntimeError("fleet sweeps need Ray, an optional extra: pip install 'tokprof[fleet]' (or ray>=2.9); "
                           "on one machine, run `tokprof run` directly instead") from err
    return ray


@dataclass(frozen=True)
class FleetTarget:
    """Where one task runs: a GPU type (num_gpus=1 + Ray's accelerator type) or a node holding custom resources."""

    name: str  # file name and label: "h100", "cpu_a"
    device: str = "cuda"  # the device the task profiles on its node
    num_gpus: float = 1.0
    accelerator_type: str | None = None  # Ray's label, e.g. "H100"
    resources: Mapping[str, float] = field(default_factory=dict)

    def ray_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_gpus": self.num_gpus, "num_cpus": 1, "max_retries": 0}
        if self.accelerator_type:
            options["accelerator_type"] = self.accelerator_type
        if self.resources:
            options["resources"] = dict(self.resources)
        return options

    def needs(self) -> dict[str, float]:
        """The cluster resources this target needs somewhere (Ray's accelerator_type option asks for 0.001)."""
        out = dict(self.resources)
        if self.num_gpus:
            out["GPU"] = self.num_gpus
        if self.accelerator_type:
            out[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return out


def gpu_target(gpu: str) -> FleetTarget:
    """The target of a GPU type by spec-table family name (h100, h200, b200, a100, ...); ValueError otherwise."""
    key = gpu.strip().lower()
    if key not in RAY_ACCELERATORS:
        raise ValueError(f"gpus: expected names among {sorted(RAY_ACCELERATORS)}, got {gpu!r}")
    constant, label = RAY_ACCELERATORS[key]
    try:
        # The package re-exports only some constants (no NVIDIA_H200 in Ray 2.60); its submodule holds them all.
        from ray.util.accelerators import accelerators

        label = getattr(accelerators, constant, label)
    except ImportError:
        pass  # Ray absent (run_fleet says so) or laid out otherwise: the label is still Ray's own spelling
    return FleetTarget(name=key, device="cuda", num_gpus=1.0, accelerator_type=label)


# ------------------------------------------------------------------------------------------------------- tasks


def runner_task(model: str, out_dir: str, device: str) -> Path:
    """`tokprof run` on this node: tokprof.runner.run_main(model=, out_dir=, device=) -> the RunResult path.

    The driver records the runs and renders the fleet's report, so the node skips its own report and keeps its
    history entry in the scratch folder (the node's own history database is left as it was)."""
    try:
        from tokprof.runner import run_main
    except ImportError as err:
        raise RuntimeError("tokprof.runner.run_main (`tokprof run`) is not in this tokprof install; run the fleet "
                           "with --task bottom-up (kernel roll-up only) or upgrade tokprof on the nodes") from err
    return Path(run_main(model=model, out_dir=out_dir, device=device, report=False,
                         history_db=Path(out_dir) / "node-history.db",
                         command=["tokprof", "fleet", "run", "--model", model, "--device", device]))


def bottom_up_task(model: str, out_dir: str, device: str, *, batches: Sequence[int] = (1, 8),
                   contexts: Sequence[int] = (1024,), backend: str | None = None, dtype: str | None = None,
                   timing_kwargs: dict[str, Any] | None = None, ceilings: Any = "auto") -> Path:
    """A quick profile: the kernel roll-up (tokprof.rollup.bottom_up) of `model`, written to out_dir/run.json.
    Defaults: triton and bf16 on a GPU, torch and fp32 on the CPU."""
    from tokprof.models.config import ModelConfig
    from tokprof.rollup.bottom_up import bottom_up

    cpu = device.startswith("cpu")
    config = ModelConfig.from_name(model)
    out = Path(out_dir) / "run.json"
    command = ["tokprof", "fleet", "bottom-up", "--model", model, "--device", device]
    bottom_up(config, list(batches), list(contexts), backend or ("torch" if cpu else "triton"), device,
              dtype=dtype or ("fp32" if cpu else "bf16"), timing_kwargs=timing_kwargs, ceilings=ceilings,
              out=out, command=command, progress=False)
    return out


def _node_body(task: TaskFn, model: str, device: str, target: str) -> dict[str, Any]:
    """Runs on the node: the task writes a RunResult into a scratch folder; its JSON travels back to the driver."""
    with tempfile.TemporaryDirectory(prefix=f"tokprof-fleet-{target}-") as tmp:
        path = Path(task(model=model, out_dir=tmp, device=device))
        data = json.loads(path.read_text())
    run_from_dict(data, f"{target}: {path.name}")  # fail on the node, naming the field, if the task wrote junk
    return {"target": target, "host": socket.gethostname(), "run": data}


# ------------------------------------------------------------------------------------------------------ driver


@dataclass
class FleetResult:
    runs: dict[str, Path] = field(default_factory=dict)  # target -> RunResult file written by the driver
    hosts: dict[str, str] = field(default_factory=dict)  # target -> node host name
    failures: dict[str, str] = field(default_factory=dict)  # target -> why it has no run
    recorded: list[str] = field(default_factory=list)  # targets recorded in the history database
    report: Path | None = None  # report.md of all runs
    compare: Path | None = None  # compare verdicts of each run against the first
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"runs": {k: str(v) for k, v in self.runs.items()}, "hosts": dict(self.hosts),
                "failures": dict(self.failures), "recorded": list(self.recorded),
                "report": str(self.report) if self.report else None,
                "compare": str(self.compare) if self.compare else None, "notes": list(self.notes)}


def missing_resources(target: FleetTarget, cluster: Mapping[str, float]) -> list[str]:
    """What `target` needs that no node of the cluster (ray.cluster_resources()) has at all."""
    return [f"{name} {amount:g} (cluster has {cluster.get(name, 0):g})" for name, amount in target.needs().items()
            if cluster.get(name, 0) < amount]


def _check_targets(targets: Sequence[FleetTarget]) -> list[FleetTarget]:
    if not targets:
        raise ValueError("targets: expected at least one GPU type (e.g. --gpus h100,h200), got none")
    names = [t.name for t in targets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"targets: each GPU type once, got {dupes} more than once")
    return list(targets)


def _record(result: FleetResult, db: str | Path | None) -> None:
    try:
        from tokprof.reports.history import record_run
    except ImportError:
        result.notes.append("history: tokprof.reports.history is not available here; the RunResult files are "
                            "written, record them later with `tokprof history --record FILE`")
        return
    from tokprof.profiler.schema import load_run

    for name, path in result.runs.items():
        record_run(load_run(path), path, db)
        result.recorded.append(name)


def _compare(result: FleetResult, out: Path) -> None:
    from tokprof.reports.compare import CompareInputError, compare_files

    names = list(result.runs)
    if len(names) < 2:
        result.notes.append("compare: fewer than two runs came back, nothing to compare")
        return
    base = names[0]
    parts = [f"# tokprof fleet: each GPU against {base}\n"]
    for name in names[1:]:
        parts.append(f"## {name} against {base}\n")
        try:
            parts.append(compare_files(result.runs[base], result.runs[name]).to_markdown())
        except CompareInputError as err:
            parts.append(f"not compared: {err}\n")
    result.compare = out / "compare.md"
    result.compare.write_text("\n".join(parts))


def _report(result: FleetResult, out: Path) -> None:
    from tokprof.reports.render import render_report

    if not result.runs:
        return
    report = render_report(list(result.runs.values()), out / "report")
    result.report = report.markdown
    result.notes.extend(f"report omitted: {line}" for line in report.omitted)


def run_fleet(targets: Sequence[FleetTarget], model: str, out_dir: str | Path, *, address: str | None = None,
              task: TaskFn = runner_task, db: str | Path | None = None, record: bool = True, report: bool = True,
              timeout_s: float | None = None, init_kwargs: dict[str, Any] | None = None) -> FleetResult:
    """Run `task` once per target on the Ray cluster at `address` and gather the RunResults (module docstring).

    Uses the Ray connection already open in this process if there is one (and leaves it open); otherwise connects
    to `address` (None: RAY_ADDRESS, else a new local Ray) with `init_kwargs`, and disconnects at the end.
    `timeout_s` bounds the wait for all tasks (None: no bound).
    """
    ray = require_ray()
    targets = _check_targets(targets)
    if not isinstance(model, str) or not model:
        raise ValueError(f"model: expected a preset name such as llama-3.1-8b, got {model!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, **{"include_dashboard": False, "log_to_driver": False, **(init_kwargs or {})})
    result = FleetResult()
    try:
        cluster = ray.cluster_resources()
        remote = ray.remote(_node_body)
        pending: dict[Any, FleetTarget] = {}
        for t in targets:
            missing = missing_resources(t, cluster)
            if missing:
                result.failures[t.name] = ("no node of the Ray cluster offers " + ", ".join(missing)
                                           + "; start one (or name the GPU types the cluster has)")
                continue
            pending[remote.options(**t.ray_options()).remote(task, model, t.device, t.name)] = t
        refs = list(pending)
        ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        for ref in not_ready:
            t = pending[ref]
            ray.cancel(ref, force=True)
            result.failures[t.name] = f"no result within {timeout_s:g} s (cancelled)"
        for ref in refs:
            if ref not in ready:
                continue
            t = pending[ref]
            try:
                reply = ray.get(ref)
            except (ray.exceptions.RayError, ValueError, RuntimeError) as err:  # the task raised on its node
                cause = getattr(err, "cause", None)  # RayTaskError wraps the node's exception (and its traceback)
                failed = cause if isinstance(cause, BaseException) else err
                result.failures[t.name] = f"{type(failed).__name__} on the node: {failed}"
                continue
            path = out / f"{t.name}.json"
            run_from_dict(reply["run"], f"{t.name} from {reply['host']}")
            save_json_atomic(reply["run"], path)
            result.runs[t.name] = path
            result.hosts[t.name] = reply["host"]
    finally:
        if started:
            ray.shutdown()
    if record:
        _record(result, db)
    _compare(result, out)
    if report:
        _report(result, out)
    return result


def cpu_targets(names: Sequence[str]) -> list[FleetTarget]:
    """CPU stand-ins for GPU types: target NAME runs on a node holding the custom resource tokprof_node_<NAME>."""
    return [FleetTarget(name=n, device="cpu", num_gpus=0.0, resources={f"tokprof_node_{n}": 1.0}) for n in names]


def task_by_name(name: str, **kwargs: Any) -> TaskFn:
    """The task of `tokprof fleet --task`: "run" (tokprof run on each node) or "bottom-up" (kernel roll-up only)."""
    if name == "run":
        return runner_task
    if name == "bottom-up":
        return functools.partial(bottom_up_task, **kwargs)
    raise ValueError(f"task: expected 'run' or 'bottom-up', got {name!r}")
