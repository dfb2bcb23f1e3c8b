"""The quick-start demo: a local etcd plus two rallyd daemons on CPU that rendezvous on one plan.

Run it with ``scripts/demo.sh`` (or ``python -m rallypoint.demo`` once installed). It prints the
plan the daemons agreed on, then SIGKILLs one daemon and shows the survivor's re-plan after the
lease runs out, then stops everything.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings
from rallypoint.rendezvous.records import ClusterKeys, Plan
from rallypoint.testing.daemons import DaemonProcess, daemon_args
from rallypoint.testing.etcd_server import INSTALL_HINT, EtcdCluster, etcd_binary


def format_plan(plan: Plan) -> str:
    """A plan as a small table, one row per rank."""
    lines = [f"generation {plan.gen}: world {plan.world_size} = TP {plan.tp} x PP {plan.pp} x DP {plan.dp}"
             f"  (leader {plan.leader}; {plan.reason})",
             f"  {'rank':>4}  {'node':<10} {'local':>5}  {'dp':>2} {'pp':>2} {'tp':>2}"]
    for r in plan.ranks:
        replica = plan.tp * plan.pp
        dp, pp, tp = r.rank // replica, (r.rank % replica) // plan.tp, r.rank % plan.tp
        lines.append(f"  {r.rank:>4}  {r.node:<10} {r.local_rank:>5}  {dp:>2} {pp:>2} {tp:>2}")
    return "\n".join(lines)


def latest_plan(client: EtcdClient, keys: ClusterKeys) -> Plan | None:
    kvs, _ = client.get_prefix(keys.plans)
    return Plan.from_json(kvs[-1].key, kvs[-1].value) if kvs else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rallypoint-demo", description=__doc__)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--cpu-ranks", type=int, default=2)
    args = ap.parse_args(argv)
    if etcd_binary() is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="rallypoint-demo-"))
    with EtcdCluster(1, root=work) as etcd:
        print(f"etcd up at {etcd.endpoints[0]}")
        extra = ["--tp", str(args.tp), "--cpu-ranks", str(args.cpu_ranks)]
        daemons = [DaemonProcess(n, daemon_args(etcd.endpoints, "demo", *extra), work / f"{n}.log")
                   for n in ("node-a", "node-b")]
        client = EtcdClient(EtcdSettings(endpoints=etcd.endpoints))
        keys = ClusterKeys("demo")
        try:
            for d in daemons:
                d.start()
            for d in daemons:
                d.wait_log('"gen": 1', timeout=30)
            print(f"\nboth daemons hold the plan:\n{format_plan(latest_plan(client, keys))}\n")
            t0 = time.monotonic()
            daemons[1].stop()
            print("SIGKILLed node-b; waiting for its lease (3 s) to run out...")
            daemons[0].wait_log("left node-b", timeout=30)
            print(f"re-planned {time.monotonic() - t0:.2f} s after the kill:\n"
                  f"{format_plan(latest_plan(client, keys))}\n")
        finally:
            client.close()
            for d in daemons:
                d.stop()
    print(f"logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
