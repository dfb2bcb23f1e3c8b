"""The one module that talks to etcd.

Everything above it sees ``EtcdClient``: several endpoints with failover, bounded exponential
back-off (tenacity), compare-and-swap transactions, leases kept alive by one dedicated thread, and
prefix watches that resume from the last seen revision after a disconnect, so no event is missed.

Backend errors (gRPC status codes, pyetcd exceptions, and pyetcd's ``ValueError('Trying to use a
failed node')``) are translated here into ``EtcdUnavailable`` / ``EtcdError`` and nowhere else.
pyetcd marks an endpoint failed for ``time_retry`` seconds after one failed call; we keep that
window short (``endpoint_retry``) so one blip does not make a client useless for minutes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pyetcd
import pyetcd.exceptions as etcd_exc
from pyetcd import transactions as txn
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from rallypoint.errors import EtcdAccessDenied, EtcdError, EtcdUnavailable, LeaseLost
from rallypoint.log import get_logger

log = get_logger("etcd")

_UNAVAILABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
}
_UNAVAILABLE_EXC = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    etcd_exc.InternalServerError,
    etcd_exc.NoServerAvailableError,
    etcd_exc.WatchTimedOut,
)


ETCD_PASSWORD_ENV = "RALLYPOINT_ETCD_PASSWORD"  # where rallyd, its workers and rallyctl take the password


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd.

    Attributes:
        endpoints: ``host:port``, ``http://host:port`` or ``https://host:port`` entries.
        request_timeout: seconds for one RPC before the endpoint counts as failed.
        retry_deadline: seconds an operation keeps retrying (with back-off) before giving up.
        endpoint_retry: seconds a failed endpoint is skipped before it is tried again.
        keepalive: seconds between gRPC keepalive pings (etcd refuses pings more often than 5 s).
    """

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    request_timeout: float = 2.0
    retry_deadline: float = 10.0
    endpoint_retry: float = 0.5
    keepalive: float = 5.0
    ca_cert: str | None = None
    cert_key: str | None = None
    cert_cert: str | None = None
    user: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd returned it."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    """A put or delete seen by a watch; ``kind`` is ``"put"`` or ``"delete"``."""

    kind: str
    key: str
    value: bytes
    revision: int


RESYNC = WatchEvent("resync", "", b"", 0)
"""Put in a watch's queue when history was compacted past the resume point: re-list the prefix."""


def _split_endpoint(spec: str) -> tuple[str, int, bool]:
    secure = spec.startswith("https://")
    rest = spec.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise EtcdError(f"bad etcd endpoint {spec!r}: expected host:port or http(s)://host:port")
    return host.strip("[]"), int(port), secure


def _kv(raw: Any) -> KeyValue:
    return KeyValue(
        key=raw.key.decode(),
        value=bytes(raw.value),
        mod_revision=raw.mod_revision,
        create_revision=raw.create_revision,
        version=raw.version,
        lease=raw.lease,
    )


def _translate(exc: BaseException, what: str, endpoint: str, settings: EtcdSettings | None = None) -> EtcdError:
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = str(exc.details() if hasattr(exc, "details") else exc)
        denied = _access_denied(code, details, what, endpoint, settings or EtcdSettings())
        if denied is not None:
            return denied
        if code is not None and code in _UNAVAILABLE_CODES:
            hint = (" (it closed the connection at once: if it serves TLS, give https:// endpoints and ca_cert)"
                    if "Socket closed" in details and not (settings and settings.ca_cert) else "")
            return EtcdUnavailable(f"{what}: etcd at {endpoint} unavailable ({code.name}){hint}")
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
            return LeaseLost(f"{what}: the lease expired or was revoked ({details})")
        return EtcdError(f"{what}: etcd at {endpoint} refused: {details}")
    if isinstance(exc, _UNAVAILABLE_EXC):
        return EtcdUnavailable(f"{what}: etcd at {endpoint} unavailable ({type(exc).__name__})")
    if isinstance(exc, ValueError) and "failed node" in str(exc):
        return EtcdUnavailable(f"{what}: every etcd endpoint failed recently")
    return EtcdError(f"{what}: {type(exc).__name__}: {exc}")


def _access_denied(code: grpc.StatusCode | None, details: str, what: str, endpoint: str,
                   s: EtcdSettings) -> EtcdAccessDenied | None:
    """The refusals that are the client's configuration, each with what to fix; None for others.

    gRPC reports a failed TLS handshake as UNAVAILABLE, like a server that is down; its details
    tell the two apart, and a handshake that failed once fails again.
    """
    if code == grpc.StatusCode.UNAVAILABLE:
        if "CERTIFICATE_VERIFY_FAILED" in details:
            return EtcdAccessDenied(
                f"{what}: etcd at {endpoint}: TLS handshake failed: its certificate does not verify against "
                f"ca_cert {s.ca_cert} ([etcd] ca_cert must be the CA that signed etcd's server certificate)")
        if "Peer name" in details and "not in peer certificate" in details:
            return EtcdAccessDenied(f"{what}: etcd at {endpoint}: TLS handshake failed: its certificate does "
                                    f"not name the host in the endpoint ({details.rsplit('last error: ', maxsplit=1)[-1]})")
        if s.ca_cert and ("TSI_DATA_CORRUPTED" in details or "BAD_CERTIFICATE" in details
                          or "CERTIFICATE_REQUIRED" in details):
            given = f"cert_cert {s.cert_cert}" if s.cert_cert else "no client certificate given"
            return EtcdAccessDenied(
                f"{what}: etcd at {endpoint}: TLS handshake failed: etcd refused this client's certificate "
                f"({given}; [etcd] cert_cert and cert_key must be a certificate signed by the CA etcd trusts)")
        return None
    if code == grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" in details:
        return EtcdAccessDenied(f"{what}: etcd at {endpoint} rejected user {s.user!r}: wrong user name or "
                                f"password ([etcd] user, and password from {ETCD_PASSWORD_ENV})")
    if code == grpc.StatusCode.PERMISSION_DENIED or "user name is empty" in details:
        if not s.user:
            return EtcdAccessDenied(f"{what}: etcd at {endpoint} requires authentication: set [etcd] user, "
                                    f"and its password in {ETCD_PASSWORD_ENV}")
        return EtcdAccessDenied(f"{what}: etcd at {endpoint} denied user {s.user!r}: permission denied (its "
                                f"role needs readwrite on this cluster's prefix, /rallypoint/<cluster>/)")
    return None


class EtcdClient:
    """A thread-safe etcd v3 client over several endpoints.

    Args:
        settings: endpoints, timeouts and credentials.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        if not settings.endpoints:
            raise EtcdError("no etcd endpoints configured")
        self.settings = settings
        self._lock = threading.RLock()
        self._raw: pyetcd.MultiEndpointEtcd3Client | None = None
        self._keeper: LeaseKeeper | None = None
        self.requests = 0  # RPCs issued (watch creations included); read by benchmarks

    # -- connection -------------------------------------------------------------------------

    def _make_raw(self) -> pyetcd.MultiEndpointEtcd3Client:
        s = self.settings
        creds = None
        if s.ca_cert:
            creds = pyetcd.MultiEndpointEtcd3Client.get_secure_creds(
                s.ca_cert, s.cert_key, s.cert_cert
            )
        opts = [
            ("grpc.keepalive_time_ms", int(s.keepalive * 1000)),
            ("grpc.keepalive_timeout_ms", int(s.request_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 0),  # etcd answers idle pings with GOAWAY
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        endpoints = []
        for spec in s.endpoints:
            host, port, secure = _split_endpoint(spec)
            secure = secure or creds is not None
            if secure and creds is None:
                raise EtcdError(f"endpoint {spec!r} is https but no ca_cert is configured")
            endpoints.append(
                pyetcd.Endpoint(host, port, secure=secure, creds=creds,
                                time_retry=s.endpoint_retry, opts=opts)
            )
        return pyetcd.MultiEndpointEtcd3Client(
            endpoints=endpoints, timeout=s.request_timeout,
            user=s.user, password=s.password, failover=True,
        )

    @property
    def raw(self) -> pyetcd.MultiEndpointEtcd3Client:
        """The underlying pyetcd client, created on first use (authentication is an RPC)."""
        with self._lock:
            if self._raw is None:
                self._raw = self._make_raw()
            return self._raw

    @property
    def endpoint(self) -> str:
        """The endpoint currently in use, for log lines."""
        raw = self._raw
        if raw is None or raw.endpoint_in_use is None:
            return ",".join(self.settings.endpoints)
        return raw.endpoint_in_use.netloc

    def _mark_failed(self) -> None:
        with self._lock:
            raw = self._raw
            if raw is not None and raw.endpoint_in_use is not None:
                raw.endpoint_in_use.fail()
                raw._clear_old_stubs()

    def call(self, what: str, fn: Callable[[pyetcd.MultiEndpointEtcd3Client], Any],
             deadline: float | None = None) -> Any:
        """Run ``fn(raw_client)``, retrying on unavailability with bounded exponential back-off.

        Raises:
            EtcdUnavailable: no endpoint answered within ``deadline`` (default ``retry_deadline``).
            EtcdError: etcd answered with an error.
        """
        limit = self.settings.retry_deadline if deadline is None else deadline
        retrying = Retrying(
            stop=stop_after_delay(limit),
            wait=wait_exponential(multiplier=0.02, min=0.02, max=1.0),
            retry=retry_if_exception_type(EtcdUnavailable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                return self._call_once(what, fn)
        raise AssertionError("unreachable")  # pragma: no cover

    def _log_retry(self, state: RetryCallState) -> None:
        if state.attempt_number in (1, 2, 4) or state.attempt_number % 8 == 0:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("etcd.retrying", attempt=state.attempt_number, endpoints=list(self.settings.endpoints),
                        error=str(exc), waited=round(state.seconds_since_start or 0.0, 2))

    def _call_once(self, what: str, fn: Callable[[Any], Any]) -> Any:
        self.requests += 1
        try:
            return fn(self.raw)
        except EtcdError:
            raise
        except Exception as exc:  # translated at the edge, here only
            err = _translate(exc, what, self.endpoint, self.settings)
            if isinstance(err, EtcdUnavailable):
                self._mark_failed()
            raise err from exc

    def close(self) -> None:
        """Stop the lease keeper and close every channel."""
        if self._keeper is not None:
            self._keeper.stop()
        with self._lock:
            if self._raw is not None:
                self._raw.close()
                self._raw = None

    # -- key/value --------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        """Return the key, or None when it does not exist."""
        resp = self.call(f"get {key}", lambda c: c.get_response(key))
        return _kv(resp.kvs[0]) if resp.kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Return every key under ``prefix`` (sorted by key) and the store revision they were read at."""
        resp = self.call(f"get prefix {prefix}",
                         lambda c: c.get_prefix_response(prefix, sort_order="ascend"))
        return [_kv(kv) for kv in resp.kvs], resp.header.revision

    def get_range(self, start: str, end: str, *, limit: int = 0, newest_first: bool = False,
                  keys_only: bool = False, revision: int | None = None) -> tuple[list[KeyValue], int]:
        """Keys in ``[start, end)`` by key, descending with ``newest_first`` (generation keys sort
        by generation), at most ``limit`` of them (0: all), as of ``revision`` (None: now); and the
        store revision they were read at."""
        resp = self.call(f"get range {start}..{end}", lambda c: c.get_range_response(
            start, end, sort_order="descend" if newest_first else "ascend", limit=limit or None,
            keys_only=keys_only, revision=revision))
        return [_kv(kv) for kv in resp.kvs], resp.header.revision

    def count_prefix(self, prefix: str) -> tuple[int, int]:
        """How many keys are under ``prefix`` (none is sent back), and the store revision."""
        resp = self.call(f"count prefix {prefix}", lambda c: c.get_prefix_response(prefix, count_only=True))
        return resp.count, resp.header.revision

    def db_size(self) -> int:
        """Bytes of the answering member's database (etcd's ``status``): it grows with the history
        kept, and shrinks only after a compaction and a defragmentation."""
        return int(self.call("status", lambda c: c.status().db_size))

    def put(self, key: str, value: bytes | str, lease: int | None = None) -> int:
        """Write a key (optionally attached to a lease); return the new store revision."""
        resp = self.call(f"put {key}", lambda c: c.put(key, value, lease=lease))
        return resp.header.revision

    def create(self, key: str, value: bytes | str, lease: int | None = None) -> bool:
        """Write ``key`` only if it does not exist; True when this call created it."""
        ok, _ = self.transaction(
            [txn.Create(key) == 0], [txn.Put(key, value, lease=lease)], [], what=f"create {key}"
        )
        return ok

    def delete(self, key: str) -> bool:
        """Delete one key; True if it existed."""
        return bool(self.call(f"delete {key}", lambda c: c.delete(key)))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; return how many went."""
        resp = self.call(f"delete prefix {prefix}", lambda c: c.delete_prefix(prefix))
        return resp.deleted

    def delete_ranges(self, ranges: Sequence[tuple[str, str]], what: str = "delete ranges") -> list[int]:
        """Delete the keys in each ``[start, end)`` in one transaction; how many went from each."""
        _, responses = self.transaction([], [txn.Delete(start, range_end=end) for start, end in ranges],
                                        what=what)
        return [r.response_delete_range.deleted for r in responses]

    def transaction(self, compare: Sequence[Any], success: Sequence[Any],
                    failure: Sequence[Any] = (), what: str = "transaction") -> tuple[bool, list[Any]]:
        """Compare-and-swap: run ``success`` if every comparison holds, else ``failure``.

        Build comparisons and operations with ``pyetcd.transactions`` (re-exported here as
        ``Value``, ``Version``, ``Create``, ``Mod``, ``Put``, ``Delete``, ``Get``).
        """
        return self.call(what, lambda c: c.transaction(list(compare), list(success), list(failure)))

    # -- leases -----------------------------------------------------------------------------

    def grant_lease(self, ttl: float) -> int:
        """Grant a lease of ``ttl`` seconds (rounded up, at least 1) and return its id."""
        seconds = max(1, int(-(-ttl // 1)))
        return self.call("grant lease", lambda c: c.lease(seconds)).id

    def refresh_lease(self, lease_id: int, deadline: float | None = None) -> int:
        """Refresh a lease; return its remaining TTL (<= 0 means it no longer exists)."""
        def refresh(c: Any) -> int:
            responses = list(c.refresh_lease(lease_id))
            return responses[0].TTL if responses else 0
        return self.call(f"refresh lease {lease_id:x}", refresh, deadline=deadline)

    def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease now: its keys vanish at once (a clean leave)."""
        self.call(f"revoke lease {lease_id:x}", lambda c: c.revoke_lease(lease_id))

    def keep_alive(self, ttl: float, on_lost: Callable[[int], None] | None = None) -> Lease:
        """Grant a lease and keep it alive from the client's lease-keeper thread."""
        with self._lock:
            if self._keeper is None:
                self._keeper = LeaseKeeper(self)
        lease = Lease(self.grant_lease(ttl), ttl, on_lost)
        self._keeper.add(lease)
        return lease

    def release(self, lease: Lease) -> None:
        """Stop refreshing a lease and revoke it."""
        if self._keeper is not None:
            self._keeper.remove(lease)
        try:
            self.revoke_lease(lease.id)
        except EtcdError as exc:
            log.warning("etcd.lease_revoke_failed", lease=hex(lease.id), error=str(exc))

    # -- watches ----------------------------------------------------------------------------

    def watch_prefix(self, prefix: str, start_revision: int,
                     sink: queue.Queue[WatchEvent] | None = None) -> PrefixWatch:
        """Watch every change under ``prefix`` from ``start_revision`` on (inclusive).

        ``sink`` lets several watches feed one queue, so a loop can block on all of them at once.
        """
        watch = PrefixWatch(self, prefix, start_revision, sink)
        watch.start()
        return watch

    def _add_watch(self, prefix: str, start_revision: int, cb: Callable[[Any], None]) -> tuple[Any, int]:
        def add(c: Any) -> tuple[Any, int]:
            watcher = c.watcher
            return watcher, c.add_watch_prefix_callback(prefix, cb, start_revision=start_revision)
        return self.call(f"watch {prefix}", add, deadline=self.settings.request_timeout)

    def _watcher_failed(self, watcher: Any) -> None:
        """Drop the shared watch stream if it is still the one that failed (others re-create it)."""
        with self._lock:
            raw = self._raw
            if raw is not None and raw._stubs.get("watcher") is watcher:
                if raw.endpoint_in_use is not None:
                    raw.endpoint_in_use.fail()
                raw._clear_old_stubs()


@dataclass
class Lease:
    """A lease kept alive by the client's ``LeaseKeeper``; ``lost`` is set if it expired."""

    id: int
    ttl: float
    on_lost: Callable[[int], None] | None = None
    last_refresh: float = field(default_factory=time.monotonic)
    lost: threading.Event = field(default_factory=threading.Event)


class LeaseKeeper(threading.Thread):
    """The one thread per client that refreshes its leases every TTL/3.

    A refresh that fails is retried every 100 ms; a lease that etcd says is gone, or that could not
    be refreshed for a whole TTL, is declared lost and its ``on_lost`` callback runs.
    """

    def __init__(self, client: EtcdClient) -> None:
        super().__init__(name="rallypoint-lease-keeper", daemon=True)
        self._client = client
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self.start()

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases[lease.id] = lease

    def remove(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(lease.id, None)

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.wait(0.05):
            now = time.monotonic()
            with self._lock:
                due = [x for x in self._leases.values() if now - x.last_refresh >= x.ttl / 3]
            for lease in due:
                self._refresh(lease)

    def _refresh(self, lease: Lease) -> None:
        try:
            ttl = self._client.refresh_lease(lease.id, deadline=0)
        except EtcdError as exc:
            if time.monotonic() - lease.last_refresh < lease.ttl:
                return  # still alive on the server: retried on the next 50 ms tick
            log.warning("etcd.lease_unrefreshable", lease=hex(lease.id), error=str(exc))
            ttl = 0
        if ttl > 0:
            lease.last_refresh = time.monotonic()
            return
        self.remove(lease)
        lease.lost.set()
        log.warning("etcd.lease_lost", lease=hex(lease.id))
        if lease.on_lost is not None:
            try:
                lease.on_lost(lease.id)
            except Exception:  # a callback must not kill the keeper
                log.exception("etcd.lease_lost_callback_failed", lease=hex(lease.id))


class PrefixWatch:
    """A watch on a prefix that survives disconnects and endpoint failover without missing events.

    Events land in ``events`` (a ``queue.Queue`` of ``WatchEvent``) in revision order. After a
    stream error the watch is re-created at ``last revision + 1`` on whichever endpoint answers;
    if etcd compacted past that point, ``RESYNC`` is queued and the reader must re-list.
    """

    def __init__(self, client: EtcdClient, prefix: str, start_revision: int,
                 sink: queue.Queue[WatchEvent] | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.events: queue.Queue[WatchEvent] = queue.Queue() if sink is None else sink
        self.last_revision = start_revision - 1
        self.reconnects = 0
        self._watcher: Any = None
        self._watch_id: int | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._broken = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name=f"watch {prefix}", daemon=True)

    def start(self) -> None:
        self._connect(first=True)
        self._thread.start()

    def close(self) -> None:
        """Cancel the watch; no more events are queued."""
        self._closed.set()
        self._broken.set()
        with self._lock:
            if self._watcher is not None and self._watch_id is not None:
                try:
                    self._watcher.cancel(self._watch_id)
                except Exception:  # the stream may already be gone
                    pass

    def get(self, timeout: float | None = None) -> WatchEvent | None:
        """Next event, or None after ``timeout`` seconds."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> list[WatchEvent]:
        """Every event queued so far, without waiting."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def _on_response(self, resp: Any) -> None:
        if self._closed.is_set():
            return
        if resp is None or isinstance(resp, BaseException):
            if isinstance(resp, etcd_exc.RevisionCompactedError):
                self.last_revision = resp.compacted_revision - 1
                self.events.put(RESYNC)
            self._broken.set()
            return
        for ev in resp.events:
            rev = ev.mod_revision
            kind = "delete" if isinstance(ev, pyetcd.events.DeleteEvent) else "put"
            self.events.put(WatchEvent(kind, ev.key.decode(), bytes(ev.value), rev))
            self.last_revision = rev

    def _connect(self, first: bool = False) -> None:
        watcher, watch_id = self.client._add_watch(
            self.prefix, self.last_revision + 1, self._on_response
        )
        with self._lock:
            self._watcher, self._watch_id = watcher, watch_id
        if not first:
            self.reconnects += 1
            log.info("etcd.watch_resumed", prefix=self.prefix, from_revision=self.last_revision + 1,
                     endpoint=self.client.endpoint)

    def _supervise(self) -> None:
        delay = 0.02
        while not self._closed.is_set():
            self._broken.wait()
            if self._closed.is_set():
                return
            self.client._watcher_failed(self._watcher)
            try:
                self._broken.clear()
                self._connect()
                delay = 0.02
            except EtcdError as exc:
                self._broken.set()
                log.debug("etcd.watch_reconnect_failed", prefix=self.prefix, error=str(exc))
                self._closed.wait(delay)
                delay = min(delay * 2, 1.0)


# Transaction builders, re-exported so callers never import pyetcd themselves.
Value = txn.Value
Version = txn.Version
Create = txn.Create
Mod = txn.Mod
Put = txn.Put
Delete = txn.Delete
Get = txn.Get


def prefix_end(prefix: str) -> str:
    """The key just past every key under ``prefix``: the end of its range."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def endpoints_from(text: str | Iterable[str]) -> tuple[str, ...]:
    """Parse ``a:1,b:2`` (or an iterable) into a tuple of endpoint strings."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(e.strip() for e in items if e.strip())
