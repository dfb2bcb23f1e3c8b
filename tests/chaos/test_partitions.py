"""Network partitions (root only): the chaos suite in network namespaces made for the run, each
partition scenario once, under the same steady load and invariants as ``test_chaos``: a node cut
from etcd (fenced: its workers write nothing into the generations made without it), a node cut
from its TP peer (the collective trips, a diagnosis names the pair, a placement whose ranks reach
each other serves), the etcd leader isolated, a short partition that heals. One subprocess, as
an operator would run it: ``python -m tests.chaos.run --netns --runs 1 --soak 0``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rallypoint.testing import netns
from rallypoint.testing.etcd_server import etcd_binary
from tests.chaos.scenarios import PARTITIONS


@pytest.mark.timeout(900)
def test_the_cluster_survives_partitions(tmp_path: Path) -> None:
    if etcd_binary() is None:
        pytest.skip("etcd is not installed")
    if (why := netns.available()) is not None:
        pytest.skip(why)
    report = tmp_path / "partitions.json"
    run = subprocess.run([sys.executable, "-m", "tests.chaos.run", "--netns", "--runs", "1", "--soak", "0",
                          "--sample-every", "0", "--seed", "3", "--root", str(tmp_path / "run"),
                          "--json", str(report)], capture_output=True, text=True, timeout=880)
    print(run.stdout[-6000:])
    assert report.exists(), run.stderr[-3000:]
    results = json.loads(report.read_text())["runs"]
    assert sorted(r["scenario"] for r in results) == sorted(PARTITIONS), results
    for r in results:
        assert r["survived"], (r["scenario"], r["problems"])
        assert r["lost"] == 0 and r["requests"] > 0 and r["to_serving"] is not None, r
    assert run.returncode == 0, run.stdout[-3000:]
