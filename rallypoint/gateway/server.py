"""rallyd's completions API: ``POST /v1/completions`` (whole or streamed), ``GET /health``.

Clients talk to the gateway of any node rather than to a replica's driver: the gateway forwards
the request to a serving driver (``routes``) and, if that driver dies mid-request, resumes it on
the next one (``resume``), so the client's stream goes on with the same tokens. Only the gateway's
own death ends a client's connection; ``gateway.client`` then resumes on another node's gateway.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rallypoint.gateway.resume import NoUpstream, Progress, RequestRejected, stream_completion
from rallypoint.log import get_logger

log = get_logger("gateway")

MAX_BODY = 1 << 20


class Gateway(ThreadingHTTPServer):
    """The HTTP server; one thread per client request.

    Args:
        upstreams: the serving drivers' URLs, best first (``routes.DriverRoutes``).
        resume_timeout: how long a request may wait for a serving driver (seconds without a token).
        on_request: called with each request's outcome (completed, rejected, failed, unavailable).
        on_resume: called each time a request is re-sent to another driver.
    """

    daemon_threads = True

    def __init__(self, host: str, port: int, upstreams: Callable[[], list[str]], resume_timeout: float,
                 on_request: Callable[[str], None] = lambda _: None,
                 on_resume: Callable[[], None] = lambda: None) -> None:
        super().__init__((host, port), _Handler)
        self.upstreams, self.resume_timeout = upstreams, resume_timeout
        self.on_request, self.on_resume = on_request, on_resume

    @property
    def port(self) -> int:
        return self.server_address[1]

    def serve_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="rallyd-gateway", daemon=True)
        t.start()
        return t


def _chunk_of(gid: str, created: int, model: str, text: str, tokens: list[int], finish: str | None,
              **extra: Any) -> dict[str, Any]:
    return {"id": gid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "token_ids": tokens, "finish_reason": finish}], **extra}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Gateway

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "unavailable"
        self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def do_GET(self) -> None:
        if self.path == "/health":
            drivers = self.server.upstreams()
            self._send(200 if drivers else 503, {"status": "serving" if drivers else "unavailable",
                                                 "drivers": drivers})
        else:
            self._error(404, f"no such endpoint: GET {self.path}")

    def do_POST(self) -> None:
        if self.path != "/v1/completions":
            return self._error(404, f"no such endpoint: POST {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._error(413, "request body over 1 MiB")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except ValueError as exc:
            return self._error(400, f"body is not JSON: {exc}")
        if not isinstance(body, dict):
            return self._error(400, "body must be a JSON object")
        stream = body.get("stream", False)
        gid = "cmpl-" + uuid.uuid4().hex[:16]
        p = Progress()
        chunks = stream_completion(body, self.server.upstreams, self.server.resume_timeout, progress=p,
                                   on_resume=lambda url, n: self.server.on_resume())
        started = False
        created, model = int(time.time()), str(body.get("model") or "rallypoint")
        usage: dict[str, Any] = {}
        try:
            for chunk in chunks:
                model, usage = chunk.get("model", model), chunk.get("usage") or usage
                if stream:
                    if not started:
                        self._start_stream()
                        started = True
                    c = chunk["choices"][0]
                    self._chunk(_chunk_of(gid, created, model, c.get("text", ""), c.get("token_ids", []),
                                          c.get("finish_reason"), usage=chunk.get("usage")))
        except RequestRejected as exc:
            self.server.on_request("rejected")
            return self._send(exc.status, exc.body or {"error": {"message": str(exc), "code": exc.status}})
        except NoUpstream as exc:
            self.server.on_request("unavailable" if not p.tokens else "failed")
            log.error("gateway.request_failed", request=gid, delivered=len(p.tokens), error=str(exc))
            if not started:
                return self._error(503, str(exc), {"Retry-After": "1"})
            self._chunk(_chunk_of(gid, created, model, "", [], "error", error={"message": str(exc)}))
            return self._end_stream()
        except OSError:
            self.server.on_request("failed")  # the client went away
            return
        self.server.on_request("completed")
        log.info("gateway.completed", request=gid, tokens=len(p.tokens), resumes=p.resumes)
        if stream:
            if not started:
                self._start_stream()
            return self._end_stream()
        prompt = usage.get("prompt_tokens")
        self._send(200, _chunk_of(gid, created, model, p.text, p.tokens, p.finish_reason, resumes=p.resumes,
                                  usage={"prompt_tokens": prompt, "completion_tokens": len(p.tokens),
                                         "total_tokens": (prompt or 0) + len(p.tokens)}))

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, payload: dict[str, Any] | str) -> None:
        data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_stream(self) -> None:
        self._chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
