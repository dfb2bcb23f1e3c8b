"""rallyd's end of the local control channel: a Unix socket its workers connect to.

The messages are ``protocol.channel``'s; the worker's end is ``worker.channel``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rallypoint.log import get_logger
from rallypoint.protocol import channel as msgs

log = get_logger("channel")


def channel_address(state_dir: Path, node: str) -> str:
    """Where the daemon listens: ``<state_dir>/rallyd.sock``, or an abstract socket when that path
    is too long for ``sun_path`` (108 bytes)."""
    path = str(state_dir / "rallyd.sock")
    return path if len(path.encode()) < 100 else f"@rallyd-{node}-{os.getpid()}"


class Peer:
    """One connected worker, as the daemon sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = 0
        self.role = ""
        self.local_rank: int | None = None
        self.last: dict[str, Any] = {}  # its last heartbeat
        self.last_seen = time.monotonic()
        self.beat_at: float | None = None  # when that heartbeat came (monotonic); None before the first
        self._lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> bool:
        data = msgs.encode(msg)
        with self._lock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                return False


class ChannelServer:
    """The daemon's end: accepts workers, remembers them by pid, relays their messages.

    Args:
        address: a filesystem path, or ``@name`` for an abstract socket.
        on_message: called as ``on_message(peer, msg)`` from the peer's reader thread.
    """

    def __init__(self, address: str, on_message: Callable[[Peer, dict[str, Any]], None] | None = None) -> None:
        self.address = address
        self.on_message = on_message
        self.peers: dict[int, Peer] = {}
        self._lock = threading.Lock()
        if not address.startswith("@") and os.path.exists(address):
            os.unlink(address)  # left by a daemon that crashed
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(msgs.sockaddr(address))
        if not address.startswith("@"):
            os.chmod(address, 0o600)
        self._sock.listen(64)
        self._closed = False
        threading.Thread(target=self._accept_loop, name="rallyd-channel", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read_loop, args=(Peer(conn),), name="rallyd-channel-peer",
                             daemon=True).start()

    def _read_loop(self, peer: Peer) -> None:
        buf = peer.sock.makefile("rb")
        try:
            for raw in buf:
                if len(raw) > msgs.MAX_LINE:
                    log.error("channel.oversized_message", pid=peer.pid)
                    break
                try:
                    msg = msgs.decode(raw)
                except ValueError:
                    log.error("channel.malformed_message", pid=peer.pid, raw=raw[:200].decode(errors="replace"))
                    continue
                peer.last_seen = time.monotonic()
                if msg["op"] == msgs.HELLO:
                    peer.pid, peer.role = int(msg["pid"]), str(msg.get("role", msgs.SEAT))
                    lr = msg.get("local_rank")
                    peer.local_rank = int(lr) if lr is not None else None
                    with self._lock:
                        self.peers[peer.pid] = peer
                elif msg["op"] == msgs.BEAT:
                    peer.last, peer.beat_at = msg, peer.last_seen
                if self.on_message is not None:
                    self.on_message(peer, msg)
        except OSError:
            pass
        finally:
            with self._lock:
                if self.peers.get(peer.pid) is peer:
                    del self.peers[peer.pid]
            peer.sock.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        finally:
            if not self.address.startswith("@") and os.path.exists(self.address):
                os.unlink(self.address)
        with self._lock:
            for p in self.peers.values():
                p.sock.close()
