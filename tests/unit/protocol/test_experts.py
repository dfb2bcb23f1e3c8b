"""protocol.experts: where a mixture of experts' experts are held and served across replicas."""

from __future__ import annotations

import itertools

import pytest

from rallypoint.errors import MalformedRecord
from rallypoint.protocol.experts import ExpertMap, experts_of, first_map, next_map, owners, slot_experts
from rallypoint.rendezvous.layout import make_plan
from rallypoint.rendezvous.records import ClusterSpec, NodeRecord, Plan

A0, A1, A2, B0 = ("a", 0), ("a", 1), ("a", 2), ("b", 0)


def test_the_first_map_gives_each_rank_its_slot_and_the_next_copies() -> None:
    m = first_map(3, copies=2)
    assert m.slots == 3 and m.serves == (0, 1, 2)
    assert m.holds == ((0, 1), (1, 2), (0, 2))
    assert m.problems(3) == []
    assert first_map(2, copies=5).holds == ((0, 1), (0, 1))  # never more copies than ranks


def test_slots_split_the_experts_evenly_and_in_order() -> None:
    assert [list(slot_experts(s, 3, 8)) for s in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert experts_of((2, 0), 4, 8) == (0, 1, 4, 5)
    assert owners(ExpertMap(2, ((0, 1), (1,)), (0, 1)), 8) == [0] * 4 + [1] * 4


def test_a_shrink_serves_the_dead_ranks_slot_from_its_copy_and_loads_nothing() -> None:
    before = first_map(3, copies=2)  # ranks on A0, A1, A2
    after = next_map(before, [A0, A1, A2], [A0, A2], copies=2)  # A1 died, no replacement
    assert after.problems(2) == []
    assert after.holds == ((0, 1), (0, 2))  # exactly what the survivors already held
    assert after.serves == (0, 0, 1)  # slot 1 (A1's) now served by A0, which held its copy


def test_a_shrink_without_copies_loads_the_dead_slot_on_the_least_busy_rank() -> None:
    before = first_map(3, copies=1)
    after = next_map(before, [A0, A1, A2], [A0, A2], copies=1)
    assert after.problems(2) == []
    assert after.serves == (0, 0, 1) and after.holds == ((0, 1), (2,))


def test_a_replacement_on_the_dead_seat_holds_and_serves_what_it_held() -> None:
    before = first_map(2, copies=2)
    assert next_map(before, [A0, A1], [A0, A1], copies=2) == before  # restart or spare in place


def test_a_replacement_on_another_seat_takes_the_dead_seats_holdings() -> None:
    before = first_map(3, copies=1)
    after = next_map(before, [A0, A1, A2], [A0, B0, A2], copies=1)
    assert after.holds == ((0,), (1,), (2,)) and after.serves == (0, 1, 2)


def test_growing_back_balances_the_serving_and_restores_copies_on_the_new_seat() -> None:
    shrunk = next_map(first_map(3, copies=2), [A0, A1, A2], [A0, A2], copies=2)
    grown = next_map(shrunk, [A0, A2], [A0, A1, A2], copies=2)
    assert grown.problems(3) == []
    assert sorted(len(grown.served_by(r)) for r in range(3)) == [1, 1, 1]
    assert len(grown.holds[1]) == 2  # the returning seat loads two slots: every slot has 2 holders again
    assert all(sum(s in h for h in grown.holds) >= 2 for s in range(3))
    assert grown.holds[0] == (0, 1) and grown.holds[2] == (0, 2)  # survivors load nothing


@pytest.mark.parametrize("n,copies", [(2, 1), (3, 2), (4, 2), (4, 3)])
def test_every_sequence_of_deaths_and_returns_keeps_the_map_sound(n: int, copies: int) -> None:
    seats = [("a", i) for i in range(n)]
    for alive in itertools.chain.from_iterable(itertools.combinations(seats, k) for k in range(1, n + 1)):
        m = next_map(first_map(n, copies), seats, list(alive), copies)
        assert m.problems(len(alive)) == [], (alive, m)
        back = next_map(m, list(alive), seats, copies)
        assert back.problems(n) == [], (alive, back)


def test_an_inconsistent_map_is_named() -> None:
    assert "slot 1 is served by rank 0, which does not hold it" in ExpertMap(2, ((0,), (1,)), (0, 0)).problems(2)
    assert "expert holdings for 1 ranks, the plan has 2" in ExpertMap(1, ((0,),), (0,)).problems(2)


def _node(name: str, slots: int) -> NodeRecord:
    return NodeRecord(node=name, host=name, address="127.0.0.1", gpus=0, slots=slots, version="t", pid=1)


def test_the_leader_writes_the_map_into_plans_and_it_survives_json() -> None:
    spec = ClusterSpec(tp=1, pp=1, dp=0, ep="dp", expert_copies=2)
    first = make_plan(1, [_node("a", 3)], spec, "initial", "a")
    assert first.experts == first_map(3, 2)
    again = Plan.from_json("k", first.to_json())
    assert again.experts == first.experts
    bad = _node("a", 3)
    shrunk = make_plan(2, [NodeRecord(**{**bad.__dict__, "bad_seats": (1,)})], spec, "seat 1 out", "a",
                       previous=first)
    assert shrunk.dp == 2 and shrunk.experts is not None
    assert shrunk.experts.holds == ((0, 1), (0, 2)) and shrunk.experts.serves == (0, 0, 1)
    dense = make_plan(1, [_node("a", 2)], ClusterSpec(tp=1, dp=0), "initial", "a")
    assert dense.experts is None and "experts" not in dense.to_json()


def test_a_plan_with_a_broken_map_is_refused_by_name() -> None:
    spec = ClusterSpec(tp=1, pp=1, dp=0, ep="dp", expert_copies=1)
    raw = make_plan(1, [_node("a", 2)], spec, "initial", "a").to_json().replace('"serves": [0, 1]', '"serves": [1, 1]')
    with pytest.raises(MalformedRecord, match="slot 0 is served by rank 1, which does not hold it"):
        Plan.from_json("plans/1", raw)


def test_a_spec_written_before_ep_reads_as_tp_and_a_bad_one_is_refused() -> None:
    old = '{"tp": 1, "pp": 1, "dp": 0, "min_nodes": 1, "max_nodes": 0}'
    assert ClusterSpec.from_json("spec", old) == ClusterSpec()
    with pytest.raises(MalformedRecord, match="ep must be one of tp, dp"):
        ClusterSpec.from_json("spec", old[:-1] + ', "ep": "xp"}')


def test_rallyctl_plan_shows_the_slots_each_rank_holds_and_serves() -> None:
    from rallypoint.cli.views import format_plan

    spec = ClusterSpec(tp=1, pp=1, dp=0, ep="dp", expert_copies=2)
    first = make_plan(1, [_node("a", 3)], spec, "initial", "a")
    shrunk = make_plan(2, [NodeRecord(**{**_node("a", 3).__dict__, "bad_seats": (1,)})], spec, "seat 1 out", "a",
                       previous=first)
    text = format_plan(shrunk)
    assert "experts over every replica, in 3 slots" in text
    rows = [line.split() for line in text.splitlines()[3:]]
    assert rows == [["0", "a", "0", "0", "0", "0", "0,1", "0,1"], ["1", "a", "2", "1", "0", "0", "0,2", "2"]]
    assert "slots" not in format_plan(make_plan(1, [_node("a", 2)], ClusterSpec(), "initial", "a"))


def test_a_disaggregated_plan_gives_roles_while_a_decode_replica_is_left() -> None:
    from rallypoint.cli.views import format_plan

    spec = ClusterSpec(tp=1, pp=1, dp=0, prefill_replicas=1)
    plan = make_plan(1, [_node("a", 3)], spec, "initial", "a")
    assert plan.prefill_replicas == 1 and [plan.role_of(r) for r in range(3)] == ["prefill", "decode", "decode"]
    assert [line.split()[-1] for line in format_plan(plan).splitlines()[2:]] == ["prefill", "decode", "decode"]
    assert Plan.from_json("k", plan.to_json()) == plan
    alone = make_plan(2, [_node("a", 1)], spec, "shrunk", "a", previous=plan)
    assert alone.prefill_replicas == 0 and alone.role_of(0) == "colocated"  # the last replica serves whole requests
    with pytest.raises(MalformedRecord, match="prefill_replicas = 1 needs tp = pp = 1 and a decode replica left"):
        Plan.from_json("k", alone.to_json().replace('"reason"', '"prefill_replicas": 1, "reason"'))


def test_rallyctl_status_says_what_each_rank_serves() -> None:
    from rallypoint.cli.views import format_status, status_data

    shared = make_plan(1, [_node("a", 3)], ClusterSpec(tp=1, pp=1, dp=0, ep="dp", expert_copies=2), "initial", "a")
    pd = make_plan(1, [_node("a", 2)], ClusterSpec(tp=1, pp=1, dp=0, prefill_replicas=1), "initial", "a")
    for plan, want in ((shared, ["expert slots 0", "expert slots 1", "expert slots 2"]), (pd, ["prefill", "decode"])):
        d = status_data("c", {}, {}, plan, "a", None, set(), set(), now=0.0)
        assert [r["serves"] for r in d["ranks"]] == want
        assert "Serves" in format_status(d)
    plain = make_plan(1, [_node("a", 2)], ClusterSpec(tp=1, pp=1, dp=0), "initial", "a")
    assert "Serves" not in format_status(status_data("c", {}, {}, plain, "a", None, set(), set(), now=0.0))
