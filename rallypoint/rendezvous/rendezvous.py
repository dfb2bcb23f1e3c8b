"""One node's side of the rendezvous: register, elect, plan, ack, release.

Every daemon registers its node under a lease and mirrors the cluster's ``control/`` keys through
one resumable watch. Whoever holds ``control/leader`` also mirrors ``nodes/`` and ``acks/``; when
membership changes it waits a short last-call window (so joins that arrive together make one plan)
and writes exactly one plan per generation with a compare-and-swap on ``control/gen`` that also
checks it still holds the leader key. Members ack the plans that name them; once every member
acked, the leader writes ``released/<gen>`` and the workers may build that generation's groups.

``run_cycle()`` does one step and returns one sentence saying what it did (Patroni's habit), so
the daemon's log reads as a narrative and tests can assert on it.
"""

from __future__ import annotations

import json
import queue
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import psutil

from rallypoint.errors import ConfigError, LayoutError, LeaseLost, MalformedRecord, NodeIdConflict, RallypointError
from rallypoint.log import get_logger
from rallypoint.protocol.keys import ClusterKeys, gen_from_key
from rallypoint.protocol.orders import request_replan
from rallypoint.rendezvous.etcd import EtcdClient, Lease, Mod, PrefixWatch, Put, Value, Version, WatchEvent
from rallypoint.rendezvous.layout import UnbuildableSeats, make_plan
from rallypoint.rendezvous.records import ClusterSpec, NodeRecord, Plan

WAKE = WatchEvent("wake", "", b"", 0)
"""Put in the event queue by ``Rendezvous.wake``: ends ``run_cycle``'s wait, changes nothing."""


@dataclass(frozen=True)
class RendezvousSettings:
    """Timing and layout of the rendezvous; seconds throughout."""

    cluster: str
    node: str
    spec: ClusterSpec
    lease_ttl: float = 3.0
    last_call: float = 0.5
    idle_wait: float = 0.2


class Rendezvous:
    """This node's membership, leadership and view of the current plan.

    Args:
        client: the etcd client (shared with other users of this process is fine).
        settings: cluster, node id, spec and timings.
        record: what to publish about this node (its ``node`` must equal ``settings.node``).
        on_release: called from ``run_cycle`` with each plan released that names this node.
    """

    def __init__(self, client: EtcdClient, settings: RendezvousSettings, record: NodeRecord,
                 on_release: Callable[[Plan], None] | None = None,
                 on_event: Callable[..., object] | None = None,
                 on_lost: Callable[[Plan, list[str]], None] | None = None) -> None:
        self.client = client
        self.on_lost = on_lost  # on_lost(plan, nodes): the leader re-plans without nodes of ``plan``
        self.on_event = on_event  # on_event(gen, kind, **detail): recovery events (leader's steps)
        self.settings = settings
        self.record = record
        self.keys = ClusterKeys(settings.cluster)
        self.on_release = on_release
        self.log = get_logger("rendezvous", node=settings.node, cluster=settings.cluster)
        self.lease: Lease | None = None
        self.events: queue.Queue[WatchEvent] = queue.Queue()
        self._watches: list[PrefixWatch] = []
        self._leader_watches: list[PrefixWatch] = []
        # Mirrors of etcd, updated only from run_cycle's thread.
        self.leader: str | None = None
        self.gen = 0
        self.plan: Plan | None = None
        self.released_gen = 0
        self.nodes: dict[str, NodeRecord] = {}
        self._node_revision: dict[str, int] = {}  # newest revision applied per member record
        self._past_leases: set[int] = set()  # leases this rendezvous held and lost
        self._refreshed_for: tuple[int, str] | None = None  # the re-plan request last refreshed for
        self.acks: dict[int, set[str]] = {}
        self.acked_gen = 0
        self.delivered_gen = 0
        self.is_leader = False
        self._change_since: float | None = None
        self._last_problem = ""
        self._replan: tuple[int, str] | None = None  # (gen, reason): that generation lost a rank
        self._build_failures = UnbuildableSeats()
        self._grace_until = 0.0  # a new leader does not drop members before this (monotonic)
        self._left: set[str] = set()  # nodes that said they were leaving before their key went
        self._capacity_changed = False  # a member's slots, bad seats or cordon changed
        self._cordoned: set[str] = set()  # operator cordons (control/cordoned/<node>)
        self.inherited: Plan | None = None  # a released plan naming this node, found at join

    # -- joining and leaving ------------------------------------------------------------------

    def join(self) -> None:
        """Register this node, check the cluster spec, and start mirroring ``control/``.

        Raises:
            NodeIdConflict: a live daemon already holds this node id.
            ConfigError: this node's layout disagrees with the cluster's recorded spec.
            EtcdUnavailable: etcd did not answer within the client's retry deadline.
        """
        self.lease = self.client.keep_alive(self.settings.lease_ttl)
        self._register()
        self.client.delete(self.keys.left_of(self.settings.node))  # back after a clean leave
        self.client.delete(self.keys.draining_of(self.settings.node))
        self._check_spec()
        kvs, rev = self.client.get_prefix(self.keys.control)
        for kv in kvs:
            self._apply(WatchEvent("put", kv.key, kv.value, kv.mod_revision))
        self._watches.append(self.client.watch_prefix(self.keys.control, rev + 1, self.events))
        plan = self.plan
        if plan is not None and self.released_gen >= plan.gen and self.settings.node in plan.members:
            # A daemon that has just started has no process in any generation: this node's ranks
            # in the released plan were its predecessor's, and died with it. That generation is
            # not ours to join (its groups are half gone); the daemon asks for the next one.
            self.inherited = plan
            self.acked_gen = self.delivered_gen = plan.gen
        self.log.info("rendezvous.joined", lease=hex(self.lease.id), leader=self.leader, gen=self.gen,
                      inherited=self.inherited.gen if self.inherited else None)

    def _register(self) -> None:
        assert self.lease is not None
        key = self.keys.node(self.settings.node)
        if self.client.create(key, self.record.to_json(), lease=self.lease.id):
            return
        held = self.client.get(key)
        if held is None:  # expired between the two calls
            return self._register()
        if held.lease == self.lease.id:  # our own create, retried after a lost answer
            return
        try:
            other = NodeRecord.from_json(key, held.value)
        except MalformedRecord as exc:
            raise NodeIdConflict(f"{exc}; refusing to take over node id {self.settings.node!r}") from None
        if other.host == self.record.host and (held.lease in self._past_leases or not psutil.pid_exists(other.pid)):
            # Our own record under the lease we just lost (etcd could not be reached to renew
            # it, and it has not run out on the server yet), or our predecessor's (crashed,
            # restarted by systemd) whose lease has not run out yet.
            ok, _ = self.client.transaction(
                [Mod(key) == held.mod_revision],
                [Put(key, self.record.to_json(), lease=self.lease.id)], what=f"take over {key}")
            if ok:
                self.log.info("rendezvous.took_over_stale_node", stale_pid=other.pid)
                return
            return self._register()
        raise NodeIdConflict(
            f"node id {self.settings.node!r} is already held by pid {other.pid} on {other.host} "
            f"(key {key}); give this daemon another --node or stop the other one")

    def _check_spec(self) -> None:
        mine = self.settings.spec
        if self.client.create(self.keys.spec, mine.to_json()):
            return
        held = self.client.get(self.keys.spec)
        if held is None:
            return self._check_spec()
        theirs = ClusterSpec.from_json(self.keys.spec, held.value)
        if theirs != mine:
            raise ConfigError(
                f"cluster {self.settings.cluster!r} runs {theirs} (key {self.keys.spec}); "
                f"this node is configured with {mine}")

    def update_record(self, record: NodeRecord) -> None:
        """Publish a change of this node's record (a seat went bad or came back, a cordon)."""
        assert self.lease is not None
        self.record = record
        self.client.put(self.keys.node(self.settings.node), record.to_json(), lease=self.lease.id)

    def _emit(self, gen: int, kind: str, **detail: object) -> None:
        if self.on_event is not None:
            self.on_event(gen, kind, **detail)

    def leave(self) -> None:
        """Leave cleanly: revoke the lease so peers re-plan at once instead of waiting for the TTL."""
        for w in self._watches + self._leader_watches:
            w.close()
        self._watches, self._leader_watches = [], []
        if self.lease is not None:
            try:  # say so first: the leader re-plans at once instead of granting a grace period
                self.client.put(self.keys.left_of(self.settings.node), json.dumps({"time": time.time()}))
            except RallypointError as exc:
                self.log.warning("rendezvous.leaving_mark_failed", error=str(exc))
            self.client.release(self.lease)
            self.lease = None
        self.is_leader = False
        self.log.info("rendezvous.left")

    # -- the loop step --------------------------------------------------------------------------

    def run_cycle(self, timeout: float | None = None) -> str:
        """Wait for etcd changes (up to ``timeout``), apply them, and take at most one step of each kind.

        Returns:
            One sentence saying what this cycle did.
        """
        self._wait_events(self.settings.idle_wait if timeout is None else timeout)
        done: list[str] = []
        try:
            if self.lease is not None and self.lease.lost.is_set():
                done.append(self._rejoin())
            if self.leader is None:
                done.append(self._campaign())
            if self.is_leader:
                done.append(self._lead())
            done.append(self._ack())
            done.append(self._deliver())
        except LeaseLost as exc:
            if self.lease is not None:
                self.lease.lost.set()
            done.append(f"lease lost ({exc}); re-registering")
        said = "; ".join(d for d in done if d)
        if said:
            return said
        role = "leader" if self.is_leader else f"following {self.leader}"
        return f"idle: {role} at gen {self.gen}"

    def wake(self) -> None:
        """End ``run_cycle``'s current (or next) wait for etcd changes at once. Any thread: the
        daemon calls it when one of its watchers recorded something for its loop to act on."""
        self.events.put(WAKE)

    def _wait_events(self, timeout: float) -> None:
        if self._change_since is not None:
            timeout = min(timeout, max(0.0, self._change_since + self.settings.last_call - time.monotonic()))
        try:
            first = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        self._apply(first)
        while True:
            try:
                self._apply(self.events.get_nowait())
            except queue.Empty:
                return

    def _apply(self, ev: WatchEvent) -> None:
        k = self.keys
        if ev.kind == WAKE.kind:
            return
        try:
            if ev.kind == "resync":
                self._resync()
            elif ev.key == k.leader:
                self.leader = ev.value.decode() if ev.kind == "put" else None
                if self.is_leader and self.leader != self.settings.node:
                    held = self.client.get(k.leader)  # a stale delete (the key we replaced)?
                    if held is not None and held.value.decode() == self.settings.node:
                        self.leader = self.settings.node
                    else:
                        self._resign("leader key now says " + str(self.leader))
            elif ev.key == k.gen and ev.kind == "put":
                self.gen = max(self.gen, int(ev.value))
            elif ev.key.startswith(k.plans) and ev.kind == "put":
                plan = Plan.from_json(ev.key, ev.value)
                if self.plan is None or plan.gen > self.plan.gen:
                    self.plan = plan
                    self.gen = max(self.gen, plan.gen)
            elif ev.key.startswith(k.cordoned):
                name = ev.key[len(k.cordoned):]
                before = set(self._cordoned)
                self._cordoned.add(name) if ev.kind == "put" else self._cordoned.discard(name)
                self._capacity_changed |= before != self._cordoned
            elif ev.key.startswith(k.left):
                name = ev.key[len(k.left):]
                self._left.add(name) if ev.kind == "put" else self._left.discard(name)
            elif ev.key.startswith(k.replans) and ev.kind == "put":
                gen = gen_from_key(ev.key)
                # A late request for an old generation (whose key the leader may have pruned, so
                # creating it succeeded again) must not hide the current one's.
                if self._replan is None or gen >= self._replan[0]:
                    self._replan = (gen, ev.value.decode(errors="replace"))
            elif ev.key.startswith(k.released) and ev.kind == "put":
                self.released_gen = max(self.released_gen, gen_from_key(ev.key))
            elif ev.key.startswith(k.nodes):
                name = ev.key[len(k.nodes):]
                if ev.revision and ev.revision < self._node_revision.get(name, 0):
                    return  # older than what a refresh already read
                self._node_revision[name] = ev.revision
                if ev.kind == "delete":
                    self.nodes.pop(name, None)
                else:
                    rec = NodeRecord.from_json(ev.key, ev.value)
                    old = self.nodes.get(name)
                    if old is not None and (old.slots, old.bad_seats, old.cordoned) != (
                            rec.slots, rec.bad_seats, rec.cordoned):
                        self._capacity_changed = True
                    self.nodes[name] = rec
            elif ev.key.startswith(k.acks):
                gen, node = gen_from_key(ev.key.rsplit("/", 1)[0]), ev.key.rsplit("/", 1)[1]
                acked = self.acks.setdefault(gen, set())
                acked.discard(node) if ev.kind == "delete" else acked.add(node)
        except (MalformedRecord, ValueError) as exc:
            self.log.error("rendezvous.malformed_record", key=ev.key, error=str(exc))

    def _resync(self) -> None:
        kvs, _ = self.client.get_prefix(self.keys.control)
        for kv in kvs:
            self._apply(WatchEvent("put", kv.key, kv.value, kv.mod_revision))

    # -- leadership ---------------------------------------------------------------------------

    def _campaign(self) -> str:
        assert self.lease is not None
        if not self.client.create(self.keys.leader, self.settings.node, lease=self.lease.id):
            return ""
        self.leader, self.is_leader = self.settings.node, True
        self._start_leading()
        self.log.info("rendezvous.became_leader", gen=self.gen)
        return f"became leader at gen {self.gen}"

    def _start_leading(self) -> None:
        self.nodes, self.acks, self._node_revision = {}, {}, {}
        for prefix in (self.keys.nodes, self.keys.acks):
            kvs, rev = self.client.get_prefix(prefix)
            for kv in kvs:
                self._apply(WatchEvent("put", kv.key, kv.value, kv.mod_revision))
            self._leader_watches.append(self.client.watch_prefix(prefix, rev + 1, self.events))
        self._change_since = None

    def _resign(self, why: str) -> None:
        self.is_leader = False
        for w in self._leader_watches:
            w.close()
        self._leader_watches = []
        self.log.warning("rendezvous.lost_leadership", why=why)

    def _lead(self) -> str:
        step = self._maybe_plan()
        if step:
            return step
        return self._maybe_release()

    def request_replan(self, gen: int, reason: str) -> bool:
        """Ask the leader for the next plan because generation ``gen`` lost a rank. Any thread.

        Returns False when someone already asked for that generation.
        """
        asked = request_replan(self.client, self.keys, gen, reason)
        if asked:
            self._emit(gen, "replan_requested", reason=reason)
        return asked

    def _maybe_plan(self) -> str:
        current = self.plan
        replan = self._replan if current is not None and self._replan and self._replan[0] == current.gen else None
        if replan is not None and replan != self._refreshed_for:
            self._refresh_nodes()  # once per request: the watch keeps the records current after
            self._refreshed_for = replan
        live = set(self.nodes)
        if (current is not None and set(current.members) == live and replan is None
                and (not self._capacity_changed or self._same_placement(current))):
                self._change_since = None
                self._capacity_changed = False
                if self._last_problem:
                    self._last_problem = ""
                    self._emit(current.gen, "layout_ok")
                    return f"gen {current.gen} fits again"
                return ""
        if replan is not None and current is not None and set(current.members) == live:
            try:
                plan = make_plan(self.gen + 1, self._placeable(), self.settings.spec, replan[1], self.settings.node,
                                 previous=current, avoid=self._unbuildable(*replan))
            except LayoutError as exc:
                # The request stands: the generation is still broken, and is re-planned as soon
                # as capacity allows (a seat back from its restart window, a node joining).
                return self._cannot_plan(exc)
            self._replan = None
            self._last_problem = ""
            return self._write_plan(plan)
        now = time.monotonic()
        if current is not None and set(current.members) - live - self._left and now < self._grace_until:
            return ""  # members missing right after an election: wait for them to re-register
        if self._change_since is None:
            self._change_since = now
        if now - self._change_since < self.settings.last_call:
            return ""
        reason = _reason(current, live) or "capacity changed"
        try:
            plan = make_plan(self.gen + 1, self._placeable(), self.settings.spec, reason, self.settings.node,
                             previous=self.plan)
        except LayoutError as exc:
            return self._cannot_plan(exc)
        self._last_problem = ""
        self._capacity_changed = False
        lost = sorted(set(current.members) - live) if current is not None else []
        if lost and current is not None and self.on_lost is not None:
            # Their ranks' peers may be blocked on them in a collective that no error will end
            # (NCCL does not see a dead peer): have the groups that contain them aborted now.
            self.on_lost(current, lost)
        return self._write_plan(plan)

    def _unbuildable(self, gen: int, reason: str) -> frozenset[tuple[str, int]]:
        avoid = self._build_failures.note(gen, reason)
        if avoid:
            self.log.warning("rendezvous.moving_unbuildable", gen=gen, seats=[f"{n}/{lr}" for n, lr in sorted(avoid)])
        return avoid

    def _refresh_nodes(self) -> None:
        """Re-read the member records. A node writes its record (a seat left out) before it asks
        for a re-plan, but the two reach the leader on different watches, and the request can
        come first: planning on the old record would put the bad seat straight back."""
        kvs, _ = self.client.get_prefix(self.keys.nodes)
        seen = set()
        for kv in kvs:
            self._apply(WatchEvent("put", kv.key, kv.value, kv.mod_revision))
            seen.add(kv.key[len(self.keys.nodes):])
        for name in set(self.nodes) - seen:
            self.nodes.pop(name, None)

    def _cannot_plan(self, exc: LayoutError) -> str:
        """Report that no layout fits, once per distinct problem; returns what to say."""
        if str(exc) == self._last_problem:
            return ""
        self._last_problem = str(exc)
        self.log.warning("rendezvous.cannot_plan", why=str(exc), gen=self.gen)
        self._emit(self.gen, "cannot_plan", reason=str(exc))
        return f"cannot plan gen {self.gen + 1}: {exc}"

    def _placeable(self) -> list[NodeRecord]:
        """The live node records, with operator cordons applied."""
        return [replace(n, cordoned=True) if n.node in self._cordoned else n for n in self.nodes.values()]

    def _same_placement(self, current: Plan) -> bool:
        """Would the live capacity be placed exactly as ``current`` is? (Then nothing to do.)"""
        from rallypoint.rendezvous.layout import place

        try:
            dp, ranks = place(self._placeable(), self.settings.spec, current)
        except LayoutError:
            return False
        return dp == current.dp and tuple(ranks) == tuple(current.ranks)

    def _write_plan(self, plan: Plan) -> str:
        """Write ``plan`` iff the generation counter is still ``plan.gen - 1`` and we still lead."""
        k = self.keys
        expected = [Version(k.gen) == 0] if plan.gen == 1 else [Value(k.gen) == str(plan.gen - 1)]
        ok, _ = self.client.transaction(
            expected + [Value(k.leader) == self.settings.node],
            [Put(k.gen, str(plan.gen)), Put(k.plan(plan.gen), plan.to_json())],
            what=f"write plan {plan.gen}")
        if not ok:
            held = self.client.get(k.gen)
            self.gen = int(held.value) if held else self.gen
            return f"lost the race for gen {plan.gen} (gen is now {self.gen})"
        self.plan, self.gen, self._change_since = plan, plan.gen, None
        for name in self._left - set(plan.members):
            self.client.delete(self.keys.left_of(name))
        self.log.info("rendezvous.plan_written", gen=plan.gen, world_size=plan.world_size,
                      tp=plan.tp, pp=plan.pp, dp=plan.dp, reason=plan.reason)
        self._emit(plan.gen, "plan_written", dp=plan.dp, dp_wanted=self.settings.spec.dp, tp=plan.tp, pp=plan.pp,
                   world_size=plan.world_size, reason=plan.reason)
        return f"wrote plan gen {plan.gen} ({plan.reason})"

    def _maybe_release(self) -> str:
        plan = self.plan
        if plan is None or self.released_gen >= plan.gen:
            return ""
        if not set(plan.members) <= self.acks.get(plan.gen, set()):
            return ""
        if self.client.create(self.keys.released_of(plan.gen), json.dumps({"time": time.time()})):
            self.released_gen = plan.gen
            self.log.info("rendezvous.released", gen=plan.gen)
            self._emit(plan.gen, "released")
            return f"released gen {plan.gen}"
        return ""

    # -- members ------------------------------------------------------------------------------

    def _ack(self) -> str:
        plan = self.plan
        if plan is None or plan.gen <= self.acked_gen or self.settings.node not in plan.members:
            return ""
        assert self.lease is not None
        self.client.put(self.keys.ack(plan.gen, self.settings.node),
                        json.dumps({"time": time.time()}), lease=self.lease.id)
        self.acked_gen = plan.gen
        return f"acked gen {plan.gen}"

    def _deliver(self) -> str:
        plan = self.plan
        if plan is None or self.released_gen < plan.gen or self.delivered_gen >= plan.gen:
            return ""
        self.delivered_gen = plan.gen
        if self.settings.node not in plan.members:
            return ""
        if self.on_release is not None:
            self.on_release(plan)
        return f"gen {plan.gen} released: {len(plan.ranks_on(self.settings.node))} rank(s) here"

    def _rejoin(self) -> str:
        """Our lease expired (etcd outage, a stopped process): register again under a new one."""
        old = self.lease
        if old is not None:
            self._past_leases.add(old.id)  # our record may still hold it on the server
        if self.is_leader:
            self._resign("lease lost")
        if self.leader == self.settings.node:
            self.leader = None
        self.lease = self.client.keep_alive(self.settings.lease_ttl)
        self._register()
        self.acked_gen = 0  # acks rode the old lease
        # Our lease ran out: most likely etcd was away and every node is re-registering at once.
        # Should we lead next, give them a lease TTL before a missing node counts as gone.
        self._grace_until = time.monotonic() + self.settings.lease_ttl
        self.log.warning("rendezvous.rejoined", old_lease=hex(old.id) if old else None,
                         lease=hex(self.lease.id))
        return "re-registered after lease loss"


def _reason(current: Plan | None, live: set[str]) -> str:
    if current is None:
        return f"initial: {len(live)} node(s)"
    parts = []
    joined, left = sorted(live - set(current.members)), sorted(set(current.members) - live)
    if joined:
        parts.append("joined " + ",".join(joined))
    if left:
        parts.append("left " + ",".join(left))
    return "; ".join(parts)


def local_record(node: str, address: str, gpus: int, slots: int) -> NodeRecord:
    """This process's ``NodeRecord``."""
    from rallypoint import __version__
    return NodeRecord(node=node, host=socket.gethostname(), address=address, gpus=gpus, slots=slots,
                      version=__version__, pid=psutil.Process().pid)
