"""The driver's end of the link to its API process (``api_process``), and the messages on it.

Why a process: the API's work per streamed chunk (a server-sent event, a socket write, a
coroutine woken) is Python. On a thread of the driver it took the one interpreter lock from the
serving loop: with 256 streams the step took 2-5x the GPU's time. In its own process the API gets
a core of its own and the driver sends it one message per step.

The driver keeps the truth: the request journals, the queue, resumption after an abort. The API
process keeps a mirror of each request it accepted; this end creates the driver's ``Request``
for each submission, listens to it, and sends every committed token, end and error across.
A cancel (a stop string matched, the client went away) comes back the other way.

Wire: a Unix socket pair with ``multiprocessing.connection`` framing (pickled tuples; both ends
are this program). When the driver's process dies the API process sees the socket close and
exits at once, so its streams end and the gateway resumes them on a serving driver, as when
the API was a thread of the driver.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from typing import Any

from rallypoint.api.sockets import listen
from rallypoint.log import get_logger
from rallypoint.worker.requests import Draining, QueueFull, Request, RequestQueue, SamplingParams

log = get_logger("api_link")

# driver -> API process
SERVE = "serve"  # (SERVE, ServeSpec, Stats), then the listening socket (SCM_RIGHTS): serve on it
UPDATES = "updates"  # (UPDATES, [(id, new tokens, finish reason, error)], Stats)
STOP = "stop"  # (STOP,): finish the open responses and exit
ANSWER = "answer"  # (ANSWER, id, None) accepted, or (ANSWER, id, (why, retry_after, draining)) refused
# API process -> driver
SUBMIT = "submit"  # (SUBMIT, id, prompt, SamplingParams, eos, resume tokens, created, (kv_to, kv_gen) or None)
CANCEL = "cancel"  # (CANCEL, id, reason)

# (state, generation, why closed or None, waiting, running, counts): what /health and /metrics show
Stats = tuple[str, int, str | None, int, int, dict[str, int]]


@dataclass(frozen=True)
class ServeSpec:
    """How the API process serves: known only once the driver knows its seat and KV size."""

    host: str
    port: int
    max_context: int
    stream_interval: float
    max_chunk_rate: float
    capacity: int


class ApiProcess:
    """Starts the replica's API process and feeds it; one per worker, started early (its imports
    and tokenizer load run while the worker loads its model) and serving once ``serve`` is called.

    Args:
        queue: the driver's queue; submissions from the API land in it.
        model_dir: the checkpoint (the API process loads its tokenizer).
        vocab_size: for checking token-id prompts.
        model_name: the name it serves the checkpoint under.
        state: the worker's (state, generation).
        title: what the API process calls itself in ``ps``.
        on_lost: called with its exit code if the API process dies while in use.
    """

    def __init__(self, queue: RequestQueue, model_dir: str, vocab_size: int, model_name: str,
                 state: Callable[[], tuple[str, int]], title: str | None = None,
                 on_lost: Callable[[int], None] | None = None) -> None:
        self.queue, self.state, self.on_lost = queue, state, on_lost
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rallypoint.worker.api_process", "--fd", str(theirs.fileno()),
             "--model", model_dir, "--vocab-size", str(vocab_size), "--model-name", model_name,
             "--title", title or f"rallypoint api (worker pid {os.getpid()})"],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.url: str | None = None
        self._send_lock = threading.Lock()
        self._tracked: dict[str, tuple[Request, Callable[[], None]]] = {}
        self._sent: dict[str, int] = {}  # committed tokens of each request already sent across
        self._dirty: dict[str, Request] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        threading.Thread(target=self._read_loop, name="rallypoint-api-link-in", daemon=True).start()
        threading.Thread(target=self._send_loop, name="rallypoint-api-link-out", daemon=True).start()
        log.info("api_link.started", pid=self.proc.pid)

    # -- control ---------------------------------------------------------------------------------

    def serve(self, spec: ServeSpec) -> str:
        """Listen on ``spec``'s address and hand the socket to the API process; returns the URL.

        Bound here, so a taken port fails at once, in this process, and the URL is known without
        waiting for the API process: connections made before it serves wait in the backlog, and the
        driver's first step is not held up (its TP peers would count the wait against it).

        Raises:
            OSError: the address cannot be bound.
        """
        try:
            sock = listen(spec.host, spec.port)
        except OSError as exc:
            raise OSError(f"cannot listen on {spec.host}:{spec.port}: {exc.strerror or exc}") from None
        host, port = sock.getsockname()[:2]
        try:
            with self._send_lock:
                self.conn.send((SERVE, spec, self.stats()))  # its /health is right from the first request
                send_handle(self.conn, sock.fileno(), self.proc.pid)
        finally:
            sock.close()  # the API process holds it now; this copy would keep accepting if it died
        self.url = f"http://{host}:{port}"
        return self.url

    def close(self, timeout: float = 3.0) -> None:
        """Send what is left, let the API process finish its open responses, and stop it."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        try:
            self._send((STOP,))
            self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.conn.close()

    def _send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(msg)

    # -- API process -> driver -------------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                if not self._closed:
                    code = self.proc.wait()
                    log.error("api_link.lost", pid=self.proc.pid, code=code)
                    if self.on_lost is not None:
                        self.on_lost(code)
                return
            kind = msg[0]
            if kind == SUBMIT:
                self._submit(*msg[1:])
            elif kind == CANCEL:
                entry = self._tracked.get(msg[1])
                if entry is not None:
                    entry[0].cancel(msg[2])

    def _submit(self, rid: str, prompt: list[int], params: SamplingParams, eos: frozenset[int],
                resume: list[int], created: float, kv: tuple[int, int] | None = None) -> None:
        req = Request(prompt, params, id=rid, created=created, eos=eos)
        if kv is not None:
            req.kv_to, req.kv_gen = kv
        if resume:
            req.resume_from(resume)

        def changed() -> None:
            with self._lock:
                first = not self._dirty
                self._dirty[rid] = req
            if first:
                self._wake.set()

        with self._lock:
            self._tracked[rid] = (req, changed)
            self._sent[rid] = len(req.committed)  # the tokens it resumes from: the API has them
        req.listen(changed)
        try:
            self.queue.submit(req)
        except QueueFull as exc:  # closed or full since the API process last heard: it answers 503
            req.unlisten(changed)
            with self._lock:
                self._tracked.pop(rid, None)
                self._sent.pop(rid, None)
            self._send((ANSWER, rid, (str(exc), exc.retry_after, isinstance(exc, Draining))))
            return
        self._send((ANSWER, rid, None))

    # -- driver -> API process -------------------------------------------------------------------

    def stats(self) -> Stats:
        state, gen = self.state()
        q = self.queue
        return state, gen, q.closed, q.waiting, q.running, dict(q.counts)

    def _send_loop(self) -> None:
        """One message per burst of commits (a step's), and the stats whenever they change."""
        last: Stats | None = None
        while not self._closed:
            self._wake.wait(0.05)
            self._wake.clear()
            try:
                last = self._flush(last)
            except OSError:
                return

    def _flush(self, last: Stats | None = None) -> Stats:
        with self._lock:
            dirty, self._dirty = self._dirty, {}
        updates = []
        for rid, req in dirty.items():
            if rid not in self._sent:
                continue  # its end was sent already
            new, finish, error = req.snapshot(self._sent[rid])
            self._sent[rid] += len(new)
            updates.append((rid, new, finish, error))
            if finish is not None:
                with self._lock:
                    _, changed = self._tracked.pop(rid)
                    del self._sent[rid]
                req.unlisten(changed)
        stats = self.stats()
        if updates or stats != last:
            self._send((UPDATES, updates, stats))
        return stats

