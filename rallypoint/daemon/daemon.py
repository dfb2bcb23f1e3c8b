"""rallyd's main loop: join the rendezvous, run this node's workers, carry out recoveries.

Each cycle says what it did (Patroni style). The loop is fail-static: an etcd outage is logged
and waited out, never a reason to tear the current generation down. A failed worker is handled on
its watcher thread, at once: the abort order goes out, the seat gets a replacement by the
strategy ``recovery.strategy`` chooses (warm spare, cold restart, or left down so the leader
shrinks), and the next plan is asked for. Every step is also written as a recovery event.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from types import FrameType

from rallypoint.api import API_KEY_ENV, served_model_name
from rallypoint.daemon.channel import ChannelServer, Peer, channel_address
from rallypoint.daemon.config import Config
from rallypoint.daemon.gpu_health import GpuHealth, load_nvml
from rallypoint.daemon.metrics import DaemonMetrics
from rallypoint.daemon.sd_notify import Notifier
from rallypoint.daemon.seats import OutSeats
from rallypoint.daemon.supervisor import Supervisor, WorkerCommand, WorkerProcess
from rallypoint.errors import EtcdError, EtcdUnavailable, MalformedRecord, RallypointError
from rallypoint.gateway.routes import DriverRoutes
from rallypoint.gateway.server import Gateway
from rallypoint.log import get_logger
from rallypoint.protocol import channel as msgs
from rallypoint.protocol import exit_codes
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.protocol.orders import order_abort, wait_drained
from rallypoint.recovery import events as ev
from rallypoint.recovery.events import Event, EventLog
from rallypoint.recovery.machine import RecoveryMachine
from rallypoint.recovery.retention import PRUNE_EVERY, keep_from, prune_history
from rallypoint.recovery.strategy import RESTART, SHRINK, SPARE, choose
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.rendezvous.records import ClusterSpec, Plan
from rallypoint.rendezvous.rendezvous import Rendezvous, RendezvousSettings, local_record

BUG = "unexpected error in the loop, please report it as a BUG"


def cluster_spec(cfg: Config) -> ClusterSpec:
    """The layout this daemon proposes for its cluster."""
    return ClusterSpec(tp=cfg.layout.tp, pp=cfg.layout.pp, dp=cfg.layout.dp,
                       min_nodes=cfg.rendezvous.min_nodes, max_nodes=cfg.rendezvous.max_nodes)


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
        rv = cfg.rendezvous
        settings = RendezvousSettings(
            cluster=cfg.cluster, node=cfg.node, spec=cluster_spec(cfg),
            lease_ttl=rv.lease_ttl.total_seconds(), last_call=rv.last_call.total_seconds(),
            idle_wait=min(0.2, rv.heartbeat.total_seconds()))
        record = local_record(cfg.node, cfg.address, cfg.layout.node_gpus(), cfg.layout.node_slots())
        self.events = EventLog(self.client, ClusterKeys(cfg.cluster), by=cfg.node)
        self.rendezvous = Rendezvous(self.client, settings, record, on_release=self._on_release,
                                     on_event=self.events.emit, on_lost=self._nodes_lost)
        self.keys = self.rendezvous.keys
        self.stopping = threading.Event()
        self.generation: Plan | None = None
        self.channel: ChannelServer | None = None
        self.supervisor = self._make_supervisor() if cfg.worker.model or cfg.worker.workload != "serve" else None
        self.out_seats = OutSeats(cfg.worker.model)
        self.machine = RecoveryMachine()
        self.metrics = DaemonMetrics(cfg.cluster, cfg.node, self.machine,
                                     lambda: {**self.node_status(), "etcd_ok": self._etcd_ok})
        self.metrics_url: str | None = None
        self.gateway_url: str | None = None
        self._metrics_server = None
        self.gateway: Gateway | None = None
        self._etcd_ok = False
        self.gpu_health: GpuHealth | None = None
        self._watches: list = []
        self._status_at = 0.0
        self._last_cycle = time.monotonic()
        self._pruned_at = 0  # the released generation this daemon last pruned at, as leader

    # -- workers ----------------------------------------------------------------------------

    def _make_supervisor(self) -> Supervisor:
        cfg, w = self.cfg, self.cfg.worker
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        address = channel_address(cfg.state_dir, cfg.node)
        self.channel = ChannelServer(address, self._on_channel_message)
        command = WorkerCommand.from_config(cfg, address)
        env = {API_KEY_ENV: cfg.gateway.api_key} if cfg.gateway.api_key else None
        return Supervisor(command, cfg.state_dir / "logs", self._on_worker_exit, w.restart_budget,
                          w.restart_window.total_seconds(), env=env, spares=cfg.layout.spares,
                          channel=self.channel, seat_params=command.seat_params)

    def _on_channel_message(self, peer: Peer, msg: dict) -> None:
        if msg.get("op") == msgs.HELLO:
            self.log.info("rallyd.worker_connected", pid=peer.pid, role=peer.role, local_rank=peer.local_rank)
        elif msg.get("op") == msgs.BEAT:
            self.metrics.beat(peer, msg.get("counts"))

    def _seat_rank(self, plan: Plan, local_rank: int | None) -> int:
        seat = [s for s in plan.ranks if s.node == self.cfg.node and s.local_rank == local_rank]
        return seat[0].rank if seat else -1

    def _on_worker_exit(self, worker: WorkerProcess, code: int) -> None:
        """A worker died (watcher thread): order the abort, replace the seat, ask for the next plan."""
        plan = self.generation
        if plan is None or worker.local_rank is None:
            return
        lr = worker.local_rank
        rank = self._seat_rank(plan, lr)
        reason = f"rank {rank} ({self.cfg.node}/{lr}, pid {worker.pid}) exited with code {exit_codes.describe(code)}"
        self.events.emit(plan.gen, ev.RANK_FAILED, rank=rank, local_rank=lr, pid=worker.pid, code=code, reason=reason)
        self._order_abort(plan.gen, [rank] if rank >= 0 else [], reason)
        if self.stopping.is_set() or self.supervisor is None:
            return
        gpu_bad = self.gpu_health.bad.get(lr) if self.gpu_health else None
        out_already = self.out_seats.why(lr)  # a plan raced the seat's removal: it keeps its way back
        bad_checkpoint = "exit code 3" if code == exit_codes.BAD_CHECKPOINT else ""
        decision = choose(gpu_healthy=not gpu_bad, gpu_problem=gpu_bad or "",
                          budget_left=bool(bad_checkpoint or out_already) or self.supervisor.may_restart(),
                          spare_ready=self.supervisor.ready_spare() is not None, checkpoint_error=bad_checkpoint,
                          seat_out=out_already)
        strategy = decision.strategy
        # The replacement starts before the re-plan request, so the plan finds it starting.
        if strategy == SPARE and self.supervisor.adopt_spare(lr, after_gen=plan.gen) is None:
            strategy = RESTART  # the spare went away between the choice and the hand-over
        if strategy == RESTART:
            self.supervisor.ensure(lr, after_gen=plan.gen)
        self.log.warning("rallyd.recovering", gen=plan.gen, rank=rank, local_rank=lr, strategy=strategy,
                         why=decision.reason)
        self.metrics.replaced(strategy)
        if strategy == SHRINK:
            # Left out of the placement (the record changes first, so the re-plan sees it). The
            # generation lost a rank either way: the request stands until a plan fits, so a layout
            # that cannot shrink is re-planned when the seat comes back.
            if gpu_bad or bad_checkpoint or not out_already:
                window = None if gpu_bad or bad_checkpoint else self.cfg.worker.restart_window.total_seconds()
                self._mark_bad(lr, decision.reason, gen=plan.gen, retry_after=window,
                               until_checkpoint_changes=bad_checkpoint != "")
        else:
            self.events.emit(plan.gen, ev.REPLACEMENT, rank=rank, local_rank=lr, strategy=strategy,
                             why=decision.reason)
        try:
            how = {SPARE: "a warm spare took the seat", RESTART: "restarted in place"}.get(strategy, "seat left out")
            self.rendezvous.request_replan(plan.gen, f"{reason}; {how}")
        except RallypointError as exc:
            self.log.error("rallyd.replan_request_failed", gen=plan.gen, error=str(exc))

    def _nodes_lost(self, plan: Plan, nodes: list[str]) -> None:
        """(Leader) ``nodes`` of ``plan`` are gone: abort the groups that contain their ranks."""
        ranks = [s.rank for s in plan.ranks if s.node in nodes]
        if not ranks:
            return
        self._order_abort(plan.gen, ranks, f"node(s) {','.join(nodes)} left: rank(s) {ranks} of gen {plan.gen} gone")

    def _order_abort(self, gen: int, ranks: list[int], reason: str) -> None:
        """Tell generation ``gen``'s workers to abort the groups holding ``ranks``, and record it."""
        try:
            order_abort(self.client, self.keys, gen, ranks, reason)
            self.events.emit(gen, ev.ABORT_ORDERED, ranks=ranks, reason=reason)
        except RallypointError as exc:
            self.log.error("rallyd.abort_order_failed", gen=gen, error=str(exc))

    def _mark_bad(self, local_rank: int, why: str, retry_after: float | None, gen: int,
                  until_checkpoint_changes: bool = False) -> None:
        """Take seat ``local_rank`` out of placement: for ``retry_after`` seconds, until the
        checkpoint's files change, or (neither) until rallyd restarts."""
        self.out_seats.take_out(local_rank, why, retry_after, until_checkpoint_changes)
        self.log.error("rallyd.seat_bad", local_rank=local_rank, why=why, retry_after=retry_after,
                       until_checkpoint_changes=until_checkpoint_changes)
        self.events.emit(gen, ev.SEAT_BAD, local_rank=local_rank, reason=why, retry_after=retry_after)
        self._publish_seats()

    def _publish_seats(self) -> None:
        bad = self.out_seats.local_ranks()
        rec = self.rendezvous.record
        if rec.bad_seats == bad:
            return
        try:
            self.rendezvous.update_record(replace(rec, bad_seats=bad))
        except RallypointError as exc:
            self.log.error("rallyd.record_update_failed", error=str(exc))

    def _retry_bad_seats(self) -> str:
        back = self.out_seats.bring_back_due()
        if not back:
            return ""
        for lr, what in back:
            self.log.info("rallyd.seat_back", local_rank=lr, because=what)
        self._publish_seats()
        return "; ".join(f"seat {lr} back in placement: {what}" for lr, what in back)

    def _check_stalls(self) -> str:
        """Kill a seat's worker whose heartbeats stopped (the exit path replaces it): a frozen
        process between two collectives trips no peer's deadline."""
        limit = self.cfg.worker.stall_timeout.total_seconds()
        now = time.monotonic()
        gap, self._last_cycle = now - self._last_cycle, now
        if not limit or self.supervisor is None or gap > limit / 2:
            return ""  # off, or this daemon was not running itself: its view of the beats is stale
        for lr, w in self.supervisor.alive().items():
            peer = self.channel.peers.get(w.pid) if self.channel else None
            if peer is None or peer.beat_at is None or now - peer.beat_at <= limit:
                continue  # not beating yet (starting, or a spare just adopted), or beating
            state = w.state()
            if state in ("zombie", "gone"):
                continue  # already killed (a diagnosis got there first): the exit path has it
            silent = now - peer.beat_at
            plan = self.generation
            why = f"no heartbeat for {silent:.1f}s (process {state})"
            self.log.warning("rallyd.worker_stalled", local_rank=lr, pid=w.pid, silent=round(silent, 2),
                             process=state)
            if plan is not None:
                self.events.emit(plan.gen, ev.SUSPECT_NAMED, seat=f"{self.cfg.node}/{lr}", verdict="stuck",
                                 why=why, group="heartbeat")
            try:
                os.kill(w.pid, signal.SIGKILL)  # reported by the watcher like any exit
            except ProcessLookupError:
                pass
            return f"killed worker {lr} (pid {w.pid}): {why}"
        return ""

    def _check_gpus(self) -> None:
        """Poll NVML once a second; an unhealthy GPU's worker is killed and its seat left out."""
        while not self.stopping.wait(1.0):
            assert self.gpu_health is not None
            for gpu, why in self.gpu_health.check().items():
                gen = self.generation.gen if self.generation else 0
                self._mark_bad(gpu, f"GPU {gpu}: {why}", retry_after=None, gen=gen)
                w = self.supervisor.alive().get(gpu) if self.supervisor else None
                if w is not None:
                    os.kill(w.pid, signal.SIGKILL)  # the exit path follows, with SHRINK

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
        if self.rendezvous.inherited is not None:
            self._predecessor_lost(self.rendezvous.inherited)
        self._follow(self.keys.diagnoses, self._on_diagnosis, "rallyd-diagnoses")
        self._follow(self.keys.events, self._on_event, "rallyd-events")
        self._follow(self.keys.kills_of(self.cfg.node), self._on_kill_order, "rallyd-drills")
        if self.supervisor is not None:
            self.supervisor.fill_spares()
            if self.cfg.layout.node_gpus() > 0 and (nvml := load_nvml()) is not None:
                self.gpu_health = GpuHealth(self.cfg.layout.node_gpus(), nvml)
                self.log.info("rallyd.gpu_health_on", gpus=self.cfg.layout.node_gpus())
                threading.Thread(target=self._check_gpus, name="rallyd-gpu-health", daemon=True).start()
            elif self.cfg.layout.node_gpus() > 0:
                self.log.warning("rallyd.no_gpu_health", why="nvidia-ml-py not installed or NVML failed")
        self.notify.send(READY=1, STATUS=f"joined cluster {self.cfg.cluster}")

    def _predecessor_lost(self, plan: Plan) -> None:
        """This daemon restarted (a crash, a reboot) before the cluster noticed it was gone: the
        ranks its predecessor ran in ``plan`` are dead. Say so as a rank failure would: abort
        their groups, start their replacements, and ask for the next plan."""
        mine = plan.ranks_on(self.cfg.node)
        ranks = [s.rank for s in mine]
        reason = f"rallyd on {self.cfg.node} restarted: its rank(s) {ranks} of gen {plan.gen} died with its predecessor"
        self.log.warning("rallyd.predecessor_lost", gen=plan.gen, ranks=ranks)
        for s in mine:
            self.events.emit(plan.gen, ev.RANK_FAILED, rank=s.rank, local_rank=s.local_rank, reason=reason)
        self._order_abort(plan.gen, ranks, reason)
        if self.supervisor is not None:
            for s in mine:  # booting while the leader re-plans
                self.supervisor.ensure(s.local_rank, after_gen=plan.gen)
        try:
            self.rendezvous.request_replan(plan.gen, reason)
        except RallypointError as exc:
            self.log.error("rallyd.replan_request_failed", gen=plan.gen, error=str(exc))

    def _follow(self, prefix: str, handle, name: str) -> None:
        _, rev = self.client.count_prefix(prefix)  # only the revision: what is there is not replayed
        watch = self.client.watch_prefix(prefix, rev + 1)
        self._watches.append(watch)

        def loop() -> None:
            while (e := watch.get()) is not None:
                if e.kind == "put":
                    try:
                        handle(e.key, e.value)
                    except Exception:
                        self.log.exception("rallyd.bug", said=BUG, key=e.key)

        threading.Thread(target=loop, name=name, daemon=True).start()

    def _on_diagnosis(self, key: str, value: bytes) -> None:
        """A peer's watchdog named one of our workers stuck: kill it, so the exit path (abort
        order, replacement, re-plan) takes over. ``dead`` and ``slow`` are only logged."""
        try:
            d = json.loads(value)
            suspects = [s for s in d["suspects"] if s["seat"].split("/")[0] == self.cfg.node]
        except (ValueError, KeyError, TypeError):
            self.log.error("rallyd.malformed_diagnosis", key=key)
            return
        if ClusterKeys.diagnosis_seat(key).split("/")[0] == self.cfg.node:  # written by one of our seats
            self.metrics.collective_tripped(str(d.get("group", "")), str(d.get("trigger", "")))
        for s in suspects:
            local = int(s["seat"].split("/")[1])
            worker = self.supervisor.alive().get(local) if self.supervisor else None
            self.log.warning("rallyd.suspect_named", gen=d.get("gen"), group=d.get("group"), seat=s["seat"],
                             kind=s["kind"], why=s.get("why"), pid=worker.pid if worker else None)
            self.events.emit(int(d.get("gen", 0)), ev.SUSPECT_NAMED, seat=s["seat"], verdict=s["kind"],
                             why=s.get("why"), group=d.get("group"))
            # Only the process the verdict is about: a diagnosis may arrive after its seat was
            # already restarted, and must not kill the replacement. Dead ones exit by themselves.
            if worker is not None and s["kind"] == "stuck" and s.get("pid") == worker.pid:
                try:
                    os.kill(worker.pid, signal.SIGKILL)  # reported by the watcher like any exit
                except ProcessLookupError:
                    pass

    def _on_kill_order(self, key: str, value: bytes) -> None:
        """``rallyctl kill``: send a signal to one of our workers (a drill), then clear the order."""
        try:
            local = int(key.rsplit("/", 1)[1])
            sig = signal.Signals[f"SIG{value.decode().upper().removeprefix('SIG')}"]
        except (ValueError, KeyError):
            self.log.error("rallyd.malformed_kill_order", key=key)
            return
        worker = self.supervisor.alive().get(local) if self.supervisor else None
        self.log.warning("rallyd.drill_kill", local_rank=local, signal=sig.name, pid=worker.pid if worker else None)
        if worker is not None:
            os.kill(worker.pid, sig)
        try:
            self.client.delete(key)
        except RallypointError:
            pass

    def node_status(self) -> dict:
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
                                "beat_age": round(now - peer.last_seen, 3) if peer else None})
        bad = self.out_seats.reasons()
        sup = self.supervisor
        return {"node": self.cfg.node, "host": self.rendezvous.record.host, "pid": os.getpid(), "time": time.time(),
                "role": "leader" if self.rendezvous.is_leader else "member", "gen": plan.gen if plan else 0,
                "gpus": self.rendezvous.record.gpus, "slots": self.rendezvous.record.slots, "workers": workers,
                "spares": len(sup.spares) if sup else 0, "spares_ready": 1 if sup and sup.ready_spare() else 0,
                "restarts": sup.restarts.budget - sup.restarts.left() if sup else 0, "bad_seats": bad,
                "gpu_health": "nvml" if self.gpu_health else "unchecked", "metrics": self.metrics_url,
                "gateway": self.gateway_url}

    def _publish_status(self) -> None:
        if time.monotonic() - self._status_at < 1.0 or self.rendezvous.lease is None:
            return
        self._status_at = time.monotonic()
        try:
            self.client.put(self.keys.node_status_of(self.cfg.node), json.dumps(self.node_status()),
                            lease=self.rendezvous.lease.id)
        except RallypointError as exc:
            self.log.debug("rallyd.status_unpublished", error=str(exc))

    def _on_event(self, key: str, value: bytes) -> None:
        """Every daemon folds the events; the leader publishes the phase in ``status/recovery``."""
        try:
            t = self.machine.apply(Event.from_json(key, value))
        except MalformedRecord as exc:
            self.log.error("rallyd.malformed_event", key=key, error=str(exc))
            return
        if t is not None:
            self.metrics.transition(t)
        if t is None or not self.rendezvous.is_leader:
            return
        self.log.info("rallyd.recovery_phase", phase=t.phase, previous=t.previous, gen=t.gen, cause=t.event.kind)
        try:
            self.client.put(self.keys.recovery, json.dumps(self.machine.state()))
        except EtcdError as exc:
            self.log.warning("rallyd.recovery_unpublished", error=str(exc))

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
            counts = prune_history(self.client, self.keys, released_gen)
        except EtcdError as exc:
            self.log.warning("leader.prune_failed", gen=released_gen, error=str(exc))
            return
        self._pruned_at = released_gen
        if counts:
            self.log.info("leader.pruned", gen=released_gen, before_gen=keep_from(released_gen),
                          deleted=sum(counts.values()), **counts)

    # -- the loop ---------------------------------------------------------------------------

    def run_cycle(self) -> str:
        """One loop step; returns what it did."""
        try:
            stalled = self._check_stalls()
            said = self.rendezvous.run_cycle()
            self._publish_status()
            retried = self._retry_bad_seats()
            said = "; ".join(x for x in (stalled, said, retried) if x)
            self._etcd_ok = True
        except EtcdUnavailable as exc:
            self._etcd_ok = False
            gen = self.generation.gen if self.generation else 0
            said = f"etcd unreachable, keeping gen {gen} ({exc})"
            self.stopping.wait(0.2)
        except (EtcdError, RallypointError) as exc:
            self._etcd_ok = not isinstance(exc, EtcdError)
            said = f"cycle failed: {exc}"
            self.stopping.wait(0.2)
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
        """Start the completions gateway (``[gateway]``).

        Raises:
            RallypointError: the address cannot be bound.
        """
        g = self.cfg.gateway
        if g.enabled is False:
            return
        routes = DriverRoutes(self.client, self.keys, self.cfg.node, self.node_status)
        try:
            self.gateway = Gateway(g.host, g.port, routes, g.resume_timeout.total_seconds(),
                                   model=served_model_name(self.cfg.worker.model or "rallypoint"), api_key=g.api_key,
                                   on_request=self.metrics.gateway_request, on_resume=self.metrics.gateway_resumed)
        except OSError as exc:
            raise RallypointError(f"[gateway] cannot listen on {g.host}:{g.port}: {exc.strerror or exc}") from None
        self.gateway.serve_in_thread()
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
        done = wait_drained(self.client, self.keys, plan.gen, replicas, timeout,
                            tick=lambda: self.notify.send(WATCHDOG=1))
        took = time.monotonic() - t0
        left = sorted(set(replicas) - done)
        self.events.emit(plan.gen, ev.DRAINED, replicas=replicas, unfinished=left, seconds=round(took, 3))
        self.log.info("rallyd.drained", gen=plan.gen, seconds=round(took, 3), unfinished=left)
        return (f"drained replica(s) {replicas} in {took:.2f}s" if not left
                else f"drain deadline {timeout:g}s passed with replica(s) {left} still busy")

    def shutdown(self) -> None:
        """Drain, stop the workers, and leave the rendezvous cleanly so peers re-plan at once."""
        self.notify.send(STOPPING=1, STATUS="draining")
        try:
            said = self.drain()
        except Exception:
            self.log.exception("rallyd.bug", said=BUG)
            said = BUG
        self.log.info("rallyd.cycle", said=said)
        for w in self._watches:
            w.close()
            w.events.put(None)
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

