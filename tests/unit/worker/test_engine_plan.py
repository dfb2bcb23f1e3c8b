"""The driver's step plans (pure scheduling logic, no model): chunked prefill taking turns with
decode, rows 0..B-1 with a power-of-two KV length, padding kept inside the cache."""

from __future__ import annotations

import torch

from rallypoint.worker.engine import DECODE, LENS, PREFILL, ROWS, STARTS, Driver, EngineSettings, _field, sample
from rallypoint.worker.requests import Request, RequestQueue, SamplingParams


def plan_of(d: Driver) -> tuple[int, int, int, int, list[int], list[int], list[int], list[Request]]:
    hdr, _, produced = d.plan()
    kind, b, s, _, kv_len = hdr[:5].tolist()
    mb = d.settings.max_batch
    return (kind, b, s, kv_len, _field(hdr, mb, ROWS, b).tolist(), _field(hdr, mb, STARTS, b).tolist(),
            _field(hdr, mb, LENS, b).tolist(), [r for _, r in produced])


def test_a_long_prompt_fills_in_chunks_taking_turns_with_decode() -> None:
    q = RequestQueue()
    d = Driver(q, EngineSettings(max_batch=4, max_seq=64, prefill_tokens=8), torch.device("cpu"))
    short = q.submit(Request(list(range(5)), SamplingParams(max_tokens=50)))
    kind, b, s, kv_len, rows, starts, lens, made = plan_of(d)
    assert (kind, rows, starts, lens, made) == (PREFILL, [0], [0], [5], [short])
    d.done([(0, short)], torch.tensor([7]))
    long = q.submit(Request(list(range(20)), SamplingParams(max_tokens=50)))
    seen = []
    for _ in range(6):
        kind, b, s, kv_len, rows, starts, lens, made = plan_of(d)
        seen.append((kind, rows, starts, lens))
        tokens = torch.tensor([9] * (b if kind == DECODE else len(rows)))
        d.done([(i, r) for i, r in enumerate(made)] if kind == PREFILL else [(0, short)], tokens)
    assert seen == [(DECODE, [0], [5], [1]), (PREFILL, [1], [0], [8]), (DECODE, [0], [6], [1]),
                    (PREFILL, [1], [8], [8]), (DECODE, [0], [7], [1]), (PREFILL, [1], [16], [4])]
    assert long.pending == [9] and not d.filling  # its first token came with the last chunk


def test_decode_covers_rows_up_to_the_last_active_and_a_power_of_two_of_keys() -> None:
    q = RequestQueue()
    d = Driver(q, EngineSettings(max_batch=8, max_seq=1024), torch.device("cpu"))
    reqs = [q.submit(Request([1] * n, SamplingParams(max_tokens=10))) for n in (3, 300, 4)]
    kind, b, s, kv_len, rows, starts, lens, made = plan_of(d)
    assert kind == PREFILL and rows == [0, 1, 2] and s == 300 and made == reqs
    d.done([(i, r) for i, r in enumerate(reqs)], torch.tensor([5, 5, 5]))
    reqs[0].cancel("stop")
    kind, b, s, kv_len, rows, starts, lens, made = plan_of(d)
    assert kind == DECODE and b == 3 and kv_len == 512 and made == [reqs[1], reqs[2]]  # row 0 computes a throwaway


def test_padding_never_reaches_past_the_cache_row() -> None:
    q = RequestQueue()
    d = Driver(q, EngineSettings(max_batch=4, max_seq=64, prefill_tokens=100), torch.device("cpu"))
    a = q.submit(Request([1] * 60, SamplingParams(max_tokens=4)))
    q.submit(Request([2] * 30, SamplingParams(max_tokens=4)))
    d.filling = {}
    d._admit()
    d.filling[0] = (d.filling[0][0], 56)  # row 0 is near the end of its row: 4 positions left
    kind, b, s, kv_len, rows, starts, lens, made = plan_of(d)
    assert kind == PREFILL and all(st + s <= 64 for st in starts), (starts, s)
    assert lens == [4, 8] and made == [a]


def test_a_rows_draw_depends_on_its_seed_and_position_not_on_the_batch() -> None:
    """Device sampling: the same (logits, seed, position) draws the same token alone or among
    other rows; temperature 0 is the argmax; a tiny top_p leaves only the most likely token."""
    logits = torch.randn(4, 320, generator=torch.Generator().manual_seed(0))
    temps = torch.tensor([800_000, 0, 800_000, 800_000])
    seeds, pos = torch.tensor([7, 7, 8, 7]), torch.tensor([30, 30, 30, 31])
    full = torch.full((4,), 1_000_000)
    batch = sample(logits, temps, seeds, pos, full)
    alone = [int(sample(logits[i:i + 1], temps[i:i + 1], seeds[i:i + 1], pos[i:i + 1], full[:1])) for i in range(4)]
    assert batch.tolist() == alone
    assert int(batch[1]) == int(logits[1].argmax())
    draws = {int(sample(logits[:1], temps[:1], torch.tensor([s]), pos[:1], full[:1])) for s in range(40)}
    assert len(draws) > 5  # seeds do change the draw
    narrow = sample(logits, temps, seeds, pos, torch.full((4,), 1))
    assert narrow.tolist() == logits.argmax(-1).tolist()
