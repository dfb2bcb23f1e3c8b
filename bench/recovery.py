"""Recovery breakdown: SIGKILL a rank under a request stream and time every phase, from the logs.

One rallyd serves a TP=2 replica on two ranks (two GPUs, or two CPU ranks with ``--gpus 0``). A
client streams a long greedy completion; the bench SIGKILLs the worker of rank 1 mid-stream and
reads the phases off the processes' JSON logs (wall clock, one host):

    kill -> detected (rallyd saw the exit) -> abort ordered -> survivor aborted its group
         -> plan N+1 written -> groups rebuilt (survivor) -> shard loaded (replacement)
         -> first token delivered to the client after the kill

and checks that the stream's tokens equal a failure-free run. Repeats ``--runs`` times (cold
restart: the replacement process imports torch and loads its shard).

    python bench/recovery.py --gpus 2 --model /tmp/rp-1b       # GPU machine
    python bench/recovery.py --gpus 0 --size tiny               # CPU smoke run
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

import psutil  # noqa: E402

from rallypoint.testing.daemons import DaemonProcess, daemon_args  # noqa: E402
from rallypoint.testing.etcd_server import EtcdCluster  # noqa: E402


def ts(line: dict) -> float:
    return datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


def events(path: Path) -> list[dict]:
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


def one_run(url: str, state: Path, body: dict, reference: list[int], daemon: DaemonProcess, gen: int) -> dict:
    stamps: list[tuple[float, list[int]]] = []
    t = threading.Thread(target=stream, args=(url, body, stamps))
    t.start()
    while len(stamps) < 8:
        time.sleep(0.005)
    victim = next(p for p in psutil.Process(daemon.pid).children()
                  if "rallypoint.worker" in " ".join(p.cmdline()) and "--local-rank 1" in " ".join(p.cmdline()))
    t_kill = time.time()
    victim.send_signal(signal.SIGKILL)
    t.join(timeout=300)
    tokens = [i for _, ids in stamps for i in ids]
    logs = {p.name: events(p) for p in [daemon.log_path, *sorted((state / "logs").glob("worker-*.log"))]}

    def first(name: str, event: str, after: float, **match: object) -> float | None:
        for e in logs.get(name, []):
            if e.get("event") == event and ts(e) >= after and all(e.get(k) == v for k, v in match.items()):
                return ts(e)
        return None

    said = [e for e in logs[daemon.log_path.name] if e.get("event") == "rallyd.cycle" and ts(e) >= t_kill]
    planned = next((ts(e) for e in said if f"wrote plan gen {gen + 1}" in e.get("said", "")), None)
    phases = {
        "detected": first(daemon.log_path.name, "supervisor.worker_exited", t_kill)
        or first("worker-0.log", "comm.collective_tripped", t_kill),
        "aborted": first("worker-0.log", "groups.aborted", t_kill),
        "planned": planned,
        "rebuilt": first("worker-0.log", "groups.built", t_kill, gen=gen + 1),
        "loaded": first("worker-1.log", "worker.shard_loaded", t_kill),
    }
    # The first token the new generation produced (tokens committed before the kill may still be
    # in flight to the client just after it).
    rebuilt = phases["rebuilt"] or t_kill
    phases["first_token"] = next((w for w, _ in stamps if w > rebuilt), None)
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    before = sum(len(ids) for w, ids in stamps if w <= t_kill)
    return {"phases": {k: (v - t_kill if v else None) for k, v in phases.items()},
            "identical": tokens == reference, "tokens": len(tokens), "first_difference": same,
            "delivered_before_kill": before}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2, help="0: two CPU ranks")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--size", default="1b")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--dtype", default="auto", help="the workers' dtype (auto: bf16 on GPU)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rallypoint-recovery-"))
    model = args.model or work / "model"
    if not (model / "config.json").exists():
        from rallypoint.worker.checkpoint import make_model
        make_model(model, args.size, seed=0)
    body = {"prompt": "recovery under fire: " * 2, "max_tokens": args.tokens}
    results = []
    with EtcdCluster(1) as etcd:
        node_args = ["--tp", "2", "--state-dir", str(work / "n0"), "--worker-model", str(model),
                     "--worker-max-seq", "512", "--worker-restart-budget", "100", "--worker-dtype", args.dtype]
        # daemon_args says --gpus 0; a later --gpus wins.
        node_args += ["--gpus", str(args.gpus)] if args.gpus else ["--cpu-ranks", "2"]
        daemon = DaemonProcess("n0", daemon_args(etcd.endpoints, "recovery") + node_args, work / "rallyd.log").start()
        try:
            url_file = work / "n0" / "api-0.url"
            deadline = time.monotonic() + 180
            while not (url_file.exists() and url_file.read_text()):
                if time.monotonic() > deadline or daemon.proc.poll() is not None:
                    raise SystemExit(f"no API; see {work}")
                time.sleep(0.1)
            url = url_file.read_text()
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            reference = json.loads(urllib.request.urlopen(req, timeout=300).read())["choices"][0]["token_ids"]
            for run in range(args.runs):
                r = one_run(url, work / "n0", body, reference, daemon, gen=run + 1)
                results.append(r)
                print(f"run {run + 1}: " + ", ".join(f"{k} {v:.3f}s" if v is not None else f"{k} -"
                                                     for k, v in r["phases"].items())
                      + f"; identical tokens: {r['identical']} (first difference at token "
                      f"{r['first_difference']}, {r['delivered_before_kill']} delivered before the kill)", flush=True)
                time.sleep(1.0)
        finally:
            for p in psutil.Process(daemon.pid).children(recursive=True) if daemon.proc.poll() is None else []:
                p.kill()
            daemon.stop()
    names = list(results[0]["phases"]) if results else []
    print(f"\nTP=2 on {'%d GPUs' % args.gpus if args.gpus else 'CPU'}, cold restart in place, {args.runs} runs "
          f"(seconds after the SIGKILL; median [max])")
    for n in names:
        vals = [r["phases"][n] for r in results if r["phases"][n] is not None]
        print(f"  {n:<12} " + (f"{statistics.median(vals):6.3f} [{max(vals):6.3f}]" if vals else "     -"))
    print(f"  identical tokens in every run: {all(r['identical'] for r in results)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"logs in {work}")
    return 0 if results and all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
