"""An etcd-backed ``torch.distributed.Store``, so bootstrapping a group has no single point of failure.

A TCPStore lives in rank 0: when rank 0 dies, nobody can build the next group. This store keeps
its keys in etcd instead, under one prefix per group and generation (``ClusterKeys.group_store``),
attached to the writer's lease, so a generation's keys can never leak into the next and vanish
with their owner.

torch calls a Python store through a pybind11 trampoline (``PythonStore`` in torch's c10d
``init.cpp``). What it dispatches, checked on torch 2.13:

* ``set``, ``get``, ``add``, ``check``, ``compare_set``, ``wait`` (with or without a timeout) by
  their Python names; ``delete_key`` and ``num_keys`` by their C++ names ``deleteKey`` and
  ``getNumKeys`` (a store wrapped in a ``PrefixStore`` fails without them); ``clone`` (used by
  ``shrink_group``); ``append``, ``multi_get``, ``multi_set``, ``has_extended_api`` if defined.
* queue ops and ``list_keys`` never reach Python: C++ answers "not implemented" itself.
* Exceptions keep their Python type through the C++ frames (gloo's rendezvous included), so a
  timeout here raises a ``DistStoreError`` and an etcd outage a ``DistNetworkError``, as TCPStore's do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import NoReturn, TypeVar

import torch.distributed as dist

from rallypoint.errors import EtcdUnavailable, MalformedRecord, StoreTimeout, WaitCancelled
from rallypoint.log import get_logger
from rallypoint.rendezvous.etcd import RESYNC, Delete, EtcdClient, Get, Mod, Put, Version

log = get_logger("store")
T = TypeVar("T")


class StoreWaitTimeout(StoreTimeout, dist.DistStoreError):
    """Keys did not appear in time; torch code catching ``DistStoreError`` sees it too."""


class StoreUnavailable(EtcdUnavailable, dist.DistNetworkError):
    """etcd did not answer a store operation; torch code catching ``DistNetworkError`` sees it too."""


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class EtcdStore(dist.Store):
    """A ``torch.distributed.Store`` whose keys live in etcd under ``prefix``.

    Keep a Python reference to this object for as long as any process group (or ``PrefixStore``)
    uses it: torch holds only the C++ half, and once the Python object is garbage-collected every
    call from C++ fails with ``INTERNAL ASSERT FAILED ... Not implemented``.

    Args:
        client: the etcd client (thread-safe; may be shared with the rest of the process).
        prefix: where the keys live, normally ``ClusterKeys.group_store(gen, group)``.
        lease: lease id every written key is attached to (None: keys outlive the writer).
        timeout: default deadline of ``get``/``wait``; zero waits forever. ``set_timeout`` changes it.
    """

    # dist.Store's ``timeout`` property (what ``set_timeout`` sets), which torch's stubs leave out;
    # an annotation only: the C++ property stays in charge at run time
    timeout: timedelta

    def __init__(self, client: EtcdClient, prefix: str, lease: int | None = None,
                 timeout: timedelta = timedelta(seconds=30)) -> None:
        super().__init__()
        self._client = client
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._lease = getattr(lease, "id", lease)  # a rendezvous.etcd.Lease works too
        self.set_timeout(timeout)

    @property
    def prefix(self) -> str:
        return self._prefix

    # -- plumbing ---------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self._prefix + key

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except EtcdUnavailable as exc:
            raise StoreUnavailable(f"etcd store {self._prefix!r}: {exc}") from exc

    def _deadline(self, timeout: timedelta | None) -> float | None:
        seconds = (self.timeout if timeout is None else timeout).total_seconds()
        return None if seconds <= 0 else time.monotonic() + seconds

    def _cas(self, key: str, revision: int, value: bytes) -> tuple[bool, bytes | None, int]:
        """Put ``value`` if ``key``'s mod revision is still ``revision`` (0: absent).

        Returns (written, current value or None, current mod revision); one RPC either way.
        """
        ok, responses = self._call(lambda: self._client.transaction(
            [Mod(key) == revision], [Put(key, value, lease=self._lease)], [Get(key)],
            what=f"store cas {key}"))
        if ok:
            return True, value, revision
        rows = responses[0]
        return (False, bytes(rows[0][0]), rows[0][1].mod_revision) if rows else (False, None, 0)

    def _update(self, key: str, decide: Callable[[bytes | None], tuple[bytes | None, T]]) -> T:
        """Read-modify-write loop: ``decide(current)`` gives (value to write or None, result)."""
        full = self._key(key)
        kv = self._call(lambda: self._client.get(full))
        current, revision = (kv.value, kv.mod_revision) if kv else (None, 0)
        while True:
            desired, result = decide(current)
            if desired is None:
                return result
            ok, current, revision = self._cas(full, revision, desired)
            if ok:
                return result

    def _read(self, wanted: set[str]) -> tuple[dict[str, bytes], int]:
        """The wanted keys that exist, read in one range (their common prefix), and its revision."""
        kvs, revision = self._call(lambda: self._client.get_prefix(self._span(wanted)))
        return {kv.key: kv.value for kv in kvs if kv.key in wanted}, revision

    def _span(self, wanted: set[str]) -> str:
        return os.path.commonprefix(sorted(wanted)) if wanted else self._prefix  # noqa: RUF071 (a key prefix, not a path)

    def _await(self, keys: Sequence[str], timeout: timedelta | None,
               cancelled: Callable[[], str | None] | None = None) -> dict[str, bytes]:
        """Block until every key exists; return {full key: value}. Watches, never polls (but asks
        ``cancelled`` every 0.1 s)."""
        deadline = self._deadline(timeout)
        wanted = {self._key(k) for k in keys}
        have, revision = self._read(wanted)
        if len(have) == len(wanted):
            return have
        watch = self._call(lambda: self._client.watch_prefix(self._span(wanted), revision + 1))
        try:
            while len(have) < len(wanted):
                if cancelled is not None and (why := cancelled()):
                    raise WaitCancelled(why)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._timed_out(wanted - have.keys(), timeout)
                if cancelled is not None:
                    left = 0.1 if left is None else min(left, 0.1)
                event = watch.get(timeout=left)
                if event is RESYNC:  # history compacted under the watch: re-list
                    have, _ = self._read(wanted)
                elif event is not None and event.key in wanted:
                    if event.kind == "put":
                        have[event.key] = event.value
                    else:
                        have.pop(event.key, None)
        finally:
            watch.close()
        return have

    def _timed_out(self, missing: set[str], timeout: timedelta | None) -> NoReturn:
        names = sorted(k[len(self._prefix):] for k in missing)
        seconds = (self.timeout if timeout is None else timeout).total_seconds()
        log.warning("store.wait_timeout", prefix=self._prefix, missing=names, timeout_s=seconds)
        raise StoreWaitTimeout(
            f"wait timeout after {seconds:g}s: keys {names} not set under etcd prefix {self._prefix!r}")

    # -- the torch Store interface ----------------------------------------------------------

    def set(self, key: str, value: bytes | str) -> None:
        """Write ``key`` (attached to the lease)."""
        full, data = self._key(key), _bytes(value)
        self._call(lambda: self._client.put(full, data, lease=self._lease))

    def get(self, key: str) -> bytes:
        """Return ``key``'s value, waiting up to the store timeout for it to be set.

        Raises:
            StoreWaitTimeout: (a ``DistStoreError``) the key did not appear in time.
        """
        return self._await([key], None)[self._key(key)]

    def add(self, key: str, value: int) -> int:
        """Atomically add ``value`` to the decimal counter at ``key`` (absent = 0); return the sum."""
        def decide(current: bytes | None) -> tuple[bytes, int]:
            try:
                total = int(current or b"0") + int(value)
            except ValueError:
                raise MalformedRecord(self._key(key), f"not an integer counter: {current!r}") from None
            return str(total).encode(), total
        return self._update(key, decide)

    def append(self, key: str, value: bytes | str) -> None:
        """Atomically append ``value`` to ``key`` (created when absent)."""
        data = _bytes(value)
        self._update(key, lambda current: ((current or b"") + data, None))

    def compare_set(self, key: str, expected_value: bytes | str, desired_value: bytes | str) -> bytes:
        """Set ``key`` to ``desired_value`` if it holds ``expected_value``; TCPStore semantics.

        An absent key counts as holding ``b""``. Returns the value after the call: ``desired_value``
        when it was written, else the current value, or ``expected_value`` if the key is absent.
        """
        expected, desired = _bytes(expected_value), _bytes(desired_value)

        def decide(current: bytes | None) -> tuple[bytes | None, bytes]:
            if current is None:
                return (desired, desired) if expected == b"" else (None, expected)
            return (desired, desired) if current == expected else (None, current)
        return self._update(key, decide)

    def wait(self, keys: Sequence[str], timeout: timedelta | None = None) -> None:
        """Block until every key is set; ``timeout`` defaults to the store's (zero: forever).

        Raises:
            StoreWaitTimeout: (a ``DistStoreError``) naming the missing keys and the prefix.
        """
        self._await(keys, timeout)

    def mark(self, key: str, value: bytes | str = b"1") -> None:
        """Write ``key`` with no lease: a marker that must outlive an etcd blip that costs the
        writer its lease (a build's arrival). It goes when the leader prunes its generation."""
        full, data = self._key(key), _bytes(value)
        self._call(lambda: self._client.put(full, data))

    def withdraw(self, key: str, unless_all: Sequence[str]) -> bool:
        """Delete ``key`` unless every key of ``unless_all`` is set, in one transaction; True
        when it was deleted.

        A build's arrival is taken back this way: once every member's arrival was there at the
        same moment, some member may have seen that and gone on to create its communicator, so
        no member may leave any more. Any missing arrival proves nobody went on.
        """
        full = self._key(key)
        present, _ = self._call(lambda: self._client.transaction(
            [Version(self._key(k)) > 0 for k in unless_all], [], [Delete(full)],
            what=f"store withdraw {full}"))
        return not present

    def wait_unless(self, keys: Sequence[str], timeout: timedelta, cancelled: Callable[[], str | None]) -> None:
        """``wait``, given up as soon as ``cancelled()`` returns a reason.

        Raises:
            StoreWaitTimeout: naming the missing keys and the prefix.
            WaitCancelled: with the reason ``cancelled`` gave.
        """
        self._await(keys, timeout, cancelled)

    def check(self, keys: Sequence[str]) -> bool:
        """True if every key is set now."""
        wanted = {self._key(k) for k in keys}
        return len(self._read(wanted)[0]) == len(wanted)

    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        """Values of ``keys`` in order, waiting (store timeout) for any that are missing."""
        values = self._await(keys, None)
        return [values[self._key(k)] for k in keys]

    def multi_set(self, keys: Sequence[str], values: Sequence[bytes | str]) -> None:
        """Write several keys in one etcd transaction."""
        puts = [Put(self._key(k), _bytes(v), lease=self._lease) for k, v in zip(keys, values)]
        self._call(lambda: self._client.transaction([], puts, what=f"store multi_set {self._prefix}"))

    def delete_key(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        return self._call(lambda: self._client.delete(self._key(key)))

    def num_keys(self) -> int:
        """How many keys are set under the prefix."""
        return len(self._call(lambda: self._client.get_prefix(self._prefix))[0])

    def list_keys(self) -> list[str]:
        """Every key under the prefix, prefix stripped (Python callers only: C++ never asks)."""
        kvs, _ = self._call(lambda: self._client.get_prefix(self._prefix))
        return [kv.key[len(self._prefix):] for kv in kvs]

    def has_extended_api(self) -> bool:
        """True: ``append``, ``multi_get`` and ``multi_set`` are native here."""
        return True

    def clone(self) -> EtcdStore:
        """This store itself: it is thread-safe, and a fresh Python object would have no owner."""
        return self

    # The trampoline looks these two up by their C++ names (PYBIND11_OVERLOAD_PURE).
    deleteKey = delete_key
    getNumKeys = num_keys

    def __repr__(self) -> str:
        return f"EtcdStore({self._prefix!r}, lease={self._lease!r}, timeout={self.timeout})"


__all__ = ["EtcdStore", "StoreUnavailable", "StoreWaitTimeout"]
