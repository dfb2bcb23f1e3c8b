"""DECODE steps replayed as CUDA graphs: one graph per (batch bucket, KV-length bucket).

A decode step of a 1 B model is ~250 small kernels; launched one by one from Python it takes
~13 ms where the GPU needs well under one. A CUDA graph launches them all at once. The engine
makes decode shapes few (rows ``0..B-1``, ``kv_len`` a power of two), so a graph is captured the
first time a shape is seen, or ahead of time by ``capture_all`` (a warm spare does this while it
waits, so adoption costs no capture). Inputs are copied into static buffers; the graph writes the
KV cache in place and its logits into a static output.

With ``compile`` the captured forward goes through ``StageModel.compile_decode`` (each layer's
small ops fused by ``torch.compile``): about half the kernels per step. The compiling is done by
``warm`` when the shard loads, never inside a request's step.

Graphs belong to one model object and its KV cache: a new shard (a new ``StageModel``) gets a new
``DecodeGraphs``. Whole models on one rank only (TP=1, PP=1): a TP>1 graph would capture the NCCL
all-reduces too, and must be captured again after every group rebuild (a new communicator).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch._dynamo

from rallypoint.log import get_logger
from rallypoint.worker.engine import KV_FLOOR
from rallypoint.worker.model import StageModel

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

log = get_logger("graphs")

_WARMUP_RUNS = 2
# Decode steps of up to this many rows run through the compiled layers (``StageModel.compile_decode``).
# Graph replay on an H200, 1 B bf16 model, KV 256, ms: rows 1: 1.53 eager / 1.22 compiled; 8: 1.74 /
# 1.39; 16: 1.78 / 1.59; 32: 1.89 / 2.03; 64: 2.11 / 2.87; 256: 3.50 / 8.13.
COMPILE_MAX_ROWS = 16


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ..., 32, then every 32 (64, 96, ...), capped by and ending at ``max_batch``."""
    out, b = [], 1
    while b < min(max_batch, 32):
        out.append(b)
        b *= 2
    b = min(max_batch, 32)
    while b < max_batch:
        out.append(b)
        b += 32
    return out + [max_batch]


def kv_buckets(max_seq: int) -> list[int]:
    """Every KV length ``engine.kv_bucket`` can pick for ``max_seq``."""
    out, n = [], KV_FLOOR
    while n < max_seq:
        out.append(n)
        n *= 2
    return out + [max_seq]


class DecodeGraphs:
    """Captured decode forwards of ``model`` (a whole model, its KV cache set up).

    Call it like the model's decode forward: ``graphs(x [B, 1], pos [B, 1], kv_len) -> logits
    [B, 1, V]`` (a view of a static buffer, valid until the next call).
    """

    def __init__(self, model: StageModel, max_batch: int, max_seq: int, device: torch.device,
                 compile: bool = False) -> None:
        self.model, self.max_batch, self.max_seq, self.device = model, max_batch, max_seq, device
        self.buckets = batch_buckets(max_batch)
        self.x = torch.zeros(max_batch, 1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(max_batch, 1, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: _POOL_HANDLE | None = None
        self.capture_seconds = 0.0
        self.compile_seconds = 0.0
        if compile:
            # Every shape the engine makes compiles once (batch 1 and the full KV length are
            # specialized by torch: ~4-6 compilations); past the limit torch would run eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            model.compile_decode(max_rows=COMPILE_MAX_ROWS)
            self.compile_seconds = self.warm()

    def bucket(self, b: int) -> int:
        return next(n for n in self.buckets if n >= b)

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        b = x.shape[0]
        n = self.bucket(b)
        self.x[:b].copy_(x, non_blocking=True)
        self.pos[:b].copy_(pos, non_blocking=True)
        if n > b:  # padding rows: free rows, a throwaway token at position 0
            self.x[b:n].zero_()
            self.pos[b:n].zero_()
        graph, out = self.graphs.get((n, kv_len)) or self.capture(n, kv_len)
        graph.replay()
        return out[:b]

    @torch.no_grad()
    def capture(self, n: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the decode forward of ``n`` rows over ``kv_len`` positions (warm-up runs first,
        on a side stream, as CUDA graphs require). The runs write the KV cache of rows ``0..n-1``
        at the positions in the static buffer: the values a replay would write, or, before any
        request, throwaway ones a prefill overwrites."""
        t0 = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_RUNS):
                self.model(self.x[:n], self.pos[:n], None, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(self.x[:n], self.pos[:n], None, kv_len)
        self.pool = graph.pool()
        self.graphs[(n, kv_len)] = (graph, out)
        took = time.perf_counter() - t0
        self.capture_seconds += took
        log.debug("graphs.captured", batch=n, kv_len=kv_len, seconds=round(took, 4))
        return graph, out

    @torch.no_grad()
    def warm(self) -> float:
        """Run the decode forward once at every shape the engine makes (batch bucket x KV bucket),
        so that whatever torch compiles apart (batch 1, a full cache, ...) is compiled now and no
        request's step waits for a compilation; returns the seconds.

        Only before any request is in the cache (it writes throwaway keys at position 0).
        """
        t0 = time.perf_counter()
        self.x.zero_()
        self.pos.zero_()
        for kv_len in kv_buckets(self.max_seq):
            for n in self.buckets:
                if n <= COMPILE_MAX_ROWS:
                    self.model(self.x[:n], self.pos[:n], None, kv_len)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        took = time.perf_counter() - t0
        log.info("graphs.compiled", seconds=round(took, 3))
        return took

    def capture_all(self, kv_lens: list[int] | None = None) -> float:
        """Capture every (batch bucket, KV bucket) not captured yet; returns the seconds it took.

        Only before any request is in the cache (it writes throwaway keys at position 0 of every
        row): at load, or in a warm spare.
        """
        t0 = time.perf_counter()
        self.x.zero_()
        self.pos.zero_()
        for kv_len in kv_lens or kv_buckets(self.max_seq):
            for n in self.buckets:
                if (n, kv_len) not in self.graphs:
                    self.capture(n, kv_len)
        torch.cuda.synchronize(self.device)
        took = time.perf_counter() - t0
        log.info("graphs.captured_all", graphs=len(self.graphs), seconds=round(took, 3))
        return took
