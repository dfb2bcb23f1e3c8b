"""rallyd's main loop and lifecycle: join the rendezvous, run this node's workers, serve, leave.

The daemon owns the process's life: the metrics and gateway listeners, joining, following the
released plans (a worker per seat, seats a plan drops retired), publishing its status, draining
and leaving. It makes no recovery decision. What its watcher threads see (a worker's exit, a
diagnosis, a drill kill, a recovery event, an unhealthy GPU) is recorded for the
``RecoveryCoordinator`` (``recovery/coordinator.py``), which the loop calls once per cycle to
decide and act, through ``daemon/mechanics.py``. One thread decides, so two sightings of one
failure (a diagnosis, then the exit it causes) never race each other.

Each cycle says what it did in one sentence (Patroni style), logged when it changes. Between
cycles the loop blocks in the rendezvous's wait for etcd changes (at most ``min(0.2 s,
heartbeat)``); a recorded observation ends that wait at once (``Rendezvous.wake``), so deciding
on the loop adds no delay to a recovery. The loop is fail-static: an etcd outage is logged and
waited out, never a reason to tear the current generation down; an unexpected exception is logged
with the BUG canary and the loop goes on.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from http.server import HTTPServer
from types import FrameType
from typing import Any

from rallypoint.api import API_KEY_ENV, served_model_name
from rallypoint.daemon.channel import ChannelServer, Peer, channel_address
from rallypoint.daemon.config import Config
from rallypoint.daemon.gpu_health import GpuHealth, load_nvml
from rallypoint.daemon.mechanics import NodeMechanics
from rallypoint.daemon.metrics import DaemonMetrics
from rallypoint.daemon.sd_notify import Notifier
from rallypoint.daemon.seats import OutSeats
from rallypoint.daemon.supervisor import Supervisor, WorkerCommand, WorkerProcess
from rallypoint.errors import EtcdError, EtcdUnavailable, RallypointError
from rallypoint.gateway.processes import GatewayProcesses
from rallypoint.gateway.routes import DriverRoutes
from rallypoint.gateway.server import Gateway
from rallypoint.log import get_logger
from rallypoint.protocol import channel as msgs
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.protocol.orders import wait_drained
from rallypoint.recovery import events as ev
from rallypoint.recovery.coordinator import BUG, IDLE, Policy, RecoveryCoordinator
from rallypoint.recovery.events import EventLog
from rallypoint.recovery.inbox import (
    DiagnosisWritten,
    EventWritten,
    GpuUnhealthy,
    KillOrdered,
    Observation,
    PredecessorLost,
    WorkerExited,
)
from rallypoint.recovery.machine import RecoveryMachine
from rallypoint.recovery.retention import PRUNE_EVERY, keep_from, prune_history
from rallypoint.rendezvous.etcd import ETCD_PASSWORD_ENV, EtcdClient, PrefixWatch, WatchEvent
from rallypoint.rendezvous.records import ClusterSpec, Plan
from rallypoint.rendezvous.rendezvous import Rendezvous, RendezvousSettings, local_record

__all__ = ["BUG", "Daemon", "cluster_spec"]

_CLOSED = WatchEvent("closed", "", b"", 0)  # queued by shutdown after a followed watch is closed


def cluster_spec(cfg: Config) -> ClusterSpec:
    """The layout this daemon proposes for its cluster."""
    return ClusterSpec(tp=cfg.layout.tp, pp=cfg.layout.pp, dp=cfg.layout.dp,
                       min_nodes=cfg.rendezvous.min_nodes, max_nodes=cfg.rendezvous.max_nodes,
                       ep=cfg.layout.ep, expert_copies=cfg.layout.expert_copies,
                       prefill_replicas=cfg.layout.prefill_replicas)


class Daemon:
    """One node's rallyd.

    Args:
        cfg: the validated configuration.
        notifier: where sd_notify messages go (``$NOTIFY_SOCKET`` by default).
    """

    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.log = get_logger("rallyd", node=cfg.node, cluster=cfg.cluster)
        self.notify = notifier or Notifier()
        self.client = EtcdClient(cfg.etcd.to_settings())
        rv, w = cfg.rendezvous, cfg.worker
        settings = RendezvousSettings(
            cluster=cfg.cluster, node=cfg.node, spec=cluster_spec(cfg),
            lease_ttl=rv.lease_ttl.total_seconds(), last_call=rv.last_call.total_seconds(),
            idle_wait=min(0.2, rv.heartbeat.total_seconds()))
        record = local_record(cfg.node, cfg.address, cfg.layout.node_gpus(), cfg.layout.node_slots())
        self.events = EventLog(self.client, ClusterKeys(cfg.cluster), by=cfg.node)
        self.rendezvous = Rendezvous(self.client, settings, record, on_release=self._on_release,
                                     on_event=self.events.emit)
        self.keys = self.rendezvous.keys
        self.stopping = threading.Event()
        self.generation: Plan | None = None
        self.channel: ChannelServer | None = None
        self.supervisor = self._make_supervisor() if w.model or w.workload != "serve" else None
        self.machine = RecoveryMachine()
        self.metrics = DaemonMetrics(cfg.cluster, cfg.node, self.machine,
                                     lambda: {**self.node_status(), "etcd_ok": self._etcd_ok})
        self.mechanics = NodeMechanics(self.client, self.rendezvous, self.events, self.channel, self.log)
        policy = Policy(cfg.node, w.stall_timeout.total_seconds(), w.restart_budget, w.restart_window.total_seconds(),
                        wedged_after=cfg.collectives.build_timeout.total_seconds() + 15.0)
        self.coordinator = RecoveryCoordinator(
            policy, self.mechanics, self.supervisor, OutSeats(w.model), self.machine, self.metrics,
            current_plan=lambda: self.generation, stopping=self.stopping, log=self.log, wake=self.rendezvous.wake)
        self.rendezvous.on_lost = self.coordinator.nodes_lost  # called on the loop, before the plan is written
        self.metrics_url: str | None = None
        self.gateway_url: str | None = None
        self._metrics_server: HTTPServer | None = None
        self.gateway: Gateway | GatewayProcesses | None = None
        self._etcd_ok = False
        self._watches: list[PrefixWatch] = []
        self._status_at = 0.0
        self._pruned_at = 0  # the released generation this daemon last pruned at, as leader

    # -- workers: what their watchers see goes to the coordinator ---------------------------

    def _make_supervisor(self) -> Supervisor:
        cfg, w = self.cfg, self.cfg.worker
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        address = channel_address(cfg.state_dir, cfg.node)
        self.channel = ChannelServer(address, self._on_channel_message)
        command = WorkerCommand.from_config(cfg, address)
        env = {API_KEY_ENV: cfg.gateway.api_key} if cfg.gateway.api_key else {}
        if cfg.etcd.password:  # its own etcd session; never on a command line
            env[ETCD_PASSWORD_ENV] = cfg.etcd.password
        return Supervisor(command, cfg.state_dir / "logs", self._on_worker_exit, w.restart_budget,
                          w.restart_window.total_seconds(), env=env, spares=cfg.layout.spares,
                          channel=self.channel, seat_params=command.seat_params, standby=w.standby)

    def _on_channel_message(self, peer: Peer, msg: dict) -> None:
        if msg.get("op") == msgs.HELLO:
            self.log.info("rallyd.worker_connected", pid=peer.pid, role=peer.role, local_rank=peer.local_rank)
        elif msg.get("op") == msgs.BEAT:
            self.metrics.beat(peer, msg.get("counts"))

    def _on_worker_exit(self, worker: WorkerProcess, code: int) -> None:
        """A worker died (its watcher thread): recorded with the generation it was in; the loop,
        woken at once, orders the abort and replaces the seat."""
        if worker.local_rank is not None:
            self.coordinator.observe(WorkerExited(self.generation, worker.local_rank, worker.pid, code))

    def _watch_gpus(self) -> None:
        """Poll NVML once a second; a GPU newly unhealthy is recorded (the coordinator leaves its
        seat out and kills its worker)."""
        assert self.mechanics.gpu_health is not None
        while not self.stopping.wait(1.0):
            for gpu, why in self.mechanics.gpu_health.check().items():
                self.coordinator.observe(GpuUnhealthy(gpu, why))

    # -- joining ----------------------------------------------------------------------------

    def join(self) -> None:
        """Join the rendezvous, retrying an unreachable etcd until ``etcd.retry_deadline``.

        Raises:
            EtcdUnavailable: etcd did not answer in time (the message lists the endpoints tried).
        """
        try:
            self.rendezvous.join()
        except EtcdUnavailable as exc:
            endpoints = ",".join(self.cfg.etcd.endpoints)
            raise EtcdUnavailable(
                f"etcd unreachable at {endpoints} for {self.cfg.etcd.retry_deadline.total_seconds():g}s "
                f"({exc})") from None
        if self.rendezvous.inherited is not None:  # handled by the first cycle
            self.coordinator.observe(PredecessorLost(self.rendezvous.inherited))
        self._follow(self.keys.diagnoses, DiagnosisWritten, "rallyd-diagnoses")
        self._follow(self.keys.events, EventWritten, "rallyd-events")
        self._follow(self.keys.kills_of(self.cfg.node), KillOrdered, "rallyd-drills")
        if self.supervisor is not None:
            self.supervisor.fill_spares()
            self.supervisor.fill_standby()
            if self.cfg.layout.node_gpus() > 0 and (nvml := load_nvml()) is not None:
                self.mechanics.gpu_health = GpuHealth(self.cfg.layout.node_gpus(), nvml)
                self.log.info("rallyd.gpu_health_on", gpus=self.cfg.layout.node_gpus())
                threading.Thread(target=self._watch_gpus, name="rallyd-gpu-health", daemon=True).start()
            elif self.cfg.layout.node_gpus() > 0:
                self.log.warning("rallyd.no_gpu_health", why="nvidia-ml-py not installed or NVML failed")
        self.notify.send(READY=1, STATUS=f"joined cluster {self.cfg.cluster}")

    def _follow(self, prefix: str, observation: Callable[[str, bytes], Observation], name: str) -> None:
        """Watch ``prefix`` from now on (what is there is not replayed); each put is recorded for
        the coordinator as ``observation(key, value)``."""
        _, rev = self.client.count_prefix(prefix)
        watch = self.client.watch_prefix(prefix, rev + 1)
        self._watches.append(watch)

        def loop() -> None:
            while (e := watch.get()) is not None and e is not _CLOSED:
                if e.kind == "put":
                    self.coordinator.observe(observation(e.key, e.value))

        threading.Thread(target=loop, name=name, daemon=True).start()

    def node_status(self) -> dict[str, Any]:
        """What this daemon knows of itself and its workers (``status/nodes/<node>``)."""
        plan = self.generation
        ranks = {s.local_rank: s.rank for s in plan.ranks_on(self.cfg.node)} if plan else {}
        workers = []
        if self.supervisor is not None:
            now = time.monotonic()
            for lr, w in sorted(self.supervisor.alive().items()):
                peer = self.channel.peers.get(w.pid) if self.channel else None
                beat = peer.last if peer else {}
                workers.append({"local_rank": lr, "rank": ranks.get(lr), "pid": w.pid, "process": w.state(),
                                "state": beat.get("state", "starting"), "gen": beat.get("gen"),
                                "in_flight": beat.get("in_flight", 0), "waiting": beat.get("waiting", 0),
                                "driver": beat.get("driver", False), "api": beat.get("api"),
                                "role": beat.get("role", "colocated"), "counts": beat.get("counts", {}),
                                "beat_age": round(now - peer.last_seen, 3) if peer else None})
        sup = self.supervisor
        return {"node": self.cfg.node, "host": self.rendezvous.record.host, "pid": os.getpid(), "time": time.time(),
                "role": "leader" if self.rendezvous.is_leader else "member", "gen": plan.gen if plan else 0,
                "gpus": self.rendezvous.record.gpus, "slots": self.rendezvous.record.slots, "workers": workers,
                "spares": len(sup.spares) if sup else 0, "spares_ready": 1 if sup and sup.ready_spare() else 0,
                "restarts": self.coordinator.restarts_used() if sup else 0,
                "bad_seats": self.coordinator.out_seats.reasons(),
                "gpu_health": "nvml" if self.mechanics.gpu_health else "unchecked", "metrics": self.metrics_url,
                "gateway": self.gateway_url,
                "gateway_processes": self.gateway.status() if isinstance(self.gateway, GatewayProcesses) else None}

    def _publish_status(self) -> None:
        if time.monotonic() - self._status_at < 1.0 or self.rendezvous.lease is None:
            return
        self._status_at = time.monotonic()
        try:
            self.client.put(self.keys.node_status_of(self.cfg.node), json.dumps(self.node_status()),
                            lease=self.rendezvous.lease.id)
        except RallypointError as exc:
            self.log.debug("rallyd.status_unpublished", error=str(exc))

    def _on_release(self, plan: Plan) -> None:
        self.generation = plan
        mine = plan.ranks_on(self.cfg.node)
        if self.supervisor is not None:
            for slot in mine:
                self.supervisor.ensure(slot.local_rank, after_gen=plan.gen - 1)
            alive = self.supervisor.alive()
            for lr in set(alive) - {s.local_rank for s in mine}:
                self.supervisor.retire(lr)  # this seat has no rank in the new layout
        self.log.info("rallyd.generation_released", gen=plan.gen, world_size=plan.world_size,
                      tp=plan.tp, pp=plan.pp, dp=plan.dp, reason=plan.reason,
                      ranks=[r.rank for r in mine],
                      layout={r.rank: f"{r.node}/{r.local_rank}" for r in plan.ranks})
        if self.rendezvous.is_leader and plan.gen >= self._pruned_at + PRUNE_EVERY:
            self._prune(plan.gen)

    def _prune(self, released_gen: int) -> None:
        """As leader, delete the generations before the window (``recovery.retention``), so etcd
        holds a window of history rather than all of it. A failure is retried at the next release."""
        try:
            counts = prune_history(self.client, self.keys, released_gen, keep=self.cfg.rendezvous.keep_generations)
        except EtcdError as exc:
            self.log.warning("leader.prune_failed", gen=released_gen, error=str(exc))
            return
        self._pruned_at = released_gen
        if counts:
            self.log.info("leader.pruned", gen=released_gen,
                          before_gen=keep_from(released_gen, self.cfg.rendezvous.keep_generations),
                          deleted=sum(counts.values()), **counts)

    # -- the loop ---------------------------------------------------------------------------

    def run_cycle(self) -> str:
        """One loop step: the rendezvous's (which first waits for etcd changes, or for a wake
        when something was observed), then the recovery coordinator's; returns what it did."""
        try:
            said = self.rendezvous.run_cycle()
            self._etcd_ok = True
        except EtcdUnavailable as exc:
            self._etcd_ok = False
            gen = self.generation.gen if self.generation else 0
            said = f"etcd unreachable, keeping gen {gen} ({exc})"
            self.coordinator.inbox.wait(0.2)  # not a busy loop, but an observation ends the wait
        except (EtcdError, RallypointError) as exc:
            self._etcd_ok = not isinstance(exc, EtcdError)
            said = f"cycle failed: {exc}"
            self.coordinator.inbox.wait(0.2)
        recovered = self.coordinator.run_cycle()  # fail-static too: its etcd writes log their errors
        if recovered != IDLE:
            said = recovered if said.startswith("idle") else f"{said}; {recovered}"
        self._publish_status()
        role = "leader" if self.rendezvous.is_leader else "member"
        gen = self.generation.gen if self.generation else 0
        self.notify.send(WATCHDOG=1, STATUS=f"gen {gen}, {role}, {self.machine.phase}")
        return said

    def run(self) -> int:
        """Join and loop until SIGTERM/SIGINT; return the process exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self.serve_metrics()
            self.serve_gateway()
        except RallypointError as exc:
            self.log.error("rallyd.listen_failed", error=str(exc))
            return 1
        try:
            self.join()
        except RallypointError as exc:
            self.log.error("rallyd.join_failed", error=str(exc))
            return 1
        last = ""
        while not self.stopping.is_set():
            try:
                said = self.run_cycle()
            except Exception:
                self.log.exception("rallyd.bug", said=BUG)
                said = BUG
                time.sleep(0.5)
            if said != last and not (said.startswith("idle") and last.startswith("idle")):
                self.log.info("rallyd.cycle", said=said)
            last = said
        self.shutdown()
        return 0

    def serve_metrics(self) -> None:
        """Start ``/metrics`` (before joining, so an etcd outage at start shows there too).

        Raises:
            RallypointError: the address cannot be bound (port taken, no such interface).
        """
        m = self.cfg.metrics
        if m.enabled is False:
            return
        try:
            self._metrics_server = self.metrics.serve(m.host, m.port)
        except OSError as exc:
            raise RallypointError(f"[metrics] cannot listen on {m.host}:{m.port}: {exc.strerror or exc}") from None
        self.metrics_url = self._advertise("metrics", m.host, self._metrics_server.server_port, "/metrics")

    def _advertise(self, name: str, host: str, port: int, path: str = "") -> str:
        """The URL peers reach a listener at; written to ``<state_dir>/<name>.url`` and logged."""
        shown = self.cfg.address if host in ("0.0.0.0", "::") else host
        url = f"http://{shown}:{port}{path}"
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.state_dir / f"{name}.url").write_text(url + "\n")
        self.log.info(f"rallyd.{name}_serving", url=url)
        return url

    def serve_gateway(self) -> None:
        """Start the completions gateway (``[gateway]``): on a thread, or as processes sharing its port.

        Raises:
            RallypointError: the address cannot be bound.
        """
        g = self.cfg.gateway
        if g.enabled is False:
            return
        model = served_model_name(self.cfg.worker.model or "rallypoint")
        count = g.process_count(os.cpu_count())
        # The processes' routes are compared every 5 ms whether or not requests come: the other
        # nodes' statuses (published once a second) are re-read every 0.5 s, not at each look.
        routes = DriverRoutes(self.client, self.keys, self.cfg.node, self.node_status, refresh=0.5 if count else 0.2)
        try:
            if count:
                self.gateway = GatewayProcesses(
                    g.host, g.port, count, routes, g.resume_timeout.total_seconds(), model=model, api_key=g.api_key,
                    on_request=self.metrics.gateway_request, on_resume=self.metrics.gateway_resumed,
                    title=f"rallypoint gateway (cluster {self.cfg.cluster}, node {self.cfg.node})",
                    log_level=self.cfg.log.level, shared_socket=g.accept == "shared").start()
            else:
                self.gateway = Gateway(g.host, g.port, routes, g.resume_timeout.total_seconds(), model=model,
                                       api_key=g.api_key, on_request=self.metrics.gateway_request,
                                       on_resume=self.metrics.gateway_resumed).serve_in_thread()
        except OSError as exc:
            raise RallypointError(f"[gateway] cannot listen on {g.host}:{g.port}: {exc.strerror or exc}") from None
        self.gateway_url = self._advertise("gateway", g.host, self.gateway.port)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    # -- leaving ----------------------------------------------------------------------------

    def drain(self) -> str:
        """Stop admitting requests on this node's replicas and wait (up to ``drain_timeout``) until
        the requests in flight have finished; returns what happened."""
        plan = self.generation
        mine = plan.ranks_on(self.cfg.node) if plan is not None else []
        if plan is None or not mine or self.supervisor is None:
            return "nothing to drain"
        replicas = plan.replicas_on(self.cfg.node)
        timeout = self.cfg.worker.drain_timeout.total_seconds()
        t0 = time.monotonic()
        try:
            lease = self.rendezvous.lease.id if self.rendezvous.lease else None
            self.client.put(self.keys.draining_of(self.cfg.node), json.dumps({"deadline": time.time() + timeout}),
                            lease=lease)  # goes with our lease when we leave
        except RallypointError as exc:
            return f"could not announce the drain ({exc}); leaving without it"
        self.events.emit(plan.gen, ev.DRAINING, replicas=replicas, timeout=timeout)
        self.log.info("rallyd.draining", gen=plan.gen, replicas=replicas, timeout=timeout)
        done = wait_drained(self.client, self.keys, plan.gen, replicas, timeout, tick=self._off_loop_tick)
        took = time.monotonic() - t0
        left = sorted(set(replicas) - done)
        self.events.emit(plan.gen, ev.DRAINED, replicas=replicas, unfinished=left, seconds=round(took, 3))
        self.log.info("rallyd.drained", gen=plan.gen, seconds=round(took, 3), unfinished=left)
        return (f"drained replica(s) {replicas} in {took:.2f}s" if not left
                else f"drain deadline {timeout:g}s passed with replica(s) {left} still busy")

    def _off_loop_tick(self) -> None:
        """While the loop no longer runs (draining, leaving): pet the watchdog, and let the
        coordinator act on what was observed (a worker dying meanwhile still has its abort ordered)."""
        self.notify.send(WATCHDOG=1)
        said = self.coordinator.run_cycle()
        if said != IDLE:
            self.log.info("rallyd.cycle", said=said)

    def shutdown(self) -> None:
        """Drain, stop the workers, and leave the rendezvous cleanly so peers re-plan at once."""
        self.notify.send(STOPPING=1, STATUS="draining")
        try:
            said = self.drain()
            self._off_loop_tick()
        except Exception:
            self.log.exception("rallyd.bug", said=BUG)
            said = BUG
        self.log.info("rallyd.cycle", said=said)
        for w in self._watches:
            w.close()
            w.events.put(_CLOSED)  # ends its _follow thread
        if self.supervisor is not None:
            self.supervisor.stop_all()
        try:
            self.rendezvous.leave()
        except RallypointError as exc:
            self.log.warning("rallyd.leave_failed", error=str(exc))
        self.events.close()
        if self.channel is not None:
            self.channel.close()
        if self.gateway is not None:
            self.gateway.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.client.close()
        self.log.info("rallyd.stopped")

