"""worker.disaggregation's decode side, without a prefill replica: which requests it takes, and
that every way of failing sends the request back to be prefilled locally, once."""

from __future__ import annotations

import threading

from rallypoint.testing.daemons import wait_for
from rallypoint.worker.disaggregation import Peer, RemotePrefill
from rallypoint.worker.requests import Request, SamplingParams


def remote(peers: list[Peer]) -> tuple[RemotePrefill, threading.Event, dict[str, int]]:
    woke, counts = threading.Event(), {}
    # no transfer is ever received here: the collectives and the group are not needed
    return RemotePrefill(1, 3, None, None, lambda: peers, min_tokens=4, wake=woke.set, timeout=5,  # type: ignore[arg-type]
                         counts=counts), woke, counts


def test_only_new_requests_with_long_prompts_go_to_a_prefill_replica() -> None:
    rp, _, _ = remote([])
    assert rp.wants(Request([1, 2, 3, 4], SamplingParams()))
    assert not rp.wants(Request([1, 2, 3], SamplingParams()))  # short: prefilled where it decodes
    resumed = Request([1, 2, 3, 4], SamplingParams(max_tokens=8))
    resumed.resume_from([9])
    assert not rp.wants(resumed)  # resumed after a failure: prefilled locally
    rp.close()


def test_no_prefill_replica_sends_the_request_back_once() -> None:
    rp, woke, counts = remote([])
    r = Request([1, 2, 3, 4], SamplingParams())
    rp.start(r)
    assert rp.in_progress
    wait_for("the request back", lambda: list(rp.back))
    assert woke.is_set() and counts["prefill_fallbacks"] == 1
    assert not rp.wants(r)  # it falls back for good
    assert rp.close() == [r] and not rp.back


def test_a_prefill_replica_that_is_gone_sends_the_request_back() -> None:
    rp, _, counts = remote([Peer(0, "http://127.0.0.1:9")])  # nothing listens on the discard port
    r = Request([1, 2, 3, 4], SamplingParams())
    rp.start(r)
    wait_for("the request back", lambda: list(rp.back))
    assert counts["prefill_fallbacks"] == 1 and counts["kv_received"] == counts["kv_freed"] == 0
    rp.close()
