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


def test_launch_passes_c_typed_arguments_on_torchs_current_stream(monkeypatch, recwarn):
    # A fake CuPy: what launch() hands to the kernel, and how often it wraps torch's stream (once per stream; CuPy 14
    # warns on every ExternalStream it builds).
    import sys
    import warnings
    from types import SimpleNamespace

    import torch

    built, launches = [], []

    class ExternalStream:
        def __init__(self, ptr, device_id):
            warnings.warn("ExternalStream is deprecated", DeprecationWarning, stacklevel=2)
            self.ptr, self.device_id = ptr, device_id
            built.append(self)

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def kernel(grid, block, args, shared_mem=0, stream=None):
        launches.append((grid, block, args, shared_mem, stream))

    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace(cuda=SimpleNamespace(Device=Device,
                                                                                  ExternalStream=ExternalStream)))
    monkeypatch.setattr(_cuda, "_resolve", lambda stem, name, index: kernel)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: SimpleNamespace(cuda_stream=0xBEEF))
    _cuda._external_stream.cache_clear()
    x = torch.ones(8)
    try:
        for _ in range(2):
            _cuda.launch("rms_norm", "rms_norm_warp_bf16", torch.device("cuda", 0), (3,), (128,), (x, 5, 1e-6, True),
                         shared_mem_bytes=256)
    finally:
        _cuda._external_stream.cache_clear()
    assert len(built) == 1 and (built[0].ptr, built[0].device_id) == (0xBEEF, 0)
    grid, block, args, shared_mem, stream = launches[-1]
    assert (grid, block, shared_mem, stream) == ((3,), (128,), 256, built[0])
    assert [type(a) for a in args] == [np.uint64, np.int32, np.float32, np.int32]
    assert int(args[0]) == x.data_ptr()
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
