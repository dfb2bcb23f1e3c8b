"""A driver that a new layout moves to another role hands its requests on (real daemons, etcd,
workers, SIGKILL): they would otherwise wait, held, for a generation in which it drives again."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from rallypoint.gateway.client import CompletionClient
from rallypoint.gateway.resume import Progress
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.testing.daemons import DaemonProcess, daemon_args, wait_file, wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.checkpoint import make_model
from tests.integration.test_rallyd_recovery import plans
from tests.integration.test_serving import post

PROMPTS = [f"hand-off {i}: the five boxing wizards jump quickly" for i in range(8)]


def test_a_driver_moved_to_another_role_hands_its_requests_to_a_serving_driver(
        etcd: EtcdCluster, client, cluster_name: str, tmp_path: Path) -> None:
    """a and b hold one rank slot each, c two: TP=2 gives the replicas (a/0, b/0) and (c/0, c/1),
    c/0 driving the second. Eight streams go through c's gateway (its own driver first) without a
    pause. b's node is SIGKILLed: the one replica left keeps a/0 and moves rank 1 to c/0, which
    stops driving. c/0 ends the streams it held and queued, c's gateway resumes each on a/0, and
    every request finishes with the failure-free tokens, none waiting for a driver that is gone.
    c/1, left without a rank, is retired with SIGTERM and exits cleanly."""
    model = make_model(tmp_path / "model", "tiny", seed=11)
    keys = ClusterKeys(cluster_name)
    daemons: dict[str, DaemonProcess] = {}
    try:
        for node, ranks in (("a", "1"), ("b", "1"), ("c", "2")):
            args = daemon_args(etcd.endpoints, cluster_name, "--tp", "2", "--cpu-ranks", ranks,
                               "--rendezvous-last-call", "2", "--state-dir", str(tmp_path / node),
                               "--worker-model", str(model))
            daemons[node] = DaemonProcess(node, args, tmp_path / f"{node}.log").start()
        a_api = wait_file(tmp_path / "a" / "api-0.url").strip()
        wait_file(tmp_path / "c" / "api-0.url")
        gateway = wait_file(tmp_path / "c" / "gateway.url").strip()
        first = plans(client, keys)[-1]
        assert {s.rank: f"{s.node}/{s.local_rank}" for s in first.ranks} == \
            {0: "a/0", 1: "b/0", 2: "c/0", 3: "c/1"}, first
        body = [{"prompt": p, "max_tokens": 60, "temperature": 0.0} for p in PROMPTS]
        reference: dict[int, list[int]] = {}

        def refer(i: int) -> None:
            reference[i] = post(a_api, body[i])[1]["choices"][0]["token_ids"]

        refs = [threading.Thread(target=refer, args=(i,)) for i in range(len(body))]  # one batch
        for t in refs:
            t.start()
        for t in refs:
            t.join(timeout=60)
        assert sorted(reference) == list(range(len(body)))

        stop = threading.Event()
        results: list[tuple[int, list[int], float, str | None]] = []

        def load(i: int) -> None:
            c = CompletionClient(lambda: [gateway], timeout=60, read_timeout=60)
            while not stop.is_set():
                p, t0, error = Progress(), time.monotonic(), None
                try:
                    for _ in c.stream(body[i], p):
                        pass
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                results.append((i, list(p.tokens), time.monotonic() - t0, error))

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(len(body))]
        for t in threads:
            t.start()
        wait_for("requests served through c", lambda: len(results) >= 8, timeout=60)
        daemons["b"].kill_node()
        shrunk = wait_for("the one-replica plan", lambda: [p for p in plans(client, keys) if p.world_size == 2],
                          timeout=30)[0]
        assert {s.rank: f"{s.node}/{s.local_rank}" for s in shrunk.ranks} == {0: "a/0", 1: "c/0"}, shrunk
        before = len(results)
        # Every stream was with c/0 when it stopped driving: none of them finishes unless handed on.
        wait_for("requests served after the shrink", lambda: len(results) >= before + 16, timeout=45)
        stop.set()
        for t in threads:
            t.join(timeout=90)
        assert not [t for t in threads if t.is_alive()], "a stream never ended"
        wrong = [(i, err) for i, toks, _, err in results if err or toks != reference[i]]
        assert not wrong, wrong
        slowest = max(took for *_, took, _ in results)
        assert slowest < 30, slowest  # not the 60 s read timeout of a stream nobody serves
        c0_log = (tmp_path / "c" / "logs" / "worker-0.log").read_text()
        handed = [json.loads(x) for x in c0_log.splitlines() if '"worker.handed_off"' in x]
        assert len(handed) == 1 and handed[0]["gen"] == shrunk.gen and handed[0]["requests"], handed
        # c/1 has no rank left: rallyd retired it (SIGTERM), and it stopped cleanly on its own.
        retired = [json.loads(x) for x in daemons["c"].log_text().splitlines() if '"supervisor.retired"' in x]
        assert [(r["local_rank"], r["code"]) for r in retired] == [(1, 0)], retired
        assert '"worker.stopped"' in (tmp_path / "c" / "logs" / "worker-1.log").read_text()
    finally:
        for d in daemons.values():
            d.stop()
