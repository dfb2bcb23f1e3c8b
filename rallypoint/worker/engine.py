"""The serving loop of one rank of a replica, and the driver that schedules it.

Every rank of a DP replica runs the same step, in lockstep: the replica's driver (its first rank:
PP stage 0, TP rank 0) decides what the step is and broadcasts a fixed-size header to its TP group;
each stage runs its layers and hands ``{header, hidden}`` to the next stage; the last stage samples
the next token of every row and sends them back to the first stage. A step is one of:

* PREFILL: requests that start (new, or resumed after an abort) fill their KV-cache rows, several
  in one forward (right-padded to the longest), at most ``prefill_tokens`` positions a step: a
  long prompt fills in chunks over several PREFILL steps, and DECODE steps of the running rows
  take turns with them, so one long prompt does not stall every stream;
* DECODE: every active row advances one token; the step covers cache rows ``0..B-1`` (the driver
  keeps requests in the lowest free rows) and the first ``kv_len`` positions (a power of two), so
  its shapes come from a small set and a CUDA graph per shape can replay it (``worker.graphs``);
* IDLE: nothing to compute; it still crosses the pipeline, proving the replica alive (and so
  confirming the tokens of the previous step) and keeping collectives inside their deadlines;
* SWITCH: the replica leaves the generation at this step boundary, every rank together.

Continuous batching: a request joins the running batch as soon as a cache row is free. Sampling
runs on the device, for every row at once: greedy rows take the argmax, sampled rows a Gumbel-max
draw whose noise is a hash of (seed, position, token), so a row draws the same token whatever the
batch around it and a resumed request draws what it would have drawn.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from rallypoint.comm.collectives import Comm
from rallypoint.groups.group_set import GroupSet
from rallypoint.log import get_logger
from rallypoint.worker.requests import Request, RequestQueue

if TYPE_CHECKING:
    from rallypoint.worker.disaggregation import PrefillSender, RemotePrefill
    from rallypoint.worker.kv_transfer import KVEntry

log = get_logger("engine")

IDLE, PREFILL, DECODE, SWITCH = 0, 1, 2, 3
_TEMP_SCALE = 1_000_000  # temperatures travel as integers in the int64 header


class StageLike(Protocol):
    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None,
                kv_len: int | None = None, last: torch.Tensor | None = None) -> torch.Tensor: ...


class DecodeRunner(Protocol):
    """Runs a DECODE step's forward (``worker.graphs.DecodeGraphs``: a CUDA graph replay)."""

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class EngineSettings:
    max_batch: int = 8
    max_seq: int = 512
    idle_every: float = 0.05  # seconds between idle steps when there is nothing to do
    prefill_tokens: int = 4096  # the most prompt positions one PREFILL step computes (padding included)
    overlap: bool = True  # a whole model on one rank: launch the next decode step before reading this one's tokens


# header: [kind, B, S, switch_gen, kv_len] + rows, starts, lens, seeds, temps, top_ps (max_batch each)
_FIXED = 5
ROWS, STARTS, LENS, SEEDS, TEMPS, TOP_PS = range(6)


def header_size(max_batch: int) -> int:
    return _FIXED + 6 * max_batch


def _field(hdr: torch.Tensor, mb: int, which: int, b: int) -> torch.Tensor:
    at = _FIXED + which * mb
    return hdr[at:at + b]


KV_FLOOR = 256  # the shortest KV length a decode step attends over


def kv_bucket(needed: int, max_seq: int) -> int:
    """The KV length a step attends over: the next power of two >= ``needed`` (at least
    ``KV_FLOOR``), at most ``max_seq``. Few distinct values, so few CUDA graphs."""
    n = KV_FLOOR
    while n < needed:
        n *= 2
    return min(n, max_seq)


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (in int64 arithmetic that cannot overflow)."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[B, V]`` that depends only on (seed, position, token id)."""
    key = _mix32(_mix32(seeds ^ (seeds >> 32)) ^ _mix32(positions + 0x9E3779B1))          # [B]
    tok = torch.arange(vocab, device=seeds.device)                                       # [V]
    bits = _mix32(key[:, None] ^ _mix32(tok * 0x27D4EB2F + 0x165667B1)[None, :])         # [B, V]
    u = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))                                   # (0, 1)
    return -torch.log(-torch.log(u))


def sample(logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
           top_ps: torch.Tensor | None = None, hot: bool = True) -> torch.Tensor:
    """Next token per row, on the logits' device: argmax at temperature 0, else a draw from
    softmax(logits / T) (restricted to the top-p nucleus) seeded by (seed, position).

    logits: [B, V] float32; temps, seeds, positions, top_ps: [B] int64 (temps and top_ps scaled by
    1e6). ``hot``: whether any row samples (the driver knows it on the host; False skips the draw).
    """
    greedy = logits.argmax(dim=-1)
    if not hot:
        return greedy
    t = (temps.float() / _TEMP_SCALE).clamp_min(1e-6)[:, None]                            # [B, 1]
    logp = torch.log_softmax(logits.float() / t, dim=-1)                                  # [B, V]
    if top_ps is not None:
        p = (top_ps.float() / _TEMP_SCALE)[:, None]                                       # [B, 1]
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        probs = sorted_logp.exp()
        drop_sorted = probs.cumsum(-1) - probs >= p          # mass before this token already reaches p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    drawn = (logp + gumbel_noise(seeds, positions, logits.shape[-1])).argmax(dim=-1)
    return torch.where(temps > 0, drawn, greedy)


@torch.no_grad()
def warm_prefill(model: StageLike, max_seq: int, prefill_tokens: int) -> None:
    """Run a few prefill forwards and a draw on throwaway prompts, so the kernels a prefill
    uses are loaded (CUDA loads each on first use) before a real request needs them: a warm
    spare's first step after adoption is a resumed request's prefill. Writes the KV cache of
    row 0: only before any request (reset the cache after)."""
    device = next(model.parameters()).device
    for s in sorted({min(n, prefill_tokens, max_seq - 1) for n in (8, 64, 512)}):
        x = torch.zeros(1, s, dtype=torch.int64, device=device)
        pos = torch.arange(s, device=device)[None]
        rows = torch.zeros(1, dtype=torch.int64, device=device)
        out = model.forward(x, pos, rows, kv_bucket(s, max_seq), torch.full((1,), s - 1, device=device))
        one = torch.ones(1, dtype=torch.int64, device=device)
        sample(out[:, -1, :], one, one, one, one)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model: StageLike, comm: Comm, groups: GroupSet, max_batch: int, device: torch.device,
         header: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
         decode: DecodeRunner | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one replica step on this rank; return (header on the host, next tokens on the first
    stage else None).

    ``header`` is the driver's (on the host); other ranks receive it. ``decode`` runs DECODE
    forwards when given (CUDA graphs; a whole model on one rank only).
    """
    mb = max_batch
    if groups.is_first_stage:
        if groups.tp_size > 1:
            hdr_dev = header.to(device) if header is not None else torch.zeros(header_size(mb), dtype=torch.int64,
                                                                                device=device)
            comm.broadcast(hdr_dev, src=0, group="tp")
            hdr = header if header is not None else hdr_dev.cpu()
        else:
            assert header is not None, "a TP group of one is its own driver"
            hdr = hdr_dev = header
        kind, b, s = (int(v) for v in hdr[:3].tolist())
        x = None
        if kind in (PREFILL, DECODE):
            x = tokens.to(device, non_blocking=True) if tokens is not None else torch.empty(b * s, dtype=torch.int64,
                                                                                            device=device)
            if groups.tp_size > 1:
                comm.broadcast(x, src=0, group="tp")
            x = x.view(b, s)
    else:
        assert groups.pp_prev is not None, "a later stage has a previous one"
        got = comm.recv_dict(src=groups.pp_prev, group="pp")
        hdr_dev, x = got["hdr"], got.get("h")
        hdr = hdr_dev.cpu()
        kind, b, s = (int(v) for v in hdr[:3].tolist())
    out = None
    if kind in (PREFILL, DECODE):
        kv_len = int(hdr[4])
        if hdr_dev.device != device:
            hdr_dev = hdr_dev.to(device, non_blocking=True)  # one copy; every field is a slice of it
        starts = _field(hdr_dev, mb, STARTS, b)
        pos = starts[:, None] + torch.arange(s, device=device)[None, :]                  # [B, S]
        assert x is not None, "a compute step carries its tokens or hidden states"
        if kind == DECODE:
            out = decode(x, pos, kv_len) if decode is not None else model.forward(x, pos, None, kv_len)
        else:
            last = _field(hdr_dev, mb, LENS, b) - 1 if groups.is_last_stage else None
            out = model.forward(x, pos, _field(hdr_dev, mb, ROWS, b), kv_len, last)
    if not groups.is_last_stage:
        assert groups.pp_next is not None, "an earlier stage has a next one"
        comm.send_dict({"hdr": hdr_dev.to(device), **({"h": out} if out is not None else {})}, dst=groups.pp_next,
                       group="pp")
    nxt = None
    if groups.is_last_stage:
        if out is not None:
            produced_at = _field(hdr_dev, mb, STARTS, b) + _field(hdr_dev, mb, LENS, b)  # the token's position
            nxt = sample(out[:, -1, :], _field(hdr_dev, mb, TEMPS, b), _field(hdr_dev, mb, SEEDS, b), produced_at,
                         _field(hdr_dev, mb, TOP_PS, b), hot=bool((_field(hdr, mb, TEMPS, b) > 0).any()))
        else:
            nxt = torch.empty(0, dtype=torch.int64, device=device)
        if groups.pp_size > 1:
            comm.send_dict({"next": nxt}, dst=0, group="pp")
            nxt = None
    if groups.is_first_stage and groups.pp_size > 1:
        nxt = comm.recv_dict(src=groups.pp_size - 1, group="pp")["next"]
    return hdr, nxt


class Driver:
    """The replica's scheduler: owns the cache rows, the journal commits and the held requests."""

    def __init__(self, queue: RequestQueue, settings: EngineSettings, device: torch.device) -> None:
        self.queue = queue
        self.settings = settings
        self.device = device
        self.rows: dict[int, Request] = {}
        self.held: deque[Request] = deque()  # in flight at an abort; resumed first
        self.switch_to = 0  # a newer generation to move to at the next step boundary
        self.first_commit_at = 0.0  # wall time the current generation first committed a token
        self.filling: dict[int, tuple[list[int], int]] = {}  # row -> (sequence to prefill, positions in the cache)
        self._filled: dict[int, int] = {}  # what the planned step adds to ``filling``
        self._last_kind = IDLE
        # disaggregated serving (worker.disaggregation), set for each generation by the worker:
        self.remote: RemotePrefill | None = None  # a decode replica: long prompts prefilled elsewhere
        self.place_kv: Callable[[int, KVEntry], None] | None = None  # a received KV into a cache row
        self.send_kv: PrefillSender | None = None  # a prefill replica: a row's KV to its decode replica
        self._outbox: list[tuple[int, Request]] = []

    def _next_waiting(self) -> Request | None:
        """The next request to start: held ones first, then the ones a prefill replica did not
        prefill after all, then the queue; cancelled ones are finished."""
        while True:
            if self.held:
                r = self.held.popleft()
            elif self.remote is not None and self.remote.back:
                r = self.remote.back.popleft()
            else:
                got = self.queue.take(1)
                if not got:
                    return None
                r = got[0]
            if not r.done:
                return r
            self.queue.finished(r)  # cancelled while it waited (a stop string, the client went away)

    def _admit(self) -> None:
        """Seat waiting requests in the lowest free rows; their prompts fill over PREFILL steps."""
        free = [r for r in range(self.settings.max_batch) if r not in self.rows]
        while free:
            got = self.remote.take_ready() if self.remote is not None else None
            if got is not None:  # prefilled on a prefill replica: its KV into a row, on from its first token
                req, entry = got
                row = free.pop(0)
                assert self.place_kv is not None, "a driver with a RemotePrefill places what it receives"
                self.place_kv(row, entry)
                self.rows[row] = req
                req.propose(entry.first_token)
                continue
            r = self._next_waiting()
            if r is None:
                return
            if r.kv_to is not None and (self.send_kv is None or r.kv_gen != self.send_kv.gen):
                # its decode replica must not wait for KV this driver will not send
                r.fail(f"not a prefill replica of generation {r.kv_gen}")
                self.queue.finished(r)
                continue
            if self.remote is not None and r.kv_to is None and self.remote.wants(r):
                self.remote.start(r)
                continue
            row = free.pop(0)
            self.rows[row] = r
            self.filling[row] = (r.prompt if r.fed is not None else r.tokens_so_far, 0)

    def _chunks(self) -> list[tuple[int, int, int]]:
        """(row, start, length) of the prompt chunks the next PREFILL step computes: rows in order,
        each as much as is left of ``prefill_tokens`` (a long prompt takes several steps, and
        decode steps run between them)."""
        budget, out = self.settings.prefill_tokens, []
        for row in sorted(self.filling):
            seq, start = self.filling[row]
            take = min(len(seq) - start, budget)
            if take <= 0:
                break
            out.append((row, start, take))
            budget -= take
        return out

    def plan(self) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, Request]]]:
        """Decide the next step: (header on the host, tokens, [(output index, request)] producing a token)."""
        mb = self.settings.max_batch
        if self.switch_to:
            hdr = torch.zeros(header_size(mb), dtype=torch.int64)
            hdr[0], hdr[3] = SWITCH, self.switch_to
            return hdr, None, []
        fields: list[list[int]] = [[0] * mb for _ in range(6)]
        toks: list[int] = []
        produced: list[tuple[int, Request]] = []
        self._admit()
        active = {row: r for row, r in self.rows.items()
                  if row not in self.filling and (r.fed is not None or not self._exhausted(r))}
        self._filled = {}
        if self.filling and not (active and self._last_kind == PREFILL):  # prefill and decode take turns
            chunks = self._chunks()
            # every row's padding must stay inside its cache row: start + S <= max_seq
            cap = self.settings.max_seq - max(start for _, start, _ in chunks)
            chunks = [(row, start, min(n, cap)) for row, start, n in chunks]
            s = max(n for _, _, n in chunks)
            kind, b, kv_len = PREFILL, len(chunks), max(start + n for _, start, n in chunks)
            for i, (row, start, n) in enumerate(chunks):
                r = self.rows[row]
                seq = self.filling[row][0]
                self._put(fields, i, r, row, start, n)
                toks += seq[start:start + n]
                toks += [0] * (s - n)
                self._filled[row] = start + n
                if start + n == len(seq):  # the prompt's last chunk gives the first token
                    produced.append((i, r))
        else:
            kind, s = (DECODE, 1) if active else (IDLE, 0)
            b = max(active) + 1 if active else 0
            toks = [0] * b  # a free, filling or finished row in 0..b-1 computes a throwaway token
            longest = 0
            for row, r in active.items():
                last, n = r.last_known()
                self._put(fields, row, r, row, n - 1, 1)
                toks[row] = last
                produced.append((row, r))
                longest = max(longest, n)
            kv_len = kv_bucket(longest, self.settings.max_seq) if active else 0
        self._last_kind = kind
        hdr = torch.tensor([kind, b, s, 0, kv_len] + [v for f in fields for v in f], dtype=torch.int64)
        tokens = torch.tensor(toks, dtype=torch.int64) if toks else None
        if self.device.type == "cuda":  # copied to the device without a staging copy
            hdr = hdr.pin_memory()
            tokens = tokens.pin_memory() if tokens is not None else None
        return hdr, tokens, produced

    def plan_ahead(self, hdr: torch.Tensor, produced: list[tuple[int, Request]],
                   nxt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, Request]]] | None:
        """The DECODE step after the launched one ``(hdr, produced, nxt)``, planned before its
        tokens are read: the same rows, one position further, fed ``nxt`` where it lies (on the
        device). None when the next step could be any other: a switch is asked for, a request
        waits for a row or fills one, a row replays committed tokens (its input is not ``nxt``),
        is done, or may be by the launched step (its EOS is pending, or ``max_tokens``).

        A row whose launched step draws EOS computes one throwaway token in this step; ``done``
        frees the row before it could record it. Tokens are the ones ``plan`` would give.
        """
        mb = self.settings.max_batch
        if int(hdr[0]) != DECODE or self.switch_to or self.filling or self.held:
            return None
        if self.queue.waiting and len(self.rows) < mb:
            return None
        if self.remote is not None and self.remote.actionable:  # KV to place, or a request back
            return None
        if len(produced) != len(self.rows):
            return None
        for row, r in produced:
            if self.rows.get(row) is not r or r.fed is not None or r.done:
                return None
            made = len(r.committed) + len(r.pending)
            if made + 2 > r.params.max_tokens or (r.pending and r.is_eos(r.pending[-1])):
                return None
        b = int(hdr[1])
        nxt_hdr = hdr.clone()
        starts = nxt_hdr[_FIXED + STARTS * mb:_FIXED + STARTS * mb + b]  # a view: written in place
        rows = torch.tensor([row for row, _ in produced])
        starts[rows] += 1
        nxt_hdr[4] = kv_bucket(int(starts[rows].max()) + 1, self.settings.max_seq)
        if self.device.type == "cuda":
            nxt_hdr = nxt_hdr.pin_memory()
        return nxt_hdr, nxt, produced

    @staticmethod
    def _put(fields: list[list[int]], i: int, r: Request, row: int, start: int, length: int) -> None:
        p = r.params
        for which, value in ((ROWS, row), (STARTS, start), (LENS, length), (SEEDS, p.seed),
                             (TEMPS, round(p.temperature * _TEMP_SCALE)), (TOP_PS, round(p.top_p * _TEMP_SCALE))):
            fields[which][i] = value

    def _exhausted(self, r: Request) -> bool:
        made = len(r.committed) + len(r.pending)
        last = (r.committed + r.pending)[-1] if made else None
        return made >= r.params.max_tokens or (last is not None and r.is_eos(last)) or r.done

    def done(self, produced: list[tuple[int, Request]], nxt: torch.Tensor | None) -> None:
        """The step succeeded: confirm earlier tokens, then record this step's (uncommitted)."""
        for row, upto in self._filled.items():
            if row in self.filling:
                seq = self.filling[row][0]
                if upto >= len(seq):
                    del self.filling[row]
                else:
                    self.filling[row] = (seq, upto)
        self._filled = {}
        for row, r in list(self.rows.items()):
            had = len(r.committed)
            r.commit()
            if not self.first_commit_at and len(r.committed) > had:
                self.first_commit_at = time.time()
            if r.done:
                del self.rows[row]
                self.filling.pop(row, None)
                self.queue.finished(r)
        if produced and nxt is not None:
            got = nxt.tolist()
            live = {id(r): row for row, r in self.rows.items()}
            for i, r in produced:
                if id(r) not in live:
                    continue
                if not r.propose(int(got[i])):
                    self.queue.counts["replay_mismatch"] += 1
                    log.warning("engine.replay_mismatch", request=r.id, position=len(r.prompt) + (r.fed or 0))
                if r.kv_to is not None and self.send_kv is not None:
                    # a prefill for a decode replica: its token goes out now (the decode side then
                    # receives the KV), and the KV right after this step; the row is freed after that
                    r.commit()
                    self._outbox.append((live[id(r)], r))

    def send_prefilled(self) -> None:
        """A prefill replica: send the KV of the requests the last step prefilled for decode replicas."""
        out, self._outbox = self._outbox, []
        for row, r in out:
            assert self.send_kv is not None  # only set with it
            self.send_kv(row, r)

    def hold(self) -> list[Request]:
        """The generation was aborted: drop unconfirmed tokens, keep every request for resumption
        (those on their way to or from a prefill replica too: they prefill in the next generation)."""
        held = [r for _, r in sorted(self.rows.items()) if r.kv_to is None]  # a prefill for another replica ends
        for r in held:
            r.rollback()
            self.queue.counts["resumed"] += 1
        for r in (r for r in self.rows.values() if r.kv_to is not None):
            if not r.done:
                r.fail("the prefill replica's generation ended before its KV was sent")
            self.queue.finished(r)
        if self.remote is not None:
            held += self.remote.close()
            self.remote = None
        self.rows.clear()
        self.filling.clear()
        self._filled = {}
        self._outbox = []
        self.held.extendleft(reversed(held))
        return held

    def hand_off(self, why: str) -> list[Request]:
        """This process no longer drives a replica: give up every request it holds or queued
        (see ``RequestQueue.hand_off``); the queue refuses new ones until it drives again."""
        self.queue.close(why)
        self.hold()
        held = list(self.held)
        self.held.clear()
        return self.queue.hand_off(held, why)

    @property
    def busy(self) -> bool:
        """Requests are in this driver's hands (rows, held, queued, or on their way to or from a
        prefill replica)."""
        return self.needs_step or (self.remote is not None and self.remote.in_progress)

    @property
    def needs_step(self) -> bool:
        """There is something for the next step to do (else the driver waits for work)."""
        return bool(self.rows or self.held or self.queue.waiting or (self.remote is not None and self.remote.actionable))


def serve_generation(model: StageLike, comm: Comm, groups: GroupSet, settings: EngineSettings,
                     device: torch.device, driver: Driver | None, should_stop: Any = lambda: False,
                     decode: DecodeRunner | None = None, lockstep: bool = False) -> int:
    """Run steps until a SWITCH step (returns its generation) or ``should_stop()`` (returns 0).

    ``lockstep``: the replicas share their experts over the ``ep`` group (``[layout] ep = "dp"``,
    each a single rank): every step is agreed with the others first (``_agree``), and a replica
    with nothing to compute serves its experts to those that do.

    Raises:
        GenerationAborted: a collective of this generation was aborted; the caller holds the
            requests (driver) and waits for the next plan.
    """
    if driver is not None:
        overlap = settings.overlap and groups.tp_size == 1 and groups.pp_size == 1 and not lockstep
        return _drive(model, comm, groups, settings, device, driver, should_stop, decode, overlap, lockstep)
    while True:
        hdr, _ = step(model, comm, groups, settings.max_batch, device, decode=decode)
        if int(hdr[0]) == SWITCH:
            return int(hdr[3])


class _Launched:
    """A step on its way: its header, the requests it produces for, and its tokens (on the
    device), copied to the host behind it. Reading them waits for this step only: ``tolist()``
    on the device tensor would wait for the whole stream, the step launched after it included."""

    def __init__(self, hdr: torch.Tensor, produced: list[tuple[int, Request]], nxt: torch.Tensor | None) -> None:
        self.hdr, self.produced, self.nxt = hdr, produced, nxt
        self._host, self._copied = nxt, None
        if nxt is not None and nxt.device.type == "cuda":
            self._host = torch.empty(nxt.shape, dtype=nxt.dtype, pin_memory=True)
            self._host.copy_(nxt, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    def tokens(self) -> torch.Tensor | None:
        """The step's tokens on the host, once this step (not the one after it) has finished."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._host


def _agree(comm: Comm, hdr: torch.Tensor, switch_to: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    """Agree this step with the replicas that share the experts (the ``ep`` group): whether any
    computes, and whether any leaves the generation, which all then do at this same step (one
    left behind would wait in an all-to-all nobody else enters). Returns (the header to run:
    a SWITCH to the newest generation any replica asked for, else ``hdr``; whether any computes)."""
    mine = torch.tensor([int(hdr[0]) in (PREFILL, DECODE), switch_to], dtype=torch.int64, device=device)
    every = comm.all_gather(mine, dim=0, group="ep").view(-1, 2).cpu()             # [replicas, 2]
    newest = int(every[:, 1].max())
    if newest:
        out = torch.zeros_like(hdr)
        out[0], out[3] = SWITCH, newest
        return out, False
    return hdr, bool(every[:, 0].any())


def _drive(model: StageLike, comm: Comm, groups: GroupSet, settings: EngineSettings,
           device: torch.device, driver: Driver, should_stop: Any, decode: DecodeRunner | None,
           overlap: bool, lockstep: bool = False) -> int:
    """``serve_generation``'s driver loop: plan, step, done. With ``overlap`` (a whole model on
    one rank), while decode steps follow each other with the same rows, the next step is
    launched (fed the launched one's tokens, on the device) before the launched one's tokens
    are read, so the host's scheduling, commits and streaming
    run while the GPU computes instead of between its steps. A step is still confirmed only
    once the step after it has finished (``Driver.done``), so an abort loses nothing new."""
    launched: _Launched | None = None
    others_busy = False  # lockstep: another replica computes, so this one steps without waiting
    while True:
        if launched is None:
            if not driver.needs_step and not others_busy:
                driver.queue.wait(settings.idle_every)  # an idle step, unless a request arrives first
            hdr, tokens, produced = driver.plan()
            if lockstep:
                hdr, others_busy = _agree(comm, hdr, driver.switch_to, device)
            if lockstep and int(hdr[0]) == IDLE and others_busy:
                cast(Any, model).idle_moe_pass()  # serve this rank's experts to the replicas that compute
                nxt: torch.Tensor | None = torch.empty(0, dtype=torch.int64, device=device)
            else:
                hdr, nxt = step(model, comm, groups, settings.max_batch, device, hdr, tokens, decode)
            if int(hdr[0]) == SWITCH:
                return int(hdr[3])
            launched = _Launched(hdr, produced, nxt)
        ahead = (driver.plan_ahead(launched.hdr, launched.produced, launched.nxt)
                 if overlap and launched.nxt is not None else None)
        if ahead is not None:
            a_hdr, a_tokens, a_produced = ahead
            a_hdr, a_nxt = step(model, comm, groups, settings.max_batch, device, a_hdr, a_tokens, decode)
            driver.done(launched.produced, launched.tokens())  # the GPU runs the next step meanwhile
            launched = _Launched(a_hdr, a_produced, a_nxt)
        else:
            driver.done(launched.produced, launched.tokens())
            launched = None
        driver.send_prefilled()
        if should_stop():
            return 0  # a launched step's tokens were never recorded: the caller's hold() drops nothing of it
