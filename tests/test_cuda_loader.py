"""tokprof.kernels._cuda without a GPU: cubin choice (exact, same major, stale), NVRTC source, launch checks."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tokprof.kernels import _cuda


def test_find_cubin_takes_exact_then_earlier_minor_of_same_major(tmp_path):
    for arch in ("sm_80", "sm_90"):
        (tmp_path / f"rms_norm.{arch}.cubin").write_bytes(b"\x7fELF")
    assert _cuda.find_cubin("rms_norm", 9, 0, tmp_path)[0].name == "rms_norm.sm_90.cubin"  # H100, H200
    assert _cuda.find_cubin("rms_norm", 8, 9, tmp_path)[0].name == "rms_norm.sm_80.cubin"  # L40S runs sm_80 SASS
    cubin, why = _cuda.find_cubin("rms_norm", 10, 0, tmp_path)  # B200: no sm_10x cubin, so NVRTC
    assert cubin is None and "no rms_norm.sm_10*.cubin" in why


def test_find_cubin_skips_a_cubin_older_than_its_source(tmp_path):
    cubin = tmp_path / "rms_norm.sm_90.cubin"
    cubin.write_bytes(b"\x7fELF")
    old = (_cuda.CUDA_DIR / "rms_norm.cu").stat().st_mtime - 3600
    os.utime(cubin, (old, old))
    found, why = _cuda.find_cubin("rms_norm", 9, 0, tmp_path)
    assert found is None and "stale" in why


def test_nvrtc_source_inlines_common_header_and_keeps_line_numbers():
    src = _cuda.nvrtc_source("rms_norm")
    assert '#include "common.cuh"' not in src and "#pragma once" not in src
    assert "namespace tokprof" in src  # the header's body is in the text CuPy hashes for its cache key
    lines = (_cuda.CUDA_DIR / "rms_norm.cu").read_text().splitlines()
    include_line = lines.index('#include "common.cuh"') + 1
    assert f'#line {include_line + 1} "rms_norm.cu"' in src


def test_kernel_arguments_get_the_c_types_of_the_kernel_signatures():
    assert type(_cuda._arg(7)) is np.int32 and type(_cuda._arg(True)) is np.int32
    assert type(_cuda._arg(1e-5)) is np.float32
    with pytest.raises(ValueError, match="32-bit int, got 2147483648"):
        _cuda._arg(2**31)
    with pytest.raises(TypeError, match="cannot pass str"):
        _cuda._arg("x")


def test_launch_shape_checks_name_the_kernel_and_the_limit():
    _cuda._check_launch("k", (2**31 - 1, 65535, 65535), (1024,))
    with pytest.raises(ValueError, match=r"grid of k: .* got \(1, 70000\)"):
        _cuda._check_launch("k", (1, 70000), (128,))
    with pytest.raises(ValueError, match=r"grid of k: .* got \(0,\)"):
        _cuda._check_launch("k", (0,), (128,))
    with pytest.raises(ValueError, match="block of k: expected at most 1024 threads"):
        _cuda._check_launch("k", (1,), (32, 64))
