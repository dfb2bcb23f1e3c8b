"""Every etcd key comes from ClusterKeys: layout, zero-padded generations, seats as one segment."""

from __future__ import annotations

import pytest

from rallypoint.errors import MalformedRecord
from rallypoint.protocol.keys import ClusterKeys, gen_from_key, seat_segment

K = ClusterKeys("c")


def test_generations_are_zero_padded_so_keys_sort() -> None:
    assert K.plan(12) == "/rallypoint/c/control/plans/0000000012"
    assert gen_from_key(K.plan(12)) == 12 and gen_from_key(K.acks_of(3)) == 3
    assert K.plan(9) < K.plan(10)
    with pytest.raises(MalformedRecord, match="no generation"):
        gen_from_key(K.spec)


def test_every_key_sits_under_its_prefix() -> None:
    pairs = [
        (K.node("a"), K.nodes), (K.ack(2, "a"), K.acks_of(2)), (K.plan(2), K.plans),
        (K.released_of(2), K.released), (K.replan_of(2), K.replans), (K.left_of("a"), K.left),
        (K.draining_of("a"), K.draining), (K.cordoned_of("a"), K.cordoned), (K.kill("a", 1), K.kills_of("a")),
        (K.abort(2, [1]), K.aborts), (K.node_status_of("a"), K.node_status), (K.progress_of("a/1"), K.progress),
        (K.diagnosis(2, "a/1"), K.diagnoses), (K.taint(2, "tp-0.1"), K.taints),
        (K.drained_replica(2, 0), K.drained_of(2)), (K.event(2, 1.5, "a/1", "serving"), K.events_of(2)),
        (K.group_store(2, "tp-0.1"), K.store(2)), (K.store(2), K.stores),
    ]
    for key, prefix in pairs:
        assert key.startswith(prefix) and prefix.startswith(K.root), (key, prefix)
    for key in (K.abort(2, []), K.kills_of("a"), K.aborts, K.plans, K.released, K.replans):
        assert key.startswith(K.control)  # workers and daemons follow control/ only


def test_shapes_other_parties_parse() -> None:
    assert K.abort(7, [1, 3]) == "/rallypoint/c/control/abort/0000000007/1-3"
    assert K.abort(7, []) == "/rallypoint/c/control/abort/0000000007/all"
    assert K.diagnosis(7, "a/1") == "/rallypoint/c/status/diagnosis/0000000007/a:1"
    assert ClusterKeys.diagnosis_seat(K.diagnosis(7, "node-a/1")) == "node-a/1"
    assert K.taint(7, "tp-0.1") == "/rallypoint/c/status/aborted/0000000007/tp-0.1"
    assert K.drained_replica(7, 2) == "/rallypoint/c/status/drained/0000000007/2"
    assert K.event(7, 1.5, "a/1", "serving") == "/rallypoint/c/events/0000000007/00000000001500000000-a:1-serving"
    assert K.group_store(7, "tp:1") == "/rallypoint/c/store/0000000007/tp:1/"
    assert K.progress_of("a/1") == "/rallypoint/c/status/progress/a:1" and seat_segment("a/1") == "a:1"
    assert K.recovery == "/rallypoint/c/status/recovery"
    assert K.kill("a", 1) == "/rallypoint/c/control/kill/a/1"


def test_older_than_holds_exactly_the_older_generations() -> None:
    """The leader prunes one range per kind: every key of an older generation falls in it, and
    no key of the kept generations, nor a key that is not generation-keyed."""
    made = {
        "acks": lambda g: K.ack(g, "a"), "plans": K.plan, "released": K.released_of, "replans": K.replan_of,
        "diagnoses": lambda g: K.diagnosis(g, "a/1"), "drained": lambda g: K.drained_replica(g, 0),
        "aborts": lambda g: K.abort(g, [1, 2]), "taints": lambda g: K.taint(g, "tp-0.1"),
        "events": lambda g: K.event(g, 1.5, "a/1", "serving"),
        "stores": lambda g: K.group_store(g, "tp-0.1") + "arrived/0",
    }
    ranges = K.older_than(100)
    assert set(ranges) == set(made)
    for name, key_of in made.items():
        start, end = ranges[name]
        assert all(start <= key_of(g) < end for g in (1, 9, 99)), name
        assert not any(start <= key_of(g) < end for g in (100, 101, 1000)), name
        assert not start <= start + "junk" < end, name
    assert K.aborts_of(7) == "/rallypoint/c/control/abort/0000000007/"
    assert K.taints_of(7) == "/rallypoint/c/status/aborted/0000000007/"
    assert K.diagnoses_of(7) == "/rallypoint/c/status/diagnosis/0000000007/"
