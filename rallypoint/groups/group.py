"""One process group: a torch backend built directly over its own store prefix, and its abort.

No ``init_process_group``, no default group: each group is a ``ProcessGroupNCCL`` (GPU) or
``ProcessGroupGloo`` (CPU) object of its own, so a dead rank takes down only the groups it is in.
Teardown is ``abort()``, bounded in time; never a destroy that waits on a dead peer.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rallypoint.errors import GenerationAborted, GroupError, StoreTimeout, WaitCancelled
from rallypoint.groups.topology import GroupSpec
from rallypoint.log import get_logger

log = get_logger("groups")

# torch must never kill the process on a collective error: rallypoint's deadlines decide.
os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")

StoreFactory = Callable[[GroupSpec], dist.Store]
"""Returns the store a group bootstraps over (an ``EtcdStore`` under the group's generation prefix)."""
Cancelled = Callable[[], "str | None"]
"""Returns why a build in progress is no longer wanted (a newer generation), else None."""


@dataclass
class Group:
    """A built group, plus the bookkeeping the collectives need.

    ``store`` is kept referenced on purpose: torch holds only the C++ half of a Python store, and
    a collected store makes torch's later calls into it fail.
    """

    spec: GroupSpec
    backend: Any  # ProcessGroupNCCL | ProcessGroupGloo | None (a group of one)
    store: Any
    device: torch.device
    build_seconds: float = 0.0
    seq: int = 0  # collectives issued on this group
    aborted_reason: str | None = None
    abort_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def gen(self) -> int:
        return self.spec.gen

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def rank_in_group(self) -> int:
        return self.spec.rank_in_group

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.spec.ranks

    @property
    def aborted(self) -> bool:
        return self.aborted_reason is not None

    def check(self) -> None:
        """Raise ``GenerationAborted`` if this group was aborted."""
        if self.aborted_reason is not None:
            raise GenerationAborted(self.gen, self.label, self.aborted_reason)

    def abort(self, reason: str) -> float:
        """Abort the backend (once); return the seconds it took. Safe from any thread."""
        with self._lock:
            if self.aborted_reason is not None:
                return 0.0
            self.aborted_reason = reason
        t0 = time.monotonic()
        if self.backend is not None:
            try:
                self.backend.abort()
            except Exception as exc:  # an abort must never raise into the watchdog
                log.warning("groups.abort_failed", group=self.label, error=str(exc))
        took = time.monotonic() - t0
        self.abort_seconds = took
        if self.backend is not None:
            _GRAVEYARD.bury(self)
        log.info("groups.aborted", group=self.label, gen=self.gen, reason=reason, seconds=round(took, 4))
        return took


class _Graveyard:
    """Where aborted backends are destroyed: on a thread of their own, as soon as their group is
    gone. A gloo backend whose peer sits behind a network cut blocks in its destructor (closing
    connections whose data the peer never acknowledged) for tens of seconds; dropped with the
    generation that replaced it, that destructor would run on the serving loop's thread, in the
    middle of a recovery."""

    def __init__(self) -> None:
        self._due: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        self._reaper: threading.Thread | None = None
        self._lock = threading.Lock()

    def bury(self, group: Group) -> None:
        held = [group.backend]  # the reference the reaper drops, the last one once the group is gone
        weakref.finalize(group, self._due.put, held)
        with self._lock:
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="rallypoint-group-reaper", daemon=True)
                self._reaper.start()

    def _reap(self) -> None:
        while True:
            held = self._due.get()
            held.clear()  # the backend's destructor runs here


_GRAVEYARD = _Graveyard()


def build_group(spec: GroupSpec, store_factory: StoreFactory, device: torch.device,
                timeout: timedelta, cancelled: Cancelled | None = None) -> Group:
    """Build the backend for ``spec`` over a fresh store; a group of one needs none.

    With ``cancelled`` (and a store that can wait on it), every member first waits for all the
    others to arrive, and gives up when ``cancelled()`` returns a reason.

    Raises:
        GroupError: the peers did not all arrive within ``timeout``, the build was abandoned,
            or the backend failed.
    """
    if spec.world_size == 1:
        return Group(spec, None, None, device)
    t0 = time.monotonic()
    store = store_factory(spec)
    try:
        if cancelled is not None and hasattr(store, "wait_unless") and _all_arrive(store, spec, timeout, cancelled):
            cancelled = None  # committed despite a cancel: the peers are connecting to this member
        cuda = device.type == "cuda"
        backend = _nccl(store, spec, device, timeout) if cuda else _gloo(store, spec, timeout, cancelled)
    except GroupError:
        raise
    except Exception as exc:  # the store's etcd (a lost lease), or the backend
        raise GroupError(f"building {spec.label} (rank {spec.rank_in_group} of {spec.world_size}) "
                         f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    took = time.monotonic() - t0
    log.info("groups.built", group=spec.label, gen=spec.gen, backend=device.type, seconds=round(took, 4))
    return Group(spec, backend, store, device, build_seconds=took)


def _all_arrive(store: Any, spec: GroupSpec, timeout: timedelta, cancelled: Cancelled) -> bool:
    """Wait until every member reached this build, before any communicator is created; returns
    True when the build goes on although it was cancelled (see below), so the connect that
    follows must not give up on the cancel either.

    A blocking NCCL init waits for a missing peer forever, and no abort reaches a communicator
    still being created; this wait is ours, so a dead peer or a newer generation ends it. A member
    that gives up takes its arrival back first, and cannot once all arrivals were there together:
    then a peer may already be creating the communicator, and this member goes on as well (the
    build is short with every member alive) rather than leave that peer hanging in it.
    """
    # No lease on it: an etcd blip that cost this process its lease must not make it vanish
    # while the others wait for it (the leader prunes old generations' stores).
    mine = f"arrived/{spec.rank_in_group}"
    store.mark(mine)
    keys = [f"arrived/{r}" for r in range(spec.world_size)]
    others = [k for k in keys if k != mine]
    try:
        store.wait_unless(keys, timeout, cancelled)
        return False
    except WaitCancelled as exc:
        why, error = str(exc), f"build of {spec.label} abandoned: {exc}"
    except StoreTimeout:
        arrived = set(store.list_keys())
        missing = [spec.ranks[r] for r, k in enumerate(keys) if k != mine and k not in arrived]
        why = f"timed out after {timeout.total_seconds():g}s"
        error = f"building {spec.label}: rank(s) {missing} never arrived within {timeout.total_seconds():g}s"
    if not store.withdraw(mine, others):
        log.info("groups.build_committed", group=spec.label, gen=spec.gen, why=why)
        return True
    log.info("groups.build_abandoned", group=spec.label, gen=spec.gen, why=why)
    raise GroupError(error)


def _gloo(store: dist.Store, spec: GroupSpec, timeout: timedelta, cancelled: Cancelled | None) -> Any:
    """gloo's constructor connects to every peer and returns only when all answered or its own
    connect loop gives up: minutes for a peer it cannot reach (a network partition; measured: 150 s
    with a 30 s timeout), during which this process would miss every newer plan. It runs on a
    helper thread (it releases the GIL) that the build stops waiting for at ``timeout`` or when
    ``cancelled`` gives a reason (a newer generation); an abandoned constructor ends by itself
    later and its group is dropped.

    Raises:
        GroupError: the connect did not finish in time, or the build was abandoned.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def connect() -> None:
        try:
            box["backend"] = dist.ProcessGroupGloo(store, spec.rank_in_group, spec.world_size, timeout)
        except BaseException as exc:  # handed to the building thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=connect, name=f"gloo-connect-{spec.label}", daemon=True).start()
    deadline = time.monotonic() + timeout.total_seconds()
    while not done.wait(0.02):
        why = cancelled() if cancelled is not None else None
        if why:
            log.info("groups.build_abandoned", group=spec.label, gen=spec.gen, why=why, stage="connect")
            raise GroupError(f"build of {spec.label} abandoned while connecting: {why}")
        if time.monotonic() > deadline:
            raise GroupError(f"building {spec.label} (rank {spec.rank_in_group} of {spec.world_size}): gloo's "
                             f"connect did not finish within {timeout.total_seconds():g}s (a peer it cannot reach)")
    if "error" in box:
        raise box["error"]
    return box["backend"]


def _nccl(store: dist.Store, spec: GroupSpec, device: torch.device, timeout: timedelta) -> Any:
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    # Blocking communicators: non-blocking ones make torch poll for every launch (~100 us a call
    # measured on H200), and abort() takes the same ~0.5 s either way.
    backend = dist.ProcessGroupNCCL(store, spec.rank_in_group, spec.world_size, opts)
    # Create the communicator now, so a missing peer shows up here and not in the first collective.
    backend.eager_connect_single_device(device)
    return backend
