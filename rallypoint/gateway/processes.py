"""rallyd's side of the gateway processes (``[gateway] processes``), and the messages between them.

rallyd binds the gateway's port N times (``SO_REUSEPORT``) and starts N ``python -m
rallypoint.gateway.child`` processes, one on each socket; the kernel spreads new connections over
the sockets by their addresses. (On one shared socket the first process to wake takes the whole
backlog of a burst.) rallyd keeps its copies of the sockets: while a process is started again, the
connections meant for it wait in its socket's backlog. rallyd keeps the
truth about where requests go (``routes.DriverRoutes``) and pushes the list to every process the
moment it changes, so a request waiting out a recovery goes on as fast as on the in-thread
gateway. A process that dies is started again; the clients whose streams it held lost their
connection, as when a node's gateway dies, and ``gateway.client`` resumes them elsewhere.

Wire: a Unix socket pair per process, ``multiprocessing.connection`` framing (pickled tuples;
both ends are this program).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from rallypoint.api import API_KEY_ENV
from rallypoint.api.sockets import listen, listen_group
from rallypoint.log import get_logger

log = get_logger("gateway.processes")

# rallyd -> gateway process
ROUTES = "routes"  # (ROUTES, [driver URL, ...]): where requests go now, best first
STOP = "stop"  # (STOP,): finish the open streams and exit
# gateway process -> rallyd
READY = "ready"  # (READY, pid): importing done, serving
OUTCOME = "outcome"  # (OUTCOME, "completed" | "rejected" | "failed" | "unavailable")
RESUMED = "resumed"  # (RESUMED,): a request was re-sent to another driver


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes]
    conn: Connection
    ready: threading.Event = field(default_factory=threading.Event)
    send_lock: threading.Lock = field(default_factory=threading.Lock)


class GatewayProcesses:
    """The gateway as ``count`` processes sharing one port; the same face as ``server.Gateway``
    to rallyd (``port``, ``url``, ``start``, ``stop``).

    Args:
        host, port: where the gateway listens (port 0: a free one).
        count: how many processes serve it: all on one socket (``shared_socket``, the default:
            the first free process accepts a connection), or each on a socket of its own
            (SO_REUSEPORT: the kernel spreads the connections by address hash).
        upstreams: the serving drivers' URLs, best first (``routes.DriverRoutes``; never blocks).
        resume_timeout, model: as for ``server.Gateway``.
        api_key: required of clients; handed to the processes in their environment, not argv.
        on_request, on_resume: rallyd's metrics, called from the processes' counts.
        title: what the processes call themselves in ``ps`` (``k/N`` is appended).
        poll: how often the routes are compared with what the processes last got, in seconds.

    Raises:
        OSError: ``host:port`` cannot be bound.
    """

    def __init__(self, host: str, port: int, count: int, upstreams: Callable[[], list[str]], resume_timeout: float,
                 model: str = "rallypoint", api_key: str | None = None,
                 on_request: Callable[[str], None] = lambda _: None, on_resume: Callable[[], None] = lambda: None,
                 title: str = "rallypoint gateway", log_level: str = "info", poll: float = 0.005,
                 backlog: int = 4096, shared_socket: bool = True) -> None:
        if count < 1:
            raise ValueError(f"gateway processes must be at least 1, not {count}")
        self.socks = [listen(host, port, backlog)] * count if shared_socket else listen_group(host, port, count, backlog)
        self.shared_socket = shared_socket
        self.host, self.port = self.socks[0].getsockname()[:2]
        self.count, self.upstreams, self.resume_timeout, self.model = count, upstreams, resume_timeout, model
        self.api_key, self.on_request, self.on_resume = api_key, on_request, on_resume
        self.title, self.log_level, self.poll = title, log_level, poll
        self.started_at = time.time()
        self.children: list[_Child | None] = [None] * count
        self.routes: list[str] = []
        self.restarts = 0
        self.requests = [0] * count  # requests each process finished (any outcome)
        self._lock = threading.Lock()  # children and routes: a new child gets the routes last pushed
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c is not None]

    def status(self) -> dict[str, object]:
        """What ``node_status`` shows of the gateway processes: how many serve, restarts so far,
        requests each finished."""
        alive = sum(1 for c in self.children if c is not None and c.proc.poll() is None)
        return {"processes": self.count, "alive": alive, "restarts": self.restarts, "requests": list(self.requests),
                "accept": "shared" if self.shared_socket else "reuseport"}

    def start(self, ready_timeout: float = 20.0) -> GatewayProcesses:
        """Start every process and wait (up to ``ready_timeout``) until each serves; connections
        made before then wait in the socket's backlog."""
        with self._lock:
            self.routes = self.upstreams()
        for k in range(self.count):
            self._spawn(k)
        deadline = time.monotonic() + ready_timeout
        for child in list(self.children):
            if child is not None and not child.ready.wait(max(0.0, deadline - time.monotonic())):
                log.warning("gateway.process_slow_start", index=child.index, pid=child.proc.pid, waited=ready_timeout)
        threading.Thread(target=self._push_routes, name="gateway-routes-push", daemon=True).start()
        log.info("gateway.processes_serving", url=self.url, count=self.count, pids=self.pids())
        return self

    def stop(self, timeout: float = 3.0) -> None:
        """Ask every process to finish its open streams and exit; kill what is left after ``timeout``."""
        self._stopping.set()
        children = [c for c in self.children if c is not None]
        for child in children:
            self._send(child, (STOP,))
        deadline = time.monotonic() + timeout
        for child in children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            child.conn.close()
        for sock in set(self.socks):
            sock.close()

    # -- the processes -----------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        if self.api_key:
            env[API_KEY_ENV] = self.api_key
        else:
            env.pop(API_KEY_ENV, None)
        sock = self.socks[index]
        proc = subprocess.Popen(
            [sys.executable, "-m", "rallypoint.gateway.child", "--fd", str(theirs.fileno()),
             "--listen-fd", str(sock.fileno()), "--model", self.model,
             "--resume-timeout", repr(self.resume_timeout), "--started-at", repr(self.started_at),
             "--title", f"{self.title} {index + 1}/{self.count}", "--log-level", self.log_level],
            pass_fds=(theirs.fileno(), sock.fileno()), stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        child = _Child(index, proc, Connection(ours.detach()))
        with self._lock:
            self.children[index] = child
            self._send(child, (ROUTES, self.routes))
        threading.Thread(target=self._follow, args=(child,), name=f"gateway-process-{index + 1}", daemon=True).start()
        log.info("gateway.process_started", index=index + 1, pid=proc.pid)

    def _follow(self, child: _Child) -> None:
        """Count what the process reports; start it again if it dies while the gateway serves."""
        while True:
            try:
                msg = child.conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == OUTCOME:
                self.requests[child.index] += 1
                self.on_request(msg[1])
            elif kind == RESUMED:
                self.on_resume()
            elif kind == READY:
                child.ready.set()
        if self._stopping.is_set():
            return
        code = child.proc.wait()
        child.conn.close()
        log.error("gateway.process_exited", index=child.index + 1, pid=child.proc.pid, code=code)
        self.restarts += 1
        if self._stopping.wait(0.2 if child.ready.is_set() else 2.0):  # one that never served: no busy loop
            return
        self._spawn(child.index)

    def _send(self, child: _Child, msg: tuple[Any, ...]) -> None:
        try:
            with child.send_lock:
                child.conn.send(msg)
        except OSError:
            pass  # it died; _follow starts it again, with the routes of that moment

    def _push_routes(self) -> None:
        while not self._stopping.wait(self.poll):
            now = self.upstreams()
            if now == self.routes:
                continue
            with self._lock:
                self.routes = now
                children = [c for c in self.children if c is not None]
            for child in children:
                self._send(child, (ROUTES, now))
