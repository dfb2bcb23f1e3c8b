"""The worker processes of this node: start them on their seats, notice at once when one dies.

One thread per child blocks in ``wait()``, so an exit is seen within milliseconds (no polling
interval to wait out) and reported through ``on_exit`` from that thread. Whether a failed seat is
restarted is not decided here (``recovery.coordinator`` decides, and budgets cold restarts per
window); spares that die on their own are budgeted here, so a spare that cannot start does not
loop. Children run in their own session and are killed by PID, never orphaned.

Warm spares are worker processes started with no seat (``local_rank`` None): they import torch,
bring CUDA up and open their etcd session, then say hello on the local channel and wait.
``adopt_spare`` hands one a failed worker's seat and starts the next spare behind it.

A standby interpreter (``[worker] standby``, ``worker.standby``) is one process with a worker's
imports done (torch, rallypoint's worker modules, the CUDA driver) and no seat, blocked on its
stdin. ``start`` hands it the next worker's argv instead of starting a new interpreter, so a cold
restart skips Python and torch start-up (seconds on a GPU host), then starts the next standby
behind it. Unlike a spare it holds nothing deployment-specific, so one is kept by default; it is
rallyd's own child like any worker, so once handed a seat it is watched, reported and killed as
one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from rallypoint.daemon.config import Config
from rallypoint.log import get_logger
from rallypoint.protocol import channel as msgs
from rallypoint.recovery.strategy import RestartBudget

if TYPE_CHECKING:
    from rallypoint.daemon.channel import ChannelServer

log = get_logger("supervisor")


@dataclass
class WorkerProcess:
    """One rank process on a seat (``local_rank``)."""

    local_rank: int | None  # None while a spare
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    after_gen: int = 0
    expected_exit: bool = False
    standby: bool = False  # a standby interpreter not yet handed a worker's argv
    from_standby: bool = False  # this worker runs in what was the standby

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
Command = Callable[[int | None, int], list[str]]
WORKER_MODULE = ["-m", "rallypoint.worker"]  # argv[1:3] of a worker a standby can become


class Supervisor:
    """Starts, watches and stops this node's workers.

    Args:
        command: builds the argv of a worker for ``(local_rank, after_gen)``; local_rank None
            means a spare.
        log_dir: where each worker's stdout/stderr go.
        on_exit: called as ``on_exit(worker, returncode)`` from the watcher thread, for exits the
            supervisor did not ask for (seats only: a spare that dies is simply replaced).
        budget, window: at most ``budget`` spares replaced per ``window`` seconds after dying
            on their own.
        spares: warm spares to keep.
        channel: the local control channel the spares say hello on (needed for spares).
        seat_params: extra fields of an ``adopt`` message for a seat (its API port, URL file).
        standby: keep a standby interpreter for ``start`` to hand workers to (when ``command``
            starts ``python -m rallypoint.worker``); one that dies on its own is replaced within
            the same budget as spares.
    """

    def __init__(self, command: Command, log_dir: Path, on_exit: ExitCallback, budget: int = 5,
                 window: float = 60.0, env: dict[str, str] | None = None, spares: int = 0,
                 channel: ChannelServer | None = None,
                 seat_params: Callable[[int], dict] | None = None, standby: bool = False) -> None:
        self.command = command
        self.log_dir = log_dir
        self.on_exit = on_exit
        self.budget, self.window = budget, window
        self.env = env or {}
        self.workers: dict[int, WorkerProcess] = {}
        self.retiring: dict[int, WorkerProcess] = {}  # seats a plan dropped: asked to exit, not yet gone
        self.spares: list[WorkerProcess] = []
        self.want_spares = spares if channel is not None else 0
        self.channel = channel
        self.seat_params = seat_params or (lambda lr: {})
        self.spare_crashes = RestartBudget(budget, window)  # spares that died on their own
        self.want_standby = standby
        self.standby: WorkerProcess | None = None
        self.standby_crashes = RestartBudget(budget, window)  # standbys that died on their own
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._standby_lock = threading.Lock()  # one standby started at a time
        self._stopping = False
        # Every child is forked from this one long-lived thread: Linux sends a worker's
        # parent-death signal (``--die-with-parent``) when the *thread* that forked it ends, and
        # exits are handled on short-lived threads.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supervisor-spawn")

    def start(self, local_rank: int | None, after_gen: int = 0) -> WorkerProcess:
        """Start the worker of seat ``local_rank`` (it joins the first plan newer than ``after_gen``),
        or a spare when ``local_rank`` is None."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if local_rank is not None:
            with self._lock:
                old = self.retiring.pop(local_rank, None)
            if old is not None:
                self._kill(old, signal.SIGKILL)  # it had its chance; the seat gets one process
            self._forget_api(local_rank)
        name = f"worker-{local_rank}" if local_rank is not None else f"spare-{time.time_ns()}"
        argv, log_path = self.command(local_rank, after_gen), self.log_dir / f"{name}.log"
        w = self._hand_to_standby(local_rank, after_gen, argv, log_path)
        if w is None:
            w = WorkerProcess(local_rank, self._spawn(argv, log_path, subprocess.DEVNULL), after_gen=after_gen)
            with self._lock:
                self._register(w)
            threading.Thread(target=self._watch, args=(w,), name=f"watch-{name}", daemon=True).start()
        log.info("supervisor.started", local_rank=local_rank, pid=w.pid, after_gen=after_gen,
                 spare=local_rank is None, standby=w.from_standby)
        return w

    def _spawn(self, argv: list[str], log_path: Path, stdin: int) -> subprocess.Popen:
        """Start ``argv`` from the spawner thread, in a session of its own, output to ``log_path``."""
        out = open(log_path, "ab")  # noqa: SIM115 (the child's stdout, for its lifetime)
        try:
            return self._spawner.submit(subprocess.Popen, argv, stdin=stdin, stdout=out, stderr=out, bufsize=0,
                                        start_new_session=True, env={**os.environ, **self.env}).result()
        finally:
            out.close()

    def _register(self, w: WorkerProcess) -> None:
        """``w`` becomes the seat's worker, or a spare (call with ``_lock`` held)."""
        if w.local_rank is None:
            self.spares.append(w)
        else:
            self.workers[w.local_rank] = w

    def _hand_to_standby(self, local_rank: int | None, after_gen: int, argv: list[str],
                         log_path: Path) -> WorkerProcess | None:
        """Make the standby this worker: write it ``argv`` (less the interpreter) and the log path,
        and register it. None when there is no standby, or it died before it was handed the line:
        the caller starts the worker fresh."""
        if argv[1:3] != WORKER_MODULE:
            return None
        with self._lock:
            w, self.standby = self.standby, None
        if w is None or w.proc.stdin is None:
            return None
        try:
            w.proc.stdin.write(json.dumps({"argv": argv[3:], "log": str(log_path)}).encode() + b"\n")
            w.proc.stdin.close()
        except OSError:  # it died: its watcher replaces it (within the budget)
            return None
        with self._lock:
            # Its watcher tells a standby's death from a worker's by ``standby``, read under this
            # lock after the exit: one already seen stays a standby's (and we start afresh).
            if w.proc.returncode is not None:
                return None
            w.standby, w.from_standby = False, True
            w.local_rank, w.after_gen, w.started = local_rank, after_gen, time.monotonic()
            self._register(w)
        if not self._stopping:
            threading.Thread(target=self.fill_standby, name="refill-standby", daemon=True).start()
        return w

    def fill_standby(self) -> None:
        """Start the standby interpreter, if one is wanted and none is there.

        Its argv is ``python -m rallypoint.worker --standby`` with the workers' cluster and node
        (its process title) and device (``cuda``: it initialises the CUDA driver too)."""
        with self._standby_lock:
            if self._stopping or not self.want_standby or self.standby is not None:
                return
            like = self.command(None, 0)  # a spare's argv, for the flags a standby takes
            if like[1:3] != WORKER_MODULE:
                return  # not rallypoint workers (a test's stand-in): nothing to pre-import
            keep = [x for f in ("--cluster", "--node", "--device") if f in like[:-1]
                    for x in (f, like[like.index(f) + 1])]
            self.log_dir.mkdir(parents=True, exist_ok=True)
            proc = self._spawn([*like[:3], "--standby", *keep], self.log_dir / f"standby-{time.time_ns()}.log",
                               subprocess.PIPE)
            w = WorkerProcess(None, proc, standby=True)
            with self._lock:
                self.standby = w
            threading.Thread(target=self._watch, args=(w,), name=f"watch-standby-{proc.pid}", daemon=True).start()
        log.info("supervisor.standby_started", pid=proc.pid)

    def _forget_api(self, local_rank: int) -> None:
        """The seat's published API URL belongs to its previous process: remove it until the new
        one listens (and writes its own)."""
        url_file = self.seat_params(local_rank).get("api_url_file")
        if url_file:
            Path(url_file).unlink(missing_ok=True)

    def fill_spares(self) -> int:
        """Start spares up to the number wanted; returns how many were started."""
        started = 0
        with self._start_lock:
            while not self._stopping and len(self.spares) < self.want_spares:
                self.start(None)
                started += 1
        return started

    def ready_spare(self) -> WorkerProcess | None:
        """A live spare that has said hello (its warm-up is done), if any."""
        if self.channel is None:
            return None
        with self._lock:
            spares = list(self.spares)
        for w in spares:
            peer = self.channel.peers.get(w.pid)
            if w.proc.poll() is None and peer is not None and peer.role == msgs.SPARE:
                return w
        return None

    def adopt_spare(self, local_rank: int, after_gen: int) -> WorkerProcess | None:
        """Hand seat ``local_rank`` to a ready spare; None when there is none (the caller starts cold)."""
        with self._start_lock:
            w = self.ready_spare()
            if w is None or self.channel is None:
                return None
            self._forget_api(local_rank)
            peer = self.channel.peers.get(w.pid)
            msg = msgs.adopt(local_rank, after_gen, **self.seat_params(local_rank))
            if peer is None or not peer.send(msg):
                return None
            peer.role = msgs.SEAT
            with self._lock:
                self.spares.remove(w)
                w.local_rank, w.after_gen = local_rank, after_gen
                self.workers[local_rank] = w
        log.info("supervisor.spare_adopted", local_rank=local_rank, pid=w.pid, after_gen=after_gen)
        threading.Thread(target=self.fill_spares, name="refill-spares", daemon=True).start()
        return w

    def ensure(self, local_rank: int, after_gen: int = 0) -> WorkerProcess:
        """The live worker of seat ``local_rank``, started if there is none (atomic: a seat gets
        one process, whoever asks)."""
        with self._start_lock:
            w = self.workers.get(local_rank)
            if w is not None and w.proc.poll() is None:
                return w
            return self.start(local_rank, after_gen)

    def _watch(self, w: WorkerProcess) -> None:
        code = w.proc.wait()
        if w.expected_exit:
            return
        with self._lock:  # see _hand_to_standby
            standby = w.standby
            if self.standby is w:
                self.standby = None
        if standby:  # died before it was handed a worker: nobody depended on it
            log.warning("supervisor.standby_exited", pid=w.pid, code=code)
            if self._stopping:
                return
            if self.standby_crashes.take():  # budgeted, so a standby that cannot start does not loop
                self.fill_standby()
            else:
                log.error("supervisor.standby_failing", budget=self.budget, window=self.window)
            return
        if w.local_rank is None:  # a spare: nobody depended on it
            with self._lock:
                if w in self.spares:
                    self.spares.remove(w)
            log.warning("supervisor.spare_exited", pid=w.pid, code=code)
            if self._stopping:
                return
            # Budgeted like restarts, so a spare that cannot start does not loop.
            if self.spare_crashes.take():
                self.fill_spares()
            else:
                log.error("supervisor.spares_failing", budget=self.budget, window=self.window)
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
        if w is not None:
            self._kill(w, sig, timeout)

    def retire(self, local_rank: int, grace: float = 5.0) -> None:
        """Stop a worker whose seat the new plan left out, without waiting for it: SIGTERM, and
        SIGKILL after ``grace`` seconds.

        A SIGKILL at once can land inside NCCL's blocking communicator init, where the peer it
        was connecting with then waits forever (nothing but a fresh process gets it out). On
        SIGTERM the worker gives up a build still waiting for its peers and lets one already in
        NCCL's init finish (milliseconds with every peer alive) before it exits.
        """
        with self._lock:
            w = self.workers.pop(local_rank, None)
            if w is None:
                return
            w.expected_exit = True  # from now on: its exit is not a failure to report
            self.retiring[local_rank] = w
        log.info("supervisor.retiring", local_rank=local_rank, pid=w.pid, grace=grace)

        def reap() -> None:
            self._kill(w, signal.SIGTERM, timeout=grace)
            with self._lock:
                if self.retiring.get(local_rank) is w:
                    del self.retiring[local_rank]
            log.info("supervisor.retired", local_rank=local_rank, pid=w.pid, code=w.proc.returncode)

        threading.Thread(target=reap, name=f"retire-{local_rank}", daemon=True).start()

    def stop_all(self, sig: int = signal.SIGKILL) -> None:
        self._stopping = True
        for lr in list(self.workers):
            self.stop(lr, sig)
        with self._standby_lock, self._lock:  # a standby being started is there once it is
            spares, self.spares = self.spares, []
            retiring, self.retiring = list(self.retiring.values()), {}
            standby, self.standby = [self.standby] if self.standby else [], None
        for w in spares + retiring + standby:
            self._kill(w, sig)

    @staticmethod
    def _kill(w: WorkerProcess, sig: int, timeout: float = 10.0) -> None:
        """Signal ``w`` (continued first, in case it is stopped) and reap it; SIGKILL if it lingers."""
        if w.proc.poll() is not None:
            return
        w.expected_exit = True
        try:
            os.kill(w.pid, signal.SIGCONT)
            os.kill(w.pid, sig)
            w.proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGKILL)
            w.proc.wait(timeout=10.0)


@dataclass(frozen=True)
class WorkerCommand:
    """How this node's workers are started: the argv of a seat or a spare, and a seat's API."""

    cluster: str
    endpoints: str
    node: str
    model: str
    device: str
    dtype: str
    max_batch: int
    max_seq: int
    api_host: str
    api_port: int
    deadline_floor: float
    state_dir: Path
    channel: str | None = None
    workload: str = "serve"
    deadline_k: float = 20.0
    build_timeout: float = 30.0
    queue_capacity: int = 1024
    cuda_graphs: bool = True
    compile: bool = True
    overlap: bool = True
    prefill_tokens: int = 4096
    disaggregate_tokens: int = 256
    stream_interval: float = 0.0
    max_chunk_rate: float = 0.0
    kv_memory_fraction: float = 0.8
    preload: bool = False  # spares load the whole model and capture its graphs while they wait
    etcd_ca_cert: str | None = None  # a worker opens its own etcd session: TLS and user as rallyd's
    etcd_cert_key: str | None = None  # (the password goes in its environment, not on its command line)
    etcd_cert_cert: str | None = None
    etcd_user: str | None = None

    @classmethod
    def from_config(cls, cfg: Config, channel: str | None) -> WorkerCommand:
        """Every setting of ``cfg`` a worker needs (``worker.args`` parses them on the other end)."""
        w, lay = cfg.worker, cfg.layout
        device = "cuda" if lay.node_gpus() > 0 else "cpu"
        return cls(cfg.cluster, ",".join(cfg.etcd.endpoints), cfg.node, w.model or "", device, w.dtype,
                   *w.kv_size(device == "cuda"), w.api_host, w.api_port, cfg.collectives.deadline_floor.total_seconds(),
                   cfg.state_dir, channel, w.workload, deadline_k=cfg.collectives.deadline_k,
                   build_timeout=cfg.collectives.build_timeout.total_seconds(),
                   queue_capacity=w.queue_capacity, cuda_graphs=w.cuda_graphs, compile=w.compile, overlap=w.overlap,
                   prefill_tokens=w.prefill_tokens, disaggregate_tokens=w.disaggregate_tokens,
                   stream_interval=w.stream_interval.total_seconds(),
                   max_chunk_rate=w.max_chunk_rate, kv_memory_fraction=w.kv_memory_fraction,
                   preload=lay.tp == lay.pp == 1 and (device == "cpu" or lay.node_slots() == 1),
                   etcd_ca_cert=cfg.etcd.ca_cert, etcd_cert_key=cfg.etcd.cert_key, etcd_cert_cert=cfg.etcd.cert_cert,
                   etcd_user=cfg.etcd.user)

    def seat_params(self, local_rank: int) -> dict:
        """The seat's API port (``api_port + local_rank``, or 0 for a free one) and URL file."""
        return {"api_port": self.api_port + local_rank if self.api_port else 0,
                "api_url_file": str(self.state_dir / f"api-{local_rank}.url")}

    def __call__(self, local_rank: int | None, after_gen: int) -> list[str]:
        argv = [sys.executable, "-m", "rallypoint.worker", "--cluster", self.cluster, "--endpoints", self.endpoints,
                "--node", self.node, "--model", self.model, "--device", self.device, "--dtype", self.dtype,
                "--max-batch", str(self.max_batch), "--max-seq", str(self.max_seq), "--api-host", self.api_host,
                "--deadline-floor", str(self.deadline_floor), "--deadline-k", str(self.deadline_k),
                "--after-gen", str(after_gen), "--die-with-parent",
                "--workload", self.workload, "--build-timeout", str(self.build_timeout),
                "--queue-capacity", str(self.queue_capacity), "--cuda-graphs", "on" if self.cuda_graphs else "off",
                "--compile", "on" if self.compile else "off", "--overlap", "on" if self.overlap else "off",
                "--prefill-tokens", str(self.prefill_tokens), "--disaggregate-tokens", str(self.disaggregate_tokens),
                "--stream-interval", str(self.stream_interval),
                "--max-chunk-rate", str(self.max_chunk_rate),
                "--kv-memory-fraction", str(self.kv_memory_fraction)]
        if self.channel:
            argv += ["--channel", self.channel]
        for flag, value in (("--etcd-ca-cert", self.etcd_ca_cert), ("--etcd-cert-key", self.etcd_cert_key),
                            ("--etcd-cert-cert", self.etcd_cert_cert), ("--etcd-user", self.etcd_user)):
            if value:
                argv += [flag, value]
        if local_rank is None:  # --api-port: 0 lets a preloading spare open its API ahead
            return argv + ["--spare", "--api-port", str(self.api_port)] + (["--preload-shard"] if self.preload else [])
        p = self.seat_params(local_rank)
        return argv + ["--local-rank", str(local_rank), "--api-port", str(p["api_port"]),
                       "--api-url-file", p["api_url_file"]]
