"""Pure placement logic: which rank runs where, for a set of live nodes and a cluster spec.

Kept free of I/O so the leader's decision can be unit-tested exhaustively. Rank order is
``protocol.grid``'s, so a replica's TP group is contiguous and lands on one node whenever it fits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from rallypoint.errors import LayoutError
from rallypoint.protocol.experts import next_map
from rallypoint.rendezvous.records import ClusterSpec, NodeRecord, Plan, RankSlot


def eligible(nodes: Iterable[NodeRecord], spec: ClusterSpec) -> list[NodeRecord]:
    """Nodes that may host ranks, in placement order (by node id), capped at ``max_nodes``."""
    usable = sorted((n for n in nodes if n.slots > 0 and not n.cordoned), key=lambda n: n.node)
    return usable[: spec.max_nodes] if spec.max_nodes else usable


def place(nodes: Iterable[NodeRecord], spec: ClusterSpec, previous: Plan | None = None,
          avoid: frozenset[tuple[str, int]] = frozenset()) -> tuple[int, list[RankSlot]]:
    """Place as many whole replicas as fit, up to ``spec.dp`` when it is set, on ``nodes``.

    Placement is sticky: a rank of ``previous`` whose seat is still usable stays on it, and only
    the ranks that lost their seat move (to the first free seats). A node that joins, or comes
    back, therefore moves no rank, and after a failure only the dead ranks' shards are loaded anew.

    Fewer healthy seats than ``spec.dp`` replicas need is a *shrink*: whole DP replicas are
    dropped (TP and PP never change); the plan grows back once the capacity returns.
    Seats a node lists in ``bad_seats`` are never used. Seats in ``avoid`` (their groups would not
    build: a partition between them and their peers) lose their stickiness and come last, so they
    are used only when nothing else fits.

    Returns:
        (dp, ranks): the data-parallel size chosen and one slot per rank, in rank order.

    Raises:
        LayoutError: fewer than ``min_nodes`` eligible nodes, or not one whole replica fits.
    """
    usable = eligible(nodes, spec)
    if len(usable) < spec.min_nodes:
        raise LayoutError(f"{len(usable)} eligible node(s), min_nodes is {spec.min_nodes}")
    seats = [(n.node, local) for n in usable for local in range(n.slots) if local not in n.bad_seats]
    seats = [x for x in seats if x not in avoid] + [x for x in seats if x in avoid]
    fit = len(seats) // spec.replica_size
    if fit < 1:
        raise LayoutError(f"{len(seats)} healthy rank slot(s) cannot hold one replica of "
                          f"tp*pp = {spec.replica_size}")
    dp = min(spec.dp, fit) if spec.dp else fit
    world = dp * spec.replica_size
    usable_seats = set(seats)
    kept = {s.rank: (s.node, s.local_rank) for s in (previous.ranks if previous else ())
            if s.rank < world and (s.node, s.local_rank) in usable_seats and (s.node, s.local_rank) not in avoid}
    free = [seat for seat in seats if seat not in set(kept.values())]
    chosen = [kept[rank] if rank in kept else free.pop(0) for rank in range(world)]
    return dp, [RankSlot(rank, node, local) for rank, (node, local) in enumerate(chosen)]


def make_plan(gen: int, nodes: Iterable[NodeRecord], spec: ClusterSpec, reason: str, leader: str,
              previous: Plan | None = None, avoid: frozenset[tuple[str, int]] = frozenset()) -> Plan:
    """The plan for generation ``gen`` over the live ``nodes``; every live node is a member."""
    nodes = list(nodes)
    dp, ranks = place(nodes, spec, previous, avoid)
    members = tuple(sorted(n.node for n in nodes))
    experts = None
    if spec.ep == "dp":  # experts over every replica: who holds and serves which (protocol.experts)
        before = sorted(previous.ranks, key=lambda s: s.rank) if previous else []
        experts = next_map(previous.experts if previous else None, [(s.node, s.local_rank) for s in before],
                           [(s.node, s.local_rank) for s in ranks], spec.expert_copies)
    # disaggregated: the first replicas prefill, while at least one is left to decode; with one
    # replica left it serves whole requests (colocated)
    prefill = min(spec.prefill_replicas, dp - 1) if spec.tp == spec.pp == 1 else 0
    plan = Plan(gen=gen, tp=spec.tp, pp=spec.pp, dp=dp, ranks=tuple(ranks), members=members,
                reason=reason, leader=leader, experts=experts, prefill_replicas=prefill)
    plan.validate(f"plan {gen}")
    return plan


# worker.main's re-plan reason after a failed build, and the coordinator's after a diagnosis
# named a seat unreachable
_BUILD_FAILED = re.compile(r"(\S+)/(\d+) (?:could not build generation |unreachable from its peers)")
# a build that failed to reach a peer at all (gloo's socket errors, our connect timeout), or a
# collective whose peers were all alive and inside it: a cut, the first time
_UNREACHABLE = ("connect: ", "Connect timeout", "a peer it cannot reach", "unreachable from its peers")


class UnbuildableSeats:
    """The leader's memory of seats whose groups would not build. Placement is sticky, so a
    re-plan after a failed build puts the same ranks on the same seats; when the cause is a
    partition between a seat and its peers (both still reach etcd), that repeats forever. A seat
    whose build failed in two generations in a row is avoided by the next plan (``place``'s
    ``avoid``): once may be a slow peer, twice is a cut. A build that could not connect to a peer
    at all, or a seat a diagnosis named unreachable, is a cut the first time."""

    def __init__(self) -> None:
        self._failed: dict[tuple[str, int], tuple[int, int]] = {}  # seat -> (last gen failed, in a row)

    def note(self, gen: int, reason: str) -> frozenset[tuple[str, int]]:
        """Record generation ``gen``'s re-plan ``reason``; return the seats to avoid now."""
        m = _BUILD_FAILED.match(reason)
        if m is not None:
            seat = (m[1], int(m[2]))
            last, streak = self._failed.get(seat, (0, 0))
            if last != gen:  # a request that stands (no layout fit yet) is noted again each cycle: once counts
                streak = streak + 1 if last == gen - 1 else 1
                self._failed[seat] = (gen, 2 if any(x in reason for x in _UNREACHABLE) else streak)
        return frozenset(seat for seat, (last, streak) in self._failed.items() if streak >= 2 and last == gen)
