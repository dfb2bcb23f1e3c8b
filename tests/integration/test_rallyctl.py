"""rallyctl against a real etcd: plan output, and one-line errors with non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.rendezvous.records import Plan, RankSlot
from rallypoint.testing.etcd_server import EtcdCluster


def rallyctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rallypoint.cli", *args], capture_output=True, text=True, timeout=60)


def test_plan_and_errors(etcd: EtcdCluster, client: EtcdClient, cluster_name: str, tmp_path: Path) -> None:
    keys = ClusterKeys(cluster_name)
    for gen in (1, 2):
        plan = Plan(gen=gen, tp=2, pp=1, dp=1, ranks=(RankSlot(0, "a", 0), RankSlot(1, "a", 1)),
                    members=("a",), reason=f"r{gen}", leader="a")
        client.put(keys.plan(gen), plan.to_json())
    ep = ",".join(etcd.endpoints)
    out = rallyctl("--endpoints", ep, "--cluster", cluster_name, "plan")
    assert out.returncode == 0 and "generation 2: world 2 = TP 2 x PP 1 x DP 1" in out.stdout
    out = rallyctl("--endpoints", ep, "--cluster", cluster_name, "--json", "plan", "1")
    assert out.returncode == 0 and json.loads(out.stdout)["reason"] == "r1"
    out = rallyctl("--endpoints", ep, "--cluster", cluster_name, "plan", "9")
    want = f"rallyctl: cluster {cluster_name!r} has no generation 9 (generations 1..2)"
    assert out.returncode == 1 and out.stderr.strip() == want
    out = rallyctl("--endpoints", ep, "--cluster", "nosuch", "plan")
    assert out.returncode == 1 and "has no plan" in out.stderr and "Traceback" not in out.stderr
    out = rallyctl("--endpoints", "127.0.0.1:9", "--timeout", "0.5", "plan")
    assert out.returncode == 2 and out.stderr.startswith("rallyctl: etcd unreachable at 127.0.0.1:9")
    assert len(out.stderr.strip().splitlines()) == 1
    out = rallyctl("make-model", str(tmp_path / "m"), "--size", "tiny", "--seed", "3")
    assert out.returncode == 0 and (tmp_path / "m" / "config.json").exists()
    assert (tmp_path / "m" / "model.safetensors").exists()


def test_status_events_kill_and_cordon_on_a_live_cluster(etcd: EtcdCluster, client: EtcdClient, cluster_name: str,
                                                         tmp_path: Path) -> None:
    """Two real daemons serving TP=2: status before and after a drill kill, the events of that
    recovery, a cordon that leaves no valid layout (failed, still serving) and the uncordon."""
    import psutil

    from rallypoint.testing.daemons import DaemonProcess, daemon_args, wait_file, wait_for
    from rallypoint.worker.checkpoint import make_model

    model = make_model(tmp_path / "model", "tiny", seed=9)
    keys = ClusterKeys(cluster_name)
    daemons = [DaemonProcess(n, daemon_args(etcd.endpoints, cluster_name, "--tp", "2", "--cpu-ranks", "1",
                                            "--state-dir", str(tmp_path / n), "--worker-model", str(model)),
                             tmp_path / f"{n}.log").start() for n in ("a", "b")]
    ctl = ("--endpoints", ",".join(etcd.endpoints), "--cluster", cluster_name)

    def status() -> dict:
        out = rallyctl(*ctl, "--json", "status")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    try:
        wait_file(tmp_path / "a" / "api-0.url")
        s = wait_for("both ranks serving", lambda: (d := status()) and all(r["state"] == "serving" for r in d["ranks"])
                     and all(n["heartbeat_age"] is not None for n in d["nodes"]) and d, timeout=30, every=0.3)
        assert s["state"] == "serving" and s["generation"] == 1 and s["leader"] in ("a", "b")
        assert [(n["node"], n["ranks"], n["health"]) for n in s["nodes"]] == [("a", [0], "ok"), ("b", [1], "ok")]
        assert [r["seat"] for r in s["ranks"]] == ["a/0", "b/0"] and all(r["pid"] for r in s["ranks"])
        human = rallyctl(*ctl, "status").stdout
        assert f"Cluster: {cluster_name}  generation 1  state: serving" in human
        assert "Layout: TP 2 x PP 1 x DP 1 = 2 ranks" in human
        assert "| a    |" in human and "| 1    | b/0  |" in human
        assert [n["gateway"] for n in s["nodes"]] == ["thread", "thread"] and "| thread " in human
        victim = s["ranks"][1]["pid"]

        out = rallyctl(*ctl, "kill", "1")
        assert out.returncode == 0 and "SIGKILL to rank 1 (b/0)" in out.stdout
        wait_for("the victim gone", lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie")
        s = wait_for("gen 2 serving", lambda: (d := status())["generation"] == 2 and d["state"] == "serving"
                     and all(r["state"] == "serving" for r in d["ranks"]) and d, timeout=60, every=0.3)
        assert "exited with code -9" in s["recovery"]["why"] and s["ranks"][1]["pid"] != victim

        ev = json.loads(rallyctl(*ctl, "--json", "events").stdout)
        kinds = [e["kind"] for e in ev["events"]]
        for k in ("rank_failed", "abort_ordered", "replacement", "plan_written", "released", "groups_built", "serving"):
            assert k in kinds, k
        (rec,) = ev["recoveries"]
        assert rec["failed_gen"] == 1 and 0 < rec["seconds"]["groups_built"] < 30
        human = rallyctl(*ctl, "events").stdout.splitlines()
        assert any(" rank_failed " in line and "rank 1 (b/0" in line for line in human)
        assert human[-1].startswith("recovery of gen 1 (rank 1 (b/0") and "rebuild" in human[-1]
        assert rallyctl(*ctl, "events", "--since", "2").stdout.count("rank_failed") == 0

        assert rallyctl(*ctl, "cordon", "b").stdout.strip() == "b cordoned"
        s = wait_for("failed: no layout fits", lambda: (d := status())["state"] == "failed" and d, every=0.3)
        assert [n["health"] for n in s["nodes"]] == ["ok", "cordoned"] and s["generation"] == 2  # still serving gen 2
        assert "cannot hold one replica" in s["recovery"]["why"]
        assert rallyctl(*ctl, "uncordon", "b").returncode == 0
        wait_for("serving again", lambda: status()["state"] == "serving", every=0.3)

        # drain: nothing in flight, so the replica reports drained at once; then b is cordoned.
        out = rallyctl(*ctl, "--json", "drain", "b", "--timeout-drain", "10")
        assert out.returncode == 0, out.stderr
        d = json.loads(out.stdout)
        assert d["replicas"] == [0] and d["unfinished"] == [] and d["seconds"] < 10
        wait_for("b cordoned by the drain", lambda: status()["nodes"][1]["health"] == "cordoned", every=0.3)
        assert rallyctl(*ctl, "uncordon", "b").returncode == 0
        wait_for("serving after the drain", lambda: status()["state"] == "serving", every=0.3)

        # a malformed drill order is reported by b's rallyd and touches nothing
        pid_b = status()["ranks"][1]["pid"]
        client.put(keys.kill("b", 0), "NOPE")
        daemons[1].wait_log('"rallyd.malformed_kill_order"')
        assert psutil.pid_exists(pid_b) and psutil.Process(pid_b).status() != "zombie"

        for args, code, text in [(("kill", "7"), 1, "generation 2 has no rank 7 (ranks 0..1)"),
                                 (("cordon", "zz"), 1, "no node 'zz' in cluster (nodes: a, b)")]:
            out = rallyctl(*ctl, *args)
            assert out.returncode == code and out.stderr.strip() == f"rallyctl: {text}", out.stderr
        out = rallyctl("--endpoints", ",".join(etcd.endpoints), "--cluster", "nosuch", "status")
        assert out.returncode == 1 and "cluster 'nosuch' does not exist" in out.stderr and "Traceback" not in out.stderr
        out = rallyctl("--endpoints", ",".join(etcd.endpoints), "--cluster", "nosuch", "events")
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    finally:
        for d in daemons:
            d.stop()
        client.delete_prefix(keys.root)
