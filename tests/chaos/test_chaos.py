"""CI's short chaos subset: one real deployment (3 etcd members, 3 rallyd, TP=2 on CPU) under a
steady request load, serving a Mixtral-layout MoE model (experts split over each replica's two
ranks): a rank SIGKILLed, a rank SIGSTOPped, a whole node SIGKILLed, the etcd leader SIGKILLed, an
expert-parallel rank SIGKILLed (only the replacement loads, only its experts). After each: every
accepted request finished with the failure-free tokens, one plan per generation, generations only
grow, no orphan process, no process hit by the fault wrote into a later generation, and the cluster
serves again. The full suite and the soak: ``python -m tests.chaos.run``."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from rallypoint.testing.etcd_server import etcd_binary
from tests.chaos.runner import Chaos, report
from tests.chaos.scenarios import CI_SUBSET


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory):
    if etcd_binary() is None:
        pytest.skip("etcd is not installed")
    # Mixtral's layout: every replica's experts are split over its two ranks (EP = TP), so each
    # fault below also strikes an expert-parallel group's all-to-alls.
    c = Chaos.start(Path(tmp_path_factory.mktemp("chaos")), seed=1, arch="moe")
    yield c
    leftovers = c.stop()
    print("\n" + report(c.results)[0])
    assert leftovers == [], leftovers


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario", CI_SUBSET)
def test_the_cluster_survives(chaos: Chaos, scenario: str) -> None:
    r = chaos.run(scenario, random.Random(f"ci-{scenario}"))
    assert r.survived, "\n".join(r.problems)
    assert r.in_flight > 0, "no request was in flight when the fault struck"
    assert r.lost == 0 and r.requests > 0 and r.to_serving is not None
    if scenario in ("kill_rank", "kill_ep_rank", "stop_rank", "kill_node"):
        assert r.detection is not None and r.detection < 10
