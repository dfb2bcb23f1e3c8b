"""Old generations leave etcd: the leader's prune keeps a window, and a worker starting into an old
cluster reads what it would read in a new one. Real etcd throughout; the last test a real rallyd."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from rallypoint.protocol.keys import ClusterKeys
from rallypoint.recovery.retention import prune_history
from rallypoint.rendezvous.etcd import EtcdClient, KeyValue, Put
from rallypoint.rendezvous.records import Plan, RankSlot
from rallypoint.testing.daemons import DaemonProcess, daemon_args, wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.control import Controller


def plan_of(gen: int, node: str = "a") -> Plan:
    return Plan(gen=gen, tp=1, pp=1, dp=1, ranks=(RankSlot(0, node, 0),), members=(node,), reason=f"r{gen}",
                leader=node)


def write_history(client: EtcdClient, keys: ClusterKeys, gens: int, released: int, node: str = "a") -> None:
    """What ``gens`` generations of recoveries leave behind, one transaction per generation: the
    plan, its release (up to ``released``), a re-plan request, an abort order, a taint, an event,
    a build arrival in the group store, and (without the leases they would ride) an ack, a
    diagnosis and a drained report."""
    for g in range(1, gens + 1):
        ops = [Put(keys.gen, str(g)), Put(keys.plan(g), plan_of(g, node).to_json()),
               Put(keys.replan_of(g), "rank 0 died"),
               Put(keys.abort(g, [0]), json.dumps({"gen": g, "ranks": [0], "reason": "rank 0 died"})),
               Put(keys.taint(g, "tp-0.1"), "aborted"), Put(keys.event(g, 1000.0 + g, "a", "serving"), "{}"),
               Put(keys.group_store(g, "tp-0.1") + "arrived/0", "1"), Put(keys.ack(g, node), "{}"),
               Put(keys.diagnosis(g, f"{node}/0"), "{}"), Put(keys.drained_replica(g, 0), "1")]
        if g <= released:
            ops.append(Put(keys.released_of(g), "{}"))
        ok, _ = client.transaction([], ops, what=f"write gen {g}")
        assert ok


def gens_under(client: EtcdClient, prefix: str) -> list[int]:
    """The generations that have a key under ``prefix`` (its first segment after it)."""
    kvs, _ = client.get_prefix(prefix)
    return sorted({int(seg) for kv in kvs if (seg := kv.key[len(prefix):].split("/")[0]).isdigit()})


def test_the_leader_keeps_the_window_and_what_is_in_use(client: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    write_history(client, keys, gens=130, released=125)  # plans 126..130 written, not released yet
    client.put(keys.taint(3, "tp-9.9"), "aborted")  # a group built in gen 3, carried over, aborted now
    client.put(keys.plans + "junk", "x")  # not generation-keyed: never pruned
    counts = prune_history(client, keys, released_gen=125)  # keeps gens 25.. (100 before 125)
    assert counts == {"plans": 24, "released": 24, "replans": 24, "aborts": 24, "events": 24, "stores": 24,
                      "taints": 24, "acks": 24, "diagnoses": 24, "drained": 24}
    window = list(range(25, 131))
    for prefix in (keys.plans, keys.replans, keys.aborts, keys.events, keys.stores, keys.acks, keys.diagnoses,
                   keys.drained):
        assert gens_under(client, prefix) == window, prefix
    assert gens_under(client, keys.released) == list(range(25, 126))
    assert gens_under(client, keys.taints) == [3, *window]  # the fresh taint of an old group stays
    assert client.get(keys.taint(3, "tp-9.9")) is not None and client.get(keys.taint(3, "tp-0.1")) is None
    assert client.get(keys.plans + "junk") is not None and client.get(keys.gen).value == b"130"
    assert client.get(keys.abort(130, [0])) is not None  # the recent abort orders
    assert prune_history(client, keys, released_gen=125) == dict.fromkeys(counts, 0)  # nothing left to do
    # However small the window, the newest released plan, its release and newer plans stay.
    prune_history(client, keys, released_gen=125, keep=0)
    assert gens_under(client, keys.plans) == list(range(125, 131))
    assert gens_under(client, keys.released) == [125]
    assert prune_history(client, keys, released_gen=101) == {}  # a young cluster: no generation before the window


class Counting:
    """Counts the keys a client's reads return (values or not)."""

    def __init__(self, client: EtcdClient) -> None:
        self.keys = 0
        for name in ("get_prefix", "get_range"):
            setattr(client, name, self._counted(getattr(client, name)))

    def _counted(self, read: Callable[..., tuple[list[KeyValue], int]]) -> Callable[..., tuple[list[KeyValue], int]]:
        def counted(*args: object, **kw: object) -> tuple[list[KeyValue], int]:
            kvs, rev = read(*args, **kw)
            self.keys += len(kvs)
            return kvs, rev
        return counted


def start_controller(etcd: EtcdCluster, cluster: str, gens: int) -> tuple[Controller, int, list, EtcdClient]:
    """A worker's controller for seat a/0 in a cluster that has lived ``gens`` generations (the
    newest two written, not released yet, one node draining); returns it, the keys its start read,
    the abort orders it applied, and its client."""
    from tests.conftest import make_client

    keys = ClusterKeys(cluster)
    writer = make_client(etcd.endpoints)
    try:
        write_history(writer, keys, gens=gens, released=gens - 2)
        writer.put(keys.draining_of("b"), "{}")
    finally:
        writer.close()
    client = make_client(etcd.endpoints)
    counter = Counting(client)
    aborts: list = []
    ctrl = Controller(client, cluster, ("a", 0), lambda gen, ranks, reason: aborts.append((gen, ranks)))
    return ctrl, counter.keys, aborts, client


def test_a_worker_starting_into_an_old_cluster_reads_what_it_would_in_a_new_one(
        etcd: EtcdCluster, cluster_name: str) -> None:
    old, old_read, old_aborts, client = start_controller(etcd, cluster_name, gens=150)
    new, new_read, _, new_client = start_controller(etcd, cluster_name + "n", gens=3)
    try:
        assert old_read == new_read == 5  # the newest release, its plan and the two newer, a draining node
        assert sorted(old.plans) == [148, 149, 150] and old.released == 148 and old.draining == {"b"}
        assert sorted(new.plans) == [1, 2, 3] and new.released == 1
        assert old.latest() is not None and old.latest().gen == 148
        assert old_aborts == []  # orders are applied from the watch only, never replayed
        # It goes on from there as before: a release, an abort order, the prune of a plan.
        keys = ClusterKeys(cluster_name)
        client.put(keys.released_of(149), "{}")
        assert old.wait_plan(148, timeout=5).gen == 149
        client.put(keys.abort(149, [0]), json.dumps({"gen": 149, "ranks": [0], "reason": "drill"}))
        wait_for("the abort order", lambda: old_aborts == [(149, (0,))], timeout=5)
        client.delete(keys.plan(148))
        wait_for("the pruned plan dropped", lambda: 148 not in old.plans, timeout=5)
    finally:
        for c, cl in ((old, client), (new, new_client)):
            c.close()
            cl.close()


def test_rallyd_prunes_as_leader_and_says_what_it_deleted(etcd: EtcdCluster, client: EtcdClient,
                                                          cluster_name: str, tmp_path: Path) -> None:
    """A rallyd that becomes leader of a cluster 130 generations old (its last node gone) writes
    and releases gen 131, then prunes everything before gen 31 and logs ``leader.pruned``."""
    keys = ClusterKeys(cluster_name)
    write_history(client, keys, gens=130, released=130, node="gone")
    d = DaemonProcess("a", daemon_args(etcd.endpoints, cluster_name, "--cpu-ranks", "1"), tmp_path / "a.log").start()
    try:
        d.wait_log("gen 131 released", timeout=30)
        d.wait_log("leader.pruned", timeout=10)
        line = next(json.loads(x) for x in d.log_text().splitlines() if '"leader.pruned"' in x)
        assert (line["gen"], line["before_gen"]) == (131, 31)
        kinds = ("plans", "released", "replans", "aborts", "taints", "events", "stores", "acks", "diagnoses",
                 "drained")
        assert {k: line[k] for k in kinds} == dict.fromkeys(kinds, 30) and line["deleted"] == 10 * 30
        assert gens_under(client, keys.plans) == list(range(31, 132))
        assert gens_under(client, keys.released) == list(range(31, 132))
        assert gens_under(client, keys.aborts)[0] == 31 and gens_under(client, keys.taints)[0] == 31
    finally:
        d.stop()
