"""KV-cache sizing from free memory (pure arithmetic)."""

from __future__ import annotations

import pytest

from rallypoint.errors import CheckpointError
from rallypoint.worker.checkpoint import SIZES
from rallypoint.worker.sizing import MAX_ROWS, row_bytes, size_cache


def test_a_row_holds_every_layer_of_the_shard_for_every_position() -> None:
    c = SIZES["1b"]  # 16 layers, 8 KV heads of 64
    assert row_bytes(c, 16, 1, 8192, 2) == 16 * 2 * 8 * 64 * 8192 * 2  # 256 MiB in bf16
    assert row_bytes(c, 8, 2, 8192, 2) == row_bytes(c, 16, 1, 8192, 2) // 4  # PP=2 and TP=2 each halve it


def test_rows_fill_the_free_memory_fraction_and_stay_on_graph_buckets() -> None:
    c = SIZES["1b"]
    gib = 2**30
    got = size_cache(c, 16, 1, 2, free_bytes=100 * gib, fraction=0.8)  # 80 GiB / 256 MiB = 320 rows
    assert (got.max_batch, got.max_seq) == (MAX_ROWS, 8192)
    got = size_cache(c, 16, 1, 2, free_bytes=20 * gib, fraction=0.8)  # 16 GiB -> 64 rows
    assert got.max_batch == 64
    got = size_cache(c, 16, 1, 2, free_bytes=12 * gib, fraction=0.8)  # 38.4 -> 38 -> 32 (a bucket)
    assert got.max_batch == 32
    assert size_cache(c, 16, 1, 2, free_bytes=gib, max_batch=8, max_seq=512).max_batch == 8  # given: kept
    assert size_cache(c, 16, 1, 2, free_bytes=2 * gib, max_seq=1024).max_batch == 32  # 51 rows -> 32


def test_no_room_for_one_row_says_what_to_change() -> None:
    with pytest.raises(CheckpointError, match="no room for a KV-cache row of 8192 positions.*max_seq lower"):
        size_cache(SIZES["1b"], 16, 1, 2, free_bytes=2**28)
