"""rallyd's OpenAI-compatible front door: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models`` and ``/health``.

Clients talk to the gateway of any node rather than to a replica's driver: the gateway forwards
each request to a serving driver (``routes``) and, if that driver dies mid-request, resumes it on
the next one (``resume``), so the client's stream goes on with the same tokens under one id.
Only the gateway's own death ends a client's connection; ``gateway.client`` then resumes on
another node's gateway. It is one asyncio event loop (uvicorn) with one upstream stream per
request: a thousand waiting clients cost a thousand sockets, not a thousand threads.
"""

from __future__ import annotations

import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rallypoint.api import bearer
from rallypoint.api import responses as oa
from rallypoint.api.schema import ChatCompletionRequest, CompletionRequest
from rallypoint.api.server import ServerThread, base_app, error
from rallypoint.gateway.resume import (
    HEARTBEAT,
    NoUpstream,
    Progress,
    RequestRejected,
    stream_completion,
    upstream_client,
)
from rallypoint.gateway.routes import UpstreamWatch
from rallypoint.log import get_logger

log = get_logger("gateway")
HEARTBEAT_EVERY = 2.0  # seconds without a chunk before a client's stream gets an SSE comment


class Gateway(ServerThread):
    """The gateway's HTTP server: on a thread of rallyd, or the main loop of a gateway process
    (``child``, several sharing one port, when ``[gateway] processes`` asks for them).

    Args:
        upstreams: the serving drivers' URLs, best first (``routes.DriverRoutes``; never blocks).
        resume_timeout: how long a request may wait for a serving driver (seconds without a token).
        model: the name the deployment serves its checkpoint under (``/v1/models``).
        api_key: required of clients (``Authorization: Bearer``) on every route but ``/health``,
            and sent to the drivers, which require it too.
        on_request: called with each request's outcome (completed, rejected, failed, unavailable).
        on_resume: called each time a request is re-sent to another driver.

        sock: a listening socket to serve on instead of binding ``host:port``.
        started_at: when the deployment's gateway started (``/v1/models``' ``created``).

    Raises:
        OSError: ``host:port`` cannot be bound.
    """

    def __init__(self, host: str, port: int, upstreams: Callable[[], list[str]], resume_timeout: float,
                 model: str = "rallypoint", api_key: str | None = None,
                 on_request: Callable[[str], None] = lambda _: None,
                 on_resume: Callable[[], None] = lambda: None, sock: socket.socket | None = None,
                 started_at: float | None = None) -> None:
        self.upstreams, self.resume_timeout, self.model = upstreams, resume_timeout, model
        self.api_key = api_key or None
        self.on_request, self.on_resume = on_request, on_resume
        self.started_at = started_at or time.time()
        # made now: a client's first use builds its TLS context (~40 ms), which would land on the
        # first request's TTFT
        self.http: httpx.AsyncClient | None = upstream_client()
        self.watch = UpstreamWatch(upstreams)
        super().__init__(build_app(self), host, port, name="rallyd-gateway", sock=sock)

    def serve_in_thread(self) -> Gateway:
        return self.start()  # type: ignore[return-value]

    def client(self) -> httpx.AsyncClient:
        if self.http is None:
            self.http = upstream_client()
        return self.http


def build_app(gw: Gateway) -> FastAPI:
    app = base_app("rallypoint gateway", gw.api_key)

    @app.get("/health")
    async def health() -> JSONResponse:
        drivers = gw.upstreams()
        return JSONResponse({"status": "serving" if drivers else "unavailable", "drivers": drivers},
                            status_code=200 if drivers else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return oa.model_list(gw.model, gw.started_at)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Response:
        return await _forward(gw, oa.COMPLETION, "/v1/completions", body)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await _forward(gw, oa.CHAT, "/v1/chat/completions", body)

    return app


async def _forward(gw: Gateway, kind: str, path: str, body: CompletionRequest | ChatCompletionRequest) -> Response:
    """Send ``body`` to a driver and answer the client, resuming on another driver as needed.

    The request is validated here and again by the driver; the seed is fixed here when the
    client gave none, so a resumed request draws what it would have drawn.
    """
    if body.model is not None and body.model != gw.model:
        return error(404, f"model {body.model!r} does not exist (this deployment serves {gw.model!r})",
                     code="model_not_found")
    sent = body.model_dump(exclude_unset=True, exclude={"stream_options"})
    sent["seed"] = body.seed if body.seed is not None else secrets.randbits(63)
    gid = ("cmpl-" if kind == oa.COMPLETION else "chatcmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    p = Progress()
    chunks = stream_completion(sent, gw.upstreams, gw.resume_timeout, progress=p, path=path,
                               on_resume=lambda url, n: gw.on_resume(), client=gw.client(), headers=bearer(gw.api_key),
                               wait_change=gw.watch.wait, heartbeat=HEARTBEAT_EVERY)
    try:
        first = await anext(chunks, None)
        while first is HEARTBEAT:  # the answer's status comes with its first chunk
            first = await anext(chunks, None)
    except RequestRejected as exc:
        gw.on_request("rejected")
        await chunks.aclose()
        return JSONResponse(exc.body or oa.error_body(exc.status, str(exc)), status_code=exc.status)
    except NoUpstream as exc:
        gw.on_request("unavailable")
        log.error("gateway.request_failed", request=gid, delivered=0, error=str(exc))
        return error(503, str(exc), {"Retry-After": "1"})
    if body.stream:
        return StreamingResponse(_relay(gw, kind, gid, created, body, first, chunks, p),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        async for _ in chunks:
            pass
    except NoUpstream as exc:
        gw.on_request("failed")
        log.error("gateway.request_failed", request=gid, delivered=len(p.tokens), error=str(exc))
        return error(503, str(exc), {"Retry-After": "1"})
    gw.on_request("completed")
    log.debug("gateway.completed", request=gid, tokens=len(p.tokens), resumes=p.resumes)
    return JSONResponse(oa.whole(kind, gid, created, gw.model, p.text, p.tokens, p.finish_reason,
                                 _usage(p), resumes=p.resumes))


def _usage(p: Progress) -> dict[str, int]:
    prompt = int((p.usage or {}).get("prompt_tokens") or 0)
    return oa.usage(prompt, len(p.tokens))


async def _relay(gw: Gateway, kind: str, gid: str, created: int, body: CompletionRequest | ChatCompletionRequest,
                 first: dict[str, Any] | None, chunks: AsyncIterator[dict[str, Any]], p: Progress) -> AsyncIterator[bytes]:
    """The client's event stream: the upstreams' chunks under the gateway's id, one role chunk."""
    role_sent = False
    outcome = "failed"
    try:
        pending = [first] if first is not None else []
        while True:
            if pending:
                chunk = pending.pop()
            else:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
            if chunk is HEARTBEAT:  # its upstream is silent or being replaced: say the stream is alive
                yield oa.KEEPALIVE
                continue
            text, tokens, finish = oa.choice_parts(chunk)
            role = kind == oa.CHAT and not role_sent
            if role or text or tokens or finish:
                yield oa.sse(oa.chunk(kind, gid, created, gw.model, text, tokens, finish, role=role))
                role_sent = role_sent or role
        if body.include_usage:
            yield oa.sse(oa.usage_chunk(kind, gid, created, gw.model, _usage(p)))
        outcome = "completed"
        log.debug("gateway.completed", request=gid, tokens=len(p.tokens), resumes=p.resumes)
    except NoUpstream as exc:
        log.error("gateway.request_failed", request=gid, delivered=len(p.tokens), error=str(exc))
        yield oa.sse({**oa.chunk(kind, gid, created, gw.model, "", [], "error"),
                      "error": oa.error_body(503, str(exc))["error"]})
    except RequestRejected as exc:  # only before anything was delivered, which _forward saw
        yield oa.sse({**oa.chunk(kind, gid, created, gw.model, "", [], "error"), "error": exc.body.get("error")})
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        gw.on_request(outcome)
    yield oa.DONE
