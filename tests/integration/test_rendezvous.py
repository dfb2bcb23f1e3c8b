"""Rendezvous against a real etcd: plans, fencing, races, malformed records, etcd member loss."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import structlog

from rallypoint.errors import ConfigError, NodeIdConflict
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.rendezvous.records import ClusterSpec, Plan
from rallypoint.rendezvous.rendezvous import Rendezvous, RendezvousSettings, local_record
from rallypoint.testing.etcd_server import EtcdCluster
from tests.conftest import make_client


class Members:
    """In-process members sharing one etcd client each, driven round-robin by the test."""

    def __init__(self, endpoints: tuple[str, ...], cluster: str, spec: ClusterSpec, **kw: float) -> None:
        self.endpoints, self.cluster, self.spec, self.kw = endpoints, cluster, spec, kw
        self.members: list[Rendezvous] = []
        self.clients: list[EtcdClient] = []

    def add(self, node: str, slots: int = 2, client: EtcdClient | None = None) -> Rendezvous:
        if client is None:
            client = make_client(self.endpoints, request_timeout=0.5)
            self.clients.append(client)
        settings = RendezvousSettings(self.cluster, node, self.spec, **self.kw)
        r = Rendezvous(client, settings, local_record(node, "127.0.0.1", 0, slots))
        r.join()
        self.members.append(r)
        return r

    def cycle_until(self, done, timeout: float = 10.0) -> list[str]:
        said: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.members:
                if r.lease is not None:
                    s = r.run_cycle(0.005)
                    if not s.startswith("idle"):
                        said.append(f"{r.settings.node}: {s}")
            if done():
                return said
        raise AssertionError(f"condition not met in {timeout}s; said: {said[-10:]}")

    def close(self) -> None:
        for r in self.members:
            if r.lease is not None:
                r.leave()
        for c in self.clients:
            c.close()


@pytest.fixture
def members(etcd: EtcdCluster, cluster_name: str) -> Iterator[Members]:
    m = Members(etcd.endpoints, cluster_name, ClusterSpec(tp=2))
    yield m
    m.close()


def all_released(ms: Members, gen: int) -> bool:
    return all(r.delivered_gen >= gen for r in ms.members if r.lease is not None)


def test_join_plan_ack_release(members: Members) -> None:
    for n in ("n0", "n1", "n2"):
        members.add(n)
    said = members.cycle_until(lambda: all_released(members, 1))
    plan = members.members[0].plan
    assert plan is not None and plan.gen == 1 and plan.world_size == 6 and plan.dp == 3
    assert [(r.rank, r.node, r.local_rank) for r in plan.ranks] == [
        (0, "n0", 0), (1, "n0", 1), (2, "n1", 0), (3, "n1", 1), (4, "n2", 0), (5, "n2", 1)]
    assert sum("wrote plan gen 1" in s for s in said) == 1, said
    assert any("released gen 1" in s for s in said)
    # A clean leave is re-planned without waiting for the lease.
    t0 = time.monotonic()
    members.members[2].leave()
    members.cycle_until(lambda: all_released(members, 2))
    assert time.monotonic() - t0 < 1.5
    assert members.members[0].plan.members == ("n0", "n1")
    assert "left n2" in members.members[0].plan.reason


def test_joins_inside_last_call_make_one_plan(members: Members) -> None:
    members.add("a")
    members.add("b")
    members.add("c")
    members.cycle_until(lambda: all_released(members, 1))
    gens = {r.plan.gen for r in members.members}
    assert gens == {1}


def test_second_daemon_with_same_node_id_is_refused(members: Members) -> None:
    members.add("dup")
    with pytest.raises(NodeIdConflict, match="already held by pid"):
        members.add("dup")


def test_spec_mismatch_is_refused(etcd: EtcdCluster, cluster_name: str, members: Members) -> None:
    members.add("n0")
    other = Members(etcd.endpoints, cluster_name, ClusterSpec(tp=4))
    try:
        with pytest.raises(ConfigError, match="tp=4"):
            other.add("n1")
    finally:
        other.close()


def test_racing_leaders_never_write_two_plans_for_one_generation(members: Members) -> None:
    leader = members.add("n0")
    members.add("n1")
    members.cycle_until(lambda: all_released(members, 1))
    keys = ClusterKeys(members.cluster)
    # Eight threads, each sure it leads, race to write gens 2..6 from their own stale view.
    results: list[str] = []
    lock = threading.Lock()

    def racer(i: int) -> None:
        client = make_client(members.endpoints)
        shadow = Rendezvous(client, leader.settings, leader.record)
        shadow.lease = leader.lease
        for _ in range(5):
            gen = int(client.get(keys.gen).value)
            plan = Plan(gen=gen + 1, tp=2, pp=1, dp=1, ranks=leader.plan.ranks[:2], members=("n0", "n1"),
                        reason=f"racer {i}", leader="n0")
            said = shadow._write_plan(plan)
            with lock:
                results.append(said)
        client.close()

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kvs, _ = leader.client.get_prefix(keys.plans)
    gens = [Plan.from_json(kv.key, kv.value).gen for kv in kvs]
    assert gens == list(range(1, len(gens) + 1)), gens  # contiguous, each exactly once
    wins = [s for s in results if s.startswith("wrote plan")]
    assert len(wins) == len(gens) - 1 and len(wins) >= 5
    # Each generation's plan names exactly one writer.
    assert len({kv.value for kv in kvs}) == len(kvs)


def test_deposed_leader_cannot_write_a_plan(members: Members) -> None:
    leader = members.add("n0")
    members.add("n1")
    members.cycle_until(lambda: all_released(members, 1))
    keys = ClusterKeys(members.cluster)
    leader.client.put(keys.leader, "n1")  # someone else now holds leadership
    plan = Plan(gen=2, tp=2, pp=1, dp=1, ranks=leader.plan.ranks[:2], members=("n0", "n1"),
                reason="stale", leader="n0")
    assert leader._write_plan(plan).startswith("lost the race")
    assert leader.client.get(keys.plan(2)) is None


def test_malformed_records_are_reported_not_fatal(members: Members) -> None:
    m0 = members.add("n0")
    members.add("n1")
    members.cycle_until(lambda: all_released(members, 1))
    keys = ClusterKeys(members.cluster)
    with structlog.testing.capture_logs() as logs:
        m0.client.put(keys.node("junk"), b"{not json")
        m0.client.put(keys.plan(7), b'{"gen": 7}')
        def bad() -> set:
            return {e.get("key") for e in logs if e["event"] == "rendezvous.malformed_record"}
        members.cycle_until(lambda: {keys.node("junk"), keys.plan(7)} <= bad(), timeout=3)
    assert m0.plan.gen == 1  # the bad plan was not taken
    assert all("malformed record at" in e["error"] for e in logs if e["event"] == "rendezvous.malformed_record")


def test_64_members_rendezvous_to_one_plan(etcd: EtcdCluster, cluster_name: str) -> None:
    ms = Members(etcd.endpoints, cluster_name, ClusterSpec(tp=2))
    shared = [make_client(etcd.endpoints) for _ in range(4)]
    try:
        for i in range(64):
            ms.add(f"n{i:03d}", client=shared[i % 4])
        ms.cycle_until(lambda: all_released(ms, 1), timeout=30)
        plans = {r.plan for r in ms.members}
        assert len(plans) == 1
        plan = plans.pop()
        assert plan.gen == 1 and plan.world_size == 128 and len(plan.members) == 64
    finally:
        ms.close()
        for c in shared:
            c.close()


def test_no_plan_missed_when_the_connected_etcd_member_dies(etcd3: EtcdCluster, cluster_name: str) -> None:
    ms = Members(etcd3.endpoints, cluster_name, ClusterSpec(tp=1))
    try:
        ms.add("n0", slots=1)
        follower = ms.add("n1", slots=1)
        ms.cycle_until(lambda: all_released(ms, 1))
        seen: list[int] = []
        follower.on_release = lambda plan: seen.append(plan.gen)
        connected = next(m for m in etcd3.members if m.endpoint == follower.client.endpoint)
        etcd3.kill(connected)
        ms.add("n2", slots=1)
        ms.cycle_until(lambda: follower.delivered_gen >= 2, timeout=15)
        ms.add("n3", slots=1)
        ms.cycle_until(lambda: follower.delivered_gen >= 3, timeout=15)
        assert seen == [2, 3]
        assert follower.plan.members == ("n0", "n1", "n2", "n3")
    finally:
        ms.close()


def test_a_member_that_lost_its_lease_takes_back_its_own_record(members: Members, client: EtcdClient) -> None:
    """The client gave the lease up as lost (etcd could not be reached to renew it) while etcd
    still holds the member's record under it: the rejoin takes the record back under the new
    lease instead of calling it a duplicate of itself."""
    r = members.add("n0")
    members.cycle_until(lambda: all_released(members, 1))
    old = r.lease.id
    assert client.get(r.keys.node("n0")).lease == old
    r.lease.lost.set()  # as the keeper does when a whole TTL passed without a renewal
    said = members.cycle_until(lambda: r.lease.id != old and client.get(r.keys.node("n0")).lease == r.lease.id)
    assert any("re-registered after lease loss" in s for s in said), said
