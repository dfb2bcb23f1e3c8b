"""The plan arithmetic every party shares: rank grid, groups, layer split (pure logic)."""

from __future__ import annotations

import pytest

from rallypoint.errors import GroupError
from rallypoint.protocol.grid import Coords, coords_of, group_members, group_ranks, layers_for, rank_of


def test_vllm_rank_order_for_8_gpus() -> None:
    groups = group_ranks(tp_size=2, pp_size=2, dp_size=2)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["pp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2), (4, 2), (1, 4)])
def test_coords_round_trip(tp: int, pp: int) -> None:
    for rank in range(tp * pp * 3):
        assert rank_of(coords_of(rank, tp, pp), tp, pp) == rank
    assert coords_of(5, 2, 2) == Coords(dp=1, pp=0, tp=1)


def test_expert_group_spans_every_replicas_tp_ranks_of_one_stage() -> None:
    assert group_members("ep", 5, tp=2, pp=2, dp=2) == (0, 1, 4, 5)
    assert group_members("ep", 6, tp=2, pp=2, dp=2) == (2, 3, 6, 7)
    with pytest.raises(GroupError, match="unknown group 'xp'"):
        group_members("xp", 0, 1, 1, 1)


def test_pipeline_stages_split_the_layers() -> None:
    assert [list(layers_for(5, p, 2)) for p in range(2)] == [[0, 1, 2], [3, 4]]
    assert [len(layers_for(10, p, 4)) for p in range(4)] == [3, 3, 2, 2]
    assert list(layers_for(4, 0, 1)) == [0, 1, 2, 3]
