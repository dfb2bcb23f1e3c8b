"""Which way a failed seat comes back, and the restart budget (pure policy)."""

from __future__ import annotations

from rallypoint.recovery.strategy import RESTART, SHRINK, SPARE, RestartBudget, choose


def test_preference_order_spare_then_restart_then_shrink() -> None:
    assert choose(True, "", True, spare_ready=True).strategy == SPARE
    assert choose(True, "", True, spare_ready=False).strategy == RESTART
    d = choose(False, "Xid 79", True, spare_ready=True)
    assert d.strategy == SHRINK and "Xid 79" in d.reason  # never reuse a GPU that fell off the bus
    assert choose(True, "", False, spare_ready=True).strategy == SHRINK


def test_a_checkpoint_that_failed_to_load_is_never_retried_on_the_same_files() -> None:
    d = choose(True, "", True, spare_ready=True, checkpoint_error="truncated")
    assert d.strategy == SHRINK and "truncated" in d.reason and "files change" in d.reason


def test_budget_per_window() -> None:
    b = RestartBudget(budget=2, window=10.0)
    assert b.take(0.0) and b.take(1.0)
    assert not b.take(2.0) and b.left(2.0) == 0
    assert b.take(10.5)  # the first one left the window


def test_a_seat_already_out_stays_out_with_its_own_reason() -> None:
    d = choose(True, "", True, spare_ready=True, seat_out="restart budget spent")
    assert d.strategy == SHRINK and d.reason == "seat already out: restart budget spent"
