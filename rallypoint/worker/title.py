"""What a rallypoint process says it is in ``ps``, and reading that back.

A worker's title names its cluster, seat, rank, generation and what it is doing; a spare's says it
waits for a seat (``rallypoint spare (cluster demo, node node-a, waiting for a seat)``), so an
operator can tell an adopted spare from a waiting one. ``describe`` reads either a title or the
command line a process had before it set one, for rallyd's tests and tools.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from setproctitle import setproctitle


def worker_title(cluster: str, seat: str, doing: str, rank: int | None = None, gen: int | None = None) -> str:
    """``rallypoint worker rank 3 gen 7 (cluster demo, seat node-a/1, serving)``."""
    who = f" rank {rank} gen {gen}" if rank is not None else ""
    return f"rallypoint worker{who} (cluster {cluster}, seat {seat}, {doing})"


def spare_title(cluster: str, node: str, doing: str) -> str:
    """``rallypoint spare (cluster demo, node node-a, waiting for a seat)``."""
    return f"rallypoint spare (cluster {cluster}, node {node}, {doing})"


def standby_title(cluster: str, node: str, doing: str) -> str:
    """``rallypoint standby (cluster demo, node node-a, ready)``: a standby interpreter, not yet a
    worker (``describe`` says None)."""
    return f"rallypoint standby (cluster {cluster}, node {node}, {doing})"


def set_title(title: str) -> None:
    setproctitle(title)


@dataclass(frozen=True)
class ProcessInfo:
    """A rallypoint worker process as ``ps`` shows it."""

    kind: str  # "worker" or "spare"
    cluster: str
    local_rank: int | None  # None for a spare


_TITLE = re.compile(r"rallypoint (worker|spare)\b.*?\(cluster (\S+), (?:seat \S+/(\d+)|node \S+),")


def describe(cmdline: list[str] | str) -> ProcessInfo | None:
    """What the process with this command line (or title) is, or None if not a worker/spare."""
    cmd = cmdline if isinstance(cmdline, str) else " ".join(cmdline)
    if m := _TITLE.search(cmd):
        return ProcessInfo(m[1], m[2], int(m[3]) if m[3] is not None else None)
    args = cmd.split()
    if "rallypoint.worker" not in args or "--standby" in args:  # a worker, not another module or the standby
        return None
    cluster = args[args.index("--cluster") + 1] if "--cluster" in args[:-1] else ""
    if "--spare" in args:
        return ProcessInfo("spare", cluster, None)
    rank = args[args.index("--local-rank") + 1] if "--local-rank" in args[:-1] else None
    return ProcessInfo("worker", cluster, int(rank) if rank is not None and rank.isdigit() else None)
