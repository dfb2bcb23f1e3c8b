"""Checkpoints, shard loading, the decoder and sampling, in one process (no communication)."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rallypoint.errors import CheckpointError
from rallypoint.worker.checkpoint import (
    INDEX_FILE,
    SIZES,
    WEIGHTS_FILE,
    arch_config,
    main,
    make_model,
    shard_plan,
    tensor_shapes,
)
from rallypoint.worker.model import StageModel, split_dim
from rallypoint.worker.model_config import ModelConfig
from rallypoint.worker.sampling import generate, sample
from rallypoint.worker.shards import load_stage

PROMPT = torch.tensor([[1, 72, 101, 108, 108, 111, 33], [256, 119, 111, 114, 108, 100, 10]])  # [2, 7]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture
def broken(tiny: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint to damage."""
    return Path(shutil.copytree(tiny, tmp_path / "ckpt"))


def full_reference(ckpt: Path) -> StageModel:
    """The whole model, built from every tensor of the file read at once (no slicing)."""
    config = ModelConfig.from_dir(ckpt)
    model = StageModel(config)
    state = {k.removeprefix("model."): v for k, v in load_file(str(ckpt / WEIGHTS_FILE)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- config ----------------------------------------------------------------------------------

def test_config_round_trip_and_sizes(tiny: Path) -> None:
    c = ModelConfig.from_dir(tiny)
    assert c == SIZES["tiny"] and c.head_dim == 8 and c.source.endswith("config.json")
    d = json.loads((tiny / "config.json").read_text())
    assert d["architectures"] == ["LlamaForCausalLM"] and d["model_type"] == "llama"
    assert 0.95e9 < SIZES["1b"].num_params() < 1.05e9 and SIZES["1b"].torch_dtype == "bfloat16"
    SIZES["1b"].check_parallel(8, 16)
    plan = shard_plan(tensor_shapes(SIZES["1b"]), 2, 1 << 30)
    assert len(plan) == 2 and sum(map(len, plan)) == len(tensor_shapes(SIZES["1b"]))


# -- loading ---------------------------------------------------------------------------------

def test_load_tp1_matches_full_weight_reference(tiny: Path) -> None:
    ref, got = full_reference(tiny), load_stage(tiny)
    assert all(p.device.type == "cpu" for p in got.parameters())
    pos = torch.arange(PROMPT.shape[1])
    with torch.no_grad():
        assert torch.equal(got(PROMPT, pos), ref(PROMPT, pos))


def test_tp_shards_are_the_right_slices(tiny: Path) -> None:
    full = load_file(str(tiny / WEIGHTS_FILE))
    parts = [load_stage(tiny, tp_rank=r, tp_size=2, layers=range(1, 3), first=r == 0) for r in range(2)]
    cat = lambda name, dim: torch.cat([p.get_parameter(name) for p in parts], dim)  # noqa: E731
    assert torch.equal(cat("layers.2.self_attn.k_proj.weight", 0), full["model.layers.2.self_attn.k_proj.weight"])
    assert torch.equal(cat("layers.1.mlp.down_proj.weight", 1), full["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(cat("lm_head.weight", 0), full["lm_head.weight"])
    assert torch.equal(parts[0].embed_tokens.weight, full["model.embed_tokens.weight"])
    assert not hasattr(parts[1], "embed_tokens") and sorted(parts[1].layers) == ["1", "2"]


def test_tensor_shapes_list_each_family_s_tensors() -> None:
    llama, qwen2, qwen3 = (tensor_shapes(arch_config(SIZES["tiny"], a)) for a in ("llama", "qwen2", "qwen3"))
    p = "model.layers.3.self_attn."
    assert not any(n.endswith(".bias") or "q_norm" in n for n in llama) and "lm_head.weight" in llama
    assert (qwen2[p + "q_proj.bias"], qwen2[p + "k_proj.bias"], qwen2[p + "v_proj.bias"]) == ((64,), (32,), (32,))
    assert p + "o_proj.bias" not in qwen2 and p + "q_norm.weight" not in qwen2
    assert (qwen3[p + "q_norm.weight"], qwen3[p + "k_norm.weight"]) == ((8,), (8,)) and "lm_head.weight" not in qwen3


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_tp_shards_split_biases_and_replicate_qk_norms(arch: str, tmp_path: Path) -> None:
    ckpt = make_model(tmp_path / arch, "tiny", seed=2, arch=arch)
    full = load_file(str(ckpt / WEIGHTS_FILE))
    parts = [load_stage(ckpt, tp_rank=r, tp_size=2) for r in range(2)]
    names = {n for n, _ in parts[0].named_parameters()}
    assert {f"model.{n}" for n in names if n != "lm_head.weight"} <= set(full)
    for name in names:
        got = [p.get_parameter(name) for p in parts]
        dim = split_dim(name)
        want = full["model.embed_tokens.weight" if name == "lm_head.weight" and arch == "qwen3" else
                    name if name == "lm_head.weight" else f"model.{name}"]
        assert torch.equal(want, got[0] if dim is None else torch.cat(got, dim)), name
        if dim is None:
            assert torch.equal(got[0], got[1]), name
    assert any(n.endswith("q_proj.bias") for n in names) == (arch == "qwen2")
    assert any(n.endswith("k_norm.weight") for n in names) == (arch == "qwen3")
    assert parts[0].layers["0"].self_attn.window == (32 if arch == "mistral" else None)


def test_loads_in_checkpoint_dtype_then_casts(tiny: Path) -> None:
    m = load_stage(tiny, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert m(PROMPT, torch.arange(7)).dtype == torch.float32


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    # a mid-size model through the sharded path (what "1b" uses), with a small shard threshold
    mid = replace(SIZES["small"], num_hidden_layers=2)
    one = make_model(tmp_path / "one", mid, seed=3)
    many = make_model(tmp_path / "many", mid, seed=3, max_shard_bytes=2_000_000)
    index = json.loads((many / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (many / WEIGHTS_FILE).exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in load_file(str(one / WEIGHTS_FILE)).values())
    half = load_stage(many, tp_rank=1, tp_size=2, layers=range(1, 2), first=False, last=False)
    up = load_file(str(one / WEIGHTS_FILE))["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(half.get_parameter("layers.1.mlp.up_proj.weight"), up[up.shape[0] // 2:])
    a, b = load_stage(one), load_stage(many)
    with torch.no_grad():
        assert torch.equal(a(PROMPT, torch.arange(7)), b(PROMPT, torch.arange(7)))


# -- damaged checkpoints ---------------------------------------------------------------------

def _rewrite(ckpt: Path, edit) -> None:
    tensors = load_file(str(ckpt / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(ckpt / WEIGHTS_FILE), metadata={"format": "pt"})


def _expect(ckpt: Path, tensor: str, file: str, why: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_stage(ckpt)
    msg = str(info.value)
    assert tensor in msg and file in msg and why in msg, msg


def test_missing_file(tmp_path: Path, broken: Path) -> None:
    sharded = make_model(tmp_path / "sharded", "tiny", seed=0, max_shard_bytes=200_000)
    weight_map = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    victim = weight_map["model.layers.2.mlp.up_proj.weight"]
    (sharded / victim).unlink()
    with pytest.raises(CheckpointError, match=r"tensor '([^']+)': file (\S+) is missing") as info:
        load_stage(sharded)
    name, file = re.search(r"tensor '([^']+)': file (\S+) is", str(info.value)).groups()
    assert weight_map[name] == victim and file == str(sharded / victim)
    (broken / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{broken}: no weights: neither {WEIGHTS_FILE}"):
        load_stage(broken)


def test_truncated_file(broken: Path) -> None:
    f = broken / WEIGHTS_FILE
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 1000)
    _expect(broken, "model.embed_tokens.weight", str(f), "truncated or corrupt")


def test_wrong_shape(broken: Path) -> None:
    name = "model.layers.1.self_attn.v_proj.weight"
    _rewrite(broken, lambda t: t.__setitem__(name, t[name][:16].clone()))
    _expect(broken, name, str(broken / WEIGHTS_FILE), "has shape [16, 64], config.json implies [32, 64]")


def test_missing_tensor(broken: Path) -> None:
    name = "model.layers.3.post_attention_layernorm.weight"
    _rewrite(broken, lambda t: t.pop(name))
    _expect(broken, name, str(broken / WEIGHTS_FILE), "is missing")


def test_wrong_dtype(broken: Path) -> None:
    name = "model.norm.weight"
    _rewrite(broken, lambda t: t.__setitem__(name, torch.ones(64, dtype=torch.int32)))
    _expect(broken, name, str(broken / WEIGHTS_FILE), "has dtype I32, expected a float type")


# -- decoding --------------------------------------------------------------------------------

def test_greedy_generation_is_deterministic(tiny: Path) -> None:
    runs = [generate(load_stage(tiny), PROMPT, steps=8)[0] for _ in range(2)]
    assert runs[0].shape == (2, 8) and torch.equal(runs[0], runs[1])
    seeded = [sample(torch.randn(2, 320, generator=torch.Generator().manual_seed(5)), 0.8,
                     torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert sample(logits, 0).tolist() == [1, 0] and sample(logits, 1.0, top_k=1).tolist() == [1, 0]


def test_kv_cache_decode_matches_full_forward(tiny: Path) -> None:
    model = load_stage(tiny)
    tokens, step_logits = generate(model, PROMPT, steps=6)
    model.drop_cache()
    seq = torch.cat([PROMPT, tokens[:, :-1]], dim=1)                              # [2, 12]
    with torch.no_grad():
        full = model(seq, torch.arange(seq.shape[1]))                            # [2, 12, V]
    cached = torch.cat(step_logits, dim=1)                                       # [2, 12, V]
    assert cached.shape == full.shape and rel_err(cached, full) < 1e-5
    assert torch.equal(full[:, 6:].argmax(-1), tokens)


def test_cli_writes_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "m"), "--size", "tiny", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert ModelConfig.from_dir(tmp_path / "m") == SIZES["tiny"]
    assert (tmp_path / "m" / WEIGHTS_FILE).exists() and (tmp_path / "m" / "tokenizer_config.json").exists()
    assert main([str(tmp_path / "q"), "--arch", "qwen3"]) == 0
    assert ModelConfig.from_dir(tmp_path / "q") == arch_config(SIZES["tiny"], "qwen3")
    from rallypoint.cli.main import main as rallyctl

    assert rallyctl(["--json", "make-model", str(tmp_path / "s"), "--arch", "mistral", "--seed", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arch"] == "mistral"
    assert ModelConfig.from_dir(tmp_path / "s").sliding_window == 32


def test_per_row_positions_and_cache_rows(tiny: Path) -> None:
    """Continuous batching: two requests of different lengths in rows 2 and 0 of one cache."""
    model = load_stage(tiny)
    a, b = PROMPT[:1], PROMPT[1:, :4]                                             # [1, 7], [1, 4]
    alone = [generate(model, p, steps=4)[1] for p in (a, b)]                     # per request, own cache
    model.setup_cache(3, 16)
    with torch.no_grad():
        la = model(a, torch.arange(7)[None], rows=torch.tensor([2]))             # prefill into row 2
        lb = model(b, torch.arange(4)[None], rows=torch.tensor([0]))             # prefill into row 0
        assert rel_err(la, alone[0][0]) < 1e-6 and rel_err(lb, alone[1][0]) < 1e-6
        x = torch.cat([la[:, -1:].argmax(-1), lb[:, -1:].argmax(-1)])            # [2, 1]
        for step in range(1, 4):
            pos = torch.tensor([[6 + step], [3 + step]])                         # [2, 1] per row
            lg = model(x, pos, rows=torch.tensor([2, 0]))                        # [2, 1, V]
            assert rel_err(lg[0], alone[0][step][0]) < 1e-5 and rel_err(lg[1], alone[1][step][0]) < 1e-5
            x = lg.argmax(-1)
