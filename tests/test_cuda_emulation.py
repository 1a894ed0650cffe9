"""The CUDA decode-attention kernel's own source, compiled for the host and run on the CPU against float64.

No GPU is needed: tests/cuda_emulation/shim.h maps the CUDA built-ins the kernel uses onto std::thread (128 per
block), barriers (__syncthreads; per-warp exchanges for __shfl_xor_sync and __any_sync) and plain C++, and
harness.cpp runs decode_attn<T, D, GP, BS> and decode_attn_reduce over scattered pages for fp32, fp16 and bf16,
group tiles 1-8 (a padded G=3, a 2-chunk G=16), pages of 16 and 32 tokens, one pass and 64/128-token splits.
This checks the kernel's index algebra (the slot permutation of the reduce-scatter, the page/row arithmetic, the
lazy running max, the tail masking and the merge), not what only a GPU shows (timing, the hardware's ex2 and
memory model), which the `gpu` tests in test_decode_attention.py cover.

Skipped, with the reason, without g++ (C++20) or the CUDA headers (cuda_bf16.h).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tokprof.kernels import _nvcc

HERE = Path(__file__).parent / "cuda_emulation"


def _cuda_include() -> Path | None:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = _nvcc.find_nvcc()
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    for root in roots:
        if root and (Path(root) / "include" / "cuda_bf16.h").is_file():
            return Path(root) / "include"
    return None


GXX = shutil.which("g++")
INCLUDE = _cuda_include()


@pytest.mark.skipif(GXX is None or INCLUDE is None, reason="needs g++ and the CUDA headers (cuda_bf16.h)")
def test_decode_attention_kernel_code_matches_float64_on_the_cpu(tmp_path):
    exe = tmp_path / "harness"
    build = subprocess.run([GXX, "-std=c++20", "-O1", "-pthread", f"-I{INCLUDE}", f"-I{_nvcc.CUDA_DIR}", "-x", "c++",
                            str(HERE / "harness.cpp"), "-o", str(exe)], capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=False, timeout=600)
    print(run.stdout)
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 7 and all("max abs err" in line for line in lines), run.stdout + run.stderr
    assert run.returncode == 0, f"a case is over its tolerance:\n{run.stdout}{run.stderr}"
