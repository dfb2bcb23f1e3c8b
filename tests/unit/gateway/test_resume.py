"""The resume loop against stand-in upstreams that break mid-stream, refuse, or reject; and the
choice of drivers from node statuses (pure logic)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rallypoint.api.responses import DONE, KEEPALIVE, sse
from rallypoint.api.server import ServerThread
from rallypoint.gateway.resume import NoUpstream, Progress, RequestRejected
from rallypoint.gateway.resume import stream_completion as stream_async
from rallypoint.gateway.routes import serving_drivers


def stream_completion(*args: Any, **kw: Any) -> list[dict[str, Any]]:
    """Every chunk of the async resume loop, collected on an event loop of its own."""
    async def collect() -> list[dict[str, Any]]:
        return [c async for c in stream_async(*args, **kw)]
    return asyncio.run(collect())

ANSWER = list(range(100, 112))  # the "model": token i of every completion is 100 + i


class Upstream:
    """Streams ANSWER from where ``resume_tokens`` left off; ``die_after`` tokens, then the
    connection breaks mid-stream (a dead driver); ``status`` answers every request with that code
    instead. A real ASGI server on a free port."""

    def __init__(self, die_after: int | None = None, status: int | None = None, pause: float = 0.0,
                 keepalive: float = 0.0) -> None:
        self.die_after, self.status, self.bodies = die_after, status, []
        self.pause, self.keepalive = pause, keepalive  # seconds between tokens; a comment this often meanwhile
        app = Starlette(routes=[Route("/v1/completions", self.completions, methods=["POST"])])
        self.server = ServerThread(app, "127.0.0.1", 0, name="stand-in-upstream").start()
        self.url = self.server.url

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        if self.status:
            return JSONResponse({"error": {"message": f"said {self.status}"}}, status_code=self.status)
        start = len(body.get("resume_tokens", []))
        assert body.get("resume_tokens", []) == ANSWER[:start]

        async def events() -> AsyncIterator[bytes]:
            for i in range(start, body["max_tokens"]):
                if self.die_after is not None and i >= self.die_after:
                    raise ConnectionAbortedError("the driver died")  # the stream stops mid-way
                finish = "length" if i == body["max_tokens"] - 1 else None
                if i > start and self.pause:
                    waited = 0.0
                    while waited < self.pause:
                        step = min(self.keepalive or self.pause, self.pause - waited)
                        await asyncio.sleep(step)
                        waited += step
                        if self.keepalive:
                            yield KEEPALIVE
                yield sse({"choices": [{"text": f"<{ANSWER[i]}>", "token_ids": [ANSWER[i]], "finish_reason": finish}]})
            yield DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def servers():
    made: list[Upstream] = []

    def make(**kw: Any) -> Upstream:
        made.append(Upstream(**kw))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def test_a_stream_that_breaks_goes_on_at_the_next_upstream(servers) -> None:
    dying, healthy = servers(die_after=5), servers()
    p = Progress()
    chunks = (stream_completion({"prompt": "x", "max_tokens": 12}, lambda: [dying.url, healthy.url], 5, progress=p))
    assert p.tokens == ANSWER and [t for c in chunks for t in c["choices"][0]["token_ids"]] == ANSWER
    assert p.text == "".join(f"<{t}>" for t in ANSWER) and p.finish_reason == "length"
    assert p.resumes == 1 and p.upstreams == [dying.url, healthy.url]
    assert healthy.bodies[0]["resume_tokens"] == ANSWER[:5] and healthy.bodies[0]["stream"] is True


def test_refusals_are_waited_out_and_a_rejection_is_final(servers) -> None:
    busy, healthy = servers(status=503), servers()
    calls = []

    def upstreams() -> list[str]:
        calls.append(1)
        return [busy.url] if len(calls) < 3 else [busy.url, healthy.url]  # a driver appears later

    p = Progress()
    (stream_completion({"prompt": "x", "max_tokens": 4}, upstreams, 5, progress=p))
    assert p.tokens == ANSWER[:4] and len(busy.bodies) >= 2 and "resume_tokens" not in healthy.bodies[0]
    bad = servers(status=400)
    with pytest.raises(RequestRejected, match="said 400") as info:
        (stream_completion({"prompt": "x", "max_tokens": 4}, lambda: [bad.url, healthy.url], 5))
    assert info.value.status == 400 and len(bad.bodies) == 1


def test_no_upstream_in_time_says_what_was_delivered(servers) -> None:
    dying = servers(die_after=3)
    p = Progress()
    with pytest.raises(NoUpstream, match=r"within 0.5s \(3 token\(s\) delivered; last error: .*127.0.0.1"):
        (stream_completion({"prompt": "x", "max_tokens": 8}, lambda: [dying.url], 0.5, progress=p))
    assert p.tokens == ANSWER[:3]
    with pytest.raises(NoUpstream, match="no upstream known"):
        (stream_completion({"prompt": "x", "max_tokens": 8}, list, 0.3))


def test_resume_tokens_from_the_caller_are_not_delivered_again(servers) -> None:
    healthy = servers()
    p = Progress()
    chunks = (stream_completion({"prompt": "x", "max_tokens": 6, "resume_tokens": ANSWER[:4]},
                                    lambda: [healthy.url], 5, progress=p))
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == ANSWER[4:6] and p.tokens == ANSWER[:6]


def test_serving_drivers_newest_generation_local_first_then_least_busy() -> None:
    def w(gen, state="serving", driver=True, api="u", in_flight=0, process="running"):
        return {"gen": gen, "state": state, "driver": driver, "api": api, "in_flight": in_flight, "process": process}

    statuses = {
        "a": {"workers": [w(2, api="http://a", in_flight=5), w(2, driver=False, api=None)]},
        "b": {"workers": [w(2, api="http://b", in_flight=1)]},
        "c": {"workers": [w(2, api="http://c", in_flight=0), w(1, api="http://old")]},
        "d": {"workers": [w(2, state="recovering", api="http://d"), w(2, api="http://stopped", process="stopped")]},
    }
    assert serving_drivers(statuses, "b") == ["http://b", "http://c", "http://a"]
    assert serving_drivers(statuses, "z") == ["http://c", "http://b", "http://a"]
    assert serving_drivers({"x": {"workers": [w(1, state="recovering")]}}, "x") == []


def test_serving_drivers_leave_prefill_replicas_to_the_decode_replicas_unless_none_decodes() -> None:
    def w(api, role, in_flight=0):
        return {"gen": 3, "state": "serving", "driver": True, "api": api, "in_flight": in_flight, "role": role}

    statuses = {"a": {"workers": [w("http://p", "prefill"), w("http://d1", "decode", 4)]},
                "b": {"workers": [w("http://d2", "decode", 1)]}}
    assert serving_drivers(statuses, "a") == ["http://d1", "http://d2"]
    only_prefill = {"a": {"workers": [w("http://p", "prefill")]}}
    assert serving_drivers(only_prefill, "a") == ["http://p"]  # colocated fallback: someone serves
