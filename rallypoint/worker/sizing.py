"""How many KV-cache rows, and how long, a rank can afford: sized from the memory left after its
weights, not from a fixed 8 x 512.

A row is one request's keys and values for every position of every layer of this rank's shard:
``layers * 2 * (kv_heads / tp) * head_dim * max_seq * itemsize`` bytes. ``[worker] max_seq = 0``
takes the model's context (``max_position_embeddings``, at most ``MAX_SEQ_CAP``); ``max_batch = 0``
takes as many rows as fit in ``fraction`` of the free memory (the rest is left to activations and
CUDA graphs), at most ``MAX_ROWS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rallypoint.errors import CheckpointError
from rallypoint.worker.model_config import ModelConfig

MAX_ROWS = 256
MAX_SEQ_CAP = 8192


@dataclass(frozen=True)
class CacheSize:
    max_batch: int
    max_seq: int
    row_bytes: int


def row_bytes(config: ModelConfig, layers: int, tp_size: int, max_seq: int, itemsize: int) -> int:
    """Bytes of one KV-cache row of a shard with ``layers`` layers at TP ``tp_size``."""
    return layers * 2 * (config.num_key_value_heads // tp_size) * config.head_dim * max_seq * itemsize


def size_cache(config: ModelConfig, layers: int, tp_size: int, itemsize: int, free_bytes: int,
               max_batch: int = 0, max_seq: int = 0, fraction: float = 0.8) -> CacheSize:
    """The cache a rank can hold: ``max_batch``/``max_seq`` as given, or sized when 0.

    Raises:
        CheckpointError: not even one row of ``max_seq`` positions fits (the seat cannot hold this model).
    """
    seq = max_seq or min(config.max_position_embeddings, MAX_SEQ_CAP)
    per_row = row_bytes(config, layers, tp_size, seq, itemsize)
    rows = max_batch or min(MAX_ROWS, int(free_bytes * fraction) // per_row)
    if rows < 1:
        raise CheckpointError(f"no room for a KV-cache row of {seq} positions ({per_row / 2**20:.1f} MiB) in "
                              f"{fraction:.0%} of {free_bytes / 2**30:.2f} GiB free; set [worker] max_seq lower")
    if rows >= 32:
        rows -= rows % 32  # the CUDA-graph batch buckets are multiples of 32 past 32
    return CacheSize(rows, seq, per_row)
