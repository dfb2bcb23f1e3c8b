"""Rank recovery, rallypoint vs torchrun, side by side in one run: SIGKILL a rank N times under each.

Two workloads, each on 2 CPU ranks over gloo:

- ``loop``: an all-reduce loop (4 KiB, the sum checked every call). Under torchrun: a plain
  ``init_process_group`` program (``bench/workloads/torchrun_rank.py``). Under rallypoint: one
  rallyd, TP=2 on two CPU seats, ``[worker] workload = "allreduce-probe"``, one warm spare.
- ``serve``: the tiny model at TP=2, greedy 64-token completions one after another. Under
  torchrun: the same model code driven by the same program. Under rallypoint: rallyd serving it
  with one warm spare, a client streaming completions through the gateway.

Each kill: wait until the workload runs (and rallypoint's spare is warm), 0.5-1.0 s more, SIGKILL
the process of rank 1, and time kill -> resumed: the first all-reduce, or token, of the restarted
workload (torchrun: the programs' own notes after torchrun's restart; rallypoint: the
``first_step`` / ``first_token`` event of the next generation in etcd; one host, one clock).
For ``serve`` the table also says whether the request in flight at the kill was kept, with the
failure-free tokens (torchrun restarts the program: it is lost).

    python bench/recovery_vs_torchrun.py                          # 20 kills x 2 workloads x 2 systems
    python bench/recovery_vs_torchrun.py --kills 3 --workloads loop   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rallypoint.gateway.client import CompletionClient  # noqa: E402
from rallypoint.gateway.resume import NoUpstream, Progress, RequestRejected  # noqa: E402
from rallypoint.protocol.keys import ClusterKeys  # noqa: E402
from rallypoint.recovery import events as ev  # noqa: E402
from rallypoint.recovery.events import read_events  # noqa: E402
from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings  # noqa: E402
from rallypoint.rendezvous.records import Plan  # noqa: E402
from rallypoint.testing.daemons import DaemonProcess, daemon_args, kill_tree, wait_file, wait_for  # noqa: E402
from rallypoint.testing.etcd_server import EtcdCluster  # noqa: E402
from rallypoint.worker.checkpoint import make_model  # noqa: E402

RESUME_TIMEOUT = 120.0
POLL = 0.005  # seconds between looks at the notes / events
PROMPT = "the quick brown fox jumps over the lazy dog"


@dataclass
class Kill:
    at: float
    resumed_after: float | None  # seconds; None: not resumed within RESUME_TIMEOUT
    attempts: int = 1  # torchrun: restarts it took (failed ones included); rallypoint: generations


@dataclass
class Run:
    system: str
    workload: str
    kills: list[Kill] = field(default_factory=list)
    requests: int = 0  # serve: completions finished during the run
    identical: int = 0  # ... with the failure-free tokens
    in_flight_kept: str = "-"

    def row(self) -> dict:
        got = sorted(k.resumed_after for k in self.kills if k.resumed_after is not None)
        return {"system": self.system, "workload": self.workload, "kills": len(self.kills),
                "resumed": len(got), "median_s": round(statistics.median(got), 3) if got else None,
                "p95_s": round(pct(got, 95), 3) if got else None, "max_s": round(got[-1], 3) if got else None,
                "attempts": sum(k.attempts for k in self.kills),
                "requests": self.requests, "identical": self.identical, "in_flight_kept": self.in_flight_kept}


def pct(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def kill_pid(pid: int) -> float:
    t = time.time()
    os.kill(pid, signal.SIGKILL)
    return t


# -- torchrun -----------------------------------------------------------------------------------

def run_torchrun(workload: str, kills: int, root: Path, model: Path, rng: random.Random, say,
                 stock: bool = False) -> Run:
    notes = root / f"torchrun-{workload}.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(kills * 5), str(ROOT / "bench" / "workloads" / "torchrun_rank.py"),
           "--workload", workload, "--notes", str(notes), "--model", str(model), *(["--stock"] if stock else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(root / f"torchrun-{workload}.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True)

    def read() -> list[dict]:
        return [json.loads(x) for x in notes.read_text().splitlines() if x.strip()] if notes.exists() else []

    run = Run("torchrun (stock init)" if stock else "torchrun", workload,
              in_flight_kept="no (program restarted)" if workload == "serve" else "-")
    try:
        wait_for("torchrun's first step", lambda: any(n["kind"] == "first_step" for n in read()), 120, POLL)
        restart = 0
        for i in range(kills):
            time.sleep(rng.uniform(0.5, 1.0))
            pid = wait_for("rank 1's pid", lambda r=restart: next((n["pid"] for n in read() if n["kind"] == "start"
                                                                  and n["rank"] == 1 and n["restart"] == r), None),
                           RESUME_TIMEOUT, POLL)
            at = kill_pid(pid)
            try:
                nxt = wait_for("torchrun resumed", lambda r=restart: next((n for n in read() if n["kind"] == "first_step"
                                                                         and n["restart"] > r), None),
                               RESUME_TIMEOUT, POLL)
                run.kills.append(Kill(at, nxt["at"] - at, nxt["restart"] - restart))
                restart = nxt["restart"]
            except AssertionError:  # wait_for's timeout
                run.kills.append(Kill(at, None))
                break
            say(f"torchrun {workload} kill {i + 1}: resumed after {run.kills[-1].resumed_after:.3f}s "
                f"(restart {restart}: {run.kills[-1].attempts} attempt(s))")
    finally:
        kill_tree(proc.pid)  # torchrun and the workers it started (in sessions of their own)
        proc.wait()
    return run


# -- rallypoint ---------------------------------------------------------------------------------

class Stream:
    """A client sending one greedy completion after another through the gateway; checks each."""

    def __init__(self, gateway: str, reference: list[int]) -> None:
        self.client = CompletionClient([gateway], timeout=90, read_timeout=120)
        self.reference = reference
        self.done = self.identical = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            p = Progress()
            try:
                for _ in self.client.stream({"prompt": PROMPT, "max_tokens": 64, "temperature": 0}, p):
                    pass
            except (NoUpstream, RequestRejected) as exc:
                self.errors.append(str(exc))
                continue
            self.done += 1
            self.identical += p.tokens == self.reference


def run_rallypoint(workload: str, kills: int, root: Path, model: Path, etcd: EtcdCluster,
                   rng: random.Random, say) -> Run:
    cluster = f"vs-torchrun-{workload}"
    keys = ClusterKeys(cluster)
    state = root / f"rallypoint-{workload}"
    what = ["--worker-workload", "allreduce-probe"] if workload == "loop" else ["--worker-model", str(model)]
    args = daemon_args(etcd.endpoints, cluster, "--tp", "2", "--cpu-ranks", "2", "--spares", "1",
                       "--state-dir", str(state), "--worker-restart-budget", str(kills + 10),
                       "--worker-restart-window", "3600", *what)
    daemon = DaemonProcess("node", args, root / f"rallypoint-{workload}.log").start()
    client = EtcdClient(EtcdSettings(endpoints=etcd.endpoints, request_timeout=2.0, retry_deadline=10.0))
    first_kind = ev.FIRST_STEP if workload == "loop" else ev.FIRST_TOKEN
    run = Run("rallypoint", workload)
    stream = None

    def gen() -> int:
        kvs, _ = client.get_prefix(keys.plans)
        return Plan.from_json(kvs[-1].key, kvs[-1].value).gen if kvs else 0

    def ready(g: int) -> int | None:
        """rank 1's pid once every rank serves gen ``g`` and the spare is warm."""
        kv = client.get(keys.node_status_of("node"))
        if kv is None:
            return None
        st = json.loads(kv.value)
        ws = {w["rank"]: w for w in st.get("workers", []) if w.get("rank") is not None}
        if st.get("spares_ready") != 1 or len(ws) != 2 or any((w["gen"], w["state"]) != (g, "serving") for w in ws.values()):
            return None
        return ws[1]["pid"]

    def first_after(g: int) -> float | None:
        got = [e.at for e in read_events(client, keys) if e.kind == first_kind and e.gen > g]
        return min(got) if got else None

    try:
        if workload == "serve":
            url = wait_file(state / "gateway.url", 120).strip()
            body = {"prompt": PROMPT, "max_tokens": 64, "temperature": 0}
            reference = CompletionClient([url], timeout=120).complete(body).tokens
            stream = Stream(url, reference)
        wait_for("rallypoint's first step", lambda: first_after(0), 120, POLL)
        for i in range(kills):
            g = gen()
            pid = wait_for("rank 1 serving and a warm spare", lambda g=g: ready(g), 120, POLL)
            time.sleep(rng.uniform(0.5, 1.0))
            at = kill_pid(pid)
            try:
                resumed = wait_for("rallypoint resumed", lambda g=g: first_after(g), RESUME_TIMEOUT, 0.02)
                run.kills.append(Kill(at, resumed - at, gen() - g))
            except AssertionError:  # wait_for's timeout
                run.kills.append(Kill(at, None))
                break
            say(f"rallypoint {workload} kill {i + 1}: resumed after {run.kills[-1].resumed_after:.3f}s (gen {g} -> {gen()})")
        if stream is not None:
            time.sleep(3.0)  # the request in flight at the last kill finishes
            stream.stop.set()
            stream.thread.join(timeout=120)
            run.requests, run.identical = stream.done, stream.identical
            kept = run.identical == run.requests and not stream.errors
            run.in_flight_kept = "yes, identical tokens" if kept else f"NO: {stream.errors[:2]}"
    finally:
        if stream is not None:
            stream.stop.set()
        daemon.stop()
        client.close()
    return run


# -- report -------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    head = ["workload", "system", "kills", "resumed", "kill->resumed median", "p95", "max", "restarts / generations",
            "in-flight request"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f} s"
        out.append(f"| {r['workload']} | {r['system']} | {r['kills']} | {r['resumed']} | {f(r['median_s'])} | "
                   f"{f(r['p95_s'])} | {f(r['max_s'])} | {r['attempts']} | {r['in_flight_kept']} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--workloads", default="loop,serve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--stock", action="store_true",
                    help="torchrun programs call plain init_process_group('gloo') (no store prefix per restart)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # both systems: one thread per rank on a small host
    root = Path(tempfile.mkdtemp(prefix="rallypoint-vs-torchrun-"))
    rng = random.Random(args.seed)
    t0 = time.time()

    def say(line: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {line}", flush=True)

    model = make_model(root / "model", "tiny", seed=0)
    etcd = EtcdCluster(1, root=root / "etcd").start()
    runs: list[Run] = []
    try:
        for workload in args.workloads.split(","):
            runs.append(run_torchrun(workload, args.kills, root, model, rng, say, args.stock))
            runs.append(run_rallypoint(workload, args.kills, root, model, etcd, rng, say))
    finally:
        etcd.stop()
    rows = [r.row() for r in runs]
    import torch
    print(f"\nRecovery from SIGKILL of rank 1, 2 CPU ranks (gloo); {date.today()}, {platform.node()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
          f"etcd-sdk-python {version('etcd-sdk-python')}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}\n")
    print(table(rows))
    print(f"\nlogs: {root}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "runs": [asdict(r) for r in runs]}, indent=1))
    return 0 if all(r["resumed"] == r["kills"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
