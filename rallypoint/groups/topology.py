"""Which groups a rank belongs to, from a plan: pure logic, no torch.

Group names follow vLLM's parallel_state tags: ``tp``, ``pp``, ``dp``, ``ep``; which ranks each
group holds is ``protocol.grid``'s arithmetic (vLLM's order). A group's *identity* is its name plus the seats
(node, local device) of its members in group order: a group whose identity and health are unchanged
in the next generation carries over untouched, even if its global rank numbers moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from rallypoint.errors import GroupError
from rallypoint.protocol.grid import group_members


class SlotLike(Protocol):
    """What ``groups/`` needs of a rank slot (read-only: ``RankSlot`` is a frozen dataclass)."""

    @property
    def rank(self) -> int: ...
    @property
    def node(self) -> str: ...
    @property
    def local_rank(self) -> int: ...


class PlanLike(Protocol):
    """What ``groups/`` needs of a plan (``rendezvous.records.Plan``, a frozen dataclass, satisfies it)."""

    @property
    def gen(self) -> int: ...
    @property
    def tp(self) -> int: ...
    @property
    def pp(self) -> int: ...
    @property
    def dp(self) -> int: ...
    @property
    def ranks(self) -> Sequence[SlotLike]: ...


@dataclass(frozen=True)
class GroupSpec:
    """One group as the plan defines it, from this rank's point of view."""

    name: str
    gen: int
    ranks: tuple[int, ...]
    seats: tuple[tuple[str, int], ...]
    rank_in_group: int

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def identity(self) -> tuple[str, tuple[tuple[str, int], ...]]:
        return self.name, self.seats

    @property
    def key(self) -> str:
        """A store-safe id: name plus member ranks, e.g. ``tp-2.3``."""
        return f"{self.name}-" + ".".join(map(str, self.ranks))

    @property
    def label(self) -> str:
        """For logs and events, e.g. ``tp[2,3]@g4``."""
        return f"{self.name}[{','.join(map(str, self.ranks))}]@g{self.gen}"


def specs_for(plan: PlanLike, rank: int, names: Sequence[str] = ("tp", "pp", "dp")) -> dict[str, GroupSpec]:
    """The groups ``rank`` is in under ``plan``.

    Raises:
        GroupError: the plan does not contain ``rank``, or its sizes do not multiply to its world.
    """
    world = len(plan.ranks)
    if min(plan.tp, plan.pp, plan.dp) < 1 or plan.tp * plan.pp * plan.dp != world:
        raise GroupError(f"plan gen {plan.gen}: tp={plan.tp} x pp={plan.pp} x dp={plan.dp} "
                         f"does not make its world of {world} ranks")
    if not 0 <= rank < world:
        raise GroupError(f"plan gen {plan.gen} has ranks 0..{world - 1}; it does not include rank {rank}")
    seat = {s.rank: (s.node, s.local_rank) for s in plan.ranks}
    out = {}
    for name in names:
        ranks = group_members(name, rank, plan.tp, plan.pp, plan.dp)
        out[name] = GroupSpec(name, plan.gen, ranks, tuple(seat[r] for r in ranks), ranks.index(rank))
    return out


def rank_at(plan: PlanLike, node: str, local_rank: int) -> int:
    """The global rank a plan gives the seat ``(node, local_rank)``.

    Raises:
        GroupError: the plan places no rank there.
    """
    for s in plan.ranks:
        if s.node == node and s.local_rank == local_rank:
            return s.rank
    raise GroupError(f"plan gen {plan.gen} places no rank on {node}/{local_rank}")
