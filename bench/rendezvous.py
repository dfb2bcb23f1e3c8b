"""Rendezvous benchmark: N members against one real etcd, from the last join to everyone holding the plan.

Each member is a full ``Rendezvous`` with its own lease and its own ``control/`` watch. Members are
spread over K worker processes (spawned once, reused for every run) so that they do not all contend
for one GIL; inside a worker they share ``EtcdClient``s (one gRPC channel per ``--per-client``
members), as an event-driven daemon would, and are driven by one loop that calls ``run_cycle(0)``
on every member that has a watch event queued, is the leader, or has not seen a leader yet, and
otherwise sleeps until a watch event arrives or the leader's last-call window ends.

One run (a fresh cluster name each time, against one single-member etcd started here):

1. every worker builds its clients and members;
2. every worker joins its members (``join()``, one after another); each records the wall-clock
   time its last ``join()`` returned. The benchmark's zero is the latest of those: the last join;
3. once every worker reports its joins done, all start cycling at once: members campaign, the
   winner reads ``nodes/``, waits out the last call (from the first unplanned change it sees),
   writes plan gen 1, everyone acks, the leader releases it, everyone delivers it. Each member
   records ``time.time()`` when it delivers the plan. The spec has ``min_nodes = N``, so gen 1 is
   always the plan of all N;
4. every member leaves (lease revoked), clients close.

Measured: seconds from the last join to every member holding the released plan (max over members,
and the median member), the leader's own timeline, and etcd requests: the sum of ``client.requests``
deltas over every client from before the first join to the end of the run, divided by N, and the
leader's own requests (each request is attributed to the member the worker's loop was driving;
lease refreshes and watch reconnects run in background threads and are counted apart).

Usage: ``.venv/bin/python bench/rendezvous.py [--sizes 16,64,256] [--last-call 0.5,0.1]
[--repeats 3] [--procs 2] [--per-client 16] [--json out.json]``
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rallypoint.log import configure_logging  # noqa: E402
from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings  # noqa: E402
from rallypoint.rendezvous.records import ClusterSpec  # noqa: E402
from rallypoint.rendezvous.rendezvous import Rendezvous, RendezvousSettings, local_record  # noqa: E402
from rallypoint.testing.etcd_server import INSTALL_HINT, EtcdCluster, etcd_binary  # noqa: E402

TORCHELASTIC_NOTE = ("For context: TorchElastic's etcd rendezvous polls every 1 s and waits a 30 s "
                     "last call by default.")


@dataclass(frozen=True)
class RunSpec:
    """What one worker does in one run."""

    cluster: str
    n: int  # members in the whole run
    nodes: tuple[str, ...]  # this worker's members
    last_call: float
    slots: int
    tp: int
    per_client: int
    timeout: float
    driver: str  # "threads" or "roundrobin"


# -- worker side ------------------------------------------------------------------------------------


class _WakingQueue(queue.Queue):
    """A member's event queue that also wakes the worker loop when a watch puts an event in it."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake.set()


class _Tally:
    """Attributes each etcd request to the member whose thread issued it, or to a background thread."""

    def __init__(self) -> None:
        self.local = threading.local()  # .member: the member this thread drives, if any
        self.per_member: dict[int, int] = {}
        self.background = 0
        self._lock = threading.Lock()

    def wrap(self, client: EtcdClient) -> None:
        inner = client._call_once  # every RPC goes through it; it also bumps client.requests

        def counted(what: str, fn: Any) -> Any:
            member = getattr(self.local, "member", None)
            with self._lock:
                if member is None:
                    self.background += 1
                else:
                    self.per_member[member] = self.per_member.get(member, 0) + 1
            return inner(what, fn)

        client._call_once = counted  # type: ignore[method-assign]


class _Worker:
    """One worker process's members for one run.

    With the ``threads`` driver each member runs its own loop thread (``join()``, then
    ``run_cycle()`` until it holds the plan), as each daemon would on its own host. With
    ``roundrobin`` the worker's main thread joins its members one after another and then steps
    them in turn, so their RPCs never overlap (``Members.cycle_until``'s way, made event-driven).
    """

    def __init__(self, endpoints: tuple[str, ...], spec: RunSpec) -> None:
        self.spec = spec
        self.wake = threading.Event()
        self.go = threading.Event()
        self.tally = _Tally()
        self.clients: list[EtcdClient] = []
        self.members: list[Rendezvous] = []
        n = len(spec.nodes)
        self.delivered: list[float | None] = [None] * n
        self.joined_at: list[float | None] = [None] * n
        self.join_rpcs: dict[int, int] = {}
        self.reports: queue.Queue[tuple[str, int, str]] = queue.Queue()
        self.threads: list[threading.Thread] = []
        self.timeline: dict[str, float] = {}
        self.leader_index: int | None = None
        cluster_spec = ClusterSpec(tp=spec.tp, min_nodes=spec.n)
        for i, node in enumerate(spec.nodes):
            if i % spec.per_client == 0:
                client = EtcdClient(EtcdSettings(endpoints=endpoints, request_timeout=2.0, retry_deadline=10.0))
                self.tally.wrap(client)
                self.clients.append(client)
            settings = RendezvousSettings(spec.cluster, node, cluster_spec, last_call=spec.last_call)
            r = Rendezvous(self.clients[-1], settings, local_record(node, "127.0.0.1", 0, spec.slots),
                           on_release=lambda plan, i=i: self._on_release(i))
            if spec.driver == "roundrobin":
                r.events = _WakingQueue(self.wake)  # before join(): the watch feeds this queue
            self.members.append(r)

    def _on_release(self, i: int) -> None:
        if self.delivered[i] is None:
            self.delivered[i] = time.time()

    def _join_one(self, i: int) -> None:
        self.tally.local.member = i
        self.members[i].join()
        self.joined_at[i] = time.time()
        self.join_rpcs[i] = self.tally.per_member.get(i, 0)
        self.tally.local.member = None

    def join(self) -> dict[str, Any]:
        first = time.time()
        if self.spec.driver == "roundrobin":
            for i in range(len(self.members)):
                self._join_one(i)
        else:
            self.threads = [threading.Thread(target=self._member_thread, args=(i,), daemon=True,
                                             name=f"member {self.spec.nodes[i]}") for i in range(len(self.members))]
            for t in self.threads:
                t.start()
            self._collect("joined")
        return {"first_join": first, "last_join": max(self.joined_at)}

    def _member_thread(self, i: int) -> None:
        """One member's daemon loop: join, wait for the start signal, cycle until it holds the plan."""
        try:
            self._join_one(i)
            self.reports.put(("joined", i, ""))
            if not self.go.wait(self.spec.timeout):
                return
            self.tally.local.member = i
            r, deadline = self.members[i], time.monotonic() + self.spec.timeout
            while r.delivered_gen < 1 and time.monotonic() < deadline:
                said = r.run_cycle()
                if not said.startswith("idle"):
                    self._note(i, said)
            self.reports.put(("done", i, ""))
        except Exception:
            self.reports.put(("error", i, traceback.format_exc()))

    def _collect(self, what: str) -> None:
        """Wait until every member thread reported ``what``; raise the first error one reported."""
        seen, deadline = 0, time.monotonic() + self.spec.timeout + 5
        while seen < len(self.members):
            try:
                kind, i, tb = self.reports.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{len(self.members) - seen} member thread(s) did not report {what!r}") from None
            if kind == "error":
                raise RuntimeError(f"member {self.spec.nodes[i]} failed:\n{tb}")
            seen += kind == what

    def cycle(self) -> dict[str, Any]:
        start = time.time()
        if self.spec.driver == "roundrobin":
            self._round_robin()
        else:
            self.go.set()
            self._collect("done")
        if any(t is None for t in self.delivered):
            raise RuntimeError(f"{self.delivered.count(None)} member(s) got no plan in {self.spec.timeout}s")
        return self._results(start)

    def _round_robin(self) -> None:
        deadline = time.monotonic() + self.spec.timeout
        while any(t is None for t in self.delivered) and time.monotonic() < deadline:
            self.wake.clear()
            busy = False
            for i, r in enumerate(self.members):
                if r.leader is None or r.is_leader or not r.events.empty() or r.lease.lost.is_set():
                    self.tally.local.member = i
                    said = r.run_cycle(0)
                    self.tally.local.member = None
                    if not said.startswith("idle"):
                        busy = True
                        self._note(i, said)
            if not busy:
                self.wake.wait(self._idle_wait())

    def _note(self, i: int, said: str) -> None:
        now = time.time()
        for tag, phrase in (("elected", "became leader"), ("plan_written", "wrote plan gen 1"),
                            ("released", "released gen 1")):
            if phrase in said and tag not in self.timeline:
                self.timeline[tag] = now
                self.leader_index = i

    def _idle_wait(self) -> float:
        waits = [r._change_since + r.settings.last_call - time.monotonic()
                 for r in self.members if r.is_leader and r._change_since is not None]
        return max(0.0005, min(waits)) if waits else 0.05

    def _results(self, start: float) -> dict[str, Any]:
        total = self.tally.per_member
        join_total = sum(self.join_rpcs.values())
        plans = {(r.plan.gen, len(r.plan.members)) for r in self.members if r.plan is not None}
        leader = self.leader_index
        return {
            "cycle_start": start,
            "delivered": self.delivered,
            "plans": sorted(plans),
            "client_requests": sum(c.requests for c in self.clients),
            "join_rpcs": join_total,
            "cycle_rpcs": sum(total.values()) - join_total,
            "background_rpcs": self.tally.background,
            "timeline": self.timeline,
            "leader": None if leader is None else {
                "node": self.spec.nodes[leader], "join_rpcs": self.join_rpcs.get(leader, 0),
                "cycle_rpcs": total.get(leader, 0) - self.join_rpcs.get(leader, 0)},
            "clients": len(self.clients),
        }

    def teardown(self) -> None:
        self.go.set()
        for t in self.threads:
            t.join(5.0)
        for r in self.members:
            if r.lease is not None:
                r.leave()
        for c in self.clients:
            c.close()


def _worker_main(conn: Any, endpoints: tuple[str, ...]) -> None:
    """A worker process: obeys ("setup", RunSpec), ("join",), ("go",), ("teardown",), ("exit",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it kills us by pid
    configure_logging(level="warning")
    worker: _Worker | None = None
    while True:
        try:
            cmd, *args = conn.recv()
        except EOFError:  # the parent is gone
            return
        try:
            if cmd == "exit":
                return
            if cmd == "setup":
                worker = _Worker(endpoints, args[0])
                reply: Any = len(worker.clients)
            elif cmd == "join":
                reply = worker.join()
            elif cmd == "go":
                reply = worker.cycle()
            elif cmd == "teardown":
                worker.teardown()
                worker, reply = None, None
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", reply))
        except Exception:
            conn.send(("error", traceback.format_exc()))


# -- parent side ------------------------------------------------------------------------------------


class Pool:
    """K spawned worker processes, each on its own pipe; killed by pid on close, whatever happened."""

    def __init__(self, k: int, endpoints: tuple[str, ...]) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for w in range(k):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, endpoints), name=f"bench-worker-{w}",
                               daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def ask(self, msgs: list[tuple[Any, ...]], timeout: float) -> list[Any]:
        """Send one message to each worker (all first, then collect), and return their replies."""
        for conn, msg in zip(self.conns, msgs):
            conn.send(msg)
        replies = []
        deadline = time.monotonic() + timeout
        for w, conn in enumerate(self.conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"worker {w} did not answer {msgs[w][0]!r} in {timeout}s")
            status, reply = conn.recv()
            if status != "ok":
                raise RuntimeError(f"worker {w} failed on {msgs[w][0]!r}:\n{reply}")
            replies.append(reply)
        return replies

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("exit",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 3.0
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)


def run_once(pool: Pool, n: int, last_call: float, args: argparse.Namespace) -> dict[str, Any]:
    """One rendezvous of ``n`` fresh members on a fresh cluster name; returns its measurements."""
    k = len(pool.procs)
    nodes = [f"n{i:04d}" for i in range(n)]
    cluster = "bench-" + uuid.uuid4().hex[:10]
    specs = [RunSpec(cluster, n, tuple(nodes[w::k]), last_call, args.slots, args.tp, args.per_client,
                     args.run_timeout, args.driver) for w in range(k)]
    clients = pool.ask([("setup", s) for s in specs], 60)
    joins = pool.ask([("join",)] * k, 120)
    done = pool.ask([("go",)] * k, args.run_timeout + 10)
    pool.ask([("teardown",)] * k, 120)
    last_join = max(j["last_join"] for j in joins)
    delivered = [t for d in done for t in d["delivered"]]
    plans = {tuple(p) for d in done for p in d["plans"]}
    if plans != {(1, n)} or any(t is None for t in delivered):
        raise RuntimeError(f"expected every member to hold plan gen 1 of {n} members, saw {plans}")
    lat = sorted(t - last_join for t in delivered)
    leaders = [d for d in done if d["leader"] is not None]
    if len(leaders) != 1:
        raise RuntimeError(f"expected one leader, saw {len(leaders)}")
    lead = leaders[0]
    requests = sum(d["client_requests"] for d in done)
    return {
        "n": n, "last_call": last_call, "cluster": cluster, "procs": k, "clients": sum(clients),
        "joins_took": last_join - min(j["first_join"] for j in joins),
        "cycling_started": max(d["cycle_start"] for d in done) - last_join,
        "all_delivered": lat[-1], "median_delivered": statistics.median(lat), "first_delivered": lat[0],
        **{f"leader_{tag}": t - last_join for tag, t in lead["timeline"].items()},
        "rpc_per_member": requests / n,
        "join_rpc_per_member": sum(d["join_rpcs"] for d in done) / n,
        "cycle_rpc_per_member": sum(d["cycle_rpcs"] for d in done) / n,
        "background_rpc_per_member": sum(d["background_rpcs"] for d in done) / n,
        "leader_node": lead["leader"]["node"],
        "leader_join_rpcs": lead["leader"]["join_rpcs"], "leader_cycle_rpcs": lead["leader"]["cycle_rpcs"],
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (n, last_call): median and max over repeats."""
    rows = []
    for key in sorted({(r["n"], r["last_call"]) for r in runs}, key=lambda x: (x[0], -x[1])):
        rs = [r for r in runs if (r["n"], r["last_call"]) == key]
        def med(field: str) -> float:
            return statistics.median(r[field] for r in rs)
        def top(field: str) -> float:
            return max(r[field] for r in rs)
        rows.append({
            "n": key[0], "last_call": key[1], "repeats": len(rs), "procs": rs[0]["procs"],
            "clients": rs[0]["clients"],
            "all_delivered_median": med("all_delivered"), "all_delivered_max": top("all_delivered"),
            "median_member_median": med("median_delivered"), "median_member_max": top("median_delivered"),
            "plan_written_median": med("leader_plan_written"), "released_median": med("leader_released"),
            "joins_took_median": med("joins_took"),
            "rpc_per_member_median": med("rpc_per_member"), "rpc_per_member_max": top("rpc_per_member"),
            "join_rpc_per_member_median": med("join_rpc_per_member"),
            "cycle_rpc_per_member_median": med("cycle_rpc_per_member"),
            "background_rpc_per_member_median": med("background_rpc_per_member"),
            "leader_rpcs_median": statistics.median(r["leader_join_rpcs"] + r["leader_cycle_rpcs"] for r in rs),
            "leader_cycle_rpcs_median": med("leader_cycle_rpcs"),
        })
    return rows


def table(rows: list[dict[str, Any]], header: str) -> str:
    """The rows as an aligned plain-text table, with its header and footer."""
    cols = [("N", "{n}"), ("last call", "{last_call:.1f} s"), ("procs", "{procs}"), ("clients", "{clients}"),
            ("all hold plan", "{all_delivered_median:.3f} [{all_delivered_max:.3f}]"),
            ("median member", "{median_member_median:.3f} [{median_member_max:.3f}]"),
            ("plan written", "{plan_written_median:.3f}"), ("released", "{released_median:.3f}"),
            ("joins took", "{joins_took_median:.2f}"),
            ("RPC/member", "{rpc_per_member_median:.2f}"),
            ("= join+rdzv+keepalive", "{join_rpc_per_member_median:.2f}+{cycle_rpc_per_member_median:.2f}"
                                      "+{background_rpc_per_member_median:.2f}"),
            ("leader RPC (rdzv)", "{leader_rpcs_median:.0f} ({leader_cycle_rpcs_median:.0f})")]
    cells = [[c for c, _ in cols]] + [[f.format(**r) for _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    footer = [
        "Times: seconds from the last member's join() returning; median [max] over repeats. 'all hold plan' is",
        "the last member to hold released plan gen 1 (all N members); 'median member' the median member;",
        "'plan written' / 'released' are when the leader wrote gen 1 / wrote released/1 (median over repeats).",
        "The leader waits the last call out from the first unplanned change it sees, so it is inside these times.",
        "RPC/member: sum of client.requests deltas over all clients, from before the first join to the end, / N;",
        "keepalive = lease refreshes (and any watch reconnects) from background threads. Leader RPC: the leader's",
        "own requests, join included (rendezvous cycles alone in parentheses).",
        TORCHELASTIC_NOTE,
    ]
    return "\n".join([header, ""] + lines + [""] + footer)


def versions() -> dict[str, str]:
    out = subprocess.run([etcd_binary() or "etcd", "--version"], capture_output=True, text=True).stdout
    return {
        "python": platform.python_version(),
        "etcd": out.splitlines()[0].split(":", 1)[1].strip() if out else "?",
        "etcd-sdk-python": importlib.metadata.version("etcd-sdk-python"),
        "grpcio": importlib.metadata.version("grpcio"),
        "protobuf": importlib.metadata.version("protobuf"),
        "cpus": str(os.cpu_count()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--sizes", type=ints, default=[16, 64, 256], help="member counts, comma-separated")
    p.add_argument("--last-call", type=floats, default=[0.5, 0.1],
                   help="last-call windows in seconds, comma-separated (one table row each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--procs", type=int, default=2, help="worker processes the members are spread over")
    p.add_argument("--per-client", type=int, default=16, help="members sharing one EtcdClient (gRPC channel)")
    p.add_argument("--slots", type=int, default=2, help="rank slots per member node")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the cluster spec")
    p.add_argument("--driver", choices=("threads", "roundrobin"), default="threads",
                   help="one loop thread per member (default), or one loop stepping a worker's members in turn")
    p.add_argument("--run-timeout", type=float, default=30.0, help="seconds one run may take to deliver")
    p.add_argument("--json", type=Path, help="also write every run and the summary here")
    return p.parse_args(argv)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if etcd_binary() is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    configure_logging(level="warning")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    cluster, pool, runs = EtcdCluster(1), None, []
    t0 = time.monotonic()
    try:
        cluster.start()
        pool = Pool(args.procs, cluster.endpoints)
        for n in args.sizes:
            for last_call in args.last_call:
                for rep in range(args.repeats):
                    run = run_once(pool, n, last_call, args)
                    runs.append(run)
                    print(f"N={n:4d} last_call={last_call:.1f} #{rep + 1}: all hold plan "
                          f"{run['all_delivered']:.3f} s, median {run['median_delivered']:.3f} s, "
                          f"{run['rpc_per_member']:.2f} RPC/member", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted: stopping workers and etcd", file=sys.stderr)
        return 130
    finally:
        if pool is not None:
            pool.close()
        cluster.stop()
    rows = summarize(runs)
    v = versions()
    header = (f"Rendezvous: N members, each its own lease and its own watch, over {args.procs} worker "
              f"processes, {args.per_client} members per EtcdClient (gRPC channel); one etcd {v['etcd']} "
              f"(single member); {args.repeats} repeats; spec tp={args.tp}, {args.slots} slots/member, "
              f"min_nodes=N.\nPython {v['python']}, etcd-sdk-python {v['etcd-sdk-python']}, grpcio "
              f"{v['grpcio']}; {v['cpus']} CPUs; whole benchmark {time.monotonic() - t0:.0f} s.")
    print(table(rows, header))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v_) if isinstance(v_, Path) else v_)
                                                  for k, v_ in vars(args).items()},
                                         "versions": v, "summary": rows, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
