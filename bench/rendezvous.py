"""Rendezvous benchmark: N members against one real etcd, from the last join to everyone holding the plan.

Each member is a full ``Rendezvous`` with its own lease and its own ``control/`` watch. Real daemons
run one per host; here N share one machine, spread over K spawned worker processes (reused for every
run) to keep them off one GIL. In a worker, members share an ``EtcdClient`` (gRPC channel) per
``--per-client`` of them, and ``--threads`` driver threads step them round robin like
``Members.cycle_until``, made event-driven: ``run_cycle(0)`` only for members with a watch event
queued, the leader, or members that have seen no leader yet; otherwise sleep until an event comes
or the leader's last call ends.

K for a 2-core machine: 4 processes, two per core, one driver thread each. A worker steps its
members in series, so each of its RPCs leaves its core idle unless another worker (or etcd) has work:
two per core fill those waits. Measured at N = 256 (last call 0.1 s, alternating runs): K = 4 beat
K = 2 in each of 4 pairs, by 0.1-0.4 s; K = 8 was no better than 4 (its extra gRPC, watch and
lease-keeper threads cost CPU), K = 1 took twice as long, and a thread per member (``--threads 0``)
made a GIL convoy that starved the lease keepers until leases expired.

One run, on a fresh cluster name: every worker builds its members and joins them; each records the
wall-clock time (``time.time()``, shared by the processes) its last ``join()`` returned, and the
latest of those is zero. Then all start cycling at once: members campaign, the winner reads
``nodes/``, waits the last call out (from the first unplanned change it sees, right after it wins),
writes plan gen 1 (the spec's ``min_nodes = N`` makes it the plan of all N), every member acks, the
leader writes ``released/1``, and each member records when it delivered the plan (``delivered_gen
>= 1``). Last, every member leaves (lease revoked). Reported: last and median member's time, the
leader's timeline, ``client.requests`` deltas over all clients / N (split into join, rendezvous and
background lease refreshes by the member whose driver issued each), the leader's own requests, CPU
time of workers and etcd, and what other processes and the host took of this shared VM.

Usage: ``.venv/bin/python bench/rendezvous.py [--sizes 16,64,256] [--last-call 0.5,0.1] [--repeats 3]
[--procs 4] [--threads 1] [--per-client 16] [--lease-ttl 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing as mp
import multiprocessing.resource_tracker
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

from rallypoint.errors import EtcdError
from rallypoint.log import configure_logging
from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings
from rallypoint.rendezvous.records import ClusterSpec
from rallypoint.rendezvous.rendezvous import Rendezvous, RendezvousSettings, local_record
from rallypoint.testing.etcd_server import INSTALL_HINT, EtcdCluster, etcd_binary


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
    lease_ttl: float
    timeout: float
    threads: int  # driver threads in this worker; 0: one per member


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
    """Counts etcd requests by the member whose driver issued them; None: background (lease refreshes)."""

    def __init__(self) -> None:
        self.local = threading.local()  # .member: the member this thread drives, if any
        self.per_member: dict[int | None, int] = {}
        self._lock = threading.Lock()

    def wrap(self, client: EtcdClient) -> None:
        inner = client._call_once  # every RPC goes through it; it also bumps client.requests

        def counted(what: str, fn: Any) -> Any:
            member = getattr(self.local, "member", None)
            with self._lock:
                self.per_member[member] = self.per_member.get(member, 0) + 1
            return inner(what, fn)

        client._call_once = counted  # type: ignore[method-assign]


class _Worker:
    """One worker process's members for one run; driver thread ``g`` owns every ``threads``-th member."""

    def __init__(self, endpoints: tuple[str, ...], spec: RunSpec) -> None:
        self.spec = spec
        self.go = threading.Event()
        self.tally = _Tally()
        self.clients: list[EtcdClient] = []
        self.members: list[Rendezvous] = []
        n = len(spec.nodes)
        t = n if spec.threads <= 0 else min(spec.threads, n)
        self.groups = [list(range(g, n, t)) for g in range(t)]
        self.wakes = [threading.Event() for _ in range(t)]
        self.delivered: list[float | None] = [None] * n
        self.joined_at: list[float | None] = [None] * n
        self.join_rpcs: dict[int, int] = {}
        self.reports: queue.Queue[tuple[str, int, str]] = queue.Queue()
        self.threads: list[threading.Thread] = []
        self.timeline: dict[str, float] = {}  # the leader's: elected, plan_written, released
        self.leader_index, self.failed_cycles, self.rejoins = None, 0, 0
        cluster_spec = ClusterSpec(tp=spec.tp, min_nodes=spec.n)
        for i, node in enumerate(spec.nodes):
            if i % spec.per_client == 0:
                client = EtcdClient(EtcdSettings(endpoints=endpoints, request_timeout=2.0, retry_deadline=10.0))
                self.tally.wrap(client)
                self.clients.append(client)
            settings = RendezvousSettings(spec.cluster, node, cluster_spec, lease_ttl=spec.lease_ttl,
                                          last_call=spec.last_call)
            r = Rendezvous(self.clients[-1], settings, local_record(node, "127.0.0.1", 0, spec.slots),
                           on_release=lambda plan, i=i: self._on_release(i))
            r.events = _WakingQueue(self.wakes[i % t])  # before join(): the watch feeds this queue
            self.members.append(r)

    def _on_release(self, i: int) -> None:
        self.delivered[i] = self.delivered[i] or time.time()

    def join(self) -> dict[str, Any]:
        first = time.time()
        self.threads = [threading.Thread(target=self._driver, args=(g,), daemon=True, name=f"driver {g}")
                        for g in range(len(self.groups))]
        for t in self.threads:
            t.start()
        self._collect("joined")
        return {"first_join": first, "last_join": max(self.joined_at)}

    def _driver(self, g: int) -> None:
        """Join group ``g``'s members, wait for the start signal, step them until each holds the plan."""
        try:
            for i in self.groups[g]:
                self.tally.local.member = i
                self.members[i].join()
                self.joined_at[i] = time.time()
                self.join_rpcs[i] = self.tally.per_member.get(i, 0)
            self.tally.local.member = None
            self.reports.put(("joined", g, ""))
            if not self.go.wait(self.spec.timeout):
                return
            self._step(g, time.monotonic() + self.spec.timeout)
            self.reports.put(("done", g, ""))
        except Exception:
            self.reports.put(("error", g, traceback.format_exc()))

    def _step(self, g: int, deadline: float) -> None:
        mine, wake = [(i, self.members[i]) for i in self.groups[g]], self.wakes[g]
        while any(self.delivered[i] is None for i, _ in mine) and time.monotonic() < deadline:
            wake.clear()
            busy = False
            for i, r in mine:
                if r.leader is None or r.is_leader or not r.events.empty() or r.lease.lost.is_set():
                    self.tally.local.member = i
                    try:
                        said = r.run_cycle(0)
                    except EtcdError as exc:  # rallyd's loop says "cycle failed" and goes on; so do we
                        said = f"cycle failed: {exc}"
                        self.failed_cycles += 1
                    self.tally.local.member = None
                    if not said.startswith("idle"):
                        busy = True
                        self._note(i, said)
            if not busy:
                wake.wait(self._idle_wait(mine))

    def _collect(self, what: str) -> None:
        """Wait until every driver thread reported ``what``; raise the first error one reported."""
        seen, deadline = 0, time.monotonic() + self.spec.timeout + 5
        while seen < len(self.groups):
            try:
                kind, g, tb = self.reports.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{len(self.groups) - seen} driver thread(s) did not report {what!r}") from None
            if kind == "error":
                raise RuntimeError(f"driver thread {g} failed:\n{tb}")
            seen += kind == what

    def cycle(self) -> dict[str, Any]:
        self.go.set()
        self._collect("done")
        if any(t is None for t in self.delivered):
            raise RuntimeError(f"{self.delivered.count(None)} member(s) got no plan in {self.spec.timeout}s")
        return self._results()

    def _note(self, i: int, said: str) -> None:
        now = time.time()
        if "re-registered after lease loss" in said:
            self.rejoins += 1
        for tag, phrase in (("elected", "became leader"), ("plan_written", "wrote plan gen 1"),
                            ("released", "released gen 1")):
            if phrase in said and tag not in self.timeline:
                self.timeline[tag] = now
                self.leader_index = i

    @staticmethod
    def _idle_wait(mine: list[tuple[int, Rendezvous]]) -> float:
        waits = [r._change_since + r.settings.last_call - time.monotonic()
                 for _, r in mine if r.is_leader and r._change_since is not None]
        return max(0.0005, min(waits)) if waits else 0.05

    def _results(self) -> dict[str, Any]:
        total, join_total, lead = dict(self.tally.per_member), sum(self.join_rpcs.values()), self.leader_index
        background = total.pop(None, 0)
        return {
            "delivered": self.delivered, "timeline": self.timeline,
            "plans": sorted({(r.plan.gen, len(r.plan.members)) for r in self.members if r.plan is not None}),
            "client_requests": sum(c.requests for c in self.clients), "join_rpcs": join_total,
            "cycle_rpcs": sum(total.values()) - join_total, "background_rpcs": background,
            "failed_cycles": self.failed_cycles, "rejoins": self.rejoins,
            "leader": None if lead is None else {
                "node": self.spec.nodes[lead], "join_rpcs": self.join_rpcs.get(lead, 0),
                "cycle_rpcs": total.get(lead, 0) - self.join_rpcs.get(lead, 0)},
        }

    def teardown(self) -> None:
        self.go.set()
        for t in self.threads:
            t.join(5.0)
        # Stop refreshing before revoking: a refresh racing a revoke logs a false "lease lost". (No
        # keeper.join(): LeaseKeeper's _stop Event shadows Thread._stop, so join() raises TypeError.)
        keepers = [c._keeper for c in self.clients if c._keeper is not None]
        for k in keepers:
            k.stop()
        deadline = time.monotonic() + 5.0
        while any(k in threading.enumerate() for k in keepers) and time.monotonic() < deadline:
            time.sleep(0.01)
        deadline = time.monotonic() + 20.0  # past it, leases are left to expire (a leave retries up to 10 s)
        configure_logging(level="error")  # a lease that runs out before its revoke only says "revoke failed"
        with ThreadPoolExecutor(16) as leaving:  # in parallel, inside the TTL the keepers no longer renew
            leaving.map(lambda r: r.leave() if r.lease is not None and time.monotonic() < deadline else None,
                        self.members)
        configure_logging(level="warning")
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
        if cmd == "exit":
            return
        try:
            if cmd == "setup":
                worker = _Worker(endpoints, args[0])
                reply: Any = len(worker.clients)
            elif cmd == "teardown":
                if worker is not None:
                    worker.teardown()
                worker = reply = None
            else:
                reply = {"join": worker.join, "go": worker.cycle}[cmd]()
            conn.send(("ok", reply))
        except Exception:
            conn.send(("error", traceback.format_exc()))


# -- parent side ------------------------------------------------------------------------------------


class PoolBroken(RuntimeError):
    """A worker did not answer: its pipe is out of step, so the benchmark cannot go on."""


class Pool:
    """K spawned worker processes, each on its own pipe; killed by pid on close, whatever happened."""

    def __init__(self, k: int, endpoints: tuple[str, ...], etcd_pids: list[int]) -> None:
        ctx = mp.get_context("spawn")
        self.etcd_pids = etcd_pids
        self.conns, self.procs = [], []
        for w in range(k):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, endpoints), name=f"bench-{w}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def ask(self, msgs: list[tuple[Any, ...]], timeout: float) -> list[Any]:
        """Send one message to each worker, collect every reply, and raise the first error among them."""
        for conn, msg in zip(self.conns, msgs):
            conn.send(msg)
        replies = []
        deadline = time.monotonic() + timeout
        for w, conn in enumerate(self.conns):
            try:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise PoolBroken(f"worker {w} did not answer {msgs[w][0]!r} in {timeout}s")
                replies.append(conn.recv())
            except (EOFError, OSError) as exc:
                raise PoolBroken(f"worker {w} is gone ({exc!r})") from None
        for w, (status, reply) in enumerate(replies):
            if status != "ok":
                raise RuntimeError(f"worker {w} failed on {msgs[w][0]!r}:\n{reply}")
        return [reply for _, reply in replies]

    def close(self, grace: float = 3.0) -> None:
        """Ask every worker to exit, and SIGKILL those still there after ``grace`` seconds."""
        for conn in self.conns:
            try:
                conn.send(("exit",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + grace
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        getattr(mp.resource_tracker._resource_tracker, "_stop", lambda: None)()  # reap it: leave no zombie


class CpuMeter:
    """CPU time of the workers and etcd, and the cores other processes used and the host stole (shared VM)."""

    def __init__(self, workers: list[int], etcd: list[int]) -> None:
        self.groups, self.tick = ([os.getpid()], workers, etcd), os.sysconf("SC_CLK_TCK")

    def _cpu(self, pids: list[int]) -> float:
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime of all its threads
            except (OSError, IndexError, ValueError):
                pass
        return total / self.tick

    def _sample(self) -> tuple[float, ...]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy, steal = (v[0] + v[1] + v[2] + v[5] + v[6]) / self.tick, v[7] / self.tick
        return (time.monotonic(), busy, steal, *(self._cpu(g) for g in self.groups))

    def start(self) -> None:
        self.first = self._sample()

    def mark(self) -> None:
        """Start the window whose CPU time ``stop()`` reports (other and stolen cores count from ``start``)."""
        self.marked = self._sample()

    def stop(self) -> dict[str, float]:
        t1, busy1, steal1, me1, workers1, etcd1 = self._sample()
        t0, busy0, steal0, me0, workers0, etcd0 = self.first
        _, _, _, _, workers_m, etcd_m = self.marked
        wall, ours = max(t1 - t0, 1e-9), (me1 - me0) + (workers1 - workers0) + (etcd1 - etcd0)
        return {"cpu_workers_s": workers1 - workers_m, "cpu_etcd_s": etcd1 - etcd_m,
                "other_cores": max(0.0, busy1 - busy0 - ours) / wall, "steal_cores": (steal1 - steal0) / wall}


def run_once(pool: Pool, n: int, last_call: float, args: argparse.Namespace) -> dict[str, Any]:
    """One rendezvous of ``n`` fresh members on a fresh cluster name; returns its measurements."""
    k, nodes, cluster = len(pool.procs), [f"n{i:04d}" for i in range(n)], "bench-" + uuid.uuid4().hex[:10]
    specs = [RunSpec(cluster, n, tuple(nodes[w::k]), last_call, args.slots, args.tp, args.per_client,
                     args.lease_ttl, args.run_timeout, args.threads) for w in range(k)]
    clients = sum(pool.ask([("setup", s) for s in specs], 60))
    meter, broken = CpuMeter([p.pid for p in pool.procs], pool.etcd_pids), False
    try:
        meter.start()
        joins = pool.ask([("join",)] * k, args.run_timeout + 10)
        meter.mark()
        done = pool.ask([("go",)] * k, args.run_timeout + 10)
        cpu = meter.stop()
    except PoolBroken:
        broken = True
        raise
    finally:
        if not broken:
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
    return {
        "n": n, "last_call": last_call, "cluster": cluster, "procs": k, "clients": clients,
        "joins_took": last_join - min(j["first_join"] for j in joins),
        "all_delivered": lat[-1], "median_delivered": statistics.median(lat),
        **{f"leader_{tag}": t - last_join for tag, t in lead["timeline"].items()},
        "rpc_per_member": sum(d["client_requests"] for d in done) / n,
        "join_rpc_per_member": sum(d["join_rpcs"] for d in done) / n,
        "cycle_rpc_per_member": sum(d["cycle_rpcs"] for d in done) / n,
        "background_rpc_per_member": sum(d["background_rpcs"] for d in done) / n,
        "leader_node": lead["leader"]["node"],
        "leader_join_rpcs": lead["leader"]["join_rpcs"], "leader_cycle_rpcs": lead["leader"]["cycle_rpcs"],
        "rejoins": sum(d["rejoins"] for d in done), "failed_cycles": sum(d["failed_cycles"] for d in done),
        **cpu, "cpu_ms_per_member": (cpu["cpu_workers_s"] + cpu["cpu_etcd_s"]) / n * 1000,
    }


_MEDIANS = ("all_delivered", "median_delivered", "leader_elected", "leader_plan_written", "leader_released",
            "joins_took", "rpc_per_member", "join_rpc_per_member", "cycle_rpc_per_member",
            "background_rpc_per_member", "leader_rpcs", "leader_cycle_rpcs", "cpu_ms_per_member", "etcd_cpu_share")
_MAXIMA = ("all_delivered", "median_delivered", "other_cores", "steal_cores")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (n, last_call): medians (``*_med``) and maxima (``*_max``) over the completed repeats."""
    rows = []
    for key in sorted({(r["n"], r["last_call"]) for r in runs}, key=lambda x: (x[0], -x[1])):
        tried = [r for r in runs if (r["n"], r["last_call"]) == key]
        rs = [dict(r, leader_rpcs=r["leader_join_rpcs"] + r["leader_cycle_rpcs"],
                   etcd_cpu_share=r["cpu_etcd_s"] / max(1e-9, r["cpu_etcd_s"] + r["cpu_workers_s"]))
              for r in tried if "error" not in r]
        row: dict[str, Any] = {"n": key[0], "last_call": key[1], "runs": len(tried), "completed": len(rs)}
        if rs:
            row.update({f"{f}_med": statistics.median(r[f] for r in rs) for f in _MEDIANS})
            row.update({f"{f}_max": max(r[f] for r in rs) for f in _MAXIMA})
            row["rejoins"] = sum(r["rejoins"] for r in rs)
        rows.append(row)
    return rows


COLUMNS = [
    ("N", "{n}"), ("last call", "{last_call:.1f} s"), ("runs ok", "{completed}/{runs}"),
    ("all hold plan", "{all_delivered_med:.3f} [{all_delivered_max:.3f}]"),
    ("median member", "{median_delivered_med:.3f} [{median_delivered_max:.3f}]"),
    ("elected", "{leader_elected_med:.3f}"), ("plan written", "{leader_plan_written_med:.3f}"),
    ("released", "{leader_released_med:.3f}"),
    ("RPC/member", "{rpc_per_member_med:.2f}"),
    ("= join+rdzv+keepalive", "{join_rpc_per_member_med:.2f}+{cycle_rpc_per_member_med:.2f}"
                              "+{background_rpc_per_member_med:.2f}"),
    ("leader RPC (rdzv)", "{leader_rpcs_med:.0f} ({leader_cycle_rpcs_med:.0f})"),
    ("CPU ms/member", "{cpu_ms_per_member_med:.1f}"),
    ("other/stolen cores", "{other_cores_max:.2f}/{steal_cores_max:.2f}"),
    ("lease losses", "{rejoins}"),
]


def table(rows: list[dict[str, Any]], header: str) -> str:
    """The rows as an aligned plain-text table, with its header and footer."""
    def cell(fmt: str, row: dict[str, Any]) -> str:
        try:
            return fmt.format(**row)
        except KeyError:  # no completed run in this row
            return "-"
    cells = [[c for c, _ in COLUMNS]] + [[cell(f, r) for _, f in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    footer = [
        "Seconds from the last join() returning until the last ('all hold plan') and the median member holds",
        "released plan gen 1 of all N members: median [max] of the completed repeats. elected / plan written /",
        "released: when the leader won, wrote gen 1, wrote released/1 (medians); it waits the last call out",
        "from the first unplanned change, right after it wins, so the window is inside every time.",
        "RPC/member: sum of client.requests deltas over all clients, first join to last delivery, / N; split",
        "into join, rendezvous and keepalive (lease refreshes, background). Leader RPC: its own, join included",
        "(rendezvous alone in parentheses). CPU ms/member: workers' and etcd's CPU time from the start signal",
        "to the last delivery, / N. other/stolen cores: the average other processes on this shared VM used",
        "and the host stole, first join to last delivery (max of repeats). Lease losses: members that had to",
        "re-register after their lease expired (sum).",
        "For context: TorchElastic's etcd rendezvous polls every 1 s and waits a 30 s last call by default.",
    ]
    return "\n".join([header, ""] + lines + [""] + footer)


def versions() -> dict[str, str]:
    out = subprocess.run([etcd_binary() or "etcd", "--version"], capture_output=True, text=True, check=False).stdout
    return {"python": platform.python_version(),
            "etcd": out.splitlines()[0].split(":", 1)[1].strip() if out else "?",
            **{p: importlib.metadata.version(p) for p in ("etcd-sdk-python", "grpcio", "protobuf")},
            "cpus": str(os.cpu_count())}


def describe(args: argparse.Namespace, v: dict[str, str], elapsed: float) -> str:
    """The table's header: how the members were driven, and the versions."""
    threads = ("one driver thread per member" if args.threads <= 0 else
               "one driver thread each" if args.threads == 1 else f"{args.threads} driver threads each")
    clients = ", ".join(f"{sum(-(-len(range(w, n, args.procs)) // args.per_client) for w in range(args.procs))} "
                        f"(N={n})" for n in args.sizes)
    return (f"Rendezvous benchmark: N members, each with its own lease ({args.lease_ttl:g} s TTL) and its own "
            f"control/ watch, in {args.procs} worker processes ({threads}); a worker's members share one "
            f"EtcdClient (gRPC channel) per {args.per_client}, so clients in all: {clients}.\nOne etcd "
            f"{v['etcd']} (single member, started here). Spec tp={args.tp}, {args.slots} slots/member, "
            f"min_nodes=N; {args.repeats} repeats per row.\nPython {v['python']}, etcd-sdk-python "
            f"{v['etcd-sdk-python']}, grpcio {v['grpcio']}, protobuf {v['protobuf']}; {v['cpus']} CPUs; "
            f"whole benchmark {elapsed:.0f} s.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--sizes", type=ints, default=[16, 64, 256], help="member counts, comma-separated")
    p.add_argument("--last-call", type=floats, default=[0.5, 0.1],
                   help="last-call windows in seconds, comma-separated (one table row each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--procs", type=int, default=4, help="worker processes the members are spread over")
    p.add_argument("--per-client", type=int, default=16, help="members sharing one EtcdClient (gRPC channel)")
    p.add_argument("--lease-ttl", type=float, default=3.0, help="member lease TTL, seconds (rallyd's default)")
    p.add_argument("--slots", type=int, default=2, help="rank slots per member node")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the cluster spec")
    p.add_argument("--threads", type=int, default=1,
                   help="driver threads per worker, each stepping its share of members; 0: one per member")
    p.add_argument("--run-timeout", type=float, default=30.0, help="seconds one run may take to deliver")
    p.add_argument("--json", type=Path, help="also write every run and the summary here")
    return p.parse_args(argv)


def run_logged(pool: Pool, n: int, last_call: float, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """``run_once``, with a line on stderr; a failed run is a result too (counted, never averaged)."""
    try:
        run = run_once(pool, n, last_call, args)
    except PoolBroken:
        raise
    except RuntimeError as exc:
        print(f"{label}: FAILED: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return {"n": n, "last_call": last_call, "error": str(exc)}
    print(f"{label}: all hold plan {run['all_delivered']:.3f} s, median {run['median_delivered']:.3f} s, "
          f"{run['rpc_per_member']:.2f} RPC/member, {run['cpu_ms_per_member']:.1f} CPU ms/member; cores "
          f"used by others {run['other_cores']:.2f}, stolen {run['steal_cores']:.2f}", file=sys.stderr, flush=True)
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if etcd_binary() is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    configure_logging(level="warning")
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell may have started us with it ignored
        signal.signal(sig, signal.default_int_handler)  # raises KeyboardInterrupt
    cluster, pool, runs, grace, status = EtcdCluster(1), None, [], 3.0, 0
    t0 = time.monotonic()
    try:
        cluster.start()
        pool = Pool(args.procs, cluster.endpoints, [m.pid for m in cluster.members])
        for n, call, i in ((n, c, i) for n in args.sizes for c in args.last_call for i in range(args.repeats)):
            runs.append(run_logged(pool, n, call, args, f"N={n:4d} last_call={call:.1f} #{i + 1}"))
    except KeyboardInterrupt:
        print("interrupted: stopping workers and etcd", file=sys.stderr)
        grace = 0.0
        return 130
    except PoolBroken as exc:  # report what completed, then fail
        print(f"benchmark stopped: {exc}", file=sys.stderr)
        grace, status = 0.0, 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        if pool is not None:
            pool.close(grace)
        cluster.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    rows, v = summarize(runs), versions()
    print(table(rows, describe(args, v, time.monotonic() - t0)))
    if args.json:
        options = {k: str(x) if isinstance(x, Path) else x for k, x in vars(args).items()}
        args.json.write_text(json.dumps({"args": options, "versions": v, "summary": rows, "runs": runs}, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
