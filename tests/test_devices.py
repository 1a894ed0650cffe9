"""Device detection, versions, git sha and the GPU spec table (tokprof/data/gpus.json)."""

from __future__ import annotations

import json
import platform
import re

import pytest
import torch

from tokprof.profiler import devices
from tokprof.profiler.devices import GpuSpec, detect_device, git_sha, load_specs, match_spec, spec_for, versions

REQUIRED_KEYS = {"a100-sxm-40gb", "a100-sxm-80gb", "h100-sxm", "h100-pcie", "h200", "b200", "gb200", "gb300", "l40s",
                 "l4", "mi300x"}


def test_every_row_has_source_date_and_plausible_numbers():
    specs = load_specs()
    assert set(specs) >= REQUIRED_KEYS
    for key, s in specs.items():
        assert s.source.strip() and re.fullmatch(r"\d{4}-\d{2}-\d{2}", s.date), key
        assert s.hbm_tbps is not None and 0.1 <= s.hbm_tbps <= 20, key
        assert s.bf16_tflops is not None and 50 <= s.bf16_tflops <= 5000, key
        assert s.tdp_w is not None and 50 <= s.tdp_w <= 2000, key
        # Dense tensor peaks: fp8 doubles bf16 where it exists; the non-tensor fp32 peak is far below bf16.
        if s.fp8_tflops is not None:
            assert s.fp8_tflops == pytest.approx(2 * s.bf16_tflops, rel=0.02), key
        if s.fp32_tflops is not None:
            assert s.fp32_tflops < s.bf16_tflops / 3, key
        if any(v is None for v in (s.fp8_tflops, s.fp32_tflops, s.l2_mb, s.nvlink_gbps)):
            assert s.note.strip(), f"{key}: a null figure needs a note saying why"


def test_facts_values_carried():
    specs = load_specs()
    h100, h200, a100 = specs["h100-sxm"], specs["h200"], specs["a100-sxm-80gb"]
    assert (h100.hbm_tbps, h100.bf16_tflops, h100.fp8_tflops, h100.l2_mb, h100.idle_w) == (3.35, 989, 1979, 50, 70)
    assert (h200.hbm_tbps, h200.memory_gb, h200.l2_mb, h200.idle_w) == (4.8, 141, 60, 75)
    assert (a100.hbm_tbps, a100.bf16_tflops, a100.fp8_tflops) == (2.039, 312, None)
    assert specs["h100-pcie"].bf16_tflops == 756 and specs["b200"].fp8_tflops == 4500
    assert specs["l40s"].l2_mb == 96 and specs["mi300x"].hbm_tbps == 5.3


def test_peak_by_dtype():
    h100 = load_specs()["h100-sxm"]
    assert h100.peak_tflops("bf16") == 989 and h100.peak_tflops("fp8") == 1979 and h100.peak_tflops("fp32") == 67
    assert load_specs()["a100-sxm-40gb"].peak_tflops("fp8") is None
    assert h100.peak_tflops("int8") == 1979 and h100.peak_tflops("fp4") is None  # no FP4 tensor cores on Hopper
    with pytest.raises(ValueError, match="dtype: expected one of"):
        h100.peak_tflops("int4")


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", None),  # 94 GB, other clocks: not the SXM or PCIe row
    ("NVIDIA H200", "h200"),
    ("NVIDIA H200 NVL", None),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-sxm-40gb"),
    ("NVIDIA A100 80GB PCIe", None),
    ("NVIDIA A100-PCIE-40GB", None),
    ("NVIDIA B200", "b200"),
    ("NVIDIA GB200", "gb200"),
    ("NVIDIA GB300", "gb300"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA L40", None),
    ("NVIDIA L4", "l4"),
    ("AMD Instinct MI300X", "mi300x"),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_match_real_torch_device_names(name, key):
    assert match_spec(name) == key


def test_spec_table_rejects_rows_without_source(tmp_path):
    row = {"key": "x", "name": "X", "patterns": ["X"], "hbm_tbps": 1.0, "bf16_tflops": 1.0, "date": "2026-01-01"}
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"gpus": [row]}))
    with pytest.raises(ValueError, match=r"gpus\[0\]\.source: expected a non-empty string"):
        load_specs(path)
    path.write_text(json.dumps({"gpus": [{**row, "source": "a datasheet", "hbm_tbps": -1}]}))
    with pytest.raises(ValueError, match="hbm_tbps: expected a positive number"):
        load_specs(path)
    path.write_text(json.dumps({"gpus": [{**row, "source": "a datasheet"}]}))
    spec = load_specs(path)["x"]
    assert isinstance(spec, GpuSpec) and spec.fp32_tflops is None and spec.hbm_tbps == 1.0


def test_detect_cpu():
    info = detect_device("cpu")
    assert info.kind == "cpu" and info.name == info.cpu_model and info.name
    assert info.cpu_cores is not None and info.cpu_cores >= 1
    assert info.uuid is None and info.spec_key is None and spec_for(info) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_detect_cuda_without_gpu_says_what_works():
    with pytest.raises(RuntimeError, match="use device='cpu'"):
        detect_device("cuda")


def test_resolve_device_makes_an_explicit_gpu_current(monkeypatch):
    # Events, graph captures and Triton launches use the current device: --device cuda:1 must become it.
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve_device("cuda") == torch.device("cuda")  # no index: the current device, left as it is
    assert chosen == [torch.device("cuda", 1)]
    with pytest.raises(ValueError, match=r"--device: expected cuda:0 to cuda:1 \(2 GPU\(s\) visible here\)"):
        devices.resolve_device("cuda:2")


@pytest.mark.gpu
def test_detect_gpu():
    info = detect_device("cuda")
    props = torch.cuda.get_device_properties(0)
    assert info.kind == "cuda" and info.name == props.name and info.sm_count == props.multi_processor_count
    assert info.memory_bytes == props.total_memory and info.uuid and info.uuid.startswith("GPU-")
    assert info.compute_capability == f"{props.major}.{props.minor}" and info.cuda == torch.version.cuda


def test_versions():
    v = versions()
    assert {"python", "torch", "triton", "cupy", "nvidia-ml-py", "tokprof", "driver", "cuda"} <= set(v)
    assert v["python"] == platform.python_version() and v["torch"] == torch.__version__
    assert v["tokprof"] == __import__("tokprof").__version__
    if not torch.cuda.is_available():
        assert v["driver"] is None and v["cuda"] == torch.version.cuda


def test_git_sha(tmp_path):
    assert git_sha(tmp_path) is None  # not a checkout
    sha = git_sha()
    root = devices.Path(devices.__file__).resolve().parent.parent.parent
    if (root / ".git").exists():
        assert sha is not None and re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", sha)


def test_git_sha_from_environment_where_the_tree_is_no_checkout(tmp_path, monkeypatch):
    # a GPU machine gets a copy of the tree without .git: the sha is passed in from outside
    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("TOKPROF_GIT_SHA", sha + "+dirty")
    assert git_sha(tmp_path) == sha + "+dirty"
    monkeypatch.setenv("TOKPROF_GIT_SHA", "not-a-sha")
    with pytest.raises(ValueError, match="TOKPROF_GIT_SHA"):
        git_sha(tmp_path)
    monkeypatch.delenv("TOKPROF_GIT_SHA")
    assert git_sha(tmp_path) is None
