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
from collections.abc import Callable

from rallypoint.errors import EtcdUnavailable, RallypointError
from rallypoint.log import configure_logging
from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings, endpoints_from
from rallypoint.rendezvous.records import ClusterKeys, Plan

Command = Callable[[argparse.Namespace], int]


def _client(args: argparse.Namespace) -> EtcdClient:
    return EtcdClient(EtcdSettings(endpoints=endpoints_from(args.endpoints), request_timeout=args.timeout,
                                   retry_deadline=args.timeout, ca_cert=args.ca_cert, cert_key=args.cert_key,
                                   cert_cert=args.cert_cert, user=args.user,
                                   password=os.environ.get("RALLYPOINT_ETCD_PASSWORD")))


def _plans(client: EtcdClient, keys: ClusterKeys) -> list[Plan]:
    kvs, _ = client.get_prefix(keys.plans)
    return [Plan.from_json(kv.key, kv.value) for kv in kvs]


def cmd_plan(args: argparse.Namespace) -> int:
    """Print a generation's plan (the latest by default)."""
    from rallypoint.demo import format_plan

    keys = ClusterKeys(args.cluster)
    client = _client(args)
    try:
        plans = _plans(client, keys)
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


def cmd_make_model(args: argparse.Namespace) -> int:
    """Write a seeded random Llama checkpoint in Hugging Face format."""
    from rallypoint.worker.checkpoint import make_model

    path = make_model(args.dir, args.size, seed=args.seed)
    print(json.dumps({"path": str(path), "size": args.size, "seed": args.seed}) if args.json else
          f"wrote a {args.size} Llama checkpoint (seed {args.seed}) to {path}")
    return 0


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
    p = sub.add_parser("make-model", help="write a seeded random Llama checkpoint")
    p.add_argument("dir")
    p.add_argument("--size", default="tiny", choices=("tiny", "small", "1b"))
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
