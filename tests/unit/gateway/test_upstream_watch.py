"""UpstreamWatch: requests waiting for a serving driver wake when the routes change, not at
their next poll; many waiters share one poll loop."""

from __future__ import annotations

import asyncio
import time

from rallypoint.gateway.routes import UpstreamWatch


def test_waiters_wake_on_a_change_and_share_one_poller() -> None:
    routes: list[str] = []
    calls = 0

    def upstreams() -> list[str]:
        nonlocal calls
        calls += 1
        return list(routes)

    async def scenario() -> tuple[list[float], float, int]:
        watch = UpstreamWatch(upstreams, every=0.005)
        t0 = time.monotonic()

        async def waiter() -> float:
            await watch.wait([], timeout=5.0)
            return time.monotonic() - t0

        tasks = [asyncio.create_task(waiter()) for _ in range(200)]
        await asyncio.sleep(0.2)  # deliberate: 0.2 s (~40 polls) of no change, in which none may wake
        before = calls
        assert not any(t.done() for t in tasks)  # nothing changed: all still wait
        routes.append("http://driver")
        woke = await asyncio.gather(*tasks)
        # a timeout when nothing changes
        t1 = time.monotonic()
        await watch.wait(["http://driver"], timeout=0.05)
        return woke, time.monotonic() - t1, before

    woke, timed_out_after, polls_while_waiting = asyncio.run(scenario())
    assert all(0.2 <= w < 0.3 for w in woke), woke  # within a few polls of the change, not 5 s
    assert 0.05 <= timed_out_after < 0.5
    # 200 waiters over 0.2 s: one poller (~40 polls) plus one look per waiter, not 200 pollers
    assert polls_while_waiting < 200 + 100, polls_while_waiting
