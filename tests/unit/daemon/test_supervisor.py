"""Supervisor: one process per seat, exits reported at once, a restart budget per window."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import psutil

from rallypoint.daemon.config import Config
from rallypoint.daemon.supervisor import Supervisor, WorkerCommand
from rallypoint.testing.daemons import wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.worker.args import parse_args, runtime_settings


def sleeper(local_rank: int | None, after_gen: int) -> list[str]:
    return [sys.executable, "-c", "import time; time.sleep(30)"]


def watchers_done(*seats: int) -> bool:
    """No exit watcher of these seats is still running: any exit report they make has been made."""
    names = {f"watch-worker-{s}" for s in seats}
    return not any(t.name in names and t.is_alive() for t in threading.enumerate())


def test_ensure_starts_one_process_per_seat_and_exits_are_reported(tmp_path: Path) -> None:
    exits: list[tuple[int, int]] = []
    sup = Supervisor(sleeper, tmp_path, on_exit=lambda w, c: exits.append((w.local_rank, c)))
    try:
        first = sup.ensure(0)
        assert sup.ensure(0) is first  # a live worker is not started twice
        first.proc.kill()
        wait_for("the exit report", lambda: exits, timeout=5, every=0.005)
        assert exits == [(0, -9)]
        assert sup.ensure(0).pid != first.pid
        sup.stop(0)  # asked for: not reported
        wait_for("seat 0's exit watchers to finish", lambda: watchers_done(0), timeout=5, every=0.01)
        assert exits == [(0, -9)] and sup.alive() == {}
    finally:
        sup.stop_all()


def finisher(local_rank: int | None, after_gen: int) -> list[str]:
    """A worker that, on SIGTERM, finishes what it is doing (0.3 s) and exits 0."""
    return [sys.executable, "-c", "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.3), sys.exit(0)))\n"
            "print('ready', flush=True)\ntime.sleep(30)"]


def deaf(local_rank: int | None, after_gen: int) -> list[str]:
    """A worker stuck where no signal handler runs (SIGTERM ignored)."""
    return [sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\ntime.sleep(30)"]


def wait_ready(tmp_path: Path, local_rank: int) -> None:
    wait_for(f"worker {local_rank} to say ready",
             lambda: "ready" in (tmp_path / f"worker-{local_rank}.log").read_text(), timeout=10, every=0.01)


def test_a_dropped_seat_is_asked_to_exit_and_killed_only_after_its_grace(tmp_path: Path) -> None:
    exits: list[tuple[int, int]] = []
    polite = Supervisor(finisher, tmp_path, on_exit=lambda w, c: exits.append((w.local_rank, c)))
    stuck = Supervisor(deaf, tmp_path / "deaf", on_exit=lambda w, c: exits.append((w.local_rank, c)))
    try:
        w = polite.ensure(0)
        wait_ready(tmp_path, 0)
        t0 = time.monotonic()
        polite.retire(0, grace=5.0)  # returns at once: rallyd's loop does not wait
        assert time.monotonic() - t0 < 0.1 and polite.alive() == {} and 0 in polite.retiring
        assert w.proc.wait(timeout=5) == 0  # it finished on SIGTERM, nobody killed it
        v = stuck.ensure(1)
        wait_ready(tmp_path / "deaf", 1)
        stuck.retire(1, grace=0.5)
        assert v.proc.wait(timeout=5) == -9  # it ignored SIGTERM: killed once the grace ran out
        wait_for("both retirements done", lambda: not polite.retiring and not stuck.retiring and watchers_done(0, 1),
                 timeout=5, every=0.01)
        assert exits == []  # asked for: not reported
    finally:
        polite.stop_all()
        stuck.stop_all()


def test_a_seat_started_again_first_ends_its_retiring_process(tmp_path: Path) -> None:
    sup = Supervisor(deaf, tmp_path, on_exit=lambda w, c: None)
    try:
        old = sup.ensure(0)
        wait_ready(tmp_path, 0)
        sup.retire(0, grace=30.0)
        new = sup.ensure(0)  # the next plan wants the seat back before the old process left
        assert old.proc.poll() == -9 and new.proc.poll() is None and not sup.retiring
    finally:
        sup.stop_all()


def parent_watcher(local_rank: int | None, after_gen: int) -> list[str]:
    """A worker that asks Linux for SIGKILL when its parent goes, as ``--die-with-parent`` does
    (after its imports: here 0.3 s)."""
    return [sys.executable, "-c", "import ctypes, time\ntime.sleep(0.3)\n"
            "ctypes.CDLL(None).prctl(1, 9)\nprint('ready', flush=True)\ntime.sleep(30)"]


def test_a_worker_outlives_the_thread_that_started_it(tmp_path: Path) -> None:
    """Linux sends the parent-death signal when the *thread* that forked the child ends. Exits
    are handled (and replacements started) on short-lived threads, one of which may linger in an
    etcd retry past the child's start-up: the replacement must not die when that thread ends."""
    sup = Supervisor(parent_watcher, tmp_path, on_exit=lambda w, c: None)
    started: list = []

    def short_lived() -> None:
        started.append(sup.ensure(0))
        wait_ready(tmp_path, 0)  # still here when the child sets its parent-death signal (then says ready)

    t = threading.Thread(target=short_lived)
    t.start()
    t.join()
    try:
        time.sleep(0.3)  # deliberate: time for a parent-death SIGKILL, had the thread's end sent one, to land
        assert started[0].proc.poll() is None, f"the worker died with its starting thread: {started[0].proc.poll()}"
    finally:
        sup.stop_all()


def test_collective_settings_reach_the_workers_runtime(tmp_path: Path) -> None:
    """``[collectives]`` keys travel config -> WorkerCommand argv -> worker flags -> RuntimeSettings."""
    cfg = Config()
    cfg = replace(cfg, cluster="c", node="n", state_dir=tmp_path, layout=replace(cfg.layout, gpus=0),
                  worker=replace(cfg.worker, model="m"),
                  collectives=replace(cfg.collectives, deadline_floor=timedelta(seconds=2.5), deadline_k=7.5,
                                      build_timeout=timedelta(seconds=12)))
    command = WorkerCommand.from_config(cfg, "@rallyd-n")
    for local_rank in (1, None):  # a seat, a spare
        argv = command(local_rank, after_gen=3)
        assert argv[1:3] == ["-m", "rallypoint.worker"]
        args = parse_args(argv[3:])
        assert (args.cluster, args.node, args.local_rank, args.after_gen) == ("c", "n", local_rank, 3)
        rt = runtime_settings(args)
        assert (rt.deadline_floor, rt.deadline_k, rt.build_timeout, rt.device) == (2.5, 7.5, 12.0, "cpu")



def title(pid: int) -> str:
    return " ".join(psutil.Process(pid).cmdline()).strip()


def test_a_seat_starts_in_the_standby_interpreter_and_a_new_one_takes_its_place(
        etcd: EtcdCluster, cluster_name: str, tmp_path: Path) -> None:
    """``[worker] standby``: a seat's worker runs in the standby that was waiting (same pid, its
    title says it took the seat), a new standby starts behind it, a standby killed before use is
    replaced (no seat exit reported), the seat's exit is reported as any worker's, and
    ``stop_all`` leaves no process behind."""
    cfg = Config()
    cfg = replace(cfg, cluster=cluster_name, node="n", state_dir=tmp_path, etcd=replace(cfg.etcd, endpoints=etcd.endpoints),
                  layout=replace(cfg.layout, gpus=0), worker=replace(cfg.worker, workload="allreduce-probe"))
    exits: list[tuple[int, int]] = []
    sup = Supervisor(WorkerCommand.from_config(cfg, None), tmp_path / "logs",
                     on_exit=lambda w, c: exits.append((w.local_rank, c)), standby=True)
    pids: set[int] = set()
    try:
        sup.fill_standby()
        first = sup.standby
        assert first is not None and first.standby
        pids.add(first.pid)
        wait_for("the standby's imports", lambda: title(first.pid) == f"rallypoint standby (cluster {cluster_name}, "
                 "node n, ready)", timeout=60, every=0.05)
        w = sup.ensure(0)
        assert w is first and w.pid == first.pid and w.from_standby and not w.standby and w.local_rank == 0
        assert sup.alive() == {0: w}
        wait_for("the worker's own title", lambda: title(w.pid) == f"rallypoint worker (cluster {cluster_name}, "
                 "seat n/0, waiting for a plan)", timeout=30, every=0.05)
        assert '"worker.standby_taken"' in (tmp_path / "logs" / "worker-0.log").read_text()
        second = wait_for("a new standby", lambda: sup.standby, timeout=10, every=0.01)
        pids.add(second.pid)
        assert second.pid != first.pid and second.standby
        second.proc.kill()  # dies before use: replaced, and it was no seat
        third = wait_for("the standby replaced", lambda: (s := sup.standby) is not None and s is not second and s,
                         timeout=10, every=0.01)
        pids.add(third.pid)
        assert second.proc.wait(timeout=5) == -9 and exits == []
        pids.update(p.pid for p in psutil.Process(w.pid).children(recursive=True))
        w.proc.kill()  # the seat's worker, once a standby: its exit is a seat's
        wait_for("the seat's exit report", lambda: exits, timeout=5, every=0.005)
        assert exits == [(0, -9)]
        wait_for("the third standby's imports", lambda: "ready" in title(third.pid), timeout=60, every=0.05)
    finally:
        sup.stop_all()
    assert sup.standby is None and not [p for p in pids if psutil.pid_exists(p)]


def test_without_a_standby_a_worker_starts_afresh(tmp_path: Path) -> None:
    """Standby on, but workers that are not ``rallypoint.worker`` (or no standby alive): a plain
    start, and no standby is ever started."""
    sup = Supervisor(sleeper, tmp_path, on_exit=lambda w, c: None, standby=True)
    try:
        sup.fill_standby()
        w = sup.ensure(0)
        assert sup.standby is None and not w.from_standby and w.proc.poll() is None
    finally:
        sup.stop_all()
