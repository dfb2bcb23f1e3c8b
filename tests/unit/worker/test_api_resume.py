"""A resumed request whose tokens already complete it: the replica's API finishes it at once.

A driver can die after the last token reached the client but before the end of the stream; the
gateway then re-sends the request with every token as ``resume_tokens``. That is a finished
request, not a bad one. (In-process HTTP server and the tiny checkpoint's tokenizer, no model:
nothing may reach the queue.)"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from rallypoint.testing.daemons import wait_for
from rallypoint.worker.api import ApiServer, Frontend
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.requests import RequestQueue
from rallypoint.worker.tokenizer import load_tokenizer


@pytest.fixture
def api(tmp_path):
    tok = load_tokenizer(make_model(tmp_path / "m", "tiny"))
    fe = Frontend(queue=RequestQueue(), tokenizer=tok, vocab_size=320, state=lambda: ("serving", 3), model="m")
    server = ApiServer(fe).serve_in_thread()
    yield server, fe, tok
    server.stop()


def post(url: str, body: dict) -> tuple[int, list[dict]]:
    r = httpx.post(url + "/v1/completions", json=body, timeout=10)
    if body.get("stream") and r.status_code == 200:
        return r.status_code, [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    return r.status_code, [r.json()]


@pytest.mark.parametrize("stream", [True, False])
def test_all_max_tokens_delivered_finishes_with_length(api, stream: bool) -> None:
    server, fe, tok = api
    status, chunks = post(server.url, {"prompt": "hi", "max_tokens": 4, "resume_tokens": [104, 105, 33, 33],
                                       "stream": stream})
    assert status == 200 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    if stream:
        assert all(c["choices"][0]["token_ids"] == [] for c in chunks)  # nothing generated again
    else:
        assert chunks[0]["choices"][0]["token_ids"] == [104, 105, 33, 33]
    assert fe.queue.waiting == 0 and fe.queue.counts.get("accepted", 0) == 0


def test_an_end_of_sequence_delivered_finishes_with_stop(api) -> None:
    server, fe, tok = api
    eos = min(tok.eos_ids)
    status, chunks = post(server.url, {"prompt": "hi", "max_tokens": 8, "resume_tokens": [104, eos],
                                       "stream": True})
    assert status == 200 and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert fe.queue.waiting == 0


def test_more_resume_tokens_than_max_tokens_is_a_clear_400(api) -> None:
    server, fe, _ = api
    status, body = post(server.url, {"prompt": "hi", "max_tokens": 2, "resume_tokens": [1, 2, 3]})
    assert status == 400 and "3 token(s) are more than max_tokens (2)" in body[0]["error"]["message"]
    assert fe.queue.waiting == 0


def test_a_client_that_hangs_up_cancels_its_request(api) -> None:
    """A client gone (the gateway resuming elsewhere, a user's Ctrl-C) must not keep a cache row:
    its request ends, and the driver frees the row at its next step."""
    server, fe, _ = api
    with httpx.Client(timeout=10) as client, client.stream("POST", server.url + "/v1/completions",
                       json={"prompt": "hang up", "max_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200
        req = fe.queue.take(1, timeout=5)[0]  # what a driver would run
        assert not req.done
    wait_for("the hung-up request to end", lambda: req.done, timeout=10, every=0.01)
    assert req.finish_reason == "abandoned"


def test_a_stream_interval_sends_fewer_larger_chunks_and_every_token(tmp_path) -> None:
    """With ``stream_interval`` the tokens of the steps made while a chunk waits go out together;
    none is lost or reordered, and the first token is not held."""
    tok = load_tokenizer(make_model(tmp_path / "m", "tiny"))
    fe = Frontend(queue=RequestQueue(), tokenizer=tok, vocab_size=320, state=lambda: ("serving", 3), model="m",
                  stream_interval=0.05)
    server = ApiServer(fe).serve_in_thread()
    try:
        def engine() -> None:  # a driver committing a token every 2 ms
            req = fe.queue.take(1, timeout=5)[0]
            for t in range(40):
                req.pending.append(100 + t)
                req.commit()
                time.sleep(0.002)

        threading.Thread(target=engine, daemon=True).start()
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 40, "stream": True},
                       timeout=10)
        chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        tokens = [t for c in chunks for t in c["choices"][0]["token_ids"]]
        assert tokens == list(range(100, 140)) and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[0]["choices"][0]["token_ids"] == [100]  # the first token at once
        assert len(chunks) < 10, len(chunks)  # 40 tokens in 80 ms, a chunk at most every 50 ms
    finally:
        server.stop()


def test_the_hold_after_a_chunk_grows_with_the_open_streams() -> None:
    """``max_chunk_rate``: one stream is never held; n streams wait n / rate; stream_interval is a floor."""
    fe = Frontend(queue=RequestQueue(), tokenizer=None, vocab_size=1, state=lambda: ("serving", 1),  # type: ignore[arg-type]
                  max_chunk_rate=10000.0)
    fe.streams = 1
    assert fe.hold() == 0.0  # 0.1 ms: not worth a timer
    fe.streams = 256
    assert fe.hold() == pytest.approx(0.0256)
    fe.stream_interval = 0.05
    assert fe.hold() == 0.05
    fe.max_chunk_rate, fe.stream_interval = 0.0, 0.0
    assert fe.hold() == 0.0


def test_many_open_streams_get_fewer_larger_chunks_and_every_token(tmp_path) -> None:
    """With ``max_chunk_rate`` and many streams open, each stream's chunks carry several tokens,
    and every token still arrives in order."""
    tok = load_tokenizer(make_model(tmp_path / "m", "tiny"))
    fe = Frontend(queue=RequestQueue(), tokenizer=tok, vocab_size=320, state=lambda: ("serving", 3), model="m",
                  max_chunk_rate=400.0)  # 8 streams: a chunk every 20 ms at most per stream
    server = ApiServer(fe).serve_in_thread()
    n = 8
    try:
        def engine() -> None:  # a driver committing a token to every request every 2 ms
            reqs: list = []
            while len(reqs) < n:
                reqs += fe.queue.take(n - len(reqs), timeout=5)
            for t in range(40):
                for req in reqs:
                    req.pending.append(100 + t)
                    req.commit()
                time.sleep(0.002)

        threading.Thread(target=engine, daemon=True).start()
        out: list[list[dict]] = [[] for _ in range(n)]

        def client(i: int) -> None:
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 40, "stream": True},
                           timeout=10)
            out[i] = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]

        clients = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(15)
        for chunks in out:
            assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == list(range(100, 140))
            assert len(chunks) < 20, len(chunks)  # 40 tokens in ~80 ms: several per chunk
        assert fe.streams == 0
    finally:
        server.stop()


def test_a_silent_stream_sends_keepalive_comments_and_every_token(tmp_path) -> None:
    """A stream with no token for ``keepalive`` seconds (queued, a long prefill, a recovery) gets
    an SSE comment each time, so a reader can keep a short read timeout; the tokens are intact."""
    tok = load_tokenizer(make_model(tmp_path / "m", "tiny"))
    fe = Frontend(queue=RequestQueue(), tokenizer=tok, vocab_size=320, state=lambda: ("serving", 3), model="m",
                  keepalive=0.05)
    server = ApiServer(fe).serve_in_thread()
    try:
        def engine() -> None:  # the first token after 0.3 s, the second after 0.3 s more
            req = fe.queue.take(1, timeout=5)[0]
            for t in range(2):
                time.sleep(0.3)
                req.pending.append(100 + t)
                req.commit()

        threading.Thread(target=engine, daemon=True).start()
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True},
                       timeout=10)
        events = r.text.split("\n\n")
        chunks = [json.loads(x[6:]) for x in events if x.startswith("data: {")]
        assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == [100, 101]
        first_token = next(i for i, x in enumerate(events) if x.startswith("data: {"))
        before, between = events[:first_token], events[first_token + 1:first_token + 1 + 10]
        assert sum(x == ": keepalive" for x in before) >= 3  # 0.3 s of silence, one every 0.05 s
        assert any(x == ": keepalive" for x in between)
    finally:
        server.stop()


@pytest.mark.parametrize("body,why", [
    ({"kv_to": 1}, "kv_to and kv_gen: give both or neither"),
    ({"kv_to": 1, "kv_gen": 2, "max_tokens": 4}, "a prefill for another replica takes max_tokens 1"),
    ({"kv_to": 1, "kv_gen": 2, "max_tokens": 1, "stream": True}, "a prefill for another replica takes max_tokens 1"),
    ({"kv_to": -1, "kv_gen": 2, "max_tokens": 1}, "kv_to"),
])
def test_a_malformed_prefill_request_is_refused_by_name(api, body, why) -> None:
    server, fe, _ = api
    status, (got,) = post(server.url, {"prompt": [5, 6, 7], **body})
    assert status == 400 and why in got["error"]["message"], got
    assert fe.queue.waiting == 0


def test_a_prefill_request_reaches_the_queue_with_where_its_kv_goes(api) -> None:
    server, fe, _ = api
    threading.Thread(target=post, args=(server.url, {"prompt": [5, 6, 7], "max_tokens": 1, "kv_to": 1, "kv_gen": 4}),
                     daemon=True).start()
    wait_for("the request queued", lambda: fe.queue.waiting)
    (req,) = fe.queue.take(1)
    assert (req.kv_to, req.kv_gen, req.prompt, req.params.max_tokens) == (1, 4, [5, 6, 7], 1)
    req.fail("test over")
