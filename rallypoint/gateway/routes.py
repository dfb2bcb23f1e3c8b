"""Where the gateway sends a request: the serving drivers of the newest generation.

Every rallyd publishes its workers in ``status/nodes/<node>`` about once a second, each driver
with the URL of its API. The gateway reads those (this node's own fresh from its daemon), keeps
the drivers that say *serving* in the newest generation, and puts its own node's first, then the
least busy. While etcd is unreachable it keeps routing on the last list it read (fail-static).
"""

from __future__ import annotations

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
    """API URLs of the drivers that serve the newest generation: ``local``'s first, then by load."""
    found = []
    for node, st in statuses.items():
        for w in st.get("workers", []):
            if w.get("driver") and w.get("state") == "serving" and w.get("api") and w.get("process") != "stopped":
                found.append((int(w.get("gen") or 0), node != local, int(w.get("in_flight", 0)), w["api"]))
    if not found:
        return []
    newest = max(g for g, *_ in found)
    return [url for g, _, _, url in sorted(f for f in found if f[0] == newest)]


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
