"""The README's quick-start demo runs end to end (it is the first thing a new user runs)."""

from __future__ import annotations

import re
import subprocess
import sys

from rallypoint.testing.etcd_server import EtcdCluster


def test_demo_serves_and_survives_a_killed_worker(etcd: EtcdCluster) -> None:
    out = subprocess.run([sys.executable, "-m", "rallypoint.demo", "--tokens", "24"], capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # On a loaded 2-core machine an etcd lease can lapse while the workers start, and the cluster
    # recovers once before the demo's own kill: the story is told from whatever generation it is at.
    assert re.search(r"^generation \d+: world 2 = TP 2 x PP 1 x DP 1", out.stdout, re.M), out.stdout[-3000:]
    assert "identical tokens (24 tokens)" in out.stdout
    assert "restarted in place" in out.stdout
    recoveries = re.search(r'^rallypoint_recoveries_total\{cause="rank_exit",cluster="demo",node="node-b"\} (\S+)$',
                           out.stdout, re.M)
    restarts = re.search(r'^rallypoint_worker_replacements_total\{cluster="demo",node="node-b",strategy="restart"\} '
                         r'(\S+)$', out.stdout, re.M)
    assert recoveries and float(recoveries.group(1)) >= 1.0, out.stdout[-3000:]
    assert restarts and float(restarts.group(1)) >= 1.0, out.stdout[-3000:]
