"""What arrives when: sessions of turns, and the driver that turns them into requests over time.

One model covers every mode of the load generator:
- open loop at a request rate (Poisson or a trace): one single-turn session per request, starting at its arrival;
- fixed concurrency: one session per client, each turn released when the client's previous turn finished;
- agentic multi-turn: a session's turn k + 1 is released `think_s` after turn k finished, its prompt being the whole
  context so far (previous prompt + previous output) plus the new input, so with prefix caching it hits.
The driver is clock-agnostic: the server calls it with wall-clock seconds since the start, the simulator with its
virtual clock, so both see the same arrivals for the same completions.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from tokprof.serving.scheduler import Request


@dataclass
class Turn:
    input_tokens: list[int]  # new input of the turn (the whole prompt unless the session reuses its context)
    output_tokens: int  # tokens generated (max_new_tokens; no early stop)


@dataclass
class Session:
    start_s: float  # when the first turn arrives
    turns: list[Turn]
    reuse_context: bool = False  # agentic: each prompt = previous prompt + previous output + this turn's input
    think_s: float = 0.0  # between a turn's finish and the next turn's arrival


@dataclass
class Workload:
    sessions: list[Session]
    description: str = ""
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


class Driver:
    """Releases the requests of a workload: `due(now_s)` returns those that have arrived by `now_s`;
    `finished(request)` schedules the session's next turn."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self._heap: list[tuple[float, int, int]] = []  # (arrival_s, session, turn)
        self._next_id = 0
        self._context: dict[int, list[int]] = {}  # session -> context after its last finished turn
        for index, session in enumerate(workload.sessions):
            if session.turns:
                heapq.heappush(self._heap, (session.start_s, index, 0))
        self._outstanding = 0

    @property
    def next_arrival_s(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    @property
    def exhausted(self) -> bool:
        """No request left to release, now or later."""
        return not self._heap and self._outstanding == 0

    def due(self, now_s: float) -> list[Request]:
        out = []
        while self._heap and self._heap[0][0] <= now_s:
            arrival, s_index, t_index = heapq.heappop(self._heap)
            session = self.workload.sessions[s_index]
            turn = session.turns[t_index]
            prompt = (self._context.get(s_index, []) + turn.input_tokens if session.reuse_context
                      else list(turn.input_tokens))
            out.append(Request(request_id=self._next_id, prompt=prompt, max_new_tokens=turn.output_tokens,
                               arrival_s=arrival, session=s_index, turn=t_index))
            self._next_id += 1
            self._outstanding += 1
        return out

    def finished(self, request: Request) -> None:
        self._outstanding -= 1
        session = self.workload.sessions[request.session]
        if session.reuse_context:
            self._context[request.session] = request.prompt + request.output
        nxt = request.turn + 1
        if nxt < len(session.turns):
            heapq.heappush(self._heap, (request.finish_s + session.think_s, request.session, nxt))
