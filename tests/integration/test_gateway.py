"""The gateway with real daemons, workers and signals: a request whose driver dies mid-stream is
resumed on the rebuilt replica; a client whose gateway (its whole node) dies goes on at another
node's gateway; both with the failure-free tokens."""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from rallypoint.gateway.client import CompletionClient
from rallypoint.gateway.resume import Progress, RequestRejected
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.testing.daemons import DaemonProcess, scrape_metrics, wait_file, wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.checkpoint import make_model
from tests.integration.test_rallyd_recovery import seat_pid
from tests.integration.test_rallyd_serving import start_leader_then_pair


def drivers(gateway: str) -> list[str]:
    """The serving drivers a gateway's /health lists (503 and an empty list while there are none)."""
    try:
        with urllib.request.urlopen(gateway + "/health", timeout=5) as resp:
            return json.loads(resp.read())["drivers"]
    except urllib.error.HTTPError as err:
        assert err.code == 503
        return json.loads(err.read())["drivers"]


def run_streams(client: CompletionClient,
                requests: list[dict]) -> tuple[dict[int, Progress], list[threading.Thread]]:
    """Stream every request from a thread of its own; return once each has its first token."""
    got: dict[int, Progress] = {}

    def one(i: int) -> None:
        p = got[i] = Progress()
        for _ in client.stream(requests[i], p):
            pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    wait_for("every stream under way", lambda: len(got) == len(requests) and all(p.tokens for p in got.values()),
             timeout=30, every=0.01)
    return got, threads


def assert_in_flight(got: dict[int, Progress], requests: list[dict]) -> None:
    """Every stream has tokens and none has finished: a fault now hits them all mid-stream."""
    progress = {i: (len(p.tokens), p.finish_reason) for i, p in got.items()}
    assert all(0 < n < requests[i]["max_tokens"] and why is None for i, (n, why) in progress.items()), \
        f"not all in flight (tokens, finish reason): {progress}"


def join(threads: list[threading.Thread], got: dict[int, Progress]) -> None:
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a stream never ended"
    assert all(p.finish_reason == "length" for p in got.values()), {i: p.finish_reason for i, p in got.items()}


def test_driver_death_and_gateway_death_lose_nothing(etcd: EtcdCluster, client: EtcdClient, cluster_name: str,
                                                     tmp_path: Path) -> None:
    """c (leader, no rank), a (rank 0: the driver), b (rank 1). SIGKILL a's worker mid-stream: a's
    own gateway resumes the requests on the restarted driver. Then SIGKILL node a whole (daemon,
    worker, gateway) mid-stream: the client goes on at b's gateway once the replica has moved.
    a's gateway runs as two processes (``[gateway] processes``), b's and c's on a thread of rallyd."""
    model = make_model(tmp_path / "model", "tiny", seed=11)
    daemons: dict[str, DaemonProcess] = {}
    try:
        start_leader_then_pair(daemons, etcd, cluster_name, tmp_path, model,
                               extra={"a": ("--gateway-processes", "2")})
        wait_file(tmp_path / "a" / "api-0.url")
        gw = {n: wait_file(tmp_path / n / "gateway.url").strip() for n in ("a", "b", "c")}
        a_gateways = [p for p in psutil.Process(daemons["a"].pid).children()  # titled before they serve
                      if " ".join(p.cmdline()).startswith("rallypoint gateway (cluster ")]
        assert len(a_gateways) == 2, [p.cmdline() for p in psutil.Process(daemons["a"].pid).children()]
        wait_for("a's gateway sees the driver", lambda: drivers(gw["a"]), timeout=30, every=0.2)

        requests = [{"prompt": f"gateway {i}: how vexingly quick", "max_tokens": 60, "temperature": 0}
                    for i in range(3)]
        direct = CompletionClient([gw["c"]])  # through a gateway with no rank of its own
        reference = [direct.complete(r).tokens for r in requests]
        assert all(len(t) == 60 for t in reference)

        # 1. the driver dies; the client's gateway (a, same node) survives and resumes.
        on_a = CompletionClient([gw["a"]])
        got, threads = run_streams(on_a, requests)
        victim = seat_pid(daemons["a"], 0)
        assert_in_flight(got, requests)
        psutil.Process(victim).kill()
        join(threads, got)
        assert [got[i].tokens for i in range(len(requests))] == reference
        assert all(got[i].resumes == 0 for i in got)  # the client saw one unbroken stream
        m = scrape_metrics(tmp_path / "a")
        assert m[("rallypoint_gateway_resumes_total", ())] >= len(requests)  # a's gateway resumed each one
        assert m[("rallypoint_gateway_processes", ())] == 2 and m[("rallypoint_gateway_process_restarts", ())] == 0
        assert m[("rallypoint_gateway_requests_total", (("outcome", "completed"),))] == len(requests)

        # 2. the whole node a dies (the driver and the client's gateway with it).
        failover = CompletionClient([gw["a"], gw["b"], gw["c"]])
        wait_for("a serves again", lambda: drivers(gw["a"]), timeout=60, every=0.2)
        got, threads = run_streams(failover, requests)
        assert_in_flight(got, requests)
        daemons["a"].kill_node()
        join(threads, got)
        assert [got[i].tokens for i in range(len(requests))] == reference
        assert all(got[i].resumes >= 1 and got[i].upstreams[-1] != gw["a"] for i in got)

        # bad input through the gateway: the driver's 400 comes back, nothing retried
        try:
            failover.complete({"prompt": "", "max_tokens": 4, "temperature": 0})
            raise AssertionError("an empty prompt was accepted")
        except RequestRejected as exc:
            assert exc.status == 400 and "prompt: must not be empty" in str(exc)
        req = urllib.request.Request(gw["b"] + "/v1/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("malformed JSON was accepted")
        except urllib.error.HTTPError as err:
            assert err.code == 400 and "body is not valid JSON" in json.loads(err.read())["error"]["message"]
    finally:
        for d in daemons.values():
            d.stop()


def test_routes_keep_the_last_drivers_read_while_etcd_is_stopped(tmp_path: Path) -> None:
    """The gateway reads the other nodes' drivers from etcd in the background: with etcd stopped
    a routing call neither waits for it nor forgets the drivers it already knew."""
    import signal
    import time

    from rallypoint.gateway.routes import DriverRoutes
    from rallypoint.protocol.keys import ClusterKeys
    from tests.conftest import make_client

    def driver(url: str) -> dict:
        return {"workers": [{"driver": True, "state": "serving", "gen": 3, "api": url, "in_flight": 0}]}

    keys = ClusterKeys("routes")
    with EtcdCluster(1, root=tmp_path / "etcd") as etcd:  # __enter__ starts it
        c = make_client(etcd.endpoints, request_timeout=0.5, retry_deadline=2.0)
        c.put(keys.node_status_of("b"), json.dumps(driver("http://b")))
        routes = DriverRoutes(c, keys, "a", lambda: driver("http://a"), refresh=0.05)
        assert wait_for("b's driver read", lambda: routes() == ["http://a", "http://b"], timeout=10)
        os.kill(etcd.members[0].pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            for _ in range(20):  # a background read is stuck on etcd through all of these
                assert routes() == ["http://a", "http://b"]
                time.sleep(0.05)  # deliberate: the calls span 1 s of the outage (20 refresh periods)
            assert time.monotonic() - t0 < 1.9  # never waited out the 2 s retry deadline
        finally:
            os.kill(etcd.members[0].pid, signal.SIGCONT)
        c.close()
