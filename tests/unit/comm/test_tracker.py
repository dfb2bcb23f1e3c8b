"""Deadlines learned from collective durations (pure bookkeeping: no process group needed)."""

from __future__ import annotations

from types import SimpleNamespace

from rallypoint.comm.tracker import Deadlines, Tracker


def group() -> SimpleNamespace:
    return SimpleNamespace(seq=0, label="tp[0,1]@g1", gen=1, aborted=False)


def run(t: Tracker, g: SimpleNamespace, seconds: float, n: int = 1) -> None:
    for _ in range(n):
        rec = t.issue(g, "broadcast", 64, None)
        t.finish(rec, rec.start + seconds)


def test_deadline_is_the_floor_until_something_is_learned_then_k_times_p99() -> None:
    t = Tracker(Deadlines(floor=1.0, k=20.0))
    g = group()
    probe = t.issue(g, "broadcast", 64, None)
    assert t.deadline(probe) == 1.0
    run(t, g, 0.001, 200)
    assert t.deadline(probe) == 1.0  # 20 x 1 ms is under the floor
    run(t, g, 0.2, 200)
    assert abs(t.deadline(probe) - 4.0) < 1e-6  # 20 x p99 = 20 x 0.2 s


def test_a_new_groups_warm_up_calls_do_not_raise_the_deadline() -> None:
    """NCCL sets a communicator's connections up on its first collectives (0.1-1 s): learned, one
    such outlier would make the deadline k times it, and a stopped peer would go unnoticed."""
    t = Tracker(Deadlines(floor=1.0, k=20.0))
    g = group()
    run(t, g, 0.8, 4)  # the warm-up of a freshly built group
    run(t, g, 0.002, 50)
    probe = t.issue(g, "broadcast", 64, None)
    assert t.deadline(probe) == 1.0
    g2 = group()  # the next generation's group: its warm-up is skipped too
    run(t, g2, 0.8, 4)
    assert t.deadline(probe) == 1.0
    run(t, g2, 0.8, 1)  # a slow call after the warm-up is learned
    assert t.deadline(probe) > 15
