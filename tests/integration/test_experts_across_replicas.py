"""A mixture of experts spread over every replica (``[layout] ep = "dp"``), with real rallyd,
etcd, worker processes, gloo and SIGKILL: three one-rank replicas each hold two of three expert
slots (``expert_copies = 2``) and step together.

* every replica gives the single-process reference's greedy tokens;
* a rank SIGKILLed mid-stream: the survivors rebuild only their EP group and keep their weights,
  the restarted rank reads only its own experts, and every stream (the dead replica's too,
  resumed by the gateway) finishes with the failure-free tokens;
* with no restart allowed, the shrink serves on from the copies: nobody reads anything.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rallypoint.protocol.experts import experts_of, first_map, next_map
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.recovery import events as ev
from rallypoint.recovery.events import read_events
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.testing.daemons import DaemonProcess, wait_file, wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.checkpoint import make_model
from tests.integration.replicas import check, greedy_reference, kill_while_streaming, plan_of, start_replicas
from tests.integration.test_rallyd_recovery import plans
from tests.integration.test_serving import post

EXPERTS, SLOTS = 8, 3
PROMPTS = [[3, 17, 42, 99, 7], [11, 5, 250, 31], [64, 8, 19, 2, 77, 101], [120, 4, 9]]
TOKENS = 80


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("moe") / "model", "tiny", seed=5, arch="moe")


@pytest.fixture(scope="module")
def reference(moe: Path) -> list[list[int]]:
    return greedy_reference(moe, PROMPTS, TOKENS)


def start(etcd: EtcdCluster, cluster: str, tmp_path: Path, model: Path, *extra: str) -> tuple[DaemonProcess, str]:
    """One node, three one-rank replicas sharing the experts; returns the daemon and its gateway."""
    return start_replicas(etcd, cluster, tmp_path, model, 3, "--ep", "dp", "--expert-copies", "2", *extra)


def loaded(client: EtcdClient, keys: ClusterKeys, gen: int) -> dict[int, dict]:
    """Generation ``gen``'s shard_loaded events, by rank."""
    return {e.detail["rank"]: e.detail for e in read_events(client, keys, gen)
            if e.kind == ev.SHARD_LOADED and "rank" in e.detail}


def busy_seat(state: Path) -> int:
    """The local rank of the replica with the most streams in flight (its API's ``/health``): the
    gateway sends a burst to the least busy driver it knows, so which one gets them is up to timing."""
    def busy() -> list[tuple[int, int]]:
        counts = []
        for i in range(3):
            try:
                with urllib.request.urlopen(wait_file(state / f"api-{i}.url").strip() + "/health", timeout=5) as r:
                    counts.append((json.loads(r.read())["in_flight"], i))
            except urllib.error.HTTPError:  # not serving (yet): its streams wait for it
                return []
        return sorted(counts, reverse=True) if sum(n for n, _ in counts) == len(PROMPTS) else []
    return int(wait_for("every stream in flight at a replica", busy, timeout=10, every=0.02)[0][1])


def requests() -> list[dict]:
    return [{"prompt": p, "max_tokens": TOKENS, "temperature": 0} for p in PROMPTS]


def test_replicas_sharing_experts_serve_the_reference_and_a_restarted_rank_reads_only_its_experts(
        etcd: EtcdCluster, client: EtcdClient, cluster_name: str, tmp_path: Path, moe: Path,
        reference: list[list[int]]) -> None:
    keys = ClusterKeys(cluster_name)
    daemon, gateway = start(etcd, cluster_name, tmp_path, moe)
    try:
        first = plans(client, keys)[0]
        assert first.experts == first_map(3, 2)
        at1 = wait_for("every rank's weights", lambda: len(got := loaded(client, keys, 1)) == 3 and got)
        for rank, d in at1.items():  # each holds its two slots, and read them
            assert d["experts_held"] == d["experts_read"] == list(experts_of(first.experts.holds[rank], SLOTS, EXPERTS))
        for i in range(3):  # each replica alone: its tokens are the reference's, the others serving its experts
            url = wait_file(tmp_path / "a" / f"api-{i}.url").strip()
            check(post(url, requests()[i])[1]["choices"][0]["token_ids"], reference[i])

        # the busiest replica dies: its streams resume on another through the gateway
        seat = kill_while_streaming(daemon, gateway, requests(), reference, lambda: busy_seat(tmp_path / "a"))
        second = plan_of(client, keys, 2)
        assert second.dp == 3 and second.experts == first.experts  # restarted in place: same slots
        at2 = wait_for("generation 2's weights", lambda: len(got := loaded(client, keys, 2)) == 3 and got)
        restarted = next(s.rank for s in second.ranks if (s.node, s.local_rank) == ("a", seat))
        for rank, d in at2.items():
            if rank == restarted:  # the new process reads its own two slots' experts, no others
                assert d["experts_read"] == list(experts_of(second.experts.holds[rank], SLOTS, EXPERTS))
                assert len(d["experts_read"]) < EXPERTS
            else:  # the survivors kept their weights
                assert d["experts_read"] == [] and d["seconds"] == 0, d
    finally:
        daemon.stop()


def test_with_no_restart_the_shrink_serves_on_from_the_copies_without_reading(
        etcd: EtcdCluster, client: EtcdClient, cluster_name: str, tmp_path: Path, moe: Path,
        reference: list[list[int]]) -> None:
    keys = ClusterKeys(cluster_name)
    daemon, gateway = start(etcd, cluster_name, tmp_path, moe, "--worker-restart-budget", "0",
                            "--worker-restart-window", "600")
    try:
        seat = kill_while_streaming(daemon, gateway, requests(), reference, lambda: busy_seat(tmp_path / "a"))
        shrunk = plan_of(client, keys, 2)
        first = next(p for p in plans(client, keys) if p.gen == 1)
        seats = [(s.node, s.local_rank) for s in sorted(first.ranks, key=lambda s: s.rank)]
        survivors = [(s.node, s.local_rank) for s in sorted(shrunk.ranks, key=lambda s: s.rank)]
        assert shrunk.dp == 2 and sorted(survivors) == sorted(x for x in seats if x != ("a", seat))
        assert shrunk.experts == next_map(first.experts, seats, survivors, copies=2)
        assert all(set(h) <= set(first.experts.holds[seats.index(x)])  # nobody holds anything new
                   for h, x in zip(shrunk.experts.holds, survivors))
        at2 = wait_for("generation 2's weights", lambda: len(got := loaded(client, keys, 2)) == 2 and got)
        assert all(d["experts_read"] == [] and d["seconds"] == 0 for d in at2.values()), at2
        url = wait_file(tmp_path / "a" / f"api-{survivors[0][1]}.url").strip()  # and the two serve on
        answer = wait_for("an answer from a survivor", lambda: (got := post(url, requests()[3]))[0] == 200 and got)
        check(answer[1]["choices"][0]["token_ids"], reference[3])
    finally:
        daemon.stop()
