"""The HTTP API of a replica: an OpenAI-style ``/v1/completions`` subset, ``/health``, ``/metrics``.

Malformed requests get a 400 naming the field; a full queue gets 503 with ``Retry-After``;
``/health`` answers 200 only while the replica is really serving. Completions come back whole or
streamed as server-sent events; either way the client sees one uninterrupted completion, also
when a rank failed and the generation was rebuilt under it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rallypoint.http_json import JsonHandler, JsonServer
from rallypoint.log import get_logger
from rallypoint.worker.requests import BadRequest, QueueFull, Request, RequestQueue, SamplingParams

log = get_logger("api")


@dataclass
class Frontend:
    """What the API needs from the replica.

    Attributes:
        queue: where accepted requests go.
        encode, decode: the tokenizer.
        vocab_size: for checking token-id prompts.
        state: returns ("serving" | "recovering" | "starting" | ..., generation).
        max_tokens_limit: the largest ``max_tokens`` accepted (context permitting).
        max_context: prompt + max_tokens must fit.
        eos: the end-of-sequence token id, if the tokenizer has one.
    """

    queue: RequestQueue
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    vocab_size: int
    state: Callable[[], tuple[str, int]]
    model: str = "rallypoint"
    max_tokens_limit: int = 4096
    max_context: int = 2048
    request_timeout: float = 600.0
    eos: int | None = None
    started: float = field(default_factory=time.time)

    def parse(self, body: bytes) -> tuple[Request, bool]:
        """Validate a completion request body; raise ``BadRequest`` naming the bad field."""
        try:
            data = json.loads(body or b"null")
        except ValueError as exc:
            raise BadRequest(f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest("body must be a JSON object")
        prompt = data.get("prompt")
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequest("prompt: must not be empty")
            ids = self.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise BadRequest(f"prompt: token id {bad[0]} outside the vocabulary (0..{self.vocab_size - 1})")
            ids = list(prompt)
        else:
            raise BadRequest("prompt: expected a non-empty string or a non-empty list of token ids")
        max_tokens = _int(data, "max_tokens", 16, 1, self.max_tokens_limit)
        temperature = _num(data, "temperature", 0.0, 0.0, 100.0)
        seed = _int(data, "seed", 0, 0, 2**63 - 1)
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream: expected true or false")
        if len(ids) + max_tokens > self.max_context:
            raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                             f"context of {self.max_context}")
        resume = data.get("resume_tokens", [])
        if not (isinstance(resume, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in resume)):
            raise BadRequest("resume_tokens: expected a list of token ids")
        if len(resume) > max_tokens:
            raise BadRequest(f"resume_tokens: {len(resume)} token(s) are more than max_tokens ({max_tokens})")
        if bad := [t for t in resume if not 0 <= t < self.vocab_size]:
            raise BadRequest(f"resume_tokens: token id {bad[0]} outside the vocabulary (0..{self.vocab_size - 1})")
        unknown = set(data) - {"prompt", "max_tokens", "temperature", "seed", "stream", "model", "n", "user",
                               "resume_tokens"}
        if unknown:
            raise BadRequest(f"unsupported field(s): {', '.join(sorted(unknown))}")
        if data.get("n", 1) != 1:
            raise BadRequest("n: only 1 is supported")
        req = Request(ids, SamplingParams(max_tokens, temperature, seed))
        if resume:
            req.resume_from(resume, self.eos)  # already complete (its driver died before [DONE]): done
        return req, stream

    def completion(self, req: Request, text: str, tokens: list[int], finish: str | None) -> dict[str, Any]:
        return {"id": req.id, "object": "text_completion", "created": int(req.created), "model": self.model,
                "choices": [{"index": 0, "text": text, "token_ids": tokens, "finish_reason": finish}],
                "usage": {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.committed),
                          "total_tokens": len(req.prompt) + len(req.committed)}}

    def metrics(self) -> str:
        """Prometheus text exposition of the replica's counters and gauges."""
        state, gen = self.state()
        q = self.queue
        lines = ["# TYPE rallypoint_generation gauge", f"rallypoint_generation {gen}",
                 "# TYPE rallypoint_serving gauge", f"rallypoint_serving {1 if state == 'serving' else 0}",
                 "# TYPE rallypoint_requests_waiting gauge", f"rallypoint_requests_waiting {q.waiting}",
                 "# TYPE rallypoint_requests_in_flight gauge", f"rallypoint_requests_in_flight {len(q.in_flight)}",
                 "# TYPE rallypoint_requests_total counter"]
        lines += [f'rallypoint_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(q.counts.items())]
        return "\n".join(lines) + "\n"


def _int(data: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    v = data.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f"{name}: expected an integer in {lo}..{hi}, got {v!r}")
    return v


def _num(data: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = data.get(name, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f"{name}: expected a number in {lo:g}..{hi:g}, got {v!r}")
    return float(v)


class _Handler(JsonHandler):
    server: "ApiServer"

    def do_GET(self) -> None:
        fe = self.server.frontend
        if self.path == "/health":
            state, gen = fe.state()
            self.send_body(200 if state == "serving" else 503, {"status": state, "generation": gen,
                                                            "waiting": fe.queue.waiting,
                                                            "in_flight": len(fe.queue.in_flight)})
        elif self.path == "/metrics":
            self.send_body(200, fe.metrics())
        else:
            self.send_error_body(404, f"no such endpoint: GET {self.path}")

    def do_POST(self) -> None:
        fe = self.server.frontend
        if self.path != "/v1/completions":
            return self.send_error_body(404, f"no such endpoint: POST {self.path}")
        body = self.read_body()
        if body is None:
            return
        try:
            req, stream = fe.parse(body)
            if not req.done:
                fe.queue.submit(req)
        except BadRequest as exc:
            return self.send_error_body(400, str(exc))
        except QueueFull as exc:
            return self.send_error_body(503, str(exc), {"Retry-After": f"{max(1, round(exc.retry_after))}"})
        log.info("api.accepted", request=req.id, prompt_tokens=len(req.prompt), stream=stream)
        if stream:
            return self._stream(fe, req)
        if not req.wait(fe.request_timeout):
            return self.send_error_body(504, f"request {req.id} did not finish in {fe.request_timeout:g}s")
        if req.error:
            return self.send_error_body(500, f"request {req.id} failed: {req.error}")
        self.send_body(200, fe.completion(req, fe.decode(req.committed), req.committed, req.finish_reason))

    def _stream(self, fe: Frontend, req: Request) -> None:
        self.start_events()
        text_sent = fe.decode(req.committed) if req.committed else ""  # a resumed request's earlier tokens
        for new in req.stream(fe.request_timeout, start=len(req.committed)):
            text = fe.decode(req.committed)
            delta, text_sent = text[len(text_sent):], text
            self.send_event(fe.completion(req, delta, new, None))
        self.send_event(fe.completion(req, "", [], req.finish_reason or "timeout"))
        self.end_events()


class ApiServer(JsonServer):
    """The replica's HTTP server; ``serve_in_thread`` runs it beside the serving loop."""

    def __init__(self, frontend: Frontend, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.frontend = frontend

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def serve_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="rallypoint-api", daemon=True)
        t.start()
        log.info("api.listening", url=self.url)
        return t
