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
from typing import Any

from rallypoint.gateway.resume import NoUpstream, Progress, RequestRejected, stream_completion
from rallypoint.http_json import JsonHandler, JsonServer
from rallypoint.log import get_logger

log = get_logger("gateway")


class Gateway(JsonServer):
    """The HTTP server; one thread per client request.

    Args:
        upstreams: the serving drivers' URLs, best first (``routes.DriverRoutes``).
        resume_timeout: how long a request may wait for a serving driver (seconds without a token).
        on_request: called with each request's outcome (completed, rejected, failed, unavailable).
        on_resume: called each time a request is re-sent to another driver.
    """

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


class _Handler(JsonHandler):
    server: Gateway

    def do_GET(self) -> None:
        if self.path == "/health":
            drivers = self.server.upstreams()
            self.send_body(200 if drivers else 503, {"status": "serving" if drivers else "unavailable",
                                                 "drivers": drivers})
        else:
            self.send_error_body(404, f"no such endpoint: GET {self.path}")

    def do_POST(self) -> None:
        if self.path != "/v1/completions":
            return self.send_error_body(404, f"no such endpoint: POST {self.path}")
        raw = self.read_body()
        if raw is None:
            return
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            return self.send_error_body(400, f"body is not JSON: {exc}")
        if not isinstance(body, dict):
            return self.send_error_body(400, "body must be a JSON object")
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
                        self.start_events()
                        started = True
                    c = chunk["choices"][0]
                    self.send_event(_chunk_of(gid, created, model, c.get("text", ""), c.get("token_ids", []),
                                          c.get("finish_reason"), usage=chunk.get("usage")))
        except RequestRejected as exc:
            self.server.on_request("rejected")
            return self.send_body(exc.status, exc.body or {"error": {"message": str(exc), "code": exc.status}})
        except NoUpstream as exc:
            self.server.on_request("unavailable" if not p.tokens else "failed")
            log.error("gateway.request_failed", request=gid, delivered=len(p.tokens), error=str(exc))
            if not started:
                return self.send_error_body(503, str(exc), {"Retry-After": "1"})
            self.send_event(_chunk_of(gid, created, model, "", [], "error", error={"message": str(exc)}))
            return self.end_events()
        except OSError:
            self.server.on_request("failed")  # the client went away
            return
        self.server.on_request("completed")
        log.info("gateway.completed", request=gid, tokens=len(p.tokens), resumes=p.resumes)
        if stream:
            if not started:
                self.start_events()
            return self.end_events()
        prompt = usage.get("prompt_tokens")
        self.send_body(200, _chunk_of(gid, created, model, p.text, p.tokens, p.finish_reason, resumes=p.resumes,
                                  usage={"prompt_tokens": prompt, "completion_tokens": len(p.tokens),
                                         "total_tokens": (prompt or 0) + len(p.tokens)}))
