"""Decode-step GPU time per batch bucket: CUDA graphs of the eager layers vs of ``torch.compile``d layers.

The figure behind ``worker.graphs.COMPILE_MAX_ROWS``: for each (rows, KV length) the decode graph
is captured once, then replayed 50 times back to back between two synchronizes; the table gives
ms per replay (GPU time of one decode step, no host work). Both variants run in one process on the
same checkpoint, one after the other (the compiled one compiles every layer for all rows here,
whatever ``COMPILE_MAX_ROWS`` says).

    source .carry/on-gpu.sh && python bench/graph_replay.py --model /tmp/m1b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.graphs import DecodeGraphs
from rallypoint.worker.model_config import ModelConfig
from rallypoint.worker.shards import load_stage


@torch.no_grad()
def replay_ms(path: Path, compiled: bool, rows: list[int], kv_lens: list[int], max_batch: int, max_seq: int,
              dtype: torch.dtype, replays: int) -> dict[str, float]:
    config = ModelConfig.from_dir(path)
    device = torch.device("cuda")
    model = load_stage(path, config, 0, 1, range(config.num_hidden_layers), device=device, dtype=dtype)
    model.setup_cache(max_batch, max_seq)
    graphs = DecodeGraphs(model, max_batch, max_seq, device)
    out: dict[str, float] = {}
    if compiled:
        torch._dynamo.config.recompile_limit = 64
        model.compile_decode()  # every row count
        t0 = time.perf_counter()
        for kv in kv_lens:
            for b in rows:
                model(graphs.x[:b], graphs.pos[:b], None, kv)
        torch.cuda.synchronize()
        out["compile_s"] = time.perf_counter() - t0
    for b in rows:
        for kv in kv_lens:
            x = torch.zeros(b, 1, dtype=torch.int64, device=device)
            pos = torch.full((b, 1), 100, device=device)
            graphs(x, pos, kv)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(replays):
                graphs(x, pos, kv)
            torch.cuda.synchronize()
            out[f"{b}/{kv}"] = 1e3 * (time.perf_counter() - t0) / replays
    del graphs, model
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="checkpoint (a random 1b is written when missing)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--kv", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    if not (args.model / "config.json").exists():
        make_model(args.model, "1b", seed=0)
    dtype = getattr(torch, args.dtype)
    res = {name: replay_ms(args.model, name == "compiled", args.rows, args.kv, max(args.rows), max(args.kv), dtype,
                           args.replays) for name in ("eager layers", "compiled layers")}
    print(f"decode graph replay, ms per step ({args.model}, {args.dtype}, {torch.cuda.get_device_name(0)}, "
          f"torch {torch.__version__}); compile took {res['compiled layers']['compile_s']:.1f} s")
    print(f"{'rows':>5} {'KV':>5} | {'eager':>8} {'compiled':>9} {'compiled/eager':>15}")
    for b in args.rows:
        for kv in args.kv:
            e, c = res["eager layers"][f"{b}/{kv}"], res["compiled layers"][f"{b}/{kv}"]
            print(f"{b:>5} {kv:>5} | {e:8.3f} {c:9.3f} {c / e:15.2f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
