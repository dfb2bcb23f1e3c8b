"""rallyd's recovery coordinator: every recovery decision of a node, taken on the daemon's loop.

**Why one place, one thread.** A worker exits (seen by the supervisor's watcher thread), a peer's
watchdog names one of our seats stuck (an etcd watch), an operator orders a drill kill (another
watch), NVML reports a GPU gone (a poller): each used to act where it was seen, so two sightings
of one failure (the diagnosis, then the exit it causes) could race each other's choices. Now
whoever sees something only *records* it: ``RecoveryCoordinator.observe`` puts an observation in
a thread-safe ``Inbox`` (``recovery/inbox.py``). The daemon's loop calls ``run_cycle()`` once per
cycle; it takes what was recorded, in arrival order, decides and acts, and returns one sentence
saying what it did (Patroni's HA loop: "no recovery needed", "ordered abort of gen 4 rank(s) [1]:
...").

**Latency.** Recovery start time is a product metric (kill -> serving in 0.1-0.3 s), so recording
must not mean waiting for the next cycle: ``Inbox.put`` calls the loop's ``wake`` (rallyd's loop
blocks on its rendezvous queue between cycles, and the wake ends that wait), so an exit is
handled a few milliseconds after its watcher saw it.

**Policy, not mechanics** (TorchFT's split). Which way a failed seat comes back is
``recovery.strategy.choose``; this module adds the rest of the policy: whose groups to abort,
when a seat leaves placement and its way back, when a silent worker counts as frozen, and when a
restart is charged to the restart budget (only when a restart happens: a warm spare or a shrink
costs none). Everything it *does* goes through ``Mechanics`` (etcd orders, events, signals) and
``Seats`` (this node's processes), which the daemon implements and the unit tests fake. The
decisions themselves are pure functions (``judge_exit``, ``stalled``, ``parse_diagnosis``,
``parse_kill_order``, ``lost_ranks``).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from rallypoint.errors import MalformedRecord
from rallypoint.protocol import exit_codes
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.recovery import events as ev
from rallypoint.recovery.events import Event
from rallypoint.recovery.inbox import (
    DiagnosisWritten,
    EventWritten,
    GpuUnhealthy,
    Inbox,
    KillOrdered,
    Observation,
    PredecessorLost,
    WorkerExited,
)
from rallypoint.recovery.machine import RecoveryMachine, Transition
from rallypoint.recovery.strategy import RESTART, SHRINK, SPARE, Decision, RestartBudget, choose
from rallypoint.rendezvous.records import Plan

if TYPE_CHECKING:
    from structlog.stdlib import BoundLogger

    from rallypoint.daemon.seats import OutSeats

IDLE = "no recovery needed"
BUG = "unexpected error in the loop, please report it as a BUG"
HOW = {SPARE: "a warm spare took the seat", RESTART: "restarted in place", SHRINK: "seat left out"}


# -- what the coordinator acts through ---------------------------------------------------------


class Worker(Protocol):
    """One live worker process on a seat."""

    @property
    def pid(self) -> int: ...

    def state(self) -> str: ...


class Seats(Protocol):
    """This node's worker processes (``daemon.supervisor.Supervisor``)."""

    def alive(self) -> Mapping[int, Worker]: ...

    def ready_spare(self) -> object | None: ...

    def adopt_spare(self, local_rank: int, after_gen: int) -> object | None: ...

    def ensure(self, local_rank: int, after_gen: int = 0) -> object: ...


class Mechanics(Protocol):
    """The coordinator's hands and eyes outside the processes: etcd, events, signals, beats.

    Writes report failure in their return value or a log line, never by raising: a failed abort
    order must not keep the seat from its replacement.
    """

    def order_abort(self, gen: int, ranks: list[int], reason: str) -> bool: ...

    def request_replan(self, gen: int, reason: str) -> None: ...

    def emit(self, gen: int, kind: str, **detail: Any) -> None: ...

    def signal(self, pid: int, sig: int) -> bool: ...

    def publish_bad_seats(self, local_ranks: tuple[int, ...]) -> None: ...

    def publish_phase(self, state: dict[str, object]) -> None: ...

    def clear_kill_order(self, key: str) -> None: ...

    def is_leader(self) -> bool: ...

    def beat_at(self, pid: int) -> float | None: ...

    def beat_gen(self, pid: int) -> int | None: ...

    def gpu_problem(self, local_rank: int) -> str: ...


class RecoveryMetrics(Protocol):
    """The counters recovery moves (``daemon.metrics.DaemonMetrics``)."""

    def transition(self, t: Transition) -> None: ...

    def collective_tripped(self, group: str, trigger: str) -> None: ...

    def replaced(self, strategy: str) -> None: ...


@dataclass(frozen=True)
class Policy:
    """The settings the decisions depend on.

    Attributes:
        node: this node's id.
        stall_timeout: seconds without a heartbeat before a worker counts as frozen (0: off).
        restart_budget: cold restarts allowed per ``restart_window`` seconds, over the node.
        restart_window: seconds; also how long a seat past its budget stays out of placement.
        wedged_after: seconds a seat's worker may go on naming an older generation than the
            newest plan that gives it a rank (a group build blocked in the backend: gloo's
            connect to an unreachable peer does not end at the build timeout); 0: off.
    """

    node: str
    stall_timeout: float
    restart_budget: int
    restart_window: float
    wedged_after: float = 0.0  # seconds a seat's worker may stay in an older generation (0: off)


# -- the decisions (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class TakeOut:
    """A seat leaving placement: why, and its way back (neither: until rallyd restarts)."""

    why: str
    retry_after: float | None = None
    until_checkpoint_changes: bool = False


@dataclass(frozen=True)
class ExitVerdict:
    """What to do about a worker's exit: ``reason`` says what happened, ``decision`` how the seat
    comes back, ``take_out`` whether (and how) it leaves placement."""

    rank: int
    reason: str
    decision: Decision
    take_out: TakeOut | None = None


def seat_rank(plan: Plan, node: str, local_rank: int) -> int:
    """The rank ``plan`` gives seat ``node/local_rank`` (-1: none)."""
    seat = [s for s in plan.ranks if s.node == node and s.local_rank == local_rank]
    return seat[0].rank if seat else -1


def judge_exit(node: str, plan: Plan, local_rank: int, pid: int, code: int, *, gpu_problem: str, seat_out: str,
               budget_left: bool, spare_ready: bool, restart_window: float) -> ExitVerdict:
    """The verdict on seat ``local_rank``'s worker ``pid`` exiting with ``code`` in ``plan``.

    Args:
        gpu_problem: what NVML says is wrong with the seat's GPU ("" when healthy or unchecked).
        seat_out: why the seat was already out of placement ("" when it was not): a plan raced
            its removal, and it keeps its way back.
        budget_left: whether a cold restart would still fit the restart budget (asked, not spent).
        spare_ready: whether a warm spare is waiting.
        restart_window: how long a seat past its budget stays out.
    """
    rank = seat_rank(plan, node, local_rank)
    reason = f"rank {rank} ({node}/{local_rank}, pid {pid}) exited with code {exit_codes.describe(code)}"
    bad_checkpoint = "exit code 3" if code == exit_codes.BAD_CHECKPOINT else ""
    decision = choose(gpu_healthy=not gpu_problem, gpu_problem=gpu_problem, budget_left=budget_left,
                      spare_ready=spare_ready, checkpoint_error=bad_checkpoint, seat_out=seat_out)
    take_out = None
    if decision.strategy == SHRINK and (gpu_problem or bad_checkpoint or not seat_out):
        # An unhealthy GPU stays out until rallyd restarts, a bad checkpoint until its files
        # change, a spent budget for one window.
        window = None if gpu_problem or bad_checkpoint else restart_window
        take_out = TakeOut(decision.reason, window, until_checkpoint_changes=bool(bad_checkpoint))
    return ExitVerdict(rank, reason, decision, take_out)


def wedged(now: float, limit: float, plan_gen: int, beats: Mapping[int, tuple[int, int | None]],
           behind_since: dict[int, float]) -> list[tuple[int, int, int, float]]:
    """The seats whose workers have named an older generation than ``plan_gen`` for more than
    ``limit`` seconds: ``(local rank, pid, its generation, seconds behind)``.

    Args:
        beats: ``{local rank: (pid, generation its last heartbeat named, or None)}`` of the seats
            with a rank in generation ``plan_gen``.
        behind_since: pid -> when it was first seen behind; updated here (a pid caught up, or
            gone, is forgotten).
    """
    out = []
    behind = set()
    for lr, (pid, gen) in sorted(beats.items()):
        if gen is None or gen >= plan_gen:
            continue
        behind.add(pid)
        since = behind_since.setdefault(pid, now)
        if now - since > limit:
            out.append((lr, pid, gen, now - since))
    for pid in set(behind_since) - behind:
        del behind_since[pid]
    return out


def lost_ranks(plan: Plan, nodes: Iterable[str]) -> list[int]:
    """The ranks of ``plan`` on ``nodes``."""
    gone = set(nodes)
    return [s.rank for s in plan.ranks if s.node in gone]


def stalled(now: float, limit: float, beats: Mapping[int, tuple[int, float | None]]) -> list[tuple[int, int, float]]:
    """The seats silent for more than ``limit`` seconds: ``(local rank, pid, seconds silent)``.

    Args:
        beats: ``{local rank: (pid, time of its last heartbeat or None)}``; a worker with no
            beat yet (starting, or a spare just adopted) is never stalled.
    """
    out = []
    for lr, (pid, beat_at) in sorted(beats.items()):
        if beat_at is not None and now - beat_at > limit:
            out.append((lr, pid, now - beat_at))
    return out


@dataclass(frozen=True)
class Diagnosis:
    """A watchdog's diagnosis, as far as this node is concerned."""

    gen: int
    group: str
    trigger: str
    suspects: tuple[dict[str, Any], ...]  # those on this node: {"seat", "kind", "why", "pid"}
    by_our_seat: bool                     # one of this node's seats wrote it


def parse_diagnosis(node: str, key: str, value: bytes) -> Diagnosis:
    """Parse a diagnosis record for ``node``.

    Raises:
        MalformedRecord: the record is not a diagnosis.
    """
    try:
        d = json.loads(value)
        suspects = tuple(s for s in d["suspects"] if s["seat"].split("/")[0] == node)
        for s in suspects:
            int(s["seat"].split("/")[1])
        gen = int(d.get("gen", 0))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise MalformedRecord(key, f"not a diagnosis: {exc}") from None
    return Diagnosis(gen, str(d.get("group", "")), str(d.get("trigger", "")), suspects,
                     ClusterKeys.diagnosis_seat(key).split("/")[0] == node)


def parse_kill_order(key: str, value: bytes) -> tuple[int, signal.Signals]:
    """``control/kill/<node>/<local rank>`` = signal name: the seat and the signal.

    Raises:
        MalformedRecord: the key or the signal name is not understood.
    """
    try:
        local = int(key.rsplit("/", 1)[1])
        sig = signal.Signals[f"SIG{value.decode().upper().removeprefix('SIG')}"]
    except (ValueError, KeyError, IndexError, UnicodeDecodeError):
        raise MalformedRecord(key, "not a kill order") from None
    return local, sig


# -- the coordinator ---------------------------------------------------------------------------


class RecoveryCoordinator:
    """Decides and acts on this node's recovery observations, one loop cycle at a time.

    Args:
        policy: the settings the decisions depend on.
        mechanics: how it acts outside the processes.
        seats: this node's worker processes (None: this rallyd runs no workers).
        out_seats: the seats out of placement and their ways back.
        machine: the cluster's recovery phase, folded from the events.
        metrics: the counters recovery moves.
        current_plan: the generation this node runs now.
        stopping: set once rallyd is leaving (failed seats are then not replaced).
        log: rallyd's logger (event names stay ``rallyd.*``).
        wake: ends the loop's wait when an observation arrives.
        clock: ``time.monotonic`` (tests pass their own).
    """

    def __init__(self, policy: Policy, mechanics: Mechanics, seats: Seats | None, out_seats: OutSeats,
                 machine: RecoveryMachine, metrics: RecoveryMetrics, current_plan: Callable[[], Plan | None],
                 stopping: threading.Event, log: BoundLogger, wake: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.mechanics = mechanics
        self.seats = seats
        self.out_seats = out_seats
        self.machine = machine
        self.metrics = metrics
        self.current_plan = current_plan
        self.stopping = stopping
        self.log = log
        self.clock = clock
        self.inbox = Inbox(wake)
        self.restarts = RestartBudget(policy.restart_budget, policy.restart_window)
        self._restarts_lock = threading.Lock()  # status readers on other threads
        self._last_cycle = clock()
        self._behind_since: dict[int, float] = {}  # pid -> first seen in an older generation than the plan's
        self._asked_next_plan: set[tuple[int, str]] = set()  # (gen, seat) re-plans asked after a diagnosis
        self._said: list[str] = []  # what nodes_lost did, for this cycle's sentence

    def restarts_used(self) -> int:
        """Cold restarts charged to the budget in the current window (any thread)."""
        with self._restarts_lock:
            return self.restarts.budget - self.restarts.left(self.clock())

    def observe(self, obs: Observation) -> None:
        """Record ``obs`` for the next cycle and wake the loop (any thread; never blocks on etcd)."""
        self.inbox.put(obs)

    def run_cycle(self) -> str:
        """Decide and act on everything observed since the last cycle, then on what the clock
        brings (frozen workers, seats whose way back has come); returns what it did."""
        said, self._said = self._said, []
        for obs in self.inbox.take():
            try:
                said.append(self._handle(obs))
            except Exception:
                self.log.exception("rallyd.bug", said=BUG, observation=type(obs).__name__)
                said.append(BUG)
        said.append(self._check_stalls())
        said.append(self._check_wedged())
        said.append(self._retry_bad_seats())
        return "; ".join(s for s in said if s) or IDLE

    def _handle(self, obs: Observation) -> str:
        if isinstance(obs, WorkerExited):
            return self._worker_exited(obs)
        if isinstance(obs, DiagnosisWritten):
            return self._diagnosis(obs)
        if isinstance(obs, KillOrdered):
            return self._kill_order(obs)
        if isinstance(obs, EventWritten):
            return self._event(obs)
        if isinstance(obs, GpuUnhealthy):
            return self._gpu_unhealthy(obs)
        return self._predecessor_lost(obs)

    # -- a worker exited ---------------------------------------------------------------------

    def _worker_exited(self, obs: WorkerExited) -> str:
        """Order the abort of the worker's generation, replace the seat, ask for the next plan."""
        plan, lr = obs.plan, obs.local_rank
        if plan is None:
            return ""
        problem = self.mechanics.gpu_problem(lr)
        seats = self.seats
        verdict = judge_exit(self.policy.node, plan, lr, obs.pid, obs.code, gpu_problem=problem,
                             seat_out=self.out_seats.why(lr), budget_left=self.restarts_used() < self.restarts.budget,
                             spare_ready=seats is not None and seats.ready_spare() is not None,
                             restart_window=self.policy.restart_window)
        rank = verdict.rank
        self.mechanics.emit(plan.gen, ev.RANK_FAILED, rank=rank, local_rank=lr, pid=obs.pid, code=obs.code,
                            reason=verdict.reason)
        ranks = [rank] if rank >= 0 else []
        self.mechanics.order_abort(plan.gen, ranks, verdict.reason)
        aborted = f"ordered abort of gen {plan.gen} rank(s) {ranks}: {verdict.reason}"
        if self.stopping.is_set() or seats is None:
            return aborted
        strategy = self._replace(seats, plan.gen, lr, verdict.decision.strategy)
        self.log.warning("rallyd.recovering", gen=plan.gen, rank=rank, local_rank=lr, strategy=strategy,
                         why=verdict.decision.reason)
        self.metrics.replaced(strategy)
        if verdict.take_out is not None and strategy == SHRINK:
            # Out of the placement before the re-plan request, so the re-plan sees it. The
            # generation lost a rank either way: the request stands until a plan fits, so a layout
            # that cannot shrink is re-planned when the seat comes back.
            self._take_out(lr, verdict.take_out, plan.gen)
        elif strategy != SHRINK:
            self.mechanics.emit(plan.gen, ev.REPLACEMENT, rank=rank, local_rank=lr, strategy=strategy,
                                why=verdict.decision.reason)
        self.mechanics.request_replan(plan.gen, f"{verdict.reason}; {HOW[strategy]}")
        return f"{aborted}; {HOW[strategy]}"

    def _replace(self, seats: Seats, gen: int, local_rank: int, strategy: str) -> str:
        """Put a new process on the seat as ``strategy`` says (before the re-plan request, so the
        plan finds it starting); returns the strategy carried out. Only a cold restart is charged
        to the restart budget."""
        if strategy == SPARE and seats.adopt_spare(local_rank, after_gen=gen) is None:
            strategy = RESTART  # the spare went away between the choice and the hand-over
        if strategy == RESTART:
            with self._restarts_lock:
                self.restarts.take(self.clock())  # room was checked just before, on this same thread
            seats.ensure(local_rank, after_gen=gen)
        return strategy

    # -- a seat leaves placement, or comes back ----------------------------------------------

    def _take_out(self, local_rank: int, out: TakeOut, gen: int) -> None:
        self.out_seats.take_out(local_rank, out.why, out.retry_after, out.until_checkpoint_changes)
        self.log.error("rallyd.seat_bad", local_rank=local_rank, why=out.why, retry_after=out.retry_after,
                       until_checkpoint_changes=out.until_checkpoint_changes)
        self.mechanics.emit(gen, ev.SEAT_BAD, local_rank=local_rank, reason=out.why, retry_after=out.retry_after)
        self.mechanics.publish_bad_seats(self.out_seats.local_ranks())

    def _retry_bad_seats(self) -> str:
        back = self.out_seats.bring_back_due()
        if not back:
            return ""
        for lr, what in back:
            self.log.info("rallyd.seat_back", local_rank=lr, because=what)
        self.mechanics.publish_bad_seats(self.out_seats.local_ranks())
        return "; ".join(f"seat {lr} back in placement: {what}" for lr, what in back)

    def _gpu_unhealthy(self, obs: GpuUnhealthy) -> str:
        """Leave the GPU's seat out until rallyd restarts and kill its worker (the exit path then
        shrinks, since the GPU is unhealthy)."""
        plan = self.current_plan()
        why = f"GPU {obs.gpu}: {obs.why}"
        self._take_out(obs.gpu, TakeOut(why), plan.gen if plan else 0)
        w = self.seats.alive().get(obs.gpu) if self.seats else None
        if w is None:
            return f"seat {obs.gpu} left out: {why}"
        self.mechanics.signal(w.pid, signal.SIGKILL)
        return f"seat {obs.gpu} left out and its worker (pid {w.pid}) killed: {why}"

    # -- hung, stuck or frozen workers -------------------------------------------------------

    def _check_stalls(self) -> str:
        """Kill a seat's worker whose heartbeats stopped (the exit path replaces it): a frozen
        process between two collectives trips no peer's deadline."""
        limit = self.policy.stall_timeout
        now = self.clock()
        gap, self._last_cycle = now - self._last_cycle, now
        if not limit or self.seats is None or gap > limit / 2:
            return ""  # off, or this daemon was not running itself: its view of the beats is stale
        alive = self.seats.alive()
        beats = {lr: (w.pid, self.mechanics.beat_at(w.pid)) for lr, w in alive.items()}
        for lr, pid, silent in stalled(now, limit, beats):
            state = alive[lr].state()
            if state in ("zombie", "gone"):
                continue  # already killed (a diagnosis got there first): the exit path has it
            why = f"no heartbeat for {silent:.1f}s (process {state})"
            self.log.warning("rallyd.worker_stalled", local_rank=lr, pid=pid, silent=round(silent, 2), process=state)
            plan = self.current_plan()
            if plan is not None:
                self.mechanics.emit(plan.gen, ev.SUSPECT_NAMED, seat=f"{self.policy.node}/{lr}", verdict="stuck",
                                    why=why, group="heartbeat")
            self.mechanics.signal(pid, signal.SIGKILL)  # reported by the watcher like any exit
            return f"killed worker {lr} (pid {pid}): {why}"
        return ""

    def _check_wedged(self) -> str:
        """Kill a seat's worker that stays behind the newest plan giving it a rank (the exit path
        restarts it in that plan): it beats, so it is not frozen, but it is stuck inside the
        backend (a group build whose peer cannot be reached) and would hold its seat for minutes."""
        limit, plan = self.policy.wedged_after, self.current_plan()
        if not limit or self.seats is None or plan is None:
            return ""
        alive = self.seats.alive()
        ranked = {s.local_rank for s in plan.ranks_on(self.policy.node)}
        beats = {lr: (w.pid, self.mechanics.beat_gen(w.pid)) for lr, w in alive.items() if lr in ranked}
        for lr, pid, gen, late in wedged(self.clock(), limit, plan.gen, beats, self._behind_since):
            why = f"still in generation {gen} {late:.0f}s after generation {plan.gen} gave it a rank"
            self.log.warning("rallyd.worker_wedged", local_rank=lr, pid=pid, gen=gen, plan_gen=plan.gen,
                             late=round(late, 1))
            self.mechanics.emit(plan.gen, ev.SUSPECT_NAMED, seat=f"{self.policy.node}/{lr}", verdict="stuck",
                                why=why, group="build")
            self.mechanics.signal(pid, signal.SIGKILL)  # reported by the watcher like any exit
            self._behind_since.pop(pid, None)
            return f"killed worker {lr} (pid {pid}): {why}"
        return ""

    def _diagnosis(self, obs: DiagnosisWritten) -> str:
        """A peer's watchdog named one of our workers stuck: kill it, so the exit path (abort
        order, replacement, re-plan) takes over. Named unreachable or slow: ask for a new plan.
        ``dead`` is only logged (its exit, or its lease, starts the recovery)."""
        try:
            d = parse_diagnosis(self.policy.node, obs.key, obs.value)
        except MalformedRecord:
            self.log.error("rallyd.malformed_diagnosis", key=obs.key)
            return ""
        if d.by_our_seat:
            self.metrics.collective_tripped(d.group, d.trigger)
        killed = []
        for s in d.suspects:
            local = int(s["seat"].split("/")[1])
            worker = self.seats.alive().get(local) if self.seats else None
            self.log.warning("rallyd.suspect_named", gen=d.gen, group=d.group, seat=s["seat"], kind=s["kind"],
                             why=s.get("why"), pid=worker.pid if worker else None)
            self.mechanics.emit(d.gen, ev.SUSPECT_NAMED, seat=s["seat"], verdict=s["kind"], why=s.get("why"),
                                group=d.group)
            # Only the process the verdict is about: a diagnosis may arrive after its seat was
            # already restarted, and must not kill the replacement. Dead ones exit by themselves.
            if worker is not None and s["kind"] == "stuck" and s.get("pid") == worker.pid:
                self.mechanics.signal(worker.pid, signal.SIGKILL)  # reported by the watcher like any exit
                killed.append(f"killed worker {local} (pid {worker.pid}): named stuck in {d.group} of gen {d.gen}")
            elif worker is not None and s["kind"] in ("unreachable", "slow") and s.get("pid") == worker.pid:
                killed.append(self._ask_next_plan(s["seat"], s["kind"], d))
        return "; ".join(x for x in killed if x)

    def _ask_next_plan(self, seat: str, kind: str, d: Diagnosis) -> str:
        """Our worker is alive: its peers' data never came (``unreachable``: a network cut) or it
        was busy elsewhere (``slow``). The generation is aborted, but nobody dies, so no exit
        will ask for the next plan and every rank would wait for it: ask, naming the seat. An
        unreachable seat is moved by the leader (``layout.UnbuildableSeats``) so the replica's
        ranks reach each other. Once per seat and generation (both sides of a cut name each other)."""
        plan = self.current_plan()
        if plan is None or d.gen > plan.gen or (plan.gen, seat) in self._asked_next_plan:
            return ""
        self._asked_next_plan = {x for x in self._asked_next_plan if x[0] == plan.gen} | {(plan.gen, seat)}
        said = "unreachable from its peers" if kind == "unreachable" else "named slow"
        reason = f"{seat} {said} in {d.group} (gen {plan.gen})"
        self.mechanics.request_replan(plan.gen, reason)
        return f"asked for a new plan: {reason}"

    def _kill_order(self, obs: KillOrdered) -> str:
        """``rallyctl kill``: send a signal to one of our workers (a drill), then clear the order."""
        try:
            local, sig = parse_kill_order(obs.key, obs.value)
        except MalformedRecord:
            self.log.error("rallyd.malformed_kill_order", key=obs.key)
            return ""
        worker = self.seats.alive().get(local) if self.seats else None
        self.log.warning("rallyd.drill_kill", local_rank=local, signal=sig.name, pid=worker.pid if worker else None)
        if worker is not None:
            self.mechanics.signal(worker.pid, sig)
        self.mechanics.clear_kill_order(obs.key)
        return f"drill: {sig.name} to worker {local}" + (f" (pid {worker.pid})" if worker else " (none running)")

    # -- nodes and predecessors lost ---------------------------------------------------------

    def nodes_lost(self, plan: Plan, nodes: list[str]) -> None:
        """(Leader) ``nodes`` of ``plan`` are gone: abort the groups that contain their ranks.

        Loop thread only: the leader's planning step (``Rendezvous.run_cycle``, inside the loop's
        cycle) calls it just before it writes the plan without them, and the abort order must
        precede that plan, as a crash's does (the recovery's cause is then ``abort``, not the
        ``membership`` of a clean leave). So it acts at once; what it did joins the cycle's sentence.
        """
        ranks = lost_ranks(plan, nodes)
        if not ranks:
            return
        reason = f"node(s) {','.join(nodes)} left: rank(s) {ranks} of gen {plan.gen} gone"
        self.mechanics.order_abort(plan.gen, ranks, reason)
        self._said.append(f"ordered abort of gen {plan.gen} rank(s) {ranks}: {reason}")

    def _predecessor_lost(self, obs: PredecessorLost) -> str:
        """This daemon restarted (a crash, a reboot) before the cluster noticed it was gone: the
        ranks its predecessor ran in ``plan`` are dead. Say so as a rank failure would: abort
        their groups, start their replacements, and ask for the next plan."""
        plan = obs.plan
        mine = plan.ranks_on(self.policy.node)
        ranks = [s.rank for s in mine]
        reason = (f"rallyd on {self.policy.node} restarted: its rank(s) {ranks} of gen {plan.gen} "
                  "died with its predecessor")
        self.log.warning("rallyd.predecessor_lost", gen=plan.gen, ranks=ranks)
        for s in mine:
            self.mechanics.emit(plan.gen, ev.RANK_FAILED, rank=s.rank, local_rank=s.local_rank, reason=reason)
        self.mechanics.order_abort(plan.gen, ranks, reason)
        if self.seats is not None:
            for s in mine:  # booting while the leader re-plans
                self.seats.ensure(s.local_rank, after_gen=plan.gen)
        self.mechanics.request_replan(plan.gen, reason)
        return f"ordered abort of gen {plan.gen} rank(s) {ranks}: {reason}"

    # -- the cluster's phase -----------------------------------------------------------------

    def _event(self, obs: EventWritten) -> str:
        """Every daemon folds the events; the leader publishes the phase in ``status/recovery``."""
        try:
            t = self.machine.apply(Event.from_json(obs.key, obs.value))
        except MalformedRecord as exc:
            self.log.error("rallyd.malformed_event", key=obs.key, error=str(exc))
            return ""
        if t is None:
            return ""
        self.metrics.transition(t)
        if self.mechanics.is_leader():
            self.log.info("rallyd.recovery_phase", phase=t.phase, previous=t.previous, gen=t.gen, cause=t.event.kind)
            self.mechanics.publish_phase(self.machine.state())
        return ""
