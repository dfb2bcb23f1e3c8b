"""Our decoder and tokenizer vs transformers, on tiny random models of every family we serve (CPU, float32).

Each case of ``rallypoint.testing.hf_models.CASES`` (Llama with llama3 rope scaling and tied
embeddings in transformers 5's spelling; Llama with linear scaling, attention biases and the old
``rope_theta``/``rope_scaling`` spelling; Mistral with a sliding window shorter than the prompts;
Qwen2 with q/k/v biases, and with sliding layers from ``max_window_layers`` on; Qwen3 with q/k
norms and tied embeddings; Mixtral with 4 experts, 2 per token) is built and saved by
transformers, then read by ``load_stage``:

* the prefill logits of every prompt match transformers' (max relative error < 1e-4);
* greedy decoding with our KV cache (``sampling.generate``) gives exactly the tokens of
  ``generate(do_sample=False)`` (EOS cleared, so neither side stops early), with TP=1 and with TP=2
  (two ranks on threads: sliced biases, replicated q/k norms, all-reduced partial sums; Mixtral's
  experts split over the two, EP=2, tokens dispatched by all-to-all);
* text is tokenized as ``AutoTokenizer`` does (BOS from the post-processor), decoded the same,
  and chats render as ``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``.

Our own ``make_model`` checkpoints of each arch load in transformers and decode the same too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rallypoint.testing.hf_models import CASES, CHATS, EOS_ID, EOT_ID, TEXTS, Case, save_checkpoint
from rallypoint.testing.thread_tp import run_tp
from rallypoint.worker.checkpoint import make_model
from rallypoint.worker.model_config import FAMILIES, ModelConfig
from rallypoint.worker.sampling import generate
from rallypoint.worker.shards import load_stage
from rallypoint.worker.tokenizer import Tokenizer, load_tokenizer

NEW = 16
LOGITS_REL = 1e-4


@dataclass
class Built:
    case: Case
    path: Path
    hf: torch.nn.Module
    ours: torch.nn.Module
    tok: Tokenizer
    hf_tok: object


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: torch's intra-op threads cost more than they save (4x on 2 cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    case: Case = request.param
    path = tmp_path_factory.mktemp(case.name)
    hf = save_checkpoint(case, path, seed=0)
    hf.generation_config.eos_token_id = None  # plain argmax, no early stop, no EOS masking
    hf.generation_config.pad_token_id = 0
    yield Built(case, path, hf, load_stage(path, dtype=torch.float32), load_tokenizer(path),
                AutoTokenizer.from_pretrained(path))


def prompt_ids(b: Built) -> list[list[int]]:
    """Four prompts of 18 to 51 tokens (longer than every sliding window)."""
    return [b.tok.encode(t) for t in TEXTS]


def hf_greedy(hf: torch.nn.Module, ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return out[0, len(ids):].tolist()


def test_config_is_read_as_transformers_reads_it(built: Built) -> None:
    c, hf = ModelConfig.from_dir(built.path), built.hf.config
    assert c.model_type == built.case.model_type
    assert c.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert c.tie_word_embeddings == hf.tie_word_embeddings
    assert c.rope.to_hf() == {k: v for k, v in hf.rope_parameters.items() if k != "partial_rotary_factor"}
    assert c.qkv_bias == (built.case.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)))
    assert c.qk_norm == (built.case.model_type in ("qwen3", "qwen3_moe"))
    assert (c.num_experts, c.num_experts_per_tok) == (getattr(hf, "num_local_experts", 0),
                                                      getattr(hf, "num_experts_per_tok", 0))
    if built.case.model_type == "qwen3_moe":
        assert (c.expert_size, c.norm_topk_prob) == (hf.moe_intermediate_size, hf.norm_topk_prob)
        assert [c.is_sparse(i) for i in range(c.num_hidden_layers)] == [
            i not in hf.mlp_only_layers and (i + 1) % hf.decoder_sparse_step == 0 for i in range(hf.num_hidden_layers)]
    layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    assert [c.window(i) for i in range(c.num_hidden_layers)] == [
        hf.sliding_window if t == "sliding_attention" or built.case.model_type in ("mistral", "mixtral") else None
        for t in layer_types]
    if built.case.old_spelling:  # transformers reads the rewritten file back to the same parameters
        read = AutoConfig.from_pretrained(built.path).rope_parameters
        assert {k: v for k, v in read.items() if k != "type"} == hf.rope_parameters
        assert "rope_parameters" not in (built.path / "config.json").read_text()


@torch.inference_mode()
def test_prefill_logits_match(built: Built) -> None:
    built.ours.drop_cache()
    for ids in prompt_ids(built):
        x = torch.tensor([ids])
        mine = built.ours(x, torch.arange(len(ids)))
        ref = built.hf(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
        rel = float((mine - ref).abs().max() / ref.abs().max())
        assert rel < LOGITS_REL, f"{built.case.name}: relative error {rel:.2e} on {len(ids)} tokens"


def test_greedy_tokens_match_generate(built: Built) -> None:
    for ids in prompt_ids(built):
        mine, _ = generate(built.ours, torch.tensor([ids]), NEW)
        assert mine[0].tolist() == hf_greedy(built.hf, ids), f"{built.case.name}: prompt of {len(ids)} tokens"


def test_tp2_greedy_tokens_match_generate(built: Built) -> None:
    prompts = prompt_ids(built)[-2:]

    def rank(r: int, comm) -> list[list[int]]:
        stage = load_stage(built.path, tp_rank=r, tp_size=2, dtype=torch.float32, comm=comm)
        return [generate(stage, torch.tensor([ids]), NEW)[0][0].tolist() for ids in prompts]

    tokens = run_tp(2, rank)
    expected = [hf_greedy(built.hf, ids) for ids in prompts]
    assert tokens[0] == tokens[1] == expected


def test_text_and_chat_like_autotokenizer(built: Built) -> None:
    tok, hf_tok = built.tok, built.hf_tok
    assert tok.eos_ids == {EOS_ID, EOT_ID} and tok.bos_id == hf_tok.bos_token_id
    for text in [*TEXTS, "", "<|begin_of_text|>already special<|eot_id|>"]:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"]
        assert tok.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.encode(TEXTS[0])[0] == hf_tok.bos_token_id
    for chat in CHATS:
        text = tok.apply_chat_template(chat)
        assert text == hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(chat, add_generation_prompt=False) == hf_tok.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=False)
        assert tok.encode_chat(chat) == hf_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True,
                                                                   return_dict=False)


@pytest.mark.parametrize("arch", FAMILIES)
def test_make_model_checkpoints_decode_like_transformers(arch: str, tmp_path: Path) -> None:
    path = make_model(tmp_path / arch, "tiny", seed=4, arch=arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    tok, hf_tok = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    text = TEXTS[3] * 2  # longer than mistral's window (32)
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"] and ids[0] == 256
    mine, _ = generate(load_stage(path, dtype=torch.float32), torch.tensor([ids]), NEW)
    assert mine[0].tolist() == hf_greedy(hf, ids)
    chat = CHATS[0]
    assert tok.apply_chat_template(chat) == hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
