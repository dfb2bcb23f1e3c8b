"""Mixtral's sparse mixture of experts: routing, the expert-parallel dispatch, checkpoints and shards.

One process: the routing and the mixture against a per-token loop written the obvious way and
against transformers' ``MixtralSparseMoeBlock``; the dispatch over EP ranks on threads
(``thread_tp``), with each rank's own tokens (DP replicas) and with the same tokens on every
rank (a TP group); ``make_model(arch="moe")`` and an EP rank's shard reading only its experts.
Real rank processes over gloo: ``tests/integration/test_expert_parallel.py``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rallypoint.testing.thread_tp import ThreadComm, run_tp
from rallypoint.worker import shards
from rallypoint.worker.checkpoint import SIZES, WEIGHTS_FILE, arch_config, make_model, tensor_shapes
from rallypoint.worker.model import SparseMoE, route
from rallypoint.worker.model_config import ModelConfig

CONFIG = arch_config(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2), "moe")  # 8 experts, top 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def moe(seed: int = 0) -> SparseMoE:
    """A whole mixture (every expert on one rank) with seeded weights."""
    torch.manual_seed(seed)
    m = SparseMoE(CONFIG)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape) * p.shape[-1] ** -0.5)
    return m.eval()


def naive(m: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Each token on its own: softmax, the k best, renormalize, sum the experts' outputs."""
    out = torch.zeros_like(x)
    for n, row in enumerate(x):
        probs = torch.softmax(m.gate(row).double(), dim=-1).tolist()
        best = sorted(range(len(probs)), key=lambda e: -probs[e])[:m.top_k]
        total = sum(probs[e] for e in best)
        for e in best:
            out[n] += probs[e] / total * m.experts[str(e)](row[None])[0]
    return out


def test_route_is_softmax_top_k_renormalized() -> None:
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    weights, experts = route(logits, 2)
    assert weights.dtype == torch.float32 and experts.shape == (50, 2)
    for n in range(50):
        probs = torch.softmax(logits[n].double(), dim=-1).tolist()
        best = sorted(range(8), key=lambda e: -probs[e])[:2]
        assert experts[n].tolist() == best
        assert weights[n].tolist() == pytest.approx([probs[e] / (probs[best[0]] + probs[best[1]]) for e in best])
    assert torch.allclose(weights.sum(-1), torch.ones(50))
    one, top = route(logits, 1)  # top-1: the expert's whole weight
    assert torch.equal(top[:, 0], logits.argmax(-1)) and torch.equal(one, torch.ones(50, 1))


@torch.no_grad()
def test_mixture_matches_per_token_loop() -> None:
    m = moe()
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(2))
    got = m(x, None)
    assert got.shape == x.shape
    assert torch.allclose(got.view(-1, 16), naive(m, x.view(-1, 16)), atol=1e-6)
    assert torch.equal(m(x[:, :0], None), x[:, :0])  # no tokens, nothing to do


def matches_hf_block(m: SparseMoE, hf: torch.nn.Module, gate: str, up: str, down: str, seed: int) -> bool:
    """Copy ``m``'s router and experts (named ``gate``/``up``/``down``) into transformers' block ``hf``
    (fused ``gate_up_proj``); whether both give the same output on a random batch."""
    hf.gate.weight.copy_(m.gate.weight)
    for e, ex in m.experts.items():
        hf.experts.gate_up_proj[int(e)].copy_(torch.cat([getattr(ex, gate).weight, getattr(ex, up).weight]))
        hf.experts.down_proj[int(e)].copy_(getattr(ex, down).weight)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(seed))
    return torch.allclose(m(x, None), hf(x), atol=1e-6)


@torch.no_grad()
def test_mixture_matches_transformers_block() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    m = moe(3)
    hf_config = transformers.MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=8,
                                           num_experts_per_tok=2)
    assert matches_hf_block(m, MixtralSparseMoeBlock(hf_config).eval(), "w1", "w3", "w2", seed=4)


@torch.no_grad()
@pytest.mark.parametrize("normalize", [False, True])
def test_qwen3_moe_mixture_matches_transformers_block(normalize: bool) -> None:
    """Qwen3-MoE: narrower experts named like a dense MLP, and (``norm_topk_prob`` false) the chosen
    experts' softmax weights used as they are."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = arch_config(replace(CONFIG, model_type="llama", num_experts=0, num_experts_per_tok=0), "qwen3_moe")
    config = replace(config, norm_topk_prob=normalize)
    torch.manual_seed(5)
    m = SparseMoE(config).eval()
    for p in m.parameters():
        p.copy_(torch.randn(p.shape) * p.shape[-1] ** -0.5)
    assert sorted(m.experts["0"].state_dict()) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    hf_config = transformers.Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=config.expert_size, num_experts=8,
                                            num_experts_per_tok=2, norm_topk_prob=normalize)
    assert matches_hf_block(m, Qwen3MoeSparseMoeBlock(hf_config).eval(), "gate_proj", "up_proj", "down_proj", seed=6)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(6))
    weights, _ = route(m.gate(x.view(-1, 16)), 2, normalize)
    assert torch.allclose(weights.sum(-1), torch.ones(18)) == normalize


def shard_of(full: SparseMoE, rank: int, size: int, tp_size: int = 1) -> SparseMoE:
    """EP rank ``rank``'s part of ``full``: the router and its experts, nothing else."""
    part = SparseMoE(CONFIG, tp_rank=rank if tp_size > 1 else 0, tp_size=tp_size, ep_rank=rank, ep_size=size)
    mine = {k: v for k, v in full.state_dict().items() if not k.startswith("experts.") or k.split(".")[1] in part.experts}
    part.load_state_dict(mine, strict=True)
    return part.eval()


@pytest.mark.parametrize("size", [2, 4, 8])
@torch.no_grad()
def test_expert_parallel_ranks_with_their_own_tokens(size: int) -> None:
    """DP replicas in one EP group: each rank brings different tokens (one brings none)."""
    full = moe(5)
    gen = torch.Generator().manual_seed(size)
    xs = [torch.randn(1, 0 if r == 1 else 3 + 2 * r, 16, generator=gen) for r in range(size)]

    def rank(r: int, comm: ThreadComm) -> torch.Tensor:
        part = shard_of(full, r, size)
        assert list(part.experts) == [str(e) for e in range(r * 8 // size, (r + 1) * 8 // size)]
        return part(xs[r], comm)

    for r, got in enumerate(run_tp(size, rank)):
        assert torch.allclose(got, full(xs[r], None), atol=1e-6), r


@pytest.mark.parametrize("size", [2, 4])
@torch.no_grad()
def test_expert_parallel_over_a_tp_group(size: int) -> None:
    """EP = TP (a serving replica): every rank holds the same tokens, routes its share of them,
    and all end with the whole result; fewer tokens than ranks leaves some with none to route."""
    full = moe(6)
    for tokens in (1, 5, 13):
        x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(tokens))
        outs = run_tp(size, lambda r, comm: shard_of(full, r, size, tp_size=size)(x, comm))
        want = full(x, None)
        assert all(torch.allclose(o, want, atol=1e-6) for o in outs), tokens


# -- checkpoints and shards ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("moe"), "tiny", seed=1, arch="moe")


def test_make_model_moe_writes_mixtral_layout(tiny_moe: Path) -> None:
    config = ModelConfig.from_dir(tiny_moe)
    assert config == arch_config(SIZES["tiny"], "mixtral") and (config.num_experts, config.num_experts_per_tok) == (8, 2)
    d = json.loads((tiny_moe / "config.json").read_text())
    assert d["architectures"] == ["MixtralForCausalLM"] and d["num_local_experts"] == 8
    tensors = load_file(str(tiny_moe / WEIGHTS_FILE))
    shapes = tensor_shapes(config)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    assert shapes["model.layers.3.block_sparse_moe.gate.weight"] == (8, 64)
    assert shapes["model.layers.3.block_sparse_moe.experts.7.w2.weight"] == (64, 192)
    assert not any(".mlp." in k for k in shapes)
    assert config.num_params() == sum(v.numel() for v in tensors.values())


def test_ep_rank_reads_only_its_experts(tiny_moe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    real = shards.CheckpointReader.read

    def spy(self, name, *args, **kw):
        read.append(name)
        return real(self, name, *args, **kw)

    monkeypatch.setattr(shards.CheckpointReader, "read", spy)
    full = load_file(str(tiny_moe / WEIGHTS_FILE))
    stage = shards.load_stage(tiny_moe, ep_rank=2, ep_size=4)
    experts = {int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n}
    assert experts == {4, 5}
    assert sum(".gate.weight" in n for n in read) == 4  # each layer's router, replicated
    assert torch.equal(stage.get_parameter("layers.1.block_sparse_moe.experts.5.w3.weight"),
                       full["model.layers.1.block_sparse_moe.experts.5.w3.weight"])
    with pytest.raises(Exception, match="num_local_experts=8 is not divisible by ep=3"):
        shards.load_stage(tiny_moe, ep_rank=0, ep_size=3)


def test_rallyctl_make_model_arch_moe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rallypoint.cli.main import main as rallyctl

    assert rallyctl(["--json", "make-model", str(tmp_path / "m"), "--arch", "moe", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arch"] == "moe"
    assert ModelConfig.from_dir(tmp_path / "m").model_type == "mixtral"


def test_rallyctl_make_model_takes_every_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rallypoint.cli.main import MAKE_MODEL_ARCHS
    from rallypoint.cli.main import main as rallyctl
    from rallypoint.worker.checkpoint import ARCHS

    assert sorted(MAKE_MODEL_ARCHS) == sorted(ARCHS)  # the CLI's copy of the list is whole
    assert rallyctl(["--json", "make-model", str(tmp_path / "q"), "--arch", "qwen3_moe", "--seed", "3"]) == 0
    assert ModelConfig.from_dir(tmp_path / "q").model_type == "qwen3_moe"
