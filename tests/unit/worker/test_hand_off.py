"""A process that stops driving a replica ends every request it holds or queued, so the gateway
resumes each elsewhere, and refuses new ones. (In-process API server and driver, no model.)"""

from __future__ import annotations

import json
import threading

import httpx
import torch

from rallypoint.testing.daemons import wait_for
from rallypoint.worker.api import ApiServer, Frontend
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.engine import Driver, EngineSettings
from rallypoint.worker.requests import Request, RequestQueue, SamplingParams
from rallypoint.worker.tokenizer import load_tokenizer


def test_held_and_queued_requests_end_with_an_error_and_new_ones_are_refused(tmp_path) -> None:
    tok = load_tokenizer(make_model(tmp_path / "m", "tiny"))
    queue = RequestQueue()
    fe = Frontend(queue=queue, tokenizer=tok, vocab_size=320, state=lambda: ("serving", 4), model="m")
    server = ApiServer(fe).serve_in_thread()
    try:
        driver = Driver(queue, EngineSettings(max_batch=2, max_seq=64), torch.device("cpu"))
        held = queue.submit(Request(tok.encode("held"), SamplingParams(max_tokens=8), eos=tok.eos_ids))
        driver.plan()  # takes it into a row
        held.pending.append(7)
        held.commit()  # one token reached the client
        queued = queue.submit(Request(tok.encode("queued"), SamplingParams(max_tokens=8), eos=tok.eos_ids))
        streamed: list[dict] = []

        def stream() -> None:  # a third request, streaming over HTTP while the driver is idle
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "s", "max_tokens": 4, "stream": True},
                           timeout=10)
            streamed.extend(json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {"))

        t = threading.Thread(target=stream)
        t.start()
        wait_for("the streamed request to be queued", lambda: queue.waiting >= 2, timeout=10, every=0.01)
        assert queue.waiting == 2
        driver.hold()  # the generation switched; this seat does not drive in the next
        moved = driver.hand_off("a/0 does not drive a replica in generation 5")
        t.join(timeout=10)
        assert {r.id for r in moved} >= {held.id, queued.id} and len(moved) == 3
        assert all(r.finish_reason == "error" and "handed off: a/0 does not drive" in (r.error or "") for r in moved)
        assert held.committed == [7]  # what was delivered stays: the gateway resumes from it
        assert streamed[-1]["choices"][0]["finish_reason"] == "error"
        assert not driver.busy and not queue.in_flight and queue.counts["handed_off"] == 3
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
        assert r.status_code == 503 and "does not drive a replica in generation 5" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
    finally:
        server.stop()
