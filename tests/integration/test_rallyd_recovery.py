"""rallyd's recovery strategies and its clean exit, with real daemons, etcd, workers and signals:
a warm spare takes a dead worker's seat; a seat past its restart budget is left out (shrink) and
comes back (grow back); SIGTERM drains; the etcd leader dies in the middle of a recovery."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from rallypoint.protocol.keys import ClusterKeys
from rallypoint.recovery import events as ev
from rallypoint.recovery.events import read_events
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.rendezvous.records import Plan
from rallypoint.testing.daemons import DaemonProcess, daemon_args, wait_file, wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.title import describe
from tests.conftest import make_client
from tests.integration.test_rallyd_serving import start_streams
from tests.integration.test_serving import post


def plans(client: EtcdClient, keys: ClusterKeys) -> list[Plan]:
    kvs, _ = client.get_prefix(keys.plans)
    return [Plan.from_json(kv.key, kv.value) for kv in kvs]


def workers(daemon: DaemonProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(daemon.pid).children() if describe(p.cmdline()) is not None]


def seat_pid(daemon: DaemonProcess, local_rank: int) -> int:
    mine = [p for p in workers(daemon) if (i := describe(p.cmdline())) and i.kind == "worker" and i.local_rank == local_rank]
    assert len(mine) == 1, [p.cmdline() for p in workers(daemon)]
    return mine[0].pid


def spare_pids(daemon: DaemonProcess) -> list[int]:
    return [p.pid for p in workers(daemon) if (i := describe(p.cmdline())) and i.kind == "spare"]


def kill_mid_stream(victim_daemon: DaemonProcess, stream_url: str, reference_url: str, requests: list[dict]) -> int:
    """Stream ``requests`` from ``stream_url``, SIGKILL the victim daemon's seat-0 worker while
    every one is mid-stream, and check each finished with its failure-free tokens (asked of
    ``reference_url`` first). Returns the killed worker's pid."""
    reference = [post(reference_url, r)[1]["choices"][0]["token_ids"] for r in requests]
    streams = start_streams(stream_url, requests)
    victim = seat_pid(victim_daemon, 0)
    streams.assert_in_flight()
    psutil.Process(victim).kill()
    got = streams.join()
    assert [got[i] for i in range(len(requests))] == reference
    return victim


def test_warm_spare_takes_the_dead_workers_seat(etcd: EtcdCluster, client: EtcdClient, cluster_name: str,
                                                tmp_path: Path) -> None:
    """b keeps one warm spare; b's worker is SIGKILLed mid-stream: the spare (already past
    ``import torch``) adopts the seat, the stream finishes with the failure-free tokens, every
    phase is in etcd as an event, and a new spare is started behind the adopted one."""
    model = make_model(tmp_path / "model", "tiny", seed=5)
    keys = ClusterKeys(cluster_name)
    daemons = []
    for node, extra in (("a", []), ("b", ["--spares", "1"])):
        args = daemon_args(etcd.endpoints, cluster_name, "--tp", "2", "--cpu-ranks", "1",
                           "--state-dir", str(tmp_path / node), "--worker-model", str(model), *extra)
        daemons.append(DaemonProcess(node, args, tmp_path / f"{node}.log").start())
    try:
        url = wait_file(tmp_path / "a" / "api-0.url")
        daemons[1].wait_log('"role": "spare"', timeout=60)  # the spare is warm and said hello
        spare = spare_pids(daemons[1])
        assert len(spare) == 1
        title = " ".join(psutil.Process(spare[0]).cmdline()).strip()  # ps tells a waiting spare from a worker
        assert title == f"rallypoint spare (cluster {cluster_name}, node b, waiting for a seat)", title
        victim = kill_mid_stream(daemons[1], url, url, [{"prompt": f"spare {i}: pack my box", "max_tokens": 40,
                                                         "temperature": 0} for i in range(4)])
        adopted = daemons[1].wait_log('"supervisor.spare_adopted"')
        assert adopted and f'"pid": {spare[0]}' in daemons[1].log_text()  # the spare holds the seat now
        assert psutil.pid_exists(spare[0]) and not psutil.pid_exists(victim)
        wait_for("the adopted spare's title", lambda: " ".join(psutil.Process(spare[0]).cmdline()).strip() ==
                 f"rallypoint worker rank 1 gen 2 (cluster {cluster_name}, seat b/0, serving)")
        p = plans(client, keys)
        assert [x.gen for x in p] == [1, 2] and "spare" in p[1].reason and p[1].ranks == p[0].ranks
        new_spare = wait_for("a new spare", lambda: [s for s in spare_pids(daemons[1]) if s != spare[0]])
        assert len(new_spare) == 1
        kinds = {(e.gen, e.kind) for e in read_events(client, keys)}
        for want in [(1, ev.RANK_FAILED), (1, ev.ABORT_ORDERED), (1, ev.REPLACEMENT), (1, ev.REPLAN_REQUESTED),
                     (2, ev.PLAN_WRITTEN), (2, ev.RELEASED), (2, ev.GROUPS_BUILT), (2, ev.SHARD_LOADED),
                     (2, ev.SERVING)]:
            assert want in kinds, want
        repl = [e for e in read_events(client, keys, 1) if e.kind == ev.REPLACEMENT]
        assert repl[0].detail["strategy"] == "spare" and repl[0].by == "b"
        status = wait_for("phase serving", lambda: (kv := client.get(keys.recovery))
                          and json.loads(kv.value)["phase"] == "serving" and json.loads(kv.value))
        assert status["gen"] == 2 and "exited with code -9" in status["why"]
    finally:
        for d in daemons:
            d.stop()


def test_a_spare_of_a_one_rank_replica_has_the_model_loaded_before_it_is_needed(
        etcd: EtcdCluster, client: EtcdClient, cluster_name: str, tmp_path: Path) -> None:
    """TP=1: every seat holds the whole model, so the warm spare loads it while it waits; the
    seat it adopts after a SIGKILL serves without loading anything, and the streams in flight
    (through rallyd's gateway: their driver is the process killed) finish with the failure-free
    tokens."""
    model = make_model(tmp_path / "model", "tiny", seed=9)
    keys = ClusterKeys(cluster_name)
    args = daemon_args(etcd.endpoints, cluster_name, "--tp", "1", "--cpu-ranks", "1", "--spares", "1",
                       "--state-dir", str(tmp_path / "a"), "--worker-model", str(model))
    daemon = DaemonProcess("a", args, tmp_path / "a.log").start()
    try:
        url = wait_file(tmp_path / "a" / "api-0.url")
        gateway = wait_file(tmp_path / "a" / "gateway.url").strip()
        spare = wait_for("a preloaded spare", lambda: [p for p in spare_pids(daemon)
                         if "waiting for a seat" in " ".join(psutil.Process(p).cmdline())], timeout=60)
        kill_mid_stream(daemon, gateway, url, [{"prompt": f"preloaded {i}", "max_tokens": 40, "temperature": 0}
                                               for i in range(2)])
        daemon.wait_log('"supervisor.spare_adopted"')
        assert seat_pid(daemon, 0) == spare[0]
        loaded = wait_for("gen 2's shard_loaded", lambda: [e for e in read_events(client, keys, 2)
                                                           if e.kind == ev.SHARD_LOADED])
        assert loaded[0].detail["seconds"] == 0.0, loaded  # the weights were already there
    finally:
        daemon.stop()


def standby_pids(daemon: DaemonProcess, doing: str = "") -> list[int]:
    """The daemon's standby interpreters (``worker.standby``), those whose title says ``doing``."""
    return [p.pid for p in psutil.Process(daemon.pid).children()
            if (t := " ".join(p.cmdline())).startswith("rallypoint standby (") and doing in t]


def test_a_cold_restart_runs_in_the_standby_interpreter(etcd: EtcdCluster, client: EtcdClient, cluster_name: str,
                                                        tmp_path: Path) -> None:
    """``[worker] standby`` on, no spares, TP=1: rallyd keeps a standby interpreter (torch and the
    worker's modules imported). The driver is SIGKILLed mid-stream: the seat restarts cold in the
    standby (its pid, rallyd logs ``standby: true``), a new standby starts behind it, and the streams
    (through rallyd's gateway) finish with the failure-free tokens."""
    model = make_model(tmp_path / "model", "tiny", seed=11)
    keys = ClusterKeys(cluster_name)
    args = daemon_args(etcd.endpoints, cluster_name, "--tp", "1", "--cpu-ranks", "1", "--worker-standby",
                       "--state-dir", str(tmp_path / "a"), "--worker-model", str(model))
    daemon = DaemonProcess("a", args, tmp_path / "a.log").start()
    try:
        url = wait_file(tmp_path / "a" / "api-0.url")
        gateway = wait_file(tmp_path / "a" / "gateway.url").strip()
        standby = wait_for("a standby with its imports done", lambda: standby_pids(daemon, "ready"), timeout=60)
        assert len(standby) == 1
        kill_mid_stream(daemon, gateway, url, [{"prompt": f"standby {i}: jinxed wizards", "max_tokens": 160,
                                                "temperature": 0} for i in range(2)])
        assert seat_pid(daemon, 0) == standby[0]  # the restarted worker is the former standby
        started = [json.loads(x) for x in daemon.log_text().splitlines() if '"supervisor.started"' in x]
        assert started[-1]["pid"] == standby[0] and started[-1]["local_rank"] == 0 and started[-1]["standby"] is True
        assert '"worker.standby_taken"' in (tmp_path / "a" / "logs" / "worker-0.log").read_text()
        wait_for("a new standby", lambda: [p for p in standby_pids(daemon) if p != standby[0]], timeout=10)
        repl = wait_for("the replacement event", lambda: [e for e in read_events(client, keys, 1)
                                                          if e.kind == ev.REPLACEMENT])
        assert repl[0].detail["strategy"] == "restart"
    finally:
        daemon.stop()


@pytest.mark.parametrize("lease_ran_out", [False, True], ids=["before-its-lease-ran-out", "after-its-lease-ran-out"])
def test_a_node_restarted_at_once_does_not_rejoin_the_dead_generation(
        etcd: EtcdCluster, client: EtcdClient, cluster_name: str, tmp_path: Path, lease_ran_out: bool) -> None:
    """b's rallyd and worker are SIGKILLed together and b comes back (at once: it takes over its
    own node key while the old lease still runs; or after the 3 s lease, when the layout could not
    be re-planned without it). b's rank in gen 1 died with its predecessor: the new rallyd reports
    it failed and asks for gen 2, rather than start a worker into gen 1's half-dead groups."""
    model = make_model(tmp_path / "model", "tiny", seed=8)
    keys = ClusterKeys(cluster_name)

    def start(node: str) -> DaemonProcess:
        args = daemon_args(etcd.endpoints, cluster_name, "--tp", "2", "--cpu-ranks", "1",
                           "--state-dir", str(tmp_path / node), "--worker-model", str(model))
        return DaemonProcess(node, args, tmp_path / f"{node}.log").start()

    a, b = start("a"), start("b")
    try:
        url = wait_file(tmp_path / "a" / "api-0.url")
        request = {"prompt": "restart at once", "max_tokens": 12, "temperature": 0}
        reference = post(url, request)[1]["choices"][0]["token_ids"]
        mark = len(a.log_text())
        killed = b.kill_node()
        b.proc.wait(timeout=10)
        if lease_ran_out:  # b's record goes with its lease, and no layout fits without b
            wait_for("b's node key to go with its lease", lambda: client.get(keys.node("b")) is None, timeout=15)
            a.wait_log('"rendezvous.cannot_plan"', timeout=15, after=mark)
        else:
            assert client.get(keys.node("b")) is not None, "b's lease ran out before the restart"
        b2 = start("b")
        b2.wait_log('"rallyd.predecessor_lost"', timeout=30)
        plan = wait_for("gen 2", lambda: [x for x in plans(client, keys) if x.gen == 2], timeout=30)[0]
        assert plan.members == ("a", "b") and "restarted" in plan.reason
        failed = [e for e in read_events(client, keys, 1) if e.kind == ev.RANK_FAILED]
        assert [(e.by, e.detail["rank"]) for e in failed] == [("b", 1)]
        assert "died with its predecessor" in failed[0].detail["reason"]
        started = [json.loads(x) for x in b2.log_text().splitlines() if '"supervisor.started"' in x]
        assert started and started[-1]["after_gen"] >= 1  # never a worker for gen 1
        status = wait_for("serving gen 2", lambda: (kv := client.get(keys.recovery))
                          and json.loads(kv.value)["phase"] == "serving" and json.loads(kv.value)["gen"] == 2,
                          timeout=60)
        assert status
        assert post(url, request)[1]["choices"][0]["token_ids"] == reference
        assert not [pid for pid in killed if psutil.pid_exists(pid)]
    finally:
        a.stop()
        b.stop()
        if "b2" in locals():
            b2.stop()


def start_two_replicas(etcd: EtcdCluster, cluster_name: str, tmp_path: Path, model: Path,
                       budget: int, window: int) -> tuple[DaemonProcess, str]:
    """One node, TP=1 x DP=2 on two CPU seats; returns the daemon and replica 0's API URL once
    both replicas serve."""
    args = daemon_args(etcd.endpoints, cluster_name, "--tp", "1", "--dp", "2", "--cpu-ranks", "2",
                       "--state-dir", str(tmp_path / "a"), "--worker-model", str(model),
                       "--worker-restart-budget", str(budget), "--worker-restart-window", str(window))
    daemon = DaemonProcess("a", args, tmp_path / "a.log").start()
    try:
        url = wait_file(tmp_path / "a" / "api-0.url")
        wait_file(tmp_path / "a" / "api-1.url")
    except BaseException:
        daemon.stop()
        raise
    return daemon, url


def test_spent_restart_budget_shrinks_then_grows_back(etcd: EtcdCluster, client: EtcdClient, cluster_name: str,
                                                      tmp_path: Path) -> None:
    """TP=1, DP=2 on one node, no restarts allowed: replica 1's worker dies, its seat is left out
    and the leader shrinks to dp=1 while replica 0 keeps streaming on its carried-over groups;
    after the restart window the seat is tried again and the layout grows back to dp=2."""
    model = make_model(tmp_path / "model", "tiny", seed=6)
    keys = ClusterKeys(cluster_name)
    daemon, url = start_two_replicas(etcd, cluster_name, tmp_path, model, budget=0, window=4)
    try:
        requests = [{"prompt": f"shrink {i}", "max_tokens": 60, "temperature": 0} for i in range(3)]
        reference = [post(url, r)[1]["choices"][0]["token_ids"] for r in requests]
        streams = start_streams(url, requests)
        streams.assert_in_flight()
        psutil.Process(seat_pid(daemon, 1)).kill()
        shrunk = wait_for("the shrunk plan", lambda: [x for x in plans(client, keys) if x.gen == 2])[0]
        assert shrunk.dp == 1 and [(s.node, s.local_rank) for s in shrunk.ranks] == [("a", 0)]
        got = streams.join()
        assert [got.get(i) for i in range(len(requests))] == reference  # replica 0 never noticed
        status = json.loads(wait_for("degraded", lambda: (kv := client.get(keys.recovery))
                                     and "dp=1 of 2" in str(json.loads(kv.value)["degraded"]) and kv).value)
        assert status["degraded"] == "serving dp=1 of 2 replicas"
        bad = [e for e in read_events(client, keys, 1) if e.kind == ev.SEAT_BAD]
        assert bad and bad[0].detail["local_rank"] == 1 and bad[0].detail["reason"] == "restart budget spent"
        grown = wait_for("the grown-back plan", lambda: [x for x in plans(client, keys) if x.gen == 3], timeout=30)[0]
        assert grown.dp == 2 and len(grown.ranks) == 2
        assert "capacity" in grown.reason
        wait_for("a worker on seat 1 again", lambda: len(workers(daemon)) == 2)
        url1 = wait_file(tmp_path / "a" / "api-1.url")
        assert post(url1, requests[0])[1]["choices"][0]["token_ids"] == reference[0]
    finally:
        daemon.stop()


def test_a_seat_whose_checkpoint_fails_stays_out_until_the_files_change(
        etcd: EtcdCluster, client: EtcdClient, cluster_name: str, tmp_path: Path) -> None:
    """TP=1, DP=2 on one node: the node's weights file is truncated, then replica 1's worker is
    killed. Its restart fails to load (exit 3), and the seat is left out at once, with budget to
    spare: a retry would read the same bytes. Past the restart window it is still out (no plan
    flaps back to dp=2 to fail again); once the file is put back, the layout grows back."""
    model = make_model(tmp_path / "model", "tiny", seed=12)
    weights = model / "model.safetensors"
    keys = ClusterKeys(cluster_name)
    daemon, url = start_two_replicas(etcd, cluster_name, tmp_path, model, budget=5, window=2)
    try:
        request = {"prompt": "a bad checkpoint", "max_tokens": 10, "temperature": 0}
        reference = post(url, request)[1]["choices"][0]["token_ids"]
        good = weights.read_bytes()

        def replace_weights(data: bytes) -> None:
            """A new file, as a copy would make it (replica 0 keeps its map of the old one: a file
            truncated in place would SIGBUS it)."""
            (model / "incoming").write_bytes(data)
            os.replace(model / "incoming", weights)

        replace_weights(good[: len(good) // 2])
        psutil.Process(seat_pid(daemon, 1)).kill()
        shrunk = wait_for("the plan without seat 1", lambda: [x for x in plans(client, keys) if x.dp == 1], timeout=60)[0]
        assert [(s.node, s.local_rank) for s in shrunk.ranks] == [("a", 0)]
        assert "code 3 (its shard failed to load)" in shrunk.reason and "seat left out" in shrunk.reason
        bad = [e for e in read_events(client, keys) if e.kind == ev.SEAT_BAD]
        assert len(bad) == 1 and "checkpoint failed to load" in bad[0].detail["reason"]
        assert post(url, request)[1]["choices"][0]["token_ids"] == reference  # replica 0 serves on
        time.sleep(4)  # deliberate: twice the restart window passes, and no plan takes seat 1 back
        assert max(x.gen for x in plans(client, keys)) == shrunk.gen  # still out: nothing flapped
        assert len(workers(daemon)) == 1
        replace_weights(good)
        grown = wait_for("the grown-back plan", lambda: [x for x in plans(client, keys) if x.gen > shrunk.gen],
                         timeout=30)[0]
        assert grown.dp == 2 and "capacity" in grown.reason
        assert "checkpoint files changed" in daemon.log_text()
        url1 = wait_file(tmp_path / "a" / "api-1.url")
        assert post(url1, request)[1]["choices"][0]["token_ids"] == reference
    finally:
        daemon.stop()


def test_spent_budget_where_no_shrink_fits_replans_when_the_seat_is_back(
        etcd: EtcdCluster, client: EtcdClient, cluster_name: str, tmp_path: Path) -> None:
    """TP=2 on one node's two seats, no restarts allowed: seat 1's worker dies, it is left out,
    and one seat cannot hold a replica, so the cluster is down (failed, not serving a broken
    generation). When the seat's window ends, the broken generation is re-planned: gen 2 serves."""
    model = make_model(tmp_path / "model", "tiny", seed=9)
    keys = ClusterKeys(cluster_name)
    args = daemon_args(etcd.endpoints, cluster_name, "--tp", "2", "--cpu-ranks", "2",
                       "--state-dir", str(tmp_path / "a"), "--worker-model", str(model),
                       "--worker-restart-budget", "0", "--worker-restart-window", "4")
    daemon = DaemonProcess("a", args, tmp_path / "a.log").start()
    try:
        url = wait_file(tmp_path / "a" / "api-0.url")
        request = {"prompt": "no room to shrink", "max_tokens": 10, "temperature": 0}
        reference = post(url, request)[1]["choices"][0]["token_ids"]
        psutil.Process(seat_pid(daemon, 1)).kill()
        failed = wait_for("phase failed", lambda: (kv := client.get(keys.recovery))
                          and json.loads(kv.value)["phase"] == "failed" and json.loads(kv.value))
        assert failed["gen"] == 1
        plan = wait_for("gen 2", lambda: [x for x in plans(client, keys) if x.gen == 2], timeout=30)[0]
        assert len(plan.ranks) == 2 and "seat left out" in plan.reason
        wait_for("serving gen 2", lambda: (kv := client.get(keys.recovery))
                 and json.loads(kv.value)["phase"] == "serving" and json.loads(kv.value)["gen"] == 2, timeout=60)
        assert post(url, request)[1]["choices"][0]["token_ids"] == reference
        assert len(workers(daemon)) == 2
    finally:
        daemon.stop()


def test_a_frozen_replica_is_replaced_when_its_heartbeats_stop(etcd: EtcdCluster, client: EtcdClient,
                                                              cluster_name: str, tmp_path: Path) -> None:
    """Both ranks of the replica are SIGSTOPped: no collective is left to trip a deadline, but
    the workers' heartbeats to rallyd stop, and after ``stall_timeout`` (2 s here) rallyd kills
    and replaces them; the next generation serves the failure-free tokens."""
    model = make_model(tmp_path / "model", "tiny", seed=10)
    keys = ClusterKeys(cluster_name)
    args = daemon_args(etcd.endpoints, cluster_name, "--tp", "2", "--cpu-ranks", "2",
                       "--state-dir", str(tmp_path / "a"), "--worker-model", str(model),
                       "--worker-stall-timeout", "2")
    daemon = DaemonProcess("a", args, tmp_path / "a.log").start()
    try:
        url = wait_file(tmp_path / "a" / "api-0.url")
        request = {"prompt": "frozen replica", "max_tokens": 10, "temperature": 0}
        reference = post(url, request)[1]["choices"][0]["token_ids"]
        frozen = [seat_pid(daemon, 0), seat_pid(daemon, 1)]
        t0 = time.monotonic()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        daemon.wait_log('"rallyd.worker_stalled"', timeout=15)
        took = time.monotonic() - t0
        assert 1.5 <= took < 8.0, took  # the last beat came up to 0.5 s before the stop
        wait_for("gen 2", lambda: [x for x in plans(client, keys) if x.gen == 2], timeout=30)
        named = [e for e in read_events(client, keys, 1) if e.kind == ev.SUSPECT_NAMED]
        assert named and all(e.detail["group"] == "heartbeat" and "no heartbeat" in e.detail["why"] for e in named)
        wait_for("the frozen workers gone", lambda: not any(psutil.pid_exists(p) for p in frozen), timeout=10)
        wait_for("serving", lambda: (kv := client.get(keys.recovery))
                 and json.loads(kv.value)["phase"] == "serving" and json.loads(kv.value)["gen"] >= 2, timeout=60)
        url = wait_file(tmp_path / "a" / "api-0.url")
        assert post(url, request)[1]["choices"][0]["token_ids"] == reference
    finally:
        daemon.stop()


def test_the_allreduce_probe_runs_without_a_model_and_resumes_after_a_kill(
        etcd: EtcdCluster, client: EtcdClient, cluster_name: str, tmp_path: Path) -> None:
    """``[worker] workload = "allreduce-probe"``: no model; the TP group all-reduces in a loop.
    A SIGKILLed rank's seat is restarted and the next generation's first all-reduce completes."""
    keys = ClusterKeys(cluster_name)
    args = daemon_args(etcd.endpoints, cluster_name, "--tp", "2", "--cpu-ranks", "2",
                       "--state-dir", str(tmp_path / "a"), "--worker-workload", "allreduce-probe")
    daemon = DaemonProcess("a", args, tmp_path / "a.log").start()

    def first_steps() -> list:
        return [e for e in read_events(client, keys) if e.kind == ev.FIRST_STEP]

    try:
        wait_for("gen 1's first all-reduce", lambda: [x for x in first_steps() if x.gen == 1], timeout=60)
        victim = seat_pid(daemon, 1)
        psutil.Process(victim).kill()
        resumed = wait_for("gen 2's first all-reduce", lambda: [x for x in first_steps() if x.gen == 2], timeout=60)
        assert resumed[0].detail["rank"] == 0
        assert any(x.gen == 1 and x.kind == ev.RANK_FAILED for x in read_events(client, keys, 1))
        assert not (tmp_path / "a" / "api-0.url").exists()  # no model, no API
    finally:
        daemon.stop()


def test_sigterm_drains_then_leaves_and_peers_replan_at_once(etcd: EtcdCluster, client: EtcdClient,
                                                             cluster_name: str, tmp_path: Path) -> None:
    """a and b hold one TP=2 replica each. SIGTERM b mid-stream: b's replica refuses new requests
    (503, draining) but finishes the ones in flight with the failure-free tokens; then b leaves
    and a re-plans without waiting out b's lease."""
    model = make_model(tmp_path / "model", "tiny", seed=7)
    keys = ClusterKeys(cluster_name)
    daemons = []
    for node in ("a", "b"):
        args = daemon_args(etcd.endpoints, cluster_name, "--tp", "2", "--cpu-ranks", "2", "--rendezvous-lease-ttl", "10",
                           "--state-dir", str(tmp_path / node), "--worker-model", str(model))
        daemons.append(DaemonProcess(node, args, tmp_path / f"{node}.log").start())
    try:
        url_a = wait_file(tmp_path / "a" / "api-0.url")
        url_b = wait_file(tmp_path / "b" / "api-0.url")
        requests = [{"prompt": f"drain {i}: sphinx of black quartz", "max_tokens": 300, "temperature": 0} for i in range(3)]
        reference = [post(url_a, r)[1]["choices"][0]["token_ids"] for r in requests]
        streams = start_streams(url_b, requests)
        streams.assert_in_flight()
        t_term = time.monotonic()
        daemons[1].signal(signal.SIGTERM)
        daemons[1].wait_log('"rallyd.draining"', timeout=10)
        worker_log = tmp_path / "b" / "logs" / "worker-0.log"
        wait_for("b's driver to close its queue", lambda: '"worker.draining"' in worker_log.read_text(), timeout=5)

        code, body, headers = post(url_b, {"prompt": "too late", "max_tokens": 1, "temperature": 0})
        assert code == 503 and "draining" in body["error"]["message"] and headers["retry-after"]
        got = streams.join()
        assert [got.get(i) for i in range(len(requests))] == reference  # in flight: finished, unchanged
        assert daemons[1].proc.wait(timeout=30) == 0
        t_exit = time.monotonic()
        after = wait_for("the plan without b", lambda: [x for x in plans(client, keys) if x.members == ("a",)])
        t_plan = time.monotonic()
        assert after[0].reason == "left b" and after[0].dp == 1
        # b's lease is 10 s: the re-plan came from b's clean leave, not from the lease running out.
        assert t_plan - t_exit < 3.0, f"re-plan {t_plan - t_exit:.2f}s after b exited"
        assert t_exit - t_term < 60
        drained = [e for e in read_events(client, keys) if e.kind == ev.DRAINED]
        assert drained and drained[0].detail["unfinished"] == []
        assert post(url_a, requests[1])[1]["choices"][0]["token_ids"] == reference[1]
    finally:
        for d in daemons:
            d.stop()


def test_etcd_leader_killed_in_the_middle_of_a_recovery(etcd3: EtcdCluster, cluster_name: str,
                                                        tmp_path: Path) -> None:
    """3-member etcd. b's worker is SIGKILLed and, as soon as the abort order is in etcd, the etcd
    leader is SIGKILLed too: the recovery finishes on the surviving members, with the same tokens."""
    model = make_model(tmp_path / "model", "tiny", seed=8)
    keys = ClusterKeys(cluster_name)
    client = make_client(etcd3.endpoints, retry_deadline=20.0)
    daemons = []
    for node in ("a", "b"):
        args = daemon_args(etcd3.endpoints, cluster_name, "--tp", "2", "--cpu-ranks", "1",
                           "--state-dir", str(tmp_path / node), "--worker-model", str(model))
        daemons.append(DaemonProcess(node, args, tmp_path / f"{node}.log").start())
    try:
        url = wait_file(tmp_path / "a" / "api-0.url")
        requests = [{"prompt": f"etcd leader {i}", "max_tokens": 40, "temperature": 0} for i in range(4)]
        reference = [post(url, r)[1]["choices"][0]["token_ids"] for r in requests]
        streams = start_streams(url, requests)
        leader = etcd3.leader()
        streams.assert_in_flight()
        psutil.Process(seat_pid(daemons[1], 0)).kill()
        wait_for("the abort order", lambda: client.get_prefix(keys.aborts)[0], every=0.002)
        etcd3.kill(leader)
        got = streams.join()
        assert [got.get(i) for i in range(len(requests))] == reference
        p = wait_for("gen 2 released", lambda: client.get(keys.released_of(2)) and plans(client, keys))
        assert [x.gen for x in p] == [1, 2] and p[1].ranks == p[0].ranks
        assert etcd3.leader() is not leader
    finally:
        for d in daemons:
            d.stop()
        client.close()
