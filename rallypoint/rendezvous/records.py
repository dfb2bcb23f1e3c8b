"""The records rallypoint keeps in etcd, and their strict parsing.

Every record is JSON. Parsing validates types and invariants and raises ``MalformedRecord`` naming
the key, so a bad write in etcd (by hand, by an old version) is reported, never a crash.

The keys they live under, and how long each lives, are ``protocol.keys``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rallypoint.errors import MalformedRecord
from rallypoint.protocol.experts import ExpertMap
from rallypoint.protocol.grid import coords_of

EP_MODES = ("tp", "dp")  # a mixture of experts' experts over each replica's TP ranks, or over every replica


def _load(key: str, raw: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRecord(key, f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MalformedRecord(key, f"expected a JSON object, got {type(data).__name__}")
    return data


_REQUIRED: Any = object()


def _field(key: str, data: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
    """``data[name]``, checked to be of ``kind`` (a bool is not an int); ``default`` when absent, if given."""
    if name not in data:
        if default is not _REQUIRED:
            return default
        raise MalformedRecord(key, f"missing field {name!r}")
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        raise MalformedRecord(key, f"field {name!r} should be {_kind_name(kind)}, got {value!r}")
    return value


def _names(key: str, values: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(v, str) for v in values):
        raise MalformedRecord(key, f"members must be node names, got {values!r}")
    return tuple(values)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


@dataclass(frozen=True)
class NodeRecord:
    """What a daemon says about its node when it registers.

    Attributes:
        slots: how many ranks it can host (its GPUs, or its CPU rank slots when it has none).
        cordoned: an operator asked that no new ranks be placed here.
        bad_seats: local ranks that must not be used (GPU unhealthy, restart budget spent).
    """

    node: str
    host: str
    address: str
    gpus: int
    slots: int
    version: str
    pid: int
    started: float = field(default_factory=time.time)
    cordoned: bool = False
    bad_seats: tuple[int, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, key: str, raw: bytes | str) -> NodeRecord:
        d = _load(key, raw)
        rec = cls(
            node=_field(key, d, "node", str), host=_field(key, d, "host", str),
            address=_field(key, d, "address", str), gpus=_field(key, d, "gpus", int),
            slots=_field(key, d, "slots", int), version=_field(key, d, "version", str),
            pid=_field(key, d, "pid", int), started=float(_field(key, d, "started", (int, float))),
            cordoned=bool(d.get("cordoned", False)),
            bad_seats=tuple(sorted(int(x) for x in _field(key, d, "bad_seats", list, []) if isinstance(x, int))),
        )
        if not key.endswith("/" + rec.node):
            raise MalformedRecord(key, f"node field {rec.node!r} does not match the key")
        if rec.gpus < 0 or rec.slots < 0:
            raise MalformedRecord(key, "gpus and slots must be >= 0")
        return rec


@dataclass(frozen=True)
class ClusterSpec:
    """The layout every daemon of a cluster must agree on; the first daemon writes it.

    ``ep``: ``tp`` spreads a mixture of experts' experts over each replica's TP ranks; ``dp``
    over every rank of every replica (``protocol.experts``), each expert on ``expert_copies``
    ranks. ``prefill_replicas``: replicas that prefill long prompts for the others, which
    decode (disaggregated serving; ``worker.disaggregation``). Specs written before these fields
    existed read as ``tp``, 1 and 0.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 0  # 0: as many replicas as the slots allow
    min_nodes: int = 1
    max_nodes: int = 0  # 0: unlimited
    ep: str = "tp"
    expert_copies: int = 1
    prefill_replicas: int = 0

    @property
    def replica_size(self) -> int:
        return self.tp * self.pp

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, key: str, raw: bytes | str) -> ClusterSpec:
        d = _load(key, raw)
        spec = cls(**{n: _field(key, d, n, int) for n in ("tp", "pp", "dp", "min_nodes", "max_nodes")},
                   ep=_field(key, d, "ep", str, "tp"), expert_copies=_field(key, d, "expert_copies", int, 1),
                   prefill_replicas=_field(key, d, "prefill_replicas", int, 0))
        if spec.tp < 1 or spec.pp < 1 or spec.dp < 0 or spec.min_nodes < 1 or spec.max_nodes < 0 \
                or spec.expert_copies < 1 or spec.prefill_replicas < 0:
            raise MalformedRecord(key, f"sizes out of range: {spec}")
        if spec.ep not in EP_MODES:
            raise MalformedRecord(key, f"ep must be one of {', '.join(EP_MODES)}, got {spec.ep!r}")
        return spec


@dataclass(frozen=True)
class RankSlot:
    """Where one rank runs: a node and the local device index on it."""

    rank: int
    node: str
    local_rank: int


@dataclass(frozen=True)
class Plan:
    """The layout of one generation; written exactly once, by the leader, under a CAS on ``gen``.

    Rank order is ``protocol.grid``'s (vLLM's parallel_state): ``rank = dp*(PP*TP) + pp*TP + tp``.
    ``members`` are the nodes that must ack before the generation is released (ranked or not).
    ``experts``: where a mixture of experts' experts are held and served when they are spread
    over every replica (``[layout] ep = "dp"``); None when each replica holds its own.
    ``prefill_replicas``: the first this many replicas prefill long prompts for the others,
    which decode (0: every replica serves whole requests).
    """

    gen: int
    tp: int
    pp: int
    dp: int
    ranks: tuple[RankSlot, ...]
    members: tuple[str, ...]
    reason: str
    leader: str
    time: float = field(default_factory=time.time)
    experts: ExpertMap | None = None
    prefill_replicas: int = 0

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def ranks_on(self, node: str) -> list[RankSlot]:
        """The ranks this plan places on ``node``, by local rank."""
        return sorted((r for r in self.ranks if r.node == node), key=lambda r: r.local_rank)

    def replica_of(self, rank: int) -> int:
        """The DP replica (index) that ``rank`` belongs to."""
        return coords_of(rank, self.tp, self.pp).dp

    def role_of(self, replica: int) -> str:
        """``prefill`` or ``decode`` in a disaggregated plan, else ``colocated``."""
        if not self.prefill_replicas:
            return "colocated"
        return "prefill" if replica < self.prefill_replicas else "decode"

    def replicas_on(self, node: str) -> list[int]:
        """The DP replicas with at least one rank on ``node``."""
        return sorted({self.replica_of(r.rank) for r in self.ranks if r.node == node})

    def to_json(self) -> str:
        d = asdict(self)
        d["world_size"] = self.world_size
        d["ranks"] = [[r.rank, r.node, r.local_rank] for r in self.ranks]
        if self.experts is None:
            del d["experts"]
        if not self.prefill_replicas:
            del d["prefill_replicas"]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, key: str, raw: bytes | str) -> Plan:
        d = _load(key, raw)
        raw_ranks = _field(key, d, "ranks", list)
        try:
            ranks = tuple(RankSlot(int(r), str(n), int(lr)) for r, n, lr in raw_ranks)
        except (TypeError, ValueError):
            raise MalformedRecord(key, "ranks must be [rank, node, local_rank] triples") from None
        plan = cls(
            gen=_field(key, d, "gen", int), tp=_field(key, d, "tp", int), pp=_field(key, d, "pp", int),
            dp=_field(key, d, "dp", int), ranks=ranks,
            members=_names(key, _field(key, d, "members", list)), reason=_field(key, d, "reason", str),
            leader=_field(key, d, "leader", str), time=float(_field(key, d, "time", (int, float))),
            experts=_expert_map(key, _field(key, d, "experts", dict, None)),
            prefill_replicas=_field(key, d, "prefill_replicas", int, 0),
        )
        plan.validate(key)
        return plan

    def validate(self, key: str) -> None:
        """Check the invariants every plan must hold; raise ``MalformedRecord`` naming ``key``."""
        if self.gen < 1:
            raise MalformedRecord(key, f"gen must be >= 1, got {self.gen}")
        if min(self.tp, self.pp, self.dp) < 1:
            raise MalformedRecord(key, f"tp, pp, dp must be >= 1, got {self.tp}, {self.pp}, {self.dp}")
        if self.world_size != self.tp * self.pp * self.dp:
            raise MalformedRecord(key, f"{self.world_size} ranks but tp*pp*dp = {self.tp * self.pp * self.dp}")
        if sorted(r.rank for r in self.ranks) != list(range(self.world_size)):
            raise MalformedRecord(key, "ranks must be 0..world_size-1, each once")
        seats = {(r.node, r.local_rank) for r in self.ranks}
        if len(seats) != self.world_size:
            raise MalformedRecord(key, "two ranks share one node/local_rank")
        if not {r.node for r in self.ranks} <= set(self.members):
            raise MalformedRecord(key, "a rank is placed on a node that is not a member")
        if self.prefill_replicas and not (self.tp == self.pp == 1 and 0 < self.prefill_replicas < self.dp):
            raise MalformedRecord(key, f"prefill_replicas = {self.prefill_replicas} needs tp = pp = 1 and a decode "
                                       f"replica left: got tp {self.tp}, pp {self.pp}, dp {self.dp}")
        if self.experts is not None:
            if self.pp != 1:
                raise MalformedRecord(key, f"experts spread over every replica need pp = 1, got pp = {self.pp}")
            problems = self.experts.problems(self.world_size)
            if problems:
                raise MalformedRecord(key, "; ".join(problems))


def _expert_map(key: str, d: dict[str, Any] | None) -> ExpertMap | None:
    """A plan's ``experts`` field, checked for types (``Plan.validate`` checks its consistency)."""
    if d is None:
        return None
    holds, serves = _field(key, d, "holds", list), _field(key, d, "serves", list)
    if not all(isinstance(h, list) and all(type(s) is int for s in h) for h in holds) \
            or not all(type(r) is int for r in serves):
        raise MalformedRecord(key, "experts: holds must be lists of slot numbers, serves a list of ranks")
    return ExpertMap(_field(key, d, "slots", int), tuple(tuple(h) for h in holds), tuple(serves))
