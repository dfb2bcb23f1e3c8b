"""The worker processes of this node: start them on their seats, notice at once when one dies.

One thread per child blocks in ``wait()``, so an exit is seen within milliseconds (no polling
interval to wait out) and reported through ``on_exit`` from that thread. Restarts are budgeted per
window: past the budget a seat stays down and the daemon reports the cluster degraded, rather than
restarting in a loop. Children run in their own session and are killed by PID, never orphaned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from rallypoint.log import get_logger

log = get_logger("supervisor")


@dataclass
class WorkerProcess:
    """One rank process on a seat (``local_rank``)."""

    local_rank: int
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    after_gen: int = 0
    expected_exit: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def state(self) -> str:
        """psutil's view: running, sleeping, stopped, zombie, disk-sleep... or ``gone``."""
        try:
            return psutil.Process(self.proc.pid).status()
        except psutil.NoSuchProcess:
            return "gone"


ExitCallback = Callable[[WorkerProcess, int], None]


class Supervisor:
    """Starts, watches and stops this node's workers.

    Args:
        command: builds the argv of a worker for ``(local_rank, after_gen)``.
        log_dir: where each worker's stdout/stderr go.
        on_exit: called as ``on_exit(worker, returncode)`` from the watcher thread, for exits the
            supervisor did not ask for.
        budget, window: at most ``budget`` restarts per ``window`` seconds.
    """

    def __init__(self, command: Callable[[int, int], list[str]], log_dir: Path, on_exit: ExitCallback,
                 budget: int = 5, window: float = 60.0, env: dict[str, str] | None = None) -> None:
        self.command = command
        self.log_dir = log_dir
        self.on_exit = on_exit
        self.budget, self.window = budget, window
        self.env = env or {}
        self.workers: dict[int, WorkerProcess] = {}
        self.restarts: deque[float] = deque()
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()

    def start(self, local_rank: int, after_gen: int = 0) -> WorkerProcess:
        """Start the worker of seat ``local_rank`` (it joins the first plan newer than ``after_gen``)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"worker-{local_rank}.log", "ab")
        proc = subprocess.Popen(self.command(local_rank, after_gen), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, start_new_session=True, env={**os.environ, **self.env})
        out.close()
        w = WorkerProcess(local_rank, proc, after_gen=after_gen)
        with self._lock:
            self.workers[local_rank] = w
        threading.Thread(target=self._watch, args=(w,), name=f"watch-worker-{local_rank}", daemon=True).start()
        log.info("supervisor.started", local_rank=local_rank, pid=proc.pid, after_gen=after_gen)
        return w

    def ensure(self, local_rank: int, after_gen: int = 0) -> WorkerProcess:
        """The live worker of seat ``local_rank``, started if there is none (atomic: the exit
        watcher and the daemon's loop may both ask at once, and a seat gets one process)."""
        with self._start_lock:
            w = self.workers.get(local_rank)
            if w is not None and w.proc.poll() is None:
                return w
            return self.start(local_rank, after_gen)

    def may_restart(self) -> bool:
        """True (and counted) while the restart budget of the window is not spent."""
        now = time.monotonic()
        with self._lock:
            while self.restarts and now - self.restarts[0] > self.window:
                self.restarts.popleft()
            if len(self.restarts) >= self.budget:
                return False
            self.restarts.append(now)
            return True

    def _watch(self, w: WorkerProcess) -> None:
        code = w.proc.wait()
        if w.expected_exit:
            return
        log.warning("supervisor.worker_exited", local_rank=w.local_rank, pid=w.pid, code=code)
        self.on_exit(w, code)

    def alive(self) -> dict[int, WorkerProcess]:
        with self._lock:
            return {lr: w for lr, w in self.workers.items() if w.proc.poll() is None}

    def stop(self, local_rank: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Stop one worker on purpose (no exit report)."""
        with self._lock:
            w = self.workers.pop(local_rank, None)
        if w is None or w.proc.poll() is not None:
            return
        w.expected_exit = True
        try:
            os.kill(w.pid, signal.SIGCONT)
            os.kill(w.pid, sig)
            w.proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.kill(w.pid, signal.SIGKILL)
            w.proc.wait(timeout=timeout)

    def stop_all(self, sig: int = signal.SIGKILL) -> None:
        for lr in list(self.workers):
            self.stop(lr, sig)


def worker_argv(cluster: str, endpoints: str, node: str, model: str, device: str, dtype: str,
                max_batch: int, max_seq: int, api_host: str, api_port: int, deadline_floor: float,
                state_dir: Path) -> Callable[[int, int], list[str]]:
    """The command line of a worker on seat ``local_rank`` of ``node``."""

    def argv(local_rank: int, after_gen: int) -> list[str]:
        return [sys.executable, "-m", "rallypoint.worker", "--cluster", cluster, "--endpoints", endpoints,
                "--node", node, "--local-rank", str(local_rank), "--model", model, "--device", device,
                "--dtype", dtype, "--max-batch", str(max_batch), "--max-seq", str(max_seq),
                "--api-host", api_host, "--api-port", str(api_port + local_rank if api_port else 0),
                "--deadline-floor", str(deadline_floor), "--after-gen", str(after_gen),
                "--api-url-file", str(state_dir / f"api-{local_rank}.url"), "--die-with-parent"]
    return argv
