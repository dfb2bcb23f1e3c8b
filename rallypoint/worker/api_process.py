"""The replica's HTTP API as a process of its own: ``python -m rallypoint.worker.api_process``.

Started by its worker (``api_link.ApiProcess``) with one end of a socket pair. It imports no
torch: it loads the checkpoint's tokenizer, waits for the driver's ``serve`` message, binds and
serves the same routes as the in-thread server (``worker.api``) over a ``MirrorQueue``: each
accepted request is a ``Request`` here too, whose committed tokens and end the driver reports
once per step. When the socket closes (the worker died) it exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import threading
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle

from rallypoint.api import API_KEY_ENV
from rallypoint.log import configure_logging, get_logger
from rallypoint.worker import api_link as link
from rallypoint.worker.api import ApiServer, Frontend
from rallypoint.worker.requests import Draining, QueueFull, Request
from rallypoint.worker.title import set_title
from rallypoint.worker.tokenizer import load_tokenizer

log = get_logger("api_process")


class MirrorQueue:
    """The API's view of the driver's queue: admits requests (the driver answers each one),
    sends them across, and applies the driver's updates to them."""

    def __init__(self, conn: Connection, capacity: int = 1024, retry_after: float = 1.0,
                 answer_timeout: float = 10.0) -> None:
        self.conn, self.capacity, self.retry_after = conn, capacity, retry_after
        self.answer_timeout = answer_timeout
        self.live: dict[str, Request] = {}  # accepted, not yet reported finished by the driver
        self._answers: dict[str, asyncio.Future[tuple[str, float, bool] | None]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stats: link.Stats = ("starting", 0, None, 0, 0, {})
        self.rejected = 0
        self._lock = threading.Lock()

    # -- what Frontend reads (worker.api.Admission) ------------------------------------------------

    async def submit_async(self, req: Request) -> Request:
        """Admit ``req`` once the driver has: refused here at once when the driver last reported
        its queue closed or this process holds ``capacity`` requests, else sent across and
        answered by the driver's queue itself (closed or full meanwhile: the same 503).

        Raises:
            Draining, QueueFull: refused (the message says why); also when the driver does not
                answer within ``answer_timeout`` (it is stopped or gone).
        """
        with self._lock:
            if self.closed:
                self.rejected += 1
                raise Draining(self.closed, self.retry_after)
            if len(self.live) >= self.capacity:
                self.rejected += 1
                raise QueueFull(self.retry_after)
            self.live[req.id] = req
            self.loop = asyncio.get_running_loop()
            answer = self._answers[req.id] = self.loop.create_future()
        req.on_cancel = lambda reason: self._send((link.CANCEL, req.id, reason))
        self._send((link.SUBMIT, req.id, req.prompt, req.params, req.eos, req.committed, req.created,
                    (req.kv_to, req.kv_gen) if req.kv_to is not None else None))
        try:
            refused = await asyncio.wait_for(answer, self.answer_timeout)
        except TimeoutError:  # the driver is stopped or wedged; should it take it later, it ends it
            self._send((link.CANCEL, req.id, "refused"))
            refused = (f"the replica's driver did not take the request in {self.answer_timeout:g}s",
                       self.retry_after, False)
        finally:
            self._answers.pop(req.id, None)
        if refused is None:
            return req
        with self._lock:
            self.live.pop(req.id, None)  # the driver's queue counted the refusal
        why, retry_after, draining = refused
        req.on_cancel = None
        req.cancel("refused")
        raise Draining(why.removeprefix("not accepting requests: "), retry_after) if draining \
            else QueueFull(retry_after)

    def state(self) -> tuple[str, int]:
        return self.stats[0], self.stats[1]

    @property
    def closed(self) -> str | None:
        return self.stats[2]

    @property
    def waiting(self) -> int:
        return self.stats[3]

    @property
    def running(self) -> int:
        return self.stats[4]

    @property
    def counts(self) -> dict[str, int]:
        counts = dict(self.stats[5])
        counts["rejected"] = counts.get("rejected", 0) + self.rejected
        return counts

    # -- from the driver ---------------------------------------------------------------------------

    def apply(self, updates: list[tuple[str, list[int], str | None, str | None]], stats: link.Stats) -> None:
        self.stats = stats
        for rid, new, finish, error in updates:
            req = self.live.get(rid)
            if req is None:
                continue
            if finish is not None:
                with self._lock:
                    del self.live[rid]
            req.mirror(new, finish, error)

    def answer(self, rid: str, refused: tuple[str, float, bool] | None) -> None:
        """The driver took the request (None) or refused it: wake its ``submit_async``."""
        fut = self._answers.get(rid)
        if fut is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(_settle, fut, refused)

    def _send(self, msg: tuple) -> None:
        self.conn.send(msg)  # only the event loop's thread sends


def _settle(fut: asyncio.Future[tuple[str, float, bool] | None], refused: tuple[str, float, bool] | None) -> None:
    if not fut.done():  # its wait may have timed out
        fut.set_result(refused)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rallypoint.worker.api_process")
    ap.add_argument("--fd", type=int, required=True, help="this end of the socket pair to the driver")
    ap.add_argument("--model", required=True, help="checkpoint directory (its tokenizer)")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--model-name", required=True)
    ap.add_argument("--title", default="rallypoint api")
    args = ap.parse_args(argv)
    set_title(args.title)
    configure_logging("info")
    conn = Connection(args.fd)
    tokenizer = load_tokenizer(args.model)
    queue = MirrorQueue(conn)
    server: ApiServer | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return 0  # the worker is gone: so are its streams (the gateway resumes them elsewhere)
        kind = msg[0]
        if kind == link.UPDATES:
            queue.apply(msg[1], msg[2])
        elif kind == link.ANSWER:
            queue.answer(msg[1], msg[2])
        elif kind == link.SERVE and server is None:
            spec: link.ServeSpec = msg[1]
            queue.stats = msg[2]
            sock = socket.socket(fileno=recv_handle(conn))  # bound and listening: the driver's
            queue.capacity = spec.capacity
            fe = Frontend(queue=queue, tokenizer=tokenizer, vocab_size=args.vocab_size, state=queue.state,
                          model=args.model_name, max_context=spec.max_context, stream_interval=spec.stream_interval,
                          max_chunk_rate=spec.max_chunk_rate)
            server = ApiServer(fe, api_key=os.environ.get(API_KEY_ENV), sock=sock).serve_in_thread()
        elif kind == link.STOP:
            if server is not None:
                server.stop()
            return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
