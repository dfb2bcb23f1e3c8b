"""The HTTP API of a replica's driver: OpenAI ``/v1/completions``, ``/v1/chat/completions`` and
``/v1/models``, plus ``/health`` and ``/metrics``.

Malformed requests get a 400 naming the field; a full queue or a draining replica gets 503 with
``Retry-After``; ``/health`` answers 200 only while the replica is really serving. Answers come
whole or streamed as server-sent events; either way the client sees one uninterrupted
completion, also when a rank failed and the generation was rebuilt under it. Waiting requests
cost no thread: the driver's thread wakes the event loop when it commits tokens.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rallypoint.api import responses as oa
from rallypoint.api.schema import ChatCompletionRequest, CompletionRequest
from rallypoint.api.server import ServerThread, base_app, error
from rallypoint.api.text import TextStream
from rallypoint.log import get_logger
from rallypoint.worker.requests import BadRequest, QueueFull, Request, SamplingParams
from rallypoint.worker.tokenizer import ChatTemplateError, NoChatTemplate, Tokenizer

log = get_logger("api")


class Admission(Protocol):
    """Where the API puts requests: the driver's ``RequestQueue`` (API on a thread of the driver)
    or the API process's mirror of it (``api_process.MirrorQueue``, which waits for the driver's
    answer: a full or draining queue is a 503 whichever process sees it first)."""

    async def submit_async(self, req: Request) -> Request: ...

    @property
    def closed(self) -> str | None: ...

    @property
    def waiting(self) -> int: ...

    @property
    def running(self) -> int: ...

    @property
    def counts(self) -> dict[str, int]: ...


@dataclass
class Frontend:
    """What the API needs from the replica.

    Attributes:
        queue: where accepted requests go.
        tokenizer: the checkpoint's tokenizer.
        vocab_size: for checking token-id prompts.
        state: returns ("serving" | "recovering" | "starting" | ..., generation).
        model: the name it serves the checkpoint under (``/v1/models``).
        max_tokens_limit: the largest ``max_tokens`` accepted (context permitting).
        max_context: prompt + max_tokens must fit.
        request_timeout: a request that has not finished by then ends with finish reason "timeout".
        stream_interval: after a streamed chunk, wait this long before the next (its tokens
            accumulate meanwhile): fewer, larger chunks when many streams run; 0 sends each
            step's tokens at once. The first token is never held.
        max_chunk_rate: the chunks per second all this replica's streams together should not
            exceed: with ``n`` streams open, a stream waits at least ``n / max_chunk_rate`` after a
            chunk. Each chunk costs the API's one thread (and the gateway's) the same whatever its
            tokens, so past a few dozen streams per-step chunks would make the HTTP path, not the
            GPU, the limit; under that load a chunk carries the tokens of several steps instead.
            One stream alone is never held. 0: off.
        keepalive: a stream that has had no token for this long gets an SSE comment, so the
            gateway can hold a short read timeout: silence longer than a few of these means the
            driver or the path to it is gone (a partition drops packets without a word).
    """

    queue: Admission
    tokenizer: Tokenizer
    vocab_size: int
    state: Callable[[], tuple[str, int]]
    model: str = "rallypoint"
    max_tokens_limit: int = 4096
    max_context: int = 2048
    request_timeout: float = 600.0
    stream_interval: float = 0.0
    max_chunk_rate: float = 0.0
    keepalive: float = 2.0
    started: float = field(default_factory=time.time)
    streams: int = 0  # streamed responses open now (touched only on the API's event loop)

    def hold(self) -> float:
        """Seconds a stream waits after a chunk: ``stream_interval``, or longer under load
        (``max_chunk_rate``); waits under a millisecond are skipped (a timer costs more)."""
        wait = max(self.stream_interval, self.streams / self.max_chunk_rate if self.max_chunk_rate else 0.0)
        return wait if wait >= 0.001 else 0.0

    # -- admission -----------------------------------------------------------------------------

    def prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
        """The prompt as token ids: text through the tokenizer (its special tokens, e.g. BOS,
        included), token ids checked against the vocabulary, chat messages through the template."""
        if isinstance(body, ChatCompletionRequest):
            try:
                return self.tokenizer.encode_chat(body.template_messages(), body.add_generation_prompt)
            except (NoChatTemplate, ChatTemplateError) as exc:
                raise BadRequest(f"messages: {exc}") from None
        if isinstance(body.prompt, str):
            return self.tokenizer.encode(body.prompt)
        return self._in_vocabulary("prompt", body.prompt)

    def _in_vocabulary(self, field: str, ids: list[int]) -> list[int]:
        if bad := [t for t in ids if not 0 <= t < self.vocab_size]:
            raise BadRequest(f"{field}: token id {bad[0]} outside the vocabulary (0..{self.vocab_size - 1})")
        return list(ids)

    async def admit(self, body: CompletionRequest | ChatCompletionRequest) -> Request:
        """A ``Request`` for ``body``, queued unless the tokens it resumes from already finish it.

        Raises:
            BadRequest: the model name, a token id or the length is wrong (the message says which).
            QueueFull: the queue is full or the replica is draining.
        """
        if body.model is not None and body.model != self.model:
            raise BadRequest(f"model: {body.model!r} is not served here (this deployment serves {self.model!r})")
        ids = self.prompt_ids(body)
        room = self.max_context - len(ids)
        if room < 1:
            raise BadRequest(f"prompt: {len(ids)} tokens leave no room in the context of {self.max_context}")
        max_tokens = body.max_tokens if body.max_tokens is not None else min(room, self.max_tokens_limit)
        if max_tokens > self.max_tokens_limit:
            raise BadRequest(f"max_tokens: {max_tokens} is over the limit of {self.max_tokens_limit}")
        if len(ids) + max_tokens > self.max_context:
            raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                             f"context of {self.max_context}")
        self._in_vocabulary("resume_tokens", body.resume_tokens)
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        req = Request(ids, SamplingParams(max_tokens, body.temperature, seed, top_p=body.top_p),
                      eos=self.tokenizer.eos_ids)
        if body.resume_tokens:
            req.resume_from(body.resume_tokens)  # already complete (its driver died before [DONE]): done
        req.kv_to, req.kv_gen = body.kv_to, body.kv_gen or 0
        if not req.done:
            await self.queue.submit_async(req)
        return req

    # -- answering -----------------------------------------------------------------------------

    async def deltas(self, req: Request, text: TextStream, start: int) -> AsyncIterator[tuple[str, list[int], str | None]]:
        """(text delta, new token ids, finish reason or None) as the request's tokens commit,
        from its ``start``-th generated token (the tokens it resumed from came before).

        A stop string ends the request (finish reason "stop"); so does the request timeout
        ("timeout"). The client going away (the generator closed early) cancels it, so its row
        is freed at the next step.
        """
        generated = list(req.committed[:start])
        try:
            async for new in req.stream_async(self.request_timeout, start=len(generated), idle=self.keepalive):
                if not new:  # a heartbeat: the stream is alive, nothing committed
                    yield "", [], None
                    continue
                generated += new
                delta = text.push(generated)
                if text.stopped:
                    req.cancel("stop")
                    yield delta, new, "stop"
                    return
                yield delta, new, None
            if not req.done:
                req.cancel("timeout")
            yield text.push(generated, final=True), [], req.finish_reason
        finally:
            if not req.done:
                req.cancel("abandoned")

    def metrics(self) -> bytes:
        """Prometheus text exposition of the replica's counters and gauges."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ReplicaCollector(self))
        return generate_latest(registry)


class _ReplicaCollector:
    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    def collect(self) -> Any:
        state, gen = self.fe.state()
        q = self.fe.queue
        yield GaugeMetricFamily("rallypoint_generation", "generation this replica serves", value=gen)
        yield GaugeMetricFamily("rallypoint_serving", "1 while the replica serves", value=1 if state == "serving" else 0)
        yield GaugeMetricFamily("rallypoint_requests_waiting", "requests queued", value=q.waiting)
        yield GaugeMetricFamily("rallypoint_requests_in_flight", "requests being generated", value=q.running)
        total = CounterMetricFamily("rallypoint_requests", "requests by outcome", labels=["outcome"])
        for outcome, n in sorted(q.counts.items()):
            total.add_metric([outcome], n)
        yield total


def build_app(fe: Frontend, api_key: str | None = None) -> FastAPI:
    """The replica's routes over ``fe``."""
    app = base_app("rallypoint replica", api_key)

    @app.get("/health")
    async def health() -> JSONResponse:
        state, gen = fe.state()
        return JSONResponse({"status": state, "generation": gen, "waiting": fe.queue.waiting,
                             "in_flight": fe.queue.running}, status_code=200 if state == "serving" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(fe.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return oa.model_list(fe.model, fe.started)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Response:
        return await _answer(fe, oa.COMPLETION, body)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await _answer(fe, oa.CHAT, body)

    return app


async def _answer(fe: Frontend, kind: str, body: CompletionRequest | ChatCompletionRequest) -> Response:
    try:
        req = await fe.admit(body)
    except BadRequest as exc:
        return error(400, str(exc))
    except QueueFull as exc:
        return error(503, str(exc), {"Retry-After": f"{max(1, round(exc.retry_after))}"})
    log.debug("api.accepted", request=req.id, prompt_tokens=len(req.prompt), stream=body.stream)
    resumed = list(body.resume_tokens)
    text = TextStream(fe.tokenizer.decode, body.stop_strings,
                      sent=body.resume_text if body.resume_text is not None else fe.tokenizer.decode(resumed),
                      resumed=resumed)
    rid = req.id if kind == oa.COMPLETION else "chat" + req.id
    created = int(req.created)
    if body.stream:
        return StreamingResponse(_events(fe, kind, body, req, rid, text, created), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    parts, tokens, finish = [], list(resumed), None
    async for delta, new, finish in fe.deltas(req, text, len(resumed)):  # noqa: B007 (the last one is read below)
        parts.append(delta)
        tokens += new
    if req.error:
        return error(500, f"request {req.id} failed: {req.error}")
    if finish == "timeout":
        return error(504, f"request {req.id} did not finish in {fe.request_timeout:g}s")
    full = fe.tokenizer.decode(resumed) if body.resume_text is None else body.resume_text
    return JSONResponse(oa.whole(kind, rid, created, fe.model, full + "".join(parts), tokens, finish,
                                 oa.usage(len(req.prompt), len(tokens))))


async def _events(fe: Frontend, kind: str, body: CompletionRequest | ChatCompletionRequest, req: Request,
                  rid: str, text: TextStream, created: int) -> AsyncIterator[bytes]:
    completion = len(body.resume_tokens)
    if kind == oa.CHAT and not body.resume_tokens:
        yield oa.sse(oa.chunk(kind, rid, created, fe.model, "", [], None, role=True))
    fe.streams += 1
    try:
        async for delta, new, finish in fe.deltas(req, text, completion):
            completion += len(new)
            if delta or new or finish:
                yield oa.sse(oa.chunk(kind, rid, created, fe.model, delta, new, finish))
            else:  # a heartbeat (an SSE comment): a reader can tell a silent stream from a lost one
                yield oa.KEEPALIVE
            if not finish and completion > len(body.resume_tokens) and (wait := fe.hold()):
                await asyncio.sleep(wait)  # the tokens of the next steps go out together
    finally:
        fe.streams -= 1
    if body.include_usage:
        yield oa.sse(oa.usage_chunk(kind, rid, created, fe.model, oa.usage(len(req.prompt), completion)))
    yield oa.DONE


class ApiServer(ServerThread):
    """The replica's HTTP server, on a thread beside the serving loop."""

    def __init__(self, frontend: Frontend, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, sock: socket.socket | None = None) -> None:
        self.frontend = frontend
        super().__init__(build_app(frontend, api_key), host, port, name="rallypoint-api", sock=sock)

    def serve_in_thread(self) -> ApiServer:
        self.start()
        log.info("api.listening", url=self.url)
        return self
