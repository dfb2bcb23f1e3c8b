"""A collective that fails as it is issued ends the step as an abort, not as a crash.

NCCL reports a peer lost mid-step from the launch itself ("internal error") once the communicator
is in an error state. Before, that exception left the serving loop and killed the process (and its
exit, racing the abort thread, became a SIGABRT): one failure cost a second generation. The
backend here is a stand-in whose launch raises (pure logic, no network)."""

from __future__ import annotations

import pytest
import torch

from rallypoint.comm.collectives import Comm
from rallypoint.comm.tracker import Deadlines, Tracker
from rallypoint.errors import GenerationAborted
from rallypoint.groups.group import Group
from rallypoint.groups.group_set import GroupSet
from rallypoint.groups.topology import GroupSpec


class FailingBackend:
    def __init__(self) -> None:
        self.aborted = 0

    def broadcast(self, tensors, opts):
        raise RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:3780, internal error\nncclInternalError")

    def abort(self) -> None:
        self.aborted += 1


def test_a_launch_error_aborts_the_group_and_raises_generation_aborted() -> None:
    backend = FailingBackend()
    g = Group(GroupSpec("tp", 7, (0, 1), (("a", 0), ("b", 0)), 0), backend, None, torch.device("cpu"))
    comm = Comm(GroupSet(7, 0, None, {"tp": g}), Tracker(Deadlines()))  # type: ignore[arg-type]
    with pytest.raises(GenerationAborted) as info:
        comm.broadcast(torch.zeros(4), src=0, group="tp")
    assert info.value.gen == 7 and info.value.group == "tp[0,1]@g7"
    assert "broadcast failed at launch: NCCL error" in info.value.reason
    assert g.aborted and backend.aborted == 1
    with pytest.raises(GenerationAborted):  # the group stays aborted: no second launch
        comm.broadcast(torch.zeros(4), src=0, group="tp")
    assert backend.aborted == 1
