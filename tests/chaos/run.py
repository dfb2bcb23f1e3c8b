"""The chaos suite from one command: every scenario (``--runs`` times each), then a soak.

    python -m tests.chaos.run                                  # all scenarios x 3, then a 15-minute soak
    python -m tests.chaos.run --scenarios kill_rank,kill_node --runs 5 --soak 0
    python -m tests.chaos.run --runs 0 --soak 900 --mtbf 20 --seed 7   # replay a soak exactly

Prints each fault as it is checked, then the table; writes the table and every run as JSON.
Exit status 1 if any invariant broke or any process was left behind.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from tests.chaos.runner import Chaos, report, write_json
from tests.chaos.scenarios import SCENARIOS, SOAK


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated (default: all)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each scenario")
    ap.add_argument("--soak", type=float, default=900.0, help="soak seconds after the scenarios (0: none)")
    ap.add_argument("--mtbf", type=float, default=20.0, help="mean seconds between soak faults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("chaos-report.json"))
    ap.add_argument("--root", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    args = ap.parse_args(argv)
    names = [n for n in args.scenarios.split(",") if n]
    if unknown := [n for n in names if n not in SCENARIOS]:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    root = args.root or Path(tempfile.mkdtemp(prefix="rallypoint-chaos-"))
    rng = random.Random(args.seed)
    t0 = time.time()

    def say(line: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {line}", flush=True)

    say(f"deployment in {root}: 3 etcd members, {args.nodes} rallyd, TP=2 on CPU, seed {args.seed}")
    chaos = Chaos.start(root, nodes=args.nodes, seed=args.seed, log=say)
    leftovers: list[str] = []
    aborted = None
    try:
        for _ in range(args.runs):
            for name in names:
                chaos.run(name, rng)
        if args.soak > 0:
            say(f"soak: {args.soak:g}s, faults every {args.mtbf:g}s on average from {', '.join(SOAK)}")
            chaos.soak(args.soak, args.mtbf, rng, SOAK)
    except Exception as exc:  # the runner itself broke: still report what ran
        aborted = f"{type(exc).__name__}: {exc}"
        say(f"ABORTED: {aborted}")
    finally:
        leftovers = chaos.stop()
    table, rows = report(chaos.results)
    print("\n" + table)
    for line in leftovers:
        print(f"after teardown: {line}")
    meta = {"seed": args.seed, "runs": args.runs, "soak_s": args.soak, "mtbf_s": args.mtbf, "nodes": args.nodes,
            "host": platform.node(), "python": platform.python_version(), "wall_s": round(time.time() - t0, 1),
            "aborted": aborted}
    write_json(args.json, chaos.results, rows, meta)
    print(f"\nJSON: {args.json}; logs: {root}")
    return 0 if all(r.survived for r in chaos.results) and not leftovers and aborted is None else 1


if __name__ == "__main__":
    sys.exit(main())
