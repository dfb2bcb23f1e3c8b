"""Who a tripped collective blames (pure logic over progress records; a stand-in board)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from rallypoint.comm.diagnosis import ProgressRecord, diagnose


class Board:
    def __init__(self, records: dict[str, ProgressRecord]) -> None:
        self.records = records

    def read(self) -> dict[str, ProgressRecord]:
        return self.records


def group() -> SimpleNamespace:
    return SimpleNamespace(gen=4, label="tp[0,1]@g4", ranks=(0, 1), spec=SimpleNamespace(seats=(("n1", 0), ("n2", 0))))


def record(seat: str, rank: int, started: int, completed: int, age: float = 0.1) -> ProgressRecord:
    # another host: its process is judged by its record alone
    return ProgressRecord(seat, 4, rank, 4242, "elsewhere", time.time() - age, {"tp[0,1]@g4": [started, completed]})


def test_a_peer_inside_the_same_collective_is_a_victim_unless_nobody_else_is_to_blame() -> None:
    """Rank 1 started seq 7 like us and heartbeats: past the deadline, nobody stopped, died or
    lagged, so the path between us failed: it is named unreachable. An error is not a deadline:
    then it stays a victim."""
    board = Board({"n2/0": record("n2/0", 1, 7, 6)})
    d = diagnose(board, group(), 7, "all_reduce", "deadline", 1.2, "n1/0", stale_after=1.0)
    assert [(s.rank, s.kind, s.pid) for s in d.suspects] == [(1, "unreachable", 4242)]
    assert "the path between us failed" in d.suspects[0].why
    assert diagnose(board, group(), 7, "all_reduce", "error", 1.2, "n1/0", stale_after=1.0).suspects == ()


def test_a_stuck_or_dead_peer_is_named_as_such_not_unreachable() -> None:
    stuck = Board({"n2/0": record("n2/0", 1, 7, 6, age=5.0)})
    assert [s.kind for s in diagnose(stuck, group(), 7, "all_reduce", "deadline", 1.2, "n1/0", 1.0).suspects] == [
        "stuck"]
    assert [s.kind for s in diagnose(Board({}), group(), 7, "all_reduce", "deadline", 1.2, "n1/0", 1.0).suspects] == [
        "dead"]
