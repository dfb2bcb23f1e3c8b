"""A completions client that survives the death of the gateway it talks to.

Give it every node's gateway: a request goes to the first that answers; if that gateway (its node)
dies mid-stream, the request goes on at the next with the tokens already received, and the caller
sees one completion, as if nothing had happened.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator
from typing import Any

from rallypoint.api import bearer
from rallypoint.gateway.resume import Progress, stream_completion


class CompletionClient:
    """Args: gateways: base URLs (``http://host:port``), or a function that returns the current
    ones; timeout: seconds without a token before giving up; read_timeout: longest silence from one
    gateway, once its stream has begun, before trying the next (a gateway sends an SSE comment
    after each 2 s without a token, recoveries included, so silence means it, or the path to it,
    is gone)."""

    def __init__(self, gateways: list[str] | Callable[[], list[str]], timeout: float = 120.0,
                 read_timeout: float = 30.0, api_key: str | None = None) -> None:
        if not callable(gateways) and not gateways:
            raise ValueError("CompletionClient needs at least one gateway URL")
        self.gateways: list[str] | Callable[[], list[str]] = gateways if callable(gateways) else list(gateways)
        self.timeout, self.read_timeout = timeout, read_timeout
        self.headers = bearer(api_key)

    def stream(self, body: dict[str, Any], progress: Progress | None = None,
               path: str = "/v1/completions") -> Iterator[dict[str, Any]]:
        """Yield the completion's chunks; ``progress`` holds every token received so far.

        A blocking iterator over the async resume loop, on an event loop of its own.

        Raises:
            RequestRejected: the request is malformed (HTTP 4xx).
            NoUpstream: no gateway could finish it within ``timeout``.
        """
        gateways = self.gateways
        urls: Callable[[], list[str]] = gateways if callable(gateways) else (lambda: gateways)
        if body.get("seed") is None:  # one seed for every gateway it may go through
            body = {**body, "seed": secrets.randbits(63)}
        loop = asyncio.new_event_loop()
        chunks = stream_completion(body, urls, self.timeout, self.read_timeout, progress, path=path,
                                   headers=self.headers)
        try:
            while True:
                try:
                    yield loop.run_until_complete(anext(chunks))
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(chunks.aclose())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def complete(self, body: dict[str, Any]) -> Progress:
        """The whole completion: ``tokens``, ``text``, ``finish_reason``, ``resumes``."""
        p = Progress()
        for _ in self.stream(body, p):
            pass
        return p
