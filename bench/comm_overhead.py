"""Collective latency through ``rallypoint.comm`` against raw ``torch.distributed``, side by side.

Each of N processes (one per GPU, or CPU ranks with ``--device cpu``) joins both a raw
``init_process_group`` world and a rallypoint generation (groups built directly over the etcd
store, watchdog and progress publishing running), then times, alternating rounds between the two:

* latency: ``synchronize; op; synchronize`` per call, median over ``--iters`` calls (x ``--rounds``);
* back-to-back: ``--iters`` calls then one synchronize, per-call average (CPU-side overhead shows
  here when the GPU is not the bottleneck).

Ops: all_reduce, all_gather and all_to_all (equal splits), fp32, at 4 KiB, 1 MiB and 64 MiB (``--sizes``). Rank 0 prints a
table and writes ``--json``. Needs an etcd binary on PATH (started here on free loopback ports).

    python bench/comm_overhead.py --gpus 2
    python bench/comm_overhead.py --device cpu --gpus 2 --sizes 4096 --iters 50   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rallypoint.rendezvous.etcd import EtcdSettings
from rallypoint.rendezvous.records import Plan, RankSlot
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.runtime import RankRuntime, RuntimeSettings


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, iters: int) -> tuple[list[float], float]:
    lat = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        lat.append(time.perf_counter() - t0)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return lat, (time.perf_counter() - t0) / iters


def worker(rank: int, world: int, port: int, endpoints: list[str], args: argparse.Namespace, out: str) -> None:
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **kw)
    rt = RankRuntime(RuntimeSettings(cluster="bench", device=args.device,
                                     etcd=EtcdSettings(endpoints=tuple(endpoints))))
    plan = Plan(gen=1, tp=world, pp=1, dp=1, ranks=tuple(RankSlot(i, "n", i) for i in range(world)),
                members=("n",), reason="bench", leader="bench")
    rt.configure(plan, "n", rank)
    comm = rt.comm
    assert comm is not None
    rows = []
    for nbytes in args.sizes:
        n = max(world, nbytes // 4)
        n -= n % world  # all_to_all sends equal blocks to every rank
        x = torch.ones(n, device=device)
        gathered = torch.empty(n * world, device=device)
        # default arguments bind this size's tensors into the lambdas
        a2a_out, splits = torch.empty(n, device=device), [n // world] * world
        ops = {
            "all_reduce": (lambda x=x: dist.all_reduce(x), lambda x=x: comm.all_reduce(x, "tp")),
            "all_gather": (lambda x=x, g=gathered: dist.all_gather_into_tensor(g, x),
                           lambda x=x, g=gathered: comm.all_gather(x, dim=0, group="tp", out=g)),
            # the MoE dispatch/combine primitive (rallypoint allocates its output per call, as the
            # expert-parallel layer uses it)
            "all_to_all": (lambda x=x, o=a2a_out, s=splits: dist.all_to_all_single(o, x, s, s),
                           lambda x=x, s=splits: comm.all_to_all(x, s, s, group="tp")),
        }
        for op, (raw, ours) in ops.items():
            for fn in (raw, ours):  # warm up both paths
                time_calls(fn, device, 20)
            lat = {"raw": [], "rallypoint": []}
            b2b = {"raw": [], "rallypoint": []}
            for _ in range(args.rounds):
                for name, fn in (("raw", raw), ("rallypoint", ours)):
                    one, b = time_calls(fn, device, args.iters)
                    lat[name].extend(one)
                    b2b[name].append(b)
            rows.append({"op": op, "bytes": nbytes,
                         **{f"{k}_median_us": statistics.median(v) * 1e6 for k, v in lat.items()},
                         **{f"{k}_b2b_us": statistics.median(v) * 1e6 for k, v in b2b.items()},
                         "samples": len(lat["raw"])})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    rt.close()
    dist.destroy_process_group()


def fmt(nbytes: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes // size} {unit}"
    return f"{nbytes} B"


def table(rows: list[dict], world: int, device: str) -> str:
    head = (f"{'op':<11} {'size':>7} | {'raw us':>9} {'rallypoint us':>13} {'overhead':>17} | "
            f"{'raw b2b us':>10} {'rp b2b us':>10} {'b2b overhead':>13}")
    lines = [f"{world} ranks on {device}; latency = median of sync;op;sync, "
             "b2b = back-to-back mean per call",
             head, "-" * len(head)]
    for r in rows:
        d = r["rallypoint_median_us"] - r["raw_median_us"]
        b = r["rallypoint_b2b_us"] - r["raw_b2b_us"]
        lines.append(f"{r['op']:<11} {fmt(r['bytes']):>7} | {r['raw_median_us']:9.1f} "
                     f"{r['rallypoint_median_us']:13.1f} {d:+8.1f} us {100 * d / r['raw_median_us']:+5.1f}% | "
                     f"{r['raw_b2b_us']:10.1f} "
                     f"{r['rallypoint_b2b_us']:10.1f} {b:+7.1f} us")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2, help="ranks (one per GPU)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 1 << 20, 64 << 20])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/rallypoint-comm-overhead-{os.getpid()}.json"
    with EtcdCluster(1) as etcd:
        mp.spawn(worker, args=(args.gpus, port, list(etcd.endpoints), args, out), nprocs=args.gpus, join=True)
    rows = json.loads(Path(out).read_text())
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None
    meta = {"torch": torch.__version__, "nccl": nccl,
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "ranks": args.gpus,
            "iters": args.iters, "rounds": args.rounds}
    print(table(rows, args.gpus, meta["device"]))
    print(json.dumps(meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
