"""Tiny random transformers models of every family we serve, saved as checkpoints with a real tokenizer.

The parity tests (``tests/integration/test_hf_parity.py`` on the CPU, ``tests/gpu/
test_transformers_parity.py`` on a GPU) build the same matrix: each ``Case`` is one family with the
features that change the math (rope scaling, tied embeddings, biases, q/k norms, sliding windows,
Mixtral's sparse mixture of experts), made by transformers itself
(``AutoModelForCausalLM.from_config``, then ``save_pretrained``), so what we read is what
transformers writes. ``old_spelling`` rewrites ``config.json`` the way
transformers 4 wrote it (top-level ``rope_theta`` and ``rope_scaling``, ``torch_dtype``).

Weights are redrawn after init so the logits have clear winners (transformers' own init, std
0.02, gives near-ties that make greedy comparisons a coin toss): embedding N(0, 1), projections
N(0, 1/in_features) (a router's too, so routing is decided, and the experts' stacked
``[experts, out, in]`` tensors), biases N(0, 1/16), norm scales 1 + N(0, 0.2^2) (so a norm read
from the wrong tensor shows). transformers keeps a Mixtral's experts stacked in memory and writes
them one tensor per expert (``block_sparse_moe.experts.{i}.w1``), the layout of the published
checkpoints.

The tokenizer is a byte-level BPE trained on a few sentences, with Llama 3's special tokens and
post-processor (BOS before every text) and a Llama-3-style chat template, saved through
``PreTrainedTokenizerFast.save_pretrained``. Needs ``transformers`` (a dev dependency).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
BOS_ID, EOS_ID, EOT_ID = 0, 1, 2
SHAPE: dict[str, Any] = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             rms_norm_eps=1e-5, bos_token_id=BOS_ID, eos_token_id=[EOS_ID, EOT_ID])
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "Hello, world: naïve café, 日本語, emoji ✓ and <tags> & \"quotes\".",
    "How vexingly quick daft zebras jump; the five boxing wizards jump quickly.",
]
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set date = strftime_now('%d %b %Y') %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'system' %}{{- 'Today Date: ' + date + '\\n' }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] | trim }}{% endgeneration %}"
    "{%- else %}{{- message['content'] | trim }}{%- endif %}"
    "{%- if message.get('metadata') %}{{- ' ' + message['metadata'] | tojson }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "  Be terse. "}, {"role": "user", "content": "naïve <b>café</b> & co"},
     {"role": "assistant", "content": "Sure.", "metadata": {"note": "é<&>", "n": 1}},
     {"role": "user", "content": "Again?", "name": None}],
]


@dataclass(frozen=True)
class Case:
    """One family with the features to compare (``config``: transformers config keywords)."""

    name: str
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    old_spelling: bool = False


CASES: tuple[Case, ...] = (
    Case("llama3-rope-tied", "llama", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    Case("llama-old-spelling-linear-bias", "llama", dict(attention_bias=True, rope_parameters=dict(
        rope_type="linear", rope_theta=20000.0, factor=2.0)), old_spelling=True),
    Case("mistral-sliding-window", "mistral", dict(sliding_window=6)),
    Case("qwen2-bias", "qwen2"),
    Case("qwen2-sliding-layers", "qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    Case("qwen3-qk-norm-tied", "qwen3", dict(head_dim=32, tie_word_embeddings=True)),
    Case("mixtral-moe", "mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    # Qwen3-MoE: narrow experts, weights not renormalized, a dense first layer (as mlp_only_layers)
    Case("qwen3-moe-dense-first", "qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                    norm_topk_prob=False, mlp_only_layers=[0])),
    # and every other layer sparse (decoder_sparse_step), the chosen experts' weights renormalized
    Case("qwen3-moe-sparse-step", "qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                    norm_topk_prob=True, decoder_sparse_step=2)),
)


def build_model(case: Case, seed: int = 0) -> PreTrainedModel:
    """The case's transformers model, float32, eval, with seeded weights (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(case.model_type, **{**SHAPE, **case.config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied LM head is the embedding, listed once
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.25 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)  # [out, in], or [experts, out, in]
    return model


def save_checkpoint(case: Case, path: str | Path, seed: int = 0) -> PreTrainedModel:
    """Build the case's model, ``save_pretrained`` it and the tokenizer into ``path``; return the model."""
    path = Path(path)
    model = build_model(case, seed)
    model.save_pretrained(path)
    save_tokenizer(path)
    if case.old_spelling:
        write_old_spelling(path / "config.json")
    return model


def write_old_spelling(file: Path) -> None:
    """Rewrite a transformers 5 ``config.json`` as transformers 4 wrote it."""
    d = json.loads(file.read_text())
    rope = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    d["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    d["torch_dtype"] = d.pop("dtype")
    file.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def build_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast``: byte-level BPE, Llama 3 specials and post-processor, our chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[BOS, EOS, EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS, trainer)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, BOS_ID)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOT,
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def save_tokenizer(path: str | Path) -> None:
    build_tokenizer().save_pretrained(str(path))
