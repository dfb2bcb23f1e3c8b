"""Shard load time: ``rallypoint.worker.shards.load_stage`` vs plain ``safetensors.torch.load_file``.

Same checkpoint (``--model``; a seeded random ``1b`` Llama is written there first when the directory
has no ``config.json``), same bytes, same GPU, same process, one run:

* TP=1: ``load_stage`` of the whole model onto cuda:0 vs ``load_file(f, device="cuda:0")`` for every
  safetensors file of the checkpoint (times summed);
* TP=N (``--tp 1 2 4``): ``load_stage(tp_rank=r, tp_size=N)`` onto cuda:r for every rank r, and
  as a reference ``load_file`` of the whole checkpoint onto that same cuda:r, scaled by the rank's
  byte share (its parameter bytes / the checkpoint's tensor bytes; the embedding and the norms are
  replicated, so a share is a bit more than 1/N).

The ranks run **sequentially in this one process** (not in parallel processes), so each figure is one
rank's load with nothing else competing for the disk, the page cache, PCIe or the CPU.

Method: the page cache is warmed first (every file read once), and one untimed load of each kind
warms CUDA and the libraries; then ``--repeats`` rounds, alternating which side goes first, each
timer stopped after ``torch.cuda.synchronize``; between loads the result is freed and the CUDA
caching allocator emptied (outside the timer), so every load allocates afresh like a new process.
Medians are reported. Weights keep the checkpoint's dtype on both sides (no cast). With
``--device cpu`` both sides hand back tensors backed by the file's mmap without reading them, so the
CPU figures only show that the script runs; the comparison means something on a GPU.

    python bench/shard_load.py --model /tmp/rp-1b --json bench/shard_load.json
    python bench/shard_load.py --device cpu --size tiny --model /tmp/rp-tiny --tp 1 2   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import load_file

from rallypoint.worker.checkpoint import INDEX_FILE, SIZES, WEIGHTS_FILE, make_model
from rallypoint.worker.model_config import ModelConfig
from rallypoint.worker.shards import load_stage

GOAL = 0.10  # rallypoint TP=1 within 10 % of plain load_file


def weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / INDEX_FILE
    if index.exists():
        return sorted({ckpt / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [ckpt / WEIGHTS_FILE]


def warm_page_cache(files: list[Path]) -> tuple[int, float]:
    t0 = time.perf_counter()
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(64 << 20):
                total += len(chunk)
    return total, time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, int]:
    """Seconds of ``fn()`` up to a CUDA synchronize, and the bytes it put on ``device``."""
    release(device)
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    took = time.perf_counter() - t0
    if isinstance(out, torch.nn.Module):
        nbytes = sum(p.numel() * p.element_size() for p in out.parameters())
    else:
        nbytes = sum(t.numel() * t.element_size() for d in out for t in d.values())
    del out
    release(device)
    return took, nbytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "rallypoint-bench-1b")
    ap.add_argument("--size", default="1b", choices=sorted(SIZES), help="size to write when --model has none")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        t0 = time.perf_counter()
        make_model(args.model, args.size, seed=0)
        print(f"wrote a seeded random {args.size} model to {args.model} in {time.perf_counter() - t0:.1f} s", flush=True)
    config = ModelConfig.from_dir(args.model)
    files = weight_files(args.model)
    file_bytes, warm_s = warm_page_cache(files)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and gpus == 0:
        print("error: --device cuda but no GPU is visible (use --device cpu)", file=sys.stderr)
        return 2

    def dev(r: int) -> torch.device:
        return torch.device(f"cuda:{r}") if args.device == "cuda" else torch.device("cpu")

    def plain(d: torch.device) -> Callable[[], Any]:
        dstr = str(d)
        return lambda: [load_file(str(f), device=dstr) for f in files]

    def rallypoint(tp: int, r: int, d: torch.device) -> Callable[[], Any]:
        return lambda: load_stage(args.model, config, tp_rank=r, tp_size=tp, device=d)

    print(f"page cache warmed: {len(files)} file(s), {file_bytes / 1e9:.2f} GB read in {warm_s:.2f} s", flush=True)
    skipped: dict[int, str] = {}
    tps = []
    for tp in args.tp:
        try:
            config.check_parallel(tp, 1)
        except Exception as exc:
            skipped[tp] = str(exc)
            continue
        if args.device == "cuda" and tp > gpus:
            skipped[tp] = f"needs {tp} GPUs (rank r on cuda:r), {gpus} visible"
            continue
        tps.append(tp)
    # untimed warm-up of both paths on every device used
    for r in range(max(tps, default=1)):
        d = dev(r)
        if d.type == "cuda":
            torch.zeros(1, device=d)
        timed(plain(d), d)
        timed(rallypoint(max(tps, default=1), r, d), d)
        if d.type == "cpu":
            break

    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for tp in tps:
        for r in range(tp):
            d = dev(r)
            rp_s: list[float] = []
            plain_s: list[float] = []
            rp_bytes = plain_bytes = 0
            for k in range(args.repeats):
                order = ("rp", "plain") if k % 2 == 0 else ("plain", "rp")
                for side in order:
                    if side == "rp":
                        s, rp_bytes = timed(rallypoint(tp, r, d), d)
                        rp_s.append(s)
                    else:
                        s, plain_bytes = timed(plain(d), d)
                        plain_s.append(s)
            share = rp_bytes / plain_bytes
            rows.append({"tp": tp, "rank": r, "device": str(d), "rallypoint_s": statistics.median(rp_s),
                         "plain_s": statistics.median(plain_s), "plain_scaled_s": share * statistics.median(plain_s),
                         "rank_bytes": rp_bytes, "plain_bytes": plain_bytes, "share": share,
                         "rallypoint_all_s": rp_s, "plain_all_s": plain_s})
            print(f"TP={tp} rank {r}: done ({time.perf_counter() - t_all:.1f} s so far)", flush=True)

    head = (f"{'TP':>2} {'rank':>4} {'device':>7} | {'rank GB':>7} {'share':>6} | {'load_stage s':>12} {'GB/s':>6} | "
            f"{'plain s (all)':>13} {'plain x share s':>15} | {'vs plain':>8}")
    lines = [f"shard load: {args.model} ({config.num_params() / 1e6:.1f} M params, {config.torch_dtype}, "
             f"{len(files)} file(s), {file_bytes / 1e9:.2f} GB), page cache warm, median of {args.repeats}, "
             "ranks run one after another in one process",
             head, "-" * len(head)]
    for row in rows:
        rel = row["rallypoint_s"] / row["plain_scaled_s"] - 1
        lines.append(f"{row['tp']:>2} {row['rank']:>4} {row['device']:>7} | {row['rank_bytes'] / 1e9:7.3f} "
                     f"{row['share']:6.3f} | {row['rallypoint_s']:12.3f} "
                     f"{row['rank_bytes'] / 1e9 / row['rallypoint_s']:6.2f} | "
                     f"{row['plain_s']:13.3f} {row['plain_scaled_s']:15.3f} | {100 * rel:+7.1f}%")
    for tp, why in skipped.items():
        lines.append(f"TP={tp}: skipped: {why}")
    print("\n".join(lines))
    goal = None
    tp1 = next((row for row in rows if row["tp"] == 1), None)
    if tp1 is not None:
        rel = tp1["rallypoint_s"] / tp1["plain_s"] - 1
        goal = rel <= GOAL
        print(f"TP=1: load_stage {tp1['rallypoint_s']:.3f} s vs plain load_file {tp1['plain_s']:.3f} s: "
              f"{100 * rel:+.1f}% (goal: within {100 * GOAL:.0f}%): {'MET' if goal else 'NOT MET'}")
    import safetensors
    meta = {"torch": torch.__version__, "safetensors": safetensors.__version__,
            "device": torch.cuda.get_device_name(0) if gpus else "cpu", "model": str(args.model),
            "params": config.num_params(), "dtype": config.torch_dtype, "files": [f.name for f in files],
            "file_bytes": file_bytes, "repeats": args.repeats, "mode": "sequential, one process",
            "tp1_goal_met": goal, "skipped": skipped}
    print(json.dumps(meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
