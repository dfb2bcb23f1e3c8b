"""rallyd speaks systemd's notify protocol: READY once joined, WATCHDOG from its loop, STATUS with
the generation and role, STOPPING on SIGTERM; the unit file passes systemd-analyze verify."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from rallypoint.testing.daemons import DaemonProcess, daemon_args
from rallypoint.testing.etcd_server import EtcdCluster

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "rallyd.service"


def test_sd_notify_messages(etcd: EtcdCluster, cluster_name: str, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    d = DaemonProcess("a", daemon_args(etcd.endpoints, cluster_name, "--cpu-ranks", "1"), tmp_path / "a.log",
                      env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
    d.start()
    got: list[str] = []

    def read_until(pred, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got.extend(sock.recv(4096).decode().splitlines())
            except TimeoutError:
                pass
            if pred():
                return
        raise AssertionError(f"notify messages so far: {got[-10:]}")

    try:
        read_until(lambda: "READY=1" in got and any(m.startswith("STATUS=gen 1") for m in got))
        read_until(lambda: got.count("WATCHDOG=1") >= 3)
        assert any(m.startswith("STATUS=gen 1, leader, ") for m in got), got[-10:]
        d.signal(signal.SIGTERM)
        read_until(lambda: "STOPPING=1" in got)
        assert d.proc.wait(timeout=15) == 0
    finally:
        d.stop()
        sock.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_verifies(tmp_path: Path) -> None:
    # systemd-analyze checks that ExecStart's binary exists: point it at one that does.
    unit = tmp_path / "rallyd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/rallyd", shutil.which("true") or "/bin/true"))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [l for l in out.stderr.splitlines() if "rallyd.service" in l]
    assert out.returncode == 0 and not problems, out.stderr
