"""Decode through ``torch.compile``d layers (``StageModel.compile_decode``), on the CPU.

The GPU path compiles with inductor and replays the result as CUDA graphs; what can break it is
checked here without a GPU or a C compiler (the ``aot_eager`` backend traces exactly as inductor
does, it only skips the code generation):

* the compiled decode forward gives the eager forward's logits, for Llama and for Qwen3 (q/k norms);
* ``DecodeGraphs.warm`` compiles every shape the engine can make, so no request's step ever waits
  for a compilation (a recompile at serving time would stall every stream for seconds); batches
  over ``COMPILE_MAX_ROWS`` run the eager layers and never compile.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.graphs import COMPILE_MAX_ROWS, DecodeGraphs, batch_buckets, kv_buckets
from rallypoint.worker.model_config import ModelConfig
from rallypoint.worker.shards import load_stage

MAX_BATCH, MAX_SEQ = 40, 512  # buckets 1, 2, 4, 8, 16 (compiled), 32, 40 (eager); KV 256, 512


def _model(path: Path) -> torch.nn.Module:
    config = ModelConfig.from_dir(path)
    model = load_stage(path, config, 0, 1, range(config.num_hidden_layers), device=torch.device("cpu"),
                       dtype=torch.float32)
    model.setup_cache(MAX_BATCH, MAX_SEQ)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@torch.no_grad()
def test_compiled_decode_matches_eager(tmp_path: Path, arch: str) -> None:
    make_model(tmp_path, "tiny", seed=3, arch=arch)
    eager, compiled = _model(tmp_path), _model(tmp_path).compile_decode(backend="aot_eager")
    prompt = torch.randint(0, 200, (5, 12), generator=torch.Generator().manual_seed(0))
    for m in (eager, compiled):  # prefill (eager on both) fills rows 0..4
        m(prompt, torch.arange(12))
    tokens = prompt[:, -1:]
    for step in range(6):
        pos = torch.full((5, 1), 12 + step)
        want = eager(tokens, pos, None, 256)
        got = compiled(tokens, pos, None, 256)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        tokens = want.argmax(-1)
    assert compiled._compiled is not None and eager._compiled is None


@torch.no_grad()
def test_warm_compiles_every_shape_the_engine_makes(tmp_path: Path) -> None:
    make_model(tmp_path, "tiny", seed=4)
    model = _model(tmp_path)
    graphs = DecodeGraphs(model, MAX_BATCH, MAX_SEQ, torch.device("cpu"))
    model.compile_decode(max_rows=COMPILE_MAX_ROWS, backend="aot_eager")
    before = counters["stats"]["unique_graphs"]
    graphs.warm()
    after_warm = counters["stats"]["unique_graphs"]
    assert 0 < after_warm - before <= 16  # it compiled, a few shapes apart
    for b in reversed(batch_buckets(MAX_BATCH)):
        for kv_len in reversed(kv_buckets(MAX_SEQ)):  # another order than warm's
            graphs.pos.fill_(7)
            model(graphs.x[:b], graphs.pos[:b], None, kv_len)  # as DecodeGraphs.capture calls it
    assert counters["stats"]["unique_graphs"] == after_warm, "a decode shape compiled after warm()"
