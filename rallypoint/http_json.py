"""What rallypoint's two HTTP servers (a replica's API, rallyd's gateway) share: JSON answers,
OpenAI-style error bodies, and server-sent events over chunked transfer encoding."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 1 << 20


class JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # structlog, not stderr lines
        pass

    def send_body(self, status: int, body: dict[str, Any] | str, headers: dict[str, str] | None = None) -> None:
        """A JSON object, or text (Prometheus exposition) when ``body`` is a string."""
        raw = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def send_error_body(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "unavailable"
        self.send_body(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def read_body(self) -> bytes | None:
        """The request body; None (after answering 413) when it is over ``MAX_BODY``."""
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.send_error_body(413, "request body over 1 MiB")
            return None
        return self.rfile.read(length)

    def start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_event(self, payload: dict[str, Any] | str) -> None:
        data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_events(self) -> None:
        self.send_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class JsonServer(ThreadingHTTPServer):
    """One thread per request. A client hanging up mid-answer is normal here (a gateway that
    gave up on a stream to resume it elsewhere, a caller that timed out): no traceback for it."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)
