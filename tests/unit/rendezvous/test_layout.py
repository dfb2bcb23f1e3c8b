"""Placement (pure logic); the rank order itself is tests/unit/protocol/test_grid.py's."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rallypoint.errors import LayoutError
from rallypoint.rendezvous.layout import UnbuildableSeats, make_plan, place
from rallypoint.rendezvous.records import ClusterSpec, NodeRecord


def node(name: str, slots: int, cordoned: bool = False) -> NodeRecord:
    return NodeRecord(node=name, host="h", address="127.0.0.1", gpus=slots, slots=slots,
                      version="0", pid=1, started=0.0, cordoned=cordoned)


def test_place_fills_nodes_in_order_and_leaves_spare_slots() -> None:
    dp, ranks = place([node("b", 4), node("a", 4), node("c", 1)], ClusterSpec(tp=2, pp=2))
    assert dp == 2
    assert [(r.rank, r.node, r.local_rank) for r in ranks[:5]] == [
        (0, "a", 0), (1, "a", 1), (2, "a", 2), (3, "a", 3), (4, "b", 0)]
    assert len(ranks) == 8  # c's slot stays free


def test_place_honours_dp_min_max_and_cordon() -> None:
    nodes = [node("a", 2), node("b", 2), node("c", 2, cordoned=True)]
    assert place(nodes, ClusterSpec(tp=2, dp=1))[0] == 1
    assert place(nodes, ClusterSpec(tp=2, max_nodes=1))[0] == 1
    with pytest.raises(LayoutError, match="min_nodes is 3"):
        place(nodes, ClusterSpec(tp=2, min_nodes=3))
    with pytest.raises(LayoutError, match="cannot hold one replica"):
        place([node("a", 2)], ClusterSpec(tp=4))


def test_place_shrinks_whole_replicas_and_skips_bad_seats() -> None:
    """dp=3 asked, room for 2: a shrink drops a whole replica; TP never changes."""
    nodes = [node("a", 2), node("b", 2), node("c", 2, cordoned=True)]
    dp, ranks = place(nodes, ClusterSpec(tp=2, dp=3))
    assert dp == 2 and len(ranks) == 4
    hurt = [node("a", 2), replace(node("b", 2), bad_seats=(1,)), node("c", 2)]
    dp, ranks = place(hurt, ClusterSpec(tp=2, dp=3))
    assert dp == 2 and ("b", 1) not in {(r.node, r.local_rank) for r in ranks}
    assert [(r.node, r.local_rank) for r in ranks] == [("a", 0), ("a", 1), ("b", 0), ("c", 0)]
    # grows back once the seat is healthy again
    assert place([node("a", 2), node("b", 2), node("c", 2)], ClusterSpec(tp=2, dp=3))[0] == 3
    with pytest.raises(LayoutError, match="1 healthy rank slot"):
        place([replace(node("a", 2), bad_seats=(0,))], ClusterSpec(tp=2))


def test_make_plan_members_include_rankless_nodes() -> None:
    plan = make_plan(3, [node("a", 2), node("z", 0)], ClusterSpec(tp=2), "why", "a")
    assert plan.members == ("a", "z") and plan.world_size == 2 and plan.gen == 3
    assert plan.ranks_on("a")[1].rank == 1 and plan.ranks_on("z") == []


def test_placement_is_sticky_only_ranks_that_lost_their_seat_move() -> None:
    spec = ClusterSpec(tp=2)
    first = make_plan(1, [node("n1", 1), node("n2", 1), node("n3", 1)], spec, "formed", "n1")
    assert [(r.node, r.local_rank) for r in first.ranks] == [("n1", 0), ("n2", 0)]
    # n1 dies: rank 1 stays on n2, only rank 0 moves (to n3)
    after_loss = make_plan(2, [node("n2", 1), node("n3", 1)], spec, "left n1", "n2", previous=first)
    assert [(r.node, r.local_rank) for r in after_loss.ranks] == [("n3", 0), ("n2", 0)]
    # n1 comes back: nothing moves (without the previous plan it would take rank 0 back)
    back = make_plan(3, [node("n1", 1), node("n2", 1), node("n3", 1)], spec, "joined n1", "n2", previous=after_loss)
    assert back.ranks == after_loss.ranks and back.members == ("n1", "n2", "n3")
    assert make_plan(3, [node("n1", 1), node("n2", 1), node("n3", 1)], spec, "x", "n2").ranks != after_loss.ranks
    # room for a second replica: the first stays put, the new one takes the free seats
    grown = make_plan(4, [node("n1", 1), node("n2", 1), node("n3", 1), node("n4", 1)], spec, "joined n4", "n2",
                      previous=back)
    assert grown.dp == 2 and grown.ranks[:2] == back.ranks
    assert [(r.node, r.local_rank) for r in grown.ranks[2:]] == [("n1", 0), ("n4", 0)]


def test_an_unbuildable_seat_moves_when_another_fits_and_is_used_last_otherwise() -> None:
    """n1 and n2 cannot reach each other (their groups never build): avoiding n2's seat moves its
    rank to n3 and keeps n1's; with no other seat the plan still uses it (nothing else fits)."""
    spec = ClusterSpec(tp=2)
    nodes = [node("n1", 1), node("n2", 1), node("n3", 1)]
    first = make_plan(1, nodes, spec, "formed", "n1")
    moved = make_plan(2, nodes, spec, "n2/0 could not build", "n1", previous=first, avoid=frozenset({("n2", 0)}))
    assert [(r.node, r.local_rank) for r in moved.ranks] == [("n1", 0), ("n3", 0)]
    tight = make_plan(2, nodes[:2], spec, "n2/0 could not build", "n1", previous=first, avoid=frozenset({("n2", 0)}))
    assert [(r.node, r.local_rank) for r in tight.ranks] == [("n1", 0), ("n2", 0)]


def test_a_seat_is_avoided_after_its_groups_failed_to_build_twice_in_a_row() -> None:
    seen = UnbuildableSeats()
    assert seen.note(4, "n2/0 could not build generation 4's groups: rank(s) [0] never arrived") == frozenset()
    assert seen.note(5, "n2/0 could not build generation 5's groups: rank(s) [0] never arrived") == {("n2", 0)}
    # no layout fit yet: the leader notes the standing request again each cycle; it stays avoided
    assert seen.note(5, "n2/0 could not build generation 5's groups: rank(s) [0] never arrived") == {("n2", 0)}
    assert seen.note(6, "rank 1 (n3/0) exited with code -9") == frozenset()  # its next plan built
    assert seen.note(9, "n2/0 could not build generation 9's groups: ...") == frozenset()  # not in a row
    assert seen.note(10, "n1/0 could not build generation 10's groups: ...") == frozenset()
    assert seen.note(11, "n1/0 could not build generation 11's groups: ...") == {("n1", 0)}

    # a build that could not connect to its peer at all: moved at once
    assert seen.note(20, "n3/0 could not build generation 20's groups: building tp[0,1]@g20 (rank 1 of 2) failed: "
                         "RuntimeError: [enforce fail at socket.cc:142] connect: Invalid argument") == {("n3", 0)}
    assert seen.note(21, "n1/0 unreachable from its peers in tp[0,1]@g20 (gen 21)") == {("n1", 0)}
