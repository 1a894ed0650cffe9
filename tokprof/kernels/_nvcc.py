"""Ahead-of-time build of the CUDA sources with nvcc, shared by setup.py and the tests.

`compile_cubin` builds one `.cu` for one architecture and returns ptxas' per-kernel report (registers, spills), so
the tests can fail on spills in hot kernels. This module imports nothing from tokprof: setup.py loads it by path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CUDA_DIR = Path(__file__).parent / "cuda"
DEFAULT_ARCHS = ("sm_80", "sm_90")

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


@dataclass
class KernelReport:
    """ptxas' figures for one kernel of one cubin."""

    kernel: str
    arch: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int


def find_nvcc() -> str | None:
    return shutil.which("nvcc")


def archs_from_env() -> tuple[str, ...]:
    """TOKPROF_CUDA_ARCHS="sm_80,sm_90" (default) or a user's list, e.g. "sm_90,sm_100"."""
    raw = os.environ.get("TOKPROF_CUDA_ARCHS", "")
    archs = tuple(a.strip() for a in raw.split(",") if a.strip()) or DEFAULT_ARCHS
    for a in archs:
        if not re.fullmatch(r"sm_\d+a?", a):
            raise ValueError(f"TOKPROF_CUDA_ARCHS: expected names like sm_80,sm_90, got {a!r} in {raw!r}")
    return archs


def parse_ptxas(log: str) -> list[KernelReport]:
    """Turn `-Xptxas -v` output into one report per kernel."""
    reports: list[KernelReport] = []
    current: tuple[str, str] | None = None
    spills = (0, 0)
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = (m.group(1), m.group(2))
            spills = (0, 0)
        elif (m := _SPILL.search(line)) and current:
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := _REGS.search(line)) and current:
            reports.append(KernelReport(current[0], current[1], int(m.group(1)), *spills))
            current = None
    return reports


def compile_cubin(source: Path, arch: str, out: Path, nvcc: str = "nvcc") -> list[KernelReport]:
    """nvcc -cubin for one architecture; raises RuntimeError with nvcc's output when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, f"-arch={arch}", "-cubin", "-O3", "--std=c++17", "-Xptxas", "-v", f"-I{CUDA_DIR}",
           "-o", str(out), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {source.name} ({arch}), exit {proc.returncode}:\n"
                           f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return parse_ptxas(proc.stdout + proc.stderr)


def build_all(build_dir: Path, archs: tuple[str, ...] | None = None, nvcc: str = "nvcc",
              jobs: int | None = None) -> list[KernelReport]:
    """Build every cuda/*.cu for every arch into build_dir/<stem>.<arch>.cubin, `jobs` nvcc processes at a time
    (default: one per CPU core, at most one per cubin). Reports come in source, then arch, order."""
    from concurrent.futures import ThreadPoolExecutor

    work = [(source, arch) for source in sorted(CUDA_DIR.glob("*.cu")) for arch in archs or archs_from_env()]
    if not work:
        return []
    workers = max(1, min(len(work), jobs or os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads wait on nvcc processes: no GIL contention
        results = pool.map(lambda job: compile_cubin(job[0], job[1], build_dir / f"{job[0].stem}.{job[1]}.cubin",
                                                     nvcc), work)
        return [report for reports in results for report in reports]
