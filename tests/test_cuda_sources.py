"""Every tokprof/kernels/cuda/*.cu compiles with nvcc for sm_80 and sm_90, without register spills, and the decode
attention loop stays within the instruction budget that lets it stream at >= 90% of an H200's HBM bandwidth.

Skipped, with the reason, where nvcc (or, for the SASS budget, cuobjdump) is absent. Nothing built here runs: that
is the `gpu` tests' job.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tokprof.kernels import _nvcc

NVCC = _nvcc.find_nvcc()
CUOBJDUMP = _nvcc.find_cuobjdump(NVCC)
SOURCES = sorted(_nvcc.CUDA_DIR.glob("*.cu"))
MIN_BANDWIDTH_FRACTION = 0.90  # of peak HBM bandwidth the decode loop's instruction issue must allow on an H200

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: CUDA sources cannot be compiled here")


def test_there_are_cuda_sources():
    stems = {s.stem for s in SOURCES}
    assert {"swiglu"} <= stems, f"expected CUDA sources, found {sorted(stems)}"


@functools.cache
def _build(arch: str, build_dir: Path) -> list[_nvcc.KernelReport]:
    """One build per arch for the whole module (the decode-attention file alone takes minutes on 2 cores)."""
    return _nvcc.build_all(build_dir, (arch,), NVCC)  # as setup.py builds them: in parallel, one cubin a source


@pytest.fixture(scope="module")
def build_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cubins")


@pytest.mark.parametrize("arch", _nvcc.DEFAULT_ARCHS)
def test_every_source_builds_without_spills(arch, build_root):
    tmp_path = build_root / arch
    reports = _build(arch, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.cubin")) == sorted(f"{s.stem}.{arch}.cubin" for s in SOURCES)
    assert len(reports) >= len(SOURCES) and all(r.arch == arch for r in reports)
    spilled = [r for r in reports if r.spill_store_bytes or r.spill_load_bytes]
    assert not spilled, "register spills: " + "; ".join(
        f"{r.kernel}: {r.registers} regs, {r.spill_store_bytes} B stored, {r.spill_load_bytes} B loaded"
        for r in spilled)
    print("\n" + _nvcc.format_reports(reports))


@pytest.mark.skipif(CUOBJDUMP is None, reason="no cuobjdump (CUDA toolkit or Triton's copy): SASS cannot be read")
@pytest.mark.parametrize("arch", _nvcc.DEFAULT_ARCHS)
def test_decode_attention_loop_fits_the_issue_budget(arch, build_root):
    # Per 512-byte K+V row (D=128, 16-bit) an H200 SM may spend 4 schedulers x 1.98 GHz x 512 B / (4.8 TB/s / 132)
    # = 111.5 warp-instructions at peak bandwidth; >= 90% of peak allows 111.5 / 0.9 = 124. The loop's shortest
    # path (a full step whose running max holds) is what nearly every step runs.
    reports = [r for r in _build(arch, build_root / arch) if _nvcc.decode_kernel_shape(r.kernel)]
    assert len(reports) == 3 * 2 * 4 * 2, [r.kernel for r in reports]  # dtypes x head dims x group tiles x pages
    assert _nvcc.H200_SXM.warp_instructions_per_byte() * 512 == pytest.approx(111.5, abs=0.1)
    over = []
    for r in reports:
        assert r.sass is not None and r.sass.loop_path_instructions, f"{r.kernel}: no loop found in its SASS"
        budget = _nvcc.decode_budget(r.sass, *_nvcc.decode_kernel_shape(r.kernel))
        # The path streams two full steps: 2 x C tokens per token group (C = 2 at 8 heads, else 4) x the groups of a
        # warp (32 lanes / (D / 16-byte vector)), so it is the common path, not a shortcut past the loads.
        head_dim, elem_bytes = _nvcc.decode_kernel_shape(r.kernel)
        tokens = 2 if "_g8_" in r.kernel else 4
        assert budget.rows_per_iteration == 2 * tokens * 32 // (head_dim * elem_bytes // 16), r.kernel
        if budget.peak_issue_per_row / budget.instructions_per_row < MIN_BANDWIDTH_FRACTION:
            over.append(f"{r.kernel}: {budget.instructions_per_row:.1f} warp-instructions per {budget.row_bytes}-byte "
                        f"row, {budget.peak_issue_per_row:.1f} issue at peak")
    assert not over, "decode loop over its issue budget: " + "; ".join(over)


def test_sass_parsing_and_loop_path():
    # A loop at 0x20..0x60 with a cold block (0x40) skipped by a branch, an exit branch, and a 16-byte load.
    sass = """
        Function : k_bf16
        /*0000*/                   MOV R1, c[0x0][0x28] ;        /* 0x00000a0000017a02 */
        /*0010*/                   NOP ;                         /* 0x0000000000007918 */
        /*0020*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;   /* 0x0 */
        /*0030*/              @!P0 BRA 0x50 ;                    /* 0x0 */
        /*0040*/                   FADD R5, R5, R6 ;             /* 0x0 */
        /*0050*/               @P1 BRA 0x80 ;                    /* 0x0 */
        /*0060*/               @P2 BRA 0x20 ;                    /* 0x0 */
        /*0070*/                   EXIT ;                        /* 0x0 */
        /*0080*/                   BRA 0x80 ;                    /* 0x0 */
        Function : no_loop_f32
        /*0000*/                   EXIT ;                        /* 0x0 */
        /*0010*/                   BRA 0x10 ;                    /* 0x0 */
"""
    r, flat = _nvcc.analyse_sass(sass, "sm_90")
    assert (r.kernel, r.instructions) == ("k_bf16", 8)  # the NOP is not counted
    # the branch-to-self that ends every kernel is not a loop
    assert (flat.kernel, flat.instructions, flat.loop_instructions) == ("no_loop_f32", 2, None)
    # loop 0x20..0x60: 5 instructions; shortest path LDG, BRA (taken), BRA (not taken), back-branch: 4
    assert (r.loop_instructions, r.loop_path_instructions, r.loop_path_load_bytes) == (5, 4, 16)


def test_decode_budget_arithmetic():
    # 1160 path instructions loading 256 B per thread: 256 x 32 lanes / 512-byte rows = 16 rows -> 72.5 per row.
    report = _nvcc.SassReport("decode_attn_d128_g4_b16_bf16", "sm_90", 5000, 1500, 1160, 256)
    budget = _nvcc.decode_budget(report, *_nvcc.decode_kernel_shape(report.kernel))
    assert (budget.row_bytes, budget.rows_per_iteration, budget.instructions_per_row) == (512, 16, 72.5)
    assert budget.peak_issue_per_row == pytest.approx(4 * 1.98e9 * 512 / (4.8e12 / 132))
    assert budget.bandwidth_bound == 1.0
    slow = _nvcc.SassReport("x", "sm_90", 9000, 3000, 2176, 256)  # 136 per row, the kernel this one replaced
    assert _nvcc.decode_budget(slow, 128, 2).bandwidth_bound == pytest.approx(111.5 / 136, abs=0.002)
    # An H100's 3.35 TB/s leaves more issue per row: 4 x 1.98e9 x 512 / (3.35e12 / 132) = 159.7
    assert _nvcc.H100_SXM.warp_instructions_per_byte() * 512 == pytest.approx(159.7, abs=0.1)
    assert _nvcc.decode_kernel_shape("decode_attn_reduce_bf16") is None
    with pytest.raises(ValueError, match="expected a loop with 16-byte loads"):
        _nvcc.decode_budget(_nvcc.SassReport("k", "sm_90", 10), 128, 2)


def test_parse_ptxas_reads_registers_and_spills():
    log = """ptxas info    : Compiling entry function 'k_bf16' for 'sm_90'
ptxas info    : Function properties for k_bf16
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers"""
    [r] = _nvcc.parse_ptxas(log)
    assert (r.kernel, r.arch, r.registers, r.spill_store_bytes, r.spill_load_bytes) == ("k_bf16", "sm_90", 255, 4, 12)


def test_budget_command_refuses_bad_arch(capsys):
    assert _nvcc.main(["hopper"]) == 2
    assert "expected names like sm_90, got 'hopper'" in capsys.readouterr().err


def test_archs_from_env(monkeypatch):
    monkeypatch.setenv("TOKPROF_CUDA_ARCHS", "sm_90, sm_100a")
    assert _nvcc.archs_from_env() == ("sm_90", "sm_100a")
    monkeypatch.setenv("TOKPROF_CUDA_ARCHS", "hopper")
    with pytest.raises(ValueError, match="TOKPROF_CUDA_ARCHS"):
        _nvcc.archs_from_env()
