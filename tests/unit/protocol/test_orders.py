"""Orders left in etcd between daemon, worker and rallyctl: their values round-trip, bad ones are named."""

from __future__ import annotations

import pytest

from rallypoint.errors import MalformedRecord
from rallypoint.protocol.orders import AbortOrder


def test_abort_order_round_trip_and_defaults() -> None:
    order = AbortOrder(3, (1, 2), "rank 1 exited")
    assert AbortOrder.from_json("k", order.to_json()) == order
    assert AbortOrder.from_json("k", b'{"gen": 3}') == AbortOrder(3, (), "abort order")


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'{"ranks": [1]}', b'{"gen": 3, "ranks": ["x"]}'])
def test_malformed_abort_order_names_its_key(raw: bytes) -> None:
    with pytest.raises(MalformedRecord, match="/k/abort"):
        AbortOrder.from_json("/k/abort", raw)
