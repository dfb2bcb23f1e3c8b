"""Recovery breakdown: SIGKILL a rank under a request stream, with a warm spare, a cold restart in
the standby interpreter and a cold restart from scratch, side by side in one run.

One rallyd serves TP=2 (``--gpus 2``), or TP=2 x DP=2 (``--gpus 4``), or two CPU ranks
(``--gpus 0``). A client streams a long greedy completion from replica 0; the bench SIGKILLs the
worker of rank 1 mid-stream and reads the recovery off the cluster's events in etcd (wall clock,
one host) and the survivor's log. With ``--tp 1`` the replica is one rank (``--gpus 1``, or one
CPU rank): the bench kills rank 0, the driver itself, and the client streams through rallyd's
gateway, which resumes the request on the replacement (a warm spare has the model loaded and
its CUDA graphs captured while it waits):

    kill -> detected (rallyd reaped the exit) -> abort ordered -> survivor's TP group aborted
         -> replacement (spare adopted / process started) -> worker up (a restarted process said
         hello to rallyd: interpreter up, imports done) -> plan N+1 written -> released
         -> groups built (last rank) -> shard loaded (last rank) -> first token at the client

and checks the stream's tokens against a failure-free run. ``--modes cold,standby,spare`` runs
the three, each on a fresh daemon, ``--runs`` kills each: ``cold`` restarts the seat in a new
interpreter (``[worker] standby`` off), ``standby`` in the standby interpreter rallyd keeps
(torch imported; the bench waits for it to be ready before each kill), ``spare`` hands the seat
to a warm spare.

    python bench/recovery.py --gpus 2 --model /tmp/rp-1b         # GPU machine
    python bench/recovery.py --gpus 0 --size tiny --runs 2        # CPU smoke run
    python bench/recovery.py --gpus 0 --size tiny --modes cold,standby --runs 3
    python bench/recovery.py --gpus 0 --size tiny --arch moe --runs 3  # an expert-parallel rank killed
    python bench/recovery.py --tp 1 --gpus 1 --runs 10 --model /tmp/rp-1b --dtype float32
    python bench/recovery.py --gpus 0 --size tiny --arch moe --ep dp --modes cold,spare,shrink --runs 5

``--ep dp`` (a ``moe``): two one-rank replicas share the experts (``[layout] ep = "dp"``, each
expert on ``--copies`` ranks); the client streams through the gateway and rank 1 is killed: its
replacement reads only its own experts, or with ``shrink`` (no restart allowed; a fresh daemon per
run) replica 0 serves on alone from the copies, reading nothing.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from rallypoint.protocol.keys import ClusterKeys
from rallypoint.recovery.events import read_events
from rallypoint.recovery.machine import breakdown
from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings
from rallypoint.testing.daemons import DaemonProcess, daemon_args
from rallypoint.testing.etcd_server import EtcdCluster

COLUMNS = ("detected", "abort_ordered", "aborted", "replacement", "worker_up", "planned", "released",
           "groups_built", "shard_loaded", "first_token", "client_token")


def ts(line: dict) -> float:
    return datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


def log_lines(path: Path) -> list[dict]:
    out = []
    for raw in path.read_text(errors="replace").splitlines() if path.exists() else []:
        if raw.startswith("{"):
            try:
                out.append(json.loads(raw))
            except ValueError:
                pass
    return out


def stream(url: str, body: dict, stamps: list[tuple[float, list[int]]]) -> None:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        for line in resp:
            if line.startswith(b"data: {"):
                ids = json.loads(line[6:])["choices"][0]["token_ids"]
                if ids:
                    stamps.append((time.time(), ids))


def seat_pid(daemon: DaemonProcess, local_rank: int) -> int:
    """The process now on ``local_rank``: the last one rallyd started there or handed it to."""
    pid = None
    for e in log_lines(daemon.log_path):
        if e.get("event") in ("supervisor.started", "supervisor.spare_adopted") and e.get("local_rank") == local_rank:
            pid = e["pid"]
    assert pid is not None and psutil.pid_exists(pid), f"no live worker on seat {local_rank}"
    return pid


def wait_spare(daemon: DaemonProcess, after: float, timeout: float = 120) -> None:
    """Block until a spare said hello after ``after`` and waits for a seat (it is warm, and has
    preloaded the model where it does)."""
    from rallypoint.worker.title import describe

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hello = any(e.get("event") == "rallyd.worker_connected" and e.get("role") == "spare" and ts(e) > after
                    for e in log_lines(daemon.log_path))
        waiting = any((i := describe(p.cmdline())) is not None and i.kind == "spare"
                      and "waiting for a seat" in " ".join(p.cmdline())
                      for p in psutil.Process(daemon.pid).children())
        if hello and waiting:
            return
        time.sleep(0.1)
    raise SystemExit("no warm spare came up")


def wait_standby(daemon: DaemonProcess, timeout: float = 120) -> None:
    """Block until rallyd's standby interpreter has its imports done (its title says ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(" ".join(p.cmdline()).startswith("rallypoint standby (") and "ready" in " ".join(p.cmdline())
               for p in psutil.Process(daemon.pid).children()):
            return
        time.sleep(0.1)
    raise SystemExit("no standby interpreter came up")


def worker_up(daemon: DaemonProcess, seat: int, t_kill: float) -> float | None:
    """Seconds from the kill to the hello on rallyd's channel of the process restarted on ``seat``
    (its interpreter up, or the standby handed the argv; imports done, its Worker built); None
    when no process was started there (a spare took the seat)."""
    lines = [e for e in log_lines(daemon.log_path) if ts(e) >= t_kill]
    pid = next((e["pid"] for e in lines if e.get("event") == "supervisor.started" and e.get("local_rank") == seat), None)
    hello = next((ts(e) for e in lines if e.get("event") == "rallyd.worker_connected" and e.get("pid") == pid), None)
    return hello - t_kill if pid is not None and hello is not None else None


def one_run(url: str, body: dict, reference: list[int], daemon: DaemonProcess, client: EtcdClient,
            keys: ClusterKeys, gen: int, state: Path, victim_seat: int = 1) -> dict:
    stamps: list[tuple[float, list[int]]] = []
    t = threading.Thread(target=stream, args=(url, body, stamps))
    t.start()
    while len(stamps) < 8:
        time.sleep(0.005)
    victim = seat_pid(daemon, victim_seat)
    t_kill = time.time()
    psutil.Process(victim).send_signal(signal.SIGKILL)
    t.join(timeout=300)
    time.sleep(0.5)  # the last events are written in the background
    tokens = [i for _, ids in stamps for i in ids]
    phases = breakdown(read_events(client, keys), gen, t0=t_kill)
    # The survivor's own log says when its TP group was aborted.
    aborted = [ts(e) for e in log_lines(state / "logs" / "worker-0.log")  # seat 0 is never the victim
               if e.get("event") == "groups.aborted" and ts(e) >= t_kill]
    phases["aborted"] = min(aborted) - t_kill if aborted else None
    phases["worker_up"] = worker_up(daemon, victim_seat, t_kill)
    # The first token the client saw from the new generation (tokens committed before the kill may
    # still be on their way just after it).
    built = phases.get("groups_built")
    after = t_kill + built if built is not None else t_kill
    first = next((w for w, _ in stamps if w > after), None)
    phases["client_token"] = first - t_kill if first else None
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    events = read_events(client, keys, gen)
    strategy = next((e.detail.get("strategy") for e in events if e.kind == "replacement"), None)
    return {"phases": phases, "strategy": strategy, "identical": tokens == reference, "tokens": len(tokens),
            "first_difference": same}


def run_mode(mode: str, args: argparse.Namespace, model: Path, work: Path, etcd: EtcdCluster) -> list[dict]:
    if mode == "shrink":  # one kill per daemon: afterwards there is nothing left to shrink
        return [r for run in range(args.runs)
                for r in run_daemon(mode, argparse.Namespace(**{**vars(args), "runs": 1}), model, work, etcd,
                                    f"recovery-shrink-{run}")]
    return run_daemon(mode, args, model, work, etcd, f"recovery-{mode}")


def run_daemon(mode: str, args: argparse.Namespace, model: Path, work: Path, etcd: EtcdCluster,
               cluster: str) -> list[dict]:
    keys = ClusterKeys(cluster)
    client = EtcdClient(EtcdSettings(endpoints=etcd.endpoints))
    state = work / cluster
    shared = args.ep == "dp"  # two one-rank replicas sharing the experts
    node_args = ["--tp", str(args.tp), "--state-dir", str(state), "--worker-model", str(model),
                 "--worker-max-seq", "512", "--worker-dtype", args.dtype,
                 *(("--worker-restart-budget", "0", "--worker-restart-window", "600") if mode == "shrink"
                   else ("--worker-restart-budget", "100")),
                 *(("--dp", "2", "--ep", "dp", "--expert-copies", str(args.copies)) if shared else ()),
                 "--spares", "1" if mode == "spare" else "0",
                 "--no-worker-standby" if mode == "cold" else "--worker-standby",
                 "--worker-compile" if args.compile == "on" else "--no-worker-compile",
                 "--worker-overlap" if args.overlap == "on" else "--no-worker-overlap"]
    node_args += ["--gpus", str(args.gpus)] if args.gpus else ["--cpu-ranks", str(2 if shared else args.tp)]
    daemon = DaemonProcess("n0", daemon_args(etcd.endpoints, cluster) + node_args, work / f"rallyd-{cluster}.log").start()
    body = {"prompt": "recovery under fire: " * 2, "max_tokens": args.tokens, "temperature": 0}
    results = []
    try:
        url_file = state / "api-0.url"
        deadline = time.monotonic() + 180
        while not (url_file.exists() and url_file.read_text()):
            if time.monotonic() > deadline or daemon.proc.poll() is not None:
                raise SystemExit(f"no API; see {work}")
            time.sleep(0.1)
        url = url_file.read_text()
        if args.tp == 1:  # the driver may be the victim: the client goes through the gateway, which resumes
            if shared:
                while not (state / "api-1.url").exists():
                    time.sleep(0.1)
            url = (state / "gateway.url").read_text().strip()
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        reference = json.loads(urllib.request.urlopen(req, timeout=300).read())["choices"][0]["token_ids"]
        for run in range(args.runs):
            if mode == "spare":
                wait_spare(daemon, after=0 if run == 0 else results[-1]["killed_at"])
            if mode == "standby":
                wait_standby(daemon)
            t_before = time.time()
            r = one_run(url, body, reference, daemon, client, keys, gen=run + 1, state=state,
                        victim_seat=0 if args.tp == 1 and not shared else 1)
            r["killed_at"] = t_before
            results.append(r)
            if shared:
                r["experts_read"] = {e.detail.get("rank"): e.detail.get("experts_read")
                                     for e in read_events(client, keys, run + 2)
                                     if e.kind == "shard_loaded" and "rank" in e.detail}
            print(f"{mode} run {run + 1} ({r['strategy']}; experts read {r.get('experts_read')}): "
                  + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in r["phases"].items())
                  + f"; identical tokens: {r['identical']} (first difference at token {r['first_difference']})",
                  flush=True)
            time.sleep(1.0)
    finally:
        daemon.stop()
        client.close()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2, help="2: TP=2; 4: TP=2 x DP=2; 0: CPU ranks")
    ap.add_argument("--tp", type=int, default=2, choices=(1, 2), help="1: a one-rank replica, its driver killed")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--size", default="1b")
    ap.add_argument("--arch", default=None, choices=("llama", "moe"),
                    help="the written model's layout (moe: Mixtral's; with TP=2 the victim is an EP rank)")
    ap.add_argument("--ep", default="tp", choices=("tp", "dp"),
                    help="dp (with --arch moe): two one-rank replicas share the experts; rank 1 is killed")
    ap.add_argument("--copies", type=int, default=2, help="--ep dp: [layout] expert_copies")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--modes", default="cold,standby,spare",
                    help="cold: a new interpreter; standby: the standby interpreter; spare: a warm spare; "
                         "shrink (--ep dp): no restart, the survivor serves on from the copies")
    ap.add_argument("--dtype", default="auto", help="the workers' dtype (auto: bf16 on GPU)")
    ap.add_argument("--compile", default="on", choices=("on", "off"), help="[worker] compile (GPU decode layers)")
    ap.add_argument("--overlap", default="on", choices=("on", "off"), help="[worker] overlap (TP=1 decode)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.ep == "dp":
        args.tp = 1
    work = Path(tempfile.mkdtemp(prefix="rallypoint-recovery-"))
    model = args.model or work / "model"
    if not (model / "config.json").exists():
        from rallypoint.worker.checkpoint import make_model
        make_model(model, args.size, seed=0, arch=args.arch)
    results: dict[str, list[dict]] = {}
    with EtcdCluster(1) as etcd:
        for mode in args.modes.split(","):
            results[mode] = run_mode(mode, args, model, work, etcd)
    layout = {2: "TP=2 on 2 GPUs", 4: "TP=2 x DP=2 on 4 GPUs", 0: "TP=2 on 2 CPU ranks"}.get(args.gpus, f"{args.gpus} GPUs")
    if args.tp == 1:
        layout = "TP=1 on 1 GPU" if args.gpus else "TP=1 on 1 CPU rank"
    if args.ep == "dp":
        layout = (f"TP=1 x DP=2 sharing the experts (ep = dp, {args.copies} copies) on "
                  + (f"{args.gpus} GPUs" if args.gpus else "2 CPU ranks"))
        args.tp = 1
    victim = 0 if args.tp == 1 and args.ep != "dp" else 1
    print(f"\n{layout}, SIGKILL rank {victim} under a {args.tokens}-token greedy stream; seconds after the kill, "
          f"median [max] of {args.runs} runs")
    print(f"{'milestone':<14}" + "".join(f"{m:>18}" for m in results))
    for c in COLUMNS:
        row = f"{c:<14}"
        for rs in results.values():
            vals = [r["phases"].get(c) for r in rs if r["phases"].get(c) is not None]
            row += f"{statistics.median(vals):>9.3f} [{max(vals):6.3f}]" if vals else f"{'-':>18}"
        print(row)
    print(f"{'identical':<14}" + "".join(f"{sum(r['identical'] for r in rs):>13d} of {len(rs)}"
                                        for rs in results.values()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
