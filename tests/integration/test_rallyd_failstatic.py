"""Fail-static: all of etcd stopped for 10 s never tears down a healthy generation. Requests keep
completing during the outage, the daemons reconnect afterwards, and no worker is restarted."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient
from rallypoint.rendezvous.records import Plan
from rallypoint.testing.daemons import DaemonProcess, daemon_args, wait_file, wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.checkpoint import make_model
from tests.conftest import make_client
from tests.integration.test_rallyd_serving import worker_pid
from tests.integration.test_serving import get, post


def test_etcd_outage_keeps_serving(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", "tiny", seed=2)
    etcd = EtcdCluster(1).start()  # its own etcd: this test stops it
    cluster = "failstatic"
    daemons: list[DaemonProcess] = []
    try:
        for node in ("a", "b"):
            args = daemon_args(etcd.endpoints, cluster, "--tp", "2", "--cpu-ranks", "1",
                               "--state-dir", str(tmp_path / node), "--worker-model", str(model))
            daemons.append(DaemonProcess(node, args, tmp_path / f"{node}.log").start())
        url = wait_file(tmp_path / "a" / "api-0.url")
        body = {"prompt": "outage", "max_tokens": 24, "temperature": 0}
        reference = post(url, body)[1]["choices"][0]["token_ids"]
        workers = [worker_pid(d) for d in daemons]
        results: list[tuple[float, list[int]]] = []
        stop = threading.Event()

        def client_loop() -> None:
            while not stop.is_set():
                code, out, _ = post(url, body, timeout=60)
                results.append((time.monotonic(), out["choices"][0]["token_ids"] if code == 200 else [code]))

        t = threading.Thread(target=client_loop)
        t.start()
        wait_for("the client's first answer", lambda: results, timeout=30, every=0.02)
        member = etcd.members[0]
        t_stop = time.monotonic()
        member.proc.send_signal(signal.SIGSTOP)
        time.sleep(10.0)  # deliberate: the outage under test lasts 10 s (several 3 s leases)
        member.proc.send_signal(signal.SIGCONT)
        t_cont = time.monotonic()
        during = [r for when, r in results if t_stop + 0.5 < when < t_cont]
        assert len(during) >= 3, f"only {len(during)} requests completed during the 10 s outage"
        assert all(r == reference for r in during)
        # Afterwards the daemons reconnect: both nodes registered again and a plan holds them both.
        client: EtcdClient = make_client(etcd.endpoints, retry_deadline=20.0)
        keys = ClusterKeys(cluster)

        def registered() -> bool:
            kvs, _ = client.get_prefix(keys.nodes)
            plans, _ = client.get_prefix(keys.plans)
            return (len(kvs) == 2 and bool(plans)
                    and Plan.from_json(plans[-1].key, plans[-1].value).members == ("a", "b"))

        wait_for("both daemons registered again after the outage, in the newest plan", registered, timeout=30,
                 every=0.2)
        t_back = time.monotonic()
        wait_for("answers after the daemons are back", lambda: len([1 for when, _ in results if when > t_back]) >= 3,
                 timeout=30, every=0.05)
        stop.set()
        t.join(timeout=60)
        assert all(r == reference for _, r in results), [r for _, r in results if r != reference][:3]
        assert [worker_pid(d) for d in daemons] == workers  # nothing was restarted
        assert get(url, "/health")[0] == 200
        client.close()
    finally:
        for d in daemons:
            d.stop()
        etcd.stop()
