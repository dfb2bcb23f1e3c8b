"""Record parsing: every malformed record is rejected with the key named."""

from __future__ import annotations

import json

import pytest

from rallypoint.errors import MalformedRecord
from rallypoint.rendezvous.records import ClusterSpec, NodeRecord, Plan, RankSlot

KEY = "/rallypoint/c/control/plans/0000000002"


def plan() -> Plan:
    return Plan(gen=2, tp=2, pp=1, dp=1, ranks=(RankSlot(0, "a", 0), RankSlot(1, "a", 1)),
                members=("a",), reason="r", leader="a", time=1.0)


def test_plan_round_trip() -> None:
    p = plan()
    assert Plan.from_json(KEY, p.to_json()) == p
    assert json.loads(p.to_json())["world_size"] == 2


@pytest.mark.parametrize("mutate,why", [
    (lambda d: d.pop("ranks"), "missing field 'ranks'"),
    (lambda d: d.update(gen="2"), "field 'gen' should be int"),
    (lambda d: d.update(gen=True), "field 'gen' should be int"),
    (lambda d: d.update(tp=4), "2 ranks but tp\\*pp\\*dp = 4"),
    (lambda d: d.update(ranks=[[0, "a", 0], [0, "a", 1]]), "each once"),
    (lambda d: d.update(ranks=[[0, "a", 0], [1, "a", 0]]), "share one node/local_rank"),
    (lambda d: d.update(members=["b"]), "not a member"),
    (lambda d: d.update(ranks=[[0, "a"]]), "triples"),
    (lambda d: d.update(gen=0), "gen must be >= 1"),
])
def test_bad_plans_name_the_key(mutate, why: str) -> None:
    d = json.loads(plan().to_json())
    mutate(d)
    with pytest.raises(MalformedRecord, match=why) as info:
        Plan.from_json(KEY, json.dumps(d))
    assert KEY in str(info.value)


@pytest.mark.parametrize("raw", [b"{", b"[1,2]", b'"x"'])
def test_non_object_json_is_rejected(raw: bytes) -> None:
    with pytest.raises(MalformedRecord, match="nodes/a"):
        NodeRecord.from_json("/rallypoint/c/nodes/a", raw)


def test_node_record_key_must_match() -> None:
    rec = NodeRecord(node="a", host="h", address="x", gpus=0, slots=2, version="0", pid=1)
    assert NodeRecord.from_json("/rallypoint/c/nodes/a", rec.to_json()) == rec
    with pytest.raises(MalformedRecord, match="does not match the key"):
        NodeRecord.from_json("/rallypoint/c/nodes/b", rec.to_json())


def test_spec() -> None:
    spec = ClusterSpec(tp=2, pp=2)
    assert ClusterSpec.from_json("k", spec.to_json()) == spec
    with pytest.raises(MalformedRecord, match="out of range"):
        ClusterSpec.from_json("k", json.dumps({"tp": 0, "pp": 1, "dp": 0, "min_nodes": 1, "max_nodes": 0}))
