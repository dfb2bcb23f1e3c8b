"""A prefilled request's KV cache moved between two rank processes (worker/kv_transfer.py; the
building block of disaggregated prefill/decode): two real rank processes on gloo, two replicas
of the tiny model (TP=1, DP=2), the transfer over their DP group. The decode side's tokens equal
what the prefill side decodes itself after the same prefill (colocated), with the KV placed in
another cache row; a prefill side SIGKILLed before it sends makes the receiver give up within the
collectives' deadline, with nothing left in its buffer."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rallypoint.rendezvous.records import Plan, RankSlot
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.testing.ranks import RankPool, RankProcess
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.kv_transfer import KVBuffer, KVEntry, TransferError, send
from tests.integration.test_model_parallel import run_all

PROMPT = [256, 84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110]  # 16 positions
STEPS = 12
_gens = itertools.count(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=2)


@pytest.fixture(scope="module")
def pool(etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RankPool]:
    p = RankPool(etcd.endpoints, f"kv-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("ranks"),
                 deadline_floor=2.0, module="rallypoint.testing.model_agent")
    yield p
    p.close()


def two_replicas(pool: RankPool, ckpt: Path) -> list[RankProcess]:
    """Two rank processes, each a TP=1 replica holding the whole model; their DP group links them."""
    gen = next(_gens)
    seats = [(f"kv{gen}p", 0), (f"kv{gen}d", 0)]
    plan = Plan(gen=gen, tp=1, pp=1, dp=2, ranks=tuple(RankSlot(i, s, lr) for i, (s, lr) in enumerate(seats)),
                members=tuple(sorted(s for s, _ in seats)), reason="test", leader="test")
    procs = pool.take(2)
    run_all(procs, "configure", [{"node": s, "local_rank": lr} for s, lr in seats], plan=json.loads(plan.to_json()))
    run_all(procs, "load", ckpt=str(ckpt))
    return procs


def test_decode_after_a_transfer_gives_the_colocated_tokens(pool: RankPool, ckpt: Path) -> None:
    prefill, decode = two_replicas(pool, ckpt)
    got = decode.send("kv_receive_decode", src=0, row=3, max_seq=64, steps=STEPS)
    sent = prefill.send("kv_prefill_send", prompt=PROMPT, dst=1, rid="cmpl-kv1", max_seq=64, steps=STEPS)
    colocated, moved = prefill.result(sent, timeout=60), decode.result(got, timeout=60)
    assert colocated["ok"] and moved["ok"], (colocated, moved)
    assert moved["rid"] == "cmpl-kv1" and moved["length"] == len(PROMPT)
    assert moved["tokens"] == colocated["tokens"] and len(moved["tokens"]) == STEPS + 1
    assert moved["buffered"] == 0 and moved["freed"]["taken"] == 1  # handed to the engine, nothing left


def test_a_prefill_side_killed_before_it_sends_frees_the_entry_within_the_deadline(pool: RankPool,
                                                                                  ckpt: Path) -> None:
    prefill, decode = two_replicas(pool, ckpt)
    waiting = decode.send("kv_receive_decode", src=0, row=0, max_seq=64, steps=STEPS)
    prefill.kill()  # SIGKILL: no transfer will come
    out = decode.result(waiting, timeout=60)
    assert out["ok"] and "KV transfer from rank 0 broke off (before its header)" in out["error"], out
    assert out["buffered"] == 0 and out["seconds"] < 30  # the collectives' deadline, not a 480 s timeout


# -- the buffer's bookkeeping (pure logic) ---------------------------------------------------------

def test_every_entry_leaves_the_buffer_exactly_once() -> None:
    buf = KVBuffer(ttl=5.0)
    for rid, peer in (("a", 0), ("b", 0), ("c", 1), ("d", 1)):
        buf.entries[rid] = KVEntry(rid, peer, complete=rid != "d", since=100.0)
    assert buf.take("a").rid == "a" and len(buf) == 3
    with pytest.raises(TransferError, match="no complete KV for request a"):
        buf.take("a")  # taken already: the engine owns it
    with pytest.raises(TransferError, match="no complete KV for request d"):
        buf.take("d")  # still filling
    assert buf.drop_from([1]) == ["c", "d"]  # its prefill rank died: prefill them elsewhere
    assert buf.expire(now=104.0) == [] and buf.expire(now=106.0) == ["b"]
    assert len(buf) == 0 and buf.freed == {"taken": 1, "failed": 0, "peer_died": 2, "expired": 1}
    assert not buf.drop("b", "failed")  # freed once only


class ScriptedComm:
    """Plays back a sender's messages, then fails as a lost peer does (pure logic: the buffer's
    side of a transfer that breaks off mid-way; the real peer death is the test above)."""

    def __init__(self, messages: list[dict[str, torch.Tensor]]) -> None:
        self.messages = messages

    def send_dict(self, tensors: dict[str, torch.Tensor], dst: int, group: str = "pp") -> None:
        self.messages.append(tensors)

    def recv_dict(self, src: int, group: str = "pp") -> dict[str, torch.Tensor]:
        if not self.messages:
            raise RuntimeError("Connection closed by peer")
        return self.messages.pop(0)


def test_a_transfer_broken_off_mid_way_frees_what_arrived_and_says_how_far_it_got() -> None:
    layers = [(torch.ones(2, 5, 4), torch.zeros(2, 5, 4))] * 3
    sent = ScriptedComm([])
    send(sent, 1, "cmpl-x", layers, first_token=9)
    buf = KVBuffer()
    with pytest.raises(TransferError, match=r"broke off \(request cmpl-x, 2 layer\(s\) received\): Connection closed"):
        buf.receive(ScriptedComm(sent.messages[:3]), src=0)  # the header and 2 of the 3 layers
    assert len(buf) == 0 and buf.freed["failed"] == 1
    whole = buf.receive(ScriptedComm(list(sent.messages)), src=0)
    assert (whole.rid, whole.first_token, whole.length, whole.complete) == ("cmpl-x", 9, 5, True)
    with pytest.raises(TransferError, match=r"broke off \(before its header\)"):
        buf.receive(ScriptedComm([{"meta": torch.tensor([1, 2])}]), src=0)  # no request id: not a header
    assert list(buf.entries) == ["cmpl-x"]
