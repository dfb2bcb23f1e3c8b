"""rallyd runs the workers: a request stream lives through a SIGKILLed worker (real daemons, real
etcd, real worker processes, real signals)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.rendezvous.records import Plan
from rallypoint.testing.daemons import DaemonProcess, daemon_args, scrape_metrics, wait_file, wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.title import describe
from tests.conftest import make_client
from tests.integration.test_serving import post, stream


class Streams:
    """Requests streamed each from its own thread; ``tokens[i]`` grows as request i's chunks arrive."""

    def __init__(self, url: str, requests: list[dict]) -> None:
        self.tokens: dict[int, list[int]] = {i: [] for i in range(len(requests))}
        self.finished: dict[int, bool] = dict.fromkeys(self.tokens, False)
        self.threads = [threading.Thread(target=self._run, args=(url, i, r), daemon=True)
                        for i, r in enumerate(requests)]
        for t in self.threads:
            t.start()

    def _run(self, url: str, i: int, request: dict) -> None:
        def on_event(e: dict) -> None:
            self.tokens[i] += e["choices"][0]["token_ids"]
            self.finished[i] = self.finished[i] or e["choices"][0]["finish_reason"] is not None

        stream(url, request, on_event=on_event)

    def assert_in_flight(self) -> None:
        """Every request has streamed tokens and none has finished: a fault now hits them all mid-stream."""
        progress = {i: (len(t), self.finished[i]) for i, t in self.tokens.items()}
        assert all(n > 0 and not done for n, done in progress.values()), f"not all in flight: {progress}"

    def join(self, timeout: float = 120) -> dict[int, list[int]]:
        for t in self.threads:
            t.join(timeout=timeout)
        assert not any(t.is_alive() for t in self.threads), "a stream never ended"
        assert all(self.finished.values()), f"a stream was cut short: {self.finished}"
        return self.tokens


def start_streams(url: str, requests: list[dict]) -> Streams:
    """Stream every request; return once each has its first token (they are all running)."""
    streams = Streams(url, requests)
    wait_for("every stream's first token", lambda: all(streams.tokens.values()), timeout=30, every=0.005)
    return streams


def start_leader_then_pair(daemons: dict[str, DaemonProcess], etcd: EtcdCluster, cluster_name: str,
                           tmp_path: Path, model: Path, extra: dict[str, tuple[str, ...]] | None = None) -> None:
    """Three nodes, one rank slot each, TP=2: c first (the leader, left without a rank), then a
    and b: a/0 is rank 0 (the driver), b/0 rank 1. c is cordoned until that first generation is
    released, so it comes out that way however late a and b arrive (a rallyd can take seconds to
    start on a loaded host), then uncordoned: a rank may move to c later. Each daemon is put in
    ``daemons`` as it starts, so the caller's cleanup stops whatever did start. ``extra``: more
    flags for a node's daemon."""
    keys = ClusterKeys(cluster_name)
    client = make_client(etcd.endpoints)
    try:
        client.put(keys.cordoned_of("c"), json.dumps({"by": "test: no rank for the leader at first"}))
        for node in ("c", "a", "b"):
            args = daemon_args(etcd.endpoints, cluster_name, "--tp", "2", "--cpu-ranks", "1",
                               "--rendezvous-last-call", "2",
                               "--state-dir", str(tmp_path / node), "--worker-model", str(model),
                               *(extra or {}).get(node, ()))
            daemons[node] = DaemonProcess(node, args, tmp_path / f"{node}.log").start()
            if node == "c":
                daemons[node].wait_log("became leader", timeout=30)
        daemons["c"].wait_log('"rallyd.generation_released"', timeout=90)
        first = next(json.loads(x) for x in daemons["c"].log_text().splitlines()
                     if '"rallyd.generation_released"' in x)
        assert first["layout"] == {"0": "a/0", "1": "b/0"}, first
        client.delete(keys.cordoned_of("c"))  # the same placement: no new generation for it
    finally:
        client.close()


def worker_pid(daemon: DaemonProcess) -> int:
    kids = [p for p in psutil.Process(daemon.pid).children() if describe(p.cmdline()) is not None]
    assert len(kids) == 1, kids
    return kids[0].pid


def check_metrics_after_recovery(tmp_path: Path, fault: str) -> None:
    """Both daemons' /metrics, parsed by prometheus_client: the cluster back to serving gen 2 after
    one recovery with the right cause, its phases timed; a's driver's requests counted."""
    cause = "rank_exit" if fault == "SIGKILL" else "rank_hung"

    last: dict = {}

    def settled() -> dict | None:
        m = last["m"] = {n: scrape_metrics(tmp_path / n) for n in ("a", "b")}
        done = all(x[("rallypoint_generation", ())] == 2 and x[("rallypoint_ranks", (("state", "serving"),))] == 1
                   and x.get(("rallypoint_recovery_seconds_count", ())) == 1 for x in m.values())
        return m if done and m["a"][("rallypoint_requests_total", (("outcome", "completed"),))] == 12 else None

    try:
        m = wait_for("metrics of a finished recovery", settled, timeout=15, every=0.3)
    except AssertionError:
        brief = {n: {k: v for k, v in x.items() if not k[0].endswith(("_bucket", "_created"))}
                 for n, x in last.get("m", {}).items()}
        raise AssertionError(f"metrics never settled; last scrape: {brief}") from None
    for node, x in m.items():
        assert x[("rallypoint_cluster_state", (("state", "serving"),))] == 1, node
        assert x[("rallypoint_recoveries_total", (("cause", cause),))] == 1, node
        assert sum(v for (name, _), v in x.items() if name == "rallypoint_recoveries_total") == 1, node
        assert 0 < x[("rallypoint_recovery_seconds_sum", ())] < 60, node
        for phase in ("aborting", "planning", "rebuilding"):
            assert x[("rallypoint_recovery_phase_seconds_count", (("phase", phase),))] >= 1, (node, phase)
        assert x[("rallypoint_etcd_reachable", ())] == 1
    a, b = m["a"], m["b"]
    assert a[("rallypoint_requests_total", (("outcome", "accepted"),))] == 12  # 6 reference + 6 streamed
    assert a[("rallypoint_requests_resumed_total", ())] >= 6  # all 6 streams were held over the abort
    assert a[("rallypoint_requests_in_flight", ())] == 0
    assert b[("rallypoint_requests_total", (("outcome", "accepted"),))] == 0  # b holds no driver
    assert b[("rallypoint_worker_replacements_total", (("strategy", "restart"),))] == 1
    assert a[("rallypoint_leader", ())] + b[("rallypoint_leader", ())] == 1
    if fault == "SIGSTOP":  # a's rank waited on the stopped one past its deadline
        assert a[("rallypoint_collectives_tripped_total", (("group", "tp"), ("trigger", "deadline")))] >= 1


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_request_stream_lives_through_a_failed_worker(etcd: EtcdCluster, client: EtcdClient, cluster_name: str,
                                                      tmp_path: Path, fault: str) -> None:
    """SIGKILL: the owning daemon sees the exit. SIGSTOP (a hang): the peer's watchdog trips, its
    diagnosis names the stopped seat, and the owning daemon kills it; then the same path."""
    model = make_model(tmp_path / "model", "tiny", seed=1)
    keys = ClusterKeys(cluster_name)
    daemons = []
    for node in ("a", "b"):
        args = daemon_args(etcd.endpoints, cluster_name, "--tp", "2", "--cpu-ranks", "1",
                           "--state-dir", str(tmp_path / node), "--worker-model", str(model))
        daemons.append(DaemonProcess(node, args, tmp_path / f"{node}.log").start())
    try:
        url = wait_file(tmp_path / "a" / "api-0.url")
        requests = [{"prompt": f"request {i}: the quick brown fox", "max_tokens": 40, "temperature": 0} for i in range(6)]
        reference = [post(url, r)[1]["choices"][0]["token_ids"] for r in requests]
        streams = start_streams(url, requests)
        victim = worker_pid(daemons[1])
        streams.assert_in_flight()
        t_kill = time.monotonic()
        psutil.Process(victim).send_signal(getattr(signal, fault))
        # The owning daemon notices the exit (after killing the stuck worker) and orders the abort.
        kvs = wait_for("the abort order", lambda: client.get_prefix(keys.aborts)[0], timeout=10, every=0.005)
        detected = time.monotonic() - t_kill
        order = json.loads(kvs[0].value)
        assert order["gen"] == 1 and order["ranks"] == [1] and "exited" in order["reason"]
        # SIGKILL: the exit is seen at once. SIGSTOP: a deadline (1 s floor) first.
        assert detected < (1.0 if fault == "SIGKILL" else 3.0), f"abort order {detected:.3f}s after {fault}"
        if fault == "SIGSTOP":
            assert "exited with code -9" in order["reason"]
            assert '"rallyd.suspect_named"' in daemons[1].log_text() and '"kind": "stuck"' in daemons[1].log_text()
        got = streams.join()
        assert [got[i] for i in range(len(requests))] == reference  # nothing lost, nothing changed
        kvs, _ = client.get_prefix(keys.plans)
        plans = [Plan.from_json(kv.key, kv.value) for kv in kvs]
        assert [p.gen for p in plans] == [1, 2]
        assert "restarted in place" in plans[1].reason and plans[1].ranks == plans[0].ranks
        replacement = worker_pid(daemons[1])
        assert replacement != victim
        check_metrics_after_recovery(tmp_path, fault)
    finally:
        for d in daemons:
            d.stop()


@pytest.mark.parametrize("victim", ["rank-node", "leader"])
def test_request_stream_lives_through_a_lost_node(etcd: EtcdCluster, client: EtcdClient, cluster_name: str,
                                                  tmp_path: Path, victim: str) -> None:
    """Three nodes, one rank slot each, TP=2: c is the leader (started first) and holds no rank.
    SIGKILL a whole node (daemon and worker): b, whose rank moves to c once b's lease runs out; or
    the leader c, after which a new leader writes the next plan and the replica switches to it."""
    model = make_model(tmp_path / "model", "tiny", seed=3)
    keys = ClusterKeys(cluster_name)
    daemons: dict[str, DaemonProcess] = {}
    try:
        start_leader_then_pair(daemons, etcd, cluster_name, tmp_path, model)
        url = wait_file(tmp_path / "a" / "api-0.url")
        requests = [{"prompt": f"node loss {i}", "max_tokens": 40, "temperature": 0} for i in range(4)]
        reference = [post(url, r)[1]["choices"][0]["token_ids"] for r in requests]
        streams = start_streams(url, requests)
        streams.assert_in_flight()
        daemons["b" if victim == "rank-node" else "c"].kill_node()
        got = streams.join()
        assert [got[i] for i in range(len(requests))] == reference
        if victim == "rank-node":  # a's driver held every stream over the abort of b's rank
            wait_for("a's count of the streams it held", lambda: scrape_metrics(tmp_path / "a").get(
                ("rallypoint_requests_resumed_total", ()), 0) >= len(requests), timeout=15, every=0.3)
        expected_nodes = ("a", "c") if victim == "rank-node" else ("a", "b")

        def replanned() -> Plan | None:  # the lost node's lease runs out, the (new) leader re-plans
            kvs, _ = client.get_prefix(keys.plans)
            last = Plan.from_json(kvs[-1].key, kvs[-1].value)
            return last if last.members == expected_nodes else None

        last = wait_for(f"a plan of {expected_nodes}", replanned, timeout=15, every=0.1)
        assert {s.node for s in last.ranks} <= set(expected_nodes)
        assert last.leader in expected_nodes
        # The replica serves in the new generation too, with the same tokens.
        assert post(url, requests[0])[1]["choices"][0]["token_ids"] == reference[0]
    finally:
        for d in daemons.values():
            d.stop()
