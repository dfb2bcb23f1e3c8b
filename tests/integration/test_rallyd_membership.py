"""Real rallyd processes over a real etcd: leaving, failing, leader failover, bad starts."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rallypoint.protocol.keys import ClusterKeys
from rallypoint.recovery import events as ev
from rallypoint.recovery.events import read_events
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.rendezvous.records import Plan
from rallypoint.testing.daemons import DaemonProcess, daemon_args, scrape_metrics, wait_for
from rallypoint.testing.etcd_server import EtcdCluster

TTL = 3.0


@pytest.fixture
def spawn(etcd: EtcdCluster, cluster_name: str, tmp_path: Path) -> Iterator:
    started: list[DaemonProcess] = []

    def start(node: str, *extra: str) -> DaemonProcess:
        d = DaemonProcess(node, daemon_args(etcd.endpoints, cluster_name, "--cpu-ranks", "1", *extra),
                          tmp_path / f"{node}.log").start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def wait_gone(client: EtcdClient, key: str, timeout: float) -> float:
    """Seconds until ``key`` is deleted (its lease ran out)."""
    t0 = time.monotonic()
    wait_for(f"{key} to be deleted", lambda: client.get(key) is None, timeout=timeout, every=0.02)
    return time.monotonic() - t0


def latest_plan(client: EtcdClient, keys: ClusterKeys) -> Plan:
    kvs, _ = client.get_prefix(keys.plans)
    return Plan.from_json(kvs[-1].key, kvs[-1].value)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_failed_node_leaves_within_ttl(spawn, client: EtcdClient, cluster_name: str, sig: int) -> None:
    keys = ClusterKeys(cluster_name)
    a, b = spawn("a"), spawn("b")
    a.wait_log("gen 1 released")
    b.wait_log("gen 1 released")
    b.signal(sig)
    gone = wait_gone(client, keys.node("b"), timeout=TTL + 3)
    assert gone <= TTL + 0.5, f"node b left {gone:.2f}s after the signal"
    a.wait_log("left b", timeout=5)
    assert latest_plan(client, keys).members == ("a",)
    # b's ranks of gen 1 are ordered aborted (peers blocked on them in NCCL would never error out)
    gen1 = Plan.from_json(keys.plan(1), client.get(keys.plan(1)).value)
    b_ranks = [s.rank for s in gen1.ranks if s.node == "b"]
    # (events reach etcd from a writer thread, a moment after the log line)
    aborts = wait_for("the abort order event", lambda: [e for e in read_events(client, keys, 1)
                                                        if e.kind == ev.ABORT_ORDERED], timeout=5)
    assert [e.detail["ranks"] for e in aborts] == [b_ranks] and "node(s) b left" in aborts[0].detail["reason"]
    assert client.get(keys.abort(1, b_ranks)) is not None


def test_clean_leave_on_sigterm_replans_at_once(spawn, client: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    a, b = spawn("a"), spawn("b")
    b.wait_log("gen 1 released")
    a.wait_log("gen 1 released")
    b.signal(signal.SIGTERM)
    assert b.proc.wait(timeout=10) == 0
    t_exit = time.monotonic()  # b's drain (its own time, load-dependent) is over
    a.wait_log("gen 2 released", timeout=5)
    # b left cleanly (its lease revoked): a re-plans after the last call (0.5 s); had the 3 s
    # lease run out instead, that would come at least ~2.5 s after b's exit
    assert time.monotonic() - t_exit < 2.0
    assert latest_plan(client, keys).members == ("a",)


def test_leader_failover_when_leader_is_killed(spawn, client: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    a = spawn("a")
    a.wait_log("became leader")
    b, c = spawn("b"), spawn("c")
    for d in (a, b, c):
        d.wait_log("released", timeout=15)
    a.signal(signal.SIGKILL)
    t0 = time.monotonic()
    held = wait_for("a new leader (b or c)", lambda: (kv := client.get(keys.leader)) is not None
                    and kv.value.decode() in ("b", "c") and kv, timeout=TTL + 3, every=0.02)
    assert time.monotonic() - t0 <= TTL + 0.5
    new = b if held.value == b"b" else c
    new.wait_log("left a", timeout=5)
    plan = latest_plan(client, keys)
    assert plan.members == ("b", "c") and plan.leader == new.node


def test_unreachable_etcd_exits_nonzero_naming_endpoints(tmp_path: Path) -> None:
    """While it retries, /metrics already answers and says etcd is unreachable."""
    d = DaemonProcess("x", daemon_args(("127.0.0.1:9",), "c", "--etcd-retry-deadline", "4",
                                       "--state-dir", str(tmp_path / "x")), tmp_path / "x.log").start()
    t0 = time.monotonic()
    m = scrape_metrics(tmp_path / "x", timeout=3)
    assert m[("rallypoint_etcd_reachable", ())] == 0 and m[("rallypoint_cluster_state", (("state", "forming"),))] == 1
    assert d.proc.wait(timeout=20) == 1
    assert 3.9 <= time.monotonic() - t0 < 12
    log = d.log_text()
    assert "rallyd.join_failed" in log and "127.0.0.1:9" in log and "etcd.retrying" in log


def test_a_taken_metrics_port_is_a_clear_startup_error(etcd: EtcdCluster, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = DaemonProcess("x", daemon_args(etcd.endpoints, "c", "--metrics-host", "127.0.0.1", "--metrics-port",
                                           str(port), "--state-dir", str(tmp_path / "x")), tmp_path / "x.log").start()
        assert d.proc.wait(timeout=20) == 1
    log = d.log_text()
    assert "rallyd.listen_failed" in log and f"[metrics] cannot listen on 127.0.0.1:{port}: Address already in use" in log
    assert "Traceback" not in log


def test_duplicate_node_id_is_refused(spawn) -> None:
    first = spawn("same")
    first.wait_log("gen 1 released")
    second = spawn("same")
    assert second.proc.wait(timeout=20) == 1
    assert "already held by pid" in second.log_text()
    assert first.proc.poll() is None


def test_bad_config_exits_2_with_the_key_named(tmp_path: Path) -> None:
    bad = tmp_path / "rallyd.toml"
    bad.write_text('[layout]\ntpp = 2\n')
    d = DaemonProcess("x", ["--config", str(bad), "--gpus", "0"], tmp_path / "x.log").start()
    assert d.proc.wait(timeout=20) == 2
    assert "tpp" in d.log_text() and "did you mean tp" in d.log_text()
