"""What the cluster leaves in etcd: its key count and etcd's database size, at the start and the
end of a run, so a soak shows whether they stay flat (the leader prunes old generations; etcd's
database also keeps superseded revisions until it is compacted)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from rallypoint.errors import RallypointError
from rallypoint.rendezvous.etcd import EtcdClient, EtcdSettings, prefix_end
from tests.chaos.deployment import Deployment

ROOT = "/rallypoint/"


@dataclass(frozen=True)
class Footprint:
    """Attributes:
        keys: keys under ``/rallypoint/`` (None when etcd did not answer).
        by_kind: those keys by kind (``control/plans``, ``events``, ``store``...).
        db_size: bytes of the largest member database (etcd's ``status``); None if none answered.
        db_sizes: by member endpoint.
        revision: etcd's store revision: how many writes the run has made.
        gen: the cluster's generation.
    """

    keys: int | None
    by_kind: dict[str, int] = field(default_factory=dict)
    db_size: int | None = None
    db_sizes: dict[str, int] = field(default_factory=dict)
    revision: int = 0
    gen: int = 0

    def line(self) -> str:
        mib = "?" if self.db_size is None else f"{self.db_size / 2**20:.2f} MiB"
        return f"{self.keys} keys under {ROOT}, db {mib}, revision {self.revision}, gen {self.gen}"

    def to_dict(self) -> dict:
        return asdict(self)


def _kind(key: str) -> str:
    """``control/plans`` for ``/rallypoint/<cluster>/control/plans/...``, ``events`` for events."""
    parts = key[len(ROOT):].split("/")[1:]  # past the cluster's name
    if not parts:
        return ""
    return "/".join(parts[:2 if parts[0] in ("control", "status") else 1])


def measure(d: Deployment) -> Footprint:
    """The deployment's etcd now (a keys-only range, and a status call to each member)."""
    assert d.client is not None and d.etcd is not None
    try:
        kvs, revision = d.client.get_range(ROOT, prefix_end(ROOT), keys_only=True)
        kv = d.client.get(d.keys.gen)
    except RallypointError:
        return Footprint(None)
    sizes = {}
    for endpoint in d.etcd.endpoints:
        one = EtcdClient(EtcdSettings(endpoints=(endpoint,), request_timeout=2.0, retry_deadline=2.0))
        try:
            sizes[endpoint] = one.db_size()
        except RallypointError:
            pass  # a member down at this moment: the others say it
        finally:
            one.close()
    return Footprint(len(kvs), dict(sorted(Counter(_kind(k.key) for k in kvs).items())),
                     max(sizes.values(), default=None), sizes, revision, int(kv.value) if kv else 0)
