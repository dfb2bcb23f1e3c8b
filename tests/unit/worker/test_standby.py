"""The standby interpreter (``python -m rallypoint.worker --standby``): its one-line order, EOF,
a bad line, and a worker run in it as ``python -m rallypoint.worker ARGV`` runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rallypoint.worker.standby import parse_order, seat_title
from rallypoint.worker.title import ProcessInfo, describe, standby_title


def test_an_order_is_an_argv_of_strings_and_a_log_path() -> None:
    assert parse_order(b'{"argv": ["--node", "a"], "log": "/tmp/w.log"}\n') == (["--node", "a"], "/tmp/w.log")
    for bad in (b"nope\n", b"[1]\n", b'{"argv": "--node a", "log": "/l"}\n', b'{"argv": [1], "log": "/l"}\n',
                b'{"argv": []}\n', b'{"argv": [], "log": ""}\n'):
        with pytest.raises(ValueError):
            parse_order(bad)


def test_titles_tell_a_standby_from_a_worker() -> None:
    assert describe(standby_title("demo", "a", "ready")) is None  # no worker until it takes an argv
    seat = ["--cluster", "demo", "--node", "a"]
    assert describe(seat_title([*seat, "--local-rank", "2"])) == ProcessInfo("worker", "demo", 2)
    assert describe(seat_title([*seat, "--spare"])) == ProcessInfo("spare", "demo", None)


def test_eof_exits_quietly_a_bad_line_fails_and_an_order_runs_the_worker(tmp_path: Path) -> None:
    """Three standbys at once (each imports torch): stdin closed at once (rallyd stopping it): 0;
    a line that is no order: 2 and a message; an order: the worker's output goes to the log named
    and its exit is the standby's (``--help``: argparse's usage, 0)."""
    def standby(name: str) -> subprocess.Popen:
        out = open(tmp_path / f"{name}.log", "wb")  # the child's, for its lifetime
        try:
            return subprocess.Popen([sys.executable, "-m", "rallypoint.worker", "--standby", "--node", name],
                                    stdin=subprocess.PIPE, stdout=out, stderr=out)
        finally:
            out.close()

    eof, bad, good = procs = [standby("eof"), standby("bad"), standby("good")]
    try:
        eof.communicate(b"", timeout=60)
        bad.communicate(b"nope\n", timeout=60)
        good.communicate(json.dumps({"argv": ["--help"], "log": str(tmp_path / "worker-0.log")}).encode() + b"\n",
                         timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert eof.returncode == 0 and "Traceback" not in (tmp_path / "eof.log").read_text()
    assert bad.returncode == 2 and "bad order from rallyd: not JSON" in (tmp_path / "bad.log").read_text()
    assert good.returncode == 0
    worker_log = (tmp_path / "worker-0.log").read_text()
    assert '"worker.standby_taken"' in worker_log and "usage: rallypoint-worker" in worker_log
    assert "usage:" not in (tmp_path / "good.log").read_text()  # the worker's output went to its own log
