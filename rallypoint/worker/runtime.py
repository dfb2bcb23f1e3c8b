"""A rank process's distributed runtime: etcd session, groups, collectives, watchdog.

``RankRuntime.configure(plan, node, local_rank)`` brings up the generation's groups (carrying over
the healthy, unchanged ones); ``abort_generation`` is the external "abort generation N" order. A
group aborted here is also marked *tainted* in etcd, so its other members rebuild it too rather
than carrying over a group whose peer already gave up on it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

from rallypoint.comm.collectives import Comm
from rallypoint.comm.diagnosis import Diagnosis, ProgressBoard
from rallypoint.comm.tracker import Deadlines, Tracker
from rallypoint.comm.watchdog import Watchdog
from rallypoint.errors import EtcdError
from rallypoint.groups.group import Cancelled, Group
from rallypoint.groups.group_set import GroupSet
from rallypoint.groups.topology import GroupSpec, PlanLike, rank_at
from rallypoint.log import get_logger
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings
from rallypoint.rendezvous.store import EtcdStore

os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")


@dataclass(frozen=True)
class RuntimeSettings:
    """Per-process runtime settings; seconds throughout."""

    cluster: str
    etcd: EtcdSettings
    device: str = "cpu"  # "cpu" or "cuda:N"
    deadline_floor: float = 1.0
    deadline_k: float = 20.0
    build_timeout: float = 30.0
    lease_ttl: float = 3.0
    watchdog_interval: float = 0.01
    publish_every: float = 0.25
    group_names: tuple[str, ...] = ("tp", "pp", "dp")


class RankRuntime:
    """Everything a rank needs to talk to its peers, across generations."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self.keys = ClusterKeys(settings.cluster)
        self.client = EtcdClient(settings.etcd)
        self.lease = self.client.keep_alive(settings.lease_ttl, on_lost=self._renew_lease)
        self.device = torch.device(settings.device)
        if self.device.type == "cpu":
            # Several rank processes share the cores: intra-op threads would only fight (10x slower).
            torch.set_num_threads(int(os.environ.get("RALLYPOINT_CPU_THREADS", "1")))
        self.tracker = Tracker(Deadlines(settings.deadline_floor, settings.deadline_k))
        self.groups: GroupSet | None = None
        self.comm: Comm | None = None
        self.watchdog: Watchdog | None = None
        self.seat = ""
        self.log = get_logger("runtime", cluster=settings.cluster)
        # A peer that aborts a group marks it tainted in etcd; we abort our side at once, so a
        # member waiting on a live-but-abandoned peer does not have to wait for its own deadline.
        self._taints = self.client.watch_prefix(self.keys.taints, self.client.count_prefix(self.keys.taints)[1] + 1)
        threading.Thread(target=self._follow_taints, name="rallypoint-taints", daemon=True).start()

    def _renew_lease(self, lost: int) -> None:
        """The lease expired (etcd was unreachable longer than its TTL): take a new one and go on.

        Called from the lease keeper thread; keys written from now on ride the new lease.
        """
        while True:
            try:
                self.lease = self.client.keep_alive(self.settings.lease_ttl, on_lost=self._renew_lease)
                break
            except EtcdError as exc:
                self.log.warning("runtime.lease_renew_failed", error=str(exc))
                time.sleep(0.5)
        if self.comm is not None and self.comm.board is not None:
            self.comm.board.lease = self.lease.id
        self.log.warning("runtime.lease_renewed", old=hex(lost), lease=hex(self.lease.id))

    def configure(self, plan: PlanLike, node: str, local_rank: int, cancelled: Cancelled | None = None,
                  names: Sequence[str] | None = None) -> GroupSet:
        """Build generation ``plan.gen``'s groups for the seat ``node/local_rank``; a build waiting
        for its peers gives up as soon as ``cancelled()`` gives a reason. ``names``: the groups to
        build (default: the settings' ``group_names``).

        Raises:
            GroupError: the plan has no rank on this seat, a peer never arrived, or the build
                was abandoned.
        """
        rank = rank_at(plan, node, local_rank)
        self.seat = f"{node}/{local_rank}"
        if self.settings.device.startswith("cuda"):
            # "cuda" means the seat's own GPU: local_rank is the device index on its node.
            self.device = torch.device(self.settings.device if ":" in self.settings.device else f"cuda:{local_rank}")
            torch.cuda.set_device(self.device)
        groups = GroupSet.configure(
            plan, rank, self._store_for, self.device,
            timeout=timedelta(seconds=self.settings.build_timeout), previous=self.groups,
            names=names or self.settings.group_names, is_tainted=self._tainted, cancelled=cancelled)
        self.groups = groups
        if self.comm is None:
            board = ProgressBoard(self.client, self.keys, self.seat, self.lease.id)
            self.comm = Comm(groups, self.tracker, board, self.seat, on_diagnosis=self._publish_diagnosis)
            self.watchdog = Watchdog(self.comm, self.settings.watchdog_interval, self.settings.publish_every)
            self.watchdog.start()
        else:
            self.comm.set_groups(groups)
            self.comm.seat = self.seat
            if self.comm.board is not None:
                self.comm.board.seat = self.seat
        assert self.watchdog is not None
        self.watchdog.publish()  # peers can diagnose us from the first collective on
        self.log.info("runtime.configured", gen=plan.gen, rank=rank, seat=self.seat, carried=list(groups.carried))
        return groups

    def abort_generation(self, gen: int, reason: str, ranks: tuple[int, ...] = ()) -> list[str]:
        """Abort generation ``gen``'s groups that contain any of ``ranks`` (all when none given).

        Returns the labels of the groups aborted; each is marked tainted so its peers follow.
        Groups without a failed member stay up: a dead rank's blast radius is its own groups.
        """
        if self.groups is None or self.groups.gen != gen:
            return []
        chosen = self.groups.abort(reason, ranks=ranks) if ranks else self.groups.abort(reason)
        for g in chosen:
            self._taint(g)
        return [g.label for g in chosen]

    def _store_for(self, spec: GroupSpec) -> EtcdStore:
        return EtcdStore(self.client, self.keys.group_store(spec.gen, spec.key), lease=self.lease.id,
                         timeout=timedelta(seconds=self.settings.build_timeout))

    def _taint_key(self, g: Group) -> str:
        return self.keys.taint(g.gen, g.spec.key)

    def _follow_taints(self) -> None:
        while (ev := self._taints.get()) is not None:
            if ev.kind != "put" or self.groups is None:
                continue
            for g in self.groups.groups.values():
                if not g.aborted and ev.key == self._taint_key(g):
                    g.abort(f"a peer aborted it: {ev.value.decode(errors='replace')}")

    def _taint(self, g: Group) -> None:
        try:
            self.client.put(self._taint_key(g), g.aborted_reason or "aborted")
        except EtcdError as exc:
            self.log.warning("runtime.taint_failed", group=g.label, error=str(exc))

    def _tainted(self, g: Group) -> bool:
        try:
            return self.client.get(self._taint_key(g)) is not None
        except EtcdError:
            return True  # cannot tell: rebuilding is the safe side

    def _publish_diagnosis(self, d: Diagnosis) -> None:
        try:
            self.client.put(self.keys.diagnosis(d.gen, self.seat), json.dumps(d.to_event()), lease=self.lease.id)
        except EtcdError as exc:
            self.log.warning("runtime.diagnosis_unpublished", error=str(exc))
        if self.groups is not None:
            for g in self.groups.groups.values():
                if g.aborted:
                    self._taint(g)

    def close(self) -> None:
        """Stop the watchdog, abort every group, end the etcd session."""
        if self.watchdog is not None:
            self.watchdog.stop()
        self._taints.close()
        self._taints.events.put(None)  # type: ignore[arg-type]
        if self.groups is not None:
            self.groups.abort("runtime closed")
        self.client.release(self.lease)
        self.client.close()
