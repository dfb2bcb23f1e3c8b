"""The seats rallyd has taken out of placement, and what brings each one back.

Three causes, three ways back:

- an unhealthy GPU: never (until rallyd restarts, after someone looked at the GPU);
- a spent restart budget: after the restart window;
- a checkpoint that failed to load (corrupt, truncated, mismatched): when the checkpoint's files
  change. Restarting onto the same bytes fails the same way, and every failed try costs the
  serving replicas a generation, so time alone never brings such a seat back.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# (file name, size, mtime in ns) of every file in a checkpoint directory, sorted.
Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(directory: str | Path) -> Fingerprint:
    """What the checkpoint's files look like now (an unreadable directory is the empty tuple)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return ()
    out = []
    for e in entries:
        try:
            if e.is_file():
                st = e.stat()
                out.append((e.name, st.st_size, st.st_mtime_ns))
        except OSError:
            continue
    return tuple(sorted(out))


@dataclass(frozen=True)
class OutSeat:
    """Why a seat is out, and its way back (neither set: out until rallyd restarts)."""

    why: str
    retry_at: float | None = None            # time.monotonic() after which it is tried again
    checkpoint: Fingerprint | None = None    # tried again once the checkpoint differs from this


class OutSeats:
    """Local ranks out of placement; thread-safe (the worker watcher and the loop both use it)."""

    def __init__(self, checkpoint_dir: str | None) -> None:
        self.checkpoint_dir = checkpoint_dir
        self._seats: dict[int, OutSeat] = {}
        self._lock = threading.Lock()

    def take_out(self, local_rank: int, why: str, retry_after: float | None = None,
                 until_checkpoint_changes: bool = False) -> OutSeat:
        seat = OutSeat(why, None if retry_after is None else time.monotonic() + retry_after,
                       fingerprint(self.checkpoint_dir) if until_checkpoint_changes and self.checkpoint_dir else None)
        with self._lock:
            self._seats[local_rank] = seat
        return seat

    def why(self, local_rank: int) -> str:
        """Why ``local_rank`` is out ("" when it is not)."""
        with self._lock:
            seat = self._seats.get(local_rank)
        return seat.why if seat else ""

    def local_ranks(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(sorted(self._seats))

    def reasons(self) -> dict[str, str]:
        """{local rank: why} for status output."""
        with self._lock:
            return {str(lr): s.why for lr, s in sorted(self._seats.items())}

    def bring_back_due(self, now: float | None = None) -> list[tuple[int, str]]:
        """Put back every seat whose way back has come; returns (local rank, what changed) for each."""
        now = time.monotonic() if now is None else now
        with self._lock:
            waiting_on_files = any(s.checkpoint is not None for s in self._seats.values())
        current = fingerprint(self.checkpoint_dir) if waiting_on_files and self.checkpoint_dir else None
        back = []
        with self._lock:
            for lr, s in list(self._seats.items()):
                if s.checkpoint is not None:
                    if current is not None and current != s.checkpoint:
                        back.append((lr, "its checkpoint files changed"))
                elif s.retry_at is not None and s.retry_at <= now:
                    back.append((lr, "its restart window ended"))
            for lr, _ in back:
                del self._seats[lr]
        return back
