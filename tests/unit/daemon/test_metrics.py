"""rallyd's metrics, fed a recovery's events, heartbeats and trips, read back through
prometheus_client's own parser."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rallypoint.daemon.metrics import DaemonMetrics
from rallypoint.recovery import events as ev
from rallypoint.recovery.machine import RecoveryMachine
from tests.unit.recovery.test_machine import e, recovery


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels without cluster/node): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            assert s.labels.pop("cluster") == "c1" and s.labels.pop("node") == "a"
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Worker:
    """Stands for a channel connection (the metrics key request counts by connection)."""


@pytest.fixture
def setup():
    machine = RecoveryMachine()
    status = {"gen": 0, "role": "leader", "etcd_ok": True, "spares": 1, "restarts": 2, "bad_seats": {"1": "gpu lost"},
              "workers": [{"state": "serving", "process": "sleeping", "in_flight": 3, "waiting": 1},
                          {"state": "serving", "process": "stopped", "in_flight": 0}]}
    m = DaemonMetrics("c1", "a", machine, lambda: status)
    return machine, status, m


def scrape(m: DaemonMetrics) -> dict:
    return parse(generate_latest(m.registry).decode())


def test_a_recovery_counts_its_cause_and_every_phase(setup) -> None:
    machine, status, m = setup
    for x in recovery(t0=100.0):
        if (t := machine.apply(x)) is not None:
            m.transition(t)
    status["gen"] = 2
    got = scrape(m)
    assert got[("rallypoint_recoveries_total", (("cause", "rank_exit"),))] == 1
    assert got[("rallypoint_generation", ())] == 2
    assert got[("rallypoint_cluster_state", (("state", "serving"),))] == 1
    assert got[("rallypoint_cluster_state", (("state", "recovering"),))] == 0
    assert got[("rallypoint_recovery_phase", (("phase", "serving"),))] == 1
    # aborting 100.10->100.13 (replan requested), planning ->100.20 (released), rebuilding ->100.61, loading ->101.00
    for phase, seconds in (("aborting", 0.03), ("planning", 0.07), ("rebuilding", 0.41), ("loading", 0.39)):
        assert got[("rallypoint_recovery_phase_seconds_count", (("phase", phase),))] == 1
        assert got[("rallypoint_recovery_phase_seconds_sum", (("phase", phase),))] == pytest.approx(seconds, abs=1e-6)
    assert got[("rallypoint_recovery_seconds_count", ())] == 1
    assert got[("rallypoint_recovery_seconds_sum", ())] == pytest.approx(0.9)
    assert got[("rallypoint_recovery_seconds_bucket", (("le", "0.5"),))] == 0
    assert got[("rallypoint_recovery_seconds_bucket", (("le", "1.0"),))] == 1


def test_a_hang_a_new_plan_and_a_failed_layout_each_say_what_they_are(setup) -> None:
    machine, status, m = setup
    status["gen"] = 3
    for x in (e(3, ev.SUSPECT_NAMED, 1.0, verdict="stuck"), e(3, ev.CANNOT_PLAN, 2.0, reason="no room")):
        m.transition(machine.apply(x))
    got = scrape(m)
    assert got[("rallypoint_recoveries_total", (("cause", "rank_hung"),))] == 1
    assert got[("rallypoint_cluster_state", (("state", "failed"),))] == 1
    assert got[("rallypoint_recovery_phase", (("phase", "failed"),))] == 1
    m.transition(machine.apply(e(4, ev.PLAN_WRITTEN, 3.0, dp=1, dp_wanted=2)))
    for x in (e(4, ev.RELEASED, 3.5), e(4, ev.FIRST_TOKEN, 4.0)):
        m.transition(machine.apply(x))
    got = scrape(m)
    assert got[("rallypoint_cluster_state", (("state", "degraded"),))] == 1 and got[("rallypoint_degraded", ())] == 1
    assert got[("rallypoint_recovery_phase_seconds_sum", (("phase", "failed"),))] == pytest.approx(1.0)
    assert got[("rallypoint_recovery_seconds_sum", ())] == pytest.approx(3.0)
    m.transition(machine.apply(e(5, ev.PLAN_WRITTEN, 9.0, dp=2, dp_wanted=2)))  # a node came back
    assert scrape(m)[("rallypoint_recoveries_total", (("cause", "membership"),))] == 1


def test_the_first_formation_is_not_a_recovery(setup) -> None:
    machine, status, m = setup
    status["gen"] = 1
    for x in (e(1, ev.PLAN_WRITTEN, 1.0, dp=1, dp_wanted=1), e(1, ev.RELEASED, 1.5), e(1, ev.SHARD_LOADED, 3.0),
              e(1, ev.FIRST_TOKEN, 4.0)):
        m.transition(machine.apply(x))
    got = scrape(m)
    assert not [k for k in got if k[0] in ("rallypoint_recoveries_total", "rallypoint_recovery_seconds_count",
                                         "rallypoint_recovery_phase_seconds_count")]
    assert got[("rallypoint_cluster_state", (("state", "serving"),))] == 1
    m.transition(machine.apply(e(1, ev.RANK_FAILED, 5.0, reason="x")))
    m.transition(machine.apply(e(1, ev.REPLAN_REQUESTED, 5.5)))
    got = scrape(m)
    assert got[("rallypoint_recoveries_total", (("cause", "rank_exit"),))] == 1
    assert got[("rallypoint_recovery_phase_seconds_sum", (("phase", "aborting"),))] == pytest.approx(0.5)


def test_node_gauges_and_counters_from_heartbeats(setup) -> None:
    machine, status, m = setup
    status["gen"] = 1
    w1, w2 = Worker(), Worker()
    m.beat(w1, {"accepted": 5, "completed": 3, "resumed": 1, "failed": 0, "rejected": 0})
    m.beat(w1, {"accepted": 7, "completed": 6, "resumed": 2, "failed": 0, "rejected": 1})
    m.beat(w2, {"accepted": 2, "completed": 0, "resumed": "x"})  # a junk value is skipped
    m.beat(w2, "not a dict")
    del w1  # its connection closed: a replacement counts from zero without undoing w1's counts
    m.beat(Worker(), {"accepted": 1, "completed": 1})
    m.collective_tripped("tp[0,1]@g1", "deadline")
    m.collective_tripped("dp[1,3]@g2", "error")
    m.collective_tripped("tp[2,3]@g2", "deadline")
    m.replaced("spare")
    got = scrape(m)
    assert got[("rallypoint_requests_total", (("outcome", "accepted"),))] == 10
    assert got[("rallypoint_requests_total", (("outcome", "completed"),))] == 7
    assert got[("rallypoint_requests_total", (("outcome", "rejected"),))] == 1
    assert got[("rallypoint_requests_resumed_total", ())] == 2
    assert got[("rallypoint_collectives_tripped_total", (("group", "tp"), ("trigger", "deadline")))] == 2
    assert got[("rallypoint_collectives_tripped_total", (("group", "dp"), ("trigger", "error")))] == 1
    assert got[("rallypoint_worker_replacements_total", (("strategy", "spare"),))] == 1
    assert got[("rallypoint_ranks", (("state", "serving"),))] == 1
    assert got[("rallypoint_ranks", (("state", "stopped"),))] == 1  # SIGSTOPped: the process says so
    assert got[("rallypoint_ranks", (("state", "spare"),))] == 1
    assert got[("rallypoint_requests_in_flight", ())] == 3 and got[("rallypoint_requests_waiting", ())] == 1
    assert got[("rallypoint_bad_seats", ())] == 1 and got[("rallypoint_restart_budget_used", ())] == 2
    assert got[("rallypoint_leader", ())] == 1 and got[("rallypoint_etcd_reachable", ())] == 1


def test_forming_before_the_first_generation_and_served_over_http(setup) -> None:
    machine, status, m = setup
    server = m.serve("127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    got = parse(text)
    assert got[("rallypoint_cluster_state", (("state", "forming"),))] == 1
    assert got[("rallypoint_generation", ())] == 0
    taken = m.serve("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            m.serve("127.0.0.1", taken.server_port)
    finally:
        taken.shutdown()
        taken.server_close()
