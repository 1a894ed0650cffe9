"""The CUDA extension step: ahead-of-time cubins for tokprof/kernels/cuda/*.cu when nvcc is found.

Everything else about the package lives in pyproject.toml. Cubins go to tokprof/kernels/cuda/build/ (package data,
and found in place by an editable install). Architectures: TOKPROF_CUDA_ARCHS (default sm_80,sm_90).
Without nvcc this prints one line and the runtime compiles through NVRTC (CuPy) on first use, cached on disk.
TOKPROF_SKIP_CUDA_BUILD=1 skips the step.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _nvcc_module():
    spec = importlib.util.spec_from_file_location("_tokprof_nvcc", ROOT / "tokprof" / "kernels" / "_nvcc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


_built = False  # one build per process: an editable install reaches both hooks below


def build_cubins() -> None:
    global _built
    if _built:
        return
    _built = True
    if os.environ.get("TOKPROF_SKIP_CUDA_BUILD"):
        print("tokprof: TOKPROF_SKIP_CUDA_BUILD is set; CUDA kernels will compile through NVRTC on first use")
        return
    nvcc_mod = _nvcc_module()
    nvcc = nvcc_mod.find_nvcc()
    if nvcc is None:
        print("tokprof: nvcc not found; CUDA kernels will compile through NVRTC (CuPy) on first use, cached on disk")
        return
    archs = nvcc_mod.archs_from_env()
    reports = nvcc_mod.build_all(ROOT / "tokprof" / "kernels" / "cuda" / "build", archs, nvcc)
    spilled = [r for r in reports if r.spill_store_bytes or r.spill_load_bytes]
    print(f"tokprof: built {len(reports)} CUDA kernels for {', '.join(archs)} with {nvcc}"
          + (f"; spills in {[r.kernel for r in spilled]}" if spilled else "; no spills"))


class BuildPyWithCubins(build_py):
    def run(self) -> None:
        build_cubins()
        super().run()


# Older setuptools' editable installs (pip install -e .) do not run build_py, so build here too; newer ones run
# build_py as well (editable_mode), which the `_built` flag turns into a no-op instead of a second nvcc pass.
if any(arg in sys.argv for arg in ("editable_wheel", "develop")):
    build_cubins()

setup(cmdclass={"build_py": BuildPyWithCubins})
