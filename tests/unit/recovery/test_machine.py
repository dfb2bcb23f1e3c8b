"""The recovery state machine and its breakdown, fed events by hand (pure logic)."""

from __future__ import annotations

import pytest

from rallypoint.errors import MalformedRecord
from rallypoint.recovery import events as ev
from rallypoint.recovery.events import Event
from rallypoint.recovery.machine import (
    ABORTING,
    FAILED,
    LOADING,
    PLANNING,
    REBUILDING,
    SERVING,
    RecoveryMachine,
    breakdown,
)


def e(gen: int, kind: str, at: float, by: str = "a", **detail) -> Event:
    return Event(gen=gen, kind=kind, at=at, by=by, detail=detail)


def recovery(t0: float = 100.0) -> list[Event]:
    return [
        e(1, ev.RANK_FAILED, t0 + 0.10, rank=1, reason="rank 1 exited with code -9", killed_at=t0),
        e(1, ev.ABORT_ORDERED, t0 + 0.11, ranks=[1]),
        e(1, ev.REPLACEMENT, t0 + 0.12, strategy="spare"),
        e(1, ev.REPLAN_REQUESTED, t0 + 0.13),
        e(2, ev.PLAN_WRITTEN, t0 + 0.15, dp=1, dp_wanted=0),
        e(2, ev.RELEASED, t0 + 0.20),
        e(2, ev.GROUPS_BUILT, t0 + 0.60, by="a/0"), e(2, ev.GROUPS_BUILT, t0 + 0.62, by="b/0"),
        e(2, ev.SHARD_LOADED, t0 + 0.61, by="a/0", seconds=0.0),
        e(2, ev.SHARD_LOADED, t0 + 0.90, by="b/0", seconds=0.28),
        e(2, ev.SERVING, t0 + 0.91, by="a/0"), e(2, ev.SERVING, t0 + 0.92, by="b/0"),
        e(2, ev.FIRST_TOKEN, t0 + 1.00, by="a/0"),
    ]


def test_a_recovery_walks_every_phase_in_order() -> None:
    m = RecoveryMachine()
    phases = [t.phase for x in recovery() if (t := m.apply(x)) is not None]
    assert phases == [ABORTING, PLANNING, REBUILDING, LOADING, SERVING]
    assert m.phase == SERVING and m.gen == 2 and m.since == pytest.approx(101.0)
    assert m.why == "rank 1 exited with code -9" and m.degraded is None


def test_late_events_of_an_older_generation_change_nothing() -> None:
    m = RecoveryMachine()
    for x in recovery():
        m.apply(x)
    assert m.apply(e(1, ev.SHARD_LOADED, 200.0)) is None
    assert m.apply(e(1, ev.RANK_FAILED, 200.0, reason="late")) is None  # gen 1 is already replaced
    assert m.phase == SERVING
    assert m.apply(e(2, ev.RANK_FAILED, 201.0, reason="again")).phase == ABORTING  # a new failure does


def test_no_layout_fits_is_failed_and_a_plan_leaves_it() -> None:
    m = RecoveryMachine()
    m.apply(e(3, ev.RANK_FAILED, 1.0, reason="x"))
    assert m.apply(e(3, ev.CANNOT_PLAN, 2.0, reason="1 healthy rank slot(s) cannot hold one replica")).phase == FAILED
    assert "cannot hold" in m.why
    assert m.apply(e(4, ev.PLAN_WRITTEN, 3.0, dp=1, dp_wanted=2)).phase == PLANNING
    assert m.degraded == "serving dp=1 of 2 replicas"
    assert m.apply(e(4, ev.RELEASED, 3.1)).phase == REBUILDING
    assert m.apply(e(4, ev.PLAN_WRITTEN, 5.0, dp=2, dp_wanted=2)) is None or m.degraded is None
    assert m.degraded is None  # grown back


def test_a_quiet_release_goes_back_to_serving_when_every_rank_serves() -> None:
    m = RecoveryMachine()
    m.apply(e(2, ev.PLAN_WRITTEN, 1.0, world_size=2))
    m.apply(e(2, ev.RELEASED, 1.1))
    assert m.apply(e(2, ev.SERVING, 1.4, by="a/0")) is None
    assert m.apply(e(2, ev.SERVING, 1.5, by="b/0")).phase == SERVING


def test_breakdown_times_each_milestone_from_the_kill() -> None:
    b = breakdown(recovery(), failed_gen=1)
    assert b["detected"] == pytest.approx(0.10)
    assert b["planned"] == pytest.approx(0.15) and b["released"] == pytest.approx(0.20)
    assert b["groups_built"] == pytest.approx(0.62)  # the last rank's
    assert b["shard_loaded"] == pytest.approx(0.90) and b["first_token"] == pytest.approx(1.00)
    assert breakdown(recovery(), failed_gen=7)["first_token"] is None


def test_events_round_trip_and_reject_garbage() -> None:
    x = e(5, ev.SHARD_LOADED, 12.5, by="b/1", seconds=0.3)
    assert Event.from_json("k", x.to_json()) == x
    with pytest.raises(MalformedRecord, match="k2"):
        Event.from_json("k2", b'{"gen": "five"}')


def test_the_all_reduce_probes_first_step_ends_a_recovery_like_a_first_token() -> None:
    events = [x for x in recovery() if x.kind not in (ev.FIRST_TOKEN, ev.SERVING)]
    events.append(e(2, ev.FIRST_STEP, 100.95, by="a/0"))
    m = RecoveryMachine()
    assert [t.phase for x in events if (t := m.apply(x)) is not None][-1] == SERVING
    assert breakdown(events, 1)["first_token"] == pytest.approx(0.95)
