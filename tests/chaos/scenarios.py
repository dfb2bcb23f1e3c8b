"""The faults: each injects one into a running deployment and says what to expect afterwards.

A scenario returns a ``Fault``: when it struck, the generation it struck, the processes it hit (none
of them may write into a later generation), whether a new generation must follow, and how to put
the deployment back (restart a node, an etcd member, a shard) once the recovery has been measured.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from rallypoint.recovery import events as ev
from rallypoint.testing.netns import NetLab
from rallypoint.worker.checkpoint import MOE_EXPERTS
from tests.chaos.deployment import Deployment


@dataclass
class Fault:
    name: str
    at: float  # wall clock
    gen_before: int
    victims: list[int] = field(default_factory=list)  # pids hit
    hit_in: dict[int, int] = field(default_factory=dict)  # pid -> newest generation when hit (else gen_before)
    replan: bool = True  # a newer generation must serve afterwards
    restore: Callable[[], None] = lambda: None
    restore_first: bool = False  # no replica fits without what was hit: serving waits for the restore
    after: Callable[[], list[str]] = list  # checks of its own once the cluster serves again
    note: str = ""
    problems: list[str] = field(default_factory=list)  # the fault did not strike as its name says
    healed_at: int | None = None  # a partition: the newest generation when it healed (the victims may rejoin later ones)


def _gen(d: Deployment) -> int:
    plan = d.latest_plan()
    return plan.gen if plan else 0


def _pick_rank(d: Deployment, rng: random.Random, timeout: float = 60.0) -> tuple[int, str, int]:
    deadline = time.monotonic() + timeout
    while not (ranks := d.rank_pids()) and time.monotonic() < deadline:
        time.sleep(0.1)  # the daemons' statuses lag the newest plan by up to a second
    if not ranks:
        raise RuntimeError(f"no rank of the newest plan reported by any daemon in {timeout:g}s")
    rank = rng.choice(sorted(ranks))
    node, pid = ranks[rank]
    return rank, node, pid


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _restart_node(d: Deployment, node: str) -> Callable[[], None]:
    """Start ``node`` again once its killed rallyd is gone (once, however often it is called)."""
    old = d.daemons[node]

    def restore() -> None:
        if d.daemons.get(node) is not old:
            return  # restarted already
        try:
            old.proc.wait(timeout=10)  # SIGKILL is not instant: do not mistake it for alive
        except subprocess.TimeoutExpired:
            old.stop()
        d.start_node(node)
    return restore


def _wait_event(d: Deployment, kinds: tuple[str, ...], after: float, min_gen: int = 0, timeout: float = 20.0) -> bool:
    """Block until an event of ``kinds`` (of generation ``min_gen`` or later) is recorded after
    ``after``; False if none came within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e.kind in kinds and e.at >= after and e.gen >= min_gen for e in d.events()):
            return True
        time.sleep(0.02)
    return False


def kill_rank(d: Deployment, rng: random.Random) -> Fault:
    rank, node, pid = _pick_rank(d, rng)
    gen, t = _gen(d), time.time()
    _signal(pid, signal.SIGKILL)
    return Fault("kill_rank", t, gen, [pid], note=f"rank {rank} ({node}, pid {pid})")


def kill_ep_rank(d: Deployment, rng: random.Random) -> Fault:
    """SIGKILL a rank of an expert-parallel group (a MoE deployment: each replica's experts are
    split over its TP ranks): the survivors rebuild that group with the replacement, which loads
    only its own share of the experts, the survivors load nothing, and the streams in flight
    finish with the failure-free tokens."""
    rank, node, pid = _pick_rank(d, rng)
    gen, t = _gen(d), time.time()
    _signal(pid, signal.SIGKILL)
    where = f"EP rank {rank} of every replica's" if d.ep == "dp" else f"EP rank {rank % d.tp} of replica {rank // d.tp}"
    f = Fault("kill_ep_rank", t, gen, [pid], note=f"{where} ({node}, pid {pid})")
    if d.arch != "moe" or (d.tp < 2 and d.ep != "dp"):
        f.problems.append(f"the deployment has no expert-parallel group (arch {d.arch}, TP {d.tp})")

    def loads() -> list[str]:
        plan = d.latest_plan()
        if plan is None or plan.gen <= gen:
            return [f"no generation after {gen} to check the expert loads of"]
        loaded = [e for e in d.events() if e.kind == ev.SHARD_LOADED and e.gen == plan.gen]
        if d.ep == "dp":  # a restart reads what the seat held, a shrink nothing (two copies of each expert)
            read = [e for e in loaded if e.detail.get("experts_read")]
            problems = [f"gen {plan.gen}: rank {e.detail.get('rank')} read experts {e.detail['experts_read']}, "
                        f"not what it holds ({e.detail.get('experts_held')})" for e in read
                        if e.detail["experts_read"] != e.detail.get("experts_held")]
            if len(read) > 1:
                problems.append(f"gen {plan.gen}: {len(read)} ranks read experts; the replacement alone should")
            return problems
        moved = [e for e in loaded if e.detail.get("seconds", 0) > 0]
        problems = [f"gen {plan.gen}: rank {e.detail.get('rank')} loaded experts {e.detail.get('experts')}, "
                    f"not one EP rank's share of {d.tp}" for e in moved
                    if not e.detail.get("experts") or len(range(*e.detail["experts"])) * d.tp != MOE_EXPERTS]
        if len(moved) != 1:
            problems.append(f"gen {plan.gen}: {len(moved)} ranks loaded weights; the replacement alone should")
        return problems

    f.after = loads
    return f


def stop_rank(d: Deployment, rng: random.Random) -> Fault:
    rank, node, pid = _pick_rank(d, rng)
    gen, t = _gen(d), time.time()
    _signal(pid, signal.SIGSTOP)
    threading.Timer(5.0, _signal, (pid, signal.SIGCONT)).start()  # if it still exists, it wakes up
    return Fault("stop_rank", t, gen, [pid], note=f"rank {rank} ({node}, pid {pid}) stopped for 5 s")


def kill_daemon(d: Deployment, rng: random.Random) -> Fault:
    _, node, pid = _pick_rank(d, rng)
    workers = [p.pid for p in psutil.Process(d.daemons[node].pid).children(recursive=True)]
    room = d.room_without_a_node()
    gen, t = _gen(d), time.time()
    _signal(d.daemons[node].pid, signal.SIGKILL)  # its workers follow it (parent-death signal)
    return Fault("kill_daemon", t, gen, workers, restore=_restart_node(d, node), restore_first=not room,
                 note=f"rallyd of {node}" + ("" if room else "; restarted at once (no room without it)"))


def kill_node(d: Deployment, rng: random.Random) -> Fault:
    _, node, _ = _pick_rank(d, rng)
    room = d.room_without_a_node()
    gen, t = _gen(d), time.time()
    victims = d.daemons[node].kill_node()
    return Fault("kill_node", t, gen, victims, restore=_restart_node(d, node), restore_first=not room,
                 note=f"{node}: rallyd and its workers" + ("" if room else "; restarted at once (no room without it)"))


def _etcd_kill(d: Deployment, leader: bool) -> Fault:
    lead = d.etcd.leader()
    member = lead if leader else next(m for m in d.etcd.members if m is not lead and m.alive)
    gen, t = _gen(d), time.time()
    d.etcd.kill(member)

    def restore() -> None:
        d.etcd.restart(member)

    return Fault("etcd_leader" if leader else "etcd_follower", t, gen, replan=False, restore=restore,
                 note=f"etcd member {member.name}")


def etcd_leader(d: Deployment, rng: random.Random) -> Fault:
    return _etcd_kill(d, True)


def etcd_follower(d: Deployment, rng: random.Random) -> Fault:
    return _etcd_kill(d, False)


def etcd_all_stop(d: Deployment, rng: random.Random) -> Fault:
    gen, t = _gen(d), time.time()
    for m in d.etcd.members:
        _signal(m.pid, signal.SIGSTOP)
    time.sleep(10.0)  # deliberate: the outage lasts 10 s (longer than the daemons' 3 s leases)
    for m in d.etcd.members:
        _signal(m.pid, signal.SIGCONT)
    return Fault("etcd_all_stop", t, gen, replan=False, note="every etcd member stopped for 10 s")


def slow_rank(d: Deployment, rng: random.Random) -> Fault:
    rank, node, pid = _pick_rank(d, rng)
    gen, t = _gen(d), time.time()
    for _ in range(5):  # deliberate: the fault is this timing (stalls shorter than the 1 s deadline floor)
        _signal(pid, signal.SIGSTOP)
        time.sleep(0.3)
        _signal(pid, signal.SIGCONT)
        time.sleep(0.7)
    return Fault("slow_rank", t, gen, replan=False, note=f"rank {rank} ({node}) stopped 0.3 s in every second, 5 times")


def corrupt_shard(d: Deployment, rng: random.Random) -> Fault:
    """The rank's node's copy of the weights is truncated, then the rank dies: its restarts fail
    to load (a clear error each time), the seat is marked bad, and the replica moves."""
    rank, node, pid = _pick_rank(d, rng)
    weights = d.model_of(node) / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    gen, t = _gen(d), time.time()
    _signal(pid, signal.SIGKILL)

    def restore() -> None:
        weights.write_bytes(good)

    return Fault("corrupt_shard", t, gen, [pid], restore=restore, note=f"{node}'s weights truncated; rank {rank} killed")


def second_failure(d: Deployment, rng: random.Random) -> Fault:
    """A second rank dies while the first one's recovery is under way."""
    rank, node, pid = _pick_rank(d, rng)
    others = {r: v for r, v in d.rank_pids().items() if r != rank}
    gen, t = _gen(d), time.time()
    _signal(pid, signal.SIGKILL)
    problems = [] if _wait_event(d, (ev.ABORT_ORDERED,), t) else ["no abort order within 20 s of the first kill"]
    time.sleep(0.3)  # deliberate: the second kill lands 0.3 s into the recovery, not with the first
    victims, now = [pid], _gen(d)  # the survivors may be in the next generation already
    t2 = time.time()
    for _, other in others.values():
        _signal(other, signal.SIGKILL)
        victims.append(other)
    if any(e.kind == ev.SERVING and e.gen > gen and e.at <= t2 for e in d.events()):
        problems.append("the first recovery was over before the second kill: no second failure during one")
    return Fault("second_failure", t, gen, victims, hit_in={v: now for v in victims[1:]}, problems=problems,
                 note=f"rank {rank}, then {sorted(others)} 0.3 s after the abort order")


def kill_in_rendezvous(d: Deployment, rng: random.Random) -> Fault:
    """A rank dies, and another dies the moment the next plan is written (mid-rendezvous)."""
    rank, node, pid = _pick_rank(d, rng)
    others = {r: v for r, v in d.rank_pids().items() if r != rank}
    gen, t = _gen(d), time.time()
    _signal(pid, signal.SIGKILL)
    written = _wait_event(d, (ev.PLAN_WRITTEN,), t, min_gen=gen + 1)
    victims, now = [pid], _gen(d)  # the others are members of gen+1 (and may have written into it)
    for _, other in others.values():
        _signal(other, signal.SIGKILL)
        victims.append(other)
    problems = [] if written else [
        f"no plan for generation {gen + 1} within 20 s: the second kill was not mid-rendezvous"]
    return Fault("kill_in_rendezvous", t, gen, victims, hit_in={v: now for v in victims[1:]}, problems=problems,
                 note="second kill as generation gen+1 was written")


def join_leave(d: Deployment, rng: random.Random) -> Fault:
    """A node joins while serving (room for a second replica: the layout grows), then leaves
    with SIGTERM (drain: its replica finishes its requests; the layout shrinks back)."""
    name = f"n{d.nodes + 1}"
    gen, t = _gen(d), time.time()
    joined = d.start_node(name)
    d.wait_serving(90, after_gen=gen)
    joined.signal(signal.SIGTERM)
    try:
        joined.proc.wait(timeout=60)
    except Exception:
        joined.stop()
    del d.daemons[name]
    return Fault("join_leave", t, gen, note=f"{name} joined, then left with SIGTERM")


# -- partitions (a deployment in network namespaces: tests.chaos.run --netns) ------------------

ETCD = ("e1", "e2", "e3")


def _lab(d: Deployment) -> NetLab:
    if d.lab is None:
        raise RuntimeError("a partition scenario needs the deployment in network namespaces (--netns)")
    return d.lab


def _workers_of(d: Deployment, node: str) -> list[int]:
    return [p.pid for p in psutil.Process(d.daemons[node].pid).children(recursive=True)]


def _partition(d: Deployment, name: str, pairs: list[tuple[str, str]], gen: int, t: float, victims: list[int],
               hold: float = 0.0, replan: bool = True, note: str = "") -> Fault:
    """Cut ``pairs``; heal them at the restore (after the recovery was measured) or, with ``hold``,
    after ``hold`` seconds. The victims may write into the generations made after the heal only."""
    lab = _lab(d)
    for a, b in pairs:
        lab.cut(a, b)
    fault = Fault(name, t, gen, victims, replan=replan, note=note)

    def heal() -> None:
        if fault.healed_at is None:
            for a, b in pairs:
                lab.heal(a, b)
            fault.healed_at = _gen(d)

    fault.restore = heal
    if hold:
        time.sleep(hold)  # deliberate: the partition's length is the fault
        heal()
    return fault


def partition_node_etcd(d: Deployment, rng: random.Random) -> Fault:
    """A node holding a rank is cut from every etcd member, alive and still reaching its peers and
    the clients, until the others have served a generation without it. Its lease expires, so the
    others re-plan; its workers, fenced off, must not write into any generation made while it was
    cut; healed, it joins again."""
    rank, node, pid = _pick_rank(d, rng)
    gen, t = _gen(d), time.time()
    return _partition(d, "partition_node_etcd", [(node, e) for e in ETCD], gen, t, _workers_of(d, node),
                      note=f"{node} (rank {rank}) cut from etcd")


def partition_tp_peer(d: Deployment, rng: random.Random) -> Fault:
    """A rank's node is cut from the node of its TP peer; both still reach etcd. The step's
    collectives miss their deadline, the diagnosis names the other rank of the pair unreachable
    (alive, heartbeating, inside the same collective), and a new generation serves on a placement
    whose ranks reach each other."""
    plan = d.latest_plan()
    rank, node, pid = _pick_rank(d, rng)
    assert plan is not None
    peer = next((s.node for s in plan.ranks if s.node != node), None)
    if peer is None:
        raise RuntimeError(f"rank {rank}'s replica has no rank on another node")
    gen, t = _gen(d), time.time()
    fault = _partition(d, "partition_tp_peer", [(node, peer)], gen, t, [], note=f"{node} cut from {peer}")
    pair = {node, peer}

    def named() -> list[str]:
        """The tripped collective's diagnosis named a rank of the pair unreachable."""
        said = [e for e in d.events() if e.kind == ev.SUSPECT_NAMED and e.at >= t]
        cut = [e for e in said if e.detail.get("verdict") == "unreachable"
               and str(e.detail.get("seat", "")).split("/")[0] in pair]
        if not cut:
            return [f"no diagnosis named a rank of {sorted(pair)} unreachable (said: "
                    f"{[(e.detail.get('seat'), e.detail.get('verdict')) for e in said]})"]
        return []

    fault.after = named
    return fault


def isolate_etcd_member(d: Deployment, rng: random.Random) -> Fault:
    """The etcd leader is cut from everyone (the other members, every node, the clients) for 8 s:
    the others elect a new leader and the deployment serves on without a new generation; healed,
    the member catches up."""
    member = f"e{d.etcd.members.index(d.etcd.leader()) + 1}"  # e1..e3 in the lab: members m0..m2
    gen, t = _gen(d), time.time()
    others = [n for n in _lab(d).names if n != member]
    return _partition(d, "isolate_etcd_member", [(member, o) for o in others], gen, t, [], hold=8.0,
                      replan=False, note=f"etcd leader {member} isolated for 8 s")


def partition_heals(d: Deployment, rng: random.Random) -> Fault:
    """A rank's node is cut from everyone for 1.5 s, less than its lease: collectives with its peer
    miss their deadline, then the network comes back. The cluster serves again, every request
    finishes with the failure-free tokens."""
    rank, node, pid = _pick_rank(d, rng)
    gen, t = _gen(d), time.time()
    others = [n for n in _lab(d).names if n != node]
    return _partition(d, "partition_heals", [(node, o) for o in others], gen, t, [], hold=1.5, replan=False,
                      note=f"{node} (rank {rank}) cut from everyone for 1.5 s")


def _kill_role(d: Deployment, rng: random.Random, name: str, role: str) -> Fault:
    """SIGKILL a rank of a disaggregated deployment whose replica has ``role`` in the newest plan;
    afterwards no decode replica holds KV nobody took (every entry it received was freed)."""
    def in_role() -> dict[int, tuple[str, int]]:
        plan = d.latest_plan()
        return {r: at for r, at in d.rank_pids().items() if plan is not None
                and plan.role_of(plan.replica_of(r)) == role}

    deadline = time.monotonic() + 60  # the daemons' statuses lag the newest plan by up to a second
    while not (ranks := in_role()) and time.monotonic() < deadline:
        time.sleep(0.1)
    plan = d.latest_plan()
    gen, t = _gen(d), time.time()
    if not ranks:
        f = Fault(name, t, gen, [], replan=False, note=f"no {role} replica")
        f.problems.append(f"the deployment has no {role} replica (prefill_replicas {plan.prefill_replicas if plan else 0})")
        return f
    rank = rng.choice(sorted(ranks))
    node, pid = ranks[rank]
    _signal(pid, signal.SIGKILL)
    f = Fault(name, t, gen, [pid], note=f"{role} replica {rank} ({node}, pid {pid})")

    def no_kv_left() -> list[str]:
        out: list[str] = []
        deadline = time.monotonic() + 10  # the counts come with rallyd's status, a second or so behind
        while time.monotonic() < deadline:
            out = []
            for n, st in d.statuses().items():
                for w in st.get("workers", []):
                    c = w.get("counts") or {}
                    if w.get("role") == "decode" and c.get("kv_received", 0) != c.get("kv_freed", 0):
                        out.append(f"{n}/{w.get('local_rank')}: received {c.get('kv_received')} KV entries, "
                                   f"freed {c.get('kv_freed')}")
            if not out:
                break
            time.sleep(0.5)
        return out

    f.after = no_kv_left
    return f


def kill_prefill(d: Deployment, rng: random.Random) -> Fault:
    """SIGKILL the rank of a prefill replica (disaggregated serving) while long prompts stream:
    the decode replicas prefill what they could not get, every stream finishes with the
    failure-free tokens, and no KV is left in their buffers."""
    return _kill_role(d, rng, "kill_prefill", "prefill")


def kill_decode(d: Deployment, rng: random.Random) -> Fault:
    """SIGKILL the rank of a decode replica mid-stream: the gateway resumes its streams on another
    replica (re-prefilled there), every stream finishes with the failure-free tokens."""
    return _kill_role(d, rng, "kill_decode", "decode")


SCENARIOS: dict[str, Callable[[Deployment, random.Random], Fault]] = {
    f.__name__: f for f in (kill_rank, kill_ep_rank, kill_prefill, kill_decode, stop_rank, kill_daemon, kill_node,
                            etcd_leader, etcd_follower,
                            etcd_all_stop, slow_rank, corrupt_shard, second_failure, kill_in_rendezvous, join_leave,
                            partition_node_etcd, partition_tp_peer, isolate_etcd_member, partition_heals)}
PARTITIONS = ("partition_node_etcd", "partition_tp_peer", "isolate_etcd_member", "partition_heals")
NEED_ROOM = ("corrupt_shard", "join_leave")  # a replica must move to (or grow onto) another node
CI_SUBSET = ("kill_rank", "stop_rank", "kill_node", "etcd_leader", "kill_ep_rank")  # kill_ep_rank last: a third
# kill of the same seat within its restart window before kill_node would leave no room for a replica
SOAK = ("kill_rank", "stop_rank", "kill_daemon", "kill_node", "etcd_leader", "etcd_follower", "slow_rank")
