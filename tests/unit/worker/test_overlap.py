"""Overlapped decode (a whole model on one rank): the driver launches the next decode step, fed
the launched step's tokens, before reading them. The schedule must give exactly the tokens of
the plain loop: same rows, positions, KV lengths and draws, with requests arriving, ending on
EOS or ``max_tokens`` and being cancelled mid-run. The model is a fake (pure scheduling logic):
its next token is a hash of the fed token and its position, so any wrong input or position in
a step changes every later token."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rallypoint.worker import engine
from rallypoint.worker.engine import DECODE, Driver, EngineSettings, serve_generation
from rallypoint.worker.requests import Request, RequestQueue, SamplingParams

VOCAB = 97


class HashModel:
    """logits [B, S or 1, V]: one-hot of (token * 31 + position * 7) % V, per position."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int]] = []  # (B, S, kv_len) of every forward

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None,
                kv_len: int | None = None, last: torch.Tensor | None = None) -> torch.Tensor:
        self.steps.append((x.shape[0], x.shape[1], int(kv_len or 0)))
        nxt = (x * 31 + pos * 7) % VOCAB                                                    # [B, S]
        if last is not None:
            nxt = nxt.gather(1, last[:, None])
        return torch.nn.functional.one_hot(nxt, VOCAB).float()


def run(overlap: bool) -> tuple[list[list[int]], list[str | None], HashModel, int]:
    """Serve a scripted workload to the end; returns every request's tokens and finish reason,
    the model (its step shapes) and how many steps were launched ahead."""
    q = RequestQueue()
    settings = EngineSettings(max_batch=4, max_seq=128, idle_every=0.0, prefill_tokens=16, overlap=overlap)
    driver = Driver(q, settings, torch.device("cpu"))
    model = HashModel()
    groups = SimpleNamespace(is_first_stage=True, is_last_stage=True, tp_size=1, pp_size=1)
    reqs = [q.submit(Request([3 + i] * (4 + 5 * i), SamplingParams(max_tokens=20 + 7 * i), eos=frozenset({5})))
            for i in range(3)]
    later = [Request([50 + i] * 9, SamplingParams(max_tokens=30 - 4 * i)) for i in range(4)]
    ahead = 0
    plan_ahead = driver.plan_ahead

    def counting(*a):  # type: ignore[no-untyped-def]
        nonlocal ahead
        got = plan_ahead(*a)
        ahead += got is not None
        return got

    driver.plan_ahead = counting  # type: ignore[method-assign]
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        if calls in (6, 11, 12, 30):  # requests arrive while others decode
            reqs.append(q.submit(later.pop(0)))
        if calls == 25:
            reqs[1].cancel("stop")  # a stop string, or the client went away
        return not later and all(r.done for r in reqs)

    assert serve_generation(model, None, groups, settings, torch.device("cpu"), driver, should_stop) == 0
    return [r.committed for r in reqs], [r.finish_reason for r in reqs], model, ahead


def test_overlapped_decode_gives_the_plain_loops_tokens_and_shapes() -> None:
    plain_tokens, plain_reasons, plain_model, plain_ahead = run(overlap=False)
    tokens, reasons, model, ahead = run(overlap=True)
    assert plain_ahead == 0
    assert ahead > 20, f"only {ahead} steps were launched ahead"  # the overlapped path did run
    assert tokens == plain_tokens and reasons == plain_reasons
    assert "stop" in reasons and "length" in reasons and "cancelled" not in reasons
    assert all(len(t) > 0 for t in tokens)
    # Every plain step is in the overlapped run; the extra ones are throwaway steps of rows whose
    # launched step drew EOS or was cancelled (at most one per such ending).
    extra = len(model.steps) - len(plain_model.steps)
    assert 0 <= extra <= reasons.count("stop") + 1, (len(model.steps), len(plain_model.steps))


def test_no_step_is_planned_ahead_when_the_next_could_differ() -> None:
    q = RequestQueue()
    d = Driver(q, EngineSettings(max_batch=2, max_seq=64), torch.device("cpu"))
    a = q.submit(Request([1, 2, 3], SamplingParams(max_tokens=5), eos=frozenset({9})))
    hdr, _, produced = d.plan()
    d.done(produced, torch.tensor([4]))
    hdr, _, produced = d.plan()
    assert int(hdr[0]) == DECODE
    nxt = torch.tensor([6])
    got = d.plan_ahead(hdr, produced, nxt)
    assert got is not None
    a_hdr, a_tokens, a_produced = got
    assert a_tokens is nxt and a_produced == produced
    mb = d.settings.max_batch
    assert int(a_hdr[engine._FIXED + engine.STARTS * mb]) == int(hdr[engine._FIXED + engine.STARTS * mb]) + 1
    # a request waiting for the free row: the next step admits it
    q.submit(Request([7], SamplingParams(max_tokens=3)))
    assert d.plan_ahead(hdr, produced, nxt) is None
    q.take(1)
    # 3 tokens made, the launched step makes the 4th: one more is still within max_tokens 5 ...
    a.pending += [6, 6]
    assert d.plan_ahead(hdr, produced, nxt) is not None
    a.pending.append(6)  # ... but not once the launched step makes the 5th, the last
    assert d.plan_ahead(hdr, produced, nxt) is None
    a.pending[:] = [9]  # EOS pending: the row ends once it commits
    assert d.plan_ahead(hdr, produced, nxt) is None
    a.pending.clear()
    d.switch_to = 4
    assert d.plan_ahead(hdr, produced, nxt) is None
    d.switch_to = 0
    a.fed = 0  # replaying committed tokens: its input is not the sampled token
    assert d.plan_ahead(hdr, produced, nxt) is None
