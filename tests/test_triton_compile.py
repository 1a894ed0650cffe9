"""scripts/triton_compile_check.py: every Triton kernel compiles for sm_90 with the real compiler, no GPU needed.

The other kernel tests run Triton's CPU interpreter, which checks neither shared memory, registers and spills nor
tl.dot's shape rules. This test runs the compile check in a fresh interpreter with TRITON_INTERPRET removed from
its environment, for --arch 90, on a representative subset of the configurations (the full default set, 4 models x
3 dtypes, about 120 kernels, takes about a minute cold on 2 cores):

- the calls of the Llama-3.1-8B (head dim 128) and Llama-3.2-1B (head dim 64) plans, decode at batch 1 (split-K,
  flash-decoding splits, M=1 constants) and 64 (unsplit), a 2048-token prefill (tiled GEMM, causal and non-causal
  attention), plus every op's registry default shape;
- in bf16 (the 16-bit configurations; fp16 takes the same ones) and fp32 (exact "ieee" dots held in registers,
  where spills show up first): about 60 kernels of the dense ops, 28-32 s with Triton's kernel cache cold, ~10 s
  warm, on 2 shared cores, hence the `slow` mark; the MoE, MLA and gpt-oss variants (each op's
  compile_check_shapes) add about 40 kernels and several minutes cold on 2 loaded cores.

Skipped only when the script says the compile API is missing (exit 3, e.g. triton not installed).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokprof.kernels import OPS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "triton_compile_check.py"
SUBSET_ARGS = ["--arch", "90", "--models", "llama-3.1-8b,llama-3.2-1b", "--dtypes", "bf16,fp32"]


def _run(args: list[str], env_extra: dict[str, str] | None = None,
         timeout_s: float = 1200) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for this process
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def _launched_kernel_names() -> set[str]:
    """The top-level kernels of every op module (named `_..._kernel` by convention; helpers such as _attn_inner are
    inlined into them and never launched on their own)."""
    names = set()
    for op in OPS.values():
        module = importlib.import_module(op.fn.__module__)
        names |= {name for name, value in vars(module).items()
                  if name.endswith("_kernel") and type(value).__name__ in ("JITFunction", "InterpretedFunction")}
    return names


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    proc = _run(SUBSET_ARGS)
    if proc.returncode == 3:
        pytest.skip(f"Triton's compile API is unavailable: {proc.stderr.strip()[-500:]}")
    tail = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"compile check failed (exit {proc.returncode})\n{tail}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["arch"] == 90 and result["ok"] is True and result["failed"] == 0

    # Every op appears, with kernels compiled in both dtypes of the subset.
    assert set(result["ops"]) == set(OPS)
    for op, info in result["ops"].items():
        assert info["kernels"] > 0 and info["failed"] == 0, (op, info)
        assert info["dtypes"] == ["bf16", "fp32"], (op, info)

    # Every launched kernel of every op module was compiled, not just one path per op.
    kernels = result["kernels"]
    assert {k["kernel"] for k in kernels} == _launched_kernel_names()

    # Each kernel within sm_90's limits, with figures that are real compiler output.
    limit_shared = result["limits"]["shared_bytes_per_block"]
    assert limit_shared == 227 * 1024
    for k in kernels:
        assert 1 <= k["regs"] <= 255, k
        assert k["regs"] * 32 * k["num_warps"] <= 65536, k
        assert 0 <= k["shared_bytes"] <= limit_shared, k
        assert k["spill_bytes"] <= result["limits"]["max_spill_bytes"], k
        assert k["ok"] and not k["problems"], k
        # SASS read from the cubin with Triton's own cuobjdump: a kernel is tens of instructions at least
        assert k["sass_instructions"] is not None and k["sass_instructions"] > 20, k

    # The wrappers' heuristics were exercised on both sides of their branches.
    configs = {(k["kernel"], k["config"]) for k in kernels}
    branches = [("_decode_attention_kernel", "SPLIT=True"), ("_decode_attention_kernel", "SPLIT=False"),
                ("_prefill_attn_kernel", "CAUSAL=True"), ("_prefill_attn_kernel", "CAUSAL=False"),
                ("_prefill_attn_kernel", "HEAD_DIM=64"), ("_prefill_attn_kernel", "HEAD_DIM=128"),
                ("_linear_skinny_kernel", "BLOCK_M=16"), ("_linear_skinny_kernel", "BLOCK_M=64"),
                ("_linear_skinny_kernel", "DOT_PRECISION=ieee"), ("_linear_tiled_kernel", "DOT_PRECISION=tf32"),
                # gpt-oss's attention extras, MLA's two paths, the MoE routing rules and activations
                ("_decode_attention_kernel", "HAS_SINKS=True"), ("_decode_attention_kernel", "WINDOW=True"),
                ("_decode_attention_reduce_kernel", "HAS_SINKS=True"), ("_prefill_attn_kernel", "WINDOW=True"),
                ("_mla_decode_kernel", "SPLIT=True"), ("_mla_decode_kernel", "SPLIT=False"),
                ("_moe_router_kernel", "SIGMOID=True"), ("_moe_router_kernel", "SIGMOID=False"),
                ("_moe_gate_up_kernel", "GPT_OSS=True"), ("_moe_gate_up_kernel", "GPT_OSS=False")]
    for kernel, flag in branches:
        assert any(name == kernel and flag in config.split() for name, config in configs), (kernel, flag)
    # The table names every op too.
    table = proc.stdout.splitlines()[:-1]
    for op in OPS:
        assert any(line.startswith(op + " ") for line in table), op


def test_refuses_the_interpreter():
    proc = _run(["--arch", "90"], env_extra={"TRITON_INTERPRET": "1"}, timeout_s=60)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr and "unset" in proc.stderr
    assert proc.stdout == ""
