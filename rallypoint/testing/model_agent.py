"""A rank process that also loads a model shard and decodes, driven by JSON lines on stdin.

It extends ``rank_agent``'s protocol (configure, primitives, loop, abort, stats, exit) with:

- ``load``: read this rank's shard of a HF checkpoint for its place in the current plan;
- ``generate``: prefill a prompt batch, then greedy-decode with the KV cache through the pipeline
  (``rows``: place the batch in those cache rows, with per-row positions ``[B, S]``).
  The last stage picks the tokens and sends them back to the first stage (``share_tokens``); every
  rank replies with the tokens it saw and, on the last stage, the logits of every forward.

``ModelRankPool`` starts and reuses such processes from a test (like ``ranks.RankPool``).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
import torch

from rallypoint.log import configure_logging
from rallypoint.rendezvous.etcd import EtcdSettings, endpoints_from
from rallypoint.testing.rank_agent import Agent, reply
from rallypoint.testing.ranks import RankPool, RankProcess
from rallypoint.worker.llama_config import LlamaConfig
from rallypoint.worker.model import StageModel
from rallypoint.worker.pipeline import pipeline_forward, share_tokens, stage_layers
from rallypoint.worker.runtime import RankRuntime, RuntimeSettings
from rallypoint.worker.sampling import sample
from rallypoint.worker.shards import load_stage


class ModelAgent(Agent):
    """``rank_agent.Agent`` plus ``load`` and ``generate``."""

    stage: StageModel | None = None

    def load(self, cmd: dict[str, Any]) -> dict[str, Any]:
        gs = self.rt.groups
        assert gs is not None
        t0 = time.monotonic()
        config = LlamaConfig.from_dir(cmd["ckpt"])
        config.check_parallel(gs.tp_size, gs.pp_size)
        layers = stage_layers(config.num_hidden_layers, gs.pp_size, gs.pp_rank)
        self.stage = None  # drop the previous shard before reading the next
        self.stage = load_stage(cmd["ckpt"], config, gs.tp_rank, gs.tp_size, layers, gs.is_first_stage,
                                gs.is_last_stage, self.rt.device, getattr(torch, cmd.get("dtype", "float32")),
                                comm=self.rt.comm)
        return {"layers": list(layers), "first": gs.is_first_stage, "last": gs.is_last_stage,
                "tp_rank": gs.tp_rank, "pp_rank": gs.pp_rank, "seconds": time.monotonic() - t0}

    @torch.no_grad()
    def generate(self, cmd: dict[str, Any]) -> dict[str, Any]:
        gs, comm, stage = self.rt.groups, self.rt.comm, self.stage
        assert gs is not None and comm is not None and stage is not None
        prompt = torch.tensor(cmd["prompt"], dtype=torch.int64, device=self.rt.device)  # [B, S]
        b, s = prompt.shape
        steps = cmd["steps"]
        # "rows": put the batch in these KV-cache rows, with per-row positions (continuous batching)
        rows = torch.tensor(cmd["rows"], device=self.rt.device) if cmd.get("rows") else None  # [B]
        stage.setup_cache(b if rows is None else int(rows.max()) + 1, s + steps, device=self.rt.device)
        x, pos = prompt, torch.arange(s, device=self.rt.device)                         # [B, S], [S]
        if rows is not None:
            pos = pos.expand(b, -1)                                                      # [B, S]
        logits_out: list[Any] = []
        tokens_out: list[list[int]] = []
        t0 = time.monotonic()
        for _ in range(steps):
            first = gs.is_first_stage
            logits = pipeline_forward(stage, comm, gs, x if first else None, pos if first else None,
                                      rows if first else None)
            tok = sample(logits, 0.0) if logits is not None else None                    # [B]
            tok = share_tokens(comm, gs, tok)
            if logits is not None:
                logits_out.append(logits.tolist())
            if tok is not None:
                tokens_out.append(tok.tolist())
                x, pos = tok[:, None], pos[..., -1:] + 1                                 # [B, 1], [1] or [B, 1]
        return {"tp_rank": gs.tp_rank, "pp_rank": gs.pp_rank, "seconds": time.monotonic() - t0,
                "tokens": [list(t) for t in zip(*tokens_out)] if tokens_out else None,  # [B, steps]
                "logits": logits_out if gs.is_last_stage else None}


class ModelRankProcess(RankProcess):
    """A ``RankProcess`` running ``model_agent`` instead of ``rank_agent``."""

    def __init__(self, endpoints: tuple[str, ...], cluster: str, log_path: Path,
                 device: str = "cpu", deadline_floor: float = 5.0, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rallypoint.testing.model_agent", "--cluster", cluster,
             "--endpoints", ",".join(endpoints), "--device", device, "--deadline-floor", str(deadline_floor)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, **(env or {})}, start_new_session=True)
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._pending: dict[int, dict[str, Any]] = {}
        threading.Thread(target=self._read, daemon=True).start()
        self.ready: dict[str, Any] | None = None


class ModelRankPool(RankPool):
    """``RankPool`` of ``ModelRankProcess``es."""

    def spawn(self, n: int) -> list[RankProcess]:
        new: list[RankProcess] = [
            ModelRankProcess(self.endpoints, self.cluster, self.log_dir / f"rank{next(self._count)}.log", **self.kw)
            for _ in range(n)]
        for p in new:
            p.wait_ready()
        self.all.extend(new)
        return new


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--deadline-floor", type=float, default=5.0)
    args = ap.parse_args()
    configure_logging("info", json=True)
    torch.set_num_threads(1)  # several ranks share a few cores
    rt = RankRuntime(RuntimeSettings(
        cluster=args.cluster, device=args.device, deadline_floor=args.deadline_floor,
        etcd=EtcdSettings(endpoints=endpoints_from(args.endpoints), request_timeout=1.0, retry_deadline=5.0)))
    agent = ModelAgent(rt)
    work: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def reader() -> None:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "abort":
                labels = rt.abort_generation(cmd["gen"], cmd.get("reason", "abort order"), tuple(cmd.get("ranks", ())))
                reply({"id": cmd.get("id"), "ok": True, "aborted": labels})
            else:
                work.put(cmd)
        work.put(None)

    threading.Thread(target=reader, daemon=True).start()
    reply({"ready": True, "pid": psutil.Process().pid})
    while (cmd := work.get()) is not None:
        if cmd["cmd"] == "exit":
            break
        try:
            reply({"id": cmd.get("id"), "ok": True, **getattr(agent, cmd["cmd"])(cmd)})
        except Exception as exc:
            reply({"id": cmd.get("id"), "ok": False, "error": type(exc).__name__, "message": str(exc),
                   "trace": traceback.format_exc()[-2000:]})
    rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
