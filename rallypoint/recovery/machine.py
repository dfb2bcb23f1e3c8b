"""The recovery state machine: the cluster's phase, folded from its events (pure logic).

    serving -> aborting -> planning -> rebuilding -> loading -> serving
                                  \\-> failed (no layout fits; leaves when capacity returns)

A failure of generation N moves the cluster to *aborting*; the re-plan request to *planning*;
the release of N+1 to *rebuilding*; the first shard loaded to *loading*; the first token of N+1
(or, with no request in flight, every rank serving) back to *serving*. ``degraded`` is not a
phase but a flag: serving with fewer replicas than the spec asks for, or a seat left down.

The leader feeds every event of its cluster into one ``RecoveryMachine`` and publishes its state
(``status/recovery``); ``breakdown`` turns one recovery's events into the figures the recovery
benchmark and ``rallyctl events`` report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rallypoint.recovery import events as ev
from rallypoint.recovery.events import Event

SERVING, ABORTING, PLANNING, REBUILDING, LOADING, FAILED = (
    "serving", "aborting", "planning", "rebuilding", "loading", "failed")
PHASES = (SERVING, ABORTING, PLANNING, REBUILDING, LOADING, FAILED)

# Which phases each phase may move to. Anything may fail, and a new failure during a recovery
# starts the recovery over (a second rank dies while the first one's plan is being built).
ALLOWED = {
    SERVING: {ABORTING, PLANNING, REBUILDING, FAILED},
    ABORTING: {PLANNING, REBUILDING, FAILED},
    PLANNING: {ABORTING, REBUILDING, FAILED},
    REBUILDING: {ABORTING, PLANNING, LOADING, SERVING, FAILED},
    LOADING: {ABORTING, PLANNING, SERVING, FAILED},
    FAILED: {ABORTING, PLANNING, REBUILDING, SERVING},
}


@dataclass(frozen=True)
class Transition:
    """One phase change, caused by ``event``.

    Attributes:
        took: seconds spent in ``previous`` (0 when unknown; clocks of different writers may
            disagree by a little, so never negative).
        cause: when the transition leaves ``serving``, why a recovery started (``cause_of``).
        recovery_seconds: when it enters ``serving`` again, seconds since the recovery started.
    """

    phase: str
    previous: str
    gen: int
    at: float
    event: Event
    took: float = 0.0
    cause: str | None = None
    recovery_seconds: float | None = None


# Why a recovery started: stable label values (``rallypoint_recoveries_total{cause=...}``).
CAUSES = ("rank_exit", "rank_hung", "rank_dead", "abort", "replan", "membership", "formation")


def cause_of(e: Event, gen: int) -> str:
    """Name the cause of a recovery that ``e`` starts while the cluster serves generation ``gen``."""
    if e.kind == ev.RANK_FAILED:
        return "rank_exit"
    if e.kind == ev.SUSPECT_NAMED:
        return "rank_hung" if e.detail.get("verdict") == "stuck" else "rank_dead"
    if e.kind == ev.ABORT_ORDERED:
        return "abort"
    if e.kind == ev.REPLAN_REQUESTED:
        return "replan"
    return "formation" if gen == 0 else "membership"  # a plan with no failure: nodes came or went


@dataclass
class RecoveryMachine:
    """The cluster's phase as its events arrive (any order within a generation; older ignored).

    Attributes:
        phase: the current phase.
        gen: the generation the phase is about (the failed one while aborting/planning, the new
            one from rebuilding on).
        since: wall-clock time of the event that entered the phase.
        why: the reason of the last failure or of ``failed``.
        degraded: why the cluster serves below its spec, or None.
        history: every transition, oldest first.
    """

    phase: str = SERVING
    gen: int = 0
    since: float = 0.0
    why: str = ""
    degraded: str | None = None
    history: list[Transition] = field(default_factory=list)
    started: float | None = None  # when the recovery under way left serving
    _world: dict[int, int] = field(default_factory=dict)  # gen -> world size, from its plan
    _serving: dict[int, set[str]] = field(default_factory=dict)  # gen -> ranks that said serving

    def apply(self, e: Event) -> Transition | None:
        """Feed one event; return the transition it caused, if any."""
        if e.kind == ev.PLAN_WRITTEN and isinstance(e.detail.get("world_size"), int):
            self._world[e.gen] = e.detail["world_size"]
        if e.kind == ev.SERVING:
            self._serving.setdefault(e.gen, set()).add(e.by)
        nxt = self._next_phase(e)
        if nxt is None:
            self._note(e)
            return None
        if nxt not in ALLOWED[self.phase] or nxt == self.phase:
            self._note(e)
            return None
        took = max(0.0, e.at - self.since) if self.since else 0.0
        cause = cause_of(e, self.gen) if self.phase == SERVING else None
        if self.phase == SERVING:
            self.started = e.at
        done = max(0.0, e.at - self.started) if nxt == SERVING and self.started is not None else None
        if nxt == SERVING:
            self.started = None
        t = Transition(nxt, self.phase, e.gen, e.at, e, took, cause, done)
        self.phase, self.since = nxt, e.at
        self.gen = max(self.gen, e.gen)
        self.history.append(t)
        self._note(e)
        return t

    def _next_phase(self, e: Event) -> str | None:
        if e.gen < self.gen and e.kind not in (ev.RANK_FAILED, ev.ABORT_ORDERED):
            return None  # a late event of an older generation
        if e.kind in (ev.RANK_FAILED, ev.ABORT_ORDERED) or (e.kind == ev.SUSPECT_NAMED
                                                          and e.detail.get("verdict") in ("dead", "stuck")):
            if e.gen < self.gen:
                return None  # the failure of a generation already replaced
            return ABORTING
        if e.kind in (ev.REPLAN_REQUESTED, ev.PLAN_WRITTEN):
            return PLANNING if self.phase in (SERVING, ABORTING, FAILED) or e.gen > self.gen else None
        if e.kind == ev.CANNOT_PLAN:
            return FAILED
        if e.kind == ev.LAYOUT_OK:
            return SERVING if self.phase == FAILED else None
        if e.kind == ev.RELEASED:
            return REBUILDING if self.phase != SERVING or e.gen > self.gen else None
        if e.kind == ev.SHARD_LOADED:
            return LOADING if self.phase == REBUILDING else None
        all_serving = e.kind == ev.SERVING and len(self._serving.get(e.gen, ())) >= self._world.get(e.gen, 1 << 30)
        if e.kind in (ev.FIRST_TOKEN, ev.FIRST_STEP) or all_serving:
            return SERVING if self.phase in (REBUILDING, LOADING) else None
        return None

    def _note(self, e: Event) -> None:
        if e.kind in (ev.RANK_FAILED, ev.ABORT_ORDERED, ev.CANNOT_PLAN):
            self.why = str(e.detail.get("reason", self.why))
        if e.kind == ev.PLAN_WRITTEN:
            short = e.detail.get("dp") is not None and e.detail.get("dp_wanted") not in (None, 0, e.detail.get("dp"))
            self.degraded = (f"serving dp={e.detail['dp']} of {e.detail['dp_wanted']} replicas"
                             if short else None)
        if e.kind == ev.SEAT_BAD:
            seat = f"seat {e.by}/{e.detail.get('local_rank')} down: {e.detail.get('reason')}"
            self.degraded = seat if self.degraded is None else f"{self.degraded}; {seat}"

    def state(self) -> dict[str, object]:
        """What ``status/recovery`` holds."""
        return {"phase": self.phase, "gen": self.gen, "since": self.since, "why": self.why,
                "degraded": self.degraded}


def operator_state(phase: str, degraded: str | None) -> str:
    """The one word an operator reads first: serving, recovering, degraded or failed."""
    if phase == FAILED:
        return "failed"
    if phase != SERVING:
        return "recovering"
    return "degraded" if degraded else "serving"


# -- one recovery's figures -------------------------------------------------------------------

MILESTONES = ("detected", "abort_ordered", "replacement", "planned", "released", "groups_built",
              "shard_loaded", "serving", "first_token")


def breakdown(events: list[Event], failed_gen: int, t0: float | None = None) -> dict[str, float | None]:
    """Seconds from the failure of ``failed_gen`` to each milestone of its recovery.

    ``detected`` is the failure event itself, against the kill time when the event carries it
    (``detail.killed_at``) or the caller passes it as ``t0``, else 0. Per-rank milestones (groups built, shard
    loaded, serving) are the *last* rank's, since the replica serves only when all of its ranks do.
    """
    fail = [e for e in events if e.gen == failed_gen and e.kind == ev.RANK_FAILED]
    if not fail:
        return {m: None for m in MILESTONES}
    if t0 is None:
        t0 = float(fail[0].detail.get("killed_at", fail[0].at))
    new_gen = min((e.gen for e in events if e.kind == ev.PLAN_WRITTEN and e.gen > failed_gen), default=None)

    def first(kind: str, gen: int | None) -> float | None:
        ts = [e.at for e in events if e.kind == kind and e.gen == gen]
        return min(ts) - t0 if ts else None

    def last(kind: str, gen: int | None) -> float | None:
        ts = [e.at for e in events if e.kind == kind and e.gen == gen]
        return max(ts) - t0 if ts else None

    return {
        "detected": fail[0].at - t0,
        "abort_ordered": first(ev.ABORT_ORDERED, failed_gen),
        "replacement": first(ev.REPLACEMENT, failed_gen),
        "planned": first(ev.PLAN_WRITTEN, new_gen),
        "released": first(ev.RELEASED, new_gen),
        "groups_built": last(ev.GROUPS_BUILT, new_gen),
        "shard_loaded": last(ev.SHARD_LOADED, new_gen),
        "serving": last(ev.SERVING, new_gen),
        "first_token": first(ev.FIRST_TOKEN, new_gen) if any(x.kind == ev.FIRST_TOKEN for x in events)
        else first(ev.FIRST_STEP, new_gen),  # the all-reduce probe's first call
    }
