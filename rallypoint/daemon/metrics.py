"""rallyd's Prometheus endpoint: what an operator graphs and alerts on.

Two kinds of series, every one labelled with ``cluster`` and ``node``:

* **the cluster, as this daemon sees it** (``rallypoint_generation``, ``rallypoint_cluster_state``,
  ``rallypoint_recovery_phase``, ``rallypoint_recoveries_total``, ``rallypoint_recovery_*_seconds``):
  every daemon folds the same recovery events, so each reports the same values; take ``max`` over
  the nodes of a cluster, and alert on a node that disagrees (it has lost etcd).
* **this node** (ranks by state, restarts, collectives its ranks tripped, requests its replicas'
  drivers accepted, resumed, finished): sum over the nodes for the cluster.

Counters start at zero when rallyd starts (Prometheus' ``rate`` and ``increase`` handle that). The
request counters are kept by the drivers and reach rallyd in their heartbeats (every 0.5 s); rallyd
adds up what each process reports, so a replaced worker's counts are not lost, except for what it
did in the last half second before it died.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rallypoint.recovery.machine import PHASES, SERVING, RecoveryMachine, Transition, operator_state

CLUSTER_STATES = ("serving", "recovering", "degraded", "failed", "forming")
RANK_STATES = ("starting", "serving", "recovering", "stopped", "spare")
REQUEST_OUTCOMES = ("accepted", "completed", "rejected", "failed")
# Recovery phases last from tens of milliseconds (abort) to minutes (a cold load of a big model).
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RECOVERY_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

Snapshot = Callable[[], dict[str, Any]]


class DaemonMetrics:
    """The counters rallyd updates as things happen, plus the gauges read at each scrape.

    Args:
        cluster, node: the labels every series carries.
        machine: the daemon's recovery state machine (read at scrape time).
        snapshot: returns the daemon's ``node_status()`` plus ``etcd_ok`` (read at scrape time).
    """

    def __init__(self, cluster: str, node: str, machine: RecoveryMachine, snapshot: Snapshot) -> None:
        self.labels = {"cluster": cluster, "node": node}
        self.registry = CollectorRegistry(auto_describe=False)  # gauges are read at scrape time only
        names = ("cluster", "node")
        r = self.registry
        self.recoveries = Counter("rallypoint_recoveries", "Recoveries started, by what started them.",
                                  (*names, "cause"), registry=r)
        self.phase_seconds = Histogram("rallypoint_recovery_phase_seconds",
                                       "Seconds the cluster spent in each recovery phase.",
                                       (*names, "phase"), buckets=PHASE_BUCKETS, registry=r)
        self.recovery_seconds = Histogram("rallypoint_recovery_seconds",
                                          "Seconds from leaving serving to serving again (whole recoveries).",
                                          names, buckets=RECOVERY_BUCKETS, registry=r)
        self.tripped = Counter("rallypoint_collectives_tripped",
                               "Collectives this node's ranks gave up on (deadline passed or NCCL/gloo error).",
                               (*names, "group", "trigger"), registry=r)
        self.replacements = Counter("rallypoint_worker_replacements",
                                    "Dead workers of this node, by what replaced them (spare, restart, shrink).",
                                    (*names, "strategy"), registry=r)
        self.requests = Counter("rallypoint_requests", "Requests this node's replicas saw, by outcome.",
                                (*names, "outcome"), registry=r)
        self.resumed = Counter("rallypoint_requests_resumed",
                               "Requests held over an abort and resumed on the rebuilt groups.", names, registry=r)
        self.gateway = Counter("rallypoint_gateway_requests", "Requests through this node's gateway, by outcome "
                               "(completed, rejected: malformed, unavailable: no driver in time, failed).",
                               (*names, "outcome"), registry=r)
        self.gateway_resumes = Counter("rallypoint_gateway_resumes",
                                       "Requests this gateway re-sent to another driver after theirs failed.",
                                       names, registry=r)
        r.register(_Gauges(self.labels, machine, snapshot))
        # connection -> its worker's counts at its last beat; an entry goes with its connection
        self._seen: weakref.WeakKeyDictionary[object, dict[str, int]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._forming = False
        for outcome in REQUEST_OUTCOMES:  # present from the first scrape, so rate() works at once
            self.requests.labels(**self.labels, outcome=outcome)
        self.resumed.labels(**self.labels)

    def transition(self, t: Transition) -> None:
        """Count a phase change of the recovery machine. The cluster's first formation (seen
        from this daemon) is not a recovery, and its phases are not timed as one."""
        if t.cause is not None:
            self._forming = t.cause == "formation"
            if not self._forming:
                self.recoveries.labels(**self.labels, cause=t.cause).inc()
        if self._forming:
            self._forming = t.phase != SERVING
            return
        if t.previous != SERVING and t.took > 0:
            self.phase_seconds.labels(**self.labels, phase=t.previous).observe(t.took)
        if t.recovery_seconds is not None:
            self.recovery_seconds.labels(**self.labels).observe(t.recovery_seconds)

    def collective_tripped(self, group: str, trigger: str) -> None:
        """One of this node's ranks tripped a collective of ``group`` (its label, ``tp[2,3]@g4``):
        counted by the group's kind (world, tp, pp, dp, ep), not by its members."""
        kind = group.split("[", 1)[0] or "unknown"
        self.tripped.labels(**self.labels, group=kind, trigger=trigger).inc()

    def gateway_request(self, outcome: str) -> None:
        self.gateway.labels(**self.labels, outcome=outcome).inc()

    def gateway_resumed(self) -> None:
        self.gateway_resumes.labels(**self.labels).inc()

    def replaced(self, strategy: str) -> None:
        self.replacements.labels(**self.labels, strategy=strategy).inc()

    def beat(self, worker: object, counts: Any) -> None:
        """Fold a worker's cumulative request counts (from a heartbeat on its connection
        ``worker``) into the node's counters."""
        if not isinstance(counts, dict):
            return
        with self._lock:
            before = self._seen.get(worker, {})
            now = {k: v for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)}
            self._seen[worker] = now
        for outcome in REQUEST_OUTCOMES:
            if (d := now.get(outcome, 0) - before.get(outcome, 0)) > 0:
                self.requests.labels(**self.labels, outcome=outcome).inc(d)
        if (d := now.get("resumed", 0) - before.get("resumed", 0)) > 0:
            self.resumed.labels(**self.labels).inc(d)

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serve ``/metrics`` from a background thread; raises OSError when the port is taken.

        The server is prometheus_client's threading ``WSGIServer`` (an ``http.server.HTTPServer``)."""
        from prometheus_client.exposition import start_http_server

        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server


class _Gauges(Collector):
    """The gauges, computed from the daemon's state at each scrape rather than kept up to date."""

    def __init__(self, labels: dict[str, str], machine: RecoveryMachine, snapshot: Snapshot) -> None:
        self.labels, self.machine, self.snapshot = labels, machine, snapshot

    def _gauge(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=[*self.labels, *extra])

    def collect(self) -> Iterable[Metric]:
        status = self.snapshot()
        base = list(self.labels.values())
        m = self.machine
        gen = int(status.get("gen", 0))

        g = self._gauge("rallypoint_generation", "The generation (layout) this node serves; 0 before the first.")
        g.add_metric(base, gen)
        yield g
        state = operator_state(m.phase, m.degraded) if gen else "forming"
        g = self._gauge("rallypoint_cluster_state", "1 for the cluster's state as this daemon sees it.", ("state",))
        for s in CLUSTER_STATES:
            g.add_metric([*base, s], 1 if s == state else 0)
        yield g
        g = self._gauge("rallypoint_recovery_phase", "1 for the recovery phase the cluster is in.", ("phase",))
        for p in PHASES:
            g.add_metric([*base, p], 1 if p == m.phase else 0)
        yield g
        g = self._gauge("rallypoint_recovery_phase_since_seconds",
                        "Wall-clock time (Unix seconds) the current phase began.")
        g.add_metric(base, m.since)
        yield g
        g = self._gauge("rallypoint_degraded", "1 while the cluster serves below its spec (fewer replicas, a seat down).")
        g.add_metric(base, 1 if m.degraded else 0)
        yield g
        g = self._gauge("rallypoint_leader", "1 on the daemon that leads the cluster (writes plans).")
        g.add_metric(base, 1 if status.get("role") == "leader" else 0)
        yield g
        g = self._gauge("rallypoint_etcd_reachable", "1 if rallyd's last cycle reached etcd.")
        g.add_metric(base, 1 if status.get("etcd_ok") else 0)
        yield g

        gp = status.get("gateway_processes") or {}
        g = self._gauge("rallypoint_gateway_processes",
                        "Gateway processes serving the gateway's port ([gateway] processes; 0: a thread of rallyd).")
        g.add_metric(base, int(gp.get("alive", 0)))
        yield g
        g = self._gauge("rallypoint_gateway_process_restarts",
                        "Gateway processes that died and were started again since rallyd started.")
        g.add_metric(base, int(gp.get("restarts", 0)))
        yield g

        workers = status.get("workers", [])
        by_state = dict.fromkeys(RANK_STATES, 0)
        for w in workers:
            s = "stopped" if w.get("process") == "stopped" else str(w.get("state", "starting"))
            by_state[s] = by_state.get(s, 0) + 1
        by_state["spare"] = int(status.get("spares", 0))
        g = self._gauge("rallypoint_ranks", "This node's worker processes by state (spares: warm, no seat yet).",
                        ("state",))
        for s, n in by_state.items():
            g.add_metric([*base, s], n)
        yield g
        g = self._gauge("rallypoint_bad_seats",
                        "This node's seats left down (unhealthy GPU, restart budget spent, checkpoint failed to load).")
        g.add_metric(base, len(status.get("bad_seats", {})))
        yield g
        g = self._gauge("rallypoint_restart_budget_used", "Worker restarts used in the current restart window.")
        g.add_metric(base, int(status.get("restarts", 0)))
        yield g
        g = self._gauge("rallypoint_requests_in_flight", "Requests being decoded by this node's replica drivers.")
        g.add_metric(base, sum(int(w.get("in_flight", 0)) for w in workers))
        yield g
        g = self._gauge("rallypoint_requests_waiting", "Requests accepted and queued at this node's replica drivers.")
        g.add_metric(base, sum(int(w.get("waiting", 0)) for w in workers))
        yield g
