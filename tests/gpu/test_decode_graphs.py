"""CUDA-graph decode (``worker.graphs.DecodeGraphs``), plain and through ``torch.compile``d layers,
against the eager forward on a CUDA GPU (skipped without one): float32 greedy tokens identical
over 24 steps at several batch sizes, logits within 1e-4 relative, and no compilation after
``warm`` (a request's step never waits for one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.model_config import ModelConfig
from rallypoint.worker.shards import load_stage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_BATCH, MAX_SEQ, PROMPT, STEPS = 16, 512, 20, 24


def _model(path: Path) -> torch.nn.Module:
    config = ModelConfig.from_dir(path)
    model = load_stage(path, config, 0, 1, range(config.num_hidden_layers), device=torch.device("cuda"),
                       dtype=torch.float32)
    model.setup_cache(MAX_BATCH, MAX_SEQ)
    return model


@pytest.mark.parametrize("compiled", [False, True], ids=["graphs", "graphs+compile"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@torch.no_grad()
def test_graph_decode_matches_eager(tmp_path: Path, arch: str, compiled: bool) -> None:
    from rallypoint.worker.graphs import DecodeGraphs

    make_model(tmp_path, "small", seed=5, arch=arch)
    eager, fast = _model(tmp_path), _model(tmp_path)
    graphs = DecodeGraphs(fast, MAX_BATCH, MAX_SEQ, torch.device("cuda"), compile=compiled)
    compiles = counters["stats"]["unique_graphs"]
    for b in (1, 3, 16):
        prompt = torch.randint(0, 250, (b, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(b))
        for m in (eager, fast):
            m.reset_cache()
            m(prompt, torch.arange(PROMPT, device="cuda"))
        want_tok = got_tok = prompt[:, -1:]
        for step in range(STEPS):
            pos = torch.full((b, 1), PROMPT + step, device="cuda")
            want = eager(want_tok, pos, None, 256)
            got = graphs(got_tok, pos, 256)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
            want_tok, got_tok = want.argmax(-1), got.argmax(-1)
            assert torch.equal(want_tok, got_tok), f"B={b} step {step}: greedy tokens differ"
    assert counters["stats"]["unique_graphs"] == compiles, "a step compiled after warm()"
    assert len(graphs.graphs) == 3
