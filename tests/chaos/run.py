"""The chaos suite from one command: every scenario (``--runs`` times each), then a soak.

    python -m tests.chaos.run                                  # all scenarios x 3, then a 15-minute soak
    python -m tests.chaos.run --scenarios kill_rank,kill_node --runs 5 --soak 0
    python -m tests.chaos.run --runs 0 --soak 900 --mtbf 20 --seed 7   # replay a soak exactly
    python -m tests.chaos.run --gpus 2 --runs 2 --soak 0 --budget 520  # NCCL: a node per GPU
    sudo python -m tests.chaos.run --netns --runs 1 --soak 0            # the partitions (root)

With ``--netns`` every etcd member and node runs in a network namespace of its own (made for the
run, deleted after it; ``rallypoint.testing.netns``) and the runner in another, so a scenario can
cut any two apart; the partition scenarios run only there.

With ``--gpus N`` each of N nodes gets one GPU of the host. With 2 nodes no replica fits when one
is gone: node faults restart the node at once, and the scenarios that move a replica to another
node (corrupt_shard, join_leave) are left out unless named.

Prints each fault as it is checked, then the table, and etcd's key count under ``/rallypoint/`` and
database size at the start and the end (``footprint``: they should stay flat over a long soak);
writes all of it and every run as JSON. Exit status 1 if any invariant broke or any process was
left behind.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

from rallypoint.testing import netns
from rallypoint.testing.netns import NetLab
from tests.chaos.footprint import measure
from tests.chaos.runner import Chaos, report, write_json
from tests.chaos.scenarios import NEED_ROOM, PARTITIONS, SCENARIOS, SOAK


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="", help="comma-separated (default: all that fit the nodes)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each scenario")
    ap.add_argument("--soak", type=float, default=900.0, help="soak seconds after the scenarios (0: none)")
    ap.add_argument("--keep-generations", type=int, default=0,
                    help="the daemons' [rendezvous] keep_generations (0: their default, 100): a smaller "
                         "window lets a soak reach the level etcd's key count settles at")
    ap.add_argument("--sample-every", type=float, default=300.0,
                    help="seconds between two measures of etcd's key count and database size (0: start and end)")
    ap.add_argument("--mtbf", type=float, default=20.0, help="mean seconds between soak faults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=0, help="rallyd daemons (default: 3 on CPU, one per GPU)")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs of this host to use (0: CPU ranks, gloo)")
    ap.add_argument("--clients", type=int, default=3,
                    help="concurrent clients, each streaming one request after another (faults under load)")
    ap.add_argument("--arch", default="llama", choices=("llama", "moe"),
                    help="the tiny model's layout (moe: Mixtral's, experts split over each replica's TP ranks)")
    ap.add_argument("--ep", default="tp", choices=("tp", "dp"),
                    help="with --arch moe: experts over each replica's TP ranks (TP=2), or over every "
                         "replica (TP=1, two copies of each expert)")
    ap.add_argument("--pd", action="store_true",
                    help="disaggregated: TP=1, one replica prefills every prompt, the others decode")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="start no new fault after this many seconds, then report (0: no limit)")
    ap.add_argument("--netns", action="store_true",
                    help="run in network namespaces made for the run (root), with the partition scenarios "
                         f"({', '.join(PARTITIONS)}) by default")
    ap.add_argument("--lab", help=argparse.SUPPRESS)  # set when --netns re-runs this inside the lab
    ap.add_argument("--json", type=Path, default=Path("chaos-report.json"))
    ap.add_argument("--root", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    args = ap.parse_args(argv)
    nodes = args.nodes or args.gpus or 3
    in_lab = args.netns or args.lab is not None
    names = [n for n in args.scenarios.split(",") if n] or ([*PARTITIONS] if in_lab else [
        n for n in SCENARIOS if (nodes > 2 or n not in NEED_ROOM) and (args.arch == "moe" or n != "kill_ep_rank")
        and (args.pd or n not in ("kill_prefill", "kill_decode")) and n not in PARTITIONS])
    if (partitions := [n for n in names if n in PARTITIONS]) and not in_lab:
        ap.error(f"{', '.join(partitions)} need --netns")
    if args.netns and args.lab is None:
        return run_in_lab(argv if argv is not None else sys.argv[1:], nodes)
    if unknown := [n for n in names if n not in SCENARIOS]:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.root is not None and args.root.exists() and any(args.root.iterdir()):
        ap.error(f"--root {args.root} is not empty (an earlier run's etcd data would not form a new "
                 "cluster): remove it or name another")
    if args.keep_generations:  # the daemons take it from their environment, as from a systemd EnvironmentFile
        os.environ["RALLYPOINT_RENDEZVOUS_KEEP_GENERATIONS"] = str(args.keep_generations)
    root = args.root or Path(tempfile.mkdtemp(prefix="rallypoint-chaos-"))
    rng = random.Random(args.seed)
    t0 = time.time()

    def say(line: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {line}", flush=True)

    ranks = f"one GPU each (of {args.gpus}), NCCL" if args.gpus else "one CPU rank each, gloo"
    layout = "TP=1, experts over every replica" if args.ep == "dp" else "TP=1, 1 prefill replica" if args.pd \
        else "TP=2"
    say(f"deployment in {root}: 3 etcd members, {nodes} rallyd ({ranks}), {layout}, {args.arch}, "
        f"{args.clients} clients, seed {args.seed}")
    lab = NetLab.from_json(args.lab) if args.lab else None
    if lab is not None:
        say(f"in network namespaces rp{lab.lab_id}-*: {', '.join(f'{n} {lab.address(n)}' for n in lab.names)}")
    chaos = Chaos.start(root, nodes=nodes, clients=args.clients, seed=args.seed, gpus=args.gpus, log=say,
                        arch=args.arch, lab=lab, ep=args.ep, pd=args.pd)
    footprint = {"start": measure(chaos.deployment)}
    say(f"etcd at the start: {footprint['start'].line()}")
    sampling = threading.Event()

    def sample() -> None:  # the footprint every --sample-every s: flat, or growing?
        while not sampling.wait(args.sample_every):
            f = footprint[f"{time.time() - t0:.0f}s"] = measure(chaos.deployment)
            say(f"etcd now: {f.line()}")

    if args.sample_every > 0:
        threading.Thread(target=sample, name="footprint", daemon=True).start()
    stop_by = time.monotonic() + args.budget if args.budget > 0 else float("inf")
    leftovers: list[str] = []
    aborted = None
    try:
        for _ in range(args.runs):
            for name in names:
                if time.monotonic() < stop_by:
                    chaos.run(name, rng)
        if args.soak > 0 and time.monotonic() < stop_by:
            say(f"soak: {args.soak:g}s, faults every {args.mtbf:g}s on average from {', '.join(SOAK)}")
            chaos.soak(args.soak, args.mtbf, rng, SOAK, stop_by)
        if time.monotonic() >= stop_by:
            say(f"budget of {args.budget:g}s spent: no more faults")
    except (Exception, KeyboardInterrupt) as exc:  # the runner broke, or Ctrl-C: still report what ran
        aborted = f"{type(exc).__name__}: {exc}"
        say(f"ABORTED: {aborted}")
    finally:
        sampling.set()
        try:
            footprint["end"] = measure(chaos.deployment)  # before the teardown takes etcd away
        finally:
            leftovers = chaos.stop()
    table, rows = report(chaos.results)
    print("\n" + table)
    for when, f in footprint.items():
        print(f"etcd at the {when}: {f.line()}")
    for line in leftovers:
        print(f"after teardown: {line}")
    meta = {"seed": args.seed, "runs": args.runs, "soak_s": args.soak, "mtbf_s": args.mtbf, "nodes": nodes,
            "gpus": args.gpus, "torch": version("torch"), "scenarios": names,
            "host": platform.node(), "python": platform.python_version(), "wall_s": round(time.time() - t0, 1),
            "aborted": aborted, "etcd": {when: f.to_dict() for when, f in footprint.items()}}
    write_json(args.json, chaos.results, rows, meta)
    print(f"\nJSON: {args.json}; logs: {root}")
    return 0 if all(r.survived for r in chaos.results) and not leftovers and aborted is None else 1


def run_in_lab(argv: list[str], nodes: int) -> int:
    """Make the network lab, run this same command inside its ``ctl`` namespace, tear it down."""
    why = netns.available()
    if why is not None:
        print(f"--netns: {why}", file=sys.stderr)
        return 2
    lab = NetLab(["ctl", "e1", "e2", "e3", *[f"n{i}" for i in range(1, nodes + 2)]]).create()
    try:
        inner = [a for a in argv if a != "--netns"] + ["--lab", lab.to_json()]
        return subprocess.run([*lab.prefix("ctl"), sys.executable, "-m", "tests.chaos.run", *inner]).returncode
    finally:
        lab.destroy()  # and whatever the run left in it (there should be nothing)


if __name__ == "__main__":
    sys.exit(main())
