"""Ahead-of-time build of the CUDA sources with nvcc, shared by setup.py and the tests.

`compile_cubin` builds one `.cu` for one architecture and returns ptxas' per-kernel report (registers, spills), so
the tests can fail on spills in hot kernels; where cuobjdump is found it adds the SASS instruction budget of each
kernel (total instructions, and for a kernel with a loop the instructions of its main loop and of the loop's
shortest path, see `analyse_sass`). `python -m tokprof.kernels._nvcc [sm_90]` prints that table and the
decode-attention issue budget. This module imports nothing from tokprof: setup.py loads it by path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections import deque
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
    sass: SassReport | None = None  # None where cuobjdump was not found


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


@functools.cache
def _splits_compile(nvcc: str) -> bool:
    """Whether this nvcc takes --split-compile (CUDA 12 and later list it in --help)."""
    try:
        proc = subprocess.run([nvcc, "--help"], capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--split-compile" in proc.stdout


def compile_cubin(source: Path, arch: str, out: Path, nvcc: str = "nvcc") -> list[KernelReport]:
    """nvcc -cubin for one architecture; raises RuntimeError with nvcc's output when it fails. Each report carries
    the kernel's SASS budget when cuobjdump is found (`find_cuobjdump`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, f"-arch={arch}", "-cubin", "-O3", "--std=c++17", "-Xptxas", "-v", f"-I{CUDA_DIR}",
           "-o", str(out), str(source)]
    if _splits_compile(nvcc):  # the kernels of one file optimised on all cores (same SASS, a shorter install)
        cmd.insert(1, "--split-compile=0")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {source.name} ({arch}), exit {proc.returncode}:\n"
                           f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    reports = parse_ptxas(proc.stdout + proc.stderr)
    cuobjdump = find_cuobjdump(nvcc)
    if cuobjdump is not None:
        sass = {r.kernel: r for r in analyse_cubin(out, arch, cuobjdump)}
        for r in reports:
            r.sass = sass.get(r.kernel)
    return reports


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


# ----------------------------------------------------------------------------------------------------- SASS budget

_FUNCTION = re.compile(r"^\s*Function : (\S+)")
# "        /*0c10*/              @!P1 BRA 0xd30 ;   /* 0x... */": address, predicate, opcode, operands
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")


@dataclass(frozen=True)
class SassInstr:
    address: int
    predicate: str | None  # "@P0", "@!P1", ... or None
    opcode: str  # with modifiers: "LDG.E.128", "BRA", "SHFL.BFLY"
    operands: str

    @property
    def branch_target(self) -> int | None:
        if not self.opcode.startswith("BRA"):
            return None
        m = _TARGET.search(self.operands)
        return int(m.group(1), 16) if m else None

    @property
    def falls_through(self) -> bool:
        """False for an unconditional branch, EXIT and RET (nothing after them runs next)."""
        unconditional = self.predicate is None or self.predicate == "@PT"
        if self.opcode.split(".")[0] in ("EXIT", "RET"):
            return not unconditional
        return not (self.opcode == "BRA" and unconditional)


@dataclass
class SassReport:
    """The SASS instruction budget of one kernel of one cubin.

    instructions: every instruction but the NOP padding. For a kernel with a backward branch, its main loop is the
    one spanning the most instructions: loop_instructions counts all of them (cold paths included), and
    loop_path_instructions those of the shortest path from the loop's head to its back-branch, i.e. one iteration
    that takes every cheap branch (for decode attention: full steps whose running max holds, the common case).
    loop_path_load_bytes: bytes that path loads per thread with 16-byte loads (LDG.E.128).
    """

    kernel: str
    arch: str
    instructions: int
    loop_instructions: int | None = None
    loop_path_instructions: int | None = None
    loop_path_load_bytes: int | None = None


def find_cuobjdump(nvcc: str | None = None) -> str | None:
    """cuobjdump on PATH, else next to nvcc or in CUDA_HOME/CUDA_PATH, else the copy Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    dirs = [Path(p) / "bin" for p in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if p]
    if nvcc and shutil.which(nvcc):
        dirs.append(Path(shutil.which(nvcc)).resolve().parent)
    dirs.append(Path("/usr/local/cuda/bin"))
    spec = importlib.util.find_spec("triton")  # located, not imported
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin")
    for d in dirs:
        if (d / "cuobjdump").is_file():
            return str(d / "cuobjdump")
    return None


def parse_sass(text: str) -> dict[str, list[SassInstr]]:
    """`cuobjdump -sass` output -> instructions per kernel (NOPs dropped)."""
    kernels: dict[str, list[SassInstr]] = {}
    current: list[SassInstr] | None = None
    for line in text.splitlines():
        if m := _FUNCTION.match(line):
            current = kernels.setdefault(m.group(1), [])
        elif current is not None and (m := _INSTR.match(line)):
            pred = m.group(2).strip() if m.group(2) else None
            if m.group(3) != "NOP":
                current.append(SassInstr(int(m.group(1), 16), pred, m.group(3), m.group(4).strip()))
    return kernels


def _loop_budget(instrs: list[SassInstr]) -> tuple[int, int, int] | None:
    """(instructions in the main loop, on its shortest head-to-back-branch path, 16-byte load bytes on that path)."""
    index = {ins.address: i for i, ins in enumerate(instrs)}
    back = [(index[t], i) for i, ins in enumerate(instrs)
            if (t := ins.branch_target) is not None and t < ins.address and t in index]  # not the final BRA-to-self
    if not back:
        return None
    head, tail = max(back, key=lambda hb: hb[1] - hb[0])
    # Breadth-first over instructions (each costs 1): edges to the next instruction and to branch targets inside
    # [head, tail]; a branch out of the loop (an exit) ends that path.
    dist = {head: 1}
    prev: dict[int, int] = {}
    todo = deque([head])
    while todo:
        i = todo.popleft()
        if i == tail:
            break
        ins = instrs[i]
        succ = []
        if ins.falls_through and i + 1 <= tail:
            succ.append(i + 1)
        t = ins.branch_target
        if t is not None and t in index and head <= index[t] <= tail:
            succ.append(index[t])
        for j in succ:
            if j not in dist:
                dist[j] = dist[i] + 1
                prev[j] = i
                todo.append(j)
    if tail not in dist:
        return None
    path, i = [tail], tail
    while i != head:
        i = prev[i]
        path.append(i)
    load_bytes = 16 * sum(instrs[i].opcode.startswith("LDG") and "128" in instrs[i].opcode.split(".") for i in path)
    return tail - head + 1, dist[tail], load_bytes


def analyse_sass(text: str, arch: str) -> list[SassReport]:
    reports = []
    for kernel, instrs in parse_sass(text).items():
        report = SassReport(kernel, arch, len(instrs))
        loop = _loop_budget(instrs)
        if loop is not None:
            report.loop_instructions, report.loop_path_instructions, report.loop_path_load_bytes = loop
        reports.append(report)
    return reports


def analyse_cubin(cubin: Path, arch: str, cuobjdump: str) -> list[SassReport]:
    proc = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {cubin.name} failed, exit {proc.returncode}: {proc.stderr[-800:]}")
    return analyse_sass(proc.stdout, arch)


# What an SM can issue while HBM streams at its peak: 4 schedulers x 1 warp-instruction per clock x the SM clock,
# over the bytes each SM must consume per second (bandwidth / SMs). Max SM clock 1980 MHz on both (nvidia-smi -q,
# "Max Clocks: SM"); SMs and bandwidth from NVIDIA's H100 and H200 datasheets (SXM).
@dataclass(frozen=True)
class IssueRate:
    name: str
    sms: int
    sm_clock_hz: float
    hbm_bytes_per_s: float
    schedulers_per_sm: int = 4

    def warp_instructions_per_byte(self) -> float:
        """Warp-instructions an SM can issue per byte of HBM traffic it consumes at peak bandwidth."""
        return self.schedulers_per_sm * self.sm_clock_hz / (self.hbm_bytes_per_s / self.sms)


H100_SXM = IssueRate("H100 SXM", 132, 1.98e9, 3.35e12)
H200_SXM = IssueRate("H200 SXM", 132, 1.98e9, 4.8e12)


@dataclass(frozen=True)
class DecodeBudget:
    """Warp-instructions the decode loop spends per KV row against what the SM can issue at peak bandwidth."""

    kernel: str
    row_bytes: int  # K + V of one token of one KV head: 2 x D x element bytes
    rows_per_iteration: float  # rows one warp streams per loop iteration (from the path's 16-byte loads)
    instructions_per_row: float
    peak_issue_per_row: float  # what `rate` allows per row at 100% of HBM bandwidth
    rate: str

    @property
    def bandwidth_bound(self) -> float:
        """The fraction of peak bandwidth the issue rate allows (capped at 1: then memory, not issue, binds)."""
        return min(1.0, self.peak_issue_per_row / self.instructions_per_row)


def decode_budget(report: SassReport, head_dim: int, elem_bytes: int, rate: IssueRate = H200_SXM) -> DecodeBudget:
    """Per KV row: loop-path instructions x row bytes / bytes the path loads per warp (32 lanes x its LDG.128s)."""
    if not report.loop_path_instructions or not report.loop_path_load_bytes:
        raise ValueError(f"{report.kernel}: expected a loop with 16-byte loads in its SASS, found none")
    row_bytes = 2 * head_dim * elem_bytes
    rows = 32 * report.loop_path_load_bytes / row_bytes
    return DecodeBudget(report.kernel, row_bytes, rows, report.loop_path_instructions / rows,
                        rate.warp_instructions_per_byte() * row_bytes, rate.name)


_DECODE_NAME = re.compile(r"decode_attn_d(\d+)_g\d+_b\d+_(f32|f16|bf16)$")
_ELEM_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


def decode_kernel_shape(kernel: str) -> tuple[int, int] | None:
    """'decode_attn_d128_g4_b16_bf16' -> (head_dim 128, element bytes 2); None for other kernels."""
    m = _DECODE_NAME.match(kernel)
    return (int(m.group(1)), _ELEM_BYTES[m.group(2)]) if m else None


def format_reports(reports: list[KernelReport], rate: IssueRate = H200_SXM) -> str:
    """One line per kernel: registers, spills, SASS instructions, loop budget; decode attention: per-row budget."""
    lines = [f"{'kernel':<34} {'arch':<6} {'regs':>4} {'spill B':>7} {'SASS':>6} {'loop':>6} {'path':>5} "
             f"{'instr/row':>9} {'peak/row':>8} {'bw bound':>8}"]
    for r in reports:
        sass = r.sass
        cells = [f"{r.kernel:<34} {r.arch:<6} {r.registers:>4} {r.spill_store_bytes + r.spill_load_bytes:>7}"]
        if sass is None:
            lines.append(cells[0] + "  (no cuobjdump: SASS not read)")
            continue
        loop, path = sass.loop_instructions or "-", sass.loop_path_instructions or "-"
        cells.append(f"{sass.instructions:>6} {loop:>6} {path:>5}")
        shape = decode_kernel_shape(r.kernel)
        if shape and sass.loop_path_load_bytes:
            b = decode_budget(sass, *shape, rate)
            cells.append(f"{b.instructions_per_row:>9.1f} {b.peak_issue_per_row:>8.1f} {b.bandwidth_bound:>8.0%}")
        lines.append(" ".join(cells))
    lines.append(f"instr/row: warp-instructions of the loop's shortest path per K+V row (2 x D x element bytes); "
                 f"peak/row: what an SM issues per row at {rate.name} peak bandwidth = {rate.schedulers_per_sm} "
                 f"schedulers x {rate.sm_clock_hz / 1e9:.2f} GHz x row bytes / ({rate.hbm_bytes_per_s / 1e12:.2f} "
                 f"TB/s / {rate.sms} SMs); bw bound = min(1, peak/row / instr/row).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """python -m tokprof.kernels._nvcc [sm_90 ...]: build every .cu into a temporary folder, print the budgets."""
    import tempfile

    args = sys.argv[1:] if argv is None else argv
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found on PATH", file=sys.stderr)
        return 2
    try:
        archs = tuple(args) if args else archs_from_env()
        for a in archs:
            if not re.fullmatch(r"sm_\d+a?", a):
                raise ValueError(f"arch: expected names like sm_90, got {a!r}")
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        print(format_reports(build_all(Path(tmp), archs, nvcc)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
