"""The build guard ends a build that outlives a newer generation or its limit, and nothing else."""

from __future__ import annotations

import threading
import time

from rallypoint.testing.daemons import wait_for
from rallypoint.worker.build_guard import BuildGuard


def guard(superseded: threading.Event, limit: float = 30.0, grace: float = 0.3) -> tuple[BuildGuard, list[str]]:
    stuck: list[str] = []
    return BuildGuard(lambda gen: superseded.is_set(), limit, grace, stuck.append, every=0.02), stuck


def test_a_build_that_finishes_is_left_alone() -> None:
    newer = threading.Event()
    g, stuck = guard(newer)
    with g.watching(5):
        time.sleep(0.1)  # deliberate: the build takes a while, watched
    newer.set()
    time.sleep(0.5)  # deliberate: longer than the grace (0.3 s), in which nothing may fire
    assert stuck == []


def test_a_superseded_build_is_ended_after_the_grace() -> None:
    newer = threading.Event()
    g, stuck = guard(newer, grace=0.3)
    with g.watching(5):
        time.sleep(0.2)  # deliberate: a build not superseded is left alone for ten checks (every 0.02 s)
        assert stuck == []
        newer.set()
        time.sleep(0.15)  # deliberate: half the grace passes
        assert stuck == []  # within the grace
        wait_for("the superseded build to be ended", lambda: stuck, timeout=2, every=0.02)
    assert len(stuck) == 1 and "generation 5" in stuck[0] and "newer generation" in stuck[0]


def test_a_build_past_its_limit_is_ended_once() -> None:
    g, stuck = guard(threading.Event(), limit=0.3)
    with g.watching(2):
        time.sleep(0.8)  # deliberate: blocked well past the 0.3 s limit, which ends it once, not every check
    assert len(stuck) == 1 and "still blocked after" in stuck[0]
