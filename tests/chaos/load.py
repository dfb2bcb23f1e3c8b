"""A steady stream of requests through the gateways, every answer checked against a failure-free
reference run of the same prompts."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rallypoint.gateway.client import CompletionClient
from rallypoint.gateway.resume import NoUpstream, Progress, RequestRejected

PROMPTS = [f"chaos {i}: sphinx of black quartz, judge my vow" for i in range(8)]


@dataclass
class Outcome:
    prompt: int
    started: float
    finished: float
    tokens: list[int]
    accepted: bool  # the cluster took it (at least one token came back, or it finished)
    error: str | None = None
    resumes: int = 0


@dataclass
class Load:
    """``clients`` threads, each sending one request after another to every gateway in turn."""

    gateways: Callable[[], list[str]]  # the current gateways (a restarted node's moves)
    clients: int = 3
    max_tokens: int = 16
    seed: int = 0
    reference: dict[int, list[int]] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: dict[int, float] = field(default_factory=dict)  # client -> when its current request was sent
    progress: dict[int, Progress] = field(default_factory=dict)  # client -> its current request's progress
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def body(self, i: int) -> dict:
        return {"prompt": PROMPTS[i], "max_tokens": self.max_tokens, "temperature": 0.8, "seed": 1000 + i}

    def make_reference(self) -> None:
        """The failure-free answers (sampled at temperature 0.8, seeded: a resumed request must
        draw exactly what it would have drawn)."""
        client = CompletionClient(self.gateways, timeout=60)
        self.reference = {i: client.complete(self.body(i)).tokens for i in range(len(PROMPTS))}

    def start(self) -> None:
        for c in range(self.clients):
            t = threading.Thread(target=self._run, args=(c,), name=f"chaos-client-{c}", daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, c: int) -> None:
        rng = random.Random(self.seed * 100 + c)

        def gateways() -> list[str]:  # each client starts at a different node
            g = self.gateways()
            return g[c % len(g):] + g[:c % len(g)] if g else g

        client = CompletionClient(gateways, timeout=90, read_timeout=120)
        while not self._stop.is_set():
            i = rng.randrange(len(PROMPTS))
            p = Progress()
            t0 = time.time()
            self.progress[c] = p
            self.in_flight[c] = t0
            error = None
            try:
                for _ in client.stream(self.body(i), p):
                    pass
            except (NoUpstream, RequestRejected) as exc:
                error = f"{type(exc).__name__}: {exc}"
            accepted = bool(p.tokens) or p.finish_reason is not None
            self.outcomes.append(Outcome(i, t0, time.time(), list(p.tokens), accepted, error, p.resumes))
            self.in_flight.pop(c, None)

    def stop(self, timeout: float = 150.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=timeout)
        self._threads.clear()
        self._stop.clear()

    def mid_stream(self) -> int:
        """How many requests have tokens back and are not finished yet."""
        return sum(1 for c, p in list(self.progress.items())
                   if c in self.in_flight and p.tokens and p.finish_reason is None)

    def since(self, t: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.finished >= t]

    def stuck(self, longer_than: float) -> list[float]:
        """How long each request in flight for over ``longer_than`` seconds has been waiting."""
        now = time.time()
        return sorted(now - t0 for t0 in list(self.in_flight.values()) if now - t0 > longer_than)

    def lost(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Accepted but not finished with the reference tokens."""
        return [o for o in outcomes if o.accepted and (o.error or o.tokens != self.reference[o.prompt])]
