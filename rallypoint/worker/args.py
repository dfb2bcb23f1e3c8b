"""A worker's command line, and the runtime settings it carries.

rallyd writes it (``daemon.supervisor.WorkerCommand``) from its validated configuration; every
setting a worker takes from rallyd arrives this way, so a flag here is the end of a config key's
journey (``[collectives] deadline_k`` becomes ``--deadline-k`` becomes ``RuntimeSettings.deadline_k``).
"""

from __future__ import annotations

import argparse
import os

import torch

from rallypoint.rendezvous.etcd import ETCD_PASSWORD_ENV, EtcdSettings, endpoints_from
from rallypoint.worker.runtime import RuntimeSettings


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line (``daemon.supervisor.WorkerCommand`` writes it)."""
    ap = argparse.ArgumentParser(prog="rallypoint-worker")
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--etcd-ca-cert", help="etcd's CA (PEM): talk to etcd over TLS")
    ap.add_argument("--etcd-cert-key", help="this client's TLS key (PEM)")
    ap.add_argument("--etcd-cert-cert", help="this client's TLS certificate (PEM)")
    ap.add_argument("--etcd-user", help=f"etcd user; its password from ${ETCD_PASSWORD_ENV}")
    ap.add_argument("--node", required=True)
    ap.add_argument("--local-rank", type=int, help="the seat; omit with --spare")
    ap.add_argument("--spare", action="store_true",
                    help="start warm and wait for rallyd to hand over a seat (needs --channel)")
    ap.add_argument("--channel", help="rallyd's local control socket (a path, or @name)")
    ap.add_argument("--model", default="", help="Hugging Face-style checkpoint directory (serve)")
    ap.add_argument("--workload", default="serve", choices=("serve", "allreduce-probe"),
                    help="serve the model, or all-reduce on the TP group in a loop (no model)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the seat's GPU)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--deadline-floor", type=float, default=1.0,
                    help="seconds: the shortest deadline any collective gets")
    ap.add_argument("--deadline-k", type=float, default=20.0,
                    help="a collective's deadline is max(floor, k * its typical duration)")
    ap.add_argument("--build-timeout", type=float, default=30.0, help="seconds a group build waits for its members")
    ap.add_argument("--max-batch", type=int, default=8, help="KV-cache rows; 0: as many as fit (worker.sizing)")
    ap.add_argument("--max-seq", type=int, default=512, help="positions per row; 0: the model's context")
    ap.add_argument("--kv-memory-fraction", type=float, default=0.8,
                    help="share of the memory free after the weights that --max-batch 0 fills")
    ap.add_argument("--queue-capacity", type=int, default=256)
    ap.add_argument("--stream-interval", type=float, default=0.0,
                    help="seconds a stream waits after a chunk before sending the next (tokens accumulate)")
    ap.add_argument("--max-chunk-rate", type=float, default=0.0,
                    help="streamed chunks/s the API aims under: n open streams each wait n / rate after a chunk")
    ap.add_argument("--disaggregate-tokens", type=int, default=256,
                    help="a decode replica has prompts this long prefilled on a prefill replica")
    ap.add_argument("--prefill-tokens", type=int, default=4096,
                    help="the most prompt positions one prefill step computes (longer prompts fill in chunks)")
    ap.add_argument("--preload-shard", action="store_true",
                    help="a spare of a TP=1, PP=1 deployment: load the whole model (and capture its "
                         "CUDA graphs) while waiting for a seat")
    ap.add_argument("--cuda-graphs", default="on", choices=("on", "off"),
                    help="replay decode steps as CUDA graphs (GPU, TP=1, PP=1)")
    ap.add_argument("--compile", default="on", choices=("on", "off"),
                    help="with CUDA graphs, run decode layers through torch.compile (fewer kernels per step)")
    ap.add_argument("--overlap", default="on", choices=("on", "off"),
                    help="TP=1, PP=1: launch the next decode step before reading this one's tokens")
    ap.add_argument("--api-host", default="127.0.0.1")
    ap.add_argument("--api-port", type=int, default=0)
    ap.add_argument("--api-url-file", help="write the API's URL here once it listens")
    ap.add_argument("--after-gen", type=int, default=0,
                    help="join only plans newer than this (a restarted rank must not rejoin the failed generation)")
    ap.add_argument("--die-with-parent", action="store_true", help="exit when the parent process dies")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked across flags (argparse exits with a usage line on an error)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.spare == (args.local_rank is not None):
        ap.error("give exactly one of --local-rank and --spare")
    if args.spare and not args.channel:
        ap.error("--spare needs --channel")
    if args.workload == "serve" and not args.model:
        ap.error("--model is needed to serve (or give --workload allreduce-probe)")
    return args


def runtime_settings(args: argparse.Namespace) -> RuntimeSettings:
    """The runtime settings rallyd handed this process on its command line."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return RuntimeSettings(
        cluster=args.cluster, device=device, deadline_floor=args.deadline_floor, deadline_k=args.deadline_k,
        build_timeout=args.build_timeout,
        etcd=EtcdSettings(endpoints=endpoints_from(args.endpoints), request_timeout=2.0, retry_deadline=10.0,
                          ca_cert=args.etcd_ca_cert, cert_key=args.etcd_cert_key, cert_cert=args.etcd_cert_cert,
                          user=args.etcd_user,
                          password=os.environ.get(ETCD_PASSWORD_ENV) if args.etcd_user else None),
        group_names=("tp", "pp"))
