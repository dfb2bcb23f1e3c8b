"""EtcdStore against a real etcd: every Store method, HashStore as the oracle, leases, generation
fencing, and real gloo process groups (init_process_group and a bare ProcessGroupGloo) in real
processes bootstrapped through it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from rallypoint.errors import EtcdUnavailable, StoreTimeout
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings, PrefixWatch
from rallypoint.rendezvous.store import EtcdStore, StoreUnavailable, StoreWaitTimeout
from rallypoint.testing.daemons import wait_for
from rallypoint.testing.etcd_server import INSTALL_HINT, EtcdCluster, etcd_binary, free_port

pytestmark = [pytest.mark.etcd, pytest.mark.skipif(etcd_binary() is None, reason=INSTALL_HINT)]

ROOT = Path(__file__).resolve().parents[2]


def _client(endpoints: tuple[str, ...], request_timeout: float = 1.0,
            retry_deadline: float = 5.0) -> EtcdClient:
    return EtcdClient(EtcdSettings(endpoints=endpoints, request_timeout=request_timeout,
                                   retry_deadline=retry_deadline))


@pytest.fixture
def store_client(etcd: EtcdCluster) -> Iterator[EtcdClient]:
    c = _client(etcd.endpoints)
    yield c
    c.close()


@pytest.fixture
def prefix() -> str:
    return ClusterKeys("t" + uuid.uuid4().hex[:10]).group_store(1, "tp:0")


@pytest.fixture
def store(store_client: EtcdClient, prefix: str) -> EtcdStore:
    return EtcdStore(store_client, prefix, timeout=timedelta(seconds=5))


# -- single-process behaviour ---------------------------------------------------------------

def test_set_get_bytes_and_str(store: EtcdStore, store_client: EtcdClient, prefix: str) -> None:
    store.set("bin", b"\x00\xff\x10")
    store.set("txt", "hello")
    store.set("empty", b"")
    assert store.get("bin") == b"\x00\xff\x10"
    assert store.get("txt") == b"hello"
    assert store.get("empty") == b""
    assert store_client.get(prefix + "txt").value == b"hello"  # really in etcd, under the prefix


def test_get_blocks_until_the_key_is_set(store: EtcdStore, store_client: EtcdClient,
                                         prefix: str) -> None:
    other = EtcdStore(store_client, prefix)
    threading.Timer(0.3, other.set, ("late", b"v")).start()
    t0 = time.monotonic()
    assert store.get("late") == b"v"
    assert 0.25 < time.monotonic() - t0 < 2.0


def test_get_timeout_is_a_dist_store_error_naming_key_and_prefix(store: EtcdStore,
                                                                  prefix: str) -> None:
    store.set_timeout(timedelta(seconds=0.3))
    assert store.timeout == timedelta(seconds=0.3)
    t0 = time.monotonic()
    with pytest.raises(dist.DistStoreError) as info:
        store.get("never")
    assert 0.3 <= time.monotonic() - t0 < 1.5
    assert isinstance(info.value, StoreTimeout)
    assert "never" in str(info.value) and prefix in str(info.value)


def test_wait_timeout_names_only_the_missing_keys(store: EtcdStore) -> None:
    store.set("here", b"1")
    t0 = time.monotonic()
    with pytest.raises(StoreWaitTimeout, match=r"\['absent'\]"):
        store.wait(["here", "absent"], timedelta(seconds=0.3))
    assert 0.3 <= time.monotonic() - t0 < 1.5


def test_wait_wakes_on_the_watch_event(store: EtcdStore, store_client: EtcdClient,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The waiter finds neither key, watches, takes "a"'s event and waits on; "b"'s event wakes it.
    (Its watch is observed: each read it begins on the watch is counted.)"""
    done: list[float] = []
    watches: list[PrefixWatch] = []
    reads: list[int] = []  # one entry per read of an event the waiter began on its watch
    open_watch = store_client.watch_prefix

    def watch_prefix(prefix: str, start_revision: int, sink=None) -> PrefixWatch:
        w = open_watch(prefix, start_revision, sink)
        read = w.get

        def counted_read(timeout: float | None = None):
            reads.append(1)
            return read(timeout)

        w.get = counted_read  # type: ignore[method-assign]
        watches.append(w)
        return w

    monkeypatch.setattr(store_client, "watch_prefix", watch_prefix)

    def waiter() -> None:
        store.wait(["a", "b"], timedelta(seconds=5))
        done.append(time.monotonic())

    t = threading.Thread(target=waiter)
    t.start()
    wait_for("the waiter to block on its watch", lambda: reads, timeout=5, every=0.005)
    assert len(watches) == 1 and not done
    store.set("a", b"1")
    # It took "a"'s event and went back to waiting for "b" (a second read on the watch).
    wait_for("the waiter to take a's event and wait on", lambda: len(reads) >= 2, timeout=5, every=0.005)
    assert not done, "returned before every key was set"
    set_at = time.monotonic()
    store.set("b", b"2")
    t.join(5)
    assert done and done[0] - set_at < 0.5
    assert len(watches) == 1  # one watch saw both events


def test_add_is_atomic_across_threads(store: EtcdStore, store_client: EtcdClient,
                                      prefix: str) -> None:
    def bump() -> None:
        for _ in range(50):
            store.add("ctr", 1)

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert store.add("ctr", 0) == 400
    assert store_client.get(prefix + "ctr").value == b"400"  # decimal string, as TCPStore
    assert store.add("ctr", -401) == -1


def test_compare_set_matches_hashstore(store: EtcdStore) -> None:
    oracle = dist.HashStore()
    oracle.set("present", "old")
    store.set("present", "old")
    calls = [
        ("missing", "x", "y"),        # absent, expected non-empty: returns expected, sets nothing
        ("missing", "", "first"),     # absent, expected empty: creates
        ("missing", "", "second"),    # present now: mismatch returns current
        ("missing", "first", "third"),
        ("present", "wrong", "new"),
        ("present", "old", "new"),
        ("present", "new", ""),       # set to empty...
        ("present", "", "refilled"),  # ...and empty matches empty
        ("binary", "", b"\x00\x01"),
    ]
    for key, expected, desired in calls:
        want = oracle.compare_set(key, expected, desired)
        got = store.compare_set(key, expected, desired)
        assert got == want, (key, expected, desired)
    for key in ("missing", "present", "binary"):
        assert store.get(key) == oracle.get(key)
    assert store.check(["missing", "present"]) == oracle.check(["missing", "present"])


def test_check_delete_num_keys_list_keys(store: EtcdStore) -> None:
    assert store.num_keys() == 0 and store.list_keys() == []
    store.set("a", b"1")
    store.add("b", 5)
    assert store.check(["a", "b"]) and not store.check(["a", "c"])
    assert store.num_keys() == 2
    assert sorted(store.list_keys()) == ["a", "b"]
    assert store.delete_key("a") is True
    assert store.delete_key("a") is False
    assert not store.check(["a"]) and store.num_keys() == 1


def test_append_multi_get_multi_set(store: EtcdStore) -> None:
    assert store.has_extended_api()
    store.append("log", "ab")
    store.append("log", b"cd")
    store.multi_set(["k1", "k2"], ["v1", b"v2"])
    assert store.multi_get(["log", "k2", "k1"]) == [b"abcd", b"v2", b"v1"]


def test_torch_calls_through_a_prefix_store(store: EtcdStore) -> None:
    """What C++ dispatches (deleteKey, getNumKeys, clone, append, multi_*) and errors crossing it."""
    ps = dist.PrefixStore("pg/", store)
    ps.set("a", "1")
    assert ps.add("n", 2) == 2
    assert ps.compare_set("a", "1", "2") == b"2"
    ps.append("a", "3")
    ps.multi_set(["m"], ["x"])
    assert ps.multi_get(["a", "m"]) == [b"23", b"x"]
    assert ps.num_keys() == 3
    assert ps.delete_key("m") is True
    assert ps.clone().get("a") == b"23"
    ps.wait(["a"], timedelta(seconds=1))
    with pytest.raises(dist.DistStoreError, match="pg//missing"):  # PrefixStore adds "/"
        ps.wait(["missing"], timedelta(seconds=0.2))


def test_keys_vanish_with_the_lease(store_client: EtcdClient, prefix: str) -> None:
    lease = store_client.keep_alive(5)
    owned = EtcdStore(store_client, prefix, lease=lease.id)
    owned.set("addr", b"10.0.0.1:1234")
    owned.add("ctr", 1)
    owned.compare_set("cas", "", "x")
    owned.append("app", "y")
    owned.multi_set(["m"], ["z"])
    kvs = store_client.get_prefix(prefix)[0]
    assert sorted(kv.key[len(prefix):] for kv in kvs) == ["addr", "app", "cas", "ctr", "m"]
    assert all(kv.lease == lease.id for kv in kvs)
    store_client.release(lease)
    assert owned.num_keys() == 0
    assert not owned.check(["addr"])


def test_generations_do_not_see_each_other(store_client: EtcdClient) -> None:
    keys = ClusterKeys("t" + uuid.uuid4().hex[:10])
    gen1 = EtcdStore(store_client, keys.group_store(1, "tp:0"))
    gen2 = EtcdStore(store_client, keys.group_store(2, "tp:0"), timeout=timedelta(seconds=0.2))
    gen1.set("0/0", b"old-address")
    assert gen1.add("ctr", 3) == 3
    assert not gen2.check(["0/0"]) and gen2.num_keys() == 0
    assert gen2.add("ctr", 1) == 1
    with pytest.raises(StoreWaitTimeout):
        gen2.get("0/0")
    assert gen1.get("ctr") == b"3"


def test_etcd_down_is_etcd_unavailable_and_dist_network_error() -> None:
    dead = _client((f"127.0.0.1:{free_port()}",), request_timeout=0.2, retry_deadline=0.3)
    try:
        s = EtcdStore(dead, ClusterKeys("down").group_store(1, "g"))
        with pytest.raises(StoreUnavailable) as info:
            s.set("k", b"v")
        assert isinstance(info.value, EtcdUnavailable)
        assert isinstance(info.value, dist.DistNetworkError)
    finally:
        dead.close()


# -- real processes ------------------------------------------------------------------------

CHILD = r"""
import json, sys
from datetime import timedelta
import torch, torch.distributed as dist
from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings
from rallypoint.rendezvous.store import EtcdStore

mode, endpoints, prefix, rank, world, out = sys.argv[1:7]
rank, world = int(rank), int(world)
client = EtcdClient(EtcdSettings(endpoints=tuple(endpoints.split(","))))
lease = client.keep_alive(10)
store = EtcdStore(client, prefix, lease=lease.id, timeout=timedelta(seconds=20))
t = torch.full((4,), float(rank + 1))
if mode == "init":
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    dist.all_reduce(t)
    dist.destroy_process_group()
else:
    pg = dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=20))
    pg.allreduce([t]).wait()
    del pg
with open(out, "w") as f:
    json.dump(t.tolist(), f)
client.release(lease)
client.close()
sys.exit(0 if t.eq(world * (world + 1) / 2).all() else 3)
"""


class Ranks:
    """One group of rank processes, started at once and collected later; killed by PID at the end."""

    def __init__(self, mode: str, world: int, endpoints: tuple[str, ...], out: Path) -> None:
        self.mode, self.world, self.out = mode, world, out
        prefix = ClusterKeys("t" + uuid.uuid4().hex[:10]).group_store(1, mode)
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "GLOO_SOCKET_IFNAME": "lo"}
        self.procs = []
        for rank in range(world):
            with open(out / f"{mode}-{rank}.log", "wb") as log:  # a file: a full pipe would block
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", CHILD, mode, ",".join(endpoints), prefix, str(rank),
                     str(world), str(out / f"{mode}-{rank}.json")],
                    env=env, stdout=log, stderr=subprocess.STDOUT))

    def results(self) -> list[list[float]]:
        for rank, p in enumerate(self.procs):
            p.wait(timeout=60)
            output = (self.out / f"{self.mode}-{rank}.log").read_text(errors="replace")
            assert p.returncode == 0, f"{self.mode} rank {rank} exited {p.returncode}:\n{output[-3000:]}"
        return [json.loads((self.out / f"{self.mode}-{r}.json").read_text()) for r in range(self.world)]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module", autouse=True)
def ranks(request: pytest.FixtureRequest, etcd: EtcdCluster,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Ranks]]:
    """The rank processes of the selected process tests, started before the first test so that
    their ``import torch`` (2-3 s each) overlaps the single-process tests; collected at the end."""
    selected = {item.name for item in request.session.items}
    out = tmp_path_factory.mktemp("ranks")
    groups: dict[str, Ranks] = {}
    try:
        for mode, world, test in (("init", 4, "test_init_process_group_gloo_four_ranks"),
                                  ("pg", 2, "test_bare_process_group_gloo_two_ranks")):
            if test in selected:
                groups[mode] = Ranks(mode, world, etcd.endpoints, out)
        yield groups
    finally:
        for g in groups.values():
            g.kill()


def test_init_process_group_gloo_four_ranks(ranks: dict[str, Ranks]) -> None:
    assert ranks["init"].results() == [[10.0] * 4] * 4


def test_bare_process_group_gloo_two_ranks(ranks: dict[str, Ranks]) -> None:
    assert ranks["pg"].results() == [[3.0] * 4] * 2
