"""The last resort for a group build that hangs where no abort can reach it.

Every member of a group waits for the others in etcd before creating a communicator, and that
wait gives up on a newer generation. What is left is a peer dying in the milliseconds between the
wait and NCCL's own (blocking) communicator init, which then waits for it forever: the only way
out is a fresh process. ``BuildGuard`` watches each NCCL build (gloo's connect times out on its
own) and ends the process when the build outlives a newer generation by ``grace`` seconds (15:
longer than an etcd retry), or runs past ``limit`` seconds in all; rallyd sees the exit code and
starts the seat again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class BuildGuard:
    """Args:
        superseded: ``superseded(gen)`` is True once a generation newer than ``gen`` was released.
        limit: seconds a build may take in all (the peers' arrival wait times out before it).
        grace: seconds a build may go on once it is superseded.
        on_stuck: called once, from the guard's thread, with what is stuck (it ends the process).
    """

    def __init__(self, superseded: Callable[[int], bool], limit: float, grace: float,
                 on_stuck: Callable[[str], None], every: float = 0.1) -> None:
        self.superseded, self.limit, self.grace = superseded, limit, grace
        self.on_stuck, self.every = on_stuck, every

    @contextmanager
    def watching(self, gen: int) -> Iterator[None]:
        """Guard the build of generation ``gen`` for the duration of the block."""
        done = threading.Event()
        thread = threading.Thread(target=self._watch, args=(gen, done), name="rallypoint-build-guard", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()

    def _watch(self, gen: int, done: threading.Event) -> None:
        start = time.monotonic()
        superseded_at: float | None = None
        while not done.wait(self.every):
            now = time.monotonic()
            if superseded_at is None and self.superseded(gen):
                superseded_at = now
            if superseded_at is not None and now - superseded_at > self.grace:
                why = (f"the build of generation {gen} is still blocked {now - superseded_at:.1f}s "
                       f"after a newer generation was released")
            elif now - start > self.limit:
                why = f"the build of generation {gen} is still blocked after {now - start:.1f}s"
            else:
                continue
            if not done.is_set():
                self.on_stuck(why)
            return
