"""Recovery events through a real etcd: background writes, reading back in order, pruning."""

from __future__ import annotations

from rallypoint.protocol.keys import ClusterKeys
from rallypoint.recovery import events as ev
from rallypoint.recovery.events import EventLog, prune_events, read_events
from rallypoint.rendezvous.etcd import EtcdClient


def test_written_in_the_background_read_in_order_and_pruned(client: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    log = EventLog(client, keys, by="a")
    try:
        for gen in (1, 2, 3):
            log.emit(gen, ev.PLAN_WRITTEN, at=100.0 + gen, dp=1)
        log.emit(1, ev.RANK_FAILED, at=100.5, by="b", reason="rank 1 exited")
        assert log.flush(5.0)
    finally:
        log.close()
    client.put(keys.events_of(2) + "garbage", b"{not json")  # skipped, not fatal
    got = read_events(client, keys)
    assert [(e.gen, e.kind, e.by) for e in got] == [
        (1, ev.RANK_FAILED, "b"), (1, ev.PLAN_WRITTEN, "a"), (2, ev.PLAN_WRITTEN, "a"), (3, ev.PLAN_WRITTEN, "a")]
    assert [e.kind for e in read_events(client, keys, 1)] == [ev.RANK_FAILED, ev.PLAN_WRITTEN]
    assert prune_events(client, keys, keep_from_gen=3) == 2
    assert [e.gen for e in read_events(client, keys)] == [3]
