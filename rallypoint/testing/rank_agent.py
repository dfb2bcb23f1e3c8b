"""A rank process driven by JSON lines on stdin, for tests and benchmarks of groups and collectives.

One process per rank, started once and reused across tests (importing torch costs seconds). Each
stdin line is a command; each reply is one JSON line on stdout. ``abort`` is served at once by the
reader thread, even while the main thread is inside a collective loop, like the daemon's order;
so is ``progress`` (which ``loop`` command runs, and how many iterations it has completed), for
a test to wait on instead of sleeping.

Commands: configure, primitives, loop, progress, abort, stats, exit.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
import traceback
from typing import Any

import psutil
import torch

from rallypoint.errors import GenerationAborted, RallypointError
from rallypoint.log import configure_logging
from rallypoint.rendezvous.etcd import EtcdSettings, endpoints_from
from rallypoint.rendezvous.records import Plan
from rallypoint.worker.runtime import RankRuntime, RuntimeSettings

_out_lock = threading.Lock()


def reply(obj: dict[str, Any]) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


class Agent:
    def __init__(self, rt: RankRuntime) -> None:
        self.rt = rt
        # (id of the current or last ``loop`` command, iterations it completed): read by ``progress``
        self.loop_progress: tuple[int | None, int] = (None, 0)

    def configure(self, cmd: dict[str, Any]) -> dict[str, Any]:
        plan = Plan.from_json("command", json.dumps(cmd["plan"]))
        t0 = time.monotonic()
        gs = self.rt.configure(plan, cmd["node"], cmd["local_rank"])
        return {"rank": gs.rank, "gen": gs.gen, "carried": list(gs.carried),
                "seconds": time.monotonic() - t0,
                "groups": {n: list(g.ranks) for n, g in gs.groups.items()}}

    def primitives(self, cmd: dict[str, Any]) -> dict[str, Any]:
        comm, gs = self.rt.comm, self.rt.groups
        assert comm is not None and gs is not None
        dev = self.rt.device
        r = gs.rank
        out: dict[str, Any] = {}
        g = cmd.get("group", "tp")
        n = gs.group(g).world_size
        me = gs.group(g).rank_in_group
        out["all_reduce"] = comm.all_reduce(torch.full((3,), float(r + 1), device=dev), g).tolist()
        x = torch.arange(4, dtype=torch.float32, device=dev).reshape(2, 2) + 10 * me
        out["all_gather_0"] = comm.all_gather(x, dim=0, group=g).tolist()
        out["all_gather_1"] = comm.all_gather(x, dim=1, group=g).tolist()
        y = torch.arange(2 * n, dtype=torch.float32, device=dev).reshape(n, 2) * (me + 1)
        out["reduce_scatter_0"] = comm.reduce_scatter(y, dim=0, group=g).tolist()
        out["reduce_scatter_1"] = comm.reduce_scatter(y.t().contiguous(), dim=1, group=g).tolist()
        b = torch.full((2,), float(me), device=dev)
        out["broadcast"] = comm.broadcast(b, src=n - 1, group=g).tolist()
        # all-to-all with uneven splits: member i sends i+j+1 rows to member j, each row = 100*i + j.
        in_splits = [me + j + 1 for j in range(n)]
        out_splits = [i + me + 1 for i in range(n)]
        rows = torch.cat([torch.full((s, 2), float(100 * me + j), device=dev) for j, s in enumerate(in_splits)])
        out["all_to_all"] = comm.all_to_all(rows, in_splits, out_splits, group=g)[:, 0].tolist()
        if cmd.get("pp") and gs.pp_size > 1:
            if gs.is_first_stage:
                assert gs.pp_next is not None
                comm.send_dict({"h": torch.full((2, 3), 7.0, device=dev),
                                "pos": torch.arange(5, device=dev)}, dst=gs.pp_next, group="pp")
            else:
                assert gs.pp_prev is not None
                got = comm.recv_dict(src=gs.pp_prev, group="pp")
                out["recv_dict"] = {k: [list(v.shape), str(v.dtype), v.flatten().tolist()] for k, v in got.items()}
        return out

    def loop(self, cmd: dict[str, Any]) -> dict[str, Any]:
        comm = self.rt.comm
        assert comm is not None
        t = torch.ones(cmd.get("numel", 1024), device=self.rt.device)
        group, iters = cmd.get("group", "tp"), cmd.get("iters", 100)
        size = self.rt.groups.group(group).world_size if self.rt.groups else 1
        stamps: list[float] = []
        wrong: list[list[float]] = []  # [when, value] of results that were not the group size
        seen = len(comm.diagnoses)
        self.loop_progress = (cmd.get("id"), 0)
        try:
            for _ in range(iters):
                comm.all_reduce(t, group)
                comm.synchronize()
                if (got := float(t[0])) != size:
                    wrong.append([time.time(), got])
                t.fill_(1.0)
                stamps.append(time.time())
                self.loop_progress = (cmd.get("id"), len(stamps))
        except GenerationAborted as exc:
            return {"iters": len(stamps), "stamps": stamps, "raised": str(exc), "raised_at": time.time(),
                    "diagnoses": [d.to_event() for d in comm.diagnoses[seen:]], "wrong": wrong}
        return {"iters": len(stamps), "stamps": stamps, "raised": None, "wrong": wrong}

    def stats(self, cmd: dict[str, Any]) -> dict[str, Any]:
        p = psutil.Process()
        gs = self.rt.groups
        aborts = [g.abort_seconds for g in gs.groups.values() if g.aborted] if gs else []
        return {"fds": p.num_fds(), "threads": threading.active_count(), "os_threads": p.num_threads(),
                "pid": p.pid, "abort_seconds": aborts}

    def call_bad(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Provoke a bad-input error on purpose; reply with its type and message."""
        comm = self.rt.comm
        assert comm is not None
        try:
            if cmd["what"] == "dtype":
                comm.all_reduce(torch.zeros(2, dtype=torch.bool, device=self.rt.device))
            elif cmd["what"] == "device":
                comm.all_reduce(torch.zeros(2, device="meta"))
            elif cmd["what"] == "splits":
                comm.all_to_all(torch.zeros(3, device=self.rt.device), [1], [1], group="tp")
        except RallypointError as exc:
            return {"error": type(exc).__name__, "message": str(exc)}
        return {"error": None}


def main() -> int:
    return serve(Agent)


def serve(agent_cls: type, default_floor: float = 1.0) -> int:
    """Run an agent of ``agent_cls`` (``Agent`` or a subclass) over stdin/stdout until ``exit``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--deadline-floor", type=float, default=default_floor)
    ap.add_argument("--groups", default="tp,pp,dp", help="the groups each plan builds, comma-separated")
    args = ap.parse_args()
    configure_logging("info", json=True)
    rt = RankRuntime(RuntimeSettings(
        cluster=args.cluster, device=args.device, deadline_floor=args.deadline_floor,
        etcd=EtcdSettings(endpoints=endpoints_from(args.endpoints), request_timeout=1.0, retry_deadline=5.0),
        group_names=tuple(args.groups.split(","))))
    agent = agent_cls(rt)
    work: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def reader() -> None:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "abort":
                t0 = time.monotonic()
                labels = rt.abort_generation(cmd["gen"], cmd.get("reason", "abort order"), tuple(cmd.get("ranks", ())))
                reply({"id": cmd.get("id"), "ok": True, "aborted": labels, "seconds": time.monotonic() - t0})
            elif cmd["cmd"] == "progress":
                loop, iters = getattr(agent, "loop_progress", (None, 0))
                reply({"id": cmd.get("id"), "ok": True, "loop": loop, "iters": iters})
            else:
                work.put(cmd)
        work.put(None)

    threading.Thread(target=reader, daemon=True).start()
    reply({"ready": True, "pid": psutil.Process().pid})
    while (cmd := work.get()) is not None:
        if cmd["cmd"] == "exit":
            break
        try:
            result = getattr(agent, cmd["cmd"])(cmd)
            reply({"id": cmd.get("id"), "ok": True, **result})
        except Exception as exc:
            reply({"id": cmd.get("id"), "ok": False, "error": type(exc).__name__, "message": str(exc),
                   "trace": traceback.format_exc()[-2000:]})
    rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
