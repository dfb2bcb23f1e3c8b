"""KV transfer for disaggregated prefill/decode: throughput, and the first token against colocated.

Two rank processes (two TP=1 replicas, gloo on CPU or NCCL with ``--device cuda`` on two GPUs),
linked by their DP group. For each prompt length the prefill side prefills one request, sends
its per-layer KV and first token (``worker.kv_transfer.send``: one ``Comm.send_dict`` per layer,
under the collectives' deadlines) and the decode side receives it into a ``KVBuffer``, places it
in a cache row and decodes. Printed per length: KV bytes, transfer seconds and MB/s (the prefill
side's sends, from the first to the last layer handed over), the prefill's time (a colocated replica's
first token) and prefill + transfer (the disaggregated first token, before the decode side's
first step), and whether the decode side's tokens equal the prefill side's own continuation.

    python bench/kv_transfer.py                       # CPU, the small model
    python bench/kv_transfer.py --lengths 128 512 1024 --runs 3 --json kv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from rallypoint.rendezvous.records import Plan, RankSlot  # noqa: E402
from rallypoint.testing.etcd_server import EtcdCluster  # noqa: E402
from rallypoint.testing.ranks import RankPool  # noqa: E402
from rallypoint.worker.checkpoint import make_model  # noqa: E402
from rallypoint.worker.model_config import ModelConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=("tiny", "small", "1b"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="tokens decoded after the transfer (checked)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rallypoint-kv-"))
    ckpt = make_model(work / "model", args.size, seed=0)
    config = ModelConfig.from_dir(ckpt)
    per_token = config.num_hidden_layers * 2 * config.kv_size * 4  # float32 K and V, every layer
    rows = []
    gens = itertools.count(1)
    with EtcdCluster(1) as etcd:
        pool = RankPool(etcd.endpoints, f"kvbench-{uuid.uuid4().hex[:6]}", work, deadline_floor=10.0,
                        module="rallypoint.testing.model_agent", device=args.device)
        try:
            procs = pool.take(2)
            gen = next(gens)
            d_seat = 0 if args.device == "cpu" else 1  # its own GPU
            plan = Plan(gen=gen, tp=1, pp=1, dp=2, ranks=(RankSlot(0, "p", 0), RankSlot(1, "d", d_seat)),
                        members=("d", "p"), reason="bench", leader="bench")
            ids = [p.send("configure", node=node, local_rank=lr, plan=json.loads(plan.to_json()))
                   for p, (node, lr) in zip(procs, [("p", 0), ("d", d_seat)])]  # both at once: they build together
            ids = [p.send("load", ckpt=str(ckpt)) for p, _ in zip(procs, [p.result(i, timeout=120) for p, i in
                                                                            zip(procs, ids)])]
            for p, i in zip(procs, ids):
                assert p.result(i, timeout=300)["ok"]
            for length in args.lengths:
                prompt = [(7 * i + 3) % 250 + 3 for i in range(length)]
                max_seq = length + args.steps + 1
                samples = []
                for run in range(args.runs + 1):  # the first is a warm-up
                    got = procs[1].send("kv_receive_decode", src=0, row=0, max_seq=max_seq, steps=args.steps)
                    sent = procs[0].send("kv_prefill_send", prompt=prompt, dst=1, rid=f"r{length}-{run}",
                                         max_seq=max_seq, steps=args.steps)
                    a, b = procs[0].result(sent, timeout=300), procs[1].result(got, timeout=300)
                    assert a["ok"] and b["ok"], (a, b)
                    if run:
                        samples.append((a["prefill_seconds"], a["send_seconds"], b["tokens"] == a["tokens"]))
                prefill = statistics.median(x[0] for x in samples)
                moved = statistics.median(x[1] for x in samples)
                nbytes = per_token * length
                rows.append({"length": length, "kv_bytes": nbytes, "transfer_s": moved, "mb_per_s": nbytes / moved / 1e6,
                             "prefill_s": prefill, "disaggregated_first_token_s": prefill + moved,
                             "identical": sum(x[2] for x in samples), "runs": len(samples)})
        finally:
            pool.close()
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    print(f"{args.size} model ({config.num_hidden_layers} layers, {config.kv_size} KV floats per layer and token), "
          f"{args.device}, median of {args.runs}")
    print(f"{'prompt':>7} {'KV MB':>8} {'transfer s':>11} {'MB/s':>8} {'colocated first token s':>24} "
          f"{'disaggregated s':>16} {'same tokens':>12}")
    for r in rows:
        print(f"{r['length']:>7} {r['kv_bytes'] / 1e6:>8.2f} {r['transfer_s']:>11.4f} {r['mb_per_s']:>8.1f} "
              f"{r['prefill_s']:>24.4f} {r['disaggregated_first_token_s']:>16.4f} {r['identical']:>6} of {r['runs']}")
    if args.json:
        args.json.write_text(json.dumps({"date": datetime.now(UTC).isoformat(), "device": dev, "torch": torch.__version__,
                                         "python": platform.python_version(), "size": args.size, "rows": rows}, indent=1))
    return 0 if all(r["identical"] == r["runs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
