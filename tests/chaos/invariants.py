"""What must hold after every fault, checked against the real deployment's records.

Each check returns a list of violations (empty: it held), each a sentence naming what broke."""

from __future__ import annotations

import time
from collections import defaultdict

import psutil

from rallypoint.rendezvous.records import Plan
from rallypoint.worker.title import describe
from tests.chaos.deployment import Deployment
from tests.chaos.load import Load, Outcome
from tests.chaos.scenarios import Fault

WORKER_KINDS = ("groups_built", "shard_loaded", "serving", "first_token")


def requests_intact(load: Load, outcomes: list[Outcome]) -> list[str]:
    """Every accepted request completed, with the failure-free run's tokens."""
    out = []
    for o in load.lost(outcomes):
        why = o.error or f"tokens differ from the reference after {len(o.tokens)} token(s)"
        out.append(f"request for prompt {o.prompt} lost: {why}")
    return out


# 16 tokens take under a second when serving; a recovery on a starved CPU host, under 30 s.
STUCK_AFTER = 60.0


def nothing_stuck(load: Load, longer_than: float = STUCK_AFTER) -> list[str]:
    """No request is still waiting after ``longer_than`` seconds: a request that no fault lost
    but nobody serves either (held by a process that will never drive again) shows up here."""
    return [f"a request has been in flight for {age:.0f} s" for age in load.stuck(longer_than)]


def one_plan_per_generation(d: Deployment) -> list[str]:
    """No generation's plan was written twice with different content; generations only grow."""
    out = []
    seen: dict[str, bytes] = {}
    last_gen = 0
    for w in sorted(d.plan_writes, key=lambda w: w.revision):
        gen = Plan.from_json(w.key, w.value).gen
        if w.key in seen:
            if seen[w.key] != w.value:
                out.append(f"two different plans written for generation {gen}")
        elif gen <= last_gen:
            out.append(f"generation {gen} written after generation {last_gen}")
        seen[w.key] = w.value
        last_gen = max(last_gen, gen)
    return out


def no_orphans(d: Deployment, grace: float = 5.0) -> list[str]:
    """Every worker process belongs to a live rallyd of the deployment (dead daemons' workers
    died with them)."""
    deadline = time.monotonic() + grace
    while True:
        daemons = {dp.pid for n, dp in d.daemons.items() if d.alive(n)}
        orphans = []
        for p in d.processes():
            try:
                if describe(p.cmdline()) is not None and p.ppid() not in daemons:
                    orphans.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        if not orphans or time.monotonic() > deadline:
            return [f"worker pid {pid} has no live rallyd" for pid in orphans]
        time.sleep(0.2)


def no_stale_writer(d: Deployment, fault: Fault) -> list[str]:
    """None of the processes the fault hit wrote an event into a later generation; and each
    later generation's per-rank events come from one process per seat."""
    out = []
    writers: dict[tuple[int, str], set[int]] = defaultdict(set)
    for e in d.events():
        hit_in = fault.hit_in.get(e.pid, fault.gen_before)
        rejoined = fault.healed_at is not None and e.gen > fault.healed_at  # a partition healed: back in
        if e.pid in fault.victims and e.gen > hit_in and not rejoined:
            out.append(f"pid {e.pid}, hit in generation {hit_in}, wrote {e.kind} into generation {e.gen}")
        if e.gen > fault.gen_before and e.kind in WORKER_KINDS and e.pid:
            writers[(e.gen, e.by)].add(e.pid)
    for (gen, seat), pids in writers.items():
        if len(pids) > 1:
            out.append(f"generation {gen} seat {seat} written by {len(pids)} processes {sorted(pids)}")
    return out


def every_node_up(d: Deployment, grace: float = 10.0) -> list[str]:
    """Every node's rallyd runs once the fault is over (a restart on failure counts as running)."""
    deadline = time.monotonic() + grace
    while (down := [n for n in d.names() if not d.alive(n)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [f"rallyd of {n} is not running after the fault" for n in down]


def check_all(d: Deployment, load: Load, fault: Fault, outcomes: list[Outcome], serving: bool) -> list[str]:
    problems = requests_intact(load, outcomes) + nothing_stuck(load) + one_plan_per_generation(d) + no_orphans(d)
    problems += no_stale_writer(d, fault) + every_node_up(d)
    if not serving:
        problems.append("the cluster did not end serving")
    return problems
