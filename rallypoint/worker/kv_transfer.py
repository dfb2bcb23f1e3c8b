"""Moving a prefilled request's KV cache from a prefill worker to a decode worker.

Disaggregated serving prefills a long prompt on one replica and decodes it on another. What
moves is, per layer, the keys and values of the prompt's positions in the request's cache row,
plus the first token the prefill drew. Each layer goes as one ``Comm.send_dict`` (shapes first,
then the tensors), so every piece of the transfer runs under the collectives' deadlines: a
prefill side that dies or hangs mid-transfer makes the receiver raise within the deadline,
never wait out a 480 s timeout.

The decode side keeps what arrives in a ``KVBuffer`` keyed by request id. An entry has one owner
at a time: the buffer while it fills, then the decode engine, which ``take``s it (and it leaves the
buffer) to place it in a cache row (``place``). Every other way out frees it: a failed or aborted
transfer (``drop``), its prefill peer's death (``drop_from``), or nobody taking it in time
(``expire``). So a reader never sees KV the other side freed (it has its own copy), and nothing
is left behind when either side dies.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from rallypoint.errors import RallypointError
from rallypoint.worker.model import StageModel


class KVComm(Protocol):
    """The point-to-point pair of ``rallypoint.comm.collectives.Comm`` the transfer uses."""

    def send_dict(self, tensors: dict[str, torch.Tensor], dst: int, group: Any = "pp") -> None: ...

    def recv_dict(self, src: int, group: Any = "pp") -> dict[str, torch.Tensor]: ...


class TransferError(RallypointError):
    """A transfer could not be received whole (the message says which request and why)."""


def row_kv(stage: StageModel, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values of cache row ``row``'s first ``length`` positions
    (``[kv_heads, length, head_dim]`` each, copies)."""
    out = []
    for layer in stage.decoder_layers():
        cache = layer.self_attn.kv_cache
        assert cache is not None, "setup_cache first"
        out.append((cache.k[row, :, :length].clone(), cache.v[row, :, :length].clone()))
    return out


def place(stage: StageModel, row: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write received keys and values into cache row ``row`` (positions ``0..length-1``)."""
    caches = [layer.self_attn.kv_cache for layer in stage.decoder_layers()]
    if len(caches) != len(layers):
        raise TransferError(f"{len(layers)} layers of KV for a stage of {len(caches)}")
    for cache, (k, v) in zip(caches, layers):
        assert cache is not None, "setup_cache first"
        n = k.shape[1]
        cache.k[row, :, :n].copy_(k)
        cache.v[row, :, :n].copy_(v)


# Fault injection for the failure tests and the chaos suite: seconds a sender waits between two
# layers, so a test can kill it mid-transfer. Unset (0) in production.
SEND_DELAY_ENV = "RALLYPOINT_FAULT_KV_LAYER_DELAY"


def send(comm: KVComm, dst: int, rid: str, layers: list[tuple[torch.Tensor, torch.Tensor]], first_token: int,
         group: Any = "pp") -> None:
    """Send request ``rid``'s KV (``row_kv``) and its first token to rank-in-group ``dst``: a header,
    then one message per layer, each under the collectives' deadline."""
    delay = float(os.environ.get(SEND_DELAY_ENV) or 0)
    code = torch.frombuffer(bytearray(rid.encode()), dtype=torch.uint8)
    comm.send_dict({"rid": code, "meta": torch.tensor([len(layers), first_token], dtype=torch.int64)}, dst, group)
    for i, (k, v) in enumerate(layers):
        if delay and i:
            time.sleep(delay)
        comm.send_dict({"k": k, "v": v}, dst, group)


@dataclass
class KVEntry:
    """One request's KV on the decode side."""

    rid: str
    peer: int  # the prefill rank it comes from
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    first_token: int = -1
    complete: bool = False
    since: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[1]) if self.layers else 0


class KVBuffer:
    """The decode side's lookup buffer: request id -> ``KVEntry``, each freed exactly once."""

    def __init__(self, ttl: float = 30.0, counts: dict[str, int] | None = None) -> None:
        self.ttl = ttl
        self.entries: dict[str, KVEntry] = {}
        self.freed: dict[str, int] = {"taken": 0, "failed": 0, "peer_died": 0, "expired": 0}
        # kv_received and kv_freed, kept in ``counts`` (a replica's request counts: its metrics
        # show them, and that they are equal when nothing is left behind)
        self.counts = counts if counts is not None else {}
        for k in ("kv_received", "kv_freed"):
            self.counts.setdefault(k, 0)

    def __len__(self) -> int:
        return len(self.entries)

    def receive(self, comm: KVComm, src: int, group: Any = "pp") -> KVEntry:
        """Receive one transfer from rank-in-group ``src`` (``send``) into a new entry.

        Raises:
            TransferError: the transfer broke off (the peer died, a deadline passed, a malformed
                header); whatever had arrived is freed, and the error says how far it got.
        """
        entry: KVEntry | None = None
        try:
            head = comm.recv_dict(src, group)
            rid = bytes(head["rid"].tolist()).decode()
            n_layers, first = (int(x) for x in head["meta"].tolist())
            entry = self.entries[rid] = KVEntry(rid, src, first_token=first)
            self.counts["kv_received"] += 1
            for _ in range(n_layers):
                part = comm.recv_dict(src, group)
                entry.layers.append((part["k"], part["v"]))
            entry.complete = True
            return entry
        except (RallypointError, RuntimeError, KeyError, ValueError) as exc:  # a peer lost, an abort, a bad header
            got = f"request {entry.rid}, {len(entry.layers)} layer(s) received" if entry else "before its header"
            if entry is not None:
                self.drop(entry.rid, "failed")
            raise TransferError(f"KV transfer from rank {src} broke off ({got}): {exc}") from exc

    def take(self, rid: str) -> KVEntry:
        """Hand a complete entry to the decode engine (it leaves the buffer).

        Raises:
            TransferError: no complete entry for ``rid`` (never sent, broken off, or freed).
        """
        entry = self.entries.get(rid)
        if entry is None or not entry.complete:
            raise TransferError(f"no complete KV for request {rid}")
        del self.entries[rid]
        self.freed["taken"] += 1
        self.counts["kv_freed"] += 1
        return entry

    def drop(self, rid: str, why: str) -> bool:
        """Free ``rid``'s entry (``why``: failed, peer_died, expired); False when there was none."""
        if self.entries.pop(rid, None) is None:
            return False
        self.freed[why] = self.freed.get(why, 0) + 1
        self.counts["kv_freed"] += 1
        return True

    def drop_from(self, peers: Iterable[int]) -> list[str]:
        """Free every entry from these prefill ranks (they died): returns the request ids, which
        the caller prefills locally or sends to another prefill replica."""
        dead = set(peers)
        gone = [rid for rid, e in list(self.entries.items()) if e.peer in dead]
        for rid in gone:
            self.drop(rid, "peer_died")
        return gone

    def expire(self, now: float | None = None) -> list[str]:
        """Free the entries older than ``ttl`` that nobody took."""
        now = time.monotonic() if now is None else now
        old = [rid for rid, e in list(self.entries.items()) if now - e.since > self.ttl]  # a copy: a late
        # receive (worker.disaggregation.abandonable) may free an entry from its own thread
        for rid in old:
            self.drop(rid, "expired")
        return old
