"""What rallyctl reads of a cluster in etcd: its plans, and everything ``status`` shows.

The reads live here, the formatting in ``views`` (no I/O), the commands in ``main``; the demo
uses the first two, so nothing here knows about the demo.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rallypoint.cli.views import status_data
from rallypoint.errors import MalformedRecord, RallypointError
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.rendezvous.records import NodeRecord, Plan


def read_plans(client: EtcdClient, keys: ClusterKeys) -> list[Plan]:
    """Every plan of the cluster, oldest first (the keys sort by generation)."""
    kvs, _ = client.get_prefix(keys.plans)
    return [Plan.from_json(kv.key, kv.value) for kv in kvs]


def latest_plan(client: EtcdClient, keys: ClusterKeys) -> Plan | None:
    """The newest plan, or None before the first one."""
    kvs, _ = client.get_prefix(keys.plans)
    return Plan.from_json(kvs[-1].key, kvs[-1].value) if kvs else None


def _names_under(client: EtcdClient, prefix: str) -> set[str]:
    return {kv.key[len(prefix):] for kv in client.get_prefix(prefix)[0]}


def cluster_view(client: EtcdClient, keys: ClusterKeys, cluster: str) -> dict[str, Any]:
    """Everything ``rallyctl status`` shows (``views.status_data``), read from etcd.

    Raises:
        RallypointError: the cluster has neither nodes nor a plan (a wrong name, most likely).
    """
    plans = read_plans(client, keys)
    records: dict[str, NodeRecord] = {}
    for kv in client.get_prefix(keys.nodes)[0]:
        try:
            rec = NodeRecord.from_json(kv.key, kv.value)
            records[rec.node] = rec
        except MalformedRecord as exc:
            print(f"rallyctl: skipping {exc}", file=sys.stderr)
    if not plans and not records:
        raise RallypointError(f"cluster {cluster!r} does not exist (no nodes, no plan under {keys.root})")
    statuses = {}
    for kv in client.get_prefix(keys.node_status)[0]:
        try:
            statuses[kv.key[len(keys.node_status):]] = json.loads(kv.value)
        except ValueError:
            pass
    leader = client.get(keys.leader)
    recovery = client.get(keys.recovery)
    return status_data(cluster, records, statuses, plans[-1] if plans else None,
                       leader.value.decode() if leader else None, json.loads(recovery.value) if recovery else None,
                       _names_under(client, keys.cordoned), _names_under(client, keys.draining))
