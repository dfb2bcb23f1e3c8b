"""The inbox between rallyd's watcher threads and its loop: nothing lost, order kept, the loop woken."""

from __future__ import annotations

import threading
import time

from rallypoint.recovery.inbox import GpuUnhealthy, Inbox


def test_every_put_is_taken_once_in_order_and_wakes_the_loop() -> None:
    wakes: list[int] = []
    inbox = Inbox(wake=lambda: wakes.append(1))

    def record(base: int) -> None:
        for i in range(200):
            inbox.put(GpuUnhealthy(base + i, "x"))

    threads = [threading.Thread(target=record, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    taken: list[GpuUnhealthy] = []
    while any(t.is_alive() for t in threads) or len(inbox):
        taken += [o for o in inbox.take() if isinstance(o, GpuUnhealthy)]
    assert len(wakes) == 800 and len(taken) == 800
    for k in range(4):  # one thread's observations stay in its order
        mine = [o.gpu for o in taken if o.gpu // 1000 == k]
        assert mine == sorted(mine) and len(mine) == 200


def test_wait_returns_as_soon_as_something_is_recorded() -> None:
    inbox = Inbox()
    assert not inbox.wait(0.01)
    threading.Timer(0.05, inbox.put, args=(GpuUnhealthy(0, "x"),)).start()
    t0 = time.monotonic()
    assert inbox.wait(5.0)
    assert time.monotonic() - t0 < 1.0
    assert len(inbox.take()) == 1 and not inbox.wait(0)  # taken: nothing pending any more
