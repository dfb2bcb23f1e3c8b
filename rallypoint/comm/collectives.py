"""The collectives, on the current generation's groups, each tracked against a deadline.

Calls go straight to the backend objects (``ProcessGroupNCCL`` / ``ProcessGroupGloo``) with
prebuilt option objects, so the healthy path costs little more than raw ``torch.distributed``.
On GPU a call returns once the work is enqueued and the current stream is ordered after it; on
CPU it waits, polling completion so that an abort from the watchdog thread wakes it at once. Any
failure (a peer's connection closing, an abort) surfaces as ``GenerationAborted``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from rallypoint.comm.diagnosis import Diagnosis, ProgressBoard, diagnose
from rallypoint.comm.tracker import Op, Tracker
from rallypoint.errors import GenerationAborted, GroupError
from rallypoint.groups.group import Group
from rallypoint.groups.group_set import GroupSet
from rallypoint.log import get_logger

log = get_logger("comm")

# torch's stubs type ReduceOp.SUM as ReduceOp.RedOpType, which the options' reduceOp setter accepts
_SUM = dist.AllreduceOptions()
_SUM.reduceOp = dist.ReduceOp.SUM  # type: ignore[assignment]
_RS_SUM = dist.ReduceScatterOptions()
_RS_SUM.reduceOp = dist.ReduceOp.SUM  # type: ignore[assignment]
_A2A = dist.AllToAllOptions()
_NOT_REDUCIBLE = {torch.bool, torch.complex32, torch.complex64, torch.complex128}


class Comm:
    """This rank's collectives.

    Args:
        groups: the current generation's groups (``set_groups`` swaps them).
        tracker: where every call is recorded.
        board: where peers' progress is read for a diagnosis (None: no diagnosis of peers).
        seat: this process's ``node/local_rank``.
        stale_after: a peer whose heartbeat is older than this is ``stuck``.
        on_diagnosis: called with every diagnosis (the worker forwards it to its daemon).
    """

    def __init__(self, groups: GroupSet, tracker: Tracker, board: ProgressBoard | None = None,
                 seat: str = "", stale_after: float = 0.75,
                 on_diagnosis: Callable[[Diagnosis], None] | None = None) -> None:
        self.groups = groups
        self.tracker = tracker
        self.board = board
        self.seat = seat
        self.stale_after = stale_after
        self.on_diagnosis = on_diagnosis
        self.diagnoses: list[Diagnosis] = []
        self._lock = threading.Lock()

    def set_groups(self, groups: GroupSet) -> None:
        """Switch to the next generation's groups; forget the replaced ones."""
        kept = {id(g) for g in groups.groups.values()}
        for g in self.groups.groups.values():
            if id(g) not in kept:
                self.tracker.forget(g)
        self.groups = groups

    # -- primitives ----------------------------------------------------------------------------

    def all_reduce(self, t: torch.Tensor, group: str = "tp") -> torch.Tensor:
        """Sum ``t`` in place over ``group`` (row-parallel outputs)."""
        g = self._group(group, t, reduce=True)
        if g.backend is None:
            return t
        self._run(g, "all_reduce", t.numel() * t.element_size(), lambda: g.backend.allreduce([t], _SUM))
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1, group: str = "tp",
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate every rank's ``t`` along ``dim`` (column-parallel outputs).

        ``out`` (shape ``[world * t.shape[0], *t.shape[1:]]``) reuses a buffer instead of allocating.
        """
        g = self._group(group, t)
        if g.backend is None:
            return t
        t = t.contiguous()
        shape = (g.world_size * t.shape[0],) + tuple(t.shape[1:])
        if out is None:
            out = torch.empty(shape, dtype=t.dtype, device=t.device)
        elif tuple(out.shape) != shape or out.dtype != t.dtype or out.device != t.device:
            raise GroupError(f"all_gather on {g.label}: out is {tuple(out.shape)} {out.dtype} on {out.device}, "
                             f"need {shape} {t.dtype} on {t.device}")
        self._run(g, "all_gather", out.numel() * out.element_size(), lambda: g.backend._allgather_base(out, t))
        dim = dim % t.dim()
        return out if dim == 0 else torch.cat(out.chunk(g.world_size, 0), dim=dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0, group: str = "tp") -> torch.Tensor:
        """Sum over ``group``, then keep this rank's slice of ``dim``."""
        g = self._group(group, t, reduce=True)
        if g.backend is None:
            return t
        dim = dim % t.dim()
        if t.shape[dim] % g.world_size:
            raise GroupError(f"reduce_scatter on {g.label}: dim {dim} of size {t.shape[dim]} "
                             f"does not split over {g.world_size} ranks")
        chunks = t.chunk(g.world_size, dim)
        flat = t.contiguous().reshape(-1) if dim == 0 else torch.cat([c.contiguous().reshape(-1) for c in chunks])
        if g.device.type != "cuda":  # gloo's reduce-scatter work never reports completion: sum, then slice
            self._run(g, "reduce_scatter", t.numel() * t.element_size(), lambda: g.backend.allreduce([flat], _SUM))
            return flat.chunk(g.world_size)[g.rank_in_group].reshape(chunks[0].shape)
        out = torch.empty(chunks[0].shape, dtype=t.dtype, device=t.device)
        self._run(g, "reduce_scatter", t.numel() * t.element_size(),
                  lambda: g.backend._reduce_scatter_base(out.view(-1), flat, _RS_SUM))
        return out

    def broadcast(self, t: torch.Tensor, src: int = 0, group: str = "tp") -> torch.Tensor:
        """Copy rank-in-group ``src``'s ``t`` to every member, in place."""
        g = self._group(group, t)
        if g.backend is None:
            return t
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        self._run(g, "broadcast", t.numel() * t.element_size(), lambda: g.backend.broadcast([t], opts))
        return t

    def all_to_all(self, t: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int],
                   group: str = "ep") -> torch.Tensor:
        """Send ``t``'s rows in ``in_splits`` chunks to each rank; receive ``out_splits`` rows from each."""
        g = self._group(group, t)
        if len(in_splits) != g.world_size or len(out_splits) != g.world_size:
            raise GroupError(f"all_to_all on {g.label}: need {g.world_size} splits each way, "
                             f"got {len(in_splits)} in and {len(out_splits)} out")
        if sum(in_splits) != t.shape[0]:
            raise GroupError(f"all_to_all on {g.label}: in_splits sum to {sum(in_splits)}, "
                             f"tensor has {t.shape[0]} rows")
        out = torch.empty((sum(out_splits),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        if g.backend is None:
            return out.copy_(t)
        self._run(g, "all_to_all", (t.numel() + out.numel()) * t.element_size(),
                  lambda: g.backend.alltoall_base(out, t.contiguous(), list(out_splits), list(in_splits), _A2A))
        return out

    def send_dict(self, tensors: Mapping[str, torch.Tensor], dst: int, group: str | Group = "pp") -> None:
        """Send named tensors to rank-in-group ``dst``; shapes and dtypes go first."""
        g = self._group(group, None)
        meta = json.dumps({k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()})
        header = torch.frombuffer(bytearray(meta.encode()), dtype=torch.uint8).to(g.device)
        size = torch.tensor([header.numel()], dtype=torch.int64, device=g.device)
        for t in (size, header, *tensors.values()):
            if t.device != g.device:
                raise GroupError(f"send_dict on {g.label}: tensor on {t.device}, group runs on {g.device}")
            self._send(g, t, dst)

    def recv_dict(self, src: int, group: str | Group = "pp") -> dict[str, torch.Tensor]:
        """Receive the named tensors ``send_dict`` sent from rank-in-group ``src``."""
        g = self._group(group, None)
        size = torch.empty(1, dtype=torch.int64, device=g.device)
        self._recv(g, size, src)
        header = torch.empty(int(self._host(g, size)[0]), dtype=torch.uint8, device=g.device)
        self._recv(g, header, src)
        meta = json.loads(bytes(self._host(g, header).tolist()).decode())
        out = {}
        for name, (shape, dtype) in meta.items():
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=g.device)
            self._recv(g, t, src)
            out[name] = t
        return out

    def _send(self, g: Group, t: torch.Tensor, dst: int) -> None:
        self._run(g, "send", t.numel() * t.element_size(), lambda: g.backend.send([t.contiguous()], dst, 0))

    def _recv(self, g: Group, t: torch.Tensor, src: int) -> None:
        self._run(g, "recv", t.numel() * t.element_size(), lambda: g.backend.recv([t], src, 0))

    def synchronize(self) -> None:
        """``torch.cuda.synchronize()`` that raises ``GenerationAborted`` if an abort woke it."""
        if not torch.cuda.is_available():
            return
        try:
            torch.cuda.synchronize()
        except Exception as exc:
            self._raise_if_aborted(exc)
            raise

    # -- plumbing ------------------------------------------------------------------------------

    def _group(self, name: str | Group, t: torch.Tensor | None, reduce: bool = False) -> Group:
        """The current generation's group ``name``, or ``name`` itself when a ``Group`` is given
        (a thread that must stay on the group it started with, whatever generation comes next)."""
        g = name if isinstance(name, Group) else self.groups.group(name)
        if g.aborted_reason is not None:
            raise GenerationAborted(g.gen, g.label, g.aborted_reason)
        if t is not None:
            if t.device != g.device:
                raise GroupError(f"{g.label} runs on {g.device}; tensor is on {t.device}")
            if reduce and t.dtype in _NOT_REDUCIBLE:
                raise GroupError(f"{g.label}: cannot sum tensors of dtype {t.dtype}")
        return g

    def _host(self, g: Group, t: torch.Tensor) -> torch.Tensor:
        try:
            return t.cpu()
        except Exception as exc:  # an abort woke a blocked copy
            self._raise_if_aborted(exc)
            raise

    def _run(self, g: Group, op: str, nbytes: int, launch: Callable[[], Any]) -> None:
        try:
            work = launch()
        except Exception as exc:  # NCCL reports a peer lost mid-step here too (an error comm state)
            self._launch_failed(g, op, exc)
        rec = self.tracker.issue(g, op, nbytes, work)
        if g.device.type == "cuda":
            work.wait()  # orders the current stream after the collective; does not block the CPU
            return
        if op in ("send", "recv"):
            pass  # gloo point-to-point work completes only inside wait(); an abort unblocks it
        elif not work.is_completed():
            self._await(g, work)
        try:
            work.wait()
        except Exception as exc:
            self._failed(rec, exc)
        self.tracker.finish(rec)

    def _await(self, g: Group, work: Any) -> None:
        """Poll ``work`` until it completes or ``g`` is aborted (from any thread).

        A plain ``work.wait()`` would do, except that gloo's ``abort()`` does not wake it. Polling
        measured faster here than a future callback waking an Event (1.1-1.3 vs 1.4-1.9 ms per
        2-rank all-reduce on a loaded 2-core box).
        """
        delay = 2e-5
        while not work.is_completed():
            if g.aborted_reason is not None:
                raise GenerationAborted(g.gen, g.label, g.aborted_reason)
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)

    def _raise_if_aborted(self, exc: BaseException) -> None:
        for g in self.groups.groups.values():
            if g.aborted_reason is not None:
                raise GenerationAborted(g.gen, g.label, g.aborted_reason) from exc

    def _launch_failed(self, g: Group, op: str, exc: BaseException) -> NoReturn:
        """A collective failed as it was issued: abort its group, so the step ends like any abort
        and the process waits for the next plan (an exception out of the step would end it)."""
        if g.aborted_reason is None:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("comm.launch_failed", group=g.label, gen=g.gen, op=op, seq=g.seq + 1, error=first)
            g.abort(f"{op} failed at launch: {first}")
        raise GenerationAborted(g.gen, g.label, g.aborted_reason or "failed") from exc

    def _failed(self, rec: Op, exc: BaseException) -> None:
        g = rec.group
        if g.aborted_reason is None:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.trip(rec, time.monotonic() - rec.start, trigger="error", detail=first)
        raise GenerationAborted(g.gen, g.label, g.aborted_reason or "failed") from exc

    def trip(self, rec: Op, waited: float, trigger: str = "deadline", detail: str = "") -> Diagnosis:
        """Diagnose ``rec``, emit one ``comm.collective_tripped`` event, abort its group. Any thread."""
        with self._lock:
            g = rec.group
            if g.aborted_reason is not None:
                if self.diagnoses:
                    return self.diagnoses[-1]
                return Diagnosis(g.gen, g.label, rec.seq, rec.op, (), trigger, waited)
            d = diagnose(self.board, g, rec.seq, rec.op, trigger, waited, self.seat, self.stale_after,
                         self.tracker.deadline(rec))
            self.diagnoses.append(d)
            log.error("comm.collective_tripped", **d.to_event(), rank=self.groups.rank, detail=detail)
            names = ",".join(f"{s.rank}:{s.kind}" for s in d.suspects) or "none named"
            g.abort(f"{rec.op} seq {rec.seq} {trigger} after {waited:.3f}s; suspects {names}")
        if self.on_diagnosis is not None:
            self.on_diagnosis(d)
        return d
