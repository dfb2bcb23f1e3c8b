"""How rallyd carries out what its recovery coordinator decides: the coordinator's ``Mechanics``.

The coordinator (``recovery.coordinator``) holds the policy and nothing that talks to etcd or to a
process; this module is the other half: abort orders and re-plan requests written to etcd, events
queued, signals sent, the node record's bad seats and the cluster phase published, heartbeats and
GPU health read. Each write logs its own failure and never raises, so one failed etcd call does
not keep a seat from its replacement (the error is logged under its stable ``rallyd.*`` name).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from rallypoint.errors import EtcdError, RallypointError
from rallypoint.protocol.orders import order_abort
from rallypoint.recovery import events as ev

if TYPE_CHECKING:
    from structlog.stdlib import BoundLogger

    from rallypoint.daemon.channel import ChannelServer, Peer
    from rallypoint.daemon.gpu_health import GpuHealth
    from rallypoint.recovery.events import EventLog
    from rallypoint.rendezvous.etcd import EtcdClient
    from rallypoint.rendezvous.rendezvous import Rendezvous


class NodeMechanics:
    """The coordinator's hands on this node (implements ``recovery.coordinator.Mechanics``).

    Args:
        client: the daemon's etcd client.
        rendezvous: this node's rendezvous (its keys, lease, record and leadership).
        events: where recovery events are queued.
        channel: the local channel to the workers (their heartbeats), if there are workers.
        log: rallyd's logger.
    """

    def __init__(self, client: EtcdClient, rendezvous: Rendezvous, events: EventLog,
                 channel: ChannelServer | None, log: BoundLogger) -> None:
        self.client = client
        self.rendezvous = rendezvous
        self.keys = rendezvous.keys
        self.events = events
        self.channel = channel
        self.log = log
        self.gpu_health: GpuHealth | None = None  # set once NVML is up (at join)

    def order_abort(self, gen: int, ranks: list[int], reason: str) -> bool:
        """Tell generation ``gen``'s workers to abort the groups holding ``ranks``, and record it."""
        try:
            order_abort(self.client, self.keys, gen, ranks, reason)
        except RallypointError as exc:
            self.log.error("rallyd.abort_order_failed", gen=gen, error=str(exc))
            return False
        self.events.emit(gen, ev.ABORT_ORDERED, ranks=ranks, reason=reason)
        return True

    def request_replan(self, gen: int, reason: str) -> None:
        try:
            self.rendezvous.request_replan(gen, reason)
        except RallypointError as exc:
            self.log.error("rallyd.replan_request_failed", gen=gen, error=str(exc))

    def emit(self, gen: int, kind: str, **detail: Any) -> None:
        self.events.emit(gen, kind, **detail)

    def signal(self, pid: int, sig: int) -> bool:
        """Send ``sig`` to ``pid``; False when it is already gone (its exit is reported anyway)."""
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def publish_bad_seats(self, local_ranks: tuple[int, ...]) -> None:
        """Put the seats out of placement in this node's record (the leader places around them)."""
        rec = self.rendezvous.record
        if rec.bad_seats == local_ranks:
            return
        try:
            self.rendezvous.update_record(replace(rec, bad_seats=local_ranks))
        except RallypointError as exc:
            self.log.error("rallyd.record_update_failed", error=str(exc))

    def publish_phase(self, state: dict[str, object]) -> None:
        """(Leader) the cluster's recovery phase, in ``status/recovery``."""
        try:
            self.client.put(self.keys.recovery, json.dumps(state))
        except EtcdError as exc:
            self.log.warning("rallyd.recovery_unpublished", error=str(exc))

    def clear_kill_order(self, key: str) -> None:
        with contextlib.suppress(RallypointError):
            self.client.delete(key)

    def is_leader(self) -> bool:
        return self.rendezvous.is_leader

    def _peer(self, pid: int) -> Peer | None:
        return self.channel.peers.get(pid) if self.channel is not None else None

    def beat_at(self, pid: int) -> float | None:
        peer = self._peer(pid)
        return peer.beat_at if peer is not None else None

    def beat_gen(self, pid: int) -> int | None:
        """The generation ``pid``'s last heartbeat named (None: no beat yet, or none named)."""
        peer = self._peer(pid)
        gen = peer.last.get("gen") if peer is not None else None
        return gen if isinstance(gen, int) else None

    def gpu_problem(self, local_rank: int) -> str:
        return (self.gpu_health.bad.get(local_rank) or "") if self.gpu_health is not None else ""
