"""Pure placement logic: which rank runs where, for a set of live nodes and a cluster spec.

Kept free of I/O so the leader's decision can be unit-tested exhaustively. Rank order is
``protocol.grid``'s, so a replica's TP group is contiguous and lands on one node whenever it fits.
"""

from __future__ import annotations

from collections.abc import Iterable

from rallypoint.errors import LayoutError
from rallypoint.rendezvous.records import ClusterSpec, NodeRecord, Plan, RankSlot


def eligible(nodes: Iterable[NodeRecord], spec: ClusterSpec) -> list[NodeRecord]:
    """Nodes that may host ranks, in placement order (by node id), capped at ``max_nodes``."""
    usable = sorted((n for n in nodes if n.slots > 0 and not n.cordoned), key=lambda n: n.node)
    return usable[: spec.max_nodes] if spec.max_nodes else usable


def place(nodes: Iterable[NodeRecord], spec: ClusterSpec,
          previous: Plan | None = None) -> tuple[int, list[RankSlot]]:
    """Place as many whole replicas as fit, up to ``spec.dp`` when it is set, on ``nodes``.

    Placement is sticky: a rank of ``previous`` whose seat is still usable stays on it, and only
    the ranks that lost their seat move (to the first free seats). A node that joins, or comes
    back, therefore moves no rank, and after a failure only the dead ranks' shards are loaded anew.

    Fewer healthy seats than ``spec.dp`` replicas need is a *shrink*: whole DP replicas are
    dropped (TP and PP never change); the plan grows back once the capacity returns.
    Seats a node lists in ``bad_seats`` are never used.

    Returns:
        (dp, ranks): the data-parallel size chosen and one slot per rank, in rank order.

    Raises:
        LayoutError: fewer than ``min_nodes`` eligible nodes, or not one whole replica fits.
    """
    usable = eligible(nodes, spec)
    if len(usable) < spec.min_nodes:
        raise LayoutError(f"{len(usable)} eligible node(s), min_nodes is {spec.min_nodes}")
    seats = [(n.node, local) for n in usable for local in range(n.slots) if local not in n.bad_seats]
    fit = len(seats) // spec.replica_size
    if fit < 1:
        raise LayoutError(f"{len(seats)} healthy rank slot(s) cannot hold one replica of "
                          f"tp*pp = {spec.replica_size}")
    dp = min(spec.dp, fit) if spec.dp else fit
    world = dp * spec.replica_size
    usable_seats = set(seats)
    kept = {s.rank: (s.node, s.local_rank) for s in (previous.ranks if previous else ())
            if s.rank < world and (s.node, s.local_rank) in usable_seats}
    free = [seat for seat in seats if seat not in set(kept.values())]
    chosen = [kept[rank] if rank in kept else free.pop(0) for rank in range(world)]
    return dp, [RankSlot(rank, node, local) for rank, (node, local) in enumerate(chosen)]


def make_plan(gen: int, nodes: Iterable[NodeRecord], spec: ClusterSpec, reason: str, leader: str,
              previous: Plan | None = None) -> Plan:
    """The plan for generation ``gen`` over the live ``nodes``; every live node is a member."""
    nodes = list(nodes)
    dp, ranks = place(nodes, spec, previous)
    members = tuple(sorted(n.node for n in nodes))
    plan = Plan(gen=gen, tp=spec.tp, pp=spec.pp, dp=dp, ranks=tuple(ranks), members=members,
                reason=reason, leader=leader)
    plan.validate(f"plan {gen}")
    return plan

