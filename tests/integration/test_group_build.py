"""A group build first waits for every member in etcd (real etcd, real EtcdStore, real gloo):
it gives up as soon as a newer generation is released, and a timeout names who never came. A
member that gives up takes its arrival back, unless every member's arrival was already there: then
a peer may be creating its communicator, and the member builds the group too."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch

from rallypoint.errors import GroupError, WaitCancelled
from rallypoint.groups.group import build_group
from rallypoint.groups.topology import GroupSpec
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.rendezvous.store import EtcdStore


def spec(gen: int, rank_in_group: int) -> GroupSpec:
    return GroupSpec("tp", gen, (4, 5), (("a", 0), ("b", 0)), rank_in_group)


def stores(client: EtcdClient, cluster: str):
    return lambda s: EtcdStore(client, ClusterKeys(cluster).group_store(s.gen, s.key), timeout=timedelta(seconds=30))


def test_a_build_waiting_for_a_dead_peer_gives_up_on_a_newer_generation(client: EtcdClient, cluster_name: str) -> None:
    newer = threading.Event()
    threading.Timer(0.5, newer.set).start()
    t0 = time.monotonic()
    with pytest.raises(GroupError, match=r"build of tp\[4,5\]@g3 abandoned: generation 4 was released"):
        build_group(spec(3, 0), stores(client, cluster_name), torch.device("cpu"), timedelta(seconds=30),
                    cancelled=lambda: "generation 4 was released" if newer.is_set() else None)
    took = time.monotonic() - t0
    assert 0.5 <= took < 2.0, took  # not the 30 s build timeout
    # Its arrival was taken back: a peer coming late waits for it, and never creates a communicator.
    assert client.get(f"{ClusterKeys(cluster_name).group_store(3, 'tp-4.5')}arrived/0") is None


def test_a_peer_that_never_arrives_is_named(client: EtcdClient, cluster_name: str) -> None:
    with pytest.raises(GroupError, match=r"tp\[4,5\]@g7: rank\(s\) \[5\] never arrived within 1s"):
        build_group(spec(7, 0), stores(client, cluster_name), torch.device("cpu"), timedelta(seconds=1),
                    cancelled=lambda: None)
    assert client.get(f"{ClusterKeys(cluster_name).group_store(7, 'tp-4.5')}arrived/0") is None


def test_an_arrival_is_withdrawn_only_while_one_is_missing(client: EtcdClient, cluster_name: str) -> None:
    store = EtcdStore(client, ClusterKeys(cluster_name).group_store(5, "tp-4.5"))
    store.mark("arrived/0")
    assert store.withdraw("arrived/0", ["arrived/1"]) is True
    assert not store.check(["arrived/0"])
    store.mark("arrived/0")
    store.mark("arrived/1")
    assert store.withdraw("arrived/0", ["arrived/1"]) is False
    assert store.check(["arrived/0", "arrived/1"])


class CancelledOnceAllArrived(EtcdStore):
    """The interleaving a real cluster hits: the newer generation is seen after the last arrival
    landed (the peer already went on to create its communicator)."""

    def wait_unless(self, keys, timeout, cancelled) -> None:
        self.wait(keys, timeout)
        raise WaitCancelled("generation 10 was released")


def test_a_member_cancelled_after_every_arrival_builds_the_group_anyway(client: EtcdClient, cluster_name: str) -> None:
    built: dict[int, object] = {}
    errors: list[BaseException] = []

    def member(r: int) -> None:
        def store(s: GroupSpec) -> EtcdStore:
            cls = CancelledOnceAllArrived if r == 0 else EtcdStore
            return cls(client, ClusterKeys(cluster_name).group_store(s.gen, s.key), timeout=timedelta(seconds=30))
        try:
            built[r] = build_group(spec(9, r), store, torch.device("cpu"), timedelta(seconds=30),
                                   cancelled=lambda: "generation 10 was released" if r == 0 else None)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=member, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(built) == [0, 1]
    x = [torch.tensor([1.0]), torch.tensor([2.0])]
    works = [built[r].backend.allreduce([x[r]]) for r in (0, 1)]  # type: ignore[attr-defined]
    for w in works:
        w.wait()
    assert [v.item() for v in x] == [3.0, 3.0]
    for g in built.values():
        g.abort("test over")  # type: ignore[attr-defined]


def test_both_members_arrive_and_the_group_works(client: EtcdClient, cluster_name: str) -> None:
    """Two threads stand in for the two processes: the wait passes and gloo connects."""
    built: dict[int, object] = {}

    def member(r: int) -> None:
        built[r] = build_group(spec(9, r), stores(client, cluster_name), torch.device("cpu"),
                               timedelta(seconds=30), cancelled=lambda: None)

    threads = [threading.Thread(target=member, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(built) == [0, 1]
    sums = {}

    def reduce(r: int) -> None:
        x = torch.tensor([float(r + 1)])
        built[r].backend.allreduce([x]).wait()  # type: ignore[attr-defined]
        sums[r] = x.item()

    threads = [threading.Thread(target=reduce, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sums == {0: 3.0, 1: 3.0}
    for g in built.values():
        g.abort("test over")  # type: ignore[attr-defined]


def test_arrivals_outlive_the_lease_and_go_with_their_generation(client: EtcdClient, cluster_name: str) -> None:
    """An arrival carries no lease (an etcd blip that costs a waiting rank its lease must not
    make it vanish); the leader's pruning of old generations removes it."""
    from rallypoint.recovery.events import prune_stores

    keys = ClusterKeys(cluster_name)
    seen: list[object] = []

    def look() -> str | None:  # asked every 0.1 s while the build waits for its peer
        if not seen:
            seen.append(client.get(f"{keys.group_store(2, 'tp-4.5')}arrived/0"))
        return None

    with pytest.raises(GroupError):
        build_group(spec(2, 0), stores(client, cluster_name), torch.device("cpu"), timedelta(seconds=0.5),
                    cancelled=look)
    kv = seen[0]
    assert kv is not None and kv.lease == 0  # type: ignore[attr-defined]
    client.put(f"{keys.group_store(2, 'tp-4.5')}arrived/0", "1")
    client.put(f"{keys.group_store(12, 'tp-4.5')}arrived/1", "1")
    assert prune_stores(client, keys, keep_from_gen=10) == 1
    assert client.get(f"{keys.group_store(2, 'tp-4.5')}arrived/0") is None
    assert client.get(f"{keys.group_store(12, 'tp-4.5')}arrived/1") is not None
