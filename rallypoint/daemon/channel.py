"""The local control channel between rallyd and its workers: a Unix socket, one JSON object a line.

etcd carries what the whole cluster must agree on (plans, abort orders); this channel carries what
only this node's daemon and its own processes need, and keeps working when etcd is away:

    worker -> daemon   {"op": "hello", "pid": P, "role": "spare"|"seat", "local_rank": L|null}
                       {"op": "beat", "pid": P, "state": "serving", "gen": G, "in_flight": N, "counts": {...}, "api": URL, ...}
    daemon -> worker   {"op": "adopt", "local_rank": L, "after_gen": G, "api_port": N, "api_url_file": F}
                       {"op": "drain"}

A warm spare says hello and then waits for ``adopt``; the daemon hands it the seat of a failed
worker, which saves the replacement's interpreter start, ``import torch`` and CUDA set-up.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rallypoint.log import get_logger

log = get_logger("channel")
MAX_LINE = 1 << 16


def channel_address(state_dir: Path, node: str) -> str:
    """Where the daemon listens: ``<state_dir>/rallyd.sock``, or an abstract socket when that path
    is too long for ``sun_path`` (108 bytes)."""
    path = str(state_dir / "rallyd.sock")
    return path if len(path.encode()) < 100 else f"@rallyd-{node}-{os.getpid()}"


def _sockaddr(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


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
        data = (json.dumps(msg) + "\n").encode()
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
        self._sock.bind(_sockaddr(address))
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
                if len(raw) > MAX_LINE:
                    log.error("channel.oversized_message", pid=peer.pid)
                    break
                try:
                    msg = json.loads(raw)
                    op = msg["op"]
                except (ValueError, KeyError, TypeError):
                    log.error("channel.malformed_message", pid=peer.pid, raw=raw[:200].decode(errors="replace"))
                    continue
                peer.last_seen = time.monotonic()
                if op == "hello":
                    peer.pid, peer.role = int(msg["pid"]), str(msg.get("role", "seat"))
                    lr = msg.get("local_rank")
                    peer.local_rank = int(lr) if lr is not None else None
                    with self._lock:
                        self.peers[peer.pid] = peer
                elif op == "beat":
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


class ChannelClient:
    """A worker's end. Messages from the daemon go to ``handlers[op](msg)`` on a reader thread.

    Raises:
        OSError: the daemon's socket is not there (the worker then runs without the channel).
    """

    def __init__(self, address: str, role: str, local_rank: int | None,
                 handlers: dict[str, Callable[[dict[str, Any]], None]] | None = None) -> None:
        self.handlers = handlers or {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(_sockaddr(address))
        self._lock = threading.Lock()
        self.send({"op": "hello", "pid": os.getpid(), "role": role, "local_rank": local_rank})
        threading.Thread(target=self._read_loop, name="rallypoint-channel", daemon=True).start()

    def send(self, msg: dict[str, Any]) -> bool:
        with self._lock:
            try:
                self.sock.sendall((json.dumps(msg) + "\n").encode())
                return True
            except OSError:
                return False

    def _read_loop(self) -> None:
        try:
            for raw in self.sock.makefile("rb"):
                try:
                    msg = json.loads(raw)
                    handler = self.handlers.get(msg["op"])
                except (ValueError, KeyError, TypeError):
                    log.error("channel.malformed_message", raw=raw[:200].decode(errors="replace"))
                    continue
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
