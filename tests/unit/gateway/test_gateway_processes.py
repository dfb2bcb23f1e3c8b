"""The gateway as processes sharing one port (``[gateway] processes``), against stand-in upstreams
(real ASGI servers): routes pushed from rallyd's side reach every process, streams resume across
upstreams inside a process and are counted in rallyd's metrics, a process that dies is started
again, the API key holds, and stopping leaves no process behind. One set of processes (each a
real ``python -m rallypoint.gateway.child``) serves the whole module."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from rallypoint.api.sockets import listen
from rallypoint.gateway.processes import GatewayProcesses
from rallypoint.testing.daemons import wait_for
from tests.unit.gateway.test_resume import ANSWER, Upstream

KEY = "sesame"


class Routes:
    """What rallyd's DriverRoutes would say; the test changes it."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def __call__(self) -> list[str]:
        return list(self.urls)


@pytest.fixture(scope="module")
def deployment() -> Iterator[tuple[GatewayProcesses, Routes, list[str], list[str]]]:
    routes, outcomes, resumes = Routes(), [], []
    gw = GatewayProcesses("127.0.0.1", 0, 2, routes, resume_timeout=5.0, model="m", api_key=KEY,
                          on_request=outcomes.append, on_resume=lambda: resumes.append("r"),
                          title="rallypoint gateway (test)", shared_socket=False).start()  # a socket each
    try:
        yield gw, routes, outcomes, resumes
    finally:
        pids = gw.pids()
        gw.stop()
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def stream(url: str, max_tokens: int = 12, key: str | None = KEY) -> tuple[int, list[int], str | None]:
    """(status, token ids, finish reason) of one streamed completion through the gateway."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": max_tokens, "stream": True},
                   headers=headers, timeout=30)
    if r.status_code != 200:
        return r.status_code, [], None
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: ") and e != "data: [DONE]"]
    return 200, [t for c in chunks for t in c["choices"][0]["token_ids"]], chunks[-1]["choices"][0]["finish_reason"]


def test_every_process_serves_the_routes_it_is_pushed(deployment) -> None:
    gw, routes, outcomes, _ = deployment
    healthy = Upstream()
    try:
        assert len(gw.pids()) == 2 and all("rallypoint gateway (test)" in " ".join(psutil.Process(p).cmdline())
                                           for p in gw.pids())
        # a request that waits for a serving driver goes on the moment one is pushed, not at a timeout
        first = len(outcomes)
        waiting = ThreadPoolExecutor(1).submit(stream, gw.url)
        time.sleep(0.5)
        t0 = time.monotonic()
        routes.urls = [healthy.url]
        assert waiting.result(timeout=30) == (200, ANSWER, "length")
        assert time.monotonic() - t0 < 2.0  # the resume timeout is 5 s

        # many at once: both processes take connections (the kernel spreads them over their sockets)
        wait_for("the first outcome counted", lambda: len(outcomes) == first + 1, timeout=10)  # it comes apart
        before, per_process = len(outcomes), list(gw.requests)
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda _: stream(gw.url), range(32)))
        assert got == [(200, ANSWER, "length")] * 32
        wait_for("every outcome counted on rallyd's side", lambda: len(outcomes) == before + 32, timeout=10)
        assert set(outcomes) == {"completed"}
        assert all(now > then for now, then in zip(gw.requests, per_process)), (per_process, gw.requests)
    finally:
        routes.urls = []
        healthy.stop()


def test_a_stream_resumes_on_the_next_upstream_and_rallyd_counts_it(deployment) -> None:
    gw, routes, outcomes, resumes = deployment
    dying, healthy = Upstream(die_after=4), Upstream()
    try:
        routes.urls = [dying.url, healthy.url]
        wait_for("routes pushed", lambda: gw.routes == routes.urls, timeout=5)
        n = len(resumes)
        assert stream(gw.url) == (200, ANSWER, "length")
        assert healthy.bodies[-1]["resume_tokens"] == ANSWER[:4]
        wait_for("the resume counted on rallyd's side", lambda: len(resumes) == n + 1, timeout=10)
    finally:
        routes.urls = []
        dying.stop()
        healthy.stop()


def test_the_api_key_is_required_of_clients(deployment) -> None:
    gw, routes, _, _ = deployment
    assert stream(gw.url, key=None)[0] == 401
    assert stream(gw.url, key="wrong")[0] == 401
    assert "sesame" not in " ".join(" ".join(psutil.Process(p).cmdline()) for p in gw.pids())  # not in ps
    r = httpx.get(gw.url + "/health", timeout=10)  # open, and says what it routes to
    assert r.status_code == 503 and r.json() == {"status": "unavailable", "drivers": []}


def test_a_killed_process_is_started_again(deployment) -> None:
    gw, routes, outcomes, _ = deployment
    healthy = Upstream()
    try:
        routes.urls = [healthy.url]
        victim = gw.pids()[0]
        restarts = gw.restarts
        psutil.Process(victim).send_signal(signal.SIGKILL)
        wait_for("a new process in its place", lambda: victim not in gw.pids() and len(gw.pids()) == 2
                 and all(c is not None and c.ready.is_set() for c in gw.children), timeout=20)
        assert gw.restarts == restarts + 1
        with ThreadPoolExecutor(8) as pool:  # both serve, with the routes of now
            assert list(pool.map(lambda _: stream(gw.url), range(16))) == [(200, ANSWER, "length")] * 16
    finally:
        routes.urls = []
        healthy.stop()


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "reuseport"])
def test_a_taken_port_fails_at_once_in_rallyd(shared: bool) -> None:
    """Bound in rallyd, before any process starts: another gateway (processes or a thread) on the
    same port fails at once, and so does one on a port another program holds."""
    holder = GatewayProcesses("127.0.0.1", 0, 2, list, resume_timeout=1.0, shared_socket=shared)  # never started
    try:
        with pytest.raises(OSError):
            GatewayProcesses("127.0.0.1", holder.port, 2, list, resume_timeout=1.0, shared_socket=shared)
        with pytest.raises(OSError):
            listen("127.0.0.1", holder.port)
    finally:
        for sock in holder.socks:
            sock.close()
    other = listen("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            GatewayProcesses("127.0.0.1", other.getsockname()[1], 2, list, resume_timeout=1.0, shared_socket=shared)
    finally:
        other.close()
    with pytest.raises(ValueError, match="at least 1"):
        GatewayProcesses("127.0.0.1", 0, 0, list, resume_timeout=1.0)


RALLYD = """
import sys, time
from rallypoint.api.sockets import listen
from rallypoint.gateway.processes import GatewayProcesses
gw = GatewayProcesses("127.0.0.1", 0, 1, list, resume_timeout=1.0).start()
print(gw.pids()[0], flush=True)
time.sleep(600)
"""


def test_a_process_exits_when_rallyd_is_killed() -> None:
    """rallyd SIGKILLed: its end of the pair closes, and its gateway process exits within seconds
    (its clients go on at another node's gateway) instead of serving routes nobody updates."""
    rallyd = subprocess.Popen([sys.executable, "-c", RALLYD], stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid = int(rallyd.stdout.readline())
        assert psutil.pid_exists(pid)
        rallyd.send_signal(signal.SIGKILL)
        rallyd.wait(10)
        wait_for("the gateway process exits", lambda: not psutil.pid_exists(pid)
                 or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=10)
    finally:
        rallyd.kill()
        rallyd.wait(10)
        if pid is not None and psutil.pid_exists(pid):
            psutil.Process(pid).kill()


def test_processes_on_one_shared_socket_serve_and_one_killed_comes_back() -> None:
    """``[gateway] accept = "shared"``: the processes accept on one socket; every request is
    answered, and a process killed is started again on that same socket."""
    routes, outcomes = Routes(), []
    healthy = Upstream()
    routes.urls = [healthy.url]
    gw = GatewayProcesses("127.0.0.1", 0, 2, routes, resume_timeout=5.0, model="m", api_key=KEY,
                          on_request=outcomes.append, title="rallypoint gateway (shared test)",
                          shared_socket=True).start()
    try:
        assert gw.status()["accept"] == "shared" and len({s.fileno() for s in gw.socks}) == 1
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda _: stream(gw.url), range(16))) == [(200, ANSWER, "length")] * 16
        victim = gw.pids()[0]
        psutil.Process(victim).kill()
        wait_for("the process started again", lambda: len(gw.pids()) == 2 and victim not in gw.pids()
                 and all(psutil.pid_exists(p) for p in gw.pids()), timeout=20)
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda _: stream(gw.url), range(16))) == [(200, ANSWER, "length")] * 16
        wait_for("every outcome counted", lambda: len(outcomes) == 32, timeout=10)
    finally:
        pids = gw.pids()
        gw.stop()
        healthy.stop()
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
