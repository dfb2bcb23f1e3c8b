"""What rallyd's watcher threads record for its recovery coordinator, and the inbox they record it in.

A watcher (a worker's exit, an etcd watch, the NVML poller) never decides anything: it wraps what
it saw in one of these frozen records, raw where parsing could fail (a malformed record is the
loop's to report), and puts it in the ``Inbox``. The daemon's loop takes them all, oldest first,
once per cycle (``recovery.coordinator``). ``Inbox.put`` also wakes the loop, so recording costs
a recovery no time.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rallypoint.rendezvous.records import Plan


@dataclass(frozen=True)
class WorkerExited:
    """A seat's worker exited without being asked to (``plan``: the generation it was in)."""

    plan: Plan | None
    local_rank: int
    pid: int
    code: int


@dataclass(frozen=True)
class DiagnosisWritten:
    """A watchdog's diagnosis appeared under ``status/diagnosis/`` (raw, parsed on the loop)."""

    key: str
    value: bytes


@dataclass(frozen=True)
class KillOrdered:
    """``rallyctl kill`` asked for a signal to one of this node's seats (``control/kill/``)."""

    key: str
    value: bytes


@dataclass(frozen=True)
class EventWritten:
    """A recovery event of the cluster appeared under ``events/`` (folded into the phase)."""

    key: str
    value: bytes


@dataclass(frozen=True)
class GpuUnhealthy:
    """NVML says GPU ``gpu`` (the seat of the same local rank) is unhealthy."""

    gpu: int
    why: str


@dataclass(frozen=True)
class PredecessorLost:
    """This rallyd started into a released ``plan`` naming its node: its predecessor's ranks died."""

    plan: Plan


Observation = WorkerExited | DiagnosisWritten | KillOrdered | EventWritten | GpuUnhealthy | PredecessorLost


class Inbox:
    """Observations recorded by any thread, taken by the loop in arrival order.

    Args:
        wake: called after each ``put`` to end the loop's current wait early (any thread).
    """

    def __init__(self, wake: Callable[[], None] | None = None) -> None:
        self._items: deque[Observation] = deque()
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._wake = wake

    def put(self, obs: Observation) -> None:
        with self._lock:
            self._items.append(obs)
        self._arrived.set()
        if self._wake is not None:
            self._wake()

    def take(self) -> list[Observation]:
        """Everything recorded since the last ``take``, oldest first."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._arrived.clear()
        return items

    def wait(self, timeout: float) -> bool:
        """Block until something is recorded (True) or ``timeout`` seconds pass (False)."""
        return self._arrived.wait(timeout)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
