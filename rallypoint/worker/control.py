"""How a worker learns about generations: released plans and "abort generation N" orders.

The worker mirrors its cluster's ``control/`` keys through one resumable etcd watch: it picks up
each released plan that gives its seat a rank, and every abort order (``protocol.orders``), which
it applies at once from the watch thread (the main thread may be blocked inside a collective). The
daemon is the one that writes abort orders when it sees a rank die; anyone with etcd access can (a
drill, a test).

At start it reads only what it can act on, so that starting into an old cluster costs what it
costs in a new one: the newest release, the plans from that generation on (the process was
started for a plan its daemon had released, never an older one), and the draining nodes. Abort
orders are not read back at all: only those seen on the watch are applied.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from rallypoint.errors import MalformedRecord, RendezvousTimeout
from rallypoint.log import get_logger
from rallypoint.protocol.keys import ClusterKeys, gen_from_key
from rallypoint.protocol.orders import AbortOrder
from rallypoint.rendezvous.etcd import EtcdClient, KeyValue, WatchEvent, prefix_end
from rallypoint.rendezvous.records import Plan

log = get_logger("control")


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
                 on_drain: Callable[[set[str]], object] | None = None) -> None:
        self.client = client
        self.keys = ClusterKeys(cluster)
        self.seat = seat
        self.on_abort = on_abort
        self.on_drain = on_drain  # called with the draining nodes whenever they change
        self.plans: dict[int, Plan] = {}
        self.released = 0
        self.draining: set[str] = set()  # nodes leaving: their replicas stop admitting
        self._cond = threading.Condition()
        kvs, rev = self._read_start()
        for kv in kvs:
            self._apply(WatchEvent("put", kv.key, kv.value, kv.mod_revision), replay=True)
        self._watch = client.watch_prefix(self.keys.control, rev + 1)
        threading.Thread(target=self._follow, name="rallypoint-control", daemon=True).start()

    def _read_start(self) -> tuple[list[KeyValue], int]:
        """The keys under ``control/`` this worker needs, and the one revision they are read at:
        the newest release, the plans from its generation on, the draining nodes. Bounded by the
        cluster's size, not its age."""
        k, c = self.keys, self.client
        newest, rev = c.get_range(k.released, prefix_end(k.released), limit=1, newest_first=True)
        if newest and not newest[0].key[len(k.released):].isdigit():  # a stray key sorts last: read all
            newest, _ = c.get_range(k.released, prefix_end(k.released), revision=rev)
        since = max((int(g) for kv in newest if (g := kv.key[len(k.released):]).isdigit()), default=0)
        plans, _ = c.get_range(k.plan(since), prefix_end(k.plans), revision=rev)
        draining, _ = c.get_range(k.draining, prefix_end(k.draining), revision=rev)
        return newest + plans + draining, rev

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
            gen = ev.key[len(k.plans):]
            if ev.key.startswith(k.plans) and gen.isdigit():  # pruned by the leader: long out of use
                with self._cond:
                    self.plans.pop(int(gen), None)
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
            elif ev.key.startswith(k.aborts) and not replay:
                order = AbortOrder.from_json(ev.key, ev.value)
                self.on_abort(order.gen, order.ranks, order.reason)
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
                seat = f"{self.seat[0]}/{self.seat[1]}" if self.seat is not None else "(none yet)"
                raise RendezvousTimeout(f"no released plan after gen {after} for seat {seat} within {timeout:g}s")
            plan = self._latest()
            assert plan is not None
            return plan

    def close(self) -> None:
        self._watch.close()
        self._watch.events.put(None)  # type: ignore[arg-type]
