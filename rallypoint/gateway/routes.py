"""Where the gateway sends a request: the serving drivers of the newest generation.

Every rallyd publishes its workers in ``status/nodes/<node>`` about once a second, each driver
with the URL of its API. The gateway reads those (this node's own fresh from its daemon), keeps
the drivers that say *serving* in the newest generation, and puts its own node's first, then the
least busy. While etcd is unreachable it keeps routing on the last list it read (fail-static).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from rallypoint.errors import RallypointError
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient

NodeStatus = dict[str, Any]


def serving_drivers(statuses: dict[str, NodeStatus], local: str) -> list[str]:
    """API URLs of the drivers that serve the newest generation: ``local``'s first, then by load.
    In a disaggregated deployment the prefill replicas serve the decode replicas, not clients,
    unless no decode replica serves."""
    found = [(int(w.get("gen") or 0), w.get("role") == "prefill", node != local, int(w.get("in_flight", 0)), w["api"])
             for node, st in statuses.items() for w in st.get("workers", [])
             if w.get("driver") and w.get("state") == "serving" and w.get("api") and w.get("process") != "stopped"]
    if not found:
        return []
    newest = max(g for g, *_ in found)
    found = [f for f in found if f[0] == newest]
    if not all(prefill for _, prefill, *_ in found):
        found = [f for f in found if not f[1]]
    return [url for *_, url in sorted(found)]


class DriverRoutes:
    """The current list of serving drivers. The other nodes' statuses are re-read from etcd in the
    background (at most every ``refresh`` seconds), so a request never waits on etcd.

    Args:
        client, keys: the cluster's etcd.
        node: this node (its drivers come first).
        local_status: this node's status, fresh (its daemon's ``node_status``).
    """

    def __init__(self, client: EtcdClient, keys: ClusterKeys, node: str,
                 local_status: Callable[[], NodeStatus], refresh: float = 0.2) -> None:
        self.client, self.keys, self.node = client, keys, node
        self.local_status, self.refresh = local_status, refresh
        self._statuses: dict[str, NodeStatus] = {}
        self._read_at = 0.0
        self._reading = threading.Lock()

    def _read(self) -> None:
        try:
            kvs, _ = self.client.get_prefix(self.keys.node_status)
            self._statuses = {kv.key.rsplit("/", 1)[-1]: json.loads(kv.value) for kv in kvs}
        except (RallypointError, ValueError):
            pass  # keep routing on what we knew (fail-static)
        finally:
            self._read_at = time.monotonic()
            self._reading.release()

    def __call__(self) -> list[str]:
        if time.monotonic() - self._read_at >= self.refresh and self._reading.acquire(blocking=False):
            threading.Thread(target=self._read, name="gateway-routes", daemon=True).start()
        statuses = dict(self._statuses)
        statuses[self.node] = self.local_status()
        return serving_drivers(statuses, self.node)


class UpstreamWatch:
    """Wakes the requests that wait for a serving driver (a recovery) the moment the routes
    change. One poll of ``upstreams`` every ``every`` seconds while any request waits, however
    many wait: a thousand held streams cost one cheap call per poll, not a thousand.

    Lives on the gateway's event loop (``wait`` is awaited there).
    """

    def __init__(self, upstreams: Callable[[], list[str]], every: float = 0.005) -> None:
        self.upstreams, self.every = upstreams, every
        self._tick = asyncio.Event()  # set, and replaced, each time the routes change
        self._last: list[str] | None = None
        self._waiters = 0
        self._poller: asyncio.Task[None] | None = None

    async def wait(self, seen: list[str], timeout: float) -> None:
        """Return once ``upstreams()`` is not ``seen``, or after ``timeout`` seconds."""
        self._waiters += 1
        if self._poller is None or self._poller.done():
            self._last = self.upstreams()  # what a change is measured from
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        try:
            async with asyncio.timeout(timeout):
                while self.upstreams() == seen:
                    await self._tick.wait()
        except TimeoutError:
            pass
        finally:
            self._waiters -= 1

    async def _poll(self) -> None:
        while self._waiters:
            now = self.upstreams()
            if now != self._last:
                self._last = now
                tick, self._tick = self._tick, asyncio.Event()
                tick.set()
            await asyncio.sleep(self.every)
        self._last = None
