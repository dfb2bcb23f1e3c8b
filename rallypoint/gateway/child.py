"""A gateway process: ``python -m rallypoint.gateway.child``, one of ``[gateway] processes``.

Why processes: the gateway's work is Python per request (parse, validate, open an upstream) and
per chunk (read, re-frame, write). In one event loop on a thread of rallyd, a burst of 256 streams
held it at a full core while the replica behind it had room: the first tokens waited 0.6-0.9 s in
the gateway's accept and admission alone. Several processes, each on a socket of the same port,
split that work over cores, as the replica's API process did for its driver.

rallyd (``processes.GatewayProcesses``) starts each with its listening socket and one end of a
socket pair, and keeps it fed: the serving drivers' URLs each time they change. The process sends
back what rallyd's metrics count (each request's outcome, each resume). It imports no torch: it
starts in about half a second. When rallyd's end of the pair closes (rallyd died or stops it) it
finishes its open responses for up to a second and exits.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from rallypoint.api import API_KEY_ENV
from rallypoint.gateway import processes as link
from rallypoint.gateway.server import Gateway
from rallypoint.log import configure_logging, get_logger
from rallypoint.worker.title import set_title

log = get_logger("gateway.child")


class RallydLink:
    """This process's end of the pair: the routes rallyd sends, and the counts it is sent."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.routes: list[str] = []
        self._send_lock = threading.Lock()

    def upstreams(self) -> list[str]:
        return self.routes  # replaced whole by the reader, never changed in place

    def send(self, msg: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self.conn.send(msg)
        except OSError:
            pass  # rallyd is gone; the reader sees it and stops the server

    def follow(self, gateway: Gateway) -> None:
        """Apply rallyd's messages until it says stop or its end closes; then stop serving."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                log.warning("gateway.rallyd_lost")
                break
            if msg[0] == link.ROUTES:
                self.routes = list(msg[1])
            elif msg[0] == link.STOP:
                break
        gateway.server.should_exit = True  # open streams get timeout_graceful_shutdown to finish


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rallypoint.gateway.child")
    ap.add_argument("--fd", type=int, required=True, help="this end of the socket pair to rallyd")
    ap.add_argument("--listen-fd", type=int, required=True, help="the listening socket rallyd bound")
    ap.add_argument("--model", required=True, help="the name the deployment serves its checkpoint under")
    ap.add_argument("--resume-timeout", type=float, required=True)
    ap.add_argument("--started-at", type=float, required=True)
    ap.add_argument("--title", default="rallypoint gateway")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    set_title(args.title)
    configure_logging(args.log_level)
    rallyd = RallydLink(Connection(args.fd))
    msg = rallyd.conn.recv()  # the routes as they are now, before the first request
    rallyd.routes = list(msg[1]) if msg[0] == link.ROUTES else []
    sock = socket.socket(fileno=args.listen_fd)
    gateway = Gateway("", 0, rallyd.upstreams, args.resume_timeout, model=args.model,
                      api_key=os.environ.get(API_KEY_ENV), sock=sock, started_at=args.started_at,
                      on_request=lambda outcome: rallyd.send((link.OUTCOME, outcome)),
                      on_resume=lambda: rallyd.send((link.RESUMED,)))
    threading.Thread(target=rallyd.follow, args=(gateway,), name="gateway-rallyd-link", daemon=True).start()
    rallyd.send((link.READY, os.getpid()))
    gateway.server.run(sockets=[sock])  # on the main thread: SIGTERM finishes the open streams, then exits
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the HTTP client's pool and the link thread need no orderly teardown
