"""One exception tree for rallypoint.

Backend errors (gRPC, pyetcd, torch) are translated into these at the edge, so callers only ever
catch ``RallypointError`` subclasses and every message says what is wrong and where.
"""

from __future__ import annotations


class RallypointError(Exception):
    """Base of every error rallypoint raises on purpose."""


class ConfigError(RallypointError):
    """The configuration (file, environment or flags) is invalid."""


class EtcdError(RallypointError):
    """An etcd call failed for a reason other than the cluster being unreachable."""


class EtcdUnavailable(EtcdError):
    """No configured etcd endpoint answered in time."""


class EtcdAccessDenied(EtcdError):
    """etcd answered but refused this client: a TLS handshake that failed, wrong credentials, or a
    role without permission on the key. A configuration problem: retrying does not help."""


class LeaseLost(EtcdError):
    """A lease expired or was revoked: every key attached to it is gone."""


class MalformedRecord(RallypointError):
    """A record read from etcd does not parse or validate; the message names the key."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"malformed record at {key!r}: {why}")
        self.key = key
        self.why = why


class NodeIdConflict(RallypointError):
    """Another live daemon already holds this node id."""


class StaleGeneration(RallypointError):
    """An action names a generation that is no longer current."""


class LayoutError(RallypointError):
    """The requested TP/PP/DP layout cannot be placed on the available GPUs."""


class RendezvousTimeout(RallypointError):
    """A rendezvous step (plan, barrier) did not finish before its deadline."""


class StoreTimeout(RallypointError):
    """A key awaited in the etcd-backed store did not appear before the deadline."""


class WaitCancelled(RallypointError):
    """A wait in the etcd-backed store was given up because its purpose went away (a newer generation)."""


class GroupError(RallypointError):
    """A process group cannot be built or used as asked (bad plan, bad sizes, bad tensor)."""


class GenerationAborted(RallypointError):
    """The group a call ran on was aborted (a trip, a dead peer, or an "abort generation" order).

    The process is healthy: it should drop the step it was in and build the next generation.
    """

    def __init__(self, gen: int, group: str, reason: str) -> None:
        super().__init__(f"generation {gen} group {group} aborted: {reason}")
        self.gen = gen
        self.group = group
        self.reason = reason


class CheckpointError(RallypointError):
    """A model checkpoint (config, index, tensor file) is missing, corrupt or does not fit the model.

    The message names the file and, where one is involved, the tensor or config key.
    """
