"""Recovery events: what happened to a generation, when, and who saw it, kept in etcd.

Every process that takes part in a recovery writes the step it took as one event under
``events/<gen>/``: the daemon that saw a rank die (``rank_failed``, ``abort_ordered``), the leader
(``plan_written``, ``released``), each worker (``groups_built``, ``shard_loaded``, ``serving``) and
the replica's driver (``first_token``). Events carry a wall-clock timestamp from their writer, so one
generation's events, read together, are the recovery's timeline (``rallyctl events``, the
recovery benchmark) and the input of the state machine in ``machine.py``.

Writes go through a background thread: a worker on the critical path of a recovery only queues
the event. An etcd outage loses no serving time, only (after a bounded queue fills) old events.

Key: ``ClusterKeys.event`` (``events/<gen>/<time_ns>-<by>-<kind>``); value: JSON ``Event``.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rallypoint.errors import EtcdError, MalformedRecord
from rallypoint.log import get_logger
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient

log = get_logger("recovery.events")

# Event kinds, in the order a recovery produces them. Stable names: tools match on them.
RANK_FAILED = "rank_failed"          # a daemon saw its worker exit (or killed a stuck one)
SUSPECT_NAMED = "suspect_named"      # a watchdog's diagnosis named a rank stuck/dead
ABORT_ORDERED = "abort_ordered"      # "abort generation N" was written
REPLACEMENT = "replacement"          # the seat got a new process: warm spare or cold restart
SEAT_BAD = "seat_bad"                # a seat will not be reused (GPU unhealthy, restart budget spent)
REPLAN_REQUESTED = "replan_requested"
PLAN_WRITTEN = "plan_written"        # the leader wrote generation N (event under gen N)
CANNOT_PLAN = "cannot_plan"          # no valid layout fits the live capacity
LAYOUT_OK = "layout_ok"              # after cannot_plan: the current plan fits again, unchanged
RELEASED = "released"                # every member acked: workers build groups
GROUPS_BUILT = "groups_built"        # one rank's groups for the generation are up
SHARD_LOADED = "shard_loaded"        # one rank holds its weights (seconds=0 when they stayed)
SERVING = "serving"                  # one rank entered the serving loop
FIRST_TOKEN = "first_token"          # a driver committed the generation's first token
FIRST_STEP = "first_step"            # the all-reduce probe's first call of the generation completed
DRAINING = "draining"                # a node stopped admitting requests before leaving
DRAINED = "drained"                  # its replicas finished (or the deadline passed)

KINDS = (RANK_FAILED, SUSPECT_NAMED, ABORT_ORDERED, REPLACEMENT, SEAT_BAD, REPLAN_REQUESTED,
         PLAN_WRITTEN, CANNOT_PLAN, LAYOUT_OK, RELEASED, GROUPS_BUILT, SHARD_LOADED, SERVING, FIRST_TOKEN,
         FIRST_STEP, DRAINING, DRAINED)


@dataclass(frozen=True)
class Event:
    """One step of a generation's life.

    Attributes:
        gen: the generation it belongs to (a failure belongs to the generation that failed).
        kind: one of ``KINDS``.
        at: wall-clock seconds (``time.time()``) on the writer's host.
        by: who wrote it: a node id, or ``node/local_rank`` for a worker.
        detail: kind-specific fields (``rank``, ``reason``, ``seconds``, ``strategy``...).
        pid: the writing process (0 when unknown): lets a check prove that no process of an
            older generation wrote into a newer one.
    """

    gen: int
    kind: str
    at: float
    by: str
    detail: dict[str, Any] = field(default_factory=dict)
    pid: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, key: str, raw: bytes | str) -> Event:
        try:
            d = json.loads(raw)
            ev = cls(gen=int(d["gen"]), kind=str(d["kind"]), at=float(d["at"]), by=str(d["by"]),
                     detail=dict(d.get("detail") or {}), pid=int(d.get("pid") or 0))
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedRecord(key, f"not an event ({exc})") from None
        return ev


class EventLog:
    """Queue events and write them to etcd from one background thread.

    Args:
        client: an etcd client (shared with the caller; calls are thread-safe).
        keys: the cluster's keys.
        by: this writer's name.
        capacity: events kept while etcd is unreachable; the oldest are dropped past it.
    """

    def __init__(self, client: EtcdClient, keys: ClusterKeys, by: str, capacity: int = 1000) -> None:
        self.client, self.keys, self.by = client, keys, by
        self._queue: queue.Queue[Event | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._write_loop, name="rallypoint-events", daemon=True)
        self._thread.start()

    def emit(self, gen: int, kind: str, by: str | None = None, at: float | None = None, **detail: Any) -> Event:
        """Record ``kind`` for generation ``gen`` now (or at ``at``); returns the event queued."""
        ev = Event(gen=gen, kind=kind, at=time.time() if at is None else at, by=by or self.by, detail=detail,
                   pid=os.getpid())
        while True:
            try:
                self._queue.put_nowait(ev)
                return ev
            except queue.Full:
                try:
                    self._queue.get_nowait()  # drop the oldest: the newest say more
                    self._queue.task_done()
                except queue.Empty:
                    pass

    def _write_loop(self) -> None:
        while (ev := self._queue.get()) is not None:
            for attempt in range(20):
                try:
                    self.client.put(self.keys.event(ev.gen, ev.at, ev.by, ev.kind), ev.to_json())
                    break
                except EtcdError as exc:
                    if attempt == 0:
                        log.warning("events.write_retrying", kind=ev.kind, gen=ev.gen, error=str(exc))
                    time.sleep(0.5)
            else:
                log.error("events.dropped", kind=ev.kind, gen=ev.gen)
            self._queue.task_done()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event is written (or dropped); True if that happened in time."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 2.0) -> None:
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout)


def read_events(client: EtcdClient, keys: ClusterKeys, gen: int | None = None) -> list[Event]:
    """Every event (of ``gen``, or all), oldest first; malformed ones are logged and skipped."""
    kvs, _ = client.get_prefix(keys.events if gen is None else keys.events_of(gen))
    out = []
    for kv in kvs:
        try:
            out.append(Event.from_json(kv.key, kv.value))
        except MalformedRecord as exc:
            log.error("events.malformed", key=kv.key, error=str(exc))
    return sorted(out, key=lambda e: (e.at, e.gen))


def prune_events(client: EtcdClient, keys: ClusterKeys, keep_from_gen: int) -> int:
    """Delete the events of generations older than ``keep_from_gen``; returns generations dropped."""
    return _prune_generations(client, keys.events, keep_from_gen)


def prune_stores(client: EtcdClient, keys: ClusterKeys, keep_from_gen: int) -> int:
    """Delete the group stores (``store/<gen>/``) of generations older than ``keep_from_gen``."""
    return _prune_generations(client, keys.stores, keep_from_gen)


def _prune_generations(client: EtcdClient, base: str, keep_from_gen: int) -> int:
    kvs, _ = client.get_prefix(base)
    gens = {kv.key[len(base):].split("/", 1)[0] for kv in kvs}
    old = sorted(g for g in gens if g.isdigit() and int(g) < keep_from_gen)
    for g in old:
        client.delete_prefix(f"{base}{g}/")
    return len(old)
