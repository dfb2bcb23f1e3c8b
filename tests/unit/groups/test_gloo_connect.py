"""gloo's connect, which blocks in C++ until every peer answers: the build gives up on it at its
timeout, or at once when a newer generation cancels it (a real gloo backend over an in-process
store whose second rank never comes)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from rallypoint.errors import GroupError
from rallypoint.groups.group import _gloo
from rallypoint.groups.topology import GroupSpec


def spec() -> GroupSpec:
    return GroupSpec(name="tp", gen=4, ranks=(0, 1), rank_in_group=0, seats=(("a", 0), ("b", 0)))


def test_a_connect_that_never_finishes_is_given_up_at_the_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(GroupError, match="gloo's connect did not finish within 0.5s"):
        _gloo(dist.HashStore(), spec(), timedelta(seconds=0.5), None)
    assert time.monotonic() - t0 < 5.0  # gloo's own wait (the same timeout) is not what ended it


def test_a_newer_generation_abandons_the_connect_at_once() -> None:
    asked = time.monotonic() + 0.2
    with pytest.raises(GroupError, match="abandoned while connecting: generation 5 was released"):
        _gloo(dist.HashStore(), spec(), timedelta(seconds=30),
              lambda: "generation 5 was released" if time.monotonic() > asked else None)
    assert time.monotonic() - asked < 1.0
