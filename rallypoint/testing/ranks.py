"""Drive ``rank_agent`` processes from a test or benchmark: start, command, kill by PID."""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any


class RankProcess:
    """One rank process; ``call`` sends a command and waits for its reply."""

    _ids = itertools.count(1)

    def __init__(self, endpoints: tuple[str, ...], cluster: str, log_path: Path,
                 device: str = "cpu", deadline_floor: float = 1.0, env: dict[str, str] | None = None,
                 module: str = "rallypoint.testing.rank_agent", groups: str = "tp,pp,dp") -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (the child's stdout, for its lifetime)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--cluster", cluster,
             "--endpoints", ",".join(endpoints), "--device", device, "--deadline-floor", str(deadline_floor),
             "--groups", groups],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, **(env or {})}, start_new_session=True)
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._pending: dict[int, dict[str, Any]] = {}
        threading.Thread(target=self._read, daemon=True).start()
        self.ready: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.replies.put(json.loads(line))
            except ValueError:
                pass

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.ready = self._get(lambda r: r.get("ready"), timeout)

    def send(self, cmd: str, **kw: Any) -> int:
        """Send a command without waiting; returns its id for ``result``."""
        cid = next(self._ids)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, "id": cid, **kw}) + "\n")
        self.proc.stdin.flush()
        return cid

    def result(self, cid: int, timeout: float = 60.0) -> dict[str, Any]:
        return self._get(lambda r: r.get("id") == cid, timeout)

    def call(self, cmd: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
        return self.result(self.send(cmd, **kw), timeout)

    def _get(self, match, timeout: float) -> dict[str, Any]:
        for cid, r in list(self._pending.items()):
            if match(r):
                return self._pending.pop(cid)
        import time
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"rank pid {self.pid}: no reply in {timeout}s; log tail:\n{self.log_tail()}")
            try:
                r = self.replies.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"rank pid {self.pid} exited {self.proc.returncode}:\n{self.log_tail()}") from None
                continue
            if match(r):
                return r
            self._pending[r.get("id", id(r))] = r

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGCONT then SIGKILL, and reap."""
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()


class RankPool:
    """Rank processes shared across tests; ``take(n)`` returns n live ones, starting more in parallel."""

    def __init__(self, endpoints: tuple[str, ...], cluster: str, log_dir: Path, **kw: Any) -> None:
        self.endpoints, self.cluster, self.log_dir, self.kw = endpoints, cluster, log_dir, kw
        self.all: list[RankProcess] = []
        self._count = itertools.count()

    def spawn(self, n: int) -> list[RankProcess]:
        new = [RankProcess(self.endpoints, self.cluster, self.log_dir / f"rank{next(self._count)}.log", **self.kw)
               for _ in range(n)]
        for p in new:
            p.wait_ready()
        self.all.extend(new)
        return new

    def take(self, n: int) -> list[RankProcess]:
        live = [p for p in self.all if p.alive()]
        if len(live) < n:
            live += self.spawn(n - len(live))
        return live[:n]

    def close(self) -> None:
        for p in self.all:
            try:
                p.kill()
            except Exception:
                pass
