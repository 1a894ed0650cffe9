"""Synthetic workloads (seeded, generated locally) and replayed traces, as `traffic.Workload`s.

Lengths: a spec string
    "128"                 fixed
    "uniform:64:256"      uniform integers in [64, 256]
    "lognormal:128:0.5"   lognormal with mean 128 and coefficient of variation 0.5, rounded, at least 1
Arrivals: Poisson at a request rate (exponential gaps, mean 1/rate), or all at once for a fixed concurrency.
Token ids are uniform over [0, vocab_size) from the same seed: the served model's outputs do not change the schedule
(no stop tokens: every request generates its output length), so any ids exercise the same work.

Trace files, one JSON object per line (JSONL):
    {"arrival_s": 0.0, "input_len": 120, "output_len": 32}
    {"arrival_s": 0.4, "input_len": 80, "output_len": 16, "session": "a"}
    {"input_len": 30, "output_len": 16, "session": "a", "think_s": 0.5}
`arrival_s` (seconds from the start, required on a session's first line), `input_len` and `output_len` (tokens,
>= 1) are required; lines that share a `session` are the turns of one agentic session in file order: each later
turn arrives `think_s` (default 0) after the previous one finished, its prompt the whole context so far plus
`input_len` new tokens. Blank lines and lines starting with # are skipped.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokprof.serving.traffic import Session, Turn, Workload


@dataclass(frozen=True)
class LengthDist:
    kind: str  # "fixed" | "uniform" | "lognormal"
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, name: str, spec: str | int) -> LengthDist:
        text = str(spec).strip()
        parts = text.split(":")
        bad = ValueError(f"{name}: expected N, uniform:LO:HI or lognormal:MEAN:CV (tokens, >= 1), got {spec!r}")
        try:
            if len(parts) == 1:
                dist = cls("fixed", float(int(parts[0])))
            elif parts[0] == "uniform" and len(parts) == 3:
                dist = cls("uniform", float(int(parts[1])), float(int(parts[2])))
            elif parts[0] == "lognormal" and len(parts) == 3:
                dist = cls("lognormal", float(parts[1]), float(parts[2]))
            else:
                raise bad
        except ValueError as err:
            raise bad from err
        if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a) or (dist.kind == "lognormal" and
                                                                         not 0 <= dist.b < 10):
            raise bad
        return dist

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        # lognormal with mean a and CV b: sigma^2 = ln(1 + cv^2), mu = ln(mean) - sigma^2 / 2
        sigma2 = math.log1p(self.b**2)
        return max(1, round(rng.lognormvariate(math.log(self.a) - sigma2 / 2, math.sqrt(sigma2))))

    @property
    def mean(self) -> float:
        return self.a if self.kind != "uniform" else (self.a + self.b) / 2

    @property
    def upper(self) -> int:
        """A length that bounds the samples (for the lognormal, mean x (1 + 6 CV), rarely passed)."""
        if self.kind == "uniform":
            return int(self.b)
        return int(self.a) if self.kind == "fixed" else math.ceil(self.a * (1 + 6 * self.b))

    def describe(self) -> str:
        return {"fixed": f"{self.a:g}", "uniform": f"uniform {self.a:g}-{self.b:g}",
                "lognormal": f"lognormal mean {self.a:g} CV {self.b:g}"}[self.kind]


def _ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    """n token ids, uniform over the vocabulary, from a NumPy generator seeded by `rng` (fast for long prompts)."""
    return np.random.default_rng(rng.getrandbits(63)).integers(0, vocab_size, n).tolist()


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def poisson_arrivals(rate_per_s: float, n: int, rng: random.Random) -> list[float]:
    """n arrival times (s) of a Poisson process at `rate_per_s`, the first at its first gap."""
    rate = _check_positive("rate_per_s", rate_per_s)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def poisson(rate_per_s: float, num_requests: int, input_len: LengthDist, output_len: LengthDist, *,
            vocab_size: int, seed: int = 0) -> Workload:
    """Open loop: single-turn requests arriving as a Poisson process."""
    rng = random.Random(seed)
    arrivals = poisson_arrivals(rate_per_s, num_requests, rng)
    sessions = [Session(start_s=t, turns=[Turn(_ids(rng, input_len.sample(rng), vocab_size),
                                               output_len.sample(rng))]) for t in arrivals]
    return Workload(sessions, f"Poisson {rate_per_s:g} req/s, {num_requests} requests, input "
                    f"{input_len.describe()}, output {output_len.describe()}, seed {seed}",
                    {"mode": "poisson", "rate_per_s": rate_per_s, "seed": seed})


def concurrency(clients: int, num_requests: int, input_len: LengthDist, output_len: LengthDist, *,
                vocab_size: int, seed: int = 0) -> Workload:
    """Closed loop: `clients` users, each sending its next request when the previous one finished."""
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients: expected a positive int, got {clients!r}")
    rng = random.Random(seed)
    per = [num_requests // clients + (1 if i < num_requests % clients else 0) for i in range(clients)]
    sessions = [Session(0.0, [Turn(_ids(rng, input_len.sample(rng), vocab_size), output_len.sample(rng))
                              for _ in range(k)]) for k in per if k]
    return Workload(sessions, f"{clients} concurrent clients, {num_requests} requests, input "
                    f"{input_len.describe()}, output {output_len.describe()}, seed {seed}",
                    {"mode": "concurrency", "clients": clients, "seed": seed})


def agentic(rate_per_s: float, num_sessions: int, turns: int, first_input: LengthDist, turn_input: LengthDist,
            output_len: LengthDist, *, vocab_size: int, think_s: float = 0.0, seed: int = 0) -> Workload:
    """Multi-turn sessions starting as a Poisson process; each turn's prompt is the whole context so far plus new
    input (a tool result, the user's next message), so a prefix cache serves every turn after the first."""
    if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
        raise ValueError(f"turns: expected a positive int, got {turns!r}")
    rng = random.Random(seed)
    starts = poisson_arrivals(rate_per_s, num_sessions, rng)
    sessions = []
    for start in starts:
        ts = [Turn(_ids(rng, (first_input if k == 0 else turn_input).sample(rng), vocab_size), output_len.sample(rng))
              for k in range(turns)]
        sessions.append(Session(start, ts, reuse_context=True, think_s=think_s))
    return Workload(sessions, f"agentic: {num_sessions} sessions of {turns} turns at {rate_per_s:g} sessions/s, first "
                    f"input {first_input.describe()}, then {turn_input.describe()} per turn, output "
                    f"{output_len.describe()}, think {think_s:g} s, seed {seed}",
                    {"mode": "agentic", "rate_per_s": rate_per_s, "turns": turns, "seed": seed})


def read_trace(path: str | Path, *, vocab_size: int, seed: int = 0) -> Workload:
    """A JSONL trace (format in the module docstring) as a workload; token ids drawn from `seed`."""
    rng = random.Random(seed)
    sessions: dict[str, Session] = {}
    order: list[Session] = []
    where = str(path)
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ValueError(f"trace: cannot read {where}: {err.strerror or err}") from err
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"trace: {where} line {number}: not JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise ValueError(f"trace: {where} line {number}: expected a JSON object, got {type(row).__name__}")
        turn = Turn(_ids(rng, _trace_len(row, "input_len", where, number), vocab_size),
                    _trace_len(row, "output_len", where, number))
        key = row.get("session")
        session = sessions.get(str(key)) if key is not None else None
        if session is None:
            arrival = row.get("arrival_s")
            if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not math.isfinite(arrival) \
                    or arrival < 0:
                raise ValueError(f"trace: {where} line {number}: arrival_s expected a number >= 0 (seconds from the "
                                 f"start) on a session's first line, got {arrival!r}")
            session = Session(float(arrival), [turn], reuse_context=key is not None)
            order.append(session)
            if key is not None:
                sessions[str(key)] = session
        else:
            think = row.get("think_s", 0.0)
            if isinstance(think, bool) or not isinstance(think, (int, float)) or think < 0:
                raise ValueError(f"trace: {where} line {number}: think_s expected a number >= 0, got {think!r}")
            session.think_s = float(think)
            session.turns.append(turn)
    if not order:
        raise ValueError(f"trace: {where} holds no request")
    return Workload(order, f"trace {Path(path).name}: {sum(len(s.turns) for s in order)} requests in {len(order)} "
                    f"sessions, seed {seed}", {"mode": "trace", "path": where, "seed": seed})


def _trace_len(row: dict, key: str, where: str, number: int) -> int:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"trace: {where} line {number}: {key} expected an int >= 1 (tokens), got {value!r}")
    return value
