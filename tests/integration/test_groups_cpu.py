"""Groups and collectives with real processes: values, kills, stops, rebuilds, blast radius.

On CPU (CI) the ranks use gloo. With ``RALLYPOINT_TEST_DEVICE=cuda`` (a GPU machine) the same tests
run on NCCL, one GPU per rank; ``RALLYPOINT_TEST_GPUS`` says how many GPUs there are.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rallypoint.rendezvous.records import Plan, RankSlot
from rallypoint.testing.daemons import wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.testing.ranks import RankPool, RankProcess

_gens = itertools.count(1)
_tests = itertools.count()
DEVICE = os.environ.get("RALLYPOINT_TEST_DEVICE", "cpu")
GPUS = int(os.environ.get("RALLYPOINT_TEST_GPUS", "0"))
ON_GPU = DEVICE == "cuda"
# gloo reports a dead peer at once; NCCL does not, so there a survivor waits for its deadline
# (1 s floor) and then aborts (about 0.5 s).
KILL_LIMIT = 2.0 if ON_GPU else 1.0
RESULTS: dict[str, object] = {}


def need(n: int) -> None:
    if ON_GPU and n > GPUS:
        pytest.skip(f"needs {n} GPUs, this machine has {GPUS}")


@pytest.fixture(scope="module")
def pool(etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RankPool]:
    p = RankPool(etcd.endpoints, "groups", tmp_path_factory.mktemp("ranks"), deadline_floor=1.0, device=DEVICE)
    yield p
    p.close()
    if os.environ.get("RALLYPOINT_TEST_RESULTS"):
        Path(os.environ["RALLYPOINT_TEST_RESULTS"]).write_text(json.dumps(RESULTS, indent=1))


def make_plan(tp: int, pp: int, dp: int, seats: list[tuple[str, int]]) -> Plan:
    return Plan(gen=next(_gens), tp=tp, pp=pp, dp=dp,
                ranks=tuple(RankSlot(i, n, l) for i, (n, l) in enumerate(seats)),
                members=tuple(sorted({n for n, _ in seats})), reason="test", leader="test")


def seats_for(n: int, per_node: int = 2) -> list[tuple[str, int]]:
    need(n)
    if ON_GPU:
        per_node = GPUS  # one node, one GPU per seat
    t = next(_tests)
    return [(f"t{t}n{i // per_node}", i % per_node) for i in range(n)]


def configure(procs: list[RankProcess], plan: Plan, seats: list[tuple[str, int]]) -> list[dict]:
    d = json.loads(plan.to_json())
    ids = [p.send("configure", plan=d, node=s[0], local_rank=s[1]) for p, s in zip(procs, seats)]
    out = [p.result(i) for p, i in zip(procs, ids)]
    for r in out:
        assert r["ok"], r
    return out


def run_all(procs: list[RankProcess], cmd: str, timeout: float = 60, **kw) -> list[dict]:
    ids = [p.send(cmd, **kw) for p in procs]
    return [p.result(i, timeout) for p, i in zip(procs, ids)]


def wait_looping(procs: list[RankProcess], ids: list[int], at_least: int = 20, timeout: float = 30) -> None:
    """Block until each rank's ``loop`` (sent as ``ids``) has completed ``at_least`` all-reduces:
    the collectives run on every rank, so a fault now lands in the middle of the loop."""
    last: list[tuple[int | None, int]] = []

    def going() -> bool:
        last[:] = [(r["loop"], r["iters"]) for r in (p.call("progress", timeout=10) for p in procs)]
        return all(loop == i and n >= at_least for (loop, n), i in zip(last, ids))

    try:
        wait_for("every rank's loop under way", going, timeout=timeout, every=0.02)
    except AssertionError:
        raise AssertionError(f"not every rank {at_least} iterations into loops {ids} after {timeout}s: "
                             f"(loop, iterations) {last}") from None


def wait_aborts_finished(procs: list[RankProcess], timeout: float = 10) -> list[float]:
    """The seconds each group abort of ``procs`` took, once every abort begun has finished (NCCL's
    take about 0.5 s, and go on after the collective they interrupted has raised)."""
    def finished() -> list[float] | None:
        took = [s for p in procs for s in p.call("stats")["abort_seconds"]]
        return took if took and all(s > 0 for s in took) else None

    return wait_for("the group aborts to finish", finished, timeout=timeout, every=0.05)


def test_eight_ranks_tp2_pp2_dp2_groups_and_primitives(pool: RankPool) -> None:
    seats = seats_for(8, per_node=4)
    procs = pool.take(8)
    out = configure(procs, make_plan(2, 2, 2, seats), seats)
    groups = {r["rank"]: r["groups"] for r in out}
    assert sorted(groups) == list(range(8))
    assert sorted({tuple(g["tp"]) for g in groups.values()}) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert sorted({tuple(g["pp"]) for g in groups.values()}) == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert sorted({tuple(g["dp"]) for g in groups.values()}) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    results = run_all(procs, "primitives", group="tp", pp=True)
    for r in results:
        assert r["ok"], r
    by_rank = {o["rank"]: r for o, r in zip(out, results)}
    for rank, r in by_rank.items():
        peer = rank ^ 1
        assert r["all_reduce"] == [float(rank + 1 + peer + 1)] * 3
        assert r["all_gather_0"] == [[0, 1], [2, 3], [10, 11], [12, 13]]
        assert r["all_gather_1"] == [[0, 1, 10, 11], [2, 3, 12, 13]]
        me = rank % 2
        assert r["reduce_scatter_0"] == [[[0, 3], [6, 9]][me]]
        assert r["reduce_scatter_1"] == [[[0], [6]], [[12], [18]]][me]
        assert r["broadcast"] == [1.0, 1.0]
        # uneven all-to-all: member i sent me i+me+1 rows valued 100*i + me
        assert r["all_to_all"] == [float(100 * i + me) for i in range(2) for _ in range(i + me + 1)]
        if (rank // 2) % 2 == 1:  # last PP stage received the dict from stage 0
            assert r["recv_dict"] == {"h": [[2, 3], "torch.float32", [7.0] * 6],
                                      "pos": [[5], "torch.int64", [0, 1, 2, 3, 4]]}
    # The DP group runs the same primitives (a group that spans replicas).
    for r in run_all(procs, "primitives", group="dp"):
        assert r["ok"], r


def test_bad_inputs_raise_clear_errors(pool: RankPool) -> None:
    seats = seats_for(2)
    procs = pool.take(2)
    configure(procs, make_plan(2, 1, 1, seats), seats)
    assert procs[0].call("call_bad", what="dtype")["message"].endswith("cannot sum tensors of dtype torch.bool")
    assert "tensor is on meta" in procs[0].call("call_bad", what="device")["message"]
    assert "need 2 splits each way" in procs[0].call("call_bad", what="splits")["message"]
    bad = Plan(gen=next(_gens), tp=2, pp=1, dp=1, ranks=(RankSlot(0, "x", 0), RankSlot(1, "x", 1)),
               members=("x",), reason="t", leader="t")
    r = procs[0].call("configure", plan=json.loads(bad.to_json()), node="elsewhere", local_rank=0)
    assert not r["ok"] and r["error"] == "GroupError" and "places no rank on elsewhere/0" in r["message"]


def test_sigkill_during_all_reduce_every_survivor_raises_within_1s(pool: RankPool) -> None:
    seats = seats_for(4)
    procs = pool.take(4)
    plan = make_plan(4, 1, 1, seats)
    configure(procs, plan, seats)
    ids = [p.send("loop", group="tp", iters=10**7) for p in procs]
    wait_looping(procs, ids)
    victim = procs[2]
    t_kill = time.time()
    victim.kill()
    if ON_GPU:
        # NCCL reports no dead peer: the daemon, which reaps the process, gives the order.
        for p in procs:
            if p is not victim:
                p.send("abort", gen=plan.gen, ranks=[2], reason="rank 2 exited")
    suspects = set()
    for p, i in zip(procs, ids):
        if p is victim:
            continue
        r = p.result(i, timeout=10)
        assert r["ok"] and r["raised"], r
        assert "aborted" in r["raised"]
        assert r["raised_at"] - t_kill < KILL_LIMIT, f"raised {r['raised_at'] - t_kill:.3f}s after the kill"
        RESULTS.setdefault("kill_to_raise_s", []).append(r["raised_at"] - t_kill)
        if ON_GPU:  # NCCL may finish the collective in flight without the dead peer's share
            RESULTS.setdefault("wrong_results_after_kill", []).append(r["wrong"])
            continue
        assert r["wrong"] == [], r["wrong"]
        suspects |= {(s["rank"], s["kind"]) for d in r["diagnoses"] for s in d["suspects"]}
    if not ON_GPU:
        assert suspects == {(2, "dead")}
    RESULTS.setdefault("abort_s", []).extend(wait_aborts_finished([p for p in procs if p is not victim]))


def test_sigstop_trips_within_deadline_and_names_exactly_that_rank(pool: RankPool) -> None:
    seats = seats_for(3, per_node=3)
    procs = pool.take(3)
    configure(procs, make_plan(3, 1, 1, seats), seats)
    ids = [p.send("loop", group="tp", iters=10**7) for p in procs]
    wait_looping(procs, ids, at_least=50)  # some history for the deadlines (k x p99)
    stopped = procs[1]
    t_stop = time.time()
    stopped.signal(signal.SIGSTOP)
    deadlines: list[float] = []
    raised: list[float] = []
    named: set[tuple[int, str]] = set()
    try:
        for p, i in zip(procs, ids):
            if p is stopped:
                continue
            r = p.result(i, timeout=15)
            assert r["raised"], r
            # Its own diagnosis, or the one of the peer whose abort it followed, names rank 1.
            assert "suspects 1:stuck" in r["raised"], r["raised"]
            named |= {(s["rank"], s["kind"]) for d in r["diagnoses"] for s in d["suspects"]}
            deadlines.extend(d["deadline"] for d in r["diagnoses"] if d["trigger"] == "deadline")
            raised.append(r["raised_at"] - t_stop)
            RESULTS.setdefault("stop_to_raise_s", []).append(r["raised_at"] - t_stop)
            RESULTS.setdefault("stop_trip_waited_s", []).extend(d["waited"] for d in r["diagnoses"])
        # The first survivor trips on its deadline (floor 1 s, or k x p99 when CPU noise is worse);
        # it aborts and marks the group, so the others follow at once.
        RESULTS.setdefault("abort_s", []).extend(wait_aborts_finished([p for p in procs if p is not stopped]))
        assert named == {(1, "stuck")}, named
        assert deadlines, "nobody tripped on a deadline"
        assert min(raised) <= min(deadlines) + 0.5, (raised, deadlines)
        assert max(raised) <= min(deadlines) + 0.5 + 0.2, (raised, deadlines)
    finally:
        stopped.kill()


def test_rebuild_with_a_replacement_process(pool: RankPool) -> None:
    seats = seats_for(2)
    procs = pool.take(2)
    configure(procs, make_plan(2, 1, 1, seats), seats)
    ids = [p.send("loop", group="tp", iters=10**7) for p in procs]
    wait_looping(procs, ids)
    procs[1].kill()
    r = procs[0].result(ids[0], timeout=10)
    assert r["raised"] and r["iters"] >= 20, r
    replacement = pool.take(2)[1]
    assert replacement is not procs[1]
    plan = make_plan(2, 1, 1, seats)  # same seats, next generation, a new process on seat 1
    out = configure([procs[0], replacement], plan, seats)
    RESULTS.setdefault("rebuild_s", []).extend(o["seconds"] for o in out)
    assert "tp" not in out[0]["carried"] and out[0]["gen"] == plan.gen
    for r in run_all([procs[0], replacement], "loop", group="tp", iters=20):
        assert r["ok"] and r["raised"] is None and r["iters"] == 20 and r["wrong"] == []


def test_blast_radius_one_replica_dies_the_other_never_notices(pool: RankPool) -> None:
    seats = seats_for(4)
    procs = pool.take(4)
    plan = make_plan(2, 1, 2, seats)
    configure(procs, plan, seats)
    iters = 60000 if ON_GPU else 4000  # a few seconds either way
    ids = [p.send("loop", group="tp", iters=iters if i < 2 else 10**7) for i, p in enumerate(procs)]
    wait_looping(procs, ids)
    # Deliberate: the window of steps before the kill that the gaps below are compared with (1.5 s).
    time.sleep(1.5)
    t_kill = time.time()
    procs[3].kill()
    # The daemon's order after a failure: abort the dead rank's groups everywhere.
    for p in procs[:3]:
        p.call("abort", gen=plan.gen, ranks=[3], reason="rank 3 died")
    survivor = procs[2].result(ids[2], timeout=10)
    assert survivor["raised"]
    for p, i in zip(procs[:2], ids[:2]):
        r = p.result(i, timeout=60)
        assert r["ok"] and r["raised"] is None and r["iters"] == iters, r
        assert r["wrong"] == [], r["wrong"]
        stamps = r["stamps"]
        # Compare equal windows: the last 1.5 s before the kill and the first 1.5 s after it.
        gaps_before = [b - a for a, b in itertools.pairwise(stamps) if t_kill - 1.5 <= a and b < t_kill]
        gaps_after = [b - a for a, b in itertools.pairwise(stamps) if t_kill <= a < t_kill + 1.5]
        assert len(gaps_before) > 50 and len(gaps_after) > 50, (len(gaps_before), len(gaps_after))
        # Noticing the failure would mean waiting out a deadline (the 1 s floor) and raising; the
        # loop never raised (above), and no step after the kill took as long as a deadline. (On
        # a loaded 2-core box scheduling alone has stalled a step for 0.36 s while the killed
        # rank was reaped, so the bound is the deadline, not the gaps before the kill.)
        assert max(gaps_after) < 1.0, (max(gaps_before), max(gaps_after))
        RESULTS.setdefault("blast_radius_max_gap_before_after_s", []).append([max(gaps_before), max(gaps_after)])


def test_twenty_abort_rebuild_cycles_leave_fds_and_threads_flat(pool: RankPool) -> None:
    seats = seats_for(2)
    procs = pool.take(2)
    samples = []
    for cycle in range(20):
        plan = make_plan(2, 1, 1, seats)
        configure(procs, plan, seats)
        for r in run_all(procs, "loop", group="tp", iters=5):
            assert r["raised"] is None and r["wrong"] == [], r
        ids = [p.send("loop", group="tp", iters=10**7) for p in procs]
        wait_looping(procs, ids, at_least=5)  # the abort lands mid-loop
        procs[0].call("abort", gen=plan.gen, reason=f"drill {cycle}")
        for p, i in zip(procs, ids):
            assert p.result(i, timeout=10)["raised"]
        samples.append([p.call("stats") for p in procs])
    for k in ("fds", "os_threads"):
        for rank in range(2):
            series = [s[rank][k] for s in samples]
            assert max(series[5:]) <= series[5] + 2, f"{k} of rank {rank} grew: {series}"
