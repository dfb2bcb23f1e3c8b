"""Seeded random Llama checkpoints in Hugging Face format, and the byte-level tokenizer they use.

``make_model(dir, size, seed)`` writes ``config.json``, ``tokenizer_config.json`` and the weights,
named exactly as HF's ``LlamaForCausalLM``: one ``model.safetensors``, or above ``max_shard_bytes``
``model-0000i-of-0000n.safetensors`` files plus ``model.safetensors.index.json``. Same size and
seed, same bytes.

Weights are drawn so activations stay O(1) and greedy decoding has clear winners: embedding
N(0, 1), every projection N(0, 1/in_features) (the LM head too, so logits are O(1)), norms ones.

Command line: ``python -m rallypoint.worker.checkpoint DIR --size tiny --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from rallypoint.errors import CheckpointError
from rallypoint.worker.llama_config import CONFIG_FILE, LlamaConfig

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB: "1b" (2 GB in bf16) is written as 2 shards
BOS_ID, EOS_ID, VOCAB = 256, 257, 320  # bytes 0..255, two specials, padded to a multiple of 64

_COMMON: dict[str, Any] = dict(vocab_size=VOCAB, bos_token_id=BOS_ID, eos_token_id=EOS_ID, rms_norm_eps=1e-5)
SIZES: dict[str, LlamaConfig] = {
    # ~0.24 M params, 1 MB in float32; TP up to 4 (8 heads, 4 KV heads), PP up to 4.
    "tiny": LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, max_position_embeddings=512, torch_dtype="float32", **_COMMON),
    # ~6.5 M params, 26 MB in float32; TP up to 4, PP up to 8.
    "small": LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=2048, torch_dtype="float32", **_COMMON),
    # ~0.97 B params, 1.95 GB in bfloat16 (Llama 3.2 1B's body); TP up to 8, PP up to 16.
    "1b": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                      torch_dtype="bfloat16", **_COMMON),
}


# -- tokenizer -------------------------------------------------------------------------------

class ByteTokenizer:
    """Ids 0..255 are bytes of the UTF-8 text; ``bos_id`` and ``eos_id`` are specials above them."""

    name = "RallypointByteTokenizer"

    def __init__(self, bos_id: int = BOS_ID, eos_id: int = EOS_ID, vocab_size: int = VOCAB) -> None:
        self.bos_id, self.eos_id, self.vocab_size = bos_id, eos_id, vocab_size

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` as ids, with ``bos_id`` first when ``bos``."""
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Text of the byte ids (specials and padding ids dropped; bad UTF-8 becomes U+FFFD)."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def to_config(self) -> dict[str, Any]:
        return {"tokenizer_class": self.name, "bos_token_id": self.bos_id, "eos_token_id": self.eos_id,
                "vocab_size": self.vocab_size, "bos_token": "<s>", "eos_token": "</s>"}


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind the same ``encode``/``decode`` as ``ByteTokenizer``."""

    def __init__(self, tok: Any, bos_id: int | None, eos_id: int | None) -> None:
        self.tok, self.bos_id, self.eos_id = tok, bos_id, eos_id

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of checkpoint directory ``path``.

    Our checkpoints name ``RallypointByteTokenizer`` in ``tokenizer_config.json``; a real HF
    directory with ``tokenizer.json`` is read with the ``tokenizers`` package when it is installed.

    Raises:
        CheckpointError: no tokenizer description, or ``tokenizers`` is needed and missing.
    """
    path = Path(path)
    cfg_file = path / TOKENIZER_CONFIG
    cfg: dict[str, Any] = {}
    if cfg_file.exists():
        try:
            cfg = json.loads(cfg_file.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{cfg_file}: not JSON: {exc}") from None
    if cfg.get("tokenizer_class") == ByteTokenizer.name:
        return ByteTokenizer(cfg.get("bos_token_id", BOS_ID), cfg.get("eos_token_id", EOS_ID),
                             cfg.get("vocab_size", VOCAB))
    tj = path / "tokenizer.json"
    if not tj.exists():
        raise CheckpointError(f"{path}: no tokenizer (neither a {ByteTokenizer.name} {TOKENIZER_CONFIG} "
                              "nor a tokenizer.json)")
    try:
        from tokenizers import Tokenizer  # optional: only real HF checkpoints need it
    except ImportError:
        raise CheckpointError(f"{tj}: reading a HF tokenizer needs the 'tokenizers' package, "
                              "which is not installed") from None
    model_cfg = LlamaConfig.from_dir(path) if (path / CONFIG_FILE).exists() else None
    bos = cfg.get("bos_token_id", model_cfg.bos_token_id if model_cfg else None)
    eos = cfg.get("eos_token_id", model_cfg.eos_token_id if model_cfg else None)
    return HFTokenizer(Tokenizer.from_file(str(tj)), bos, eos)


# -- weights ---------------------------------------------------------------------------------

def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of ``config``'s model and its full (unsharded) shape, in file order."""
    d, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        out.update({
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (i, d), p + "mlp.up_proj.weight": (i, d), p + "mlp.down_proj.weight": (d, i),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
    out["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (config.vocab_size, d)
    return out


def _draw(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape, dtype=dtype)
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


def make_model(path: str | Path, size: str | LlamaConfig = "tiny", seed: int = 0,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a seeded random Llama checkpoint in HF format into directory ``path``.

    Args:
        path: the directory (created if needed; existing weight files are replaced).
        size: ``tiny``, ``small``, ``1b`` (see ``SIZES``) or a ``LlamaConfig``.
        seed: the random seed; the same size and seed give the same tensors.
        max_shard_bytes: above this total the weights are split into HF shard files with an index.

    Returns:
        ``path`` as a ``Path``.
    """
    if isinstance(size, str):
        if size not in SIZES:
            raise CheckpointError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
        size = SIZES[size]
    config = replace(size, source="")
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
    tok = ByteTokenizer(config.bos_token_id or BOS_ID, config.eos_token_id or EOS_ID, config.vocab_size)
    (path / TOKENIZER_CONFIG).write_text(json.dumps(tok.to_config(), indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rallypoint.worker.checkpoint",
                                 description="Write a seeded random Llama checkpoint in HF format.")
    ap.add_argument("dir")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-bytes", type=int, default=DEFAULT_SHARD_BYTES)
    args = ap.parse_args(argv)
    try:
        out = make_model(args.dir, args.size, args.seed, args.max_shard_bytes)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
