"""Hang diagnosis: who is to blame when a collective does not finish.

Every rank publishes, a few times a second, per group its last started and last completed sequence
number plus a heartbeat (``ProgressBoard``, keyed by seat so it survives rank renumbering; the
daemon will relay it later, until then it goes straight to etcd). When a collective trips, the
tripping rank reads its peers' records and classifies each member of the group:

* ``dead``: no record (its lease is gone) or, on this host, its process no longer exists;
* ``stuck``: its heartbeat stopped (a SIGSTOPped or wedged process), or its process is stopped;
* ``slow``: alive and heartbeating, idle in this group, but it never started sequence k;

and members that started k like us are victims, not suspects. When a collective misses its
deadline and every peer is such a victim (alive, heartbeating, inside the same collective), no
process is to blame: the path between them failed (a network partition), and every peer is named
``unreachable``.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from rallypoint.errors import EtcdError, MalformedRecord
from rallypoint.log import get_logger
from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import EtcdClient

log = get_logger("diagnosis")


@dataclass(frozen=True)
class Suspect:
    rank: int
    seat: str
    kind: str  # dead | stuck | slow | unreachable
    why: str
    pid: int | None = None  # the process the verdict is about, when its record names one


@dataclass(frozen=True)
class Diagnosis:
    """The verdict on one tripped (or failed) collective."""

    gen: int
    group: str
    seq: int
    op: str
    suspects: tuple[Suspect, ...]
    trigger: str  # "deadline" or "error"
    waited: float
    deadline: float = 0.0
    time: float = field(default_factory=time.time)

    def to_event(self) -> dict[str, Any]:
        return {"gen": self.gen, "group": self.group, "seq": self.seq, "op": self.op,
                "trigger": self.trigger, "waited": round(self.waited, 4), "deadline": round(self.deadline, 4),
                "suspects": [{"rank": s.rank, "seat": s.seat, "kind": s.kind, "why": s.why, "pid": s.pid}
                             for s in self.suspects]}


@dataclass(frozen=True)
class ProgressRecord:
    seat: str
    gen: int
    rank: int
    pid: int
    host: str
    time: float
    groups: dict[str, list[int]]

    @classmethod
    def from_json(cls, key: str, raw: bytes) -> ProgressRecord:
        try:
            d = json.loads(raw)
            groups = d["groups"]
            if not isinstance(groups, dict):
                raise TypeError(f"field 'groups' should be an object, got {groups!r}")
            return cls(str(d["seat"]), int(d["gen"]), int(d["rank"]), int(d["pid"]), str(d["host"]),
                       float(d["time"]), {str(k): [int(v[0]), int(v[1])] for k, v in groups.items()})
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise MalformedRecord(key, f"bad progress record: {exc!r}") from None


class ProgressBoard:
    """Per-seat progress records in etcd (``ClusterKeys.progress_of``), on the writer's lease."""

    def __init__(self, client: EtcdClient, keys: ClusterKeys, seat: str, lease: int | None) -> None:
        self.client = client
        self.keys = keys
        self.seat = seat
        self.lease = lease
        self.host = socket.gethostname()
        self.pid = psutil.Process().pid

    def publish(self, gen: int, rank: int, groups: dict[str, list[int]]) -> None:
        rec = {"seat": self.seat, "gen": gen, "rank": rank, "pid": self.pid, "host": self.host,
               "time": time.time(), "groups": groups}
        self.client.put(self.keys.progress_of(self.seat), json.dumps(rec), lease=self.lease)

    def read(self) -> dict[str, ProgressRecord]:
        """Every published record, by seat."""
        kvs, _ = self.client.get_prefix(self.keys.progress)
        out = {}
        for kv in kvs:
            try:
                rec = ProgressRecord.from_json(kv.key, kv.value)
                out[rec.seat] = rec
            except MalformedRecord as exc:
                log.error("diagnosis.malformed_record", key=kv.key, error=str(exc))
        return out


def classify(seat: str, rank: int, rec: ProgressRecord | None, label: str, seq: int,
             now: float, stale_after: float, host: str, since: float) -> Suspect | None:
    """The verdict on one peer of a tripped collective, or None if it is a victim like us.

    ``since`` is the wall time the collective started here: a record published before it cannot
    say whether the peer started the collective, so only a later one can make it ``slow``.
    """
    if rec is None:
        return Suspect(rank, seat, "dead", "no progress record (its lease is gone)")
    if rec.host == host:
        try:
            status = psutil.Process(rec.pid).status()
        except psutil.NoSuchProcess:
            return Suspect(rank, seat, "dead", f"process {rec.pid} is gone")
        if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
            return Suspect(rank, seat, "stuck", f"process {rec.pid} is stopped")
        if status == psutil.STATUS_ZOMBIE:
            return Suspect(rank, seat, "dead", f"process {rec.pid} is a zombie")
    age = now - rec.time
    if age > stale_after:
        return Suspect(rank, seat, "stuck", f"no heartbeat for {age:.2f}s")
    started, completed = rec.groups.get(label, [0, 0])
    # Behind us *and* idle in this group: busy elsewhere (slow). Behind us but waiting inside an
    # earlier collective of this group is a victim of the same hang, not a suspect.
    if started < seq and completed >= started and rec.time > since:
        return Suspect(rank, seat, "slow", f"alive, idle at seq {started}, never started {seq}")
    return None


def diagnose(board: ProgressBoard | None, group: Any, seq: int, op: str, trigger: str,
             waited: float, my_seat: str, stale_after: float, deadline: float = 0.0) -> Diagnosis:
    """Name the suspects of ``group``'s collective ``seq``; never raises (etcd down: no suspects)."""
    if board is None:
        return Diagnosis(group.gen, group.label, seq, op, (), trigger, waited, deadline)
    try:
        records = board.read()
    except EtcdError as exc:
        log.warning("diagnosis.board_unreadable", error=str(exc))
        return Diagnosis(group.gen, group.label, seq, op, (), trigger, waited, deadline)
    now, host = time.time(), socket.gethostname()
    suspects, victims = [], []
    for rank, (node, local) in zip(group.ranks, group.spec.seats):
        seat = f"{node}/{local}"
        if seat == my_seat:
            continue
        rec = records.get(seat)
        s = classify(seat, rank, rec, group.label, seq, now, stale_after, host, now - waited)
        if s is not None:
            suspects.append(dataclasses.replace(s, pid=rec.pid) if rec is not None else s)
        elif rec is not None:
            victims.append(Suspect(rank, seat, "unreachable", f"alive and inside {op} seq {seq} too: "
                                   f"the path between us failed", rec.pid))
    if not suspects and trigger == "deadline":
        suspects = victims  # nobody stopped, died or lagged: the network between us did
    return Diagnosis(group.gen, group.label, seq, op, tuple(suspects), trigger, waited, deadline)
