"""The gateway's failure paths against stand-in upstreams (real ASGI servers): no serving driver,
a driver that dies and never comes back mid-stream, a body over the limit."""

from __future__ import annotations

import json

import httpx

from rallypoint.gateway import server as gateway_server
from rallypoint.gateway.server import Gateway
from tests.unit.gateway.test_resume import ANSWER, servers  # noqa: F401 (the fixture)


def gateway(upstreams, outcomes: list[str], timeout: float = 0.5) -> Gateway:
    return Gateway("127.0.0.1", 0, upstreams, timeout, model="m", on_request=outcomes.append).serve_in_thread()


def test_no_serving_driver_is_a_503_with_retry_after() -> None:
    outcomes: list[str] = []
    gw = gateway(list, outcomes)
    try:
        for stream in (False, True):
            r = httpx.post(gw.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": stream},
                           timeout=10)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "no upstream finished the request within 0.5s" in r.json()["error"]["message"]
        assert outcomes == ["unavailable", "unavailable"]
    finally:
        gw.stop()


def test_a_driver_lost_mid_stream_ends_the_stream_with_an_error_chunk(servers) -> None:  # noqa: F811
    dying = servers(die_after=3)
    outcomes: list[str] = []
    gw = gateway(lambda: [dying.url], outcomes)
    try:
        r = httpx.post(gw.url + "/v1/completions", json={"prompt": "x", "max_tokens": 8, "stream": True}, timeout=10)
        events = [x[6:] for x in r.text.split("\n\n") if x.startswith("data: ")]
        chunks = [json.loads(e) for e in events[:-1]]
        assert events[-1] == "[DONE]"
        assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == ANSWER[:3]  # what did arrive
        assert chunks[-1]["choices"][0]["finish_reason"] == "error"
        assert "3 token(s) delivered" in chunks[-1]["error"]["message"]
        assert len({c["id"] for c in chunks}) == 1 and outcomes == ["failed"]
    finally:
        gw.stop()


def test_a_body_over_one_mib_is_refused_before_it_is_read() -> None:
    outcomes: list[str] = []
    gw = gateway(list, outcomes)
    try:
        r = httpx.post(gw.url + "/v1/completions", content=b"x" * ((1 << 20) + 1),
                       headers={"Content-Type": "application/json"}, timeout=10)
        assert r.status_code == 413 and "over 1 MiB" in r.json()["error"]["message"] and outcomes == []
    finally:
        gw.stop()


def test_a_silent_upstream_keeps_the_clients_stream_alive_with_comments(servers, monkeypatch) -> None:  # noqa: F811
    """An upstream that pauses 1.2 s between tokens but sends keepalive comments meanwhile (as a
    driver's API does): the gateway relays a comment after each ``HEARTBEAT_EVERY`` without a
    chunk, every token arrives, and no read timeout fires."""
    monkeypatch.setattr(gateway_server, "HEARTBEAT_EVERY", 0.3)
    slow = servers(pause=1.2, keepalive=0.2)
    outcomes: list[str] = []
    gw = gateway(lambda: [slow.url], outcomes, timeout=10)
    try:
        r = httpx.post(gw.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True}, timeout=20)
        events = r.text.split("\n\n")
        chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
        assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == ANSWER[:4]
        assert events.count(": keepalive") >= 3 and outcomes == ["completed"]
    finally:
        gw.stop()
