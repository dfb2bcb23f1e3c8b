"""A rank process that also loads a model shard and decodes, driven by JSON lines on stdin.

It extends ``rank_agent``'s protocol (configure, primitives, loop, abort, stats, exit) with:

- ``load``: read this rank's shard of a HF checkpoint for its place in the current plan (a mixture
  of experts' experts spread over the plan's ``ep`` group when the process builds one, over its
  TP group otherwise);
- ``generate``: prefill a prompt batch, then greedy-decode with the KV cache through the pipeline
  (``rows``: place the batch in those cache rows, with per-row positions ``[B, S]``).
  The last stage picks the tokens and sends them back to the first stage (``share_tokens``); every
  rank replies with the tokens it saw and, on the last stage, the logits of every forward.
  Each DP replica decodes its own prompts; with a mixture of experts over the ``ep`` group (every
  TP rank of every replica, per stage) the replicas step together, their tokens meeting in the
  experts' all-to-alls.

``ModelRankPool`` starts and reuses such processes from a test (like ``ranks.RankPool``).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from rallypoint.protocol.grid import layers_for
from rallypoint.testing.rank_agent import Agent, serve
from rallypoint.worker.main import TPAdapter
from rallypoint.worker.model import StageModel
from rallypoint.worker.model_config import ModelConfig
from rallypoint.worker.pipeline import pipeline_forward, share_tokens
from rallypoint.worker.sampling import sample
from rallypoint.worker.shards import load_stage


class ModelAgent(Agent):
    """``rank_agent.Agent`` plus ``load`` and ``generate``."""

    stage: StageModel | None = None

    def load(self, cmd: dict[str, Any]) -> dict[str, Any]:
        gs = self.rt.groups
        assert gs is not None
        t0 = time.monotonic()
        config = ModelConfig.from_dir(cmd["ckpt"])
        ep = gs.groups.get("ep")
        ep_rank, ep_size = (ep.rank_in_group, ep.world_size) if ep is not None else (gs.tp_rank, gs.tp_size)
        config.check_parallel(gs.tp_size, gs.pp_size, ep_size)
        layers = layers_for(config.num_hidden_layers, gs.pp_rank, gs.pp_size)
        self.stage = None  # drop the previous shard before reading the next
        self.stage = load_stage(cmd["ckpt"], config, gs.tp_rank, gs.tp_size, layers, gs.is_first_stage,
                                gs.is_last_stage, self.rt.device, getattr(torch, cmd.get("dtype", "float32")),
                                comm=self.rt.comm if ep is not None else TPAdapter(self.rt),  # all_to_all on tp
                                ep_rank=ep_rank, ep_size=ep_size)
        experts = sorted({int(name.split(".experts.")[1].split(".")[0]) for name, _ in self.stage.named_parameters()
                          if ".experts." in name})
        return {"layers": list(layers), "first": gs.is_first_stage, "last": gs.is_last_stage,
                "tp_rank": gs.tp_rank, "pp_rank": gs.pp_rank, "dp_rank": gs.dp_rank, "ep_rank": ep_rank,
                "experts": experts, "seconds": time.monotonic() - t0}

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
        return {"tp_rank": gs.tp_rank, "pp_rank": gs.pp_rank, "dp_rank": gs.dp_rank, "seconds": time.monotonic() - t0,
                "tokens": [list(t) for t in zip(*tokens_out)] if tokens_out else None,  # [B, steps]
                "logits": logits_out if gs.is_last_stage else None}


    # -- disaggregated prefill/decode: the KV of one request over a group (worker.kv_transfer) --

    def _step(self, x: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        gs, comm, stage = self.rt.groups, self.rt.comm, self.stage
        assert gs is not None and comm is not None and stage is not None
        logits = pipeline_forward(stage, comm, gs, x, pos, rows)
        assert logits is not None, "one stage holds the whole model here"
        return sample(logits, 0.0)                                                       # [1]

    @torch.no_grad()
    def kv_prefill_send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Prefill ``prompt`` (one request) in cache row 0, send its KV and first token to
        ``dst`` over ``group``, then decode ``steps`` more tokens here (the colocated reference)."""
        from rallypoint.worker import kv_transfer

        assert self.stage is not None and self.rt.comm is not None
        dev, s = self.rt.device, len(cmd["prompt"])
        self.stage.setup_cache(cmd.get("max_rows", 1), cmd["max_seq"], device=dev)
        rows = torch.tensor([0], device=dev)
        t0 = time.monotonic()
        tok = self._step(torch.tensor([cmd["prompt"]], device=dev), torch.arange(s, device=dev)[None], rows)
        prefill = time.monotonic() - t0
        t0 = time.monotonic()
        kv_transfer.send(self.rt.comm, cmd["dst"], cmd["rid"], kv_transfer.row_kv(self.stage, 0, s), int(tok[0]),
                         cmd.get("group", "dp"))
        sent = time.monotonic() - t0
        tokens = [int(tok[0])]
        for n in range(cmd["steps"]):
            tok = self._step(tok[:, None], torch.tensor([[s + n]], device=dev), rows)
            tokens.append(int(tok[0]))
        return {"tokens": tokens, "prefill_seconds": prefill, "send_seconds": sent}

    @torch.no_grad()
    def kv_receive_decode(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Receive one request's KV from ``src`` over ``group`` into a ``KVBuffer``, place it in
        cache row ``row``, and decode ``steps`` tokens from its first token. A transfer that
        breaks off answers ``error`` (and what the buffer still holds)."""
        from rallypoint.worker import kv_transfer

        assert self.stage is not None and self.rt.comm is not None
        dev, row = self.rt.device, cmd["row"]
        self.stage.setup_cache(row + 1, cmd["max_seq"], device=dev)
        buffer = kv_transfer.KVBuffer()
        t0 = time.monotonic()
        try:
            entry = buffer.receive(self.rt.comm, cmd["src"], cmd.get("group", "dp"))
        except kv_transfer.TransferError as exc:
            return {"error": str(exc), "buffered": len(buffer), "freed": buffer.freed,
                    "seconds": time.monotonic() - t0}
        received = time.monotonic() - t0
        entry = buffer.take(entry.rid)
        kv_transfer.place(self.stage, row, entry.layers)
        s, rows = entry.length, torch.tensor([row], device=dev)
        tok = torch.tensor([entry.first_token], device=dev)
        tokens = [entry.first_token]
        for n in range(cmd["steps"]):
            tok = self._step(tok[:, None], torch.tensor([[s + n]], device=dev), rows)
            tokens.append(int(tok[0]))
        return {"rid": entry.rid, "tokens": tokens, "length": s, "buffered": len(buffer), "freed": buffer.freed,
                "receive_seconds": received}


def main() -> int:
    return serve(ModelAgent, default_floor=5.0)


if __name__ == "__main__":
    sys.exit(main())
