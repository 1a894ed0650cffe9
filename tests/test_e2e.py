"""End-to-end measurement on the tiny preset (CPU, torch backend), the transformers adapter, bottom-up vs end to end,
and the `tokprof e2e` / `tokprof reconcile` commands. GPU-only paths (graph mode, bf16) are marked `gpu`."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tokprof.models.config import ModelConfig
from tokprof.models.e2e import E2EMeasurement, measure_e2e, prompt_length
from tokprof.models.transformer import Transformer

TINY = ModelConfig.from_name("tiny")


@pytest.fixture
def one_thread() -> object:
    """One intra-op thread: on 2 shared cores a 2-thread op waits for its slowest thread, which makes CPU timing
    swing by 10x; both sides of a comparison then run under the same setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tiny(backend: str = "torch", device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
          ) -> Transformer:
    return Transformer.random(TINY, device=device, dtype=dtype, seed=seed, backend=backend)


def test_measure_e2e_tiny_cpu(one_thread: object) -> None:
    model = _tiny()
    m = measure_e2e(model, batch=2, context=40, steps=8, warmup=2, cpu_window_s=0)  # one block
    assert m.blocks == 1
    assert (m.framework, m.mode, m.backend, m.dtype, m.model) == ("tokprof", "eager", "torch", "fp32", "tiny")
    assert len(m.step_times_us) == 8 and all(t > 0 and math.isfinite(t) for t in m.step_times_us)
    assert m.median_step_us == pytest.approx(float(np.median(m.step_times_us)))
    assert m.p90_step_us == pytest.approx(float(np.percentile(m.step_times_us, 90)))
    assert m.p90_step_us >= m.median_step_us
    assert m.tokens_per_s_per_gpu == pytest.approx(2 / (m.median_step_us * 1e-6))
    assert m.tokens_per_s_per_user == pytest.approx(1 / (m.median_step_us * 1e-6))
    assert m.ttft_ms is not None and m.ttft_ms > 0
    # The timed steps attend 37..44 KV tokens: centred on the context 40 (the new token counted).
    assert (m.prompt_len, m.context_first, m.context_last) == (34, 37, 44)
    assert (m.context_first + m.context_last) / 2 == pytest.approx(40, abs=0.5)
    assert m.j_per_token is None and m.energy_reason.startswith("no energy counter on a cpu")
    assert m.gpu_busy_fraction is None and "cpu" in m.gpu_busy_reason
    assert any("CPU figures" in n for n in m.notes)
    assert model.cache is None  # the point gives its KV cache back
    assert E2EMeasurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m


@pytest.mark.parametrize("context,warmup,steps", [(40, 2, 8), (1024, 4, 64), (100, 0, 7), (10, 3, 2)])
def test_prompt_length_centres_the_timed_steps(context: int, warmup: int, steps: int) -> None:
    p = prompt_length(context, warmup, steps)
    attended = [p + warmup + 1 + j for j in range(steps)]
    assert float(np.median(attended)) in (context, context + 0.5)


def test_bad_arguments() -> None:
    model = _tiny()
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        measure_e2e(model, batch=1, context=40, steps=4, mode="graph")
    with pytest.raises(ValueError, match="mode"):
        measure_e2e(model, batch=1, context=40, steps=4, mode="fast")
    with pytest.raises(ValueError, match="context: 8 is too short"):
        measure_e2e(model, batch=1, context=8, steps=16, warmup=2)
    with pytest.raises(ValueError, match="steps"):
        measure_e2e(model, batch=1, context=40, steps=1)
    with pytest.raises(ValueError, match="batch"):
        measure_e2e(model, batch=0, context=40, steps=4)


def test_transformers_adapter_shares_weights_and_agrees(one_thread: object) -> None:
    from tokprof.models.adapters import build_hf_model, measure_transformers

    model = _tiny(seed=3)
    hf = build_hf_model(model)
    q_proj = hf.model.layers[1].self_attn.q_proj.weight
    assert q_proj.data_ptr() == model.weights.layers[1].qkv.data_ptr()  # a view: no second copy of the weights
    prompt = torch.randint(0, TINY.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    want = hf.generate(prompt, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(model.generate(prompt, 5), want)
    m = measure_transformers(model, batch=2, context=40, steps=6, warmup=2, cpu_window_s=0)
    assert m.framework == "transformers" and m.backend.startswith("transformers-")
    assert len(m.step_times_us) == 6 and m.median_step_us > 0 and m.ttft_ms > 0
    with pytest.raises(ValueError, match="eager decoding only"):
        measure_transformers(model, batch=2, context=40, steps=6, mode="graph")


def test_vllm_skipped_with_a_clear_message() -> None:
    from tokprof.models.adapters import measure_vllm, vllm_status

    reason = vllm_status()
    if reason is None:
        pytest.skip("vllm is importable here; its adapter is exercised by the gpu tests")
    assert "vllm is not importable" in reason
    with pytest.raises(RuntimeError, match="vllm is not importable"):
        measure_vllm(_tiny(), batch=1, context=40, steps=4)


def test_bottom_up_vs_end_to_end_tiny_cpu(one_thread: object) -> None:
    """The comparison of the issue on the tiny preset, torch backend: the kernel sum (L2) against the eager decode
    loop (L4). CPU timing is noisy, so only a loose bound is asserted; the figure is printed."""
    from tokprof.profiler.ceilings import measure_ceilings
    from tokprof.rollup import bottom_up
    from tokprof.rollup.reconcile import reconcile

    ceilings = measure_ceilings("cpu", cache=False, copy_buffer_bytes=8 << 20, gemm_n=128,
                                timing_kwargs={"min_time_s": 0.02, "max_time_s": 0.2})
    points, run = bottom_up(TINY, [2], [64], "torch", "cpu", dtype="fp32", ceilings=ceilings,
                            timing_kwargs={"min_time_s": 0.02, "max_time_s": 0.3}, progress=False)
    model = _tiny()
    # On 2 cores shared with other jobs a 2 ms decode step is preempted far more often than a 40 us kernel call,
    # so a loaded machine can push one end-to-end median beyond any bound: up to 3 attempts, each printed.
    ratios = []
    for _attempt in range(3):
        e2e = measure_e2e(model, batch=2, context=64, steps=32, warmup=4)
        run.e2e = [e2e.to_dict()]
        (rec,) = reconcile(run)
        l2, l4 = rec.layer("L2"), rec.layer("L4")
        assert l2.step_time_us == pytest.approx(points[0].step_time_us)
        assert l4.step_time_us == pytest.approx(e2e.median_step_us)
        assert l2.tokens_per_s_per_gpu > 0 and l4.tokens_per_s_per_gpu > 0
        assert rec.bottom_up_error_against == "L4"
        want = (l2.tokens_per_s_per_gpu - l4.tokens_per_s_per_gpu) / l4.tokens_per_s_per_gpu * 100
        assert rec.bottom_up_error_pct == pytest.approx(want) and math.isfinite(want)
        print(f"\ntiny preset, torch backend, CPU, batch 2, context 64: kernel sum {l2.step_time_us:.0f} us/step, "
              f"eager decode loop {l4.step_time_us:.0f} us/step, bottom-up error {rec.bottom_up_error_pct:+.1f}%")
        ratios.append(l2.step_time_us / l4.step_time_us)
        if 0.2 < ratios[-1] < 5:
            break
    assert 0.2 < ratios[-1] < 5, f"kernel sum / end to end = {ratios}: beyond a factor of 5 in every attempt"
    # L1 comes from the CPU ceilings measured above, and the per-op losses fill the L1 -> L2 gap.
    l1 = rec.layer("L1")
    assert l1.step_time_us is not None and l1.step_time_us < l2.step_time_us
    assert sum(o.lost_us for o in rec.op_inefficiency) == pytest.approx(l2.step_time_us - l1.step_time_us, rel=1e-6)


def test_cli_e2e_then_reconcile(tmp_path: Path, one_thread: object) -> None:
    from tokprof.cli import app

    out = tmp_path / "run.json"
    runner = CliRunner()
    res = runner.invoke(app, ["e2e", "--model", "tiny", "--batch", "1,2", "--context", "40", "--steps", "4",
                              "--warmup", "2", "--framework", "tokprof,transformers", "--mode", "eager,graph",
                              "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    got = {(m["framework"], m["mode"], m["batch"]) for m in doc["e2e"]}
    assert got == {("tokprof", "eager", 1), ("tokprof", "eager", 2), ("transformers", "eager", 1),
                   ("transformers", "eager", 2)}
    assert "skipped tokprof graph: CUDA graphs need a CUDA device" in " ".join(res.output.split())
    res = runner.invoke(app, ["reconcile", str(out), "--utilisation", "0.5", "--write"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(doc["reconciliation"]) == 2
    from tokprof.profiler.schema import load_run

    run = load_run(out)
    assert len(run.e2e) == 4 and len(run.reconciliation) == 2
    res = runner.invoke(app, ["e2e", "--batch", "1", "--device", "cpu"])
    assert res.exit_code == 2 and "--model" in res.output


def test_modes_share_one_prefill_and_start_from_the_same_state(one_thread: object) -> None:
    from tokprof.models.e2e import tokprof_decode_session, tokprof_prefill

    model = _tiny(seed=8)
    prefilled = tokprof_prefill(model, batch=2, context=40, steps=4, warmup=2, seed=1)
    assert prefilled.prompt_len == 36 and prefilled.ttft_ms > 0  # 40 - 2 - 1 - (4 - 1) // 2
    firsts = []
    for _ in range(2):  # as for graph then eager on a GPU: each session rewinds to the end of the prefill
        session = tokprof_decode_session(model, prefilled, warmup=2, mode="eager")
        state = model.snapshot()
        tokens = [session.step()[0].clone() for _ in range(3)]
        firsts.append((state, tokens))
        assert int(state.positions[0]) == prefilled.prompt_len + 2  # after the 2 warm-up steps
    (s0, t0), (s1, t1) = firsts
    assert torch.equal(s0.tokens, s1.tokens) and torch.equal(s0.slots, s1.slots) and s0.steps_left == s1.steps_left
    assert all(torch.equal(a, b) for a, b in zip(t0, t1, strict=True))  # greedy decoding of the same state
    model.free_cache()


def test_a_failing_later_mode_keeps_the_earlier_one_and_frees_the_cache(monkeypatch, one_thread: object) -> None:
    from tokprof.models import e2e

    real = e2e.tokprof_decode_session
    modes_started = []

    def flaky(model, prefilled, warmup, mode):  # the second mode fails, as a graph capture could on a GPU
        modes_started.append(mode)
        if len(modes_started) == 2:
            raise RuntimeError("CUDA graph capture of the decode step failed")
        return real(model, prefilled, warmup, mode)

    monkeypatch.setattr(e2e, "tokprof_decode_session", flaky)
    model = _tiny(seed=9)
    got = []
    with pytest.raises(RuntimeError, match="capture of the decode step failed"):
        for m in e2e.measure_e2e_modes(model, 1, 40, ["eager", "eager"], steps=4, warmup=2, energy=False,
                                       profile=False, cpu_window_s=0):
            got.append(m)
    assert [m.mode for m in got] == ["eager"] and len(got[0].step_times_us) == 4
    assert model.cache is None  # given back although the iteration ended with an exception
    with pytest.raises(ValueError, match="modes: expected at least one"):
        e2e.measure_e2e_modes(model, 1, 40, [], steps=4)  # checked at the call, before anything runs


def test_ttft_excludes_the_kv_cache_allocation(monkeypatch, one_thread: object) -> None:
    """The timed prefill fills a cache allocated before the clock started (a server allocates it at start-up)."""
    from tokprof.models import e2e
    from tokprof.models import transformer as transformer_mod

    model = _tiny()
    real_allocate, real_prefill = transformer_mod.PagedKVCache.allocate, model.prefill
    timed = {"on": False, "allocations": 0}

    def allocate(*args, **kwargs):
        timed["allocations"] += timed["on"]
        return real_allocate(*args, **kwargs)

    def prefill(ids, max_new_tokens):
        timed["on"] = ids.shape[0] == 3  # the whole batch: the timed call (the warm-up runs a sub-batch)
        try:
            return real_prefill(ids, max_new_tokens)
        finally:
            timed["on"] = False

    monkeypatch.setattr(transformer_mod.PagedKVCache, "allocate", staticmethod(allocate))
    monkeypatch.setattr(model, "prefill", prefill)
    monkeypatch.setattr(model, "max_prefill_tokens", 40)  # sub-batches of one 40-token prompt: a warm-up of 1 row
    prefilled = e2e.tokprof_prefill(model, batch=3, context=48, steps=4, warmup=2, seed=0)
    assert timed["allocations"] == 0 and prefilled.ttft_ms > 0
    assert "allocated before the clock started" in prefilled.notes[0]


def test_run_e2e_measures_explicit_points_and_frameworks_where_asked(tmp_path: Path, one_thread: object) -> None:
    from rich.console import Console

    from tokprof.models.e2e_command import E2EArgs, run_e2e
    from tokprof.profiler.schema import load_run

    out = tmp_path / "run.json"
    args = E2EArgs(model="tiny", model_dir=None, batches=[], contexts=[], modes=None,
                   frameworks=["tokprof", "transformers"], steps=4, warmup=2, device=torch.device("cpu"),
                   backend=None, dtype=None, output=str(out), energy=False, profile=False,
                   points=[(1, 3), (1, 40), (2, 40)], framework_points=[(2, 40)])
    quiet = Console(file=io.StringIO())
    results, path = run_e2e(args, quiet, quiet)
    got = [(m.framework, m.batch, m.context) for m in results]
    # (1, 3) is too short a context for 4 timed steps: skipped with its reason; the sweep goes on.
    assert got == [("tokprof", 1, 40), ("tokprof", 2, 40), ("transformers", 2, 40)]
    run = load_run(path)
    assert len(run.e2e) == 3
    assert any("e2e skipped tokprof eager batch 1 context 3: ValueError: context: 3 is too short" in n
               for n in run.notes)
    assert any("e2e transformers: measured at (batch, context) [(2, 40)] only" in n for n in run.notes)


def test_cli_e2e_from_a_model_directory(tmp_path: Path, one_thread: object) -> None:
    from tokprof.cli import app
    from tokprof.models.adapters import save_hf_dir

    directory = save_hf_dir(_tiny(seed=7), tmp_path / "hf")
    res = CliRunner().invoke(app, ["e2e", "--model", str(directory), "--name", "my-tiny", "--batch", "1", "--context",
                                   "40", "--steps", "4", "--warmup", "2", "--framework", "tokprof,vllm", "--device",
                                   "cpu"])
    assert res.exit_code == 0, res.output
    (m,) = json.loads(res.stdout.strip().splitlines()[-1])["e2e"]
    assert (m["model"], m["framework"], m["batch"], m["context"]) == ("my-tiny", "tokprof", 1, 40)
    assert "skipped vllm eager: vLLM needs a CUDA GPU" in " ".join(res.output.split())
    # --model-dir DIR --model NAME: the old spelling still works (a hidden, deprecated alias)
    res = CliRunner().invoke(app, ["e2e", "--model-dir", str(directory), "--model", "old-form", "--batch", "1",
                                   "--context", "40", "--steps", "4", "--warmup", "2", "--framework", "tokprof",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["e2e"][0]["model"] == "old-form"
    res = CliRunner().invoke(app, ["e2e", "--model-dir", str(tmp_path / "nowhere"), "--device", "cpu"])
    assert res.exit_code == 2 and "not a directory" in " ".join(res.output.split())  # rich wraps lines


# ----------------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_graph_decode_matches_eager_bf16() -> None:
    model = _tiny(backend="triton", device="cuda", dtype=torch.bfloat16, seed=1)
    prompt = torch.randint(0, TINY.vocab_size, (4, 20), generator=torch.Generator().manual_seed(2))
    eager, eager_logits = model.generate(prompt, 12, return_logits=True)
    graph, graph_logits = model.generate(prompt, 12, use_graph=True, return_logits=True)
    assert torch.equal(eager, graph)
    assert torch.equal(eager_logits, graph_logits)  # the same kernels on the same data


@pytest.mark.gpu
def test_measure_e2e_graph_and_eager_on_gpu() -> None:
    model = _tiny(backend="triton", device="cuda", dtype=torch.bfloat16)
    graph = measure_e2e(model, batch=8, context=256, steps=32, mode="graph")
    eager = measure_e2e(model, batch=8, context=256, steps=32, mode="eager")
    for m in (graph, eager):
        assert m.median_step_us > 0 and len(m.step_times_us) == 32
        assert m.gpu_busy_fraction is None or 0 < m.gpu_busy_fraction <= 1
        assert m.j_per_token is None or m.j_per_token > 0
        assert m.j_per_token is not None or m.energy_reason
    # Launches captured in a graph cannot be much slower than the same launches from Python with host syncs.
    assert graph.median_step_us < eager.median_step_us * 1.2


def _cast(model: Transformer, dtype: torch.dtype, backend: str) -> Transformer:
    from dataclasses import replace

    w = model.weights
    layers = [replace(lw, **{f: getattr(lw, f).to(dtype) for f in ("input_norm", "qkv", "o", "post_norm",
                                                                      "gate_up", "down")}) for lw in w.layers]
    embed = w.embed.to(dtype)
    weights = replace(w, embed=embed, layers=layers, final_norm=w.final_norm.to(dtype),
                      lm_head=embed if w.lm_head is w.embed else w.lm_head.to(dtype))
    return Transformer(model.config, weights, backend=backend)


@pytest.mark.gpu
def test_bf16_triton_close_to_fp32_torch_on_gpu() -> None:
    fp32 = _tiny(backend="torch", device="cuda", dtype=torch.float32, seed=5)
    bf16 = _cast(fp32, torch.bfloat16, "triton")
    prompt = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(6))
    want_tokens, want = fp32.generate(prompt, 2, return_logits=True)  # prefill + one decode step
    got_tokens, got = bf16.generate(prompt, 2, return_logits=True)
    assert got.dtype == torch.bfloat16
    # The decode step's logits are comparable only where both fed it the same first token.
    same = got_tokens[:, 16] == want_tokens[:, 16]
    err = max((got[:, 0].float() - want[:, 0]).abs().max().item(),
              (got[same, 1].float() - want[same, 1]).abs().max().item() if same.any() else 0.0)
    # Logits here span about +-1.1 (std 0.34): bf16 rounding moves them by ~1e-2, a wrong kernel by ~0.3.
    assert err < 0.04 * want.abs().max().item() + 0.01, f"bf16 triton vs fp32 torch logits differ by {err:.3g}"
