"""The collective watchdog: one thread per process that trips collectives past their deadline.

It sweeps the tracker every ``interval`` (polling completion handles, learning durations), trips the
oldest pending collective of any group once it is older than ``max(floor, k * p99)``, and publishes
this rank's progress and heartbeat to the board every ``publish_every`` seconds.
"""

from __future__ import annotations

import threading
import time

from rallypoint.comm.collectives import Comm
from rallypoint.errors import RallypointError
from rallypoint.log import get_logger

log = get_logger("watchdog")


class Watchdog(threading.Thread):
    """Watches ``comm``'s outstanding collectives.

    Args:
        comm: the collectives to watch (its tracker, groups and board).
        interval: seconds between sweeps.
        publish_every: seconds between progress/heartbeat publications (0: never).
    """

    def __init__(self, comm: Comm, interval: float = 0.01, publish_every: float = 0.25) -> None:
        super().__init__(name="rallypoint-watchdog", daemon=True)
        self.comm = comm
        self.interval = interval
        self.publish_every = publish_every
        self.trips = 0
        self._halt = threading.Event()
        self._last_publish = 0.0

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.check()
            except Exception:  # the watchdog must outlive any one bad sweep
                log.exception("watchdog.sweep_failed")

    def check(self) -> None:
        """One sweep: trip what is overdue, publish progress when due."""
        tracker = self.comm.tracker
        now = time.monotonic()
        for op in tracker.sweep():
            waited = now - op.start
            if waited > tracker.deadline(op):
                self.trips += 1
                self.comm.trip(op, waited)
        if self.publish_every and now - self._last_publish >= self.publish_every:
            self.publish()

    def publish(self) -> None:
        """Publish this rank's progress and heartbeat now (also called when a generation starts)."""
        self._last_publish = time.monotonic()
        if self.comm.board is None:
            return
        try:
            self.comm.board.publish(self.comm.groups.gen, self.comm.groups.rank, self.comm.tracker.progress())
        except RallypointError as exc:
            log.warning("watchdog.publish_failed", error=str(exc))
