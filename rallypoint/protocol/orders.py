"""The orders and reports daemons, workers and rallyctl leave for each other in etcd.

Each has a writer on one side and a reader on the other; both sides call the functions here, so a
key or a value format lives in one place:

* abort order (``control/abort/<gen>/<ranks>``): a daemon that saw a rank die writes it, every
  worker of that generation aborts the groups holding those ranks;
* re-plan request (``control/replan/<gen>``): a daemon whose worker died, or a worker whose build
  failed, asks the leader for the next plan;
* drained report (``status/drained/<gen>/<replica>``): a draining replica's driver says nothing is
  in flight any more; the daemon (or ``rallyctl drain``) waits for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rallypoint.errors import MalformedRecord, RallypointError
from rallypoint.protocol.keys import ClusterKeys

if TYPE_CHECKING:
    from rallypoint.rendezvous.etcd import EtcdClient


@dataclass(frozen=True)
class AbortOrder:
    """Abort generation ``gen``'s groups holding ``ranks`` (every group when empty); each worker
    aborts those of its own groups that contain one of them."""

    gen: int
    ranks: tuple[int, ...]
    reason: str

    def to_json(self) -> str:
        return json.dumps({"gen": self.gen, "ranks": list(self.ranks), "reason": self.reason})

    @classmethod
    def from_json(cls, key: str, raw: bytes | str) -> AbortOrder:
        """Raises ``MalformedRecord`` naming ``key`` for a value that is not an abort order."""
        try:
            d = json.loads(raw)
            return cls(int(d["gen"]), tuple(int(r) for r in d.get("ranks", [])),
                       str(d.get("reason", "abort order")))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise MalformedRecord(key, f"not an abort order ({exc})") from None


def order_abort(client: EtcdClient, keys: ClusterKeys, gen: int, ranks: list[int], reason: str) -> None:
    """Tell every worker of ``gen`` to abort the groups containing ``ranks`` (all groups if none)."""
    client.put(keys.abort(gen, ranks), AbortOrder(gen, tuple(ranks), reason).to_json())


def request_replan(client: EtcdClient, keys: ClusterKeys, gen: int, reason: str) -> bool:
    """Ask the leader for the next plan because generation ``gen`` cannot serve. Any thread.

    Returns False when someone already asked for that generation (the first reason stands).
    """
    return client.create(keys.replan_of(gen), reason)


def mark_drained(client: EtcdClient, keys: ClusterKeys, gen: int, replica: int, lease: int | None) -> None:
    """Say that ``replica`` of ``gen`` has nothing in flight (from its driver, on its lease)."""
    client.put(keys.drained_replica(gen, replica), str(time.time()), lease=lease)


def wait_drained(client: EtcdClient, keys: ClusterKeys, gen: int, replicas: list[int], timeout: float,
                 tick: Callable[[], object] = lambda: None) -> set[int]:
    """Poll until every replica in ``replicas`` of ``gen`` reported drained, or ``timeout``
    seconds pass (an etcd blip is waited out); returns the replicas that did. ``tick`` runs
    each round (rallyd pets the systemd watchdog there)."""
    deadline = time.monotonic() + timeout
    prefix = keys.drained_of(gen)
    done: set[int] = set()
    while not set(replicas) <= done and time.monotonic() < deadline:
        tick()
        try:
            done = {int(kv.key.rsplit("/", 1)[1]) for kv in client.get_prefix(prefix)[0]}
        except (RallypointError, ValueError):
            pass
        time.sleep(0.05)
    return done
