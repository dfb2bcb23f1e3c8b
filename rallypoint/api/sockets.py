"""The listening socket an HTTP server runs on, without importing a web framework: a worker binds
its API's port itself (and hands the socket to its API process) without loading FastAPI."""

from __future__ import annotations

import socket


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen(host: str, port: int, backlog: int = 4096, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port). With ``reuse_port``, more such
    sockets may listen on the same port and the kernel spreads new connections over them.

    Raises:
        OSError: the address cannot be bound.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    return sock


def listen_group(host: str, port: int, count: int, backlog: int = 4096) -> list[socket.socket]:
    """``count`` listening sockets on one port (``SO_REUSEPORT``): the kernel spreads new
    connections over them, one per serving process.

    The port is first bound alone, without ``SO_REUSEPORT``: a port another program holds fails
    here, and another rallyd of the same user cannot join the group by mistake (joining needs the
    option on both sides; a plain bind fails while the group holds the port).

    Raises:
        OSError: the address cannot be bound.
    """
    probe = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    finally:
        probe.close()
    socks: list[socket.socket] = []
    try:
        socks.extend(listen(host, port, backlog, reuse_port=True) for _ in range(count))
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks
