"""The groups of one rank in one generation, swapped in one step when the next plan arrives.

``GroupSet.configure`` is the only reconfiguration verb (TorchFT's habit): given the next plan it
carries over every group whose identity (name + member seats) is unchanged and that nobody
aborted, and builds the rest under the new generation's store prefix. Accessors follow vLLM's
parallel_state vocabulary (``rank_in_group``, ``world_size``, first/last stage...).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch

from rallypoint.errors import GroupError
from rallypoint.groups.group import Cancelled, Group, StoreFactory, build_group
from rallypoint.groups.topology import PlanLike, specs_for
from rallypoint.log import get_logger
from rallypoint.protocol.grid import coords_of

log = get_logger("groups")


class GroupSet:
    """This rank's groups for generation ``gen``.

    Attributes:
        gen: the generation these groups serve.
        rank: this process's global rank in that generation.
        groups: by name (``tp``, ``pp``, ``dp``, ``ep``).
        carried: names of groups taken over unchanged from the previous generation.
    """

    def __init__(self, gen: int, rank: int, plan: PlanLike, groups: dict[str, Group],
                 carried: Sequence[str] = ()) -> None:
        self.gen = gen
        self.rank = rank
        self.plan = plan
        self.groups = groups
        self.carried = tuple(carried)

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def configure(cls, plan: PlanLike, rank: int, store_factory: StoreFactory, device: torch.device,
                  timeout: timedelta = timedelta(seconds=30), previous: GroupSet | None = None,
                  names: Sequence[str] = ("tp", "pp", "dp"),
                  is_tainted: Callable[[Group], bool] = lambda g: False,
                  cancelled: Cancelled | None = None) -> GroupSet:
        """Build (or carry over) this rank's groups for ``plan``.

        Args:
            plan: the generation's plan.
            rank: this process's rank in it.
            store_factory: a store per group spec (keys under the generation's prefix).
            device: ``cuda:N`` for NCCL, ``cpu`` for gloo.
            timeout: how long a build waits for its peers.
            previous: the groups of the previous generation, for carry-over.
            names: which groups to build.
            is_tainted: True when some member aborted the group (so it must be rebuilt).
            cancelled: why the generation is no longer wanted (a newer one was released), else
                None; a build waiting for its peers gives up on it.

        Raises:
            GroupError: the plan does not contain ``rank``, its sizes are inconsistent, or a peer
                did not arrive within ``timeout`` (the groups built so far are aborted).
        """
        specs = specs_for(plan, rank, names)
        old = {g.spec.identity: g for g in (previous.groups.values() if previous else ())}
        groups: dict[str, Group] = {}
        carried = []
        t0 = time.monotonic()
        try:
            for name, spec in specs.items():
                prior = old.get(spec.identity)
                if prior is not None and not prior.aborted and not is_tainted(prior):
                    groups[name] = prior
                    carried.append(name)
                    continue
                groups[name] = build_group(spec, store_factory, device, timeout, cancelled)
        except GroupError:
            for name, g in groups.items():
                if name not in carried:
                    g.abort("build of the generation failed")
            raise
        if previous is not None:
            kept = {id(g) for g in groups.values()}
            for g in previous.groups.values():
                if id(g) not in kept:
                    g.abort(f"replaced in generation {plan.gen}")
        log.info("groups.configured", gen=plan.gen, rank=rank, carried=carried,
                 built=[n for n in groups if n not in carried], seconds=round(time.monotonic() - t0, 4))
        return cls(plan.gen, rank, plan, groups, carried)

    def abort(self, reason: str, names: Sequence[str] | None = None,
              ranks: Sequence[int] = ()) -> list[Group]:
        """Abort the named groups, or those containing any of ``ranks``, or all; return those aborted."""
        chosen = [g for n, g in self.groups.items()
                  if (names is None and not ranks) or (names and n in names) or set(ranks) & set(g.ranks)]
        for g in chosen:
            g.abort(reason)
        return chosen

    # -- accessors (vLLM's names) ------------------------------------------------------------

    def group(self, name: str) -> Group:
        try:
            return self.groups[name]
        except KeyError:
            raise GroupError(f"generation {self.gen} has no {name!r} group (built: {sorted(self.groups)})") from None

    @property
    def tp(self) -> Group:
        return self.group("tp")

    @property
    def pp(self) -> Group:
        return self.group("pp")

    @property
    def dp(self) -> Group:
        return self.group("dp")

    @property
    def ep(self) -> Group:
        return self.group("ep")

    @property
    def tp_rank(self) -> int:
        return self.tp.rank_in_group

    @property
    def tp_size(self) -> int:
        return self.plan.tp

    @property
    def pp_rank(self) -> int:
        return self.pp.rank_in_group

    @property
    def pp_size(self) -> int:
        return self.plan.pp

    @property
    def dp_rank(self) -> int:
        return coords_of(self.rank, self.plan.tp, self.plan.pp).dp

    @property
    def dp_size(self) -> int:
        return self.plan.dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def pp_next(self) -> int | None:
        """Rank-in-pp-group of the next stage, or None on the last stage."""
        return None if self.is_last_stage else self.pp_rank + 1

    @property
    def pp_prev(self) -> int | None:
        """Rank-in-pp-group of the previous stage, or None on the first stage."""
        return None if self.is_first_stage else self.pp_rank - 1
