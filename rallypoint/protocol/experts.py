"""Where a mixture of experts' experts live when they are spread over every replica
(``[layout] ep = "dp"``): pure arithmetic the leader runs and every worker reads back.

The experts are cut into ``slots`` (the EP size of the first such plan; slot ``s`` of ``S`` holds
experts ``s*E//S .. (s+1)*E//S - 1``). Each rank *holds* some slots in memory and *serves* some of
them: every slot is served by exactly one rank, one that holds it. With ``expert_copies = c``
the first plan gives rank ``r`` slots ``r, r+1, .., r+c-1`` (mod ``S``), serving slot ``r``, so a
dead rank's slots are still held by the ranks after it.

The next plan keeps what every surviving seat holds (it is in that process's memory), so a shrink
serves on with no load at all when the copies cover the dead seat's slots; a seat that comes back
in the dead seat's place (a restart or a warm spare on that seat) holds what it held and loads
exactly those experts. A slot no survivor holds is loaded by the rank serving the fewest slots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Seat = tuple[str, int]


@dataclass(frozen=True)
class ExpertMap:
    """Slots held and served, by global rank (``holds[r]``) and by slot (``serves[s]``: a rank)."""

    slots: int
    holds: tuple[tuple[int, ...], ...]
    serves: tuple[int, ...]

    def served_by(self, rank: int) -> tuple[int, ...]:
        """The slots ``rank`` serves, ascending."""
        return tuple(s for s, r in enumerate(self.serves) if r == rank)

    def problems(self, world: int) -> list[str]:
        """What is inconsistent in this map for a plan of ``world`` ranks (empty when sound)."""
        out = []
        if self.slots < 1:
            out.append(f"expert slots must be >= 1, got {self.slots}")
        if len(self.holds) != world:
            out.append(f"expert holdings for {len(self.holds)} ranks, the plan has {world}")
        if len(self.serves) != self.slots:
            out.append(f"{len(self.serves)} slot servers for {self.slots} slots")
        for s, r in enumerate(self.serves):
            if not 0 <= r < len(self.holds) or s not in self.holds[r]:
                out.append(f"slot {s} is served by rank {r}, which does not hold it")
        if any(not 0 <= s < self.slots for h in self.holds for s in h):
            out.append(f"a rank holds a slot outside 0..{self.slots - 1}")
        return out


def slot_experts(slot: int, slots: int, num_experts: int) -> range:
    """The experts of ``slot``: an even split of ``num_experts`` over ``slots``, in order."""
    return range(slot * num_experts // slots, (slot + 1) * num_experts // slots)


def experts_of(slots_held: Sequence[int], slots: int, num_experts: int) -> tuple[int, ...]:
    """The global expert indices in ``slots_held``, ascending."""
    return tuple(sorted(e for s in slots_held for e in slot_experts(s, slots, num_experts)))


def owners(m: ExpertMap, num_experts: int) -> list[int]:
    """The rank serving each expert (``owners[e]``)."""
    out = [0] * num_experts
    for s, r in enumerate(m.serves):
        for e in slot_experts(s, m.slots, num_experts):
            out[e] = r
    return out


def first_map(world: int, copies: int) -> ExpertMap:
    """A fresh layout: ``world`` slots, rank ``r`` holding ``r .. r+copies-1`` and serving ``r``."""
    c = min(max(copies, 1), world)
    return ExpertMap(world, tuple(tuple(sorted((r + j) % world for j in range(c))) for r in range(world)),
                     tuple(range(world)))


def next_map(previous: ExpertMap | None, previous_seats: Sequence[Seat], seats: Sequence[Seat],
             copies: int) -> ExpertMap:
    """The map for a plan whose ranks sit on ``seats`` (in rank order), after ``previous`` (whose
    ranks sat on ``previous_seats``). See the module docstring for the rules."""
    n = len(seats)
    if previous is None or not previous.slots:
        return first_map(n, copies)
    before: Mapping[Seat, int] = {seat: r for r, seat in enumerate(previous_seats)}
    gone = [previous.holds[r] for r, seat in enumerate(previous_seats) if seat not in set(seats)]
    holds: list[set[int]] = []
    for seat in seats:  # survivors keep theirs; a new seat takes a dead seat's, in order
        held = before.get(seat)
        holds.append(set(previous.holds[held]) if held is not None else set(gone.pop(0)) if gone else set())
    target = -(-previous.slots // n)  # ceil: the most slots one rank should serve
    load = [0] * n
    serves = [-1] * previous.slots
    was = {s: previous_seats[r] for s, r in enumerate(previous.serves)}
    for s in range(previous.slots):  # a slot's server stays where it was if that rank is still here
        server = was.get(s)
        r = seats.index(server) if server in seats else -1
        if r >= 0 and s in holds[r] and load[r] < target:
            serves[s], load[r] = r, load[r] + 1
    for s in range(previous.slots):  # the rest: the least busy holder, else the least busy rank loads it
        if serves[s] >= 0:
            continue
        holders = [r for r in range(n) if s in holds[r] and load[r] < target]
        r = min(holders or range(n), key=lambda x: (load[x], x))
        holds[r].add(s)
        serves[s], load[r] = r, load[r] + 1
    for r in range(n):  # a seat with nothing in memory (it loads anyway) restores the copies
        if before.get(seats[r]) is None:
            while len(holds[r]) < min(copies, previous.slots):
                count = {s: sum(s in h for h in holds) for s in range(previous.slots) if s not in holds[r]}
                holds[r].add(min(count, key=lambda s: (count[s], s)))
    return ExpertMap(previous.slots, tuple(tuple(sorted(h)) for h in holds), tuple(serves))
