"""The all-reduce probe: a workload with no model, for burning in a fabric and for timing
recovery on its own (``[worker] workload = "allreduce-probe"``).

Every rank of a replica all-reduces a small tensor over its TP group, one call after another, and
checks the sum. Element 0 carries 1 from every rank, so it must add up to the group size; element
1 carries 1 from a rank that has seen a newer plan, so the whole group leaves the generation after
the same call, as serving replicas do at a SWITCH step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rallypoint.comm.collectives import Comm
from rallypoint.groups.group_set import GroupSet

PROBE_NUMEL = 1024  # 4 KiB of float32: latency-bound, like a decode step's all-reduce


@dataclass
class ProbeResult:
    calls: int
    wrong: int  # calls whose sum was not the group size
    first_at: float  # wall clock of the first call's completion (0: none completed)


def probe_generation(comm: Comm, groups: GroupSet, device: torch.device, newer_plan: Callable[[], bool],
                     stop: Callable[[], bool], on_first: Callable[[float], None] = lambda at: None) -> ProbeResult:
    """All-reduce on ``tp`` until a rank sees a newer plan (every rank returns after the same call)
    or ``stop()``.

    Raises:
        GenerationAborted: a collective of this generation was aborted.
    """
    size = groups.group("tp").world_size
    t = torch.zeros(PROBE_NUMEL, device=device)
    res = ProbeResult(0, 0, 0.0)
    while True:
        t.zero_()
        t[0] = 1.0
        t[1] = 1.0 if newer_plan() else 0.0
        comm.all_reduce(t, "tp")
        comm.synchronize()
        res.calls += 1
        if res.calls == 1:
            res.first_at = time.time()
            on_first(res.first_at)
        if float(t[0]) != size:
            res.wrong += 1
        if float(t[1]) > 0 or stop():
            return res
