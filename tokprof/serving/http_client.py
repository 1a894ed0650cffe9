"""The load generator against an OpenAI-compatible HTTP server on localhost (vLLM's or SGLang's
`/v1/completions`), standard library only, so tokprof's prediction can be set beside a real server's numbers.

    target = HttpTarget("http://127.0.0.1:8000")          # the served model is asked from /v1/models
    run = run_http(workload, target, Slo(2.0, 0.05))       # run.summary: the same ServeSummary as tokprof's server

Each request is one streamed completion (`stream: true`) of the workload's prompt, given as token ids, with
`max_tokens` = the output length, greedy (`temperature: 0`) and `ignore_eos: true` (vLLM and SGLang honour it) so
that every request generates its full length. Every streamed chunk that carries text is one token arrival (both
servers stream one token per chunk); TTFT, TPOT and ITL come from those arrival times on this machine's clock. The
server's own scheduler is a black box: there is no per-step record, so a run has no gap split. Agentic sessions send
the previous prompt plus stand-in ids for the previous output (the output's ids are not returned), so a prefix
cache hits on the previous prompt. One thread per request in flight.

`server_status(url)` says why no server can be driven (not installed, not listening), for skips with a reason.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from tokprof.serving.engine import ServeRun
from tokprof.serving.metrics import Slo, summarize
from tokprof.serving.scheduler import Request
from tokprof.serving.traffic import Driver, Workload

ENGINES = ("vllm", "sglang")


def installed_engines() -> list[str]:
    return [name for name in ENGINES if importlib.util.find_spec(name) is not None]


def _get_json(url: str, timeout_s: float) -> object:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - a localhost URL the user gave
        return json.loads(resp.read().decode())


def server_status(base_url: str, timeout_s: float = 2.0) -> tuple[str | None, str | None]:
    """(served model id, None) when an OpenAI-compatible server answers at base_url, else (None, why not)."""
    try:
        models = _get_json(base_url.rstrip("/") + "/v1/models", timeout_s)
    except (urllib.error.URLError, OSError, ValueError) as err:
        engines = installed_engines()
        have = f"installed here: {', '.join(engines)}" if engines else "neither vllm nor sglang is installed here"
        return None, f"no OpenAI-compatible server answers at {base_url} ({err}); {have}"
    data = models.get("data") if isinstance(models, dict) else None
    if not data or not isinstance(data, list) or "id" not in data[0]:
        return None, f"{base_url}/v1/models lists no model"
    return str(data[0]["id"]), None


@dataclass
class HttpTarget:
    base_url: str
    model: str | None = None  # None: the first model /v1/models lists
    timeout_s: float = 600.0

    def resolve(self) -> str:
        if self.model is None:
            model, why = server_status(self.base_url)
            if model is None:
                raise RuntimeError(why)
            self.model = model
        return self.model


def _stream(target: HttpTarget, req: Request, now: Callable[[], float]) -> None:
    """Send one request and record its token times on `req` (first_token_s, token_times_s, finish_s, output)."""
    body = json.dumps({"model": target.model, "prompt": req.prompt, "max_tokens": req.max_new_tokens,
                       "temperature": 0, "stream": True, "ignore_eos": True}).encode()
    http_req = urllib.request.Request(target.base_url.rstrip("/") + "/v1/completions", data=body,
                                      headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(http_req, timeout=target.timeout_s) as resp:  # noqa: S310 - localhost
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            choices = chunk.get("choices") or []
            if choices and choices[0].get("text"):
                t = now()
                req.token_times_s.append(t)
                req.output.append(len(req.output) % 1000)  # stand-in id: the server returns text
                if req.first_token_s is None:
                    req.first_token_s = t
    req.finish_s = req.token_times_s[-1] if req.token_times_s else now()


def run_http(workload: Workload, target: HttpTarget, slo: Slo) -> ServeRun:
    """Drive the server with the workload in real time; the summary is "measured" on this machine's clock."""
    target.resolve()
    driver = Driver(workload)
    done: queue.Queue[tuple[Request, BaseException | None]] = queue.Queue()
    t0 = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - t0

    def worker(req: Request) -> None:
        try:
            _stream(target, req, now)
            done.put((req, None))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
            done.put((req, err))

    finished: list[Request] = []
    in_flight = 0
    while not driver.exhausted:
        for req in driver.due(now()):
            threading.Thread(target=worker, args=(req,), daemon=True).start()
            in_flight += 1
        nxt = driver.next_arrival_s
        wait = None if nxt is None else max(0.0, nxt - now())
        if in_flight == 0 and wait is not None:
            time.sleep(wait)
            continue
        try:
            req, err = done.get(timeout=wait)
        except queue.Empty:
            continue
        in_flight -= 1
        if err is not None:
            raise RuntimeError(f"request {req.request_id} to {target.base_url}: {err}") from err
        if not req.output:
            raise RuntimeError(f"request {req.request_id} to {target.base_url}: no token streamed back")
        finished.append(req)
        driver.finished(req)
    summary = summarize(finished, [], slo, provenance="measured",
                        energy_reason="an external server: energy not metered by the load generator")
    summary.notes.append(f"OpenAI-compatible server at {target.base_url}, model {target.model}; latencies on the "
                         "client's clock, no per-step record")
    return ServeRun(summary, finished, [])
