"""rallyd's main loop: join the rendezvous, then cycle, saying what each cycle did.

At this stage the daemon rendezvouses and reports every released plan; worker supervision and
recovery plug into ``_on_release`` and ``run_cycle``. The loop is fail-static: an etcd outage is
logged and waited out, never a reason to tear the current generation down.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

from rallypoint.daemon.config import Config
from rallypoint.daemon.sd_notify import Notifier
from rallypoint.daemon.supervisor import Supervisor, WorkerProcess, worker_argv
from rallypoint.errors import EtcdError, EtcdUnavailable, RallypointError
from rallypoint.log import get_logger
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
        self.rendezvous = Rendezvous(self.client, settings, record, on_release=self._on_release)
        self.stopping = threading.Event()
        self.generation: Plan | None = None
        self.supervisor = self._make_supervisor() if cfg.worker.model else None
        self.degraded: str | None = None
        self._diagnoses = None

    def _make_supervisor(self) -> Supervisor:
        cfg = self.cfg
        w = cfg.worker
        device = "cuda" if cfg.layout.node_gpus() > 0 else "cpu"
        argv = worker_argv(cfg.cluster, ",".join(cfg.etcd.endpoints), cfg.node, str(w.model), device, w.dtype,
                           w.max_batch, w.max_seq, w.api_host, w.api_port,
                           cfg.collectives.deadline_floor.total_seconds(), cfg.state_dir)
        return Supervisor(argv, cfg.state_dir / "logs", self._on_worker_exit, w.restart_budget,
                          w.restart_window.total_seconds())

    def _on_worker_exit(self, worker: WorkerProcess, code: int) -> None:
        """A worker died (watcher thread): order the abort, ask for the next plan, restart it in place."""
        from rallypoint.worker.control import order_abort

        plan = self.generation
        if plan is None:
            return
        seat = [s for s in plan.ranks if s.node == self.cfg.node and s.local_rank == worker.local_rank]
        rank = seat[0].rank if seat else -1
        reason = f"rank {rank} ({self.cfg.node}/{worker.local_rank}, pid {worker.pid}) exited with code {code}"
        try:
            order_abort(self.client, self.rendezvous.keys, plan.gen, [rank] if rank >= 0 else [], reason)
        except RallypointError as exc:
            self.log.error("rallyd.abort_order_failed", gen=plan.gen, error=str(exc))
        # Start the replacement before asking for the next plan, so the plan finds it starting.
        if self.supervisor is not None and self.supervisor.may_restart():
            self.supervisor.ensure(worker.local_rank, after_gen=plan.gen)
        else:
            self.degraded = f"seat {self.cfg.node}/{worker.local_rank} left down: restart budget spent"
            self.log.error("rallyd.degraded", gen=plan.gen, why=self.degraded)
        try:
            self.rendezvous.request_replan(plan.gen, reason + "; restarted in place")
        except RallypointError as exc:
            self.log.error("rallyd.replan_request_failed", gen=plan.gen, error=str(exc))

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
        if self.supervisor is not None:
            prefix = self.rendezvous.keys.root + "status/diagnosis/"
            _, rev = self.client.get_prefix(prefix)
            self._diagnoses = self.client.watch_prefix(prefix, rev + 1)
            threading.Thread(target=self._follow_diagnoses, name="rallyd-diagnoses", daemon=True).start()
        self.notify.send(READY=1, STATUS=f"joined cluster {self.cfg.cluster}")

    def _follow_diagnoses(self) -> None:
        """A peer's watchdog named one of our workers stuck: kill it, so the exit path (abort
        order, re-plan, restart in place) takes over. ``dead`` and ``slow`` are only logged."""
        import json

        assert self._diagnoses is not None
        while (ev := self._diagnoses.get()) is not None:
            if ev.kind != "put":
                continue
            try:
                d = json.loads(ev.value)
                suspects = [s for s in d["suspects"] if s["seat"].split("/")[0] == self.cfg.node]
            except (ValueError, KeyError, TypeError):
                self.log.error("rallyd.malformed_diagnosis", key=ev.key)
                continue
            for s in suspects:
                local = int(s["seat"].split("/")[1])
                worker = self.supervisor.alive().get(local) if self.supervisor else None
                self.log.warning("rallyd.suspect_named", gen=d.get("gen"), group=d.get("group"), seat=s["seat"],
                                 kind=s["kind"], why=s.get("why"), pid=worker.pid if worker else None)
                # Only the process the verdict is about: a diagnosis may arrive after its seat was
                # already restarted, and must not kill the replacement. Dead ones exit by themselves.
                if worker is not None and s["kind"] == "stuck" and s.get("pid") == worker.pid:
                    try:
                        os.kill(worker.pid, signal.SIGKILL)  # reported by the watcher like any exit
                    except ProcessLookupError:
                        pass

    def _on_release(self, plan: Plan) -> None:
        self.generation = plan
        mine = plan.ranks_on(self.cfg.node)
        if self.supervisor is not None:
            for slot in mine:
                self.supervisor.ensure(slot.local_rank, after_gen=plan.gen - 1)
            alive = self.supervisor.alive()
            for lr in set(alive) - {s.local_rank for s in mine}:
                self.supervisor.stop(lr)  # this seat has no rank in the new layout
        self.log.info("rallyd.generation_released", gen=plan.gen, world_size=plan.world_size,
                      tp=plan.tp, pp=plan.pp, dp=plan.dp, reason=plan.reason,
                      ranks=[r.rank for r in mine],
                      layout={r.rank: f"{r.node}/{r.local_rank}" for r in plan.ranks})

    def run_cycle(self) -> str:
        """One loop step; returns what it did."""
        try:
            said = self.rendezvous.run_cycle()
        except EtcdUnavailable as exc:
            gen = self.generation.gen if self.generation else 0
            said = f"etcd unreachable, keeping gen {gen} ({exc})"
            self.stopping.wait(0.2)
        except (EtcdError, RallypointError) as exc:
            said = f"cycle failed: {exc}"
            self.stopping.wait(0.2)
        role = "leader" if self.rendezvous.is_leader else "member"
        gen = self.generation.gen if self.generation else 0
        self.notify.send(WATCHDOG=1, STATUS=f"gen {gen}, {role}")
        return said

    def run(self) -> int:
        """Join and loop until SIGTERM/SIGINT; return the process exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
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

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def shutdown(self) -> None:
        """Leave the rendezvous cleanly so peers re-plan without waiting for the lease."""
        self.notify.send(STOPPING=1, STATUS="leaving")
        if self._diagnoses is not None:
            self._diagnoses.close()
            self._diagnoses.events.put(None)  # type: ignore[arg-type]
        if self.supervisor is not None:
            self.supervisor.stop_all()
        try:
            self.rendezvous.leave()
        except RallypointError as exc:
            self.log.warning("rallyd.leave_failed", error=str(exc))
        self.client.close()
        self.log.info("rallyd.stopped")
