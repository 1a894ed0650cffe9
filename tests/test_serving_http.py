"""The HTTP load generator against a tiny OpenAI-compatible server started here on 127.0.0.1 (streams one token
every 20 ms after a 50 ms first-token delay), and the skip reason where no server listens."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tokprof.serving.http_client import HttpTarget, run_http, server_status
from tokprof.serving.metrics import Slo
from tokprof.serving.traffic import Session, Turn, Workload

FIRST_S, GAP_S = 0.05, 0.02


class Handler(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"data": [{"id": "fake-model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.bodies.append(req)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(FIRST_S)
        for i in range(req["max_tokens"]):
            if i:
                time.sleep(GAP_S)
            chunk = {"choices": [{"text": f" t{i}", "index": 0}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_latencies_from_a_streaming_server(server):
    Handler.bodies.clear()
    wl = Workload([Session(0.0, [Turn([1, 2, 3], 4), Turn([4], 3)], reuse_context=True),
                   Session(0.01, [Turn([5, 6], 5)])])
    run = run_http(wl, HttpTarget(server), Slo(ttft_s=1.0, tpot_s=0.5))
    s = run.summary
    assert s.requests == 3 and s.output_tokens == 12
    assert FIRST_S * 0.9 < s.ttft_s["p50"] < FIRST_S + 0.1
    assert GAP_S * 0.9 < s.median_tpot_s < GAP_S + 0.03
    assert s.slo_met and s.provenance == "measured"
    sent = {tuple(b["prompt"]): b for b in Handler.bodies}
    assert all(b["stream"] and b["ignore_eos"] and b["temperature"] == 0 and b["model"] == "fake-model"
               for b in sent.values())
    # the second turn resends the first prompt, then 4 stand-in output ids, then its own input
    second = next(p for p in sent if len(p) == 3 + 4 + 1)
    assert second[:3] == (1, 2, 3) and second[-1] == 4


def test_status_says_why_when_nothing_listens():
    model, why = server_status("http://127.0.0.1:9", timeout_s=0.5)
    assert model is None and "no OpenAI-compatible server answers" in why


def test_serve_bench_drives_an_endpoint_beside_the_modelled_prediction(server, tmp_path):
    """`tokprof serve-bench --endpoint URL --gpu h100`: the load generator drives the OpenAI-compatible server at
    each rate (measured, on the client's clock) and the simulator predicts the same workload on the modelled GPU;
    the errors are the prediction's against that server. Without --gpu, stated rates and no prediction."""
    from typer.testing import CliRunner

    from tokprof.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["serve-bench", "--endpoint", server, "--gpu", "h100", "--model", "llama-3.1-8b",
                              "--dtype", "bf16", "--rates", "20", "--requests", "4", "--input-len", "16",
                              "--output-len", "3", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "serve-bench.json").read_text())
    assert doc["mode"] == "endpoint" and doc["endpoint"] == {"url": server, "model": "fake-model"}
    (p,) = doc["points"]
    assert p["measured"]["requests"] == 4 and p["measured"]["provenance"] == "measured"
    assert FIRST_S * 0.9 < p["measured"]["ttft_s"]["p50"] < FIRST_S + 0.2
    assert p["predicted"]["provenance"] == "predicted" and set(p["errors"]) == {"throughput", "median_tpot",
                                                                                "p90_ttft"}
    assert "causes_measured" not in p  # an external server has no per-step record
    assert doc["validation"]["against"] == f"the server at {server} (model fake-model)"
    res = runner.invoke(app, ["serve-bench", "--endpoint", server, "--rates", "20", "--requests", "2",
                              "--input-len", "8", "--output-len", "2", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "b" / "serve-bench.json").read_text())
    assert "predicted" not in doc["points"][0] and doc["slo_search"]["max_rate_per_s"] is None
    assert "--gpu" in doc["slo_search"]["reason"]
    res = runner.invoke(app, ["serve-bench", "--endpoint", server, "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "--rates" in res.output  # no rates and nothing to estimate a capacity with
    res = runner.invoke(app, ["serve-bench", "--endpoint", "http://127.0.0.1:9", "--rates", "1",
                              "-o", str(tmp_path / "d")])
    assert res.exit_code == 2 and "no OpenAI-compatible server answers" in res.output
