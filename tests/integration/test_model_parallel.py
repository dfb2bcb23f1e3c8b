"""The sharded decoder in real rank processes matches the single-process float32 reference.

Up to 4 rank processes (gloo on CPU) are shared by every case: each case is a new plan (a new
generation) on fresh seats, then every rank loads its shard of the same tiny checkpoint, prefills a
[2, 7] prompt batch and greedy-decodes 5 more steps with the KV cache through the pipeline. The
last stage's logits must match the reference (relative error < 1e-4) and every rank that sees
tokens (first and last stage) must hold exactly the reference's greedy tokens. The last case puts
the batch in KV-cache rows [2, 0] with per-row positions, as continuous batching does.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rallypoint.rendezvous.records import Plan, RankSlot
from rallypoint.testing.etcd_server import EtcdCluster
from rallypoint.testing.ranks import RankPool, RankProcess
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.sampling import generate
from rallypoint.worker.shards import load_stage

PROMPT = [[1, 72, 101, 108, 108, 111, 33], [256, 119, 111, 114, 108, 100, 10]]  # B=2, S=7
STEPS = 6  # the prefill's token, then 5 decode steps
_gens = itertools.count(1)
_cases = itertools.count()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, STEPS] and the logits of every forward, concatenated: [B, S + STEPS - 1, V]."""
    tokens, logits = generate(load_stage(ckpt, dtype=torch.float32), torch.tensor(PROMPT), STEPS)
    return tokens, torch.cat(logits, dim=1)


@pytest.fixture(scope="module")
def pool(etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RankPool]:
    p = RankPool(etcd.endpoints, f"model-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("ranks"),
                 deadline_floor=5.0, module="rallypoint.testing.model_agent")
    p.spawn(4)  # every case reuses these
    yield p
    p.close()


def run_all(procs: list[RankProcess], cmd: str, per_proc: list[dict] | None = None, **kw) -> list[dict]:
    ids = [p.send(cmd, **{**kw, **(per_proc[i] if per_proc else {})}) for i, p in enumerate(procs)]
    out = [p.result(i, timeout=60) for p, i in zip(procs, ids)]
    for r in out:
        assert r["ok"], r
    return out


@pytest.mark.parametrize("tp,pp,rows", [(1, 1, None), (2, 1, None), (4, 1, None), (2, 2, None), (2, 2, [2, 0])],
                         ids=["tp1", "tp2", "tp4", "tp2xpp2", "tp2xpp2-rows"])
def test_sharded_decode_matches_reference(pool: RankPool, ckpt: Path, reference, tp: int, pp: int,
                                          rows: list[int] | None) -> None:
    ref_tokens, ref_logits = reference
    n = tp * pp
    case = next(_cases)
    seats = [(f"m{case}n{i // 2}", i % 2) for i in range(n)]
    plan = Plan(gen=next(_gens), tp=tp, pp=pp, dp=1, ranks=tuple(RankSlot(i, s, l) for i, (s, l) in enumerate(seats)),
                members=tuple(sorted({s for s, _ in seats})), reason="test", leader="test")
    procs = pool.take(n)
    run_all(procs, "configure", [{"node": s, "local_rank": l} for s, l in seats], plan=json.loads(plan.to_json()))
    loaded = run_all(procs, "load", ckpt=str(ckpt))
    assert sorted(tuple(r["layers"]) for r in loaded) == sorted(
        tuple(range(p * 4 // pp, (p + 1) * 4 // pp)) for p in range(pp) for _ in range(tp))
    out = run_all(procs, "generate", prompt=PROMPT, steps=STEPS, rows=rows)
    last = [r for r in out if r["pp_rank"] == pp - 1]
    assert len(last) == tp
    for r in out:
        if r["pp_rank"] in (0, pp - 1):
            assert r["tokens"] == ref_tokens.tolist(), (r["pp_rank"], r["tp_rank"], r["tokens"])
        else:
            assert r["tokens"] is None
    for r in last:
        logits = torch.cat([torch.tensor(step) for step in r["logits"]], dim=1)   # [B, S + STEPS - 1, V]
        assert logits.shape == ref_logits.shape
        err = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
        assert err < 1e-4, f"tp={tp} pp={pp} tp_rank={r['tp_rank']}: relative error {err:.2e}"
