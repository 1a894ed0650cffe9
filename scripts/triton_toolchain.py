"""GPU profiles and the Triton toolchain (compile API, ptxas, cuobjdump) for scripts/triton_compile_check.py."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

REGISTERS_PER_SM = 65536  # per SM and per block on sm_80 and sm_90 (CUDA programming guide, compute capabilities)


class UsageError(Exception):
    """Bad arguments or environment (exit 2)."""


class CompileApiMissing(Exception):
    """The installed Triton lacks an API this check needs (exit 3)."""


# ----------------------------------------------------------------------------------------------- target GPUs


@dataclass(frozen=True)
class GpuProfile:
    """What torch.cuda reports for the target GPU while the wrappers choose their configs, and its limits
    (CUDA C++ programming guide, compute capabilities table; H100 SXM and A100 SXM datasheets)."""

    arch: int
    name: str
    sm_count: int
    smem_per_sm_bytes: int
    smem_per_block_bytes: int  # opt-in maximum of dynamic shared memory per block (what Triton checks at launch)

    def device_properties(self) -> SimpleNamespace:
        """A stand-in for torch.cuda.get_device_properties(...) of this GPU."""
        return SimpleNamespace(name=self.name, major=self.arch // 10, minor=self.arch % 10,
                               multi_processor_count=self.sm_count, total_memory=80 * 1024**3,
                               shared_memory_per_multiprocessor=self.smem_per_sm_bytes,
                               shared_memory_per_block_optin=self.smem_per_block_bytes,
                               regs_per_multiprocessor=REGISTERS_PER_SM, warp_size=32)


GPU_PROFILES: dict[int, GpuProfile] = {
    90: GpuProfile(90, "NVIDIA H100 80GB HBM3", 132, smem_per_sm_bytes=228 * 1024, smem_per_block_bytes=227 * 1024),
    80: GpuProfile(80, "NVIDIA A100-SXM4-80GB", 108, smem_per_sm_bytes=164 * 1024, smem_per_block_bytes=163 * 1024),
}


# -------------------------------------------------------------------------------------------------- toolchain


def interpreter_requested() -> bool:
    """TRITON_INTERPRET set to a non-zero value (the rule tokprof.kernels._common.triton_interpreted applies)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class Toolchain:
    """The pieces of Triton this check uses, looked up once so a missing one is named before any work."""

    version: str
    compile: Any
    ast_source: Any
    gpu_target: Any
    make_backend: Any
    create_binder: Any
    jit_function: type
    nvidia_compiler: ModuleType


def load_toolchain() -> Toolchain:
    """Import Triton's ahead-of-time compile API; CompileApiMissing names what this Triton lacks."""
    try:
        triton = importlib.import_module("triton")
    except ImportError as err:
        raise CompileApiMissing(f"triton is not installed ({err}); this check was written against triton 3.6 "
                                "and 3.9") from err
    where = {
        "compile": ("triton", "compile"),
        "ast_source": ("triton.compiler", "ASTSource"),
        "gpu_target": ("triton.backends.compiler", "GPUTarget"),
        "make_backend": ("triton.compiler", "make_backend"),
        "create_binder": ("triton.runtime.jit", "create_function_from_signature"),
        "jit_function": ("triton.runtime.jit", "JITFunction"),
    }
    found: dict[str, Any] = {}
    for key, (module_name, attr) in where.items():
        try:
            found[key] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise CompileApiMissing(f"triton {triton.__version__} has no {module_name}.{attr} ({err}); this check "
                                    "was written against triton 3.6 and 3.9") from err
    try:
        nvidia = importlib.import_module("triton.backends.nvidia.compiler")
    except ImportError as err:
        raise CompileApiMissing(f"triton {triton.__version__} has no NVIDIA backend "
                                f"(triton.backends.nvidia.compiler: {err})") from err
    # The call shapes used below, as in triton 3.6 and 3.9: a changed one is named here, not met as a TypeError later.
    expected = {"ast_source": ["fn", "signature", "constexprs", "attrs"],
                "create_binder": ["sig", "kparams", "backend"]}
    for key, params in expected.items():
        got = list(inspect.signature(found[key]).parameters)
        if got[: len(params)] != params:
            module_name, attr = where[key]
            raise CompileApiMissing(f"triton {triton.__version__}: {module_name}.{attr} takes ({', '.join(got)}), "
                                    f"this check calls it with ({', '.join(params)})")
    base_backend = importlib.import_module("triton.backends.compiler").BaseBackend
    if not hasattr(base_backend, "parse_attr"):
        raise CompileApiMissing(f"triton {triton.__version__} has no BaseBackend.parse_attr (the launcher's "
                                "specialisation-to-attribute step), which triton 3.6 and 3.9 have")
    return Toolchain(version=triton.__version__, nvidia_compiler=nvidia, **found)


def ptxas_command(tools: Toolchain, arch: int) -> list[str]:
    """ptxas -v as Triton's NVIDIA backend runs it for `arch` (same binary, same register-allocation flag)."""
    nv = tools.nvidia_compiler
    if not hasattr(nv, "get_ptxas"):
        raise CompileApiMissing(f"triton {tools.version} has no triton.backends.nvidia.compiler.get_ptxas")
    try:
        tool = nv.get_ptxas(arch)  # recent releases: ptxas per arch (3.9 takes a newer one from sm_90 on)
    except TypeError:
        tool = nv.get_ptxas()  # older: one ptxas for every arch
    path = tool[0] if isinstance(tool, tuple) else getattr(tool, "path", tool)  # (path, version) in some releases
    if not isinstance(path, str) or not Path(path).is_file():
        raise CompileApiMissing(f"triton {tools.version}: cannot locate ptxas (get_ptxas gave {tool!r})")
    gpu_name = nv.sm_arch_from_capability(arch) if hasattr(nv, "sm_arch_from_capability") else f"sm_{arch}"
    cmd = [path, "-v", f"--gpu-name={gpu_name}"]
    # Triton 3.9 passes --regAllocOptLevel=2 (a ptxas 13 workaround); register counts only match with it too.
    if "regAllocOptLevel=2" in inspect.getsource(nv.CUDABackend.make_cubin):
        cmd.append("--regAllocOptLevel=2")
    return cmd


# ------------------------------------------------------------------------------------ reading what was built


def ptxas_resources(ptx: str, ptxas: list[str]) -> dict[str, int]:
    """Registers, stack and spill bytes from ptxas -v on `ptx`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        run = subprocess.run([*ptxas, str(src), "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True,
                             text=True, check=False)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"ptxas -v failed on the PTX Triton produced (exit {run.returncode}): {log[-800:]}")
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    if frame is None or regs is None:
        raise RuntimeError(f"could not read registers and spills from ptxas -v output: {log[-800:]}")
    return {"regs": int(regs.group(1)), "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)),
            "spill_loads": int(frame.group(3))}


def cubin_registers(cubin: bytes, cuobjdump: Path) -> int | None:
    """REG of the kernel in the cubin Triton built (cuobjdump --dump-resource-usage); None without cuobjdump."""
    if not cuobjdump.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        run = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                             check=False)
    found = re.search(r"REG:(\d+)", run.stdout)
    return int(found.group(1)) if run.returncode == 0 and found else None


def cubin_sass(cubin: bytes, cuobjdump: Path) -> Any:
    """The SASS budget of the kernel in Triton's cubin (tokprof.kernels._nvcc.analyse_sass), None without
    cuobjdump or when it fails."""
    from tokprof.kernels import _nvcc

    if not cuobjdump.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        try:
            reports = _nvcc.analyse_cubin(path, "", str(cuobjdump))
        except RuntimeError:
            return None
    return reports[0] if len(reports) == 1 else None
