"""Disaggregated prefill and decode with real rallyd, etcd, worker processes, gloo and SIGKILL:
one node, two one-rank replicas, ``[layout] prefill_replicas = 1``: replica 0 prefills the long
prompts, replica 1 (where the gateway sends the clients) receives their KV cache and decodes.

* tokens through P -> D equal the single-process reference; the decode replica received every
  prompt's KV and its buffer is empty afterwards;
* the prefill replica SIGKILLed while long prompts keep coming: every stream finishes with the
  failure-free tokens (the decode replica prefills what it could not get), nothing left behind;
* the decode replica SIGKILLed mid-stream: the gateway resumes every stream, same tokens.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.testing.daemons import DaemonProcess, wait_file, wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.kv_transfer import SEND_DELAY_ENV
from tests.conftest import make_client
from tests.integration.replicas import check, greedy_reference, kill_while_streaming, plan_of, start_replicas
from tests.integration.test_rallyd_recovery import plans, seat_pid
from tests.integration.test_rallyd_serving import start_streams
from tests.integration.test_serving import post

LONG = 12  # prompts of at least this many tokens are prefilled on the prefill replica
PROMPTS = [[(7 * i + 3 * j) % 250 + 3 for j in range(LONG + i)] for i in range(6)]
TOKENS = 60


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("pd") / "model", "tiny", seed=9)


@pytest.fixture(scope="module")
def reference(model: Path) -> list[list[int]]:
    return greedy_reference(model, PROMPTS, TOKENS)


def workers(client: EtcdClient, keys: ClusterKeys) -> list[dict]:
    """Node a's workers as its rallyd publishes them (their last beats: role, state, counts)."""
    kv = client.get(keys.node_status_of("a"))
    return list(json.loads(kv.value)["workers"]) if kv else []


def start(etcd: EtcdCluster, cluster: str, tmp_path: Path, model: Path,
          env: dict[str, str] | None = None, prefill: int = 1) -> tuple[DaemonProcess, str]:
    """``prefill`` prefill replicas and one decode replica, once rallyd's status shows them all
    serving (the decode replica finds the prefill ones there)."""
    daemon, gateway = start_replicas(etcd, cluster, tmp_path, model, prefill + 1, "--prefill-replicas", str(prefill),
                                     "--worker-disaggregate-tokens", str(LONG), env=env)
    client = make_client(etcd.endpoints)
    try:
        wait_for("every replica serving in rallyd's status", lambda: sorted(
            w.get("role") for w in workers(client, ClusterKeys(cluster)) if w.get("state") == "serving")
            == ["decode"] + ["prefill"] * prefill, timeout=30)
    except BaseException:
        daemon.stop()
        raise
    finally:
        client.close()
    return daemon, gateway


def counts(client: EtcdClient, keys: ClusterKeys, role: str) -> dict[str, int]:
    """The request counts of the worker in ``role``, as rallyd publishes them (its last beat)."""
    return wait_for(f"the {role} replica's counts", lambda: next(
        (w["counts"] for w in workers(client, keys) if w.get("role") == role and "counts" in w), None), timeout=10)


def requests() -> list[dict]:
    return [{"prompt": p, "max_tokens": TOKENS, "temperature": 0} for p in PROMPTS]


def test_prefill_on_one_replica_decode_on_the_other_gives_the_reference_tokens(
        etcd: EtcdCluster, client: EtcdClient, cluster_name: str, tmp_path: Path, model: Path,
        reference: list[list[int]]) -> None:
    keys = ClusterKeys(cluster_name)
    daemon, gateway = start(etcd, cluster_name, tmp_path, model)
    try:
        plan = plans(client, keys)[-1]
        assert plan.prefill_replicas == 1 and plan.role_of(0) == "prefill" and plan.role_of(1) == "decode"
        for body, ref in zip(requests(), reference):
            check(post(gateway, body)[1]["choices"][0]["token_ids"], ref)
        short = {"prompt": PROMPTS[0][:LONG - 4], "max_tokens": 8, "temperature": 0}  # prefilled where it decodes
        assert len(post(gateway, short)[1]["choices"][0]["token_ids"]) == 8

        def settled() -> tuple[dict[str, int], dict[str, int]] | None:
            d, p = counts(client, keys, "decode"), counts(client, keys, "prefill")
            return (d, p) if d.get("prefilled_remotely") == len(PROMPTS) and d.get("completed", 0) == len(PROMPTS) + 1 \
                else None
        d, p = wait_for("the decode replica's counts", settled, timeout=10)
        assert d["prefill_fallbacks"] == 0 and d["kv_received"] == d["kv_freed"] == len(PROMPTS)  # nothing left
        assert p["kv_sent"] == len(PROMPTS) and p.get("kv_send_failed", 0) == 0
    finally:
        daemon.stop()


def test_the_prefill_replica_killed_while_prompts_come_in(
        etcd: EtcdCluster, client: EtcdClient, cluster_name: str, tmp_path: Path, model: Path,
        reference: list[list[int]]) -> None:
    keys = ClusterKeys(cluster_name)
    daemon, gateway = start(etcd, cluster_name, tmp_path, model)
    try:
        first = start_streams(gateway, requests()[:3])
        got: dict[int, list[int]] = {}
        late = threading.Thread(target=lambda: got.update(  # more long prompts while the prefill replica is gone
            {i: post(gateway, body)[1]["choices"][0]["token_ids"] for i, body in enumerate(requests()[3:], 3)}))
        late.start()
        psutil.Process(seat_pid(daemon, 0)).kill()  # replica 0: the prefill replica
        got.update(first.join())
        late.join(timeout=120)
        assert not late.is_alive()
        for i, ref in enumerate(reference):
            check(got[i], ref)
        plan_of(client, keys, 2)
        d = counts(client, keys, "decode")
        assert d["kv_received"] == d["kv_freed"], d  # whatever arrived was freed
    finally:
        daemon.stop()


def test_the_decode_replica_killed_mid_stream(
        etcd: EtcdCluster, client: EtcdClient, cluster_name: str, tmp_path: Path, model: Path,
        reference: list[list[int]]) -> None:
    keys = ClusterKeys(cluster_name)
    daemon, gateway = start(etcd, cluster_name, tmp_path, model)
    try:
        kill_while_streaming(daemon, gateway, requests(), reference, lambda: 1)  # the decode replica: every stream
        plan_of(client, keys, 2)
        url = wait_file(tmp_path / "a" / "api-1.url").strip()

        def serving() -> bool:
            try:
                with urllib.request.urlopen(url + "/health", timeout=10) as r:
                    return json.loads(r.read())["status"] == "serving"
            except urllib.error.HTTPError:
                return False
        wait_for("the restarted decode replica serving", serving, timeout=60)
        check(post(gateway, requests()[0])[1]["choices"][0]["token_ids"], reference[0])
        assert wait_for("its prefill done remotely", lambda: counts(client, keys, "decode").get("prefilled_remotely"))
    finally:
        daemon.stop()


def test_the_prefill_replica_killed_mid_transfer(etcd: EtcdCluster, client: EtcdClient, cluster_name: str,
                                                tmp_path: Path, model: Path, reference: list[list[int]]) -> None:
    """The prefill replica sends its layers 2 s apart (fault injection) and is SIGKILLed while
    the decode replica receives them: the receive breaks off, the decode replica frees what had
    arrived and prefills the request itself, which finishes with the reference tokens."""
    keys = ClusterKeys(cluster_name)
    daemon, gateway = start(etcd, cluster_name, tmp_path, model, env={SEND_DELAY_ENV: "2"})
    try:
        got: dict[str, list[int]] = {}
        t = threading.Thread(target=lambda: got.update(
            ids=post(gateway, requests()[2])[1]["choices"][0]["token_ids"]))
        t.start()
        decode_log = tmp_path / "a" / "logs" / "worker-1.log"
        wait_for("the decode replica receiving", lambda: "disaggregation.receiving" in decode_log.read_text(),
                 timeout=30, every=0.01)
        time.sleep(0.5)  # the header and the first layer are in; the next layer comes 2 s after the first
        psutil.Process(seat_pid(daemon, 0)).kill()
        t.join(timeout=120)
        check(got["ids"], reference[2])
        text = decode_log.read_text()
        assert "disaggregation.fallback" in text and ("layer(s) received" in text or "receiving the KV of" in text)
        d = wait_for("the decode replica's counts", lambda: (c := counts(client, keys, "decode"))
                     and c.get("prefill_fallbacks") and c.get("kv_freed") and c)
        # its header had arrived (an entry made), then the transfer broke off: the entry was freed
        assert d["kv_received"] == d["kv_freed"] == 1 and d["prefilled_remotely"] == 0, d
    finally:
        daemon.stop()


def test_two_prefill_replicas_work_for_one_decode_replica_at_once(
        etcd: EtcdCluster, client: EtcdClient, cluster_name: str, tmp_path: Path, model: Path,
        reference: list[list[int]]) -> None:
    """One asking thread per prefill replica: a burst of long prompts is prefilled on both."""
    keys = ClusterKeys(cluster_name)
    daemon, gateway = start(etcd, cluster_name, tmp_path, model, prefill=2)
    try:
        streams = start_streams(gateway, requests())
        got = streams.join()
        for i, ref in enumerate(reference):
            check(got[i], ref)

        def sent() -> list[int] | None:
            out = sorted(w.get("counts", {}).get("kv_sent", 0) for w in workers(client, keys) if w.get("role") == "prefill")
            return out if sum(out) == len(PROMPTS) else None
        per_prefill = wait_for("every prompt's KV sent", sent, timeout=10)
        assert len(per_prefill) == 2 and min(per_prefill) > 0, per_prefill  # both prefilled
        d = counts(client, keys, "decode")
        assert d["prefilled_remotely"] == len(PROMPTS) and d["kv_received"] == d["kv_freed"] == len(PROMPTS)
    finally:
        daemon.stop()
