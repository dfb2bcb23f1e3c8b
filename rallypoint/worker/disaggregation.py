"""Disaggregated prefill and decode (``[layout] prefill_replicas``): a decode replica has its long
prompts prefilled on a prefill replica, which sends it the KV cache.

The decode side drives it. Its driver hands each new request whose prompt is at least
``disaggregate_tokens`` long to ``RemotePrefill``, whose thread asks a prefill replica's API for
a one-token completion with ``kv_to`` (this rank in the DP group) and ``kv_gen`` (this
generation). The prefill replica's driver prefills it like any request; the step that draws the
first token also commits it, and right after that step its driver sends the row's KV with
``kv_transfer.send`` (``PrefillSender``) while its API answers the decode side with that token.
The answer tells the asking thread the KV is on its way; it receives it at once, on the
generation's DP group it holds (never the next one's), and hands it to the driver, which places
it in a free cache row (``kv_transfer.place``) between two steps: the request decodes from its
first token as if it had prefilled here. The decode replica's serving thread never waits for a
transfer, and the prefill replica's waits only for the answer to reach the decode side.

Every entry of the decode side's ``KVBuffer`` is freed once: placed, broken off, too old, or the
generation it belongs to ended. Whatever goes wrong — no prefill replica up, its API refusing or
gone, the transfer broken off because it died, a generation switch in between — the request is
prefilled where it is (colocated), with the same tokens.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch

from rallypoint.comm.collectives import Comm
from rallypoint.errors import RallypointError
from rallypoint.groups.group import Group
from rallypoint.log import get_logger
from rallypoint.worker import kv_transfer
from rallypoint.worker.kv_transfer import KVBuffer, KVEntry, TransferError
from rallypoint.worker.model import StageModel
from rallypoint.worker.requests import Request

T = TypeVar("T")

log = get_logger("disaggregation")

TRANSFER_LIMIT = 10.0  # seconds a serving thread waits for one transfer before it gives up on it


def abandonable(fn: Callable[[], T], group: Group, what: str, limit: float = TRANSFER_LIMIT,
                late: Callable[[T], None] | None = None) -> T:
    """Run a transfer (``fn``) on a helper thread and wait for it while the DP group is up, at
    most ``limit`` seconds. gloo's ``abort()`` does not wake a send or receive blocked in
    ``wait()`` (measured: a receive whose peer would never send returned at gloo's own 30 s
    timeout, the generation switch waiting behind it), and a ``wait`` with a timeout closes the
    connection for good; so the caller stops waiting when ``group`` is aborted instead, and the
    abandoned helper ends by itself with its group; should it still finish, ``late`` gets what it
    made (a received entry, to free).

    Raises:
        TransferError: the group was aborted, or the limit passed, before the transfer finished;
            or the transfer's own error.
    """
    box: dict[str, Any] = {}
    done = threading.Event()
    lock = threading.Lock()

    def run() -> None:
        try:
            if group.device.type == "cuda":
                torch.cuda.set_device(group.device)  # per thread: the helper's is not the serving thread's
            out = fn()
            with lock:
                box["out"] = out
                gone = "abandoned" in box
            if gone and late is not None:
                late(out)
        except BaseException as exc:  # handed to the serving thread
            box["error"] = exc
        finally:
            done.set()

    def give_up(why: str) -> TransferError:
        with lock:
            box["abandoned"] = True
            out = box.get("out")
        if out is not None and late is not None:  # finished just now: freed all the same
            late(out)
        return TransferError(f"{what} given up: {why}")

    threading.Thread(target=run, name="rallypoint-kv-transfer", daemon=True).start()
    deadline = time.monotonic() + limit
    while not done.wait(0.005):
        if group.aborted_reason is not None:
            raise give_up(f"{group.label} aborted: {group.aborted_reason}")
        if time.monotonic() > deadline:
            raise give_up(f"no end after {limit:g}s")
    if "error" in box:
        raise box["error"]
    return box["out"]


@dataclass
class Peer:
    """A prefill replica: its rank in the DP group and its API."""

    dp_rank: int
    url: str


class PrefillSender:
    """The prefill side: sends the KV of the requests its driver prefilled for a decode replica,
    over ``group`` (generation ``gen``'s DP group)."""

    def __init__(self, model: StageModel, comm: Comm, group: Group, gen: int,
                 counts: dict[str, int] | None = None) -> None:
        self.model, self.comm, self.group, self.gen = model, comm, group, gen
        self.counts = counts if counts is not None else {}

    def __call__(self, row: int, r: Request) -> None:
        """Send request ``r``'s prompt KV (cache row ``row``) and first token to ``r.kv_to``;
        a failure is logged (the decode side prefills the request itself)."""
        if r.kv_to is None or not r.committed:
            return  # (the driver admits only the prefills asked in this sender's generation)
        layers = kv_transfer.row_kv(self.model, row, len(r.prompt))  # copies: the row may be reused meanwhile
        dst, first = r.kv_to, r.committed[0]
        log.info("disaggregation.sending", request=r.id, to=dst, gen=self.gen, positions=len(r.prompt))
        try:
            abandonable(lambda: kv_transfer.send(self.comm, dst, r.id, layers, first, group=self.group), self.group,
                        f"sending the KV of {r.id} to DP rank {dst}")
            self.counts["kv_sent"] = self.counts.get("kv_sent", 0) + 1
        except (RallypointError, RuntimeError) as exc:
            self.counts["kv_send_failed"] = self.counts.get("kv_send_failed", 0) + 1
            log.warning("disaggregation.send_failed", request=r.id, to=r.kv_to, gen=self.gen, error=str(exc))


class RemotePrefill:
    """The decode side: which requests go to a prefill replica, and the thread that asks one and
    receives the KV (the serving thread only places what arrived).

    Args:
        dp_rank: this replica's rank in the DP group.
        gen: the generation.
        comm, group: the collectives, and the generation's DP group the transfers run on (held:
            a thread of an ended generation never touches the next one's).
        peers: the prefill replicas to ask, each with its API's URL (looked up when needed).
        prefill_replicas: how many the plan has: one asking thread each, so each prefill replica
            has at most one transfer to this replica in flight, and what arrives from it is what
            was asked of it.
        min_tokens: prompts at least this long go to a prefill replica.
        wake: wakes the driver when KV is ready to place, or a request is back.
        api_key: the deployment's API key, if it has one.
        counts: the queue's request counts (``prefilled_remotely``, ``prefill_fallbacks``, and the
            buffer's ``kv_received``/``kv_freed``), reported in beats and metrics.
    """

    def __init__(self, dp_rank: int, gen: int, comm: Comm, group: Group, peers: Callable[[], list[Peer]],
                 min_tokens: int, wake: Callable[[], None], api_key: str | None = None, timeout: float = 60.0,
                 counts: dict[str, int] | None = None, prefill_replicas: int = 1) -> None:
        self.dp_rank, self.gen, self.comm, self.group = dp_rank, gen, comm, group
        self.peers, self.min_tokens, self.wake, self.api_key, self.timeout = peers, min_tokens, wake, api_key, timeout
        self.counts = counts if counts is not None else {}
        for k in ("prefilled_remotely", "prefill_fallbacks"):
            self.counts.setdefault(k, 0)
        self.buffer = KVBuffer(ttl=30.0, counts=self.counts)
        self.todo: deque[Request] = deque()  # to ask a prefill replica for, in order
        self.ready: deque[tuple[Request, KVEntry]] = deque()  # received, waiting for a cache row
        self.back: deque[Request] = deque()  # to prefill here after all
        self._local: set[str] = set()  # fell back: prefilled here, never asked again
        self._asking: dict[int, Request] = {}  # prefill replica -> the request it is asked for
        self._lock = threading.Condition()
        self._closed = False
        for replica in range(max(1, prefill_replicas)):
            threading.Thread(target=self._run, args=(replica,), name=f"rallypoint-remote-prefill-{replica}",
                             daemon=True).start()

    # -- the driver's side (its serving thread) --------------------------------------------------

    def wants(self, r: Request) -> bool:
        """Whether ``r`` should be prefilled on a prefill replica: a new request (not resumed)
        with a long prompt."""
        return not self._closed and r.fed is None and not r.committed and not r.resumed \
            and len(r.prompt) >= self.min_tokens and r.id not in self._local

    def start(self, r: Request) -> None:
        with self._lock:
            self.todo.append(r)
            self._lock.notify()

    @property
    def actionable(self) -> bool:
        """The driver has something to do: KV to place, a request back."""
        return bool(self.ready or self.back)

    @property
    def in_progress(self) -> bool:
        """Requests are somewhere on the way (a prefill replica is being asked, or sending)."""
        return self.actionable or bool(self.todo or self._asking)

    def take_ready(self) -> tuple[Request, KVEntry] | None:
        """The next request whose KV arrived, with its entry (out of the buffer: the driver places
        it); entries nobody took for the buffer's TTL are freed here and their requests sent back."""
        for rid in self.buffer.expire():
            log.warning("disaggregation.expired", request=rid)
        while self.ready:
            r, entry = self.ready.popleft()
            try:
                got = r, self.buffer.take(entry.rid)
                self.counts["prefilled_remotely"] += 1
                return got
            except TransferError as exc:  # expired while it waited for a row
                self._fall_back(r, str(exc))
        return None

    def close(self) -> list[Request]:
        """The generation ended: free every entry, and return the requests on their way (to be
        prefilled in the next generation, wherever they run)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
            out = [r for r, _ in self.ready] + list(self.back) + list(self.todo) + list(self._asking.values())
            self.ready.clear()
            self.back.clear()
            self.todo.clear()
            self._asking.clear()
        for rid in list(self.buffer.entries):
            self.buffer.drop(rid, "failed")
        return [r for r in out if not r.done]

    # -- the asking thread -----------------------------------------------------------------------

    def _fall_back(self, r: Request, why: str) -> None:
        self.counts["prefill_fallbacks"] += 1
        self._local.add(r.id)
        log.info("disaggregation.fallback", request=r.id, gen=self.gen, why=why)
        with self._lock:
            if not self._closed:
                self.back.append(r)
        self.wake()

    def _free_late(self, entry: KVEntry) -> None:
        """A receive this replica gave up on finished after all: free what it brought."""
        self.buffer.drop(entry.rid, "failed")

    def _run(self, replica: int) -> None:
        """The asking thread of prefill replica ``replica``: one request at a time."""
        while True:
            with self._lock:
                while not self.todo and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                r = self._asking[replica] = self.todo.popleft()
            if r.done:  # cancelled while it waited
                with self._lock:
                    self._asking.pop(replica, None)
                continue
            try:
                entry = self._prefill_remotely(r, replica)
            except (OSError, ValueError, KeyError, RallypointError) as exc:  # TransferError included
                with self._lock:
                    self._asking.pop(replica, None)
                self._fall_back(r, f"{type(exc).__name__}: {exc}" if not isinstance(exc, TransferError) else str(exc))
                continue
            with self._lock:
                self._asking.pop(replica, None)
                if self._closed:  # the generation ended meanwhile: its requests went back already
                    self.buffer.drop(entry.rid, "failed")
                    return
                self.ready.append((r, entry))
            self.wake()

    def _prefill_remotely(self, r: Request, replica: int) -> KVEntry:
        """Ask prefill replica ``replica`` to prefill ``r`` and send its KV here, and receive it
        (one transfer at a time from each, so what arrives is what was asked for)."""
        src, rid = self._ask(r, replica)
        log.info("disaggregation.receiving", request=r.id, prefill_id=rid, src=src, gen=self.gen)
        entry = abandonable(partial(self.buffer.receive, self.comm, src, group=self.group), self.group,
                            f"receiving the KV of {rid} from DP rank {src}", late=self._free_late)
        if entry.rid != rid:  # cannot happen with one transfer at a time; never place it
            self.buffer.drop(entry.rid, "failed")
            raise TransferError(f"received the KV of {entry.rid}, not of {rid}")
        return entry

    def _ask(self, r: Request, replica: int) -> tuple[int, str]:
        """Ask prefill replica ``replica`` to prefill ``r`` and send its KV here; returns (its DP
        rank, the request's id there, which the transfer carries). Raises on any failure (the
        request falls back)."""
        peer = next((p for p in self.peers() if p.dp_rank == replica), None)
        if peer is None:
            raise RallypointError(f"prefill replica {replica} is not serving")
        p = r.params
        body = {"prompt": r.prompt, "max_tokens": 1, "temperature": p.temperature, "seed": p.seed,
                "top_p": p.top_p, "kv_to": self.dp_rank, "kv_gen": self.gen}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(peer.url + "/v1/completions", data=json.dumps(body).encode(), headers=headers)
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                got = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RallypointError(f"{peer.url} answered {exc.code}: {exc.read()[:200]!r}") from None
        choice = got["choices"][0]
        if choice.get("finish_reason") not in ("length", "stop") or len(choice["token_ids"]) != 1:
            raise RallypointError(f"{peer.url} did not prefill: {choice.get('finish_reason')}")
        log.debug("disaggregation.prefilled", request=r.id, peer=peer.url, seconds=round(time.monotonic() - t0, 4))
        return peer.dp_rank, str(got["id"])
