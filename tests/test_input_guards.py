"""Input that must not escape or crash (issue 14): each break of the audit reproduced, refused with exit 2 and a
message naming the argument, never a traceback; user text with Rich markup printed as text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tokprof.cli import app
from tokprof.kernels import append_kv
from tokprof.kernels._common import skip_value_checks
from tokprof.models.config import ModelConfig

runner = CliRunner()
DATA = Path(__file__).resolve().parent / "data"
HF = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKPROF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKPROF_HISTORY_DB", str(tmp_path / "history.db"))


def _invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())


def _refused(*args: str, message: str) -> str:
    result, text = _invoke(*args)
    assert result.exit_code == 2, (text, result.exception)
    assert message in text and "Traceback" not in text, text
    return text


@pytest.mark.parametrize(("change", "message"), [
    ({"num_attention_heads": 0}, "num_attention_heads: expected a positive int"),
    ({"vocab_size": [128]}, "vocab_size: expected a positive int"),
    ({"hidden_size": 1e30}, "hidden_size: expected a positive int"),
    ({"hidden_size": 10**30}, "hidden_size: expected a positive int up to"),
    ({"rope_scaling": "llama3"}, "rope_scaling: expected an object or null"),
    ({"num_key_value_heads": 0}, "num_key_value_heads: expected a positive int"),  # not silently MHA
    ({"rope_theta": "big"}, "rope_theta: expected a positive finite number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 0, "low_freq_factor": 1, "high_freq_factor": 4,
                       "original_max_position_embeddings": 8192}}, "rope_scaling.factor: expected a positive"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4,
                       "original_max_position_embeddings": 8192}}, "expected high_freq_factor > low_freq_factor"),
])
def test_hf_config_values_are_type_and_range_checked(tmp_path, change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(">", ">")):
        ModelConfig.from_hf({**HF, **change})
    (tmp_path / "config.json").write_text(json.dumps({**HF, **change}))
    _refused("rollup", "--model", tmp_path, "--gpu", "h100", "--modelled", message=message)


def test_hf_config_top_level_list_and_absent_kv_heads(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config: expected a JSON object"):
        ModelConfig.from_hf(tmp_path)
    _refused("rollup", "--model", tmp_path, "--gpu", "h100", "--modelled", message="expected a JSON object")
    no_kv = {k: v for k, v in HF.items() if k != "num_key_value_heads"}
    assert ModelConfig.from_hf(no_kv).num_kv_heads == 4  # absent: MHA, as Hugging Face reads it
    assert ModelConfig.from_hf({**no_kv, "num_key_value_heads": None}).num_kv_heads == 4


def test_bench_refuses_a_zero_divisor_in_the_shape(tmp_path):
    _refused("bench", "--op", "decode_attention", "--device", "cpu", "--no-ceilings", "--shape",
             "B=1,context=64,block_size=0", "-o", tmp_path / "x.json", message="shape: block_size expected a positive")
    assert not (tmp_path / "x.json").exists()


def test_bench_timeouts_are_bounded(tmp_path):
    for flag in ("--timeout-s", "--energy-window-s"):
        extra = ["--energy"] if flag == "--energy-window-s" else []
        _refused("bench", "--op", "swiglu", "--device", "cpu", *extra, flag, "1e308", "-o", tmp_path / "x.json",
                 message=f"{flag}: expected a positive number of seconds up to 3600")


def test_ceilings_sizes_beyond_the_memory_are_refused():
    _refused("ceilings", "--device", "cpu", "--no-cache", "--copy-mib", "100000000", message="--copy-mib: needs about")
    _refused("ceilings", "--device", "cpu", "--no-cache", "--gemm-n", "100000000", message="--gemm-n: needs about")


def test_e2e_backend_that_cannot_run_here_is_refused(monkeypatch):
    from tokprof.kernels import OPS

    op = next(iter(OPS.values()))
    real = type(op).available_backends
    monkeypatch.setattr(type(op), "available_backends",
                        lambda self, dev: {**real(self, dev), "triton": "no GPU and no TRITON_INTERPRET"})
    _refused("e2e", "--model", "tiny", "--device", "cpu", "--backend", "triton",
             message="--backend triton: cannot run on cpu: no GPU and no TRITON_INTERPRET")
    _refused("e2e", "--model", "tiny", "--device", "cpu", "--backend", "fortran", message="--backend: expected one of")


def test_append_kv_refuses_duplicate_slots_outside_the_timed_path():
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    kc, vc = torch.zeros(4, 2, 2, 8), torch.zeros(4, 2, 2, 8)
    with pytest.raises(ValueError, match="slot_mapping: expected distinct slots .* got slot 5 2 times"):
        append_kv(k, v, kc, vc, torch.tensor([5, 1, 5]), backend="torch")
    append_kv(k, v, kc, vc, torch.tensor([-1, 1, -1]), backend="torch")  # skipped tokens may repeat -1
    with skip_value_checks():  # the profiler's timed calls: no host sync, no check
        append_kv(k, v, kc, vc, torch.tensor([5, 1, 5]), backend="torch")


def test_rich_markup_in_user_text_is_printed_as_text(tmp_path):
    data = json.loads((DATA / "run_h100.json").read_text())
    data["model"]["name"] = "tiny[/]"
    for section in ("rollup", "e2e", "reconciliation"):
        for rec in data[section]:
            if "model" in rec:
                rec["model"] = "tiny[/]"
    data["run_id"] = "evil[/]"
    evil = tmp_path / "evil.json"
    evil.write_text(json.dumps(data))
    db = tmp_path / "h.db"
    for args in (["history", "--db", db, "--record", evil], ["history", "--db", db],
                 ["reconcile", evil, "--no-write"], ["rollup", "--from", evil]):
        result, text = _invoke(*args)
        assert result.exit_code == 0, (args, result.exception)
        assert "tiny[/]" in result.output, args
    sheet = json.loads((Path(__file__).resolve().parent.parent / "tokprof/data/prices.json").read_text())
    for row in sheet["gpus"].values() if isinstance(sheet["gpus"], dict) else sheet["gpus"]:
        if isinstance(row, dict):
            row["source"] = "[bold]vendor[/] [/]"
    (tmp_path / "prices.json").write_text(json.dumps(sheet))
    result, _ = _invoke("rollup", "--from", evil, "--price-sheet", tmp_path / "prices.json")
    assert result.exit_code == 0, result.exception
    assert "[bold]vendor[/] [/]" in result.output  # the sheet's source, shown as written
    _refused("compare", tmp_path / "[/]missing.json", evil, message="[/]missing.json")


def test_unwritable_or_full_output_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)  # tests may run as root, who may write anywhere
    _refused("bench", "--op", "swiglu", "--device", "cpu", "-o", tmp_path / "x.json",
             message="--output: cannot write")
    monkeypatch.undo()
    monkeypatch.setenv("TOKPROF_CACHE_DIR", str(tmp_path / "cache"))
    full = shutil.disk_usage(tmp_path)._replace(free=1 << 20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    _refused("run", "--device", "cpu", "-o", tmp_path / "out", message="--out: cannot write")
    _refused("compare", DATA / "run_h100.json", DATA / "run_h100.json", "-o", tmp_path / "s.md",
             message="--out: cannot write")
    assert not list(tmp_path.glob("*.json")) and not (tmp_path / "s.md").exists()
