"""A process that stops driving a replica ends every request it holds or queued, so the gateway
resumes each elsewhere, and refuses new ones. (In-process API server and driver, no model.)"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import torch

from rallypoint.worker.api import ApiServer, Frontend
from rallypoint.worker.checkpoint import ByteTokenizer
from rallypoint.worker.engine import Driver, EngineSettings
from rallypoint.worker.requests import Request, RequestQueue, SamplingParams


def test_held_and_queued_requests_end_with_an_error_and_new_ones_are_refused() -> None:
    tok = ByteTokenizer()
    queue = RequestQueue()
    fe = Frontend(queue=queue, encode=tok.encode, decode=tok.decode, vocab_size=tok.vocab_size,
                  state=lambda: ("serving", 4), eos=tok.eos_id)
    server = ApiServer(fe)
    server.serve_in_thread()
    try:
        driver = Driver(queue, EngineSettings(max_batch=2, max_seq=64, eos=tok.eos_id), torch.device("cpu"))
        held = queue.submit(Request(tok.encode("held"), SamplingParams(max_tokens=8)))
        driver.plan()  # takes it into a row
        held.pending.append(7)
        held.commit(tok.eos_id)  # one token reached the client
        queued = queue.submit(Request(tok.encode("queued"), SamplingParams(max_tokens=8)))
        streamed: list[dict] = []

        def stream() -> None:  # a third request, streaming over HTTP while the driver is idle
            req = urllib.request.Request(server.url + "/v1/completions",
                                         json.dumps({"prompt": "s", "max_tokens": 4, "stream": True}).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                streamed.extend(json.loads(x[6:]) for x in r.read().decode().split("\n\n") if x.startswith("data: {"))

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 10
        while queue.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.waiting == 2
        driver.hold()  # the generation switched; this seat does not drive in the next
        moved = driver.hand_off("a/0 does not drive a replica in generation 5")
        t.join(timeout=10)
        assert {r.id for r in moved} >= {held.id, queued.id} and len(moved) == 3
        assert all(r.finish_reason == "error" and "handed off: a/0 does not drive" in (r.error or "") for r in moved)
        assert held.committed == [7]  # what was delivered stays: the gateway resumes from it
        assert streamed[-1]["choices"][0]["finish_reason"] == "error"
        assert not driver.busy and not queue.in_flight and queue.counts["handed_off"] == 3
        req = urllib.request.Request(server.url + "/v1/completions", json.dumps({"prompt": "x"}).encode(),
                                     {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("a request was accepted by a process that drives nothing")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and "does not drive a replica in generation 5" in exc.read().decode()
    finally:
        server.shutdown()
        server.server_close()
