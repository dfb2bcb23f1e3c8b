"""The serving loop of one rank of a replica, and the driver that schedules it.

Every rank of a DP replica runs the same step, in lockstep: the replica's driver (its first rank:
PP stage 0, TP rank 0) decides what the step is and broadcasts a fixed-size header to its TP group;
each stage runs its layers and hands ``{header, hidden}`` to the next stage; the last stage samples
the next token of every row and sends them back to the first stage. A step is one of:

* PREFILL: one request (new, or resumed after an abort) fills its KV-cache row;
* DECODE: every active row advances one token;
* IDLE: nothing to compute; it still crosses the pipeline, proving the replica alive (and so
  confirming the tokens of the previous step) and keeping collectives inside their deadlines;
* SWITCH: the replica leaves the generation at this step boundary, every rank together.

Continuous batching: a request joins the running batch as soon as a cache row is free.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rallypoint.comm.collectives import Comm
from rallypoint.groups.group_set import GroupSet
from rallypoint.log import get_logger
from rallypoint.worker.requests import Request, RequestQueue

log = get_logger("engine")

IDLE, PREFILL, DECODE, SWITCH = 0, 1, 2, 3
_TEMP_SCALE = 1_000_000  # temperatures travel as integers in the int64 header


class StageLike(Protocol):
    def forward(self, x: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class EngineSettings:
    max_batch: int = 8
    max_seq: int = 512
    idle_every: float = 0.05  # seconds between idle steps when there is nothing to do


def header_size(max_batch: int) -> int:
    # [kind, B, S, switch_gen] + rows, starts, seeds, temperatures, top_ps (max_batch each)
    return 4 + 5 * max_batch


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (nucleus); renormalised.

    probs: [V] -> [V]. The most likely token always stays.
    """
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    drop = sorted_p.cumsum(0) - sorted_p >= top_p  # mass before this token already reaches top_p
    kept = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(0, order, kept)
    return out / out.sum()


def sample(logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
           top_ps: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a draw seeded by (seed, position).

    Seeding by position makes a resumed request draw exactly what it would have drawn.
    logits: [B, V] float32; temps, seeds, positions, top_ps: [B] int64 (temps and top_ps scaled by 1e6).
    """
    out = logits.argmax(dim=-1)
    hot = (temps > 0).nonzero().flatten().tolist()
    if hot:
        host = logits.float().cpu()
        for i in hot:
            g = torch.Generator().manual_seed(int(seeds[i]) * 1_000_003 + int(positions[i]))
            probs = torch.softmax(host[i] / (float(temps[i]) / _TEMP_SCALE), dim=-1)
            if top_ps is not None:
                probs = top_p_filter(probs, float(top_ps[i]) / _TEMP_SCALE)
            out[i] = int(torch.multinomial(probs, 1, generator=g))
    return out


def step(model: StageLike, comm: Comm, groups: GroupSet, max_batch: int, device: torch.device,
         header: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one replica step on this rank; return (header, next tokens on the first stage else None)."""
    mb = max_batch
    if groups.is_first_stage:
        hdr = header if header is not None else torch.zeros(header_size(mb), dtype=torch.int64, device=device)
        comm.broadcast(hdr, src=0, group="tp")
        kind, b, s = (int(v) for v in hdr[:3].tolist())
        x = None
        if kind in (PREFILL, DECODE):
            x = tokens if tokens is not None else torch.empty(b * s, dtype=torch.int64, device=device)
            comm.broadcast(x, src=0, group="tp")
            x = x.view(b, s)
    else:
        got = comm.recv_dict(src=groups.pp_prev, group="pp")
        hdr, x = got["hdr"], got.get("h")
        kind, b, s = (int(v) for v in hdr[:3].tolist())
    out = None
    if kind in (PREFILL, DECODE):
        rows = hdr[4:4 + b]
        starts = hdr[4 + mb:4 + mb + b]
        pos = starts[:, None] + torch.arange(s, device=device)[None, :]  # [B, S]
        out = model.forward(x, pos, rows)
    if not groups.is_last_stage:
        comm.send_dict({"hdr": hdr, **({"h": out} if out is not None else {})}, dst=groups.pp_next, group="pp")
    nxt = None
    if groups.is_last_stage:
        if out is not None:
            seeds = hdr[4 + 2 * mb:4 + 2 * mb + b]
            temps = hdr[4 + 3 * mb:4 + 3 * mb + b]
            top_ps = hdr[4 + 4 * mb:4 + 4 * mb + b]
            last = hdr[4 + mb:4 + mb + b] + s  # position of the token being produced
            nxt = sample(out[:, -1, :], temps, seeds, last, top_ps)
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

    def plan(self) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, Request]]]:
        """Decide the next step: (header, tokens, [(row, request)] producing a token)."""
        mb = self.settings.max_batch
        hdr = torch.zeros(header_size(mb), dtype=torch.int64)
        if self.switch_to:
            hdr[0], hdr[3] = SWITCH, self.switch_to
            return hdr.to(self.device), None, []
        free = [r for r in range(mb) if r not in self.rows]
        new = None
        while free and new is None:
            if self.held:
                new = self.held.popleft()
            else:
                got = self.queue.take(1)
                new = got[0] if got else None
                if new is None:
                    break
            if new.done:  # cancelled while it waited (a stop string, the client went away)
                self.queue.finished(new)
                new = None
        if new is not None:
            row = free[0]
            self.rows[row] = new
            seq = new.prompt if new.fed is not None else new.tokens_so_far
            batch = [(row, new, seq, 0)]
            kind, s = PREFILL, len(seq)
        else:
            batch = [(row, r, r.known, None) for row, r in sorted(self.rows.items())
                     if r.fed is not None or not self._exhausted(r)]
            batch = [(row, r, seq, len(seq) - 1) for row, r, seq, _ in batch]
            kind, s = (DECODE, 1) if batch else (IDLE, 0)
        hdr[0], hdr[1], hdr[2] = kind, len(batch), s
        toks = []
        for i, (row, r, seq, start) in enumerate(batch):
            hdr[4 + i], hdr[4 + mb + i] = row, start
            hdr[4 + 2 * mb + i] = r.params.seed
            hdr[4 + 3 * mb + i] = int(round(r.params.temperature * _TEMP_SCALE))
            hdr[4 + 4 * mb + i] = int(round(r.params.top_p * _TEMP_SCALE))
            toks.extend(seq if kind == PREFILL else seq[-1:])
        tokens = torch.tensor(toks, dtype=torch.int64, device=self.device) if toks else None
        return hdr.to(self.device), tokens, [(row, r) for row, r, _, _ in batch]

    def _exhausted(self, r: Request) -> bool:
        made = len(r.committed) + len(r.pending)
        last = (r.committed + r.pending)[-1] if made else None
        return made >= r.params.max_tokens or (last is not None and r.is_eos(last)) or r.done

    def done(self, produced: list[tuple[int, Request]], nxt: torch.Tensor | None) -> None:
        """The step succeeded: confirm earlier tokens, then record this step's (uncommitted)."""
        for row, r in list(self.rows.items()):
            had = len(r.committed)
            r.commit()
            if not self.first_commit_at and len(r.committed) > had:
                self.first_commit_at = time.time()
            if r.done:
                del self.rows[row]
                self.queue.finished(r)
        if produced and nxt is not None:
            for (row, r), tok in zip(produced, nxt.tolist()):
                if row in self.rows and not r.propose(int(tok)):
                    self.queue.counts["replay_mismatch"] += 1
                    log.warning("engine.replay_mismatch", request=r.id, position=len(r.prompt) + (r.fed or 0))

    def hold(self) -> list[Request]:
        """The generation was aborted: drop unconfirmed tokens, keep every request for resumption."""
        held = [r for _, r in sorted(self.rows.items())]
        for r in held:
            r.rollback()
            self.queue.counts["resumed"] += 1
        self.rows.clear()
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
        return bool(self.rows or self.held or self.queue.waiting)


def serve_generation(model: StageLike, comm: Comm, groups: GroupSet, settings: EngineSettings,
                     device: torch.device, driver: Driver | None, should_stop: Any = lambda: False) -> int:
    """Run steps until a SWITCH step (returns its generation) or ``should_stop()`` (returns 0).

    Raises:
        GenerationAborted: a collective of this generation was aborted; the caller holds the
            requests (driver) and waits for the next plan.
    """
    while True:
        if driver is not None:
            if not driver.busy:
                time.sleep(settings.idle_every)
            hdr, tokens, produced = driver.plan()
            hdr, nxt = step(model, comm, groups, settings.max_batch, device, hdr, tokens)
            if int(hdr[0]) == SWITCH:
                return int(hdr[3])
            driver.done(produced, nxt)
            if should_stop():
                return 0
        else:
            hdr, _ = step(model, comm, groups, settings.max_batch, device)
            if int(hdr[0]) == SWITCH:
                return int(hdr[3])
