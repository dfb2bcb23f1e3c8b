"""The collective watchdog: one thread per process that trips collectives past their deadline.

It sweeps the tracker every ``interval`` (polling completion handles, learning durations), trips the
oldest pending collective of any group once it is older than ``max(floor, k * p99)``, and publishes
this rank's progress and heartbeat to the board every ``publish_every`` seconds, from a thread
of its own so that a slow etcd never delays a sweep.
"""

from __future__ import annotations

import threading
import time

from rallypoint.comm.collectives import Comm
from rallypoint.errors import RallypointError
from rallypoint.log import get_logger

log = get_logger("watchdog")
LONG_WAIT = 3.0  # seconds: a pending collective this old, not yet past its deadline, is logged


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
        self._told: object | None = None

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        if self.publish_every:
            # Publishing waits on etcd (retries included, seconds in an outage); sweeping must not.
            threading.Thread(target=self._publish_loop, name="rallypoint-progress", daemon=True).start()
        while not self._halt.wait(self.interval):
            try:
                self.check()
            except Exception:  # the watchdog must outlive any one bad sweep
                log.exception("watchdog.sweep_failed")

    def _publish_loop(self) -> None:
        while not self._halt.wait(self.publish_every):
            try:
                self.publish()
            except Exception:
                log.exception("watchdog.publish_failed")

    def check(self) -> None:
        """One sweep: trip what is overdue."""
        tracker = self.comm.tracker
        now = time.monotonic()
        for op in tracker.sweep():
            waited = now - op.start
            deadline = tracker.deadline(op)
            if waited > deadline:
                self.trips += 1
                self.comm.trip(op, waited)
            elif waited > LONG_WAIT and op is not self._told:
                self._told = op  # once per op: a wait this long under its deadline is worth a look
                log.warning("watchdog.long_wait", group=op.group.label, seq=op.seq, op=op.op,
                            waited=round(waited, 3), deadline=round(deadline, 3))

    def publish(self) -> None:
        """Publish this rank's progress and heartbeat now (also called when a generation starts)."""
        if self.comm.board is None:
            return
        try:
            self.comm.board.publish(self.comm.groups.gen, self.comm.groups.rank, self.comm.tracker.progress())
        except RallypointError as exc:
            log.warning("watchdog.publish_failed", error=str(exc))
