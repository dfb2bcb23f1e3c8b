"""A worker's end of the local control channel to its rallyd (a Unix socket), and a spare's wait
for the seat the daemon hands it there.

The messages are ``protocol.channel``'s; the daemon's end is ``daemon.channel``.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from rallypoint.log import get_logger
from rallypoint.protocol import channel as msgs

log = get_logger("channel")


class ChannelClient:
    """A worker's end. Messages from the daemon go to ``handlers[op](msg)`` on a reader thread.

    Raises:
        OSError: the daemon's socket is not there (the worker then runs without the channel).
    """

    def __init__(self, address: str, role: str, local_rank: int | None,
                 handlers: dict[str, Callable[[dict[str, Any]], None]] | None = None) -> None:
        self.handlers = handlers or {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(msgs.sockaddr(address))
        self._lock = threading.Lock()
        self.send(msgs.hello(os.getpid(), role, local_rank))
        threading.Thread(target=self._read_loop, name="rallypoint-channel", daemon=True).start()

    def send(self, msg: dict[str, Any]) -> bool:
        with self._lock:
            try:
                self.sock.sendall(msgs.encode(msg))
                return True
            except OSError:
                return False

    def _read_loop(self) -> None:
        try:
            for raw in self.sock.makefile("rb"):
                try:
                    msg = msgs.decode(raw)
                except ValueError:
                    log.error("channel.malformed_message", raw=raw[:200].decode(errors="replace"))
                    continue
                handler = self.handlers.get(msg["op"])
                if handler is not None:
                    handler(msg)
        except OSError:
            pass

    def close(self) -> None:
        """Hang up: shut the socket down first, as the reader thread's file still holds it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class SeatHandoff:
    """A spare's wait for its seat: rallyd sends ``adopt`` over the channel."""

    def __init__(self) -> None:
        self.msg: dict[str, Any] | None = None
        self.ready = threading.Event()

    def adopt(self, msg: dict[str, Any]) -> None:
        self.msg = msg
        self.ready.set()
