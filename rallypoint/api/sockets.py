"""The listening socket an HTTP server runs on, without importing a web framework: a worker binds
its API's port itself (and hands the socket to its API process) without loading FastAPI."""

from __future__ import annotations

import socket


def listen(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port).

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    return sock
