"""Plan arithmetic every party must compute alike: the rank grid, its groups, the layer split.

Rank order follows vLLM's parallel_state, ``rank = dp*(PP*TP) + pp*TP + tp``, so a replica's TP
group is contiguous and lands on one node whenever it fits. The leader places ranks by it, each
worker derives its shard and groups from it, rallyctl shows it: written once, here, so they
cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from rallypoint.errors import GroupError

GROUP_NAMES = ("tp", "pp", "dp", "ep")


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


def group_members(name: str, rank: int, tp: int, pp: int, dp: int) -> tuple[int, ...]:
    """Global ranks of ``rank``'s group called ``name`` (vLLM's tags), in group order.

    Raises:
        GroupError: ``name`` is not one of ``GROUP_NAMES``.
    """
    at = coords_of(rank, tp, pp)
    if name == "tp":
        return tuple(rank_of(Coords(at.dp, at.pp, i), tp, pp) for i in range(tp))
    if name == "pp":
        return tuple(rank_of(Coords(at.dp, i, at.tp), tp, pp) for i in range(pp))
    if name == "dp":
        return tuple(rank_of(Coords(i, at.pp, at.tp), tp, pp) for i in range(dp))
    if name == "ep":  # experts spread over every TP rank of every replica, per PP stage
        return tuple(rank_of(Coords(i, at.pp, j), tp, pp) for i in range(dp) for j in range(tp))
    raise GroupError(f"unknown group {name!r}; expected one of {GROUP_NAMES}")


def group_ranks(tp_size: int, pp_size: int, dp_size: int) -> dict[str, list[list[int]]]:
    """Every TP, PP and DP group of the grid, as lists of global ranks (vLLM's order)."""
    world = tp_size * pp_size * dp_size
    return {name: [list(g) for g in sorted({group_members(name, r, tp_size, pp_size, dp_size)
                                            for r in range(world)})]
            for name in ("tp", "pp", "dp")}


def layers_for(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """The decoder layers of PP stage ``pp_rank``: contiguous, an even split, the first stages
    taking the remainder."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (pp_rank < extra))
