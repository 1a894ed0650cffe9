#!/usr/bin/env python
"""Compile every Triton kernel of tokprof ahead of time for an H100 (sm_90) or A100 (sm_80), without a GPU.

    python scripts/triton_compile_check.py                # sm_90, all dtypes, the default models
    python scripts/triton_compile_check.py --arch 80      # sm_80 (A100 limits and heuristics)
    python scripts/triton_compile_check.py --models llama-3.1-8b --dtypes bf16 --ops linear,rms_norm

Why: on a CPU every kernel is tested under Triton's interpreter (TRITON_INTERPRET=1), which checks none of what the
real compiler checks (shared-memory limits, register spills, tl.dot shape rules, constexpr typing).

How (no config is hard-coded, so the check follows the code): the calls are those of tokprof's model plans
(tokprof.models.plan: decode at batch 1 and 64, a prefill; causal and not) plus each op's registry default shape.
Each runs the op's public function (triton backend) on fake CUDA tensors (FakeTensorMode: layouts, no memory) while
torch.cuda answers as the target GPU (H100 SXM for sm_90, A100 SXM for sm_80), so every heuristic (block sizes,
warps, stages, split-K, flash-decoding splits) decides as there. The launches are recorded, not run, specialised by
Triton's own launcher binder (pointers 16-byte aligned, as the caching allocator's blocks are; ints divisible by 16
marked so; ints equal to 1 made constants where Triton does that), and each distinct specialisation is compiled by
triton.compile for GPUTarget("cuda", arch, 32). Registers come from the cubin (cuobjdump), spills from ptxas -v on
the same PTX, shared memory from the compiled kernel's metadata.

A kernel fails when it does not compile, needs more shared memory per block than the GPU allows (227 KB on sm_90,
163 KB on sm_80) or more registers than a block gets (regs x threads > 65536), or, on sm_90, spills more than
--max-spill-bytes (sm_80 spills are listed as notes). Prints a table, then one JSON line. Exit codes: 0 every kernel
passes, 1 one fails, 2 bad usage or TRITON_INTERPRET set, 3 this Triton lacks a compile API (the message says which).
Written against triton 3.9 and the 3.6 API of the GPU image; it needs no GPU and never uses one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_KERNEL_FAILED, EXIT_USAGE, EXIT_API_MISSING = 0, 1, 2, 3
DEFAULT_MODELS = ("llama-3.2-1b", "llama-3.1-8b", "qwen3-8b", "llama-3.1-70b")
DEFAULT_DECODE_BATCHES = (1, 64)  # batch 1 takes the split paths (flash-decoding, split-K), 64 the unsplit ones
DEFAULT_CONTEXT = 4096
DEFAULT_PROMPT_LEN = 2048
DEFAULT_MAX_SPILL_BYTES = 64  # spill stores + loads per thread tolerated on sm_90; tokprof's kernels spill none



from triton_toolchain import (  # noqa: E402 - the sibling module of this script
    GPU_PROFILES,
    REGISTERS_PER_SM,
    CompileApiMissing,
    GpuProfile,
    Toolchain,
    UsageError,
    cubin_registers,
    cubin_sass,
    interpreter_requested,
    load_toolchain,
    ptxas_command,
    ptxas_resources,
)

# ------------------------------------------------------------------------------------------------- the calls


@dataclass
class Case:
    """One op call to replay: registry op name, shape, dtype name, and where in a model it comes from."""

    op: str
    shape: dict[str, int]
    dtype: str
    origins: list[str] = field(default_factory=list)

    def key(self) -> tuple[Any, ...]:
        return self.op, tuple(sorted(self.shape.items())), self.dtype


def build_cases(ops: Sequence[str], dtypes: Sequence[str], models: Sequence[str], decode_batches: Sequence[int],
                context: int, prompt_len: int) -> list[Case]:
    """The distinct (op, shape, dtype) calls of the models' decode and prefill plans, plus registry defaults."""
    from tokprof.kernels import OPS
    from tokprof.kernels._common import dtype_name
    from tokprof.models.config import ModelConfig
    from tokprof.models.plan import COLLECTIVE_OPS, decode_plan, prefill_plan

    shaped: list[tuple[str, dict[str, int], str]] = []  # (op, shape, origin); dtype-free
    for model in models:
        cfg = ModelConfig.from_name(model)
        plans = [(f"{model} decode B={b} ctx={context}", decode_plan(cfg, b, context, "bf16")) for b in decode_batches]
        plans.append((f"{model} prefill S={prompt_len}", prefill_plan(cfg, 1, prompt_len, "bf16")))
        for where, plan in plans:
            for call in plan:
                if call.op in COLLECTIVE_OPS:
                    continue
                shaped.append((call.op, dict(call.shape), f"{where}: {call.label}"))
                if call.op == "prefill_attention":  # the kernel's non-causal branch, as the bench can ask for it
                    shaped.append((call.op, {**call.shape, "causal": 0}, f"{where}: attention, causal=0"))
    for name, op in OPS.items():
        shaped.append((name, op.full_shape(), "registry default shape"))
        # Shapes an op lists for this check: variants no dense plan calls (gpt-oss's sinks and windows, MoE routing
        # rules and decode/prefill sizes, the split and one-pass paths of MLA decode).
        for extra in op.extra.get("compile_check_shapes", ()):
            shaped.append((name, op.full_shape(extra), "registry compile-check shape"))

    cases: dict[tuple[Any, ...], Case] = {}
    for op_name, shape, origin in shaped:
        if op_name not in ops:
            continue
        supported = {dtype_name(d) for d in OPS[op_name].dtypes}
        for dtype in dtypes:
            if dtype not in supported:
                continue
            case = Case(op_name, shape, dtype)
            case = cases.setdefault(case.key(), case)
            if origin not in case.origins:
                case.origins.append(origin)
    return list(cases.values())


# ------------------------------------------------------------------------------------- capturing the launches


class DevicePointer:
    """What the launcher sees of a tensor argument: its dtype and a 16-byte aligned address (0)."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype
        self.data_ptr = lambda: 0


@dataclass
class Launch:
    """One kernel launch a wrapper made: the JIT function, its arguments (tensors as DevicePointer) and options."""

    case: Case
    kernel: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel during capture: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, kernel: Any, sink: list[Launch], current: list[Case]) -> None:
        self.kernel, self.sink, self.current = kernel, sink, current

    def __getitem__(self, grid: Any) -> Any:
        import torch

        def pointer(v: Any) -> Any:
            return DevicePointer(v.dtype) if isinstance(v, torch.Tensor) else v

        def record(*args: Any, **kwargs: Any) -> None:
            launch = Launch(self.current[0], self.kernel, tuple(pointer(a) for a in args),
                            {k: pointer(v) for k, v in kwargs.items()})
            self.sink.append(launch)

        return record


@contextmanager
def _patched(target: Any, name: str, value: Any) -> Iterator[None]:
    previous = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, previous)


@contextmanager
def fake_gpu(profile: GpuProfile, tools: Toolchain, sink: list[Launch], current: list[Case]) -> Iterator[Any]:
    """Fake CUDA tensors, torch.cuda answering as `profile`, and every op module's kernels recording launches."""
    from contextlib import ExitStack

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tokprof.kernels import OPS

    props = profile.device_properties()
    with ExitStack() as stack:
        stack.enter_context(_patched(torch.cuda, "get_device_properties", lambda device=None: props))
        stack.enter_context(_patched(torch.cuda, "is_current_stream_capturing", lambda: False))
        stack.enter_context(_patched(torch.cuda, "current_device", lambda: 0))
        patched: set[str] = set()
        for op_name, op in OPS.items():
            # importlib, not `import tokprof.kernels.x`: the package rebinds each op module's name to its function.
            module = importlib.import_module(op.fn.__module__)
            if module.__name__ in patched:  # one module serving several registry ops (one per weight format)
                continue
            patched.add(module.__name__)
            kernels = {n: v for n, v in vars(module).items() if isinstance(v, tools.jit_function)}
            if not kernels:
                raise RuntimeError(f"{module.__name__} ({op_name}) defines no compiled @triton.jit kernel; was "
                                   "TRITON_INTERPRET set when triton was imported?")
            for attr, kernel in kernels.items():
                stack.enter_context(_patched(module, attr, _LaunchRecorder(kernel, sink, current)))
        yield stack.enter_context(FakeTensorMode())


def _fake_cuda(value: Any, device: Any) -> Any:
    """A tensor as an empty fake CUDA tensor of the same layout; a dataclass of tensors (a quantised weight) field
    by field; anything else as it is."""
    import dataclasses

    import torch

    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _fake_cuda(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value)
                                             if isinstance(getattr(value, f.name), torch.Tensor)})
    return value


def capture_launches(cases: Sequence[Case], profile: GpuProfile,
                     tools: Toolchain) -> tuple[list[Launch], list[KernelReport]]:
    """Run each case's public op function (triton backend) on fake tensors of the target GPU.

    Returns the launches, and a failed report for each call whose wrapper raised or launched nothing (a config the
    wrapper cannot build for a shape of tokprof's own plans is a failure of the check, not a crash of it).
    """
    import torch

    from tokprof.kernels import OPS
    from tokprof.kernels._common import DTYPES, skip_value_checks

    sink: list[Launch] = []
    failed: list[KernelReport] = []
    current: list[Case] = [cases[0]] if cases else []
    device = torch.device("cuda", 0)
    with fake_gpu(profile, tools, sink, current), skip_value_checks():
        for case in cases:
            current[0] = case
            op = OPS[case.op]
            # make_inputs on the fake CPU (its generators are CPU ones), then the same layouts as fake CUDA tensors.
            inputs = op.make_inputs(case.shape, DTYPES[case.dtype], "cpu", 0)
            inputs = {k: _fake_cuda(v, device) for k, v in inputs.items()}
            before = len(sink)
            try:
                op.run(inputs, backend="triton")
                problem = None if len(sink) > before else "the triton backend launched no kernel"
            except Exception as err:  # reported as this call's failure, with the wrapper's message
                problem = f"the wrapper raised {type(err).__name__}: {err}"
            if problem is not None:
                shape = " ".join(f"{k}={v}" for k, v in case.shape.items())
                failed.append(KernelReport(op=case.op, kernel="(wrapper)", dtypes=[case.dtype], config=shape,
                                           num_warps=0, num_stages=0, ok=False, problems=[problem],
                                           origins=list(case.origins)))
    return sink, failed


# --------------------------------------------------------------------------------------------------- compiling


@dataclass
class CompileSpec:
    """One distinct specialisation of a kernel, as the launcher would compile it."""

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], Any]
    options: dict[str, Any]
    ops: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)

    def key(self) -> str:
        return repr((self.kernel.fn.__module__, self.kernel.fn.__qualname__, sorted(self.signature.items()),
                     sorted(self.constexprs.items()), sorted(self.attrs.items()), sorted(self.options.items())))

    def config(self) -> str:
        """The constants (constexpr parameters, ints the launcher made constant), then the int arguments the launcher
        could not mark divisible by 16, which is what tells two otherwise equal specialisations apart."""
        names = [p.name for p in self.kernel.params]
        parts = [f"{names[path[0]]}={value}" for path, value in self.constexprs.items()]
        odd = [names[path[0]] for path, attr in self.attrs.items()
               if self.signature[names[path[0]]].startswith(("i", "u")) and ["tt.divisibility", 16] not in attr]
        if odd:
            parts.append("not-div16:" + ",".join(odd))
        return " ".join(parts)


def specialise(launch: Launch, backend: Any, tools: Toolchain, binders: dict[int, Any]) -> CompileSpec:
    """The launcher's own binder turns the recorded arguments into signature, constants and attributes."""
    kernel = launch.kernel
    binder = binders.get(id(kernel))
    if binder is None:
        binder = binders[id(kernel)] = tools.create_binder(kernel.signature, kernel.params, backend)
    bound_spec = binder(*launch.args, **launch.kwargs)
    if not (isinstance(bound_spec, tuple) and len(bound_spec) == 3):
        raise CompileApiMissing(f"triton {tools.version}: the launcher binder (create_function_from_signature) "
                                "returned something other than (bound_args, specialization, options)")
    bound, spec, _ = bound_spec
    names = [p.name for p in kernel.params]
    values = list(bound.values())
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, (ty, attr)) in enumerate(zip(names, spec, strict=True)):
        if isinstance(ty, tuple):
            raise UsageError(f"{kernel.fn.__qualname__}: tuple argument {name!r} is not supported by this check")
        signature[name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = values[i]
        elif isinstance(attr, str):
            attrs[(i,)] = backend.parse_attr(attr)
    options = {k: v for k, v in launch.kwargs.items() if k not in names}
    return CompileSpec(kernel, signature, constexprs, attrs, options)


@dataclass
class KernelReport:
    """The compiled resources of one specialisation and whether it passes."""

    op: str
    kernel: str
    dtypes: list[str]
    config: str
    num_warps: int
    num_stages: int
    regs: int | None = None
    spill_stores_bytes: int | None = None
    spill_loads_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    sass_instructions: int | None = None  # SASS of Triton's cubin, NOPs left out (None without cuobjdump)
    loop_instructions: int | None = None  # its main loop, and the loop's shortest head-to-back-branch path
    loop_path_instructions: int | None = None
    compile_s: float = 0.0
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)

    @property
    def spill_bytes(self) -> int | None:
        if self.spill_stores_bytes is None or self.spill_loads_bytes is None:
            return None
        return self.spill_stores_bytes + self.spill_loads_bytes


def compile_one(spec: CompileSpec, tools: Toolchain, target: Any, backend: Any, profile: GpuProfile,
                ptxas: list[str], max_spill_bytes: int) -> KernelReport:
    options = backend.parse_options(dict(spec.options))
    report = KernelReport(op="+".join(spec.ops), kernel=spec.kernel.fn.__name__, dtypes=list(spec.dtypes),
                          config=spec.config(), num_warps=options.num_warps, num_stages=options.num_stages,
                          origins=list(spec.origins))
    start = time.perf_counter()
    try:
        src = tools.ast_source(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
        compiled = tools.compile(src, target=target, options=options.__dict__)
    except Exception as err:  # any compiler error is this kernel's result, reported with its message
        report.compile_s = time.perf_counter() - start
        report.ok = False
        lines = [line for line in str(err).splitlines() if line.strip()] or [repr(err)]
        # Triton's CompilationError: "at L:C:", the source, a caret line, then the message.
        where = [lines[0].strip()] if len(lines) > 1 else []
        caret = next((i for i, line in enumerate(lines) if line.strip() == "^"), None)
        if caret:
            where.append(lines[caret - 1].strip())
        report.problems.append(f"does not compile: {type(err).__name__}: {lines[-1].strip()}"
                               + (f" [{' '.join(where)}]" if where else ""))
        return report
    report.compile_s = time.perf_counter() - start
    report.shared_bytes = int(compiled.metadata.shared)
    try:
        res = ptxas_resources(compiled.asm["ptx"], ptxas)
    except RuntimeError as err:  # the kernel built, but its spills cannot be read: not a pass
        report.ok = False
        report.problems.append(str(err))
        return report
    report.regs = res["regs"]
    report.stack_bytes = res["stack"]
    report.spill_stores_bytes, report.spill_loads_bytes = res["spill_stores"], res["spill_loads"]
    cubin_regs = cubin_registers(compiled.asm["cubin"], Path(ptxas[0]).with_name("cuobjdump"))
    sass = cubin_sass(compiled.asm["cubin"], Path(ptxas[0]).with_name("cuobjdump"))
    if sass is not None:
        report.sass_instructions = sass.instructions
        report.loop_instructions, report.loop_path_instructions = sass.loop_instructions, sass.loop_path_instructions
    if cubin_regs is not None and cubin_regs != report.regs:
        report.notes.append(f"Triton's cubin uses {cubin_regs} registers, the ptxas -v rerun {report.regs}")
        report.regs = cubin_regs
    threads = report.num_warps * 32
    if report.shared_bytes > profile.smem_per_block_bytes:
        report.problems.append(f"shared memory {report.shared_bytes} B > {profile.smem_per_block_bytes} B per block "
                               f"on sm_{profile.arch}")
    if report.regs * threads > REGISTERS_PER_SM:
        report.problems.append(f"{report.regs} registers x {threads} threads > {REGISTERS_PER_SM} per block")
    spilled = report.spill_bytes or 0
    if spilled:
        message = f"spills {report.spill_stores_bytes} B stored + {report.spill_loads_bytes} B loaded per thread"
        if profile.arch == 90 and spilled > max_spill_bytes:
            report.problems.append(f"{message} > {max_spill_bytes} B allowed on sm_90")
        else:
            report.notes.append(message)
    report.ok = not report.problems
    return report


# ----------------------------------------------------------------------------------------------------- output


def _table(reports: Sequence[KernelReport]) -> str:
    header = ("op", "kernel", "dtype", "config", "warps/stages", "regs", "spill B", "shared KB", "SASS loop/path", "s",
              "status")
    rows = [header]
    for r in reports:
        status = "ok" if r.ok else "FAIL: " + "; ".join(r.problems)
        if r.notes:
            status += " (" + "; ".join(r.notes) + ")"
        rows.append((r.op, r.kernel, ",".join(r.dtypes), r.config, f"{r.num_warps}/{r.num_stages}",
                     "-" if r.regs is None else str(r.regs), "-" if r.spill_bytes is None else str(r.spill_bytes),
                     "-" if r.shared_bytes is None else f"{r.shared_bytes / 1024:.1f}",
                     "-" if r.sass_instructions is None else
                     f"{r.sass_instructions} {r.loop_instructions or '-'}/{r.loop_path_instructions or '-'}",
                     f"{r.compile_s:.1f}", status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
             for row in rows]
    return "\n".join(lines)


def summary(reports: Sequence[KernelReport], ops: Sequence[str], profile: GpuProfile, tools: Toolchain,
            max_spill_bytes: int, wall_s: float) -> dict[str, Any]:
    per_op: dict[str, dict[str, Any]] = {}
    for op in ops:
        mine = [r for r in reports if op in r.op.split("+")]
        per_op[op] = {
            "kernels": len(mine),
            "failed": sum(not r.ok for r in mine),
            "dtypes": sorted({d for r in mine for d in r.dtypes}),
            "max_regs": max((r.regs for r in mine if r.regs is not None), default=None),
            "max_spill_bytes": max((r.spill_bytes for r in mine if r.spill_bytes is not None), default=None),
            "max_shared_bytes": max((r.shared_bytes for r in mine if r.shared_bytes is not None), default=None),
        }
    return {
        "check": "triton_compile", "arch": profile.arch, "gpu_profile": profile.name, "triton": tools.version,
        "ok": all(r.ok for r in reports) and all(v["kernels"] > 0 for v in per_op.values()),
        "kernels_compiled": sum(r.kernel != "(wrapper)" for r in reports), "failed": sum(not r.ok for r in reports),
        "limits": {"shared_bytes_per_block": profile.smem_per_block_bytes, "registers_per_block": REGISTERS_PER_SM,
                   "max_spill_bytes": max_spill_bytes if profile.arch == 90 else None},
        "wall_s": round(wall_s, 1), "ops": per_op,
        "kernels": [{**asdict(r), "spill_bytes": r.spill_bytes, "compile_s": round(r.compile_s, 2),
                     "origins": _shorten(r.origins)} for r in reports],
    }


def _shorten(items: list[str], keep: int = 6) -> list[str]:
    return items if len(items) <= keep else [*items[:keep], f"(+{len(items) - keep} more)"]


# -------------------------------------------------------------------------------------------------------- main


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, choices=sorted(GPU_PROFILES), default=90, help="90 (H100, default) or 80 (A100)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated dtypes (each op runs those it supports)")
    p.add_argument("--ops", default="", help="comma-separated registry op names; default every op")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated tokprof.models presets")
    p.add_argument("--decode-batches", default=",".join(map(str, DEFAULT_DECODE_BATCHES)), help="decode batch sizes")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="decode KV context tokens")
    p.add_argument("--prompt-len", type=int, default=DEFAULT_PROMPT_LEN, help="prefill prompt tokens")
    p.add_argument("--max-spill-bytes", type=int, default=DEFAULT_MAX_SPILL_BYTES,
                   help="spill stores + loads per thread allowed on sm_90 before a kernel fails")
    p.add_argument("--json-only", action="store_true", help="print only the final JSON line")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokprof.kernels import OPS

    tools = load_toolchain()
    profile = GPU_PROFILES[args.arch]
    ops = _csv(args.ops) or list(OPS)
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise UsageError(f"--ops: expected names from {sorted(OPS)}, got unknown {unknown}")
    dtypes = _csv(args.dtypes)
    bad = sorted(set(dtypes) - {"bf16", "fp16", "fp32"})
    if bad or not dtypes:
        raise UsageError(f"--dtypes: expected some of bf16,fp16,fp32, got {args.dtypes!r}")
    try:
        batches = [int(b) for b in _csv(args.decode_batches)]
    except ValueError as err:
        raise UsageError(f"--decode-batches: expected comma-separated ints, got {args.decode_batches!r}") from err
    try:
        cases = build_cases(ops, dtypes, _csv(args.models), batches, args.context, args.prompt_len)
    except ValueError as err:  # an unknown model name or a bad size, worded by tokprof.models
        raise UsageError(str(err)) from err

    start = time.perf_counter()
    launches, reports = capture_launches(cases, profile, tools)
    target = tools.gpu_target("cuda", profile.arch, 32)
    backend = tools.make_backend(target)
    specs: dict[str, CompileSpec] = {}
    binders: dict[int, Any] = {}
    for launch in launches:
        spec = specialise(launch, backend, tools, binders)
        spec = specs.setdefault(spec.key(), spec)
        for items, value in ((spec.ops, launch.case.op), (spec.dtypes, launch.case.dtype)):
            if value not in items:
                items.append(value)
        spec.origins.extend(o for o in launch.case.origins if o not in spec.origins)
    ptxas = ptxas_command(tools, profile.arch)
    ordered = sorted(specs.values(), key=lambda s: (s.ops[0], s.kernel.fn.__name__, s.dtypes[0], s.config()))
    for i, spec in enumerate(ordered, 1):
        report = compile_one(spec, tools, target, backend, profile, ptxas, args.max_spill_bytes)
        reports.append(report)
        if not args.json_only:
            print(f"[{i}/{len(ordered)}] {report.op} {report.kernel} {','.join(report.dtypes)} {report.config} "
                  f"w{report.num_warps}/s{report.num_stages}: {'ok' if report.ok else 'FAIL'} "
                  f"({report.compile_s:.1f} s)", file=sys.stderr, flush=True)
    # Ops without a call in the chosen dtypes (an op that supports none of them) are reported as not checked.
    checked = [op for op in ops if any(c.op == op for c in cases)]
    result = summary(reports, checked, profile, tools, args.max_spill_bytes, time.perf_counter() - start)
    result["not_checked"] = sorted(set(ops) - set(checked))
    if not args.json_only:
        print(f"Triton {tools.version} -> sm_{profile.arch} (wrappers see a {profile.name}: {profile.sm_count} SMs, "
              f"{profile.smem_per_sm_bytes // 1024} KB shared per SM); {len(cases)} calls, {len(launches)} launches, "
              f"{len(reports)} distinct kernels")
        print(_table(reports))
        for op, info in result["ops"].items():
            if info["kernels"] == 0:
                print(f"FAIL: no kernel of {op} was compiled")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")  # launcher default, same as at runtime
    args = parse_args(argv)
    try:
        if interpreter_requested():  # before anything imports triton: @triton.jit would return interpreted functions
            raise UsageError("TRITON_INTERPRET is set to a non-zero value: @triton.jit then returns interpreted "
                             "functions that cannot be compiled; run with it unset (env -u TRITON_INTERPRET ...)")
        result = run(args)
    except UsageError as err:
        print(f"triton_compile_check: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CompileApiMissing as err:
        print(f"triton_compile_check: compile API unavailable: {err}", file=sys.stderr)
        return EXIT_API_MISSING
    print(json.dumps(result))
    return EXIT_OK if result["ok"] else EXIT_KERNEL_FAILED


if __name__ == "__main__":
    sys.exit(main())
