"""The README's quick-start demo runs end to end (it is the first thing a new user runs)."""

from __future__ import annotations

import subprocess
import sys

from rallypoint.testing.etcd_server import EtcdCluster


def test_demo_serves_and_survives_a_killed_worker(etcd: EtcdCluster) -> None:
    out = subprocess.run([sys.executable, "-m", "rallypoint.demo", "--tokens", "24"], capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "generation 1: world 2 = TP 2 x PP 1 x DP 1" in out.stdout
    assert "identical tokens (24 tokens)" in out.stdout
    assert "restarted in place" in out.stdout
    assert 'rallypoint_recoveries_total{cause="rank_exit",cluster="demo",node="node-b"} 1.0' in out.stdout
    assert 'rallypoint_worker_replacements_total{cluster="demo",node="node-b",strategy="restart"} 1.0' in out.stdout
