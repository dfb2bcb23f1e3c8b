"""The quick-start demo: a local etcd and two rallyd daemons serving a tiny model on CPU.

Run it with ``scripts/demo.sh`` (or ``python -m rallypoint.demo`` once installed). The two daemons
rendezvous on one plan (one TP=2 replica spanning both nodes), start a worker each, and serve a
random tiny Llama. The demo prints the plan and a completion, then SIGKILLs the worker of node-b
while a second completion streams: node-b's daemon sees the exit, orders the abort, restarts the
worker in place, the leader writes generation 2, and the completion finishes with the same tokens
as a failure-free run. Then it stops everything.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from rallypoint.cli.cluster import cluster_view, latest_plan
from rallypoint.cli.main import main as rallyctl
from rallypoint.cli.views import format_plan
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings
from rallypoint.testing.daemons import DaemonProcess, daemon_args, wait_file
from rallypoint.testing.etcd_server import INSTALL_HINT, EtcdCluster, etcd_binary
from rallypoint.worker.title import describe


def complete(url: str, prompt: str, max_tokens: int, stream: bool = False) -> tuple[str, list[int]]:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        if not stream:
            choice = json.loads(resp.read())["choices"][0]
            return choice["text"], choice["token_ids"]
        text = ""
        ids: list[int] = []
        for line in resp:
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text, ids = text + choice["text"], ids + choice["token_ids"]
        return text, ids


def show_plan(client: EtcdClient, keys: ClusterKeys) -> str:
    plan = latest_plan(client, keys)
    return format_plan(plan) if plan is not None else "(no plan in etcd)"


def worker_of(daemon: DaemonProcess) -> psutil.Process:
    return next(p for p in psutil.Process(daemon.pid).children() if describe(p.cmdline()) is not None)


def show_rallyctl(client: EtcdClient, keys: ClusterKeys, endpoints: tuple[str, ...]) -> None:
    """Print what an operator would see: ``rallyctl status`` and ``rallyctl events``."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # until every rank reports serving in the new generation
        d = cluster_view(client, keys, "demo")
        if d["state"] == "serving" and d["ranks"] and all(r["state"] == "serving" for r in d["ranks"]):
            break
        time.sleep(0.3)
    ep = ",".join(endpoints)
    for cmd in ("status", "events"):
        print(f"$ rallyctl --cluster demo {cmd}")
        sys.stdout.flush()
        rallyctl(["--endpoints", ep, "--cluster", "demo", cmd])
        print()


def show_metrics(state_dir: Path) -> None:
    """Print a few of one rallyd's Prometheus series, the way an operator would curl them."""
    import urllib.request

    url = (state_dir / "metrics.url").read_text().strip()
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    wanted = ("rallypoint_generation", "rallypoint_cluster_state", "rallypoint_recoveries_total",
              "rallypoint_recovery_seconds_sum", "rallypoint_recovery_seconds_count",
              "rallypoint_worker_replacements_total", "rallypoint_ranks")
    print(f"$ curl -s {url} | grep ...")
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in wanted and not line.endswith(" 0.0"):
            print(line)
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rallypoint-demo", description=__doc__)
    ap.add_argument("--tokens", type=int, default=48, help="tokens per completion")
    args = ap.parse_args(argv)
    if etcd_binary() is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    from rallypoint.worker.checkpoint import make_model

    work = Path(tempfile.mkdtemp(prefix="rallypoint-demo-"))
    model = make_model(work / "model", "tiny", seed=0)
    print(f"wrote a random tiny Llama to {model}")
    with EtcdCluster(1, root=work / "etcd") as etcd:
        print(f"etcd up at {etcd.endpoints[0]}")
        daemons = [DaemonProcess(n, daemon_args(etcd.endpoints, "demo", "--tp", "2", "--cpu-ranks", "1",
                                                "--state-dir", str(work / n), "--worker-model", str(model)),
                                 work / f"{n}.log") for n in ("node-a", "node-b")]
        client = EtcdClient(EtcdSettings(endpoints=etcd.endpoints))
        keys = ClusterKeys("demo")
        try:
            for d in daemons:
                d.start()
            url = wait_file(work / "node-a" / "api-0.url")
            print(f"\nthe daemons agreed on:\n{show_plan(client, keys)}\n")
            print(f"the replica's API is at {url}")
            prompt = "rallypoint keeps serving when"
            text, ids = complete(url, prompt, args.tokens)
            print(f"completion of {prompt!r} ({len(ids)} tokens): {text!r}\n")
            result: dict[str, tuple[str, list[int]]] = {}
            client_thread = threading.Thread(target=lambda: result.setdefault("r", complete(
                url, prompt, args.tokens, stream=True)))
            client_thread.start()
            time.sleep(0.2)
            victim = worker_of(daemons[1])
            t0 = time.monotonic()
            victim.send_signal(signal.SIGKILL)
            print(f"SIGKILLed node-b's worker (pid {victim.pid}) while the same request streamed again")
            client_thread.join(timeout=120)
            took = time.monotonic() - t0
            _text2, ids2 = result["r"]
            print(f"the stream finished {took:.2f} s after the kill: "
                  f"{'identical tokens' if ids2 == ids else 'DIFFERENT tokens'} ({len(ids2)} tokens)")
            print(f"\n{show_plan(client, keys)}\n")
            show_rallyctl(client, keys, etcd.endpoints)
            show_metrics(work / "node-b")
        finally:
            client.close()
            started = [d for d in daemons if d.proc is not None]
            for d in started:
                d.signal(signal.SIGTERM)
            for d in started:
                assert d.proc is not None
                try:
                    d.proc.wait(timeout=15)
                except Exception:
                    d.stop()
    print(f"logs in {work}")
    return 0 if ids2 == ids else 1


if __name__ == "__main__":
    sys.exit(main())
