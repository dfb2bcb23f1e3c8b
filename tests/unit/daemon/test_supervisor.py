"""Supervisor: one process per seat, exits reported at once, a restart budget per window."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rallypoint.daemon.supervisor import Supervisor


def sleeper(local_rank: int | None, after_gen: int) -> list[str]:
    return [sys.executable, "-c", "import time; time.sleep(30)"]


def test_restart_budget_per_window(tmp_path: Path) -> None:
    sup = Supervisor(sleeper, tmp_path, on_exit=lambda w, c: None, budget=2, window=0.5)
    assert sup.may_restart() and sup.may_restart()
    assert not sup.may_restart()  # spent: the seat stays down, no restart loop
    time.sleep(0.6)
    assert sup.may_restart()  # the window moved on


def test_ensure_starts_one_process_per_seat_and_exits_are_reported(tmp_path: Path) -> None:
    exits: list[tuple[int, int]] = []
    sup = Supervisor(sleeper, tmp_path, on_exit=lambda w, c: exits.append((w.local_rank, c)))
    try:
        first = sup.ensure(0)
        assert sup.ensure(0) is first  # a live worker is not started twice
        first.proc.kill()
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.005)
        assert exits == [(0, -9)]
        assert sup.ensure(0).pid != first.pid
        sup.stop(0)  # asked for: not reported
        time.sleep(0.2)
        assert exits == [(0, -9)] and sup.alive() == {}
    finally:
        sup.stop_all()
