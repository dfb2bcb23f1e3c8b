"""Process titles: what ``ps`` shows of a worker or a spare, read back for rallyd's tools."""

from __future__ import annotations

from rallypoint.worker.title import ProcessInfo, describe, spare_title, worker_title


def test_titles_say_rank_generation_seat_and_state_and_read_back() -> None:
    t = worker_title("demo", "node-a/1", "serving", rank=3, gen=7)
    assert t == "rallypoint worker rank 3 gen 7 (cluster demo, seat node-a/1, serving)"
    assert describe(t) == ProcessInfo("worker", "demo", 1)
    assert describe(worker_title("demo", "node-a/0", "waiting for a plan")) == ProcessInfo("worker", "demo", 0)
    assert describe(spare_title("c1", "node-b", "waiting for a seat")) == ProcessInfo("spare", "c1", None)


def test_a_command_line_before_the_title_is_set_reads_the_same() -> None:
    argv = ["/usr/bin/python3", "-m", "rallypoint.worker", "--cluster", "demo", "--node", "a", "--local-rank", "2"]
    assert describe(argv) == ProcessInfo("worker", "demo", 2)
    assert describe(argv[:6] + ["--spare"]) == ProcessInfo("spare", "demo", None)
    assert describe(["python3", "-m", "rallypoint.daemon", "--cluster", "demo"]) is None
    assert describe("rallypoint workers are great") is None
    assert describe("/usr/bin/python3 -m rallypoint.worker.api_process --fd 5 --model m") is None
    assert describe("/usr/bin/python3 -m rallypoint.worker --standby") is None  # not a worker until handed a seat
    assert describe("rallypoint gateway (cluster demo, node node-a) 2/4") is None  # rallyd's gateway processes
    assert describe("/usr/bin/python3 -m rallypoint.gateway.child --fd 5 --listen-fd 6 --model m") is None
