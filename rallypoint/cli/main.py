"""``rallyctl``: the operator's view of a rallypoint cluster, read straight from etcd.

Every command takes ``--endpoints`` (or ``$RALLYPOINT_ETCD_ENDPOINTS``), ``--cluster`` (or
``$RALLYPOINT_CLUSTER``) and TLS options, and ``--json`` for scripts. Errors are one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from rallypoint.cli.cluster import cluster_view, read_plans
from rallypoint.cli.views import format_event, format_plan, format_recovery, format_status, recoveries
from rallypoint.errors import EtcdUnavailable, RallypointError
from rallypoint.log import configure_logging
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.protocol.orders import wait_drained
from rallypoint.recovery.events import Event, read_events
from rallypoint.rendezvous.etcd import ETCD_PASSWORD_ENV, EtcdClient, EtcdSettings, endpoints_from

Command = Callable[[argparse.Namespace], int]


def _client(args: argparse.Namespace) -> EtcdClient:
    return EtcdClient(EtcdSettings(endpoints=endpoints_from(args.endpoints), request_timeout=args.timeout,
                                   retry_deadline=args.timeout, ca_cert=args.ca_cert, cert_key=args.cert_key,
                                   cert_cert=args.cert_cert, user=args.user,
                                   password=os.environ.get(ETCD_PASSWORD_ENV)))


def cmd_plan(args: argparse.Namespace) -> int:
    """Print a generation's plan (the latest by default)."""
    keys = ClusterKeys(args.cluster)
    client = _client(args)
    try:
        plans = read_plans(client, keys)
    finally:
        client.close()
    if not plans:
        raise RallypointError(f"cluster {args.cluster!r} has no plan (is it the right cluster name?)")
    if args.gen is None:
        plan = plans[-1]
    else:
        found = [p for p in plans if p.gen == args.gen]
        if not found:
            raise RallypointError(f"cluster {args.cluster!r} has no generation {args.gen} "
                                  f"(generations {plans[0].gen}..{plans[-1].gen})")
        plan = found[0]
    print(plan.to_json() if args.json else format_plan(plan))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The cluster at a glance: state, leader, one row per node, who holds which rank, recovery."""
    client = _client(args)
    try:
        d = cluster_view(client, ClusterKeys(args.cluster), args.cluster)
    finally:
        client.close()
    print(json.dumps(d, indent=1) if args.json else format_status(d))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """The recovery timeline: one line per event, then each recovery's phase durations."""
    keys = ClusterKeys(args.cluster)
    client = _client(args)
    try:
        if client.get(keys.spec) is None:
            raise RallypointError(f"cluster {args.cluster!r} does not exist (no {keys.spec})")
        evs = [e for e in read_events(client, keys) if e.gen >= args.since]
        if args.json:
            print(json.dumps({"events": [json.loads(e.to_json()) for e in evs], "recoveries": recoveries(evs)},
                             indent=1))
        else:
            for e in evs:
                print(format_event(e))
            for r in recoveries(evs):
                print(format_recovery(r))
        sys.stdout.flush()
        if not args.follow:
            return 0
        _, rev = client.get_prefix(keys.events)
        watch = client.watch_prefix(keys.events, rev + 1)
        try:
            while (w := watch.get()) is not None:
                if w.kind == "put":
                    e = Event.from_json(w.key, w.value)
                    print(e.to_json() if args.json else format_event(e), flush=True)
        except KeyboardInterrupt:
            return 0
        finally:
            watch.close()
    finally:
        client.close()
    return 0


def _known_node(client: EtcdClient, keys: ClusterKeys, node: str) -> None:
    if client.get(keys.node(node)) is None and client.get(keys.node_status_of(node)) is None:
        kvs, _ = client.get_prefix(keys.nodes)
        known = sorted(kv.key[len(keys.nodes):] for kv in kvs)
        raise RallypointError(f"no node {node!r} in cluster (nodes: {', '.join(known) or 'none'})")


def cmd_cordon(args: argparse.Namespace) -> int:
    """Place no ranks on NODE (uncordon: allow them again); the leader re-plans."""
    keys = ClusterKeys(args.cluster)
    client = _client(args)
    try:
        _known_node(client, keys, args.node)
        if args.command == "cordon":
            client.put(keys.cordoned_of(args.node), json.dumps({"time": time.time()}))
        else:
            client.delete(keys.cordoned_of(args.node))
    finally:
        client.close()
    said = f"{args.node} {'cordoned' if args.command == 'cordon' else 'uncordoned'}"
    print(json.dumps({"node": args.node, "action": args.command}) if args.json else said)
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    """Stop admitting requests on NODE's replicas, wait for the ones in flight, then cordon it."""
    keys = ClusterKeys(args.cluster)
    client = _client(args)
    try:
        _known_node(client, keys, args.node)
        plans = read_plans(client, keys)
        if not plans:
            raise RallypointError(f"cluster {args.cluster!r} has no plan yet")
        plan = plans[-1]
        replicas = plan.replicas_on(args.node)
        client.put(keys.draining_of(args.node), json.dumps({"deadline": time.time() + args.timeout_drain}))
        t0 = time.monotonic()
        done = wait_drained(client, keys, plan.gen, replicas, args.timeout_drain)
        client.put(keys.cordoned_of(args.node), json.dumps({"time": time.time(), "drained": True}))
        client.delete(keys.draining_of(args.node))
    finally:
        client.close()
    left = sorted(set(replicas) - done)
    out = {"node": args.node, "replicas": replicas, "unfinished": left, "seconds": round(time.monotonic() - t0, 3)}
    print(json.dumps(out) if args.json else
          f"{args.node}: replica(s) {replicas} drained in {out['seconds']:.2f}s; cordoned" if not left else
          f"{args.node}: drain timed out with replica(s) {left} busy; cordoned anyway")
    return 0 if not left else 1


def cmd_kill(args: argparse.Namespace) -> int:
    """A drill: have RANK's rallyd send it a signal (from any host that reaches etcd)."""
    keys = ClusterKeys(args.cluster)
    client = _client(args)
    try:
        plans = read_plans(client, keys)
        if not plans:
            raise RallypointError(f"cluster {args.cluster!r} has no plan")
        seat = [s for s in plans[-1].ranks if s.rank == args.rank]
        if not seat:
            raise RallypointError(f"generation {plans[-1].gen} has no rank {args.rank} "
                                  f"(ranks 0..{plans[-1].world_size - 1})")
        s = seat[0]
        client.put(keys.kill(s.node, s.local_rank), args.signal)
    finally:
        client.close()
    print(json.dumps({"rank": args.rank, "seat": f"{s.node}/{s.local_rank}", "signal": args.signal}) if args.json
          else f"asked {s.node}'s rallyd to send SIG{args.signal} to rank {args.rank} ({s.node}/{s.local_rank})")
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    """Write a seeded random checkpoint (Llama, Mistral, Qwen2, Qwen3, Mixtral (``moe``) or Qwen3-MoE) in
    Hugging Face format."""
    from rallypoint.worker.checkpoint import make_model

    path = make_model(args.dir, args.size, seed=args.seed, arch=args.arch)
    print(json.dumps({"path": str(path), "size": args.size, "arch": args.arch, "seed": args.seed}) if args.json else
          f"wrote a {args.size} {args.arch} checkpoint (seed {args.seed}) to {path}")
    return 0


# worker.checkpoint.ARCHS, spelled out: that module imports torch, which rallyctl's start must not pay for
MAKE_MODEL_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "moe")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rallyctl", description="rallypoint admin CLI (reads etcd directly)")
    ap.add_argument("--endpoints", default=os.environ.get("RALLYPOINT_ETCD_ENDPOINTS", "127.0.0.1:2379"),
                    help="etcd endpoints, comma-separated (env RALLYPOINT_ETCD_ENDPOINTS)")
    ap.add_argument("--cluster", default=os.environ.get("RALLYPOINT_CLUSTER", "default"),
                    help="cluster name (env RALLYPOINT_CLUSTER)")
    ap.add_argument("--ca-cert")
    ap.add_argument("--cert-key")
    ap.add_argument("--cert-cert")
    ap.add_argument("--user", help="etcd user (password from RALLYPOINT_ETCD_PASSWORD)")
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for etcd")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="show a generation's plan")
    p.add_argument("gen", nargs="?", type=int)
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("status", help="the cluster at a glance")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("events", help="the recovery timeline")
    p.add_argument("--since", type=int, default=0, metavar="GEN", help="only generations >= GEN")
    p.add_argument("--follow", action="store_true", help="keep printing new events")
    p.set_defaults(fn=cmd_events)
    for name in ("cordon", "uncordon"):
        p = sub.add_parser(name, help=f"{name} a node (no new ranks placed there)" if name == "cordon"
                           else "allow ranks on a node again")
        p.add_argument("node")
        p.set_defaults(fn=cmd_cordon)
    p = sub.add_parser("drain", help="finish a node's in-flight requests, then cordon it")
    p.add_argument("node")
    p.add_argument("--timeout-drain", type=float, default=30.0, metavar="SECONDS")
    p.set_defaults(fn=cmd_drain)
    p = sub.add_parser("kill", help="drill: signal a rank's worker through its rallyd")
    p.add_argument("rank", type=int)
    p.add_argument("--signal", default="KILL", choices=("KILL", "STOP", "TERM", "CONT"))
    p.set_defaults(fn=cmd_kill)
    p = sub.add_parser("make-model", help="write a seeded random checkpoint in Hugging Face format")
    p.add_argument("dir")
    p.add_argument("--size", default="tiny", choices=("tiny", "small", "1b"))
    p.add_argument("--arch", default="llama", choices=MAKE_MODEL_ARCHS,
                   help="the family's layout; moe: Mixtral's (8 experts, 2 per token)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make_model)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("critical" if not os.environ.get("RALLYPOINT_DEBUG") else "debug")
    try:
        return args.fn(args)
    except EtcdUnavailable as exc:
        print(f"rallyctl: etcd unreachable at {args.endpoints}: {exc}", file=sys.stderr)
        return 2
    except RallypointError as exc:
        print(f"rallyctl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
