"""One completion streamed from whichever upstream can serve it, resumed where the last one stopped.

The same loop serves two callers: rallyd's gateway, whose upstreams are the replicas' drivers, and
``gateway.client``, whose upstreams are the gateways of several nodes. When an upstream's stream
breaks before its final chunk (its process died, its node died) or it refuses the request (503:
recovering, draining, queue full), the loop picks an upstream again and re-sends the request with
``resume_tokens`` and ``resume_text``: every token and all the text already delivered. The new
driver replays those tokens one decode step at a time and continues, so the caller sees one
uninterrupted stream with the tokens a failure-free run gives (sampling is seeded by position).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from rallypoint.api.responses import choice_parts
from rallypoint.errors import RallypointError
from rallypoint.log import get_logger

log = get_logger("gateway.resume")

# refused, reset, timed out, truncated, garbled: try the next upstream
BROKEN = (httpx.TransportError, httpx.StreamError, OSError, ValueError, KeyError, IndexError, TypeError)


# A driver's stream sends a keepalive comment every 2 s without a token (worker.api.Frontend):
# silence for this long means the driver, or the network path to it, is gone. A partition drops
# packets without closing anything, so without this bound a stream would hang for the OS's TCP
# timeouts (many minutes) instead of resuming on a serving driver.
UPSTREAM_SILENCE = 10.0


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
    usage: dict[str, Any] | None = None
    resumes: int = 0
    upstreams: list[str] = field(default_factory=list)


def upstream_client(max_connections: int | None = None) -> httpx.AsyncClient:
    """An HTTP client for upstream streams: no pool limit by default (every client request holds
    one upstream stream), connect errors fast, reads bounded per call by ``read_timeout``. Up to
    1,024 idle connections are kept: the next burst of streams reuses them instead of opening as
    many connections again (a Python event loop pays about a millisecond for each)."""
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=1024),
                             timeout=httpx.Timeout(connect=5.0, read=None, write=10.0, pool=None))


HEARTBEAT: dict[str, Any] = {}  # what stream_completion yields for a heartbeat (an empty chunk)


async def _events(resp: httpx.Response, read_timeout: float) -> AsyncGenerator[dict[str, Any] | None, None]:
    """The stream's chunks (None for ``[DONE]``). Read as bytes, not lines: one await per network
    read, however many events it holds. A silent upstream is a broken one: each read must come
    within ``read_timeout`` (a timer per read, not one around the generator: a timeout must not
    fire while the consumer holds the generator suspended)."""
    reads = resp.aiter_bytes().__aiter__()
    buf = b""
    while True:
        try:
            async with asyncio.timeout(read_timeout):  # no task per read, unlike wait_for before 3.12
                got = await reads.__anext__()
            buf += got.replace(b"\r\n", b"\n") if b"\r" in got else got
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise httpx.ReadTimeout(f"no data for {read_timeout:g}s") from None
        *events, buf = buf.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    data = line[6:].strip()
                    yield None if data == b"[DONE]" else orjson.loads(data)
                elif line.startswith(b": keepalive"):
                    yield HEARTBEAT


async def stream_completion(body: dict[str, Any], upstreams: Callable[[], list[str]], timeout: float,
                            read_timeout: float = UPSTREAM_SILENCE, progress: Progress | None = None,
                            on_resume: Callable[[str, int], None] | None = None,
                            path: str = "/v1/completions", client: httpx.AsyncClient | None = None,
                            headers: dict[str, str] | None = None,
                            wait_change: Callable[[list[str], float], Awaitable[None]] | None = None,
                            heartbeat: float | None = None) -> AsyncGenerator[dict[str, Any], None]:
    """Yield the completion's chunks as the upstreams send them (OpenAI chunks of either kind).

    Args:
        body: the client's request (``stream`` is forced on upstream, with usage;
            ``resume_tokens``/``resume_text`` honoured).
        upstreams: the base URLs to try now, best first; called again after every failure.
        timeout: how long the request may go without a token (no upstream takes it, or they
            all fail), in seconds.
        read_timeout: the longest silence tolerated from an upstream mid-stream.
        progress: filled as chunks arrive (the caller reads it after a failure, or at the end).
        on_resume: called with (upstream, tokens delivered) each time the request is re-sent.
        path: ``/v1/completions`` or ``/v1/chat/completions``.
        client: the HTTP client to use (one is made, and closed, when None).
        headers: sent upstream with every attempt (the API key).
        wait_change: ``await wait_change(seen, t)`` returns once ``upstreams()`` differs from
            ``seen``, or after ``t`` s (``routes.UpstreamWatch``): a request waiting for a
            recovery goes on the moment a driver serves, not at its next poll. Without it the
            loop sleeps between looks (0.02 s, doubling to 0.1 s).
        heartbeat: once a chunk has been delivered, yield ``HEARTBEAT`` (an empty dict) after each
            this many seconds without one: an upstream's keepalive, or a wait for a serving driver
            (a recovery). The gateway turns them into SSE comments, so its own clients can hold a
            short read timeout too. None: never.

    Raises:
        RequestRejected: an upstream answered 4xx before anything was delivered.
        NoUpstream: ``timeout`` passed without an upstream able to finish the request.
    """
    own = client is None
    http = client or upstream_client()
    p = progress if progress is not None else Progress()
    p.tokens = list(body.get("resume_tokens") or [])
    p.text = str(body.get("resume_text") or "")
    deadline = time.monotonic() + timeout
    last_error, pause = "no upstream known", 0.02
    failed: set[str] = set()  # upstreams that failed this request; tried again once all have
    base = {k: v for k, v in body.items() if k not in ("resume_tokens", "resume_text")}
    base.update(stream=True, stream_options={"include_usage": True})

    async def pause_for(seen: list[str]) -> None:
        nonlocal pause
        left = max(0.0, deadline - time.monotonic())
        if wait_change is not None:
            await wait_change(seen, min(pause, left))
        else:
            await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, 0.1)

    beat_at = time.monotonic()

    def beat_due() -> bool:
        nonlocal beat_at
        if heartbeat is None or not p.upstreams or time.monotonic() - beat_at < heartbeat:
            return False
        beat_at = time.monotonic()
        return True

    try:
        while time.monotonic() < deadline:
            if beat_due():
                yield HEARTBEAT
            urls = upstreams()
            if not urls:  # looking costs nothing (no etcd on this path): look often, a recovery is short
                await pause_for(urls)
                continue
            fresh = [u for u in urls if u not in failed]
            if not fresh:
                failed.clear()
            url = (fresh or urls)[0]
            sent = {**base, "resume_tokens": p.tokens, "resume_text": p.text} if p.tokens else base
            if p.upstreams:
                p.resumes += 1
                log.info("gateway.resuming", upstream=url, delivered=len(p.tokens), last_error=last_error)
                if on_resume is not None:
                    on_resume(url, len(p.tokens))
            p.upstreams.append(url)
            try:
                async with http.stream("POST", url.rstrip("/") + path, json=sent, headers=headers) as resp:
                    if resp.status_code != 200:
                        raw = await resp.aread()
                        try:
                            payload = json.loads(raw or b"{}")
                        except ValueError:
                            payload = {}
                        if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
                            raise RequestRejected(resp.status_code, payload)
                        last_error = f"{url}: HTTP {resp.status_code}"
                        failed.add(url)
                    else:
                        async with aclosing(_events(resp, read_timeout)) as events:
                            async for chunk in events:
                                if chunk is None:  # [DONE]
                                    if p.finish_reason is None:
                                        raise ValueError("stream ended without a finish reason")
                                    return
                                if chunk is HEARTBEAT:
                                    if beat_due():
                                        yield HEARTBEAT
                                    continue
                                if not chunk.get("choices"):  # the usage chunk
                                    p.usage = chunk.get("usage")
                                    continue
                                text, tokens, finish = choice_parts(chunk)
                                if finish in ("timeout", "error"):
                                    raise ValueError(f"upstream gave up: {finish}")
                                p.tokens.extend(tokens)
                                p.text += text
                                p.finish_reason = finish or p.finish_reason
                                deadline = time.monotonic() + timeout  # the clock runs only while nothing arrives
                                beat_at = time.monotonic()
                                yield chunk
                        raise ValueError("stream ended before [DONE]")
            except BROKEN as exc:
                if p.finish_reason is not None:
                    return  # everything arrived; only the end of the stream was lost
                last_error = f"{url}: {type(exc).__name__}: {exc}"
                failed.add(url)
            await pause_for(urls)
        raise NoUpstream(f"no upstream finished the request within {timeout:g}s "
                         f"({len(p.tokens)} token(s) delivered; last error: {last_error})")
    finally:
        if own:
            await http.aclose()
