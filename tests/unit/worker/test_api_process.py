"""The replica's API in its own process (worker.api_link / worker.api_process): a real child
process and real HTTP; the driver's side is a RequestQueue served by a hand-written loop (no model)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading

import httpx
import psutil
import pytest

from rallypoint.testing.daemons import wait_for
from rallypoint.worker.api_link import ApiProcess, ServeSpec
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.requests import RequestQueue


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_model(tmp_path_factory.mktemp("m") / "m", "tiny"))


@pytest.fixture
def api(model_dir: str):
    queue = RequestQueue(capacity=4)
    state = ["serving", 7]
    proc = ApiProcess(queue, model_dir, 320, "m", lambda: (state[0], state[1]))
    try:
        url = proc.serve(ServeSpec("127.0.0.1", 0, 128, 0.0, 0.0, queue.capacity))
        yield queue, proc, url, state
    finally:
        proc.close()
        if proc.proc.poll() is None:
            proc.proc.kill()


def drive(queue: RequestQueue, tokens: list[int], stop: threading.Event) -> None:
    """A stand-in driver: commits ``tokens`` one at a time to each request it takes."""
    while not stop.is_set():
        for req in queue.take(1, timeout=0.05):
            for tok in tokens:
                if req.done:
                    break
                req.pending.append(tok)
                req.commit()
                stop.wait(0.002)
            queue.finished(req)


def events(text: str) -> list[dict]:
    return [json.loads(x[6:]) for x in text.split("\n\n") if x.startswith("data: {")]


def test_tokens_and_ends_cross_and_health_and_metrics_show_the_driver(api) -> None:
    queue, _, url, _ = api
    stop = threading.Event()
    t = threading.Thread(target=drive, args=(queue, [11, 12, 13, 14, 15, 16], stop), daemon=True)
    t.start()
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 6, "stream": True}, timeout=10)
        got = events(r.text)
        assert [tok for e in got for tok in e["choices"][0]["token_ids"]] == [11, 12, 13, 14, 15, 16]
        assert got[-1]["choices"][0]["finish_reason"] == "length" and r.text.endswith("data: [DONE]\n\n")
        whole = httpx.post(url + "/v1/completions", json={"prompt": [5], "max_tokens": 3}, timeout=10).json()
        assert whole["choices"][0]["token_ids"] == [11, 12, 13] and whole["usage"]["completion_tokens"] == 3
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 200 and health.json()["generation"] == 7
        wait_for("the driver's counts in /metrics", lambda: 'rallypoint_requests_total{outcome="completed"} 2.0'
                 in httpx.get(url + "/metrics", timeout=5).text, timeout=5, every=0.02)
    finally:
        stop.set()
        t.join(5)


def test_a_client_that_goes_away_cancels_the_drivers_request(api) -> None:
    queue, _, url, _ = api
    with httpx.Client(timeout=10) as client, client.stream(
            "POST", url + "/v1/completions", json={"prompt": [5], "max_tokens": 50, "stream": True}) as r:
        assert r.status_code == 200
        wait_for("the request at the driver", lambda: queue.waiting == 1, timeout=5, every=0.01)
    req = queue.take(1)[0]
    wait_for("the cancel at the driver", lambda: req.done, timeout=5, every=0.01)
    assert req.finish_reason == "abandoned"


def test_state_capacity_and_draining_follow_the_driver(api) -> None:
    queue, _, url, state = api
    state[0] = "recovering"
    wait_for("health to follow", lambda: httpx.get(url + "/health", timeout=5).status_code == 503, timeout=5, every=0.02)
    queue.close("replica 0 is draining: node b is leaving")
    wait_for("the refusal", lambda: httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=5).status_code
             == 503, timeout=5, every=0.02)
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=5)
    assert "node b is leaving" in r.json()["error"]["message"] and r.headers["retry-after"] == "1"
    queue.reopen()
    wait_for("reopened", lambda: api[1].stats()[2] is None, timeout=5)
    bad = httpx.post(url + "/v1/completions", json={"prompt": [999999]}, timeout=5)
    assert bad.status_code == 400 and "token id 999999 outside the vocabulary" in bad.json()["error"]["message"]
    assert queue.waiting == 0  # refused in the API process: nothing reached the driver


def test_the_api_process_exits_when_its_driver_is_killed(model_dir: str) -> None:
    """SIGKILL the process that started it: its socket closes, and the API process ends at once,
    so its streams end too (the gateway resumes them on a serving driver)."""
    code = (f"import sys, time; from rallypoint.worker.api_link import ApiProcess, ServeSpec; "
            f"from rallypoint.worker.requests import RequestQueue; "
            f"p = ApiProcess(RequestQueue(), {model_dir!r}, 320, 'm', lambda: ('serving', 1)); "
            f"print(p.proc.pid, p.serve(ServeSpec('127.0.0.1', 0, 128, 0.0, 0.0, 8)), flush=True); time.sleep(60)")
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = "0"
    try:
        pid, url = driver.stdout.readline().split()  # type: ignore[union-attr]
        child = psutil.Process(int(pid))
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # queued in the backlog until it serves
        assert child.cmdline()[0].startswith(f"rallypoint api (worker pid {driver.pid})")  # what ps shows
        driver.send_signal(signal.SIGKILL)
        driver.wait(5)
        child.wait(5)  # raises TimeoutExpired if it lingers
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
    finally:
        driver.kill()
        driver.wait(5)
        if pid != "0":
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(int(pid)).kill()


def test_an_address_in_use_is_a_clear_error(model_dir: str) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    proc = ApiProcess(RequestQueue(), model_dir, 320, "m", lambda: ("serving", 1))
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            proc.serve(ServeSpec("127.0.0.1", port, 128, 0.0, 0.0, 8))
    finally:
        proc.close()
        taken.close()


def test_the_drivers_queue_has_the_last_word_on_admission(model_dir: str) -> None:
    """The API process admits by what the driver last reported; the driver's own queue answers each
    request, so one it refuses (full, or draining since) is a 503 with Retry-After, never a 500."""
    queue = RequestQueue(capacity=1)
    proc = ApiProcess(queue, model_dir, 320, "m", lambda: ("serving", 1))
    try:
        url = proc.serve(ServeSpec("127.0.0.1", 0, 128, 0.0, 0.0, 8))  # the API process would take 8
        with httpx.Client(timeout=10) as client, client.stream(
                "POST", url + "/v1/completions", json={"prompt": [5], "max_tokens": 5, "stream": True}) as first:
            assert first.status_code == 200 and queue.waiting == 1  # answered: it is in the driver's queue
            r = client.post(url + "/v1/completions", json={"prompt": [6], "max_tokens": 5})
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert "queue full" in r.json()["error"]["message"] and queue.waiting == 1
        wait_for("the refusal counted once", lambda: 'rallypoint_requests_total{outcome="rejected"} 1.0'
                 in httpx.get(url + "/metrics", timeout=5).text, timeout=5, every=0.02)
    finally:
        proc.close()
