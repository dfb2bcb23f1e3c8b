"""How rallyctl shows a cluster: plain functions from etcd records to text (no I/O here).

``status`` is one table in the spirit of ``patronictl list``: read at a glance at 3 a.m.
``plan`` is one row per rank with its grid position.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from rallypoint.protocol.grid import coords_of
from rallypoint.recovery.events import Event
from rallypoint.recovery.machine import MILESTONES, SERVING, breakdown, operator_state
from rallypoint.rendezvous.records import NodeRecord, Plan

STALE_AFTER = 3.0  # seconds without a status write before a node's row says "stale"


def clock(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S.%f")[:-3]


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    return "\n".join([line, fmt.format(*headers), line, *(fmt.format(*r) for r in rows), line])


def format_plan(plan: Plan) -> str:
    """A plan as a small table, one row per rank (with its replica's role when serving is
    disaggregated, and the expert slots it holds and serves when a mixture of experts is spread
    over every replica)."""
    m = plan.experts
    lines = [f"generation {plan.gen}: world {plan.world_size} = TP {plan.tp} x PP {plan.pp} x DP {plan.dp}"
             f"  (leader {plan.leader}; {plan.reason})"]
    if m is not None:
        lines.append(f"  experts over every replica, in {m.slots} slots")
    roles = bool(plan.prefill_replicas)
    lines.append(f"  {'rank':>4}  {'node':<10} {'local':>5}  {'dp':>2} {'pp':>2} {'tp':>2}"
                 + ("  role" if roles else "") + ("  slots held   serves" if m is not None else ""))
    for r in plan.ranks:
        at = coords_of(r.rank, plan.tp, plan.pp)
        line = f"  {r.rank:>4}  {r.node:<10} {r.local_rank:>5}  {at.dp:>2} {at.pp:>2} {at.tp:>2}"
        if roles:
            line += f"  {plan.role_of(at.dp):<7}"
        if m is not None:
            line += f"  {','.join(map(str, m.holds[r.rank])) or '-':<11}  {','.join(map(str, m.served_by(r.rank))) or '-'}"
        lines.append(line)
    return "\n".join(lines)


def cluster_state(recovery: dict[str, Any] | None, plan: Plan | None) -> str:
    """serving / recovering (<phase>) / degraded / failed / forming."""
    if plan is None:
        return "forming"
    phase = str((recovery or {}).get("phase", SERVING))
    state = operator_state(phase, (recovery or {}).get("degraded"))
    return f"{state} ({phase})" if state == "recovering" else state


def node_health(rec: NodeRecord | None, status: dict[str, Any] | None, cordoned: bool, draining: bool,
                now: float) -> str:
    if rec is None:
        return "gone"
    parts = []
    if status is None or now - float(status.get("time", 0)) > STALE_AFTER:
        parts.append("stale")
    if cordoned or rec.cordoned:
        parts.append("cordoned")
    if draining:
        parts.append("draining")
    bad = (status or {}).get("bad_seats") or {str(s): "bad" for s in rec.bad_seats}
    if bad:
        parts.append("bad seats " + ",".join(sorted(bad)))
    return ", ".join(parts) or "ok"


def status_data(cluster: str, records: dict[str, NodeRecord], statuses: dict[str, dict[str, Any]],
                plan: Plan | None, leader: str | None, recovery: dict[str, Any] | None,
                cordoned: set[str], draining: set[str], now: float | None = None) -> dict[str, Any]:
    """Everything ``rallyctl status`` shows, as one JSON-able dict."""
    now = time.time() if now is None else now
    names = sorted(set(records) | set(statuses) | (set(plan.members) if plan else set()))
    nodes = []
    for n in names:
        rec, st = records.get(n), statuses.get(n)
        ranks = [s.rank for s in plan.ranks if s.node == n] if plan else []
        nodes.append({
            "node": n, "host": rec.host if rec else None, "gpus": rec.gpus if rec else None,
            "slots": rec.slots if rec else None, "ranks": ranks, "role": "leader" if n == leader else "member",
            "health": node_health(rec, st, n in cordoned, n in draining, now),
            "heartbeat_age": round(now - float(st["time"]), 3) if st else None,
            "restarts": st.get("restarts", 0) if st else None,
            "spares": st.get("spares", 0) if st else None, "workers": st.get("workers", []) if st else [],
            "gateway": gateway_view(st),
        })
    seats = []
    if plan is not None:
        pids = {(x["node"], w["local_rank"]): w for x in nodes for w in x["workers"]}
        for s in plan.ranks:
            w = pids.get((s.node, s.local_rank), {})
            seats.append({"rank": s.rank, "seat": f"{s.node}/{s.local_rank}", "pid": w.get("pid"),
                          "state": w.get("state", "unknown"), "serves": serves(plan, s.rank)})
    return {"cluster": cluster, "state": cluster_state(recovery, plan), "generation": plan.gen if plan else 0,
            "leader": leader, "layout": ({"tp": plan.tp, "pp": plan.pp, "dp": plan.dp, "world_size": plan.world_size,
                                          "reason": plan.reason} if plan else None),
            "recovery": recovery, "nodes": nodes, "ranks": seats}


def serves(plan: Plan, rank: int) -> str | None:
    """What a rank does beyond its shard: its replica's role when serving is disaggregated, the
    expert slots it serves when the experts are shared by every replica; None otherwise."""
    parts = []
    if plan.prefill_replicas:
        parts.append(plan.role_of(plan.replica_of(rank)))
    if plan.experts is not None:
        parts.append("expert slots " + (",".join(map(str, plan.experts.served_by(rank))) or "none"))
    return "; ".join(parts) or None


def gateway_view(status: dict[str, Any] | None) -> str | None:
    """How a node's gateway runs: ``thread``, ``4 processes`` (``3 of 4 processes, 2 restarts``
    when one is down or was started again), or None without one (or no status)."""
    if not status or not status.get("gateway"):
        return None
    gp = status.get("gateway_processes")
    if not isinstance(gp, dict):
        return "thread"
    n, alive, restarts = int(gp.get("processes", 0)), int(gp.get("alive", 0)), int(gp.get("restarts", 0))
    text = f"{n} processes" if alive == n else f"{alive} of {n} processes"
    return text + (f", {restarts} restart{'s' if restarts != 1 else ''}" if restarts else "")


def format_status(d: dict[str, Any]) -> str:
    lay = d["layout"]
    head = f"Cluster: {d['cluster']}  generation {d['generation']}  state: {d['state']}  leader: {d['leader'] or '-'}"
    out = [head]
    if lay:
        out.append(f"Layout: TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']} = {lay['world_size']} ranks "
                   f"(plan reason: {lay['reason']})")
    rows = [[n["node"], n["host"] or "-", str(n["gpus"] if n["gpus"] is not None else "-"),
             ",".join(map(str, n["ranks"])) or "-", n["role"], n["health"],
             f"{n['heartbeat_age']:.1f}s" if n["heartbeat_age"] is not None else "-",
             str(n["restarts"] if n["restarts"] is not None else "-"), str(n["spares"] if n["spares"] is not None else "-"),
             n.get("gateway") or "-"]
            for n in d["nodes"]]
    out.append(table(["Node", "Host", "GPUs", "Ranks", "Role", "Health", "Heartbeat", "Restarts", "Spares", "Gateway"],
                     rows))
    if d["ranks"]:
        extra = any(r.get("serves") for r in d["ranks"])
        out.append(table(["Rank", "Seat", "PID", "State"] + (["Serves"] if extra else []),
                         [[str(r["rank"]), r["seat"], str(r["pid"] or "-"), r["state"]]
                          + ([r.get("serves") or "-"] if extra else []) for r in d["ranks"]]))
    rec = d["recovery"]
    if rec:
        line = f"Recovery: {rec['phase']} since {clock(rec['since'])} (gen {rec['gen']})" if rec.get("since") else \
            f"Recovery: {rec['phase']}"
        if rec.get("why"):
            line += f"; last failure: {rec['why']}"
        if rec.get("degraded"):
            line += f"; degraded: {rec['degraded']}"
        out.append(line)
    return "\n".join(out)


def describe(e: Event) -> str:
    d = e.detail
    if e.kind in ("rank_failed", "abort_ordered", "replan_requested", "cannot_plan"):
        return str(d.get("reason", ""))
    if e.kind == "suspect_named":
        return f"{d.get('seat')} {d.get('verdict')} in {d.get('group')}: {d.get('why')}"
    if e.kind == "replacement":
        return f"seat {e.by}/{d.get('local_rank')}: {d.get('strategy')} ({d.get('why')})"
    if e.kind == "seat_bad":
        return f"seat {e.by}/{d.get('local_rank')} left out: {d.get('reason')}"
    if e.kind == "plan_written":
        return f"TP {d.get('tp')} x PP {d.get('pp')} x DP {d.get('dp')}: {d.get('reason')}"
    if e.kind in ("groups_built", "serving"):
        return f"rank {d.get('rank')}" + (f", carried {d['carried']}" if d.get("carried") else "")
    if e.kind == "shard_loaded":
        return f"rank {d.get('rank')}: " + (f"failed: {d['error']}" if d.get("error") else f"{d.get('seconds')}s")
    if e.kind in ("draining", "drained"):
        return f"replicas {d.get('replicas')}" + (f", {d.get('seconds')}s" if "seconds" in d else "")
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items()))


def format_event(e: Event) -> str:
    return f"{clock(e.at)}  gen {e.gen:<4} {e.by:<10} {e.kind:<17} {describe(e)}"


def recoveries(events: list[Event]) -> list[dict[str, Any]]:
    """One summary per failed generation: its milestones in seconds after the failure was seen."""
    out = []
    for gen in sorted({e.gen for e in events if e.kind == "rank_failed"}):
        b = breakdown(events, gen)
        suspects = sorted({str(e.detail.get("seat")) for e in events
                           if e.gen == gen and e.kind == "suspect_named"})
        failed = [e for e in events if e.gen == gen and e.kind == "rank_failed"]
        out.append({"failed_gen": gen, "at": failed[0].at, "why": failed[0].detail.get("reason"),
                    "suspects": suspects, "seconds": b})
    return out


def format_recovery(r: dict[str, Any]) -> str:
    names = {"abort_ordered": "abort", "planned": "plan", "groups_built": "rebuild", "shard_loaded": "load",
             "first_token": "first token"}
    parts = [f"{names.get(m, m)} {r['seconds'][m]:.3f}s" for m in MILESTONES
             if m in names and r["seconds"].get(m) is not None]
    line = f"recovery of gen {r['failed_gen']} ({r['why']}): " + (", ".join(parts) or "under way")
    if r["suspects"]:
        line += f"; suspects {', '.join(r['suspects'])}"
    return line
