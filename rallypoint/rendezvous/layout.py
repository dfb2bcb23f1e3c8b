"""Pure placement logic: which rank runs where, for a set of live nodes and a cluster spec.

Kept free of I/O so the leader's decision can be unit-tested exhaustively. Rank order follows
vLLM's parallel_state: ``rank = dp*(PP*TP) + pp*TP + tp``, so a replica's TP group is contiguous
and lands on one node whenever it fits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from rallypoint.errors import LayoutError
from rallypoint.rendezvous.records import ClusterSpec, NodeRecord, Plan, RankSlot


@dataclass(frozen=True)
class Coords:
    """A rank's position in the (dp, pp, tp) grid."""

    dp: int
    pp: int
    tp: int


def rank_of(c: Coords, tp_size: int, pp_size: int) -> int:
    """Global rank of grid position ``c``."""
    return c.dp * (pp_size * tp_size) + c.pp * tp_size + c.tp


def coords_of(rank: int, tp_size: int, pp_size: int) -> Coords:
    """Grid position of global ``rank``."""
    replica = tp_size * pp_size
    return Coords(dp=rank // replica, pp=(rank % replica) // tp_size, tp=rank % tp_size)


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


def group_ranks(tp_size: int, pp_size: int, dp_size: int) -> dict[str, list[list[int]]]:
    """Every TP, PP and DP group of the grid, as lists of global ranks (vLLM's order)."""
    from rallypoint.groups.topology import members

    world = tp_size * pp_size * dp_size
    return {name: [list(g) for g in sorted({members(name, r, tp_size, pp_size, dp_size) for r in range(world)})]
            for name in ("tp", "pp", "dp")}
