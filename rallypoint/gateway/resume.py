"""One completion streamed from whichever upstream can serve it, resumed where the last one stopped.

The same loop serves two callers: rallyd's gateway, whose upstreams are the replicas' drivers, and
``gateway.client``, whose upstreams are the gateways of several nodes. When an upstream's stream
breaks before its final chunk (its process died, its node died) or it refuses the request (503:
recovering, draining, queue full), the loop picks an upstream again and re-sends the request with
``resume_tokens``: every token already delivered. The new driver replays those tokens one decode
step at a time and continues, so the caller sees one uninterrupted stream with the tokens a
failure-free run gives (sampling is seeded by position).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rallypoint.errors import RallypointError
from rallypoint.log import get_logger

log = get_logger("gateway.resume")

BROKEN = (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError)  # refused, reset, timed out, truncated, garbled


class RequestRejected(RallypointError):
    """An upstream answered 4xx: the request itself is wrong; sending it elsewhere will not help."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        msg = (body.get("error") or {}).get("message", "") if isinstance(body, dict) else str(body)
        super().__init__(msg or f"rejected with HTTP {status}")
        self.status, self.body = status, body


class NoUpstream(RallypointError):
    """No upstream took (or finished) the request before the deadline."""


@dataclass
class Progress:
    """What reached the caller so far; the state a resumption starts from."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    resumes: int = 0
    upstreams: list[str] = field(default_factory=list)


def _open(url: str, body: dict[str, Any], read_timeout: float):
    data = json.dumps({**body, "stream": True}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v1/completions", data=data,
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=read_timeout)


def _events(resp) -> Iterator[dict[str, Any] | None]:
    """The stream's chunks; None for ``[DONE]``."""
    for raw in resp:
        line = raw.strip()
        if line.startswith(b"data: "):
            payload = line[6:].decode()
            yield None if payload == "[DONE]" else json.loads(payload)


def stream_completion(body: dict[str, Any], upstreams: Callable[[], list[str]], timeout: float,
                      read_timeout: float = 600.0, progress: Progress | None = None,
                      on_resume: Callable[[str, int], None] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the completion's chunks (``choices[0]`` has ``text``, ``token_ids``, ``finish_reason``).

    Args:
        body: the client's request (``stream`` is forced on upstream; ``resume_tokens`` honoured).
        upstreams: the URLs to try now, best first; called again after every failure.
        timeout: how long the request may go without a token (no upstream takes it, or they
            all fail), in seconds.
        read_timeout: the longest silence tolerated from an upstream mid-stream.
        progress: filled as chunks arrive (the caller reads it after a failure, or at the end).
        on_resume: called with (upstream, tokens delivered) each time the request is re-sent.

    Raises:
        RequestRejected: an upstream answered 4xx before anything was delivered.
        NoUpstream: ``timeout`` passed without an upstream able to finish the request.
    """
    p = progress if progress is not None else Progress()
    p.tokens = list(body.get("resume_tokens") or [])
    deadline = time.monotonic() + timeout
    last_error, pause = "no upstream known", 0.05
    failed: set[str] = set()  # upstreams that failed this request; tried again once all have
    while time.monotonic() < deadline:
        urls = upstreams()
        if not urls:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.5)
            continue
        fresh = [u for u in urls if u not in failed]
        if not fresh:
            failed.clear()
        url = (fresh or urls)[0]
        sent = {**body, "resume_tokens": p.tokens} if p.tokens else {k: v for k, v in body.items()
                                                                         if k != "resume_tokens"}
        if p.upstreams:
            p.resumes += 1
            log.info("gateway.resuming", upstream=url, delivered=len(p.tokens), last_error=last_error)
            if on_resume is not None:
                on_resume(url, len(p.tokens))
        p.upstreams.append(url)
        try:
            with _open(url, sent, read_timeout) as resp:
                for chunk in _events(resp):
                    if chunk is None:
                        if p.finish_reason is None:
                            raise ValueError("stream ended without a finish reason")
                        return
                    choice = chunk["choices"][0]
                    if choice.get("finish_reason") in ("timeout", "error"):
                        raise ValueError(f"upstream gave up: {choice['finish_reason']}")
                    p.tokens.extend(choice.get("token_ids", []))
                    p.text += choice.get("text", "")
                    p.finish_reason = choice.get("finish_reason") or p.finish_reason
                    deadline = time.monotonic() + timeout  # the clock runs only while nothing arrives
                    yield chunk
                raise ValueError("stream ended before [DONE]")
        except urllib.error.HTTPError as err:
            status = err.code
            try:
                payload = json.loads(err.read() or b"{}")
            except ValueError:
                payload = {}
            if 400 <= status < 500 and status not in (408, 429):
                raise RequestRejected(status, payload) from None
            last_error = f"{url}: HTTP {status}"
            failed.add(url)
        except BROKEN as exc:
            if p.finish_reason is not None:
                return  # everything arrived; only the end of the stream was lost
            last_error = f"{url}: {type(exc).__name__}: {exc}"
            failed.add(url)
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.5)
    raise NoUpstream(f"no upstream finished the request within {timeout:g}s "
                     f"({len(p.tokens)} token(s) delivered; last error: {last_error})")
