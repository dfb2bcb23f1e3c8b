"""A secured control plane: etcd serving clients over TLS only to certificates its CA signed, with
authentication on and, per cluster, a user whose role may touch only ``/rallypoint/<cluster>/``.

rallyd, its workers and rallyctl run against it; each way of getting the security wrong (the wrong
CA, no client certificate, a wrong password, no user, a role without permission on the key) gives
one error that says what to fix, at once rather than after the unavailability retries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from rallypoint.errors import EtcdAccessDenied
from rallypoint.rendezvous.etcd import ETCD_PASSWORD_ENV, EtcdClient, EtcdSettings
from rallypoint.testing.daemons import DaemonProcess, daemon_args, wait_file, wait_for
from rallypoint.testing.etcd_server import EtcdCluster, EtcdTLS, make_tls
from rallypoint.worker.checkpoint import make_model

ALICE, ALICE_PW, CLUSTER = "alice", "alice-secret", "secured"
BOB, BOB_PW, OTHER = "bob", "bob-secret", "elsewhere"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("secured-etcd")
    tls = make_tls(root / "tls")
    etcd = EtcdCluster(1, root=root / "etcd", tls=tls).start()
    try:
        etcd.enable_auth("root-secret", {ALICE: (ALICE_PW, CLUSTER), BOB: (BOB_PW, OTHER)})
        yield etcd, tls, make_tls(root / "other-ca")
    finally:
        etcd.stop()


def refused(settings: EtcdSettings, key: str = f"/rallypoint/{CLUSTER}/probe") -> tuple[str, int]:
    """The message a put under ``settings`` fails with, and how many RPCs it took."""
    client = EtcdClient(replace(settings, retry_deadline=5.0))
    try:
        with pytest.raises(EtcdAccessDenied) as err:
            client.put(key, "x")
        return str(err.value), client.requests
    finally:
        client.close()


def test_each_security_mistake_gives_one_clear_error(secured) -> None:
    etcd, tls, other = secured
    alice = etcd.client_settings(user=ALICE, password=ALICE_PW)
    client = EtcdClient(alice)
    try:  # the right settings: every verb rallypoint uses works under the cluster's prefix
        lease = client.grant_lease(5)
        client.put(f"/rallypoint/{CLUSTER}/a", "1", lease=lease)
        assert client.get(f"/rallypoint/{CLUSTER}/a").value == b"1"
        assert [kv.key for kv in client.get_prefix(f"/rallypoint/{CLUSTER}/")[0]] == [f"/rallypoint/{CLUSTER}/a"]
    finally:
        client.close()

    why, rpcs = refused(replace(alice, ca_cert=str(other.ca)))
    assert "TLS handshake failed" in why and f"ca_cert {other.ca}" in why and "CA that signed" in why and rpcs == 1
    why, rpcs = refused(replace(alice, cert_cert=None, cert_key=None))
    assert "refused this client's certificate (no client certificate given" in why and rpcs == 1
    why, rpcs = refused(replace(alice, cert_cert=str(other.client_cert), cert_key=str(other.client_key)))
    assert "refused this client's certificate (cert_cert" in why and rpcs == 1
    why, rpcs = refused(replace(alice, password="not-it"))
    assert f"rejected user {ALICE!r}: wrong user name or password" in why and ETCD_PASSWORD_ENV in why and rpcs == 1
    why, rpcs = refused(replace(alice, user=None, password=None))
    assert "requires authentication: set [etcd] user" in why and rpcs == 1
    why, rpcs = refused(alice, key=f"/rallypoint/{OTHER}/probe")  # another cluster's prefix
    assert f"put /rallypoint/{OTHER}/probe" in why and f"denied user {ALICE!r}: permission denied" in why
    assert rpcs == 1


def rallyctl(etcd: EtcdCluster, tls: EtcdTLS, *args: str, ca: Path | None = None,
             password: str = ALICE_PW) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rallypoint.cli", "--endpoints", ",".join(etcd.endpoints), "--cluster", CLUSTER,
         "--ca-cert", str(ca or tls.ca), "--cert-cert", str(tls.client_cert), "--cert-key", str(tls.client_key),
         "--user", ALICE, *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, ETCD_PASSWORD_ENV: password})


def test_rallyd_its_worker_and_rallyctl_serve_against_it(secured, tmp_path: Path) -> None:
    """A one-rank CPU deployment over the secured etcd answers a completion; rallyctl shows it.
    The password reaches rallyd and its worker through the environment only."""
    etcd, tls, other = secured
    model = make_model(tmp_path / "model", "tiny", seed=3)
    tls_flags = ["--etcd-ca-cert", str(tls.ca), "--etcd-cert-cert", str(tls.client_cert),
                 "--etcd-cert-key", str(tls.client_key), "--etcd-user", ALICE]
    node = DaemonProcess("s0", daemon_args(etcd.endpoints, CLUSTER, "--tp", "1", "--cpu-ranks", "1",
                                           "--state-dir", str(tmp_path / "s0"), "--worker-model", str(model),
                                           *tls_flags),
                         tmp_path / "s0.log", env={ETCD_PASSWORD_ENV: ALICE_PW})
    wrong = DaemonProcess("s1", daemon_args(etcd.endpoints, CLUSTER, "--state-dir", str(tmp_path / "s1"), *tls_flags),
                          tmp_path / "s1.log", env={ETCD_PASSWORD_ENV: "not-it"})
    try:
        node.start()
        gateway = wait_file(tmp_path / "s0" / "gateway.url").strip()
        wait_for("the replica serves", lambda: httpx.get(gateway + "/health", timeout=5).status_code == 200,
                 timeout=90, every=0.2)
        r = httpx.post(gateway + "/v1/completions", json={"prompt": "secured", "max_tokens": 8, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 8
        assert not any(ALICE_PW in " ".join(c) for c in _children_cmdlines(node.pid))  # not in ps

        status = rallyctl(etcd, tls, "--json", "status")
        assert status.returncode == 0, status.stderr
        assert any(n["node"] == "s0" for n in json.loads(status.stdout)["nodes"])
        bad_ca = rallyctl(etcd, tls, "status", ca=other.ca)
        assert bad_ca.returncode != 0 and "TLS handshake failed" in bad_ca.stderr and "Traceback" not in bad_ca.stderr
        bad_pw = rallyctl(etcd, tls, "status", password="not-it")
        assert bad_pw.returncode != 0 and "wrong user name or password" in bad_pw.stderr

        wrong.start()  # a daemon with a wrong password stops at once and says why
        assert wrong.proc is not None and wrong.proc.wait(timeout=30) != 0
        assert "wrong user name or password" in wrong.log_text()
    finally:
        wrong.stop()
        node.stop()


def _children_cmdlines(pid: int) -> list[list[str]]:
    import psutil

    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            out.append(p.cmdline())
        except psutil.NoSuchProcess:
            pass
    return out
