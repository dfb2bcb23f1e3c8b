"""Seeded random checkpoints in Hugging Face format (Llama, Mistral, Qwen2, Qwen3, Mixtral) and their byte-level
tokenizer.

``make_model(dir, size, seed, arch)`` writes ``config.json`` and ``generation_config.json`` with
the keys transformers writes for that family, the tokenizer files (``tokenizer.json``,
``tokenizer_config.json`` with a chat template) and the weights, named exactly as HF's
``<Family>ForCausalLM``: one ``model.safetensors``, or above ``max_shard_bytes``
``model-0000i-of-0000n.safetensors`` files plus ``model.safetensors.index.json``. Same size, arch
and seed, same bytes; ``AutoModelForCausalLM`` and ``AutoTokenizer`` load the result.

Weights are drawn so activations stay O(1) and greedy decoding has clear winners: embedding
N(0, 1), every projection N(0, 1/in_features) (the LM head and a mixture of experts' router too,
so logits are O(1) and routing is decided), biases N(0, 1/16), norms ones.

``arch="moe"`` is ``"mixtral"``: Mixtral's layout, 8 experts per layer of the size's MLP width,
2 per token, so a tiny one spreads over up to 8 EP ranks.

The tokenizer is byte-level: ids 0..255 are the bytes of the UTF-8 text, ``<s>`` (256) and
``</s>`` (257) are special, and its post-processor puts ``<s>`` before every text, as Llama's does.

Command line: ``python -m rallypoint.worker.checkpoint DIR --size tiny --arch llama --seed 0`` (or
``rallyctl make-model``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors

from rallypoint.errors import CheckpointError
from rallypoint.worker.model_config import CONFIG_FILE, FAMILIES, HF_VERSION, MOE_FAMILIES, ModelConfig, Rope
from rallypoint.worker.tokenizer import CHAT_TEMPLATE_FILE, GENERATION_CONFIG, TOKENIZER_CONFIG, TOKENIZER_FILE

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB: "1b" (2 GB in bf16) is written as 2 shards
BOS_ID, EOS_ID, VOCAB = 256, 257, 320  # bytes 0..255, two specials, padded to a multiple of 64
BOS, EOS = "<s>", "</s>"
ARCH_ALIASES = {"moe": "mixtral"}
ARCHS = (*FAMILIES, *ARCH_ALIASES)  # what make_model's arch takes
MOE_EXPERTS, MOE_TOP_K = 8, 2        # Mixtral 8x7B's
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                 "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

_COMMON: dict[str, Any] = dict(vocab_size=VOCAB, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,), rms_norm_eps=1e-5)
SIZES: dict[str, ModelConfig] = {
    # ~0.24 M params, 1 MB in float32; TP up to 4 (8 heads, 4 KV heads), PP up to 4.
    "tiny": ModelConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, max_position_embeddings=512, torch_dtype="float32", **_COMMON),
    # ~6.5 M params, 26 MB in float32; TP up to 4, PP up to 8.
    "small": ModelConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=2048, torch_dtype="float32", **_COMMON),
    # ~0.97 B params, 1.95 GB in bfloat16 (Llama 3.2 1B's body); TP up to 8, PP up to 16.
    "1b": ModelConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=8192, rope=Rope(theta=500000.0),
                      torch_dtype="bfloat16", **_COMMON),
}


def arch_config(config: ModelConfig, arch: str) -> ModelConfig:
    """``config``'s shape as family ``arch``, with what that family's checkpoints have.

    Mistral: a sliding window of 1/16 of the context; Qwen2: q/k/v biases; Qwen3: q/k norms and
    tied embeddings (as Qwen3's small models); Mixtral (``moe``): ``MOE_EXPERTS`` experts per layer,
    each as wide as the dense MLP, ``MOE_TOP_K`` per token, full attention (as Mixtral 8x7B).
    """
    arch = ARCH_ALIASES.get(arch, arch)
    if arch not in FAMILIES:
        raise CheckpointError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    window = max(8, config.max_position_embeddings // 16) if arch == "mistral" else None
    tied = True if arch == "qwen3" else config.tie_word_embeddings
    moe = arch in MOE_FAMILIES
    qwen_moe = arch == "qwen3_moe"  # experts a quarter of the dense width, weights not renormalized, as Qwen3-30B-A3B
    return replace(config, model_type=arch, qkv_bias=arch == "qwen2", o_bias=False,
                   qk_norm=arch in ("qwen3", "qwen3_moe"), sliding_window=window, layer_types=None,
                   tie_word_embeddings=tied, num_experts=MOE_EXPERTS if moe else 0,
                   num_experts_per_tok=MOE_TOP_K if moe else 0,
                   moe_intermediate_size=config.intermediate_size // 4 if qwen_moe else 0,
                   norm_topk_prob=not qwen_moe, dense_layers=())


# -- tokenizer -------------------------------------------------------------------------------

def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte (what the ByteLevel pre-tokenizer maps bytes to)."""
    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}  # "!".."~", "¡".."¬", "®".."ÿ"
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def byte_level_backend() -> Backend:
    """The ``tokenizers`` pipeline: byte ``b`` is id ``b``, ``<s>`` is prepended to every text."""
    backend = Backend(models.BPE(vocab={c: b for b, c in enumerate(_byte_chars())}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS, EOS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    return backend


def write_tokenizer(path: Path, config: ModelConfig) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template) into ``path``."""
    (path / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)  # it would take precedence over ours
    byte_level_backend().save(str(path / TOKENIZER_FILE))
    cfg = {"bos_token": BOS, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
           "eos_token": EOS, "model_max_length": config.max_position_embeddings,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    (path / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


# -- weights ---------------------------------------------------------------------------------

def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of ``config``'s model and its full (unsharded) shape, in file order."""
    d, i, q, kv, dh = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size, config.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        out.update({p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                    p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q)})
        if config.qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
        if config.o_bias:
            out[p + "self_attn.o_proj.bias"] = (d,)
        if config.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (dh,), p + "self_attn.k_norm.weight": (dh,)})
        if config.is_sparse(n) and config.model_type == "mixtral":  # experts in index order: an EP rank's lie together
            out[p + "block_sparse_moe.gate.weight"] = (config.num_experts, d)
            for e in range(config.num_experts):
                x, w = f"{p}block_sparse_moe.experts.{e}.", config.expert_size
                out.update({x + "w1.weight": (w, d), x + "w2.weight": (d, w), x + "w3.weight": (w, d)})
        elif config.is_sparse(n):  # Qwen3-MoE
            out[p + "mlp.gate.weight"] = (config.num_experts, d)
            for e in range(config.num_experts):
                x, w = f"{p}mlp.experts.{e}.", config.expert_size
                out.update({x + "gate_proj.weight": (w, d), x + "up_proj.weight": (w, d), x + "down_proj.weight": (d, w)})
        else:
            out.update({p + "mlp.gate_proj.weight": (i, d), p + "mlp.up_proj.weight": (i, d),
                        p + "mlp.down_proj.weight": (d, i)})
        out.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    out["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (config.vocab_size, d)
    return out


def _draw(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return (torch.randn(shape, generator=gen) * 0.25).to(dtype)
    std = 1.0 if name == "model.embed_tokens.weight" else shape[1] ** -0.5
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def shard_plan(shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into files of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _tensors(names: list[str], shapes: dict[str, tuple[int, ...]], gen: torch.Generator,
             dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        yield name, _draw(name, shapes[name], gen, dtype)


def make_model(path: str | Path, size: str | ModelConfig = "tiny", seed: int = 0,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, arch: str | None = None) -> Path:
    """Write a seeded random checkpoint in HF format into directory ``path``.

    Args:
        path: the directory (created if needed; existing weight files are replaced).
        size: ``tiny``, ``small``, ``1b`` (see ``SIZES``, all Llama) or a ``ModelConfig``.
        seed: the random seed; the same size, arch and seed give the same tensors.
        max_shard_bytes: above this total the weights are split into HF shard files with an index.
        arch: ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``mixtral``, ``qwen3_moe`` or ``moe`` (Mixtral's layout;
            see ``arch_config``); None keeps ``size``'s own family.

    Returns:
        ``path`` as a ``Path``.
    """
    if isinstance(size, str):
        if size not in SIZES:
            raise CheckpointError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
        size = SIZES[size]
    config = replace(arch_config(size, arch) if arch else size, source="")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in [path / WEIGHTS_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    shapes = tensor_shapes(config)
    dtype = config.dtype
    gen = torch.Generator().manual_seed(seed)
    shards = shard_plan(shapes, dtype.itemsize, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(dict(_tensors(shards[0], shapes, gen, dtype)), str(path / WEIGHTS_FILE), metadata=meta)
    else:
        weight_map, total = {}, 0
        for k, names in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = dict(_tensors(names, shapes, gen, dtype))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(path / fname), metadata=meta)
            weight_map.update({n: fname for n in names})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (path / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    eos = list(config.eos_token_ids)
    generation = {"_from_model_config": True, "bos_token_id": config.bos_token_id,
                  "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "transformers_version": HF_VERSION}
    (path / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(path, config)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rallypoint.worker.checkpoint",
                                 description="Write a seeded random checkpoint in HF format.")
    ap.add_argument("dir")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--arch", default="llama", choices=ARCHS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-bytes", type=int, default=DEFAULT_SHARD_BYTES)
    args = ap.parse_args(argv)
    try:
        out = make_model(args.dir, args.size, args.seed, args.max_shard_bytes, arch=args.arch)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
