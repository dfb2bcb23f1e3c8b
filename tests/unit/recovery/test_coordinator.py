"""The recovery coordinator's decisions, with fake mechanics and seats (no etcd, no processes):
watchers only record, the loop decides; a restart-budget slot is spent only by a restart; and
each cycle says what it did."""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rallypoint.daemon.seats import OutSeats
from rallypoint.errors import MalformedRecord
from rallypoint.log import get_logger
from rallypoint.protocol import exit_codes
from rallypoint.recovery import events as ev
from rallypoint.recovery.coordinator import (
    BUG,
    IDLE,
    Policy,
    RecoveryCoordinator,
    judge_exit,
    lost_ranks,
    parse_diagnosis,
    parse_kill_order,
    stalled,
    wedged,
)
from rallypoint.recovery.events import Event
from rallypoint.recovery.inbox import (
    DiagnosisWritten,
    EventWritten,
    GpuUnhealthy,
    KillOrdered,
    PredecessorLost,
    WorkerExited,
)
from rallypoint.recovery.machine import RecoveryMachine, Transition
from rallypoint.recovery.strategy import RESTART, SHRINK, SPARE
from rallypoint.rendezvous.records import Plan, RankSlot

NODE = "b"


def plan(gen: int = 4) -> Plan:
    """TP=2 x DP=2: ranks 0, 1 on node a; 2, 3 on node b (seats b/0, b/1)."""
    ranks = (RankSlot(0, "a", 0), RankSlot(1, "a", 1), RankSlot(2, NODE, 0), RankSlot(3, NODE, 1))
    return Plan(gen=gen, tp=2, pp=1, dp=2, ranks=ranks, members=("a", NODE), reason="test", leader="a")


class FakeMechanics:
    """Records every call in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.leader = False
        self.beats: dict[int, float] = {}
        self.gens: dict[int, int] = {}  # pid -> the generation its last heartbeat named
        self.gpus: dict[int, str] = {}

    def kinds(self) -> list[str]:
        return [c[2] if c[0] == "event" else c[0] for c in self.calls]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [c[3] for c in self.calls if c[0] == "event" and c[2] == kind]

    def order_abort(self, gen: int, ranks: list[int], reason: str) -> bool:
        self.calls.append(("abort", gen, list(ranks), reason))
        return True

    def request_replan(self, gen: int, reason: str) -> None:
        self.calls.append(("replan", gen, reason))

    def emit(self, gen: int, kind: str, **detail: Any) -> None:
        self.calls.append(("event", gen, kind, detail))

    def signal(self, pid: int, sig: int) -> bool:
        self.calls.append(("signal", pid, sig))
        return True

    def publish_bad_seats(self, local_ranks: tuple[int, ...]) -> None:
        self.calls.append(("bad_seats", local_ranks))

    def publish_phase(self, state: dict[str, object]) -> None:
        self.calls.append(("phase", state))

    def clear_kill_order(self, key: str) -> None:
        self.calls.append(("clear", key))

    def is_leader(self) -> bool:
        return self.leader

    def beat_at(self, pid: int) -> float | None:
        return self.beats.get(pid)

    def beat_gen(self, pid: int) -> int | None:
        return self.gens.get(pid)

    def gpu_problem(self, local_rank: int) -> str:
        return self.gpus.get(local_rank, "")


@dataclass
class FakeWorker:
    pid: int
    process: str = "sleeping"

    def state(self) -> str:
        return self.process


@dataclass
class FakeSeats:
    """Seats 0 and 1 with live workers; ``spares`` warm spares ready."""

    spares: int = 0
    workers: dict[int, FakeWorker] = field(default_factory=lambda: {0: FakeWorker(100), 1: FakeWorker(101)})
    started: list[tuple[int, int]] = field(default_factory=list)
    adopted: list[tuple[int, int]] = field(default_factory=list)
    next_pid: int = 200

    def die(self, local_rank: int) -> FakeWorker:
        return self.workers.pop(local_rank)

    def alive(self) -> dict[int, FakeWorker]:
        return dict(self.workers)

    def ready_spare(self) -> object | None:
        return object() if self.spares else None

    def _new(self, local_rank: int) -> FakeWorker:
        self.next_pid += 1
        w = self.workers[local_rank] = FakeWorker(self.next_pid)
        return w

    def adopt_spare(self, local_rank: int, after_gen: int) -> FakeWorker | None:
        if not self.spares:
            return None
        self.spares -= 1
        self.adopted.append((local_rank, after_gen))
        return self._new(local_rank)

    def ensure(self, local_rank: int, after_gen: int = 0) -> FakeWorker:
        if local_rank in self.workers:
            return self.workers[local_rank]
        self.started.append((local_rank, after_gen))
        return self._new(local_rank)


@dataclass
class FakeMetrics:
    replaced_as: list[str] = field(default_factory=list)
    tripped: list[tuple[str, str]] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)

    def transition(self, t: Transition) -> None:
        self.transitions.append(t)

    def collective_tripped(self, group: str, trigger: str) -> None:
        self.tripped.append((group, trigger))

    def replaced(self, strategy: str) -> None:
        self.replaced_as.append(strategy)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    coordinator: RecoveryCoordinator
    mechanics: FakeMechanics
    seats: FakeSeats
    metrics: FakeMetrics
    clock: Clock
    wakes: list[int]
    current: list[Plan | None]

    def exit(self, local_rank: int, code: int = -9) -> str:
        """Seat ``local_rank``'s worker dies; the watcher records it; the loop runs one cycle."""
        w = self.seats.die(local_rank)
        self.coordinator.observe(WorkerExited(self.current[0], local_rank, w.pid, code))
        return self.coordinator.run_cycle()


def rig(tmp_path: Path, spares: int = 0, budget: int = 5, window: float = 60.0, stall: float = 3.0,
        wedged_after: float = 0.0) -> Rig:
    mech, seats, metrics, clock = FakeMechanics(), FakeSeats(spares), FakeMetrics(), Clock()
    wakes: list[int] = []
    current: list[Plan | None] = [plan()]
    c = RecoveryCoordinator(Policy(NODE, stall, budget, window, wedged_after), mech, seats, OutSeats(str(tmp_path)),
                            RecoveryMachine(), metrics, current_plan=lambda: current[0], stopping=threading.Event(),
                            log=get_logger("test"), wake=lambda: wakes.append(1), clock=clock)
    return Rig(c, mech, seats, metrics, clock, wakes, current)


# -- the budget fix ------------------------------------------------------------------------------


def test_a_restart_budget_slot_is_spent_only_when_a_restart_happens(tmp_path: Path) -> None:
    """Budget 1. A warm spare taking a seat and a shrink (unhealthy GPU) are not restarts: the one
    slot is still there for the cold restart that follows, and only after that is it spent. (The
    old daemon charged a slot for every exit, whatever it then did: here the third exit shrank.)"""
    r = rig(tmp_path, spares=1, budget=1)
    assert "a warm spare took the seat" in r.exit(0)
    assert r.seats.adopted == [(0, 4)] and r.coordinator.restarts_used() == 0
    r.mechanics.gpus[1] = "Xid 79"
    assert "seat left out" in r.exit(1)
    assert r.coordinator.restarts_used() == 0
    assert "restarted in place" in r.exit(0)  # no spare left: a cold restart, the first one charged
    assert r.seats.started == [(0, 4)] and r.coordinator.restarts_used() == 1
    assert "seat left out" in r.exit(0)  # now the budget is spent
    assert r.metrics.replaced_as == [SPARE, SHRINK, RESTART, SHRINK]
    bad = r.mechanics.events(ev.SEAT_BAD)
    assert [(b["local_rank"], b["reason"]) for b in bad] == [(1, "GPU unhealthy: Xid 79"), (0, "restart budget spent")]
    assert bad[1]["retry_after"] == 60.0  # a spent budget: tried again one window later


def test_the_budget_window_moves_on(tmp_path: Path) -> None:
    r = rig(tmp_path, budget=1, window=10.0)
    assert "restarted in place" in r.exit(0)
    r.clock.now += 11
    assert "restarted in place" in r.exit(0)
    assert r.coordinator.restarts_used() == 1


def test_a_spare_that_vanished_before_the_hand_over_is_a_restart_and_charged(tmp_path: Path) -> None:
    r = rig(tmp_path, spares=1, budget=1)
    r.seats.adopt_spare = lambda local_rank, after_gen: None  # type: ignore[method-assign]
    assert "restarted in place" in r.exit(1)
    assert r.coordinator.restarts_used() == 1 and r.seats.started == [(1, 4)]


# -- watchers record, the loop decides -----------------------------------------------------------


def test_observing_records_and_wakes_the_loop_but_decides_nothing(tmp_path: Path) -> None:
    r = rig(tmp_path)
    w = r.seats.die(1)
    r.coordinator.observe(WorkerExited(plan(), 1, w.pid, -9))
    assert r.wakes == [1] and r.mechanics.calls == [] and r.seats.started == []
    assert len(r.coordinator.inbox) == 1
    said = r.coordinator.run_cycle()
    assert said == ("ordered abort of gen 4 rank(s) [3]: rank 3 (b/1, pid 101) exited with code -9; "
                    "restarted in place")
    assert len(r.coordinator.inbox) == 0
    assert r.coordinator.run_cycle() == IDLE


def test_an_exit_is_recorded_then_aborted_replaced_and_replanned_in_that_order(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.exit(0)
    assert r.mechanics.kinds() == [ev.RANK_FAILED, "abort", ev.REPLACEMENT, "replan"]
    _, gen, ranks, reason = r.mechanics.calls[1]
    assert (gen, ranks) == (4, [2]) and reason == "rank 2 (b/0, pid 100) exited with code -9"
    assert r.mechanics.calls[-1] == ("replan", 4, f"{reason}; restarted in place")
    assert r.mechanics.events(ev.REPLACEMENT)[0]["strategy"] == RESTART


def test_an_exit_recorded_in_one_generation_is_judged_in_that_generation(tmp_path: Path) -> None:
    """The watcher records the plan of the moment; a release before the loop gets to the exit
    does not move the failure to the new generation."""
    r = rig(tmp_path)
    w = r.seats.die(0)
    r.coordinator.observe(WorkerExited(plan(4), 0, w.pid, -9))
    r.current[0] = plan(5)
    r.coordinator.run_cycle()
    assert [c[1] for c in r.mechanics.calls] == [4, 4, 4, 4]


def test_a_bad_checkpoint_leaves_the_seat_out_until_its_files_change(tmp_path: Path) -> None:
    r = rig(tmp_path, spares=1)
    said = r.exit(1, code=exit_codes.BAD_CHECKPOINT)
    assert said.endswith("seat left out") and "code 3 (its shard failed to load)" in said
    assert r.seats.adopted == [] and r.seats.started == []  # a spare would read the same files
    assert r.coordinator.out_seats.local_ranks() == (1,)
    assert r.mechanics.kinds() == [ev.RANK_FAILED, "abort", ev.SEAT_BAD, "bad_seats", "replan"]
    assert r.mechanics.events(ev.SEAT_BAD)[0]["retry_after"] is None
    assert r.coordinator.out_seats.bring_back_due(r.clock.now + 1e6) == []  # time alone never brings it back


def test_while_stopping_the_abort_is_ordered_but_the_seat_not_replaced(tmp_path: Path) -> None:
    r = rig(tmp_path, spares=1)
    r.coordinator.stopping.set()
    assert r.exit(0).startswith("ordered abort of gen 4 rank(s) [2]")
    assert r.mechanics.kinds() == [ev.RANK_FAILED, "abort"]
    assert r.seats.adopted == [] and r.seats.started == [] and r.coordinator.restarts_used() == 0


def test_an_exit_before_any_plan_is_ignored(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.current[0] = None
    assert r.exit(0) == IDLE and r.mechanics.calls == []


def test_one_failing_observation_does_not_lose_the_others(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.coordinator.observe(KillOrdered("/rp/c/control/kill/b/0", b"KILL"))
    r.mechanics.clear_kill_order = lambda key: 1 / 0  # type: ignore[method-assign,assignment]
    w = r.seats.die(1)
    r.coordinator.observe(WorkerExited(plan(), 1, w.pid, -9))
    said = r.coordinator.run_cycle()
    assert BUG in said and "ordered abort of gen 4 rank(s) [3]" in said


# -- hung, stuck and frozen workers --------------------------------------------------------------


def test_a_worker_silent_past_the_stall_timeout_is_killed_and_named_stuck(tmp_path: Path) -> None:
    r = rig(tmp_path, stall=3.0)
    r.mechanics.beats = {100: r.clock.now, 101: r.clock.now - 2.0}
    r.clock.now += 1.0
    assert r.coordinator.run_cycle() == IDLE  # 1 s and 3 s silent: not past 3 s
    r.clock.now += 1.0
    said = r.coordinator.run_cycle()
    assert said == "killed worker 1 (pid 101): no heartbeat for 4.0s (process sleeping)"
    assert r.mechanics.calls[-1] == ("signal", 101, signal.SIGKILL)
    assert r.mechanics.events(ev.SUSPECT_NAMED)[0]["seat"] == "b/1"


def test_stalls_are_not_judged_after_the_daemon_itself_was_away(tmp_path: Path) -> None:
    r = rig(tmp_path, stall=3.0)
    r.mechanics.beats = {100: r.clock.now}
    r.clock.now += 10.0  # the loop did not run for 10 s (stopped, swapped): its view is stale
    assert r.coordinator.run_cycle() == IDLE
    r.seats.workers[0].process = "zombie"
    r.clock.now += 0.1
    assert r.coordinator.run_cycle() == IDLE  # already dying: the exit path has it


def test_a_worker_stuck_behind_the_plan_that_gave_it_a_rank_is_killed(tmp_path: Path) -> None:
    """Both seats beat; worker 1 stays in generation 3 (a group build blocked in the backend)
    while generation 4 gives it a rank: killed once it has been behind for ``wedged_after``."""
    r = rig(tmp_path, stall=0.0, wedged_after=45.0)
    r.mechanics.gens = {100: 4, 101: 3}
    assert r.coordinator.run_cycle() == IDLE  # behind from now on
    r.clock.now += 40.0
    r.mechanics.gens[100] = 3  # worker 0 falls behind later: its own clock starts now
    assert r.coordinator.run_cycle() == IDLE
    r.clock.now += 6.0
    said = r.coordinator.run_cycle()
    assert said == "killed worker 1 (pid 101): still in generation 3 46s after generation 4 gave it a rank"
    assert r.mechanics.calls[-1] == ("signal", 101, signal.SIGKILL)
    assert r.mechanics.events(ev.SUSPECT_NAMED)[-1]["seat"] == "b/1"
    r.mechanics.gens[100] = 4  # caught up: forgotten
    r.clock.now += 100.0
    assert r.coordinator.run_cycle() == IDLE


def test_wedged_is_pure() -> None:
    since: dict[int, float] = {}
    beats: dict[int, tuple[int, int | None]] = {0: (10, 3), 1: (11, None), 2: (12, 5)}
    assert wedged(0.0, 10.0, 5, beats, since) == [] and since == {10: 0.0}
    assert wedged(11.0, 10.0, 5, beats, since) == [(0, 10, 3, 11.0)]
    assert wedged(12.0, 10.0, 5, {0: (10, 5)}, since) == [] and since == {}


def test_stalled_is_pure() -> None:
    beats: dict[int, tuple[int, float | None]] = {0: (10, 5.0), 1: (11, None), 2: (12, 9.5)}
    assert stalled(10.0, 3.0, beats) == [(0, 10, 5.0)]


def diagnosis(suspects: list[dict[str, Any]], gen: int = 4) -> bytes:
    return json.dumps({"gen": gen, "group": "tp[2,3]@g4", "trigger": "deadline", "suspects": suspects}).encode()


def test_a_seat_named_unreachable_or_slow_asks_for_a_new_plan_once(tmp_path: Path) -> None:
    """A cut between two alive ranks kills nobody, so no exit would ask for the next plan: the
    seat's daemon asks, naming it (the leader then moves it), once per seat and generation."""
    r = rig(tmp_path)
    key = "/rallypoint/c/status/diagnosis/4/a:0"
    value = diagnosis([{"seat": "b/1", "kind": "unreachable", "pid": 101, "why": "the path between us failed"}])
    r.coordinator.observe(DiagnosisWritten(key, value))
    said = r.coordinator.run_cycle()
    assert said == "asked for a new plan: b/1 unreachable from its peers in tp[2,3]@g4 (gen 4)"
    assert ("replan", 4, "b/1 unreachable from its peers in tp[2,3]@g4 (gen 4)") in r.mechanics.calls
    assert not [c for c in r.mechanics.calls if c[0] == "signal"]  # nobody killed
    r.coordinator.observe(DiagnosisWritten(key, value))
    assert r.coordinator.run_cycle() == IDLE  # asked already
    slow = diagnosis([{"seat": "b/0", "kind": "slow", "pid": 100, "why": "idle at seq 0"}])
    r.coordinator.observe(DiagnosisWritten(key, slow))
    assert r.coordinator.run_cycle() == "asked for a new plan: b/0 named slow in tp[2,3]@g4 (gen 4)"


def test_a_diagnosis_kills_only_the_process_it_names_stuck(tmp_path: Path) -> None:
    r = rig(tmp_path)
    key = "/rallypoint/c/status/diagnosis/4/b:0"  # written by our own seat b/0
    value = diagnosis([{"seat": "b/1", "kind": "stuck", "pid": 101, "why": "stopped"},
                       {"seat": "b/0", "kind": "stuck", "pid": 999, "why": "an older process"},
                       {"seat": "a/0", "kind": "stuck", "pid": 5, "why": "not ours"}])
    r.coordinator.observe(DiagnosisWritten(key, value))
    said = r.coordinator.run_cycle()
    assert said == "killed worker 1 (pid 101): named stuck in tp[2,3]@g4 of gen 4"
    assert [c for c in r.mechanics.calls if c[0] == "signal"] == [("signal", 101, signal.SIGKILL)]
    assert [e["seat"] for e in r.mechanics.events(ev.SUSPECT_NAMED)] == ["b/1", "b/0"]
    assert r.metrics.tripped == [("tp[2,3]@g4", "deadline")]


def test_dead_verdicts_are_only_recorded_and_slow_ones_kill_nobody(tmp_path: Path) -> None:
    r = rig(tmp_path)
    value = diagnosis([{"seat": "b/0", "kind": "dead", "pid": 100}, {"seat": "b/1", "kind": "slow", "pid": 101}])
    r.coordinator.observe(DiagnosisWritten("/rallypoint/c/status/diagnosis/4/a:0", value))
    assert r.coordinator.run_cycle() == "asked for a new plan: b/1 named slow in tp[2,3]@g4 (gen 4)"
    assert r.mechanics.kinds() == [ev.SUSPECT_NAMED, ev.SUSPECT_NAMED, "replan"] and r.metrics.tripped == []
    assert not [c for c in r.mechanics.calls if c[0] == "signal"]


def test_parse_diagnosis_refuses_what_is_not_one() -> None:
    with pytest.raises(MalformedRecord):
        parse_diagnosis(NODE, "/rp/status/diagnosis/4/a:0", b"{not json")
    with pytest.raises(MalformedRecord):
        parse_diagnosis(NODE, "/rp/status/diagnosis/4/a:0", diagnosis([{"seat": "b", "kind": "stuck"}]))
    d = parse_diagnosis(NODE, "/rp/status/diagnosis/4/a:0", diagnosis([{"seat": "a/1", "kind": "dead"}]))
    assert d.suspects == () and not d.by_our_seat and d.gen == 4


# -- drills, GPUs, lost nodes and predecessors ---------------------------------------------------


def test_a_drill_signals_the_seats_worker_then_clears_the_order(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.coordinator.observe(KillOrdered("/rp/c/control/kill/b/1", b"stop"))
    assert r.coordinator.run_cycle() == "drill: SIGSTOP to worker 1 (pid 101)"
    assert r.mechanics.calls == [("signal", 101, signal.SIGSTOP), ("clear", "/rp/c/control/kill/b/1")]


def test_a_malformed_drill_is_left_in_place(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.coordinator.observe(KillOrdered("/rp/c/control/kill/b/1", b"SIGNOPE"))
    assert r.coordinator.run_cycle() == IDLE and r.mechanics.calls == []
    assert parse_kill_order("/rp/c/control/kill/b/3", b"SIGKILL") == (3, signal.SIGKILL)


def test_an_unhealthy_gpu_takes_its_seat_out_for_good_and_the_exit_then_shrinks(tmp_path: Path) -> None:
    r = rig(tmp_path, spares=1)
    r.mechanics.gpus[1] = "fell off the bus"
    r.coordinator.observe(GpuUnhealthy(1, "fell off the bus"))
    said = r.coordinator.run_cycle()
    assert said == "seat 1 left out and its worker (pid 101) killed: GPU 1: fell off the bus"
    assert r.mechanics.calls[-1] == ("signal", 101, signal.SIGKILL)
    assert r.coordinator.out_seats.reasons() == {"1": "GPU 1: fell off the bus"}
    assert r.exit(1).endswith("seat left out")  # never a spare on a GPU that fell off
    assert r.seats.adopted == [] and r.coordinator.out_seats.bring_back_due(r.clock.now + 1e6) == []


def test_lost_nodes_are_aborted_at_once_and_said_in_the_cycle(tmp_path: Path) -> None:
    """Called by the leader's planning step on the loop, before the plan without them is written."""
    r = rig(tmp_path)
    r.coordinator.nodes_lost(plan(), ["a"])
    assert r.mechanics.calls == [("abort", 4, [0, 1], "node(s) a left: rank(s) [0, 1] of gen 4 gone")]
    assert r.coordinator.run_cycle() == "ordered abort of gen 4 rank(s) [0, 1]: node(s) a left: rank(s) [0, 1] of gen 4 gone"
    r.coordinator.nodes_lost(plan(), ["z"])  # no ranks there: nothing to abort
    assert len(r.mechanics.calls) == 1 and lost_ranks(plan(), ["a", NODE]) == [0, 1, 2, 3]


def test_a_predecessors_ranks_are_failed_aborted_restarted_and_replanned(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.seats.workers.clear()  # a fresh rallyd runs nothing yet
    r.coordinator.observe(PredecessorLost(plan()))
    said = r.coordinator.run_cycle()
    assert said.startswith("ordered abort of gen 4 rank(s) [2, 3]: rallyd on b restarted")
    assert r.mechanics.kinds() == [ev.RANK_FAILED, ev.RANK_FAILED, "abort", "replan"]
    assert r.seats.started == [(0, 4), (1, 4)]
    assert r.coordinator.restarts_used() == 0  # not a restart of a failed seat: not budgeted


# -- the cluster's phase -------------------------------------------------------------------------


def event(gen: int, kind: str, at: float, **detail: Any) -> EventWritten:
    e = Event(gen=gen, kind=kind, by="a", at=at, detail=detail)
    return EventWritten(f"/rp/c/events/{gen}/{int(at * 1e9)}-a-{kind}", e.to_json().encode())


def test_events_are_folded_and_only_the_leader_publishes_the_phase(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.coordinator.observe(event(4, ev.RANK_FAILED, 1.0, reason="x"))
    assert r.coordinator.run_cycle() == IDLE
    assert r.coordinator.machine.phase == "aborting" and len(r.metrics.transitions) == 1
    assert r.mechanics.calls == []
    r.mechanics.leader = True
    r.coordinator.observe(event(4, ev.REPLAN_REQUESTED, 2.0))
    r.coordinator.observe(EventWritten("/rp/c/events/4/x", b"not an event"))
    r.coordinator.run_cycle()
    assert r.mechanics.calls == [("phase", r.coordinator.machine.state())]
    assert r.coordinator.machine.phase == "planning"


# -- pure verdicts -------------------------------------------------------------------------------


def test_judge_exit() -> None:
    p = plan()
    common = {"gpu_problem": "", "seat_out": "", "budget_left": True, "spare_ready": False, "restart_window": 30.0}
    v = judge_exit(NODE, p, 1, 7, -9, **common)  # type: ignore[arg-type]
    assert (v.rank, v.decision.strategy, v.take_out) == (3, RESTART, None)
    v = judge_exit(NODE, p, 1, 7, -9, **{**common, "budget_left": False})  # type: ignore[arg-type]
    assert v.decision.strategy == SHRINK and v.take_out is not None and v.take_out.retry_after == 30.0
    # a seat already out keeps its own way back: not taken out again
    v = judge_exit(NODE, p, 1, 7, -9, **{**common, "seat_out": "restart budget spent"})  # type: ignore[arg-type]
    assert v.decision.strategy == SHRINK and v.take_out is None
    v = judge_exit(NODE, p, 5, 7, 1, **common)  # type: ignore[arg-type]
    assert v.rank == -1 and v.reason == "rank -1 (b/5, pid 7) exited with code 1"
