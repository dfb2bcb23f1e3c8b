"""rallyctl against a real etcd: plan output, and one-line errors with non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.rendezvous.records import ClusterKeys, Plan, RankSlot
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
    assert out.returncode == 1 and out.stderr.strip() == f"rallyctl: cluster {cluster_name!r} has no generation 9 (generations 1..2)"
    out = rallyctl("--endpoints", ep, "--cluster", "nosuch", "plan")
    assert out.returncode == 1 and "has no plan" in out.stderr and "Traceback" not in out.stderr
    out = rallyctl("--endpoints", "127.0.0.1:9", "--timeout", "0.5", "plan")
    assert out.returncode == 2 and out.stderr.startswith("rallyctl: etcd unreachable at 127.0.0.1:9")
    assert len(out.stderr.strip().splitlines()) == 1
    out = rallyctl("make-model", str(tmp_path / "m"), "--size", "tiny", "--seed", "3")
    assert out.returncode == 0 and (tmp_path / "m" / "config.json").exists()
    assert (tmp_path / "m" / "model.safetensors").exists()
