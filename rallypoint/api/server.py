"""The ASGI app both HTTP servers start from, and uvicorn running it beside other work.

``base_app`` gives a FastAPI app whose every error is OpenAI-shaped (a validation error names the
field, an unknown route says which), that refuses bodies over 1 MiB with 413, and that checks the
API key (``Authorization: Bearer <key>``) on every route but ``/health`` when one is configured.
``ServerThread`` binds the socket itself (so a port that is taken fails at once, in the caller)
and runs uvicorn on its own thread and event loop.
"""

from __future__ import annotations

import hmac
import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from rallypoint.api.responses import error_body
from rallypoint.api.schema import field_error
from rallypoint.api.sockets import listen

MAX_BODY = 1 << 20
OPEN_PATHS = frozenset({"/health"})


def error(status: int, message: str, headers: dict[str, str] | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


class _Guard:
    """Pure ASGI middleware: body size limit and API key, before any route runs."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                why = "no API key given (Authorization: Bearer <key>)" if not given else "incorrect API key"
                return await error(401, why, {"WWW-Authenticate": "Bearer"}, code="invalid_api_key")(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            return await error(413, f"request body over {MAX_BODY >> 20} MiB")(scope, receive, send)
        await self.app(scope, receive, send)


def base_app(title: str, api_key: str | None = None) -> FastAPI:
    """A FastAPI app with OpenAI-shaped errors, the body limit and the optional API key."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, field_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error(404, f"no such endpoint: {request.method} {request.url.path}")
        if exc.status_code == 405:
            return error(405, f"method {request.method} not allowed on {request.url.path}")
        return error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    app.add_middleware(_Guard, api_key=api_key or None)
    return app


class ServerThread:
    """uvicorn serving ``app`` on ``host:port`` (0: a free port), or on a listening ``sock`` made
    elsewhere, from a thread of its own.

    Raises:
        OSError: the address cannot be bound (at construction, not later in the thread).
    """

    def __init__(self, app: Any, host: str, port: int, name: str, backlog: int = 4096,
                 sock: socket.socket | None = None) -> None:
        self.sock = sock if sock is not None else listen(host, port, backlog)
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", backlog=backlog,
                                timeout_keep_alive=30, timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])  # on uvloop when it is installed

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout: float = 10.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
