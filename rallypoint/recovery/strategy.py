"""Which way a failed seat comes back (pure policy; ``daemon`` carries it out).

In order of preference:

1. ``spare``: the seat's GPU is healthy and a warm spare process (torch imported, CUDA up,
   etcd session open) is waiting: it adopts the seat at once;
2. ``restart``: the GPU is healthy, no spare is ready: a new process is started on the seat (cold);
3. ``shrink``: the GPU is unhealthy, the seat's checkpoint failed to load (a spare or a restart
   would load the same files), or the seat's restart budget is spent: the seat is marked bad
   and left out of the next plan; the leader places the largest layout that still fits (it drops
   whole DP replicas, never changes TP or PP) and grows back when capacity returns.

Restarts are budgeted per seat *and* per node in a time window, so a crash loop ends in a clear
``shrink`` (degraded, or failed when no replica fits) instead of restarting forever.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

SPARE, RESTART, SHRINK = "spare", "restart", "shrink"


@dataclass(frozen=True)
class Decision:
    """What to do with a failed seat, and why (logged and written as an event)."""

    strategy: str
    reason: str


def choose(gpu_healthy: bool, gpu_problem: str, budget_left: bool, spare_ready: bool,
           checkpoint_error: str = "", seat_out: str = "") -> Decision:
    """The strategy for a seat whose process just failed (``checkpoint_error``: its shard did not
    load; ``seat_out``: why the seat was already out of placement, if it was)."""
    if not gpu_healthy:
        return Decision(SHRINK, f"GPU unhealthy: {gpu_problem}")
    if checkpoint_error:
        return Decision(SHRINK, f"checkpoint failed to load ({checkpoint_error}): out until its files change")
    if seat_out:
        return Decision(SHRINK, f"seat already out: {seat_out}")
    if not budget_left:
        return Decision(SHRINK, "restart budget spent")
    if spare_ready:
        return Decision(SPARE, "warm spare ready")
    return Decision(RESTART, "no warm spare ready: cold restart in place")


@dataclass
class RestartBudget:
    """At most ``budget`` restarts in any ``window`` seconds (counted when taken)."""

    budget: int
    window: float
    taken: deque[float] = field(default_factory=deque)

    def take(self, now: float | None = None) -> bool:
        """Count one restart if the window allows it; False when the budget is spent."""
        now = time.monotonic() if now is None else now
        while self.taken and now - self.taken[0] > self.window:
            self.taken.popleft()
        if len(self.taken) >= self.budget:
            return False
        self.taken.append(now)
        return True

    def left(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        return self.budget - sum(1 for t in self.taken if now - t <= self.window)
