"""How a worker learns about generations: released plans and "abort generation N" orders.

The worker mirrors its cluster's ``control/`` keys through one resumable etcd watch: it picks up
each released plan that gives its seat a rank, and every abort order, which it applies at once
from the watch thread (the main thread may be blocked inside a collective). The daemon is the one
that writes abort orders when it sees a rank die; anyone with etcd access can (a drill, a test).

Abort order: ``control/abort/<gen>/<ranks>`` = ``{"gen": N, "ranks": [...], "reason": "..."}``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

from rallypoint.errors import MalformedRecord, RallypointError, RendezvousTimeout
from rallypoint.log import get_logger
from rallypoint.rendezvous.etcd import EtcdClient, WatchEvent
from rallypoint.rendezvous.records import ClusterKeys, Plan, gen_from_key

log = get_logger("control")


def abort_key(keys: ClusterKeys, gen: int, ranks: list[int]) -> str:
    return f"{keys.control}abort/{gen:010d}/{'-'.join(map(str, ranks)) or 'all'}"


def drained_key(keys: ClusterKeys, gen: int, replica: int) -> str:
    """Written by a replica's driver once a drain left it with nothing in flight."""
    return f"{keys.root}status/drained/{gen:010d}/{replica}"


def wait_drained(client: EtcdClient, keys: ClusterKeys, gen: int, replicas: list[int], timeout: float,
                 tick: Callable[[], object] = lambda: None) -> set[int]:
    """Poll until every replica in ``replicas`` of ``gen`` reported drained, or ``timeout``
    seconds pass (an etcd blip is waited out); returns the replicas that did. ``tick`` runs
    each round (rallyd pets the systemd watchdog there)."""
    deadline = time.monotonic() + timeout
    prefix = drained_key(keys, gen, 0)[:-1]
    done: set[int] = set()
    while not set(replicas) <= done and time.monotonic() < deadline:
        tick()
        try:
            done = {int(kv.key.rsplit("/", 1)[1]) for kv in client.get_prefix(prefix)[0]}
        except (RallypointError, ValueError):
            pass
        time.sleep(0.05)
    return done


def order_abort(client: EtcdClient, keys: ClusterKeys, gen: int, ranks: list[int], reason: str) -> None:
    """Tell every worker of ``gen`` to abort the groups containing ``ranks`` (all groups if none)."""
    client.put(abort_key(keys, gen, ranks), json.dumps({"gen": gen, "ranks": ranks, "reason": reason}))


class Controller:
    """A worker's view of plans, releases and abort orders.

    Args:
        client: the worker's etcd client.
        cluster: cluster name.
        seat: (node, local_rank) of this worker.
        on_abort: called as ``on_abort(gen, ranks, reason)`` from the watch thread.
        on_drain: called as ``on_drain(nodes)`` from the watch thread when the draining set changes.
    """

    def __init__(self, client: EtcdClient, cluster: str, seat: tuple[str, int] | None,
                 on_abort: Callable[[int, tuple[int, ...], str], None],
                 on_drain: Callable[[set[str]], None] | None = None) -> None:
        self.client = client
        self.keys = ClusterKeys(cluster)
        self.seat = seat
        self.on_abort = on_abort
        self.on_drain = on_drain  # called with the draining nodes whenever they change
        self.plans: dict[int, Plan] = {}
        self.released = 0
        self.draining: set[str] = set()  # nodes leaving: their replicas stop admitting
        self._cond = threading.Condition()
        kvs, rev = client.get_prefix(self.keys.control)
        for kv in kvs:
            self._apply(WatchEvent("put", kv.key, kv.value, kv.mod_revision), replay=True)
        self._watch = client.watch_prefix(self.keys.control, rev + 1)
        threading.Thread(target=self._follow, name="rallypoint-control", daemon=True).start()

    def _follow(self) -> None:
        while (ev := self._watch.get()) is not None:
            self._apply(ev)

    def _apply(self, ev: WatchEvent, replay: bool = False) -> None:
        k = self.keys
        if ev.key.startswith(k.draining):
            node = ev.key[len(k.draining):]
            self.draining.add(node) if ev.kind == "put" else self.draining.discard(node)
            if self.on_drain is not None:
                self.on_drain(set(self.draining))
            return
        if ev.kind != "put":
            return
        try:
            if ev.key.startswith(k.plans):
                plan = Plan.from_json(ev.key, ev.value)
                with self._cond:
                    self.plans[plan.gen] = plan
                    self._cond.notify_all()
            elif ev.key.startswith(k.released):
                with self._cond:
                    self.released = max(self.released, gen_from_key(ev.key))
                    self._cond.notify_all()
            elif ev.key.startswith(f"{k.control}abort/") and not replay:
                order = json.loads(ev.value)
                ranks = tuple(int(r) for r in order.get("ranks", []))
                self.on_abort(int(order["gen"]), ranks, str(order.get("reason", "abort order")))
        except (MalformedRecord, ValueError, TypeError, KeyError) as exc:
            log.error("control.malformed_record", key=ev.key, error=str(exc))

    def set_seat(self, seat: tuple[str, int]) -> None:
        """A spare took a seat: plans for it count from now on."""
        with self._cond:
            self.seat = seat
            self._cond.notify_all()

    def latest(self) -> Plan | None:
        """The newest released plan that gives this seat a rank, if any."""
        with self._cond:
            return self._latest()

    def _latest(self) -> Plan | None:
        for gen in sorted(self.plans, reverse=True):
            if gen <= self.released and any((s.node, s.local_rank) == self.seat for s in self.plans[gen].ranks):
                return self.plans[gen]
        return None

    def wait_plan(self, after: int, timeout: float) -> Plan:
        """Block until a released plan newer than ``after`` includes this seat.

        Raises:
            RendezvousTimeout: none came within ``timeout`` seconds.
        """
        with self._cond:
            ok = self._cond.wait_for(lambda: (p := self._latest()) is not None and p.gen > after, timeout)
            if not ok:
                raise RendezvousTimeout(f"no released plan after gen {after} for seat "
                                        f"{self.seat[0]}/{self.seat[1]} within {timeout:g}s")
            plan = self._latest()
            assert plan is not None
            return plan

    def close(self) -> None:
        self._watch.close()
        self._watch.events.put(None)  # type: ignore[arg-type]
