"""Serving end to end with real worker processes: the HTTP API, bad requests, a request that lives
through a SIGKILLed rank, and a corrupt shard."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rallypoint.protocol.keys import ClusterKeys
from rallypoint.protocol.orders import order_abort
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.rendezvous.records import Plan, RankSlot
from rallypoint.testing.daemons import wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.checkpoint import make_model
from tests.conftest import make_client

_clusters = itertools.count()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"), "tiny", seed=0)


class Deployment:
    """Worker processes of one cluster, and the plans the test (standing in for the leader) writes."""

    def __init__(self, etcd: EtcdCluster, model: Path, tmp: Path, **worker_args: str) -> None:
        self.etcd, self.model, self.tmp = etcd, model, tmp
        self.cluster = f"serve{next(_clusters)}-{os.getpid()}"
        self.keys = ClusterKeys(self.cluster)
        self.client: EtcdClient = make_client(etcd.endpoints)
        self.procs: list[subprocess.Popen] = []
        self.worker_args = worker_args
        self.gen = 0

    def start_worker(self, node: str, local_rank: int, model: Path | None = None) -> subprocess.Popen:
        url_file = self.tmp / f"{self.cluster}-{node}-{local_rank}.url"
        args = [sys.executable, "-m", "rallypoint.worker", "--cluster", self.cluster,
                "--endpoints", ",".join(self.etcd.endpoints), "--node", node, "--local-rank", str(local_rank),
                "--model", str(model or self.model), "--api-url-file", str(url_file)]
        for k, v in self.worker_args.items():
            args += [f"--{k.replace('_', '-')}", v]
        log = open(self.tmp / f"{self.cluster}-{node}-{local_rank}.log", "ab")
        p = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        p.url_file, p.log_path = url_file, log.name  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def publish(self, tp: int, seats: list[tuple[str, int]], pp: int = 1) -> Plan:
        self.gen += 1
        plan = Plan(gen=self.gen, tp=tp, pp=pp, dp=len(seats) // (tp * pp),
                    ranks=tuple(RankSlot(i, n, lr) for i, (n, lr) in enumerate(seats)),
                    members=tuple(sorted({n for n, _ in seats})), reason="test", leader="test")
        self.client.put(self.keys.plan(plan.gen), plan.to_json())
        self.client.put(self.keys.gen, str(plan.gen))
        self.client.put(self.keys.released_of(plan.gen), "{}")
        return plan

    def url(self, proc: subprocess.Popen, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.url_file.exists() and proc.url_file.read_text():  # type: ignore[attr-defined]
                return proc.url_file.read_text()  # type: ignore[attr-defined]
            assert proc.poll() is None, Path(proc.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
            time.sleep(0.05)
        raise AssertionError("the driver never opened its API")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        self.client.close()


@pytest.fixture
def deploy(etcd: EtcdCluster, model_dir: Path, tmp_path: Path) -> Iterator:
    made: list[Deployment] = []

    def make(**worker_args: str) -> Deployment:
        d = Deployment(etcd, model_dir, tmp_path, **worker_args)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def post(url: str, body: object, timeout: float = 60) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), {k.lower(): v for k, v in err.headers.items()}


def stream(url: str, body: dict, timeout: float = 120, on_event: Callable[[dict], None] | None = None) -> list[dict]:
    """Stream a completion; return its events (``on_event`` also gets each one as it arrives)."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.strip()
            if line.startswith(b"data: "):
                payload = line[6:].decode()
                if payload == "[DONE]":
                    break
                events.append(json.loads(payload))
                if on_event is not None:
                    on_event(events[-1])
    return events


def get(url: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + path, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_api_end_to_end_and_bad_requests(deploy) -> None:
    d = deploy(queue_capacity="1")
    w = d.start_worker("n0", 0)
    d.publish(1, [("n0", 0)])
    url = d.url(w)
    code, body, _ = post(url, {"prompt": "Hello, rallypoint", "max_tokens": 12, "temperature": 0})
    assert code == 200, body
    choice = body["choices"][0]
    assert len(choice["token_ids"]) == 12 and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 12
    again = post(url, {"prompt": "Hello, rallypoint", "max_tokens": 12, "temperature": 0})[1]["choices"][0]
    assert again["token_ids"] == choice["token_ids"]  # greedy is deterministic
    events = stream(url, {"prompt": "Hello, rallypoint", "max_tokens": 12, "temperature": 0})
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == choice["token_ids"]
    assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    seeded = {"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0.7, "seed": 5}
    first, second = post(url, seeded), post(url, seeded)
    assert first[0] == 200 and first[1]["choices"][0]["token_ids"] == second[1]["choices"][0]["token_ids"]
    for bad, field in [(b"{not json", "not valid JSON"), ({"max_tokens": 3, "temperature": 0}, "prompt"),
                       ({"prompt": "x", "max_tokens": 0, "temperature": 0}, "max_tokens"),
                       ({"prompt": "x", "temperature": -1}, "temperature"),
                       ({"prompt": [1, 10**9]}, "outside the vocabulary"),
                       ({"prompt": "x", "stream": "yes"}, "stream"),
                       ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
                       ({"prompt": "x", "max_tokens": 100000, "temperature": 0}, "max_tokens")]:
        code, body, _ = post(url, bad)
        assert code == 400 and field in body["error"]["message"], (bad, body)
    assert get(url, "/health")[0] == 200 and '"serving"' in get(url, "/health")[1]
    metrics = get(url, "/metrics")[1]
    assert 'rallypoint_requests_total{outcome="completed"}' in metrics and "rallypoint_generation 1" in metrics
    assert get(url, "/nope")[0] == 404
    # Queue capacity 1: of requests arriving together, one runs and the rest get 503 + Retry-After.
    results: list[tuple[int, dict, dict]] = []
    long = {"prompt": "long", "max_tokens": 480, "temperature": 0}
    burst = [threading.Thread(target=lambda: results.append(post(url, long)))
             for _ in range(4)]
    for t in burst:
        t.start()
    for t in burst:
        t.join()
    codes = sorted(r[0] for r in results)
    assert codes[0] == 200 and codes[-1] == 503, codes
    assert all(r[2].get("retry-after") == "1" and "queue full" in r[1]["error"]["message"]
               for r in results if r[0] == 503)


def test_request_lives_through_a_sigkilled_rank(deploy) -> None:
    d = deploy()
    seats = [("n0", 0), ("n0", 1)]
    workers = [d.start_worker(*s) for s in seats]
    plan = d.publish(2, seats)
    url = d.url(workers[0])
    greedy = {"prompt": "The quick brown fox", "max_tokens": 60, "temperature": 0}
    seeded = {"prompt": "jumps over", "max_tokens": 40, "temperature": 0.9, "seed": 11}
    ref_greedy = post(url, greedy)[1]["choices"][0]["token_ids"]
    ref_seeded = post(url, seeded)[1]["choices"][0]["token_ids"]
    got: dict[str, list] = {}
    seen: list[dict] = []  # the greedy stream's events as they arrive
    threads = [threading.Thread(target=lambda: got.__setitem__("greedy", stream(url, greedy, on_event=seen.append))),
               threading.Thread(target=lambda: got.__setitem__("seeded", post(url, seeded, timeout=120)))]
    for t in threads:
        t.start()
    # Both requests being generated, the greedy one streaming: the peer dies mid-request.
    wait_for("both requests in flight, the greedy stream's first token out",
             lambda: seen and json.loads(get(url, "/health")[1])["in_flight"] == 2, timeout=30, every=0.005)
    assert seen[-1]["choices"][0]["finish_reason"] is None and "seeded" not in got
    os.kill(workers[1].pid, signal.SIGKILL)  # the TP peer, mid-request
    workers[1].wait()
    order_abort(d.client, d.keys, plan.gen, [1], "rank 1 exited")  # what the daemon will say
    d.start_worker("n0", 1)  # a replacement process on the same seat
    d.publish(2, seats)
    for t in threads:
        t.join(timeout=120)
    tokens = [t for e in got["greedy"] for t in e["choices"][0]["token_ids"]]
    assert tokens == ref_greedy
    assert got["seeded"][1]["choices"][0]["token_ids"] == ref_seeded
    metrics = get(url, "/metrics")[1]
    resumed = float(next(line for line in metrics.splitlines() if 'outcome="resumed"' in line).split()[-1])
    assert resumed >= 2, metrics  # both requests were held over the abort
    assert "rallypoint_generation 2" in metrics
    # Only the moved shard reloads: the driver kept its weights across the rebuild.
    driver_log = Path(workers[0].log_path).read_text()  # type: ignore[attr-defined]
    assert driver_log.count('"event": "worker.shard_loaded"') == 1
    assert '"gen": 2' in driver_log and '"shard_seconds": 0.0' in driver_log


def test_pipeline_and_tensor_parallel_replicas_give_the_same_tokens(deploy) -> None:
    """The same greedy request served at TP=1, at PP=2 and at TP=2 x PP=2 (the engine's pipeline
    path: headers and hidden states down the stages, sampled tokens back to the first)."""
    body = {"prompt": "pipeline stages", "max_tokens": 16, "temperature": 0}
    tokens = []
    for tp, pp in ((1, 1), (1, 2), (2, 2)):
        d = deploy()
        seats = [("n0", i) for i in range(tp * pp)]
        workers = [d.start_worker(*s) for s in seats]
        d.publish(tp, seats, pp=pp)
        code, out, _ = post(d.url(workers[0]), body)
        assert code == 200, out
        tokens.append(out["choices"][0]["token_ids"])
        d.close()
    assert tokens[0] == tokens[1] == tokens[2] and len(tokens[0]) == 16


def test_long_prompts_fill_in_chunks_between_decode_steps_with_the_same_tokens(deploy) -> None:
    """``--prefill-tokens 8``: prompts of 30-60 tokens fill over several prefill steps, taking
    turns with the decode steps of the requests already running; every answer equals the one a
    replica that prefills whole prompts gives."""
    prompts = [{"prompt": f"chunked prefill {i}: " + "the quick brown fox " * (1 + i), "max_tokens": 12,
                "temperature": 0} for i in range(3)]
    answers = []
    for chunk in ("4096", "8"):
        d = deploy(prefill_tokens=chunk)
        w = d.start_worker("n0", 0)
        d.publish(1, [("n0", 0)])
        url = d.url(w)
        got: dict[int, list[int]] = {}

        def one(i: int) -> None:
            got[i] = post(url, prompts[i])[1]["choices"][0]["token_ids"]

        threads = [threading.Thread(target=one, args=(i,))
                   for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        answers.append([got.get(i) for i in range(len(prompts))])
        d.close()
    assert answers[0] == answers[1] and all(len(a) == 12 for a in answers[0])


def test_a_cache_sized_from_free_memory_serves(deploy) -> None:
    """``--max-batch 0 --max-seq 0``: the worker sizes its KV cache from the memory its weights
    left (the tiny model's rows are small: the 256-row cap), takes the model's context as the
    row length, and serves; the API takes prompts up to that context."""
    d = deploy(max_batch="0", max_seq="0")
    w = d.start_worker("n0", 0)
    d.publish(1, [("n0", 0)])
    url = d.url(w)
    log = Path(w.log_path).read_text()  # type: ignore[attr-defined]
    sized = json.loads(next(line for line in log.splitlines() if '"worker.kv_sized"' in line))
    assert (sized["max_batch"], sized["max_seq"]) == (256, 512), sized
    code, body, _ = post(url, {"prompt": [1] * 500, "max_tokens": 8, "temperature": 0})
    assert code == 200 and len(body["choices"][0]["token_ids"]) == 8
    code, body, _ = post(url, {"prompt": [1] * 510, "max_tokens": 8})
    assert code == 400 and "exceeds the context of 512" in body["error"]["message"]


def test_corrupt_shard_is_named(deploy, model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-model"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    d = deploy()
    w = d.start_worker("n0", 0, model=bad)
    d.publish(1, [("n0", 0)])
    assert w.wait(timeout=60) == 3
    log = Path(w.log_path).read_text()  # type: ignore[attr-defined]
    assert "worker.shard_failed" in log and weights.name in log


def test_a_build_whose_peer_never_comes_asks_for_the_next_plan(deploy) -> None:
    """The plan names a second rank that never starts: the worker's build waits for it (``--build-
    timeout 2``), names it, and asks the leader (here the test) for the next plan, instead of
    waiting for a plan nobody would write. Given one that fits, it serves."""
    d = deploy(build_timeout="2")
    w = d.start_worker("n0", 0)
    d.publish(2, [("n0", 0), ("ghost", 0)])
    t0 = time.monotonic()

    def replan_request():  # fails at once if the worker exits instead
        assert w.poll() is None, Path(w.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
        return d.client.get(d.keys.replan_of(1))

    kv = wait_for("the worker's re-plan request", replan_request, timeout=30, every=0.1)
    took = time.monotonic() - t0
    reason = kv.value.decode()
    assert "n0/0 could not build generation 1's groups" in reason and "rank(s) [1] never arrived within 2s" in reason
    assert 2.0 <= took < 10.0, took
    d.publish(1, [("n0", 0)])
    status, body, _ = post(d.url(w), {"prompt": "after a failed build", "max_tokens": 4, "temperature": 0})
    assert status == 200 and len(body["choices"][0]["token_ids"]) == 4
