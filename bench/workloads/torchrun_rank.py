"""The benchmark's workload as a plain torchrun program (the baseline rallypoint is compared with).

    torchrun --standalone --nproc-per-node 2 --max-restarts 30 bench/workloads/torchrun_rank.py \
        --workload loop --notes /tmp/notes.jsonl
    ... --workload serve --model /tmp/tiny

Two CPU ranks on gloo, one ``init_process_group``. ``loop``: all-reduce a 4 KiB tensor over
and over, checking the sum, as rallypoint's ``allreduce-probe`` does. ``serve``: the tiny model at
TP=2 (rallypoint's own model code, so the compute is the same), greedy 64-token completions one
after another. The group is built over torchrun's store with a key prefix per restart (the
stock ``init_process_group("gloo")`` is ``--stock``: its restarts often fail, see RESULTS.md), so
torchrun is measured at its best. Each process appends JSON lines to ``--notes``: when it started (pid, torchrun's
restart count) and when its first all-reduce, or its first token, of that start completed. A
request in flight when a rank dies is lost: torchrun restarts every worker and the program
starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist


class DistTP:
    """The model's TP collectives over torch.distributed's default group."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=dim)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=("loop", "serve"), required=True)
    ap.add_argument("--notes", required=True)
    ap.add_argument("--model", default="")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--stock", action="store_true", help="plain init_process_group('gloo') (see below)")
    args = ap.parse_args()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.stock:
        dist.init_process_group("gloo")
    else:
        # The group's keys under a prefix of their own per restart: with the stock call, a
        # restarted worker can read the previous attempt's gloo addresses from torchrun's store
        # (connection refused, another restart) or wait for them until the group's timeout.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False,
                              timeout=timedelta(seconds=60))
        dist.init_process_group("gloo", store=dist.PrefixStore(f"restart-{restart}", store), rank=rank,
                                world_size=size)
    notes = open(args.notes, "a")  # noqa: SIM115 (appended to until the process is killed)

    def note(kind: str, **kw: object) -> None:
        notes.write(json.dumps({"kind": kind, "rank": rank, "pid": os.getpid(), "restart": restart,
                                "at": time.time(), **kw}) + "\n")
        notes.flush()

    note("start")
    if args.workload == "loop":
        t = torch.zeros(1024)
        calls = 0
        while True:
            t.zero_()
            t[0] = 1.0
            dist.all_reduce(t)
            calls += 1
            if calls == 1:
                note("first_step")
            if float(t[0]) != size:
                note("wrong", got=float(t[0]))

    from rallypoint.worker.model_config import ModelConfig
    from rallypoint.worker.shards import load_stage
    from rallypoint.worker.tokenizer import load_tokenizer

    config = ModelConfig.from_dir(args.model)
    stage = load_stage(args.model, config, rank, size, range(config.num_hidden_layers), device="cpu",
                       dtype=torch.float32, comm=DistTP())
    prompt = load_tokenizer(args.model).encode("the quick brown fox jumps over the lazy dog")
    stage.setup_cache(1, len(prompt) + args.tokens + 1)
    first = True
    with torch.no_grad():
        while True:
            stage.reset_cache()
            x, pos = torch.tensor([prompt]), torch.arange(len(prompt))
            for _ in range(args.tokens):
                tok = stage(x, pos)[:, -1].argmax(-1)                                    # [1]
                if first:
                    note("first_step")
                    first = False
                x, pos = tok[:, None], pos[-1:] + 1


if __name__ == "__main__":
    raise SystemExit(main())
