"""Rendezvous.wake: a daemon's watcher ends the loop's wait for etcd changes at once."""

from __future__ import annotations

import threading
import time

from rallypoint.rendezvous.records import ClusterSpec
from rallypoint.rendezvous.rendezvous import Rendezvous, RendezvousSettings, local_record


def test_wake_ends_the_cycles_wait_at_once_and_changes_nothing() -> None:
    settings = RendezvousSettings(cluster="c", node="a", spec=ClusterSpec(1, 1, 1, 1, 0))
    rv = Rendezvous(None, settings, local_record("a", "127.0.0.1", 0, 1))  # type: ignore[arg-type]
    rv.leader = "b"  # following: a cycle with nothing to do touches no etcd
    threading.Timer(0.05, rv.wake).start()
    t0 = time.monotonic()
    said = rv.run_cycle(timeout=5.0)
    assert time.monotonic() - t0 < 1.0
    assert said == "idle: following b at gen 0" and rv.plan is None and rv.gen == 0
