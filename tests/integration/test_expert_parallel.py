"""A mixture of experts with its experts over real rank processes (gloo) matches the single-process reference.

Four rank processes, shared by every case, build each plan's ``tp``, ``pp`` and ``ep`` groups
(``ep``: every TP rank of every DP replica, per PP stage, as ``protocol.grid`` says) and load
their shard of one tiny random Mixtral-layout checkpoint (8 experts, 2 per token): EP rank ``r``
of ``E`` reads experts ``8r/E .. 8(r+1)/E - 1`` and no others. Each DP replica then prefills its
own prompt batch (different batch sizes and lengths per replica, one of a single row so that a
TP rank has no token of its own to send) and greedy-decodes 5 more steps; the replicas step
together, their tokens meeting in the experts' all-to-alls. Every replica's last-stage logits
must match the single-process float32 reference of its own prompts (relative error < 1e-4, as
``test_model_parallel``) and its greedy tokens must be the reference's exactly.

Then the serving layout, with real worker processes: a TP=2 replica whose two ranks hold half the
experts each serves the reference's greedy tokens, and still does when the peer is SIGKILLed
mid-stream.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rallypoint.protocol.orders import order_abort
from rallypoint.rendezvous.records import Plan, RankSlot
from rallypoint.testing.daemons import wait_for
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.testing.ranks import RankPool
from rallypoint.worker.checkpoint import EOS_ID, make_model
from rallypoint.worker.sampling import generate
from rallypoint.worker.shards import load_stage
from tests.integration.test_model_parallel import run_all
from tests.integration.test_serving import Deployment, post, stream

EXPERTS = 8
PROMPTS = [  # one batch per DP replica: [B, S]
    [[1, 72, 101, 108, 108, 111, 33], [256, 119, 111, 114, 108, 100, 10]],
    [[256, 84, 104, 101, 32]],
    [[256, 97, 98, 99], [256, 100, 101, 102], [256, 10, 11, 12]],
    [[256, 80, 97, 99, 107, 32, 109, 121, 32], [256, 98, 111, 120, 32, 119, 105, 116, 104]],
]
STEPS = 6  # the prefill's token, then 5 decode steps
_gens = itertools.count(1)
_cases = itertools.count()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("moe"), "tiny", seed=0, arch="moe")


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> list[tuple[list[list[int]], torch.Tensor]]:
    """Per replica's prompts: greedy tokens [B, STEPS] and every forward's logits [B, S + STEPS - 1, V]."""
    torch.set_num_threads(1)
    model = load_stage(ckpt, dtype=torch.float32)
    out = []
    for prompt in PROMPTS:
        tokens, logits = generate(model, torch.tensor(prompt), STEPS)
        out.append((tokens.tolist(), torch.cat(logits, dim=1)))
    return out


@pytest.fixture(scope="module")
def pool(etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RankPool]:
    p = RankPool(etcd.endpoints, f"moe-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("ranks"),
                 deadline_floor=5.0, module="rallypoint.testing.model_agent", groups="tp,pp,ep")
    p.spawn(4)  # every case reuses these
    yield p
    p.close()


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 2), (1, 1, 4), (2, 1, 2), (1, 2, 2)],
                         ids=["ep2", "ep4", "tp2xdp2-ep4", "pp2xdp2-ep2"])
def test_expert_parallel_decode_matches_reference(pool: RankPool, ckpt: Path, reference, tp: int, pp: int,
                                                  dp: int) -> None:
    n = tp * pp * dp
    ep = tp * dp
    case = next(_cases)
    seats = [(f"e{case}n{i // 2}", i % 2) for i in range(n)]
    plan = Plan(gen=next(_gens), tp=tp, pp=pp, dp=dp, ranks=tuple(RankSlot(i, s, l) for i, (s, l) in enumerate(seats)),
                members=tuple(sorted({s for s, _ in seats})), reason="test", leader="test")
    procs = pool.take(n)
    configured = run_all(procs, "configure", [{"node": s, "local_rank": l} for s, l in seats],
                         plan=json.loads(plan.to_json()))
    assert all(len(r["groups"]["ep"]) == ep for r in configured)
    loaded = run_all(procs, "load", ckpt=str(ckpt))
    per = EXPERTS // ep
    for r in loaded:  # each rank read its own experts and no others
        assert r["experts"] == list(range(r["ep_rank"] * per, (r["ep_rank"] + 1) * per)), r
    assert sorted(r["ep_rank"] for r in loaded) == sorted(list(range(ep)) * pp)
    prompts = [{"prompt": PROMPTS[r["dp_rank"]]} for r in loaded]
    out = run_all(procs, "generate", prompts, steps=STEPS)
    for r in out:
        ref_tokens, ref_logits = reference[r["dp_rank"]]
        if r["pp_rank"] in (0, pp - 1):
            assert r["tokens"] == ref_tokens, (r["dp_rank"], r["pp_rank"], r["tp_rank"], r["tokens"])
        if r["pp_rank"] == pp - 1:
            logits = torch.cat([torch.tensor(step) for step in r["logits"]], dim=1)   # [B, S + STEPS - 1, V]
            assert logits.shape == ref_logits.shape
            err = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
            assert err < 1e-4, f"tp={tp} pp={pp} dp={dp} replica {r['dp_rank']}: relative error {err:.2e}"


def test_served_at_tp2_with_experts_over_both_ranks_survives_a_sigkilled_rank(etcd: EtcdCluster, ckpt: Path,
                                                                              tmp_path: Path) -> None:
    """The serving layout: worker processes of one TP=2 replica hold 4 experts each (EP = TP inside
    the replica). A greedy completion gives the single-process reference's tokens; with the EP peer
    SIGKILLed mid-stream (the daemon's part played by the test: abort order, a new process on the
    seat, the next plan) the stream finishes with those same tokens."""
    prompt = [256, 84, 104, 101, 32, 113, 117, 105, 99, 107]
    ref, _ = generate(load_stage(ckpt, dtype=torch.float32), torch.tensor([prompt]), 48)
    ref_tokens = ref[0].tolist()
    assert EOS_ID not in ref_tokens  # so the served request runs to max_tokens as well
    d = Deployment(etcd, ckpt, tmp_path)
    try:
        seats = [("n0", 0), ("n0", 1)]
        workers = [d.start_worker(*s) for s in seats]
        plan = d.publish(2, seats)
        url = d.url(workers[0])
        body = {"prompt": prompt, "max_tokens": 48, "temperature": 0}
        code, out, _ = post(url, body)
        assert code == 200, out
        assert out["choices"][0]["token_ids"] == ref_tokens
        got: list[dict] = []
        seen: list[dict] = []
        t = threading.Thread(target=lambda: got.extend(stream(url, body, on_event=seen.append)))
        t.start()
        wait_for("the stream's first token", lambda: seen, timeout=30, every=0.005)
        assert seen[-1]["choices"][0]["finish_reason"] is None  # mid-stream when the peer dies
        os.kill(workers[1].pid, signal.SIGKILL)
        workers[1].wait()
        order_abort(d.client, d.keys, plan.gen, [1], "rank 1 exited")
        d.start_worker("n0", 1)
        d.publish(2, seats)
        t.join(timeout=120)
        assert [tok for e in got for tok in e["choices"][0]["token_ids"]] == ref_tokens
        driver_log = Path(workers[0].log_path).read_text()  # type: ignore[attr-defined]
        assert '"experts": [0, 4]' in driver_log and '"experts": [4, 8]' not in driver_log
    finally:
        d.close()
