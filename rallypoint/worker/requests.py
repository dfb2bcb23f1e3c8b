"""Inference requests, their journals, and the queue a replica's driver serves them from.

Every accepted request gets an id and a journal: the tokens generated so far. A token enters the
journal (and reaches the client) only once the step *after* the one that produced it finished in
the same generation: NCCL can complete the collective in flight at a peer's death with that peer's
share missing, and the next step is the one that hangs and gets aborted. On an abort the last,
uncommitted tokens are dropped and the request resumes after the rebuild by prefilling its prompt
and replaying its committed tokens, so the client sees one uninterrupted completion.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import ClassVar

from rallypoint.errors import RallypointError


class BadRequest(RallypointError):
    """A malformed request; the message says which field is wrong."""


class QueueFull(RallypointError):
    """The replica's queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"queue full, retry after {retry_after:g}s")
        self.retry_after = retry_after


class Draining(QueueFull):
    """The replica is draining before a node leaves: retry against another replica, or later."""

    def __init__(self, why: str, retry_after: float) -> None:
        RallypointError.__init__(self, f"not accepting requests: {why}")
        self.retry_after = retry_after


class LoopWaker:
    """Sets asyncio events of one event loop from another thread, with one wake-up of the loop
    per burst: a driver step that commits a token for each of 256 requests wakes the API's loop
    once, not 256 times (each wake-up is a write to the loop's self-pipe and a turn of the loop)."""

    _by_loop: ClassVar[dict[asyncio.AbstractEventLoop, LoopWaker]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[asyncio.Event] = []
        self._lock = threading.Lock()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopWaker:
        waker = cls._by_loop.get(loop)
        if waker is None:
            for old in [x for x in cls._by_loop if x.is_closed()]:
                del cls._by_loop[old]
            waker = cls._by_loop[loop] = cls(loop)
        return waker

    def wake(self, event: asyncio.Event) -> None:
        with self._lock:
            first = not self._pending
            self._pending.append(event)
        if first and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            events, self._pending = self._pending, []
        for event in events:
            event.set()


@dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are drawn. Sampling is seeded by (seed, position), so a request
    resumed elsewhere draws what it would have drawn; ``top_p`` 1 keeps the whole distribution."""

    max_tokens: int = 16
    temperature: float = 0.0
    seed: int = 0
    stop_at_eos: bool = True
    top_p: float = 1.0


@dataclass
class Request:
    """One completion request and its journal."""

    prompt: list[int]
    params: SamplingParams
    id: str = field(default_factory=lambda: "cmpl-" + uuid.uuid4().hex[:16])
    created: float = field(default_factory=time.time)
    committed: list[int] = field(default_factory=list)  # delivered to the client, final
    pending: list[int] = field(default_factory=list)  # produced, not yet confirmed by a later step
    finish_reason: str | None = None
    resumed: int = 0  # times it was held over an abort and resumed
    fed: int | None = None  # while resuming: how many committed tokens the new KV cache holds again
    error: str | None = None
    eos: frozenset[int] = frozenset()  # token ids that end it (when ``params.stop_at_eos``)
    on_cancel: Callable[[str], None] | None = field(default=None, repr=False)  # told of a cancel (API process)
    kv_to: int | None = None  # a prefill for a decode replica: its rank in the DP group (worker.disaggregation)
    kv_gen: int = 0  # ... of this generation
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _listeners: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def tokens_so_far(self) -> list[int]:
        """Prompt plus committed tokens: what a resumed request prefills."""
        return self.prompt + self.committed

    def last_known(self) -> tuple[int, int]:
        """(the last token this generation's KV cache holds, or will after this step; how many
        positions that is): a decode step's input, without building the token list."""
        if self.fed is not None:
            n = len(self.prompt) + self.fed
            return (self.committed[self.fed - 1] if self.fed else self.prompt[-1]), n
        n = len(self.prompt) + len(self.committed) + len(self.pending)
        last = self.pending[-1] if self.pending else self.committed[-1] if self.committed else self.prompt[-1]
        return last, n

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def propose(self, token: int) -> bool:
        """A step produced ``token``; it commits when the next step succeeds.

        While replaying, the token re-derives a committed one and is dropped; returns False when it
        differs from what was committed (the computation was not reproduced exactly).
        """
        if self.fed is not None:
            same = self.committed[self.fed] == token
            self.fed += 1
            if self.fed == len(self.committed):
                self.fed = None
            return same
        self.pending.append(token)
        return True

    def is_eos(self, tok: int) -> bool:
        return self.params.stop_at_eos and tok in self.eos

    def commit(self) -> None:
        """The steps that produced the pending tokens are confirmed: deliver them."""
        with self._cond:
            moved = False
            for tok in self.pending:
                if self.done:
                    break
                self.committed.append(tok)
                moved = True
                if self.is_eos(tok):
                    self.finish_reason = "stop"
                elif len(self.committed) >= self.params.max_tokens:
                    self.finish_reason = "length"
            self.pending.clear()
            if moved:
                self._changed()

    def cancel(self, reason: str) -> None:
        """End the request now (a stop string matched, the client went away): the driver frees
        its row at the next step and commits nothing more."""
        with self._cond:
            if self.done:
                return
            self.finish_reason = reason
            self._changed()
        if self.on_cancel is not None:
            self.on_cancel(reason)

    def listen(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (under the request's lock: keep it short) whenever tokens commit or it ends."""
        with self._cond:
            self._listeners.append(wake)

    def unlisten(self, wake: Callable[[], None]) -> None:
        with self._cond:
            if wake in self._listeners:
                self._listeners.remove(wake)

    def snapshot(self, start: int) -> tuple[list[int], str | None, str | None]:
        """(committed tokens past ``start``, finish reason, error), read together."""
        with self._cond:
            return self.committed[start:], self.finish_reason, self.error

    def mirror(self, new: list[int], finish: str | None, error: str | None) -> None:
        """Apply what the request's driver reported (this copy lives in the API process): more
        committed tokens, and its end. A copy already ended here (cancelled) only gains tokens."""
        with self._cond:
            self.committed += new
            if finish is not None and not self.done:
                self.finish_reason, self.error = finish, error
            self._changed()

    def _changed(self) -> None:
        """Wake whoever waits on this request (threads and event loops); holds ``_cond``."""
        self._cond.notify_all()
        for wake in self._listeners:
            wake()

    def rollback(self) -> None:
        """The generation was aborted: forget tokens no later step confirmed, and replay the rest.

        The resumed request prefills its prompt and then re-feeds its committed tokens one decode
        step at a time: the same kernels on the same shapes as the first time, so even in bf16 the
        KV cache, and the greedy tokens after it, come out as they would have without the abort.
        """
        with self._cond:
            self.pending.clear()
            self.resumed += 1
            self.fed = 0 if self.committed else None

    def resume_from(self, delivered: list[int]) -> None:
        """Continue a request another replica began (its driver died after ``delivered`` reached
        the client): the tokens are replayed like a rollback's, then generation goes on. When
        ``delivered`` already completes it (its last token, or an end of sequence, reached the
        client but the end of the stream did not), it is finished as it is."""
        self.committed = list(delivered)
        self.fed = 0 if delivered else None
        self.resumed += 1
        if delivered and self.is_eos(delivered[-1]):
            self.finish_reason = "stop"
        elif len(delivered) >= self.params.max_tokens:
            self.finish_reason = "length"

    def fail(self, why: str) -> None:
        with self._cond:
            self.error, self.finish_reason = why, "error"
            self._changed()

    async def stream_async(self, timeout: float = 600.0, start: int = 0,
                           idle: float | None = None) -> AsyncIterator[list[int]]:
        """Committed tokens past ``start`` as they arrive (each yield a list of new ones) until
        finished or ``timeout``, without a thread per waiting request (the driver's thread wakes
        the loop). One timer per request, not one per wait: 256 streams wait thousands of
        times a second, and a wait under ``asyncio.timeout`` costs about 3.7 us against 0.2 us
        for a plain one (uvloop, this project's CPU VM). With ``idle``, an empty list after each
        ``idle`` seconds without a token: the stream's heartbeat (its timer moves only when it
        fires)."""
        loop = asyncio.get_running_loop()
        waker = LoopWaker.of(loop)
        changed = asyncio.Event()

        def wake() -> None:
            waker.wake(changed)

        deadline = loop.time() + timeout
        last = loop.time()
        timer_at = min(deadline, last + idle) if idle else deadline
        timer = loop.call_at(timer_at, changed.set)
        self.listen(wake)
        try:
            sent = start
            while True:
                changed.clear()
                with self._cond:
                    new, done = self.committed[sent:], self.done
                now = loop.time()
                if new:
                    sent += len(new)
                    last = now
                    yield new
                elif idle and now - last >= idle - 0.005 and not done:  # timers may fire a little early
                    last = now
                    yield []  # a heartbeat
                if done or now >= deadline:
                    return
                if idle and now >= timer_at - 0.005:  # it fired: set the next (uvloop's handles have no when())
                    timer_at = min(deadline, last + idle)
                    timer = loop.call_at(timer_at, changed.set)
                await changed.wait()
        finally:
            timer.cancel()
            self.unlisten(wake)


class RequestQueue:
    """FIFO of accepted requests, bounded; also tracks the ones in flight for /health and /metrics."""

    def __init__(self, capacity: int = 256, retry_after: float = 1.0) -> None:
        self.capacity = capacity
        self.retry_after = retry_after
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._arrived = threading.Event()
        self.in_flight: dict[str, Request] = {}
        self.lock = threading.Lock()
        self.accepted = itertools.count()
        self.closed: str | None = None  # why new requests are refused (draining), or None
        self.counts = {"accepted": 0, "completed": 0, "rejected": 0, "resumed": 0, "failed": 0, "handed_off": 0,
                       "replay_mismatch": 0}

    def submit(self, req: Request) -> Request:
        """Accept ``req`` or raise ``QueueFull`` (or ``Draining``)."""
        with self.lock:
            if self.closed:
                self.counts["rejected"] += 1
                raise Draining(self.closed, self.retry_after)
            if self._waiting.qsize() + len(self.in_flight) >= self.capacity:
                self.counts["rejected"] += 1
                raise QueueFull(self.retry_after)
            self.counts["accepted"] += 1
            if req.resumed:
                self.counts["resumed"] += 1  # a request another replica's driver began
        self._waiting.put(req)
        self._arrived.set()
        return req

    async def submit_async(self, req: Request) -> Request:
        """``submit`` for the API's event loop (``worker.api.Admission``): it never blocks."""
        return self.submit(req)

    def nudge(self) -> None:
        """Wake a driver waiting in ``wait`` (work arrived that is not a new request)."""
        self._arrived.set()

    def wait(self, timeout: float) -> bool:
        """Block until a request is waiting (True) or ``timeout`` passes (False): an idle driver
        starts a request when it arrives, not at its next idle step (up to ``idle_every`` later)."""
        if self._waiting.qsize():
            return True
        arrived = self._arrived.wait(timeout)
        self._arrived.clear()  # a request put after this still shows in qsize() below
        return arrived or bool(self._waiting.qsize())

    def take(self, n: int, timeout: float = 0.0) -> list[Request]:
        """Up to ``n`` waiting requests, now in flight (waits up to ``timeout`` for the first)."""
        out: list[Request] = []
        try:
            out.append(self._waiting.get(timeout=timeout) if timeout else self._waiting.get_nowait())
            while len(out) < n:
                out.append(self._waiting.get_nowait())
        except queue.Empty:
            pass
        with self.lock:
            for r in out:
                self.in_flight[r.id] = r
        return out

    def finished(self, req: Request) -> None:
        with self.lock:
            self.in_flight.pop(req.id, None)
            self.counts["failed" if req.error else "completed"] += 1

    def hand_off(self, held: list[Request], why: str) -> list[Request]:
        """This process stops driving a replica: end ``held`` and every waiting request with
        ``finish_reason`` "error", so their streams close and the gateway resumes each on a
        serving driver from the tokens it delivered. Returns them all."""
        out = list(held)
        try:
            while True:
                out.append(self._waiting.get_nowait())
        except queue.Empty:
            pass
        for r in out:
            r.fail(f"handed off: {why}")
        with self.lock:
            for r in out:
                self.in_flight.pop(r.id, None)
            self.counts["handed_off"] += len(out)
        return out

    def close(self, why: str) -> None:
        """Refuse new requests (the ones accepted still run to the end)."""
        with self.lock:
            self.closed = why

    def reopen(self) -> None:
        with self.lock:
            self.closed = None

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    @property
    def running(self) -> int:
        """Requests being generated now."""
        return len(self.in_flight)
