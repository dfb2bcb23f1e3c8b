"""worker.disaggregation without a prefill replica: which requests the decode side takes, that
every way of failing sends the request back to be prefilled locally, once, and how a transfer
that does not end is given up (``abandonable``)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from rallypoint.errors import EtcdUnavailable
from rallypoint.testing.daemons import wait_for
from rallypoint.worker.disaggregation import Peer, RemotePrefill, abandonable
from rallypoint.worker.kv_transfer import TransferError
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


def test_unreachable_etcd_while_looking_up_prefill_replicas_sends_the_request_back() -> None:
    def peers() -> list[Peer]:
        raise EtcdUnavailable("etcd at 127.0.0.1:1 unavailable")

    woke, counts = threading.Event(), {}
    rp = RemotePrefill(1, 3, None, None, peers, min_tokens=4, wake=woke.set, counts=counts)  # type: ignore[arg-type]
    r = Request([1, 2, 3, 4], SamplingParams())
    rp.start(r)
    wait_for("the request back", lambda: list(rp.back))
    assert counts["prefill_fallbacks"] == 1
    rp.close()


def _group(aborted: str | None = None) -> SimpleNamespace:
    """What ``abandonable`` reads of a group (a stand-in: the transfer itself is faked here)."""
    return SimpleNamespace(aborted_reason=aborted, device=torch.device("cpu"), label="dp[0,1]@g3")


def test_a_transfer_finished_in_time_returns_its_result_and_its_error_propagates() -> None:
    assert abandonable(lambda: 7, _group(), "a transfer") == 7  # type: ignore[arg-type]

    def broken() -> int:
        raise TransferError("peer lost")
    with pytest.raises(TransferError, match="peer lost"):
        abandonable(broken, _group(), "a transfer")  # type: ignore[arg-type]


def test_a_transfer_is_given_up_when_its_group_is_aborted_and_what_it_brings_later_is_freed() -> None:
    """gloo's abort does not wake a blocked receive: the waiting thread gives up instead, and the
    receive that finishes later hands its entry to ``late``."""
    group, release, freed = _group(), threading.Event(), []

    def blocked() -> str:
        release.wait(10)
        return "entry"

    threading.Timer(0.05, lambda: setattr(group, "aborted_reason", "rank 0 exited")).start()
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="aborted: rank 0 exited"):
        abandonable(blocked, group, "receiving the KV", late=freed.append)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 2
    release.set()
    wait_for("the late entry freed", lambda: freed == ["entry"])


def test_a_transfer_is_given_up_at_its_limit() -> None:
    release = threading.Event()
    with pytest.raises(TransferError, match="no end after 0.1s"):
        abandonable(lambda: release.wait(10), _group(), "sending the KV", limit=0.1)  # type: ignore[arg-type]
    release.set()
