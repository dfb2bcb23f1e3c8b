"""Start real ``rallyd`` processes for tests, the demo and benchmarks, and kill them by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass
class DaemonProcess:
    """One ``rallyd`` child; its JSON log goes to ``log_path``."""

    node: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    prefix: tuple[str, ...] = ()  # runs it elsewhere, e.g. in a network namespace (testing.netns)

    def start(self) -> DaemonProcess:
        env = {**os.environ, **self.env}
        env.pop("NOTIFY_SOCKET", None) if "NOTIFY_SOCKET" not in self.env else None
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child's stdout, for its lifetime)
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "rallypoint.daemon", "--node", self.node, "--log-json", *self.args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, needle: str, timeout: float = 15.0, after: int = 0) -> float:
        """Block until ``needle`` appears in the log (past byte ``after``); return when it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text()[after:]:
                return time.monotonic()
            if self.proc is not None and self.proc.poll() is not None and needle not in self.log_text()[after:]:
                raise AssertionError(f"rallyd {self.node} exited {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not in rallyd {self.node}'s log after {timeout}s:\n{self.log_text()[-3000:]}")

    def kill_node(self) -> list[int]:
        """A whole node's death: SIGKILL the daemon and every process under it at once; returns
        the pids of those processes (not the daemon's)."""
        return kill_tree(self.pid)[1:]

    def stop(self) -> None:
        """SIGKILL its workers and spares, then the daemon (after SIGCONT, in case it was
        stopped), and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                child.kill()
        except psutil.NoSuchProcess:
            pass
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every process under it (in sessions of their own too); returns their
    pids, ``pid`` first."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in procs]


def daemon_args(endpoints: tuple[str, ...], cluster: str, *extra: str) -> list[str]:
    """Flags for a CPU-only test daemon on ``cluster``.

    Without the standby interpreter (``[worker] standby``) unless ``extra`` turns it on
    (``--worker-standby``): each standby imports torch (2-3 s of CPU), one per daemon and one more
    after each worker start, which cost the restart tests a quarter more CPU on a 2-core CI
    machine (two such tests: 40 s of CPU without, 52 s with) for no test that is about it."""
    return ["--cluster", cluster, "--etcd-endpoints", ",".join(endpoints), "--gpus", "0",
            "--config", os.devnull, "--metrics-port", "0",
            "--gateway-port", "0", "--no-worker-standby", *extra]


def wait_file(path: Path, timeout: float = 90) -> str:
    """Block until ``path`` exists with some content (a daemon or worker wrote its URL); return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear in {timeout:g}s")


def wait_for(what: str, check, timeout: float = 30.0, every: float = 0.05):
    """Poll ``check`` until it returns something truthy, and return that; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_metrics(state_dir: Path, timeout: float = 15.0) -> Samples:
    """GET a test daemon's ``/metrics`` (its URL is in ``<state_dir>/metrics.url``) and parse it
    with prometheus_client's parser: ``{(sample name, sorted labels but cluster/node): value}``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url_file = state_dir / "metrics.url"
    deadline = time.monotonic() + timeout
    while not url_file.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{url_file} never appeared")
        time.sleep(0.05)
    text = urllib.request.urlopen(url_file.read_text().strip(), timeout=5).read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k not in ("cluster", "node")}
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out
