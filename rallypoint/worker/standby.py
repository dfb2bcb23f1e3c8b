"""A standby interpreter: a worker's start-up done ahead, so a cold restart skips it.

Why: a worker started cold (no warm spare ready) first spends seconds on things that do not
depend on its seat: starting Python and importing torch, safetensors and rallypoint's worker
modules (about 2.5 s on CPU, 4-5 s on a GPU host), then the CUDA driver's
initialisation. rallyd keeps one ``python -m rallypoint.worker --standby`` process that has done
all that and blocks on its stdin. A start (a restart, a seat, a spare) writes it one JSON line,
``{"argv": [worker arguments], "log": "/path/worker-N.log"}``; the standby points its
stdout/stderr at that log and runs the worker's ``main(argv)`` in the same process, as
``python -m rallypoint.worker ARGV`` would. It stays rallyd's own child, so its exit, its PID
and its parent-death signal work as for a worker started fresh.

Unlike a warm spare it holds nothing that depends on the deployment: no etcd session, no model,
no CUDA context (``torch.cuda.init()`` initialises the driver and picks no device: checked on an
H200, no primary context after it), so it serves any seat or spare and is cheap to keep. EOF on
stdin before a line means rallyd is stopping it: exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rallypoint.worker.title import set_title, spare_title, standby_title, worker_title

BAD_ORDER = 2  # the line was not an order (protocol.exit_codes has no code for it): argparse's


def parse_order(line: bytes) -> tuple[list[str], str]:
    """The worker's argv and log path from rallyd's line; ValueError saying what is wrong."""
    try:
        order = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc}): {line[:200]!r}") from None
    argv = order.get("argv") if isinstance(order, dict) else None
    log = order.get("log") if isinstance(order, dict) else None
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and isinstance(log, str) and log):
        raise ValueError(f'expected {{"argv": [strings], "log": "path"}}, got {line[:200]!r}')
    return argv, log


def preimport(device: str) -> None:
    """Everything a worker imports on its way to serving, and the CUDA driver on a GPU node."""
    import rallypoint.worker.graphs
    import rallypoint.worker.probe
    import rallypoint.worker.shards
    import rallypoint.worker.sizing  # noqa: F401

    if device.startswith("cuda"):
        import torch

        try:
            torch.cuda.init()
        except (RuntimeError, AssertionError) as exc:  # the worker meets it again, and reports it
            print(f"rallypoint standby: CUDA not initialised ahead: {exc}", file=sys.stderr, flush=True)


def redirect(log_path: str) -> None:
    """stdout and stderr to the worker's log (appended), stdin from /dev/null: a worker's fds."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def seat_title(argv: list[str]) -> str:
    """What the worker's title will say, until it says it: ``ps`` tells the seat at once."""
    def flag(name: str) -> str:
        return argv[argv.index(name) + 1] if name in argv[:-1] else "?"

    if "--local-rank" not in argv:
        return spare_title(flag("--cluster"), flag("--node"), "starting")
    return worker_title(flag("--cluster"), f"{flag('--node')}/{flag('--local-rank')}", "starting")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rallypoint-worker --standby",
                                 description="import a worker's modules, then run the worker whose "
                                             "argv comes as one JSON line on stdin")
    ap.add_argument("--standby", action="store_true", required=True)
    ap.add_argument("--cluster", default="", help="for the process title")
    ap.add_argument("--node", default="", help="for the process title")
    ap.add_argument("--device", default="cpu", help="cuda: initialise the CUDA driver too")
    args = ap.parse_args(argv)
    parent = os.getppid()
    set_title(standby_title(args.cluster, args.node, "importing"))
    t0 = time.monotonic()
    from rallypoint.log import get_logger
    from rallypoint.worker import main as worker  # torch, and all the worker imports at start

    preimport(args.device)
    # The worker's own --die-with-parent, which lives behind the imports: a parent that died
    # meanwhile is seen below, one that dies from now on SIGKILLs this process.
    worker.die_with_parent()
    if os.getppid() != parent:
        return 0  # rallyd is gone: no line will come
    log = get_logger("standby", pid=os.getpid())
    ready = time.monotonic()
    log.info("worker.standby_ready", import_seconds=round(ready - t0, 3))
    set_title(standby_title(args.cluster, args.node, "ready"))
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # rallyd closed our stdin without an order: it is stopping us
    try:
        worker_argv, log_path = parse_order(line)
        redirect(log_path)
    except (ValueError, OSError) as exc:
        print(f"rallypoint standby: bad order from rallyd: {exc}", file=sys.stderr, flush=True)
        return BAD_ORDER
    set_title(seat_title(worker_argv))
    sys.argv[1:] = worker_argv
    log.info("worker.standby_taken", ready_for_seconds=round(time.monotonic() - ready, 3))  # main begins now
    return worker.main(worker_argv)
