"""Bookkeeping of every collective: what was issued, what completed, how long that usually takes.

The hot path (``issue``) does one small allocation and one deque append. Completion is noticed by
whoever looks first: the main thread when it waits (CPU), or the watchdog thread polling the
completion handle (GPU: the Work's CUDA end event). Durations feed per (op, size) percentiles, from
which each collective's deadline is ``max(floor, k * p99)``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from rallypoint.groups.group import Group

_HISTORY = 256
_WARMUP = 4  # a group's first collectives set up its connections (NCCL: lazily, 0.1-1 s): not learned


class Op:
    """One issued collective."""

    __slots__ = ("done", "group", "nbytes", "op", "seq", "start", "work")

    def __init__(self, group: Group, seq: int, op: str, nbytes: int, start: float, work: Any) -> None:
        self.group = group
        self.seq = seq
        self.op = op
        self.nbytes = nbytes
        self.start = start
        self.work = work  # torch Work: is_completed() polls its CUDA end event on NCCL
        self.done = 0.0

    def describe(self) -> dict[str, Any]:
        return {"group": self.group.label, "gen": self.group.gen, "seq": self.seq, "op": self.op,
                "bytes": self.nbytes}


@dataclass(frozen=True)
class Deadlines:
    """``deadline = max(floor, k * p99 of that op and size)``; seconds."""

    floor: float = 1.0
    k: float = 20.0


class Tracker:
    """Outstanding collectives per group, per-group progress counters, and duration history."""

    def __init__(self, deadlines: Deadlines = Deadlines()) -> None:
        self.deadlines = deadlines
        self.outstanding: dict[int, deque[Op]] = {}
        self.completed: dict[int, int] = {}  # id(group) -> highest seq known complete
        self._groups: dict[int, Group] = {}
        self._history: dict[tuple[str, int], deque[float]] = {}
        self._lock = threading.Lock()

    def issue(self, group: Group, op: str, nbytes: int, work: Any) -> Op:
        """Record a collective just issued on ``group``."""
        group.seq += 1
        rec = Op(group, group.seq, op, nbytes, time.monotonic(), work)
        key = id(group)
        q = self.outstanding.get(key)
        if q is None:
            with self._lock:
                q = self.outstanding.setdefault(key, deque())
                self._groups[key] = group
                self.completed.setdefault(key, 0)
        q.append(rec)
        return rec

    def finish(self, rec: Op, when: float | None = None) -> None:
        """Mark ``rec`` complete (idempotent) and learn its duration."""
        if rec.done:
            return
        rec.done = when or time.monotonic()
        key = id(rec.group)
        if rec.seq > self.completed.get(key, 0):
            self.completed[key] = rec.seq
        if rec.seq <= _WARMUP:
            return  # one warm-up outlier would raise the deadline to k times it for ~100 calls
        hist = self._history.get((rec.op, rec.nbytes.bit_length()))
        if hist is None:
            hist = self._history.setdefault((rec.op, rec.nbytes.bit_length()), deque(maxlen=_HISTORY))
        hist.append(rec.done - rec.start)

    def deadline(self, rec: Op) -> float:
        """Seconds ``rec`` may take before it counts as hung."""
        hist = self._history.get((rec.op, rec.nbytes.bit_length()))
        if not hist:
            return self.deadlines.floor
        ordered = sorted(hist)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return max(self.deadlines.floor, self.deadlines.k * p99)

    def sweep(self) -> list[Op]:
        """Drop completed ops; return the oldest pending op of each group.

        Ops of one group complete in issue order (one stream, one gloo context), so a sweep asks
        the newest op first (one query clears the queue on a healthy group) and otherwise
        bisects for the first pending one: a handful of handle queries per group, however many
        calls were issued back to back since the last sweep.
        """
        now = time.monotonic()
        heads = []
        with self._lock:
            queues = list(self.outstanding.items())
        for _key, q in queues:
            n = len(q)
            if n == 0:
                continue
            if _complete(q[n - 1]):
                for _ in range(n):
                    self.finish(q.popleft(), now)
                continue
            lo, hi = 0, n - 1  # q[hi] is pending; find the first pending index
            while lo < hi:
                mid = (lo + hi) // 2
                if _complete(q[mid]):
                    lo = mid + 1
                else:
                    hi = mid
            for _ in range(lo):
                self.finish(q.popleft(), now)
            if q and not q[0].group.aborted:
                heads.append(q[0])
        return heads

    def progress(self) -> dict[str, list[int]]:
        """Per group label: [last started seq, last completed seq]."""
        with self._lock:
            groups = list(self._groups.items())
        return {g.label: [g.seq, self.completed.get(k, 0)] for k, g in groups}

    def forget(self, group: Group) -> None:
        """Stop tracking a group (it was replaced)."""
        key = id(group)
        with self._lock:
            self.outstanding.pop(key, None)
            self._groups.pop(key, None)
            self.completed.pop(key, None)


def _complete(op: Op) -> bool:
    if op.done:
        return True
    try:
        return op.work is None or bool(op.work.is_completed())
    except Exception:
        return False  # a failed work: whoever waits on it reports the error
