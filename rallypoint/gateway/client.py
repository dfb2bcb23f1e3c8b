"""A completions client that survives the death of the gateway it talks to.

Give it every node's gateway: a request goes to the first that answers; if that gateway (its node)
dies mid-stream, the request goes on at the next with the tokens already received, and the caller
sees one completion, as if nothing had happened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from rallypoint.gateway.resume import Progress, stream_completion


class CompletionClient:
    """Args: gateways: base URLs (``http://host:port``), or a function that returns the current
    ones; timeout: seconds without a token before giving up; read_timeout: longest silence from one
    gateway before trying the next."""

    def __init__(self, gateways: list[str] | Callable[[], list[str]], timeout: float = 120.0,
                 read_timeout: float = 600.0) -> None:
        if not callable(gateways) and not gateways:
            raise ValueError("CompletionClient needs at least one gateway URL")
        self.gateways = gateways if callable(gateways) else list(gateways)
        self.timeout, self.read_timeout = timeout, read_timeout

    def stream(self, body: dict[str, Any], progress: Progress | None = None) -> Iterator[dict[str, Any]]:
        """Yield the completion's chunks; ``progress`` holds every token received so far.

        Raises:
            RequestRejected: the request is malformed (HTTP 4xx).
            NoUpstream: no gateway could finish it within ``timeout``.
        """
        urls = self.gateways if callable(self.gateways) else (lambda: self.gateways)
        yield from stream_completion(body, urls, self.timeout, self.read_timeout, progress)

    def complete(self, body: dict[str, Any]) -> Progress:
        """The whole completion: ``tokens``, ``text``, ``finish_reason``, ``resumes``."""
        p = Progress()
        for _ in self.stream(body, p):
            pass
        return p
