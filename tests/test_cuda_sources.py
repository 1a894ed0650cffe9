"""Every tokprof/kernels/cuda/*.cu compiles with nvcc for sm_80 and sm_90, without register spills.

Skipped, with the reason, where nvcc is absent. Nothing built here runs: that is the `gpu` tests' job.
"""

from __future__ import annotations

import pytest

from tokprof.kernels import _nvcc

NVCC = _nvcc.find_nvcc()
SOURCES = sorted(_nvcc.CUDA_DIR.glob("*.cu"))

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: CUDA sources cannot be compiled here")


def test_there_are_cuda_sources():
    stems = {s.stem for s in SOURCES}
    assert {"swiglu"} <= stems, f"expected CUDA sources, found {sorted(stems)}"


@pytest.mark.parametrize("arch", _nvcc.DEFAULT_ARCHS)
def test_every_source_builds_without_spills(arch, tmp_path):
    reports = _nvcc.build_all(tmp_path, (arch,), NVCC)  # as setup.py builds them: in parallel, one cubin a source
    assert sorted(p.name for p in tmp_path.glob("*.cubin")) == sorted(f"{s.stem}.{arch}.cubin" for s in SOURCES)
    assert len(reports) >= len(SOURCES) and all(r.arch == arch for r in reports)
    spilled = [r for r in reports if r.spill_store_bytes or r.spill_load_bytes]
    assert not spilled, "register spills: " + "; ".join(
        f"{r.kernel}: {r.registers} regs, {r.spill_store_bytes} B stored, {r.spill_load_bytes} B loaded"
        for r in spilled)
    print("\n".join(f"{r.kernel} {arch}: {r.registers} registers" for r in reports))


def test_parse_ptxas_reads_registers_and_spills():
    log = """ptxas info    : Compiling entry function 'k_bf16' for 'sm_90'
ptxas info    : Function properties for k_bf16
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers"""
    [r] = _nvcc.parse_ptxas(log)
    assert (r.kernel, r.arch, r.registers, r.spill_store_bytes, r.spill_load_bytes) == ("k_bf16", "sm_90", 255, 4, 12)


def test_archs_from_env(monkeypatch):
    monkeypatch.setenv("TOKPROF_CUDA_ARCHS", "sm_90, sm_100a")
    assert _nvcc.archs_from_env() == ("sm_90", "sm_100a")
    monkeypatch.setenv("TOKPROF_CUDA_ARCHS", "hopper")
    with pytest.raises(ValueError, match="TOKPROF_CUDA_ARCHS"):
        _nvcc.archs_from_env()
