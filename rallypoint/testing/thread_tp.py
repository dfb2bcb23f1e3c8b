"""Tensor-parallel collectives between threads of one process: the TP math without process groups.

``run_tp(size, fn)`` calls ``fn(rank, comm)`` on ``size`` threads whose ``comm`` all-reduces,
all-gathers and all-to-alls among them (sums in rank order, so results are deterministic). A test
can then load every rank's shard in one process and check that the slices, the reductions and a
mixture of experts' dispatch add up, at a fraction of the cost of starting rank processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


class ThreadGroup:
    """The shared state of ``size`` ranks: one slot each and a barrier."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size, timeout=60)

    def exchange(self, rank: int, t: T) -> list[T]:
        """Every rank's ``t``, in rank order."""
        self.slots[rank] = t
        self.barrier.wait()
        out = [s for s in self.slots if s is not None]
        self.barrier.wait()  # nobody overwrites a slot before everyone has read them
        assert len(out) == self.size  # every rank filled its slot before the first barrier
        return out


class ThreadComm:
    """``model.ModelComm`` for one rank of a ``ThreadGroup`` (the EP group is the TP group)."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank = group, rank

    def all_reduce(self, t: Tensor) -> Tensor:
        parts = self.group.exchange(self.rank, t)
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def all_gather(self, t: Tensor, dim: int = -1) -> Tensor:
        return torch.cat(self.group.exchange(self.rank, t), dim=dim)

    def all_to_all(self, t: Tensor, in_splits: Sequence[int], out_splits: Sequence[int]) -> Tensor:
        parts = self.group.exchange(self.rank, t.split(list(in_splits)))   # every rank's chunks, by destination
        mine = [p[self.rank] for p in parts]
        assert [len(m) for m in mine] == list(out_splits), (out_splits, [len(m) for m in mine])
        return torch.cat(mine)


def run_tp(size: int, fn: Callable[[int, ThreadComm], T]) -> list[T]:
    """``[fn(0, comm0), ..., fn(size - 1, comm)]``, run concurrently; the first error is raised."""
    group = ThreadGroup(size)
    results: list[T | None] = [None] * size
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank, ThreadComm(group, rank))
        except BaseException as exc:
            errors.append(exc)
            group.barrier.abort()  # release the other ranks instead of leaving them waiting

    threads = [threading.Thread(target=body, args=(r,), name=f"tp-rank-{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results  # type: ignore[return-value]
